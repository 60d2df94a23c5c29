"""``ecg-r1 evaluate``: compare model versions with the reference rows on the internal and
cross-hospital test splits (and, with ``--real-records``, on real records: a sim-to-real check), and
print the comparison table."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from ecg_r1.cli.predict import add_mlflow_root
from ecg_r1.constants import DEFAULT_SEED, N_BOOT, PREDICTION_BATCH_SIZE
from ecg_r1.data.folders import check_out_folder
from ecg_r1.modeling.profiles import DEFAULT_PROFILE

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate model versions against the baselines on the internal and cross-hospital tests",
        description="Let each model answer the labelled TWI cases of test_internal and test_external (the "
        "held-out hospitals), add the reference rows (majority class, feature baseline, the clinicians' "
        "cited ~50%% PPV and, with --truth, the simulator's Bayes ceiling), and write the comparison "
        "table, metrics.json, predictions and plots to --out. Invalid outputs count as wrong. With "
        "--real-records, also on those real records (a third section, 'real records (sim-to-real)').",
    )
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="[NAME=]MODEL",
        help="models:/NAME/VERSION or models:/NAME@ALIAS from the MLflow registry, a model folder or a "
        "training stage folder; repeat for several; NAME= sets the row name",
    )
    parser.add_argument("--cohort", type=Path, required=True, help="ingested cohort folder")
    parser.add_argument("--splits", type=Path, required=True, help="split manifest (splits.parquet)")
    parser.add_argument("--images", type=Path, required=True, help="rendered images folder (index.parquet)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for table, metrics and plots")
    parser.add_argument(
        "--truth", type=Path, default=None, help="simulator truth.parquet: adds the Bayes-optimal ceiling"
    )
    parser.add_argument(
        "--baselines",
        type=Path,
        default=None,
        help="fitted reference baselines folder (default: fit on train)",
    )
    parser.add_argument(
        "--profile", default=None, help="model profile (default: the one recorded in the model, else tiny)"
    )
    parser.add_argument("--n-boot", type=int, default=N_BOOT, help="bootstrap resamples per interval")
    parser.add_argument(
        "--batch-size", type=int, default=PREDICTION_BATCH_SIZE, help="examples per forward pass"
    )
    parser.add_argument(
        "--max-cases-per-split",
        type=int,
        default=None,
        help="evaluate a seeded sample of at most this many cases per split (default: all)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="completion cap (default: the profile's)"
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help="seed of the bootstrap and the baselines"
    )
    parser.add_argument(
        "--ablation",
        action="append",
        default=[],
        metavar="INPUT",
        help="also evaluate each model with this input taken away (image: a flat-line page; note: "
        "no clinical note) or, with --truth, replaced (english_note: a hospital's notes in another "
        "language written in English, on the splits holding them); repeatable",
    )
    parser.add_argument(
        "--real-records",
        action="append",
        default=[],
        type=Path,
        metavar="PATH",
        help="real records for a sim-to-real section (a LUDB, CinC or PTB-XL folder or a manifest CSV; "
        "repeatable): ingested and rendered at the profile's page size into OUT/real_records, and the "
        "labelled TWI records not in --cohort evaluated as 'real records (sim-to-real)'",
    )
    parser.add_argument(
        "--log",
        action="store_true",
        help="log the results in MLflow as the Dagster asset does: each registered version's metrics "
        "and answers on its run, and the table and plots in an 'evaluation' run (then `ecg-r1 "
        "promote --evaluation OUT` can judge the new versions)",
    )
    add_mlflow_root(parser)
    parser.set_defaults(func=run)


def _row_name(spec: str) -> tuple[str, str]:
    """``NAME=MODEL`` -> (NAME, MODEL); a bare model gets a name from its URI or folder."""
    if "=" in spec and not spec.startswith("models:/"):
        name, model = spec.split("=", 1)
        return name.strip(), model
    if spec.startswith("models:/"):
        return spec[len("models:/") :], spec
    return Path(spec).name, spec


def run(args: argparse.Namespace) -> int:
    check_out_folder(args.out)  # before the heavy imports: a refusal is instant
    from ecg_r1.cli.predict import resolve_model_dir
    from ecg_r1.evaluation.comparison import ComparisonInputs, ComparisonSettings, run_comparison
    from ecg_r1.evaluation.real_records import REAL_SPLIT, prepare_real_records
    from ecg_r1.modeling.models import MODEL_INFO_FILE
    from ecg_r1.modeling.profiles import load_profile
    from ecg_r1.training.data import TrainingDataError

    models: dict[str, Path] = {}
    for spec in args.model:
        name, model = _row_name(spec)
        if name in models:
            raise SystemExit(f"two --model rows are named {name!r}; give one a NAME= prefix")
        models[name] = resolve_model_dir(model, args.mlflow_root)
    profile_name = args.profile
    if profile_name is None:
        for folder in models.values():
            for info in (folder / MODEL_INFO_FILE, folder / "model" / MODEL_INFO_FILE):
                if info.is_file():
                    profile_name = json.loads(info.read_text()).get("profile")
                    break
            if profile_name:
                break
    try:
        profile = load_profile(profile_name or DEFAULT_PROFILE)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cannot load profile {profile_name!r}: {exc}; pass --profile") from exc
    real_dir = None
    if args.real_records:
        try:
            real = prepare_real_records(args.real_records, args.out / REAL_SPLIT, profile.render_config())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"cannot prepare the real records: {exc}") from exc
        real_dir = real.folder
    try:
        inputs = ComparisonInputs(
            args.cohort,
            args.splits,
            args.images,
            truth_path=args.truth,
            baselines_dir=args.baselines,
            real_records=real_dir,
        )
        settings = ComparisonSettings(
            seed=args.seed,
            n_boot=args.n_boot,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            max_cases_per_split=args.max_cases_per_split,
            progress=True,
            ablations=args.ablation,
        )
        result = run_comparison(models, profile, inputs, args.out, settings)
    except (TrainingDataError, ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"evaluation failed: {exc}") from exc
    print(result.table)
    print(f"Written to {result.out_dir}: {', '.join(sorted(p.name for p in result.plots.values()))}")
    if args.log:
        _log(args, result, profile.name)
    return 0


def _log(args: argparse.Namespace, result: Any, experiment: str) -> None:
    """Log the comparison as the ``model_comparison`` asset does (:mod:`ecg_r1.evaluation.registry`)."""
    from ecg_r1.evaluation import registry
    from ecg_r1.tracking import model_registry
    from ecg_r1.tracking import runs as tracking

    tracking.configure(args.mlflow_root)
    versions = {}
    for spec in args.model:
        name, model = _row_name(spec)
        if model.startswith("models:/"):
            versions[name] = model_registry.resolve_version(model)
        else:  # a training stage folder knows the version it registered; a model folder none
            versions[name] = registry.stage_version(Path(model))
    logged = registry.log_comparison(
        result,
        versions,
        experiment,
        provenance=tracking.run_context(args.mlflow_root),
        params={"n_boot": args.n_boot, "seed": args.seed},
    )
    print(
        f"Logged to MLflow: evaluation run {logged.evaluation_run_id}; versions {logged.registered or 'none'}"
    )
