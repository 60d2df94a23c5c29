"""``ecg-r1 ingest PATH... --out DIR``: read ECG records into a cohort folder; prints the summary as JSON."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ingest",
        help="read PTB-XL, CinC, LUDB folders or manifest CSVs into a cohort folder",
        description=(
            "Read ECG records into one cohort folder (cohort.parquet, signals.f32, quarantine.parquet, "
            "summary.json). Each PATH is a folder whose layout is detected (PTB-XL: ptbxl_database.csv; "
            "LUDB: ludb.csv or annotated headers; a folder holding manifest.csv; otherwise PhysioNet/CinC "
            ".hea + .mat/.dat files, searched recursively) or a manifest CSV file. Refused records go to "
            "quarantine.parquet with the reason and what to do. The JSON summary is printed last; "
            "records_in == loaded + sum(quarantined)."
        ),
    )
    parser.add_argument(
        "paths", nargs="+", type=Path, metavar="PATH", help="input folders or manifest CSV files"
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="cohort folder to write (replaced as a whole once the new cohort is complete)",
    )
    parser.add_argument("--workers", type=int, default=1, help="processes reading records (default 1)")
    parser.add_argument(
        "--rules", type=Path, default=None, help="label rules YAML (default: ecg_r1/configs/labels.yaml)"
    )
    parser.add_argument(
        "--record-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="longest one record may take to read; a slower one is quarantined as 'timeout' and the rest "
        "load (default: ecg_r1.data.ingest.RECORD_TIMEOUT_S, 10 s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--force", action="store_true", help="replace an existing cohort even when no record was loaded"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ecg_r1.data.ingest import RECORD_TIMEOUT_S, IngestRefused, ingest
    from ecg_r1.data.labels import load_rules

    if args.workers < 1:
        raise SystemExit("--workers must be at least 1")
    record_timeout_s = RECORD_TIMEOUT_S if args.record_timeout is None else args.record_timeout
    if not 0 < record_timeout_s < float("inf"):
        raise ValueError(f"--record-timeout must be a positive number of seconds, got {record_timeout_s:g}")
    rules = load_rules(args.rules)  # a bad file: a ValueError naming it, one line (ecg_r1.cli.main)
    try:
        summary = ingest(
            args.paths,
            args.out,
            rules=rules,
            workers=args.workers,
            progress=not args.no_progress,
            force=args.force,
            record_timeout_s=record_timeout_s,
        )
    except IngestRefused as exc:
        raise SystemExit(f"ecg-r1 ingest: {exc}") from exc
    print(json.dumps(summary.to_dict(), indent=2))
    if summary.loaded == 0:
        logger.error("no record was loaded; see %s for why", Path(args.out) / "quarantine.parquet")
        return 2
    return 0
