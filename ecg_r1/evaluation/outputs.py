"""The comparison's output folder: its file names and the formats of the files others read back.

Takes: the evaluated cases, a row's answers, the metrics document. Gives: the files under the
folder :func:`ecg_r1.evaluation.comparison.run_comparison` writes (``cases.parquet``,
``predictions/<row>.parquet``, ``metrics.json``) and the readers of them
(:func:`read_predictions`, :func:`read_metrics`) that the promotion, the Dagster assets and the
command line use. :func:`slug` is the one rule that turns a row name into a file or metric name.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import polars as pl

from ecg_r1.evaluation.evaluate import Predictions

TABLE_FILE = "comparison.md"
METRICS_FILE = "metrics.json"
CASES_FILE = "cases.parquet"
PREDICTIONS_DIR = "predictions"
PLOTS_DIR = "plots"


def slug(name: str) -> str:
    """A file- and metric-safe name: ``"GRPO from SFT"`` -> ``"grpo_from_sft"``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "model"


def predictions_key(name: str) -> str:
    """The key of a row's predictions file in :attr:`ecg_r1.evaluation.results.Comparison.files`."""
    return f"predictions_{slug(name)}"


def predictions_file(out_dir: str | Path, name: str) -> Path:
    """Where a row's predictions are: ``<out_dir>/predictions/<slug>.parquet``."""
    return Path(out_dir) / PREDICTIONS_DIR / f"{slug(name)}.parquet"


def write_cases(out_dir: str | Path, cases: pl.DataFrame) -> Path:
    """Write ``cases.parquet``: ``record_id``, ``split``, ``hospital``, ``label`` of every evaluated case."""
    path = Path(out_dir) / CASES_FILE
    cases.select("record_id", "split", "hospital", "label").write_parquet(path)
    return path


def write_predictions(out_dir: str | Path, name: str, frame: pl.DataFrame) -> Path:
    """Write a row's answers (:meth:`Predictions.to_frame` plus ``split``, for models also
    ``completion``) to :func:`predictions_file`."""
    path = predictions_file(out_dir, name)
    frame.write_parquet(path)
    return path


def read_predictions(out_dir: str | Path, name: str) -> Predictions:
    """A row's predictions as :func:`ecg_r1.evaluation.comparison.run_comparison` saved them (both
    test splits, and the real records when there were)."""
    path = predictions_file(out_dir, name)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {name!r} was not in the comparison at {out_dir}")
    return Predictions.from_frame(name, pl.read_parquet(path))


def write_metrics(path: str | Path, document: dict[str, Any]) -> Path:
    """Write ``metrics.json``: the document with every NaN or infinite number as null."""
    path = Path(path)
    path.write_text(json.dumps(_nan_to_none(document), indent=2))
    return path


def read_metrics(out_dir: str | Path) -> dict[str, Any]:
    """The ``metrics.json`` a comparison wrote (null stands for an undefined metric)."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the comparison first (ecg-r1 evaluate or make run)")
    return json.loads(path.read_text())


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value
