"""The training side of Dagster Pipes: one process of a ``torchrun`` launch of ``ecg-r1 train``.

The asset (:mod:`dagster_project.defs.launching`) starts::

    torchrun --nproc_per_node N -m dagster_project.pipes_train train sft --profile ... --out DIR

Every process runs the same ``ecg-r1 train`` arguments; the main one (rank 0) also opens the
Pipes session: the stage's log lines go to the Dagster run's log as they happen, and the finished
stage's result (steps, timings, final metrics, MLflow run, registered version) comes back as the
asset's materialization metadata. The other processes never touch Pipes (one writer per session).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from ecg_r1.training.stage_folder import StageResult

# Final metrics shown on the asset (the rest stay in the MLflow run).
# frac_reward_zero_std: the share of GRPO groups whose completions all scored the same, which
# therefore teach nothing (the symptom of GRPO stalling).
FINAL_METRIC_PREFIXES = (
    "rewards/",
    "reward",
    "loss",
    "kl",
    "completions/mean_length",
    "format_valid",
    # the share of GRPO groups whose completions all scored the same, which therefore teach
    # nothing (the symptom of GRPO stalling)
    "frac_reward_zero_std",
)


def result_metadata(result: StageResult) -> dict[str, str | int | float]:
    """A stage's result as flat asset metadata (plain values: Pipes sends them as JSON)."""
    finals = {
        f"final_{key.replace('/', '_')}": round(float(value), 4)
        for key, value in result.metrics.items()
        if key.startswith(FINAL_METRIC_PREFIXES) or key.endswith("accuracy")
    }
    return {
        "model_dir": str(result.model_dir),
        "mlflow_run_id": result.run_id or "none",
        "registered_version": result.registered or "not registered",
        "steps": result.steps,
        "resumed_from_step": result.resumed_from,
        "training_seconds": round(result.seconds, 1),
        "seconds_per_step": round(result.seconds_per_step, 3),
        "samples_per_s": round(result.samples_per_second, 2),
        "peak_rss_mb": round(result.peak_rss_mb, 1),
        **finals,
    }


class _PipesLogHandler(logging.Handler):
    """Forwards ``ecg_r1`` log records (one line a logging step) to the Dagster run's log."""

    def __init__(self, log: Any) -> None:
        super().__init__(level=logging.INFO)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        level = "warning" if record.levelno >= logging.WARNING else "info"
        getattr(self.log, level)(self.format(record))


def main(argv: list[str]) -> int:
    """Run ``ecg-r1 train`` with ``argv``; on the main process, inside a Pipes session."""
    from ecg_r1.cli import main as cli_main
    from ecg_r1.training.processes import world_rank
    from ecg_r1.training.stage_folder import read_result

    if world_rank() != 0:
        return cli_main(argv)
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        handler = _PipesLogHandler(pipes.log)
        logging.getLogger("ecg_r1").addHandler(handler)
        try:
            code = cli_main(argv)
        finally:
            logging.getLogger("ecg_r1").removeHandler(handler)
        if code != 0:
            raise SystemExit(code)
        out_dir = Path(pipes.get_extra("out_dir"))
        result = read_result(out_dir)
        if result is None:
            raise RuntimeError(f"ecg-r1 train wrote no result in {out_dir}")
        pipes.report_asset_materialization(metadata=result_metadata(result))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
