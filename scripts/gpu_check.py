"""The GPU check: the qwen2-vl-2b code path on one GPU, through the project's own entry points.

1. ``pipeline``: ``full_pipeline_job`` with ``dagster_project/run_configs/qwen2-vl-2b-standin.yaml``
   (the stand-in checkpoint, every 2B setting) with its ``device: cpu`` switches taken out, so it
   runs where the device rule puts it: the GPU.
2. ``train``: a random-initialised Qwen2-VL with the real 2B dimensions
   (``ecg_r1/configs/random_models/qwen2-vl-2b.yaml``: 28 layers, hidden 1536, intermediate 8960,
   12 heads, 2 KV heads, vocabulary 151,936; vision depth 32, width 1280) trained by
   ``ecg-r1 train sft`` and ``ecg-r1 train grpo`` for a few steps on the pipeline's 896 px pages.
   Random weights rarely end a completion, so GRPO's completions run to the profile's 512 tokens:
   its figures are the worst case for that length.

Writes ``gpu_check.json`` into ``--out`` (default ``$OUT``): per phase wall seconds, and per
training stage seconds a step, samples and tokens a second (TRL's ``num_tokens``: prompt and
completion tokens, image tokens included) and peak GPU memory.

Usage:
    python scripts/gpu_check.py                  # on a GPU, within 10 minutes on one H100 (estimate)
    python scripts/gpu_check.py --tiny           # the same code on a CPU at stand-in size (a check)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RUN_CONFIG = REPO / "dagster_project" / "run_configs" / "qwen2-vl-2b-standin.yaml"
DATA_ASSETS = ("simulated_raw", "raw_cohort", "validated_cohort", "cohort_splits", "ecg_images")


def standin_run_config(on_cpu: bool) -> dict[str, Any]:
    """The stand-in run config; without its ``device: cpu`` switches unless ``on_cpu``."""
    import yaml

    config = yaml.safe_load(RUN_CONFIG.read_text())
    if not on_cpu:
        for op in config["ops"].values():
            op["config"].pop("device", None)
    config["resources"] = {"dvc": {"config": {"track": False}}}
    return config


def run_pipeline(on_cpu: bool, assets: tuple[str, ...] | None = None) -> float:
    """``full_pipeline_job`` (or only ``assets`` of it) in this process; its wall seconds."""
    import dagster as dg

    from dagster_project.definitions import defs

    started = time.perf_counter()
    job = defs().resolve_job_def("full_pipeline_job")
    selection = [dg.AssetKey(name) for name in assets] if assets else None
    result = job.execute_in_process(run_config=standin_run_config(on_cpu), asset_selection=selection)
    if not result.success:
        raise SystemExit("the stand-in pipeline failed (its Dagster log is above)")
    return time.perf_counter() - started


def train(stage: str, args: list[str]) -> dict[str, Any]:
    """``ecg-r1 train STAGE ...`` in this process: its printed result and the peak GPU memory."""
    import torch

    from ecg_r1.cli import main

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["train", stage, *args])
    if code:
        raise SystemExit(f"ecg-r1 train {stage} exited {code}")
    result = json.loads(printed.getvalue()[printed.getvalue().index("{") :])
    metrics = result["metrics"]
    seconds = float(metrics["train_seconds"])
    return {
        "steps": result["steps"],
        "seconds": round(seconds, 2),
        "seconds_per_step": round(float(metrics["seconds_per_step"]), 3),
        "samples_per_second": round(float(metrics["samples_per_second"]), 3),
        "tokens_per_second": round(float(metrics.get("num_tokens", 0.0)) / seconds, 1) if seconds else 0.0,
        "peak_gpu_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if torch.cuda.is_available()
        else None,
        "peak_rss_mb": round(float(metrics["peak_rss_mb"]), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="CPU, stand-in sizes: check the script runs")
    parser.add_argument("--phases", default="pipeline,train", help="comma-separated: pipeline, train")
    parser.add_argument("--steps", type=int, default=3, help="optimiser steps of each training stage")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"))
    parser.add_argument("--home", type=Path, help="data home (default: a temporary folder)")
    args = parser.parse_args(argv)
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    if unknown := phases - {"pipeline", "train"}:
        parser.error(f"unknown phases {sorted(unknown)}")
    import torch

    from ecg_r1.modeling.build import build_random_model, corpus_from_cases
    from ecg_r1.modeling.device import DEVICE_ENV
    from ecg_r1.modeling.profiles import load_profile, load_random_architecture
    from ecg_r1.tracking import runs as tracking
    from ecg_r1.training.data import load_cases

    if args.tiny:
        os.environ[DEVICE_ENV] = "cpu"
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or pass --tiny for the CPU check")
    home = args.home or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    os.environ["ECG_R1_HOME"] = str(home)
    tracking.configure(home)  # one process creates the store before Dagster's steps open it
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "sizes": "qwen2-vl-2b-standin" if args.tiny else "qwen2-vl-2b",
    }
    if "pipeline" in phases:
        report["pipeline_seconds"] = round(run_pipeline(args.tiny), 1)
    elif not (home / "data" / "images").is_dir():
        report["data_seconds"] = round(run_pipeline(args.tiny, DATA_ASSETS), 1)
    if "train" in phases:
        data = home / "data"
        paths = ["--cohort", data / "cohort", "--splits", data / "splits" / "splits.parquet"]
        paths += ["--images", data / "images"]
        cases = load_cases(paths[1], paths[3], paths[5], "train", labelled_only=False)
        profile = load_profile("qwen2-vl-2b")
        model = home / "random-2b"
        if not (model / "config.json").is_file():
            sizes = load_random_architecture(report["sizes"])
            build_random_model(profile, sizes, corpus_from_cases(cases.to_dicts()), model, source="random")
        common = [*map(str, paths), "--max-steps", str(args.steps), "--no-tracking", "--no-progress"]
        report["sft"] = train(
            "sft", [*common, "--profile", "qwen2-vl-2b", "--from", str(model), "--out", str(home / "sft")]
        )
        report["grpo"] = train(
            "grpo", [*common, "--profile", "qwen2-vl-2b", "--from", str(model), "--out", str(home / "grpo")]
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
