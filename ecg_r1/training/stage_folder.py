"""A training stage's folder: its layout, resume point and result.

``out_dir`` layout of a stage::

    out_dir/checkpoints/checkpoint-<step>/   trainer checkpoints (TRL / transformers format)
    out_dir/mlflow_run_id.txt                the run this training logs to
    out_dir/model/                           the final model folder
    out_dir/result.json                      written last: the stage finished

**Resume**: when ``out_dir`` holds checkpoints but no ``result.json`` (the process was killed),
the stage resumes from the last checkpoint at its step, with its optimizer, scheduler and RNG
state, and logs to the same MLflow run. When ``result.json`` exists, the previous run finished,
and a new call starts a new run from scratch.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MODEL = "model"
RESULT_FILE = "result.json"


@dataclass
class StageResult:
    """What a training stage produced.

    Attributes:
        stage: ``vision`` | ``warmup`` | ``sft`` | ``grpo``.
        model_dir: the saved model folder.
        run_id: the MLflow run (None when tracking was off).
        registered: ``"ecg-r1-sft/3"``-style name/version, or None.
        steps: the global step reached.
        resumed_from: the checkpoint step the run resumed from (0 for a fresh run).
        seconds: wall time of the training loop in this process.
        seconds_per_step: mean over the steps run in this process.
        samples_per_second: training samples (prompts) per second in this process.
        peak_rss_mb: the process's peak resident memory.
        metrics: the last logged value of every metric, plus summary figures.
        history: the trainer's log history (one dict per logging step).
    """

    stage: str
    model_dir: Path
    run_id: str | None
    registered: str | None
    steps: int
    resumed_from: int
    seconds: float
    seconds_per_step: float
    samples_per_second: float
    peak_rss_mb: float
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        data = asdict(self)
        data["model_dir"] = str(self.model_dir)
        return json.dumps(data, indent=2, default=str)

    @classmethod
    def from_json(cls, text: str) -> StageResult:
        data = json.loads(text)
        data["model_dir"] = Path(data["model_dir"])
        return cls(**data)


def read_result(out_dir: str | Path) -> StageResult | None:
    """The result of a finished stage in ``out_dir``; None when it has not finished."""
    path = Path(out_dir) / RESULT_FILE
    return StageResult.from_json(path.read_text()) if path.is_file() else None


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)


def write_result(out_dir: Path, result: StageResult) -> StageResult:
    """Write ``result`` as the stage's ``result.json``, the mark that it finished (every stage's
    one writer of it)."""
    (Path(out_dir) / RESULT_FILE).write_text(result.to_json())
    return result


def speed_summary(seconds: float, steps: int, batch: int) -> dict[str, float]:
    """A stage's speed and memory figures: ``steps`` optimiser steps of ``batch`` samples (prompts)
    in ``seconds`` in this process."""
    return {
        "train_seconds": seconds,
        "seconds_per_step": seconds / max(1, steps),
        "samples_per_second": steps * batch / seconds if seconds > 0 else 0.0,
        "peak_rss_mb": peak_rss_mb(),
    }


def last_checkpoint(checkpoints: str | Path) -> Path | None:
    """The newest *complete* checkpoint in a trainer's output folder, or None.

    The trainer writes ``trainer_state.json`` last, after the weights, optimizer, scheduler and
    RNG states; a process killed while saving leaves a folder without it. Such a folder is removed
    (resuming from it would fail, or silently start over), and the previous checkpoint is used.
    """
    folder = Path(checkpoints)
    if not folder.is_dir():
        return None
    found = []
    for path in folder.iterdir():
        name, _, number = path.name.rpartition("-")
        if path.is_dir() and name == "checkpoint" and number.isdigit():
            found.append((int(number), path))
    for _, path in sorted(found, reverse=True):
        if (path / "trainer_state.json").is_file():
            return path
        logger.warning("removing incomplete checkpoint %s (the run was killed while saving it)", path)
        shutil.rmtree(path)
    return None


def prepare_out_dir(out_dir: Path, resume: bool) -> str | None:
    """Make ``out_dir`` ready; return the checkpoint to resume from, if any."""
    from ecg_r1.tracking.runs import RUN_ID_FILE

    checkpoints = out_dir / CHECKPOINTS
    finished = (out_dir / RESULT_FILE).is_file()
    if finished or not resume:
        # A finished (or deliberately restarted) stage starts over: a new run, fresh checkpoints.
        for stale in (checkpoints, out_dir / MODEL):
            if stale.exists():
                shutil.rmtree(stale)
        for stale_file in (out_dir / RESULT_FILE, out_dir / RUN_ID_FILE):
            stale_file.unlink(missing_ok=True)
    checkpoints.mkdir(parents=True, exist_ok=True)
    last = last_checkpoint(checkpoints)
    if last is None and (out_dir / RUN_ID_FILE).is_file():
        # Killed before the first checkpoint: nothing to resume; the run id is kept so the
        # metrics of the restarted attempt land in the same MLflow run.
        logger.info("no checkpoint in %s: the stage starts from step 0", checkpoints)
    return str(last) if last is not None else None


def resume_point(out_dir: Path) -> str | None:
    """The checkpoint a non-main process resumes from, once the main one prepared ``out_dir``."""
    last = last_checkpoint(out_dir / CHECKPOINTS)
    return str(last) if last is not None else None
