"""Benchmark the tiny profile's training stages: SFT and GRPO step time, samples/s, peak memory.

Each stage runs in its own process (so its peak memory is its own) on the same cases, with the
profile's real settings (batch, generations, completion length), for ``--steps`` steps; the first
step is left out of the timing (it pays for lazy initialisation). Printed side by side, with the
GRPO / SFT ratios measured in the same run.

Data: ``--cohort/--splits/--images`` (e.g. the pipeline's ``data/`` folders), or by default a
small simulated cohort generated, ingested, split and rendered into a temporary folder.

Usage:
    .venv/bin/python benchmarks/bench_train.py [--steps 8] [--threads 2] [--profile tiny]

Note: GRPO starting from the randomly initialised base model never emits the end-of-turn token,
so every completion runs to ``max_completion_length``: its step time is the worst case for that
length (a warmed-up model stops at about 30 tokens).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_data(root: Path, n: int) -> dict[str, str]:
    """Simulate, ingest, split and render a small cohort (the pipeline's own code path)."""
    from ecg_r1.data.ingest import ingest
    from ecg_r1.data.split import split_cohort, write_splits
    from ecg_r1.data.store import read_cohort
    from ecg_r1.imaging.page import CLINICAL, with_size
    from ecg_r1.imaging.render import render_cohort
    from ecg_r1.simulate import simulate_cohort

    simulate_cohort(root / "raw", n=n, hospitals=4, seed=0)
    ingest([root / "raw"], root / "cohort")
    cohort = read_cohort(root / "cohort")
    held_out = sorted(cohort["hospital"].unique().to_list())[-1]
    write_splits(split_cohort(cohort, [held_out], 0.1, 0.15, seed=0), root / "splits.parquet")
    render_cohort(root / "cohort", root / "images", with_size(CLINICAL, 224), workers=2)
    return {
        "cohort": str(root / "cohort"),
        "splits": str(root / "splits.parquet"),
        "images": str(root / "images"),
    }


def worker(args: argparse.Namespace) -> None:
    """Run one stage for ``--steps`` steps and print its timing as JSON (child process)."""
    import numpy as np
    import torch
    from transformers import TrainerCallback

    from ecg_r1.modeling.profiles import load_profile
    from ecg_r1.training import runner, stage_folder, stages

    torch.set_num_threads(args.threads)
    profile = load_profile(args.profile)
    data = {"cohort_dir": args.cohort, "splits_path": args.splits, "images_dir": args.images}
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    out = Path(args.out)
    base = stages.build_start_model(profile, out_dir=out / "base", **data)
    run = stages.run_sft if args.stage == "sft" else stages.run_grpo
    result = run(
        profile,
        base,
        out_dir=out / args.stage,
        max_steps=args.steps,
        options=runner.RunOptions(tracking=False, callbacks=[Timer()]),
        **data,
    )
    cfg = profile.trainer_kwargs(args.stage)
    batch = cfg["per_device_train_batch_size"] * cfg.get("gradient_accumulation_steps", 1)
    step = float(np.median(times[1:] or times))
    # num_tokens is the trainer's running count of input tokens (prompt + completion)
    tokens = [h["num_tokens"] for h in result.history if "num_tokens" in h]
    per_step_tokens = tokens[-1] / result.steps if tokens else float("nan")
    report = {
        "stage": args.stage,
        "steps": result.steps,
        "median_step_s": step,
        "sequences_per_step": batch,
        "prompts_per_step": batch // cfg.get("num_generations", 1) if args.stage == "grpo" else batch,
        "sequences_per_s": batch / step,
        "tokens_per_step": per_step_tokens,
        "tokens_per_s": per_step_tokens / step,
        "peak_rss_mb": stage_folder.peak_rss_mb(),
    }
    if args.stage == "grpo":
        report["completion_length"] = result.metrics.get("completions/mean_length")
    print("BENCH " + json.dumps(report))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--steps", type=int, default=8, help="steps per stage (the first is not timed)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per stage")
    parser.add_argument("--cohort")
    parser.add_argument("--splits")
    parser.add_argument("--images")
    parser.add_argument("--n", type=int, default=96, help="simulated cases when no data is given")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        if args.cohort and args.splits and args.images:
            data = {"cohort": args.cohort, "splits": args.splits, "images": args.images}
        else:
            started = time.perf_counter()
            data = make_data(Path(tmp) / "data", args.n)
            print(f"made a {args.n}-case simulated cohort in {time.perf_counter() - started:.1f} s")
        reports = {}
        for stage in ("sft", "grpo"):
            command = [
                sys.executable,
                __file__,
                "--stage",
                stage,
                "--out",
                str(Path(tmp) / "runs"),
                "--profile",
                args.profile,
                "--steps",
                str(args.steps),
                "--threads",
                str(args.threads),
                "--cohort",
                data["cohort"],
                "--splits",
                data["splits"],
                "--images",
                data["images"],
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
            if done.returncode != 0 or not lines:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{stage} benchmark failed ({done.returncode})")
            reports[stage] = json.loads(lines[-1][len("BENCH ") :])
    sft, grpo = reports["sft"], reports["grpo"]
    print(
        f"\nprofile {args.profile}, {args.threads} torch threads, {args.steps} steps per stage (median step time)"
    )
    print(
        f"{'stage':6} {'step s':>8} {'seq/step':>9} {'seq/s':>7} {'prompts/s':>10} {'tokens/s':>9} {'peak RSS MB':>12}"
    )
    for name, r in reports.items():
        prompts_s = r["prompts_per_step"] / r["median_step_s"]
        print(
            f"{name:6} {r['median_step_s']:8.3f} {r['sequences_per_step']:9d} {r['sequences_per_s']:7.1f} "
            f"{prompts_s:10.2f} {r['tokens_per_s']:9.0f} {r['peak_rss_mb']:12.0f}"
        )
    if grpo.get("completion_length") is not None:
        print(f"GRPO completions: {grpo['completion_length']:.0f} tokens on average")
    print(
        f"ratios GRPO / SFT: step time {grpo['median_step_s'] / sft['median_step_s']:.1f}x, "
        f"prompts/s {(grpo['prompts_per_step'] / grpo['median_step_s']) / (sft['prompts_per_step'] / sft['median_step_s']):.2f}x, "
        f"peak memory {grpo['peak_rss_mb'] / sft['peak_rss_mb']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
