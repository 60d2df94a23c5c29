"""The reference rows of a comparison: the fitted baselines and the simulator's ceiling.

Takes: the labelled training cases with features (to fit the baselines, or a folder where they
were saved), the evaluation cases and, on the simulated cohort, ``truth.parquet``. Gives:
:class:`ReferenceBaselines` (majority class and feature baseline of
:mod:`ecg_r1.evaluation.baselines`, fitted, saved and loaded as data) and their
:class:`~ecg_r1.evaluation.evaluate.Predictions`; :func:`answer_references` is the step of
:func:`ecg_r1.evaluation.comparison.run_comparison` that adds them and writes their answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ecg_r1.constants import DEFAULT_SEED
from ecg_r1.data.split import TRAIN
from ecg_r1.evaluation.baselines import FeatureBaseline, MajorityBaseline, bayes_ceiling
from ecg_r1.evaluation.cases import EvaluationCases, add_features, evaluation_cases
from ecg_r1.evaluation.evaluate import Predictions
from ecg_r1.evaluation.outputs import predictions_key, write_predictions

MAJORITY_FILE = "majority.json"
FEATURE_FILE = "feature_baseline.parquet"  # training rows + parameters: data, never code


@dataclass
class ReferenceBaselines:
    """The fitted reference classifiers (trained on the training split)."""

    majority: MajorityBaseline
    feature: FeatureBaseline

    @classmethod
    def fit(cls, train: pl.DataFrame, seed: int = DEFAULT_SEED) -> ReferenceBaselines:
        """Fit both on the labelled training cases with their :func:`add_features` columns."""
        return cls(MajorityBaseline().fit(train), FeatureBaseline(seed=seed).fit(train))

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``majority.json`` and ``feature_baseline.parquet`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        majority = out / MAJORITY_FILE
        majority.write_text(
            json.dumps({"prevalence": self.majority.prevalence, "answer": self.majority.answer})
        )
        return {"majority": majority, "feature": self.feature.save(out / FEATURE_FILE)}

    @classmethod
    def load(cls, out_dir: str | Path) -> ReferenceBaselines:
        """Read what :meth:`save` wrote.

        Raises:
            FileNotFoundError: when the folder lacks either file (fit the baselines first).
        """
        out = Path(out_dir)
        for file in (MAJORITY_FILE, FEATURE_FILE):
            if not (out / file).is_file():
                raise FileNotFoundError(f"{out / file} not found: fit the reference baselines first")
        majority = MajorityBaseline()
        majority.prevalence = float(json.loads((out / MAJORITY_FILE).read_text())["prevalence"])
        return cls(majority, FeatureBaseline.load(out / FEATURE_FILE))


def reference_predictions(
    train: pl.DataFrame | None,
    cases: pl.DataFrame,
    truth: pl.DataFrame | None = None,
    baselines: ReferenceBaselines | None = None,
    seed: int = DEFAULT_SEED,
) -> list[Predictions]:
    """The measured reference rows on the evaluation cases.

    Args:
        train: training cases with feature columns (ignored when ``baselines`` is given).
        cases: evaluation cases with feature columns.
        truth: the simulator's ``truth.parquet``; adds the Bayes-optimal ceiling when given.
        baselines: already fitted baselines (e.g. the ``reference_baselines`` asset's).
        seed: the feature baseline's seed when it is fitted here.

    Returns:
        Feature baseline, majority class and (with truth) the Bayes ceiling, in that order. The
        cited clinicians' row is not a prediction: see :func:`ecg_r1.evaluation.baselines.clinicians_metrics`.
    """
    if baselines is None:
        if train is None:
            raise ValueError("pass the training cases or fitted baselines")
        baselines = ReferenceBaselines.fit(train, seed=seed)
    rows = [baselines.feature.predict(cases), baselines.majority.predict(cases)]
    if truth is not None:
        rows.append(bayes_ceiling(truth, cases))
    return rows


def answer_references(
    data: EvaluationCases,
    out_dir: str | Path,
    cohort_dir: str | Path,
    splits_path: str | Path,
    images_dir: str | Path,
    truth_path: str | Path | None = None,
    baselines_dir: str | Path | None = None,
    seed: int = DEFAULT_SEED,
) -> tuple[list[Predictions], dict[str, Path]]:
    """The reference rows' answers, written to ``predictions/<row>.parquet`` under ``out_dir``.

    The baselines answer every case, the simulator's Bayes ceiling (with ``truth_path``) only the
    simulated ones.

    Args:
        data: the evaluation cases (:func:`ecg_r1.evaluation.cases.gather_cases`).
        out_dir: the comparison's folder (its ``predictions/`` exists).
        cohort_dir, splits_path, images_dir: the cohort, to fit the baselines on its training split.
        truth_path: the simulator's ``truth.parquet``; None: no Bayes ceiling.
        baselines_dir: fitted baselines (:meth:`ReferenceBaselines.save`); None fits them here.
        seed: the feature baseline's seed when it is fitted here.

    Returns:
        ``(rows, files)``: feature baseline, majority class and (with truth) the Bayes ceiling,
        and :func:`ecg_r1.evaluation.outputs.predictions_key` -> written file.
    """
    truth = pl.read_parquet(truth_path) if truth_path is not None else None
    if baselines_dir is not None:
        baselines = ReferenceBaselines.load(baselines_dir)
    else:
        train = add_features(evaluation_cases(cohort_dir, splits_path, images_dir, TRAIN), cohort_dir)
        baselines = ReferenceBaselines.fit(train, seed=seed)
    references = reference_predictions(None, data.cases, baselines=baselines)
    if truth is not None:
        references.append(bayes_ceiling(truth, data.simulated))
    case_splits = data.cases.select("record_id", "split")
    files = {
        predictions_key(preds.name): write_predictions(
            out_dir,
            preds.name,
            preds.to_frame().join(case_splits, on="record_id", how="left", maintain_order="left"),
        )
        for preds in references
    }
    return references, files
