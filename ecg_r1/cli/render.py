"""``ecg-r1 render RECORD_OR_DIR --out DIR``: draw 12-lead printouts of a cohort or of one record."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ecg_r1.constants import DEFAULT_SEED
from ecg_r1.data.folders import check_out_folder
from ecg_r1.imaging.layouts import LAYOUTS

logger = logging.getLogger(__name__)

# Spelled out so that `--help` does not import the renderer; a test checks they match it.
PRESET_NAMES = ("clinical", "model-448", "model-896")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "render",
        help="draw 12-lead ECG printouts (PNG) of a cohort folder or of one WFDB record",
        description=(
            "Draw standard 12-lead printouts: grid paper (1 mm / 5 mm), 25 mm/s and 10 mm/mV unless "
            "changed, calibration pulse, lead labels. RECORD_OR_DIR is a cohort folder (ingest output, "
            "holding cohort.parquet) or one WFDB/CinC record (its .hea file, or the record path without "
            "extension). A cohort is rendered in parallel into DIR/<2 hex>/<content hash>.png with "
            "DIR/index.parquet; images already there for the same signal and settings are kept, not "
            "re-drawn. One record is written to DIR/<record name>.png with its name in the header."
        ),
    )
    parser.add_argument(
        "path", type=Path, metavar="RECORD_OR_DIR", help="cohort folder or record header (.hea)"
    )
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the PNG files")
    parser.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        default="clinical",
        help="starting settings: clinical = 2200x1700 px (200 dpi letter page); model-448 / model-896 = the "
        "sizes a vision-language model reads (default clinical)",
    )
    parser.add_argument("--layout", choices=LAYOUTS, help="page layout (default 3x4+rhythm)")
    parser.add_argument(
        "--width", type=int, help="page width in pixels (height follows the paper unless --height)"
    )
    parser.add_argument("--height", type=int, help="page height in pixels")
    parser.add_argument("--greyscale", action="store_true", help="grey grid instead of red")
    parser.add_argument("--gain", type=float, help="mm per mV (default 10)")
    parser.add_argument("--speed", type=float, help="mm per second (default 25)")
    parser.add_argument("--line-width", type=float, help="trace thickness in mm of paper (default 0.3)")
    parser.add_argument(
        "--augment",
        choices=("off", "scan"),
        default="off",
        help="seeded scan-like augmentation (rotation, blur, noise, contrast, colour); default off",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help="augmentation seed (default %(default)s)"
    )
    parser.add_argument("--ids", nargs="+", metavar="ID", help="render only these record ids of the cohort")
    parser.add_argument("--workers", type=int, default=2, help="processes for a cohort (default 2)")
    parser.add_argument(
        "--prune",
        action="store_true",
        help="delete images in DIR that the new index does not name (cohorts only)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def build_config(args: argparse.Namespace):  # -> RenderConfig (imported lazily: keeps --help fast)
    """The render settings the command line asks for: the preset, then each option given."""
    from dataclasses import replace

    from ecg_r1.imaging.augment import Augment
    from ecg_r1.imaging.page import PRESETS

    changes: dict[str, object] = {}
    if args.width is not None:
        changes.update(width_px=args.width, height_px=args.height)
    elif args.height is not None:
        changes.update(height_px=args.height)
    for option, name in (
        ("layout", "layout"),
        ("gain", "gain_mm_per_mv"),
        ("speed", "speed_mm_per_s"),
        ("line_width", "line_width"),
    ):
        if getattr(args, option) is not None:
            changes[name] = getattr(args, option)
    if args.greyscale:
        changes["color"] = False
    if args.augment == "scan":
        changes["augment"] = Augment.scan(seed=args.seed)
    try:
        return replace(PRESETS[args.preset], **changes)
    except ValueError as error:
        raise SystemExit(f"ecg-r1 render: {error}") from error


def run(args: argparse.Namespace) -> int:
    from ecg_r1.data.store import COHORT_FILE
    from ecg_r1.imaging.render import render_cohort

    if args.workers < 1:
        raise SystemExit("ecg-r1 render: --workers must be at least 1")
    check_out_folder(args.out)
    config = build_config(args)
    path: Path = args.path
    if path.is_dir():
        if not (path / COHORT_FILE).is_file():
            raise SystemExit(
                f"ecg-r1 render: {path} is a folder without {COHORT_FILE}; pass a cohort folder "
                "(run `ecg-r1 ingest` on raw records first) or one record's .hea file"
            )
        try:
            summary = render_cohort(
                path,
                args.out,
                config,
                record_ids=args.ids,
                workers=args.workers,
                progress=not args.no_progress,
            )
        except ValueError as error:
            raise SystemExit(f"ecg-r1 render: {error}") from error
        print(
            json.dumps(
                {
                    "rendered": summary.rendered,
                    "cached": summary.cached,
                    "failed": [{"record_id": rid, "reason": why} for rid, why in summary.failed],
                    "seconds": round(summary.seconds, 2),
                    "images_per_s": round(summary.images_per_s, 1),
                    "index": str(Path(args.out) / "index.parquet"),
                    "examples": [str(p) for p in summary.examples],
                    "config": config.describe(),
                },
                indent=2,
            )
        )
        if summary.failed and summary.index.is_empty():
            return 2
        return 0
    return _render_record(path, args.out, config)


def _render_record(path: Path, out: Path, config) -> int:
    from ecg_r1.data.canonical import CanonicalError
    from ecg_r1.data.readers import RecordError, read_record
    from ecg_r1.imaging.draw import render_png

    if not (path.exists() or path.with_name(path.name + ".hea").exists()):
        raise SystemExit(
            f"ecg-r1 render: {path} does not exist; pass a cohort folder or a record's .hea file"
        )
    try:
        record = read_record(path)
    except (RecordError, CanonicalError, OSError) as error:
        raise SystemExit(f"ecg-r1 render: cannot read {path}: {error}") from error
    name = Path(str(record.meta.get("record_name") or path.stem)).name
    target = render_png(record.signal, config, Path(out) / f"{name}.png", header=f"record {name}")
    print(target)
    return 0
