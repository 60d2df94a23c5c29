"""``ecg-r1 train vision|warmup|sft|grpo``: run one training stage of a profile."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from ecg_r1.data.folders import check_out_folder
from ecg_r1.modeling.profiles import DEFAULT_PROFILE, Profile
from ecg_r1.modeling.stage_settings import WARMUP_ANSWERS
from ecg_r1.training.processes import world_rank

logger = logging.getLogger(__name__)

STAGE_HELP = {
    "vision": "signal-grounded pre-training of the vision tower (targets measured from the raw signal)",
    "warmup": "label-free format warm-up (output contract; answer masked or random)",
    "sft": "supervised fine-tuning with TRL's SFTTrainer (the baseline); registers ecg-r1-sft",
    "grpo": "GRPO with TRL's GRPOTrainer (format / accuracy / grounding rewards); registers ecg-r1-grpo",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model: vision pre-training, format warm-up, SFT or GRPO",
        description="Run one training stage on the labelled TWI cases of the training split. The model "
        "starts from --from (a model folder written by an earlier stage) or, without it, from the "
        "profile's base model (tiny: built here, with a tokenizer trained on the cohort's texts; "
        "hub profiles: the pretrained checkpoint). Writes OUT/model, OUT/checkpoints and "
        "OUT/result.json; a stage killed part-way resumes from its last checkpoint when run again "
        "with the same --out, logging to the same MLflow run. Prints the result as JSON.",
    )
    parser.add_argument(
        "stage", choices=list(STAGE_HELP), help="; ".join(f"{k}: {v}" for k, v in STAGE_HELP.items())
    )
    parser.add_argument(
        "--profile", default=DEFAULT_PROFILE, help=f"profile name or YAML path (default {DEFAULT_PROFILE})"
    )
    parser.add_argument("--cohort", type=Path, required=True, metavar="DIR", help="ingested cohort folder")
    parser.add_argument(
        "--splits", type=Path, required=True, metavar="FILE", help="split manifest (splits.parquet)"
    )
    parser.add_argument(
        "--images", type=Path, required=True, metavar="DIR", help="rendered images (with index.parquet)"
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="the stage's output folder")
    parser.add_argument(
        "--from",
        dest="start",
        type=Path,
        metavar="MODEL_DIR",
        help="model folder to start from (default: base model)",
    )
    parser.add_argument(
        "--max-steps", type=int, metavar="N", help="optimiser steps (default: from the profile)"
    )
    parser.add_argument("--seed", type=int, help="random seed (default: the profile's)")
    parser.add_argument(
        "--answer",
        choices=WARMUP_ANSWERS,
        help="warmup only: answer kept out of the loss, or drawn at random",
    )
    rationale = parser.add_mutually_exclusive_group()
    rationale.add_argument(
        "--rationale",
        dest="rationale",
        action="store_true",
        default=None,
        help="sft only: findings rationale in targets",
    )
    rationale.add_argument(
        "--no-rationale", dest="rationale", action="store_false", help="sft only: answer-only targets"
    )
    parser.add_argument(
        "--mlflow",
        type=Path,
        metavar="DIR",
        help="folder holding the MLflow store (DIR/mlflow/mlflow.db; default: the repository root)",
    )
    parser.add_argument("--run-name", help="the MLflow run's name (default: <stage>-<time>)")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (nor register)")
    parser.add_argument(
        "--no-register", action="store_true", help="log the run but register no model version"
    )
    parser.add_argument(
        "--restart", action="store_true", help="ignore checkpoints in --out and start from step 0"
    )
    parser.add_argument(
        "--launch-config",
        metavar="NAME_OR_FILE",
        help="sft and grpo: the accelerate config this process was launched with (ddp, zero2, zero3 or a "
        "YAML path). Checked against the profile first (ecg-r1 launch-check); the stage then trains with "
        "the planned per-device batch and accumulation steps, keeping the profile's global batch",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    check_out_folder(args.out)  # before the heavy imports: a refusal is instant
    import torch

    from ecg_r1.imaging.render import page_mismatch
    from ecg_r1.modeling.device import resolve_device
    from ecg_r1.modeling.profiles import load_profile
    from ecg_r1.tracking import runs as tracking
    from ecg_r1.training import runner, stages

    if args.threads:
        torch.set_num_threads(args.threads)
    profile = load_profile(args.profile)
    # What the arguments get wrong stops here, before any model is fetched or built: the start
    # folder, a GPU profile without a GPU, pages of another size or layout than the profile's.
    start = args.start
    if start is not None and not (Path(start) / "config.json").is_file():
        raise SystemExit(
            f"--from {start}: not a model folder (no config.json); pass OUT/model of an earlier stage"
        )
    resolve_device(profile)
    if problem := page_mismatch(args.images, profile.render_config()):
        raise ValueError(f"profile {profile.name}: {problem}")
    if args.launch_config:
        profile = _planned_profile(profile, args.stage, args.launch_config)
    data = {"cohort_dir": args.cohort, "splits_path": args.splits, "images_dir": args.images}
    tracked = not args.no_tracking
    if tracked:
        # --mlflow names a folder; without it the store the rest of the project uses
        # ($ECG_R1_MLFLOW_URI, e.g. the stack's tracking server), else the repository's.
        if args.mlflow is not None:
            tracking.configure(args.mlflow)
        else:
            tracking.configure_store(runner.REPO_ROOT)
    if start is None:
        with _one_process_at_a_time(args.out / "base_model.lock"):  # the first builds, the others reuse it
            start = stages.build_start_model(profile, out_dir=args.out / "base_model", **data)
    common = {"max_steps": args.max_steps, "seed": args.seed, **data}
    if args.stage == "vision":
        result = stages.run_vision_stage(
            profile, start, out_dir=args.out, tracking=tracked, run_name=args.run_name, **common
        )
    else:
        options = runner.RunOptions(
            tracking=tracked,
            register=not args.no_register,
            progress=not args.no_progress,
            resume=not args.restart,
            run_name=args.run_name,
        )
        own = {"warmup": {"answer": args.answer}, "sft": {"rationale": args.rationale}, "grpo": {}}[
            args.stage
        ]
        run = stages.stage_function(args.stage)
        result = run(profile, start, out_dir=args.out, options=options, **common, **own)
    if world_rank() == 0:  # under torchrun every process returns the main one's result
        summary = json.loads(result.to_json())
        summary.pop("history", None)
        print(json.dumps(summary, indent=2))
    return 0


@contextlib.contextmanager
def _one_process_at_a_time(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock``: the processes of one ``torchrun`` launch pass one by one
    (before training starts there is no process group to wait on)."""
    import fcntl

    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _planned_profile(profile: Profile, stage: str, launch_config: str) -> Profile:
    """The profile under a launch config, after its pre-flight check."""
    from ecg_r1.training.launch import load_launch_config, preflight, with_launch_config
    from ecg_r1.training.processes import world_size_from_env

    if stage not in ("sft", "grpo"):
        raise ValueError(f"--launch-config is for the sft and grpo stages, not {stage!r}")
    launch = load_launch_config(launch_config)
    # Under `accelerate launch` WORLD_SIZE is the process count actually started (--num_processes
    # may override the file's); the stage spreads its batch over that count itself.
    plan = preflight(profile, stage, launch, num_processes=world_size_from_env())
    logger.info(
        "%s on %d processes: per-device batch %d x accumulation %d (global %d)",
        stage,
        plan.num_processes,
        plan.per_device_train_batch_size,
        plan.gradient_accumulation_steps,
        plan.global_batch,
    )
    return with_launch_config(profile, stage, launch)
