"""A comparison's figures: metrics per row and split, per hospital, the paired comparisons.

Takes: every row's :class:`~ecg_r1.evaluation.evaluate.Predictions` and the evaluation cases by
split. Gives: the metrics of each row on each split it answered and per hospital
(:func:`evaluate_rows`), the paired comparisons of rows on the same cases (:func:`pair_rows`),
:class:`Comparison` (what :func:`ecg_r1.evaluation.comparison.run_comparison` returns) and the
``metrics.json`` document of it (:func:`metrics_document`). The statistics themselves are
:mod:`ecg_r1.evaluation.evaluate`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from ecg_r1.data.labels import ISCHEMIC
from ecg_r1.data.split import SPLITS
from ecg_r1.evaluation.baselines import CLINICIANS_SOURCE, clinicians_metrics
from ecg_r1.evaluation.evaluate import (
    BinaryMetrics,
    Predictions,
    align,
    evaluate_predictions,
    evaluate_predictions_by_group,
)
from ecg_r1.evaluation.note_shift import NoteShift
from ecg_r1.evaluation.outputs import slug
from ecg_r1.evaluation.paired import PairedComparison, compare_paired
from ecg_r1.evaluation.predictions import ABLATIONS
from ecg_r1.modeling.profiles import Profile


@dataclass(frozen=True)
class SplitCounts:
    """One split of the split manifest: cases, ischemic cases and hospitals."""

    n: int
    n_ischemic: int
    hospitals: tuple[str, ...]


def split_counts(splits_path: str | Path) -> dict[str, SplitCounts]:
    """Each split of a split manifest (``splits.parquet``), counted, in the manifest's split order."""
    manifest = pl.read_parquet(splits_path, columns=["split", "hospital", "label"])
    return {
        split: SplitCounts(
            part.height, int((part["label"] == ISCHEMIC).sum()), tuple(sorted(part["hospital"].unique()))
        )
        for split in SPLITS
        if not (part := manifest.filter(pl.col("split") == split)).is_empty()
    }


@dataclass(frozen=True)
class PairedRecord:
    """One paired comparison of two rows on one split."""

    a: str
    b: str
    split: str
    result: PairedComparison

    def as_dict(self) -> dict[str, Any]:
        d = self.result.as_dict()
        diff = d.pop("difference")
        return {"a": self.a, "b": self.b, "split": self.split, **d} | {
            "difference": diff["value"],
            "difference_low": diff["low"],
            "difference_high": diff["high"],
        }


@dataclass
class Comparison:
    """What :func:`ecg_r1.evaluation.comparison.run_comparison` produced.

    Attributes:
        out_dir: where everything was written.
        table: the markdown of ``comparison.md``.
        models: row name -> model folder, for the models (not the reference rows).
        stages: row name -> training stage folder (None for a bare model folder).
        results: row name -> split -> metrics (measured and reference rows).
        kinds: row name -> :data:`ecg_r1.evaluation.report.MEASURED` / ``REFERENCE``.
        per_hospital: row name -> hospital -> metrics, over both test splits.
        paired: the paired comparisons.
        predictions: row name -> predictions on both test splits (and the real records).
        files: name -> path of every written file (table, metrics, cases, predictions, plots).
        real_records: None without real records; else their folder, inputs and the record ids
            left out because they are in the main cohort.
        note_shift: split -> how many of its notes' words no training note holds.
        cases: the evaluated cases (``record_id``, ``split``, ``hospital``, ``label``): each split
            is one MLflow evaluation dataset (:func:`ecg_r1.evaluation.registry.log_comparison`).
        ablated: ablation row -> (model row, ablation key of
            :data:`ecg_r1.evaluation.predictions.ABLATIONS`).
        data_splits: split -> its counts in the split manifest (training data of the model card).
        profile: the compared models' profile.
        simulated: whether the cases are the simulator's (its truth gave the Bayes ceiling).
    """

    out_dir: Path
    table: str
    models: dict[str, Path]
    stages: dict[str, Path | None]
    results: dict[str, dict[str, BinaryMetrics]]
    kinds: dict[str, str]
    per_hospital: dict[str, dict[str, BinaryMetrics]]
    paired: list[PairedRecord]
    predictions: dict[str, Predictions]
    files: dict[str, Path] = field(default_factory=dict)
    real_records: dict[str, Any] | None = None
    note_shift: dict[str, NoteShift] = field(default_factory=dict)
    cases: pl.DataFrame = field(default_factory=pl.DataFrame)
    ablated: dict[str, tuple[str, str]] = field(default_factory=dict)
    data_splits: dict[str, SplitCounts] = field(default_factory=dict)
    profile: Profile | None = None
    simulated: bool = False

    @property
    def plots(self) -> dict[str, Path]:
        """The PNG files, by name."""
        return {k: v for k, v in self.files.items() if v.suffix == ".png"}

    def model_metrics(self, name: str) -> dict[str, dict[str, float]]:
        """What is logged on a model's MLflow LoggedModel, by the split (evaluation dataset) it was
        measured on: ``<split>/<metric>`` with ``_low``/``_high`` and ``n``; per hospital,
        ``hospital/<h>/<metric>`` under the split holding that hospital's cases; and each of its
        ablation rows, ``<ablation>/<split>/<metric>`` (e.g. ``no_ecg/test_external/accuracy``)."""
        out: dict[str, dict[str, float]] = {}
        for split, metrics in self.results[name].items():
            out.setdefault(split, {}).update(metrics.flat(prefix=f"{split}/"))
        for hospital, metrics in self.per_hospital.get(name, {}).items():
            splits = self.cases.filter(pl.col("hospital") == hospital)["split"].unique().to_list()
            # One split per hospital by construction (internal or held out); a hospital in several
            # has no single evaluation dataset, so its figures stay in the comparison only.
            if len(splits) == 1:
                out.setdefault(splits[0], {}).update(metrics.flat(prefix=f"hospital/{slug(hospital)}/"))
        for row, (model, ablation) in self.ablated.items():
            if model != name:
                continue
            for split, metrics in self.results[row].items():
                key = f"{slug(ABLATIONS[ablation])}/{split}/"
                out.setdefault(split, {}).update(metrics.flat(prefix=key))
        return out

    def figures(self) -> dict[str, float]:
        """Headline figures of every row, flat: ``<row>/<split>/<metric>`` for accuracy, AUROC,
        valid rate and n, and ``paired/<a>_vs_<b>/<split>/...`` for each paired comparison."""
        out: dict[str, float] = {}
        for name, by_split in self.results.items():
            for split, m in by_split.items():
                key = f"{slug(name)}/{split}"
                out |= {
                    f"{key}/accuracy": m.accuracy.value,
                    f"{key}/accuracy_low": m.accuracy.low,
                    f"{key}/accuracy_high": m.accuracy.high,
                    f"{key}/auroc": m.auroc.value,
                    f"{key}/valid_rate": m.valid_rate.value,
                    f"{key}/n": float(m.n),
                }
        for record in self.paired:
            key = f"paired/{slug(record.a)}_vs_{slug(record.b)}/{record.split}"
            r = record.result
            out |= {
                f"{key}/difference": r.difference.value,
                f"{key}/difference_low": r.difference.low,
                f"{key}/difference_high": r.difference.high,
                f"{key}/mcnemar_p_mid": r.p_mid,
            }
        return out


def evaluate_rows(
    predictions: Mapping[str, Predictions],
    by_split: Mapping[str, pl.DataFrame],
    simulated: pl.DataFrame,
    n_boot: int,
    seed: int,
) -> tuple[dict[str, dict[str, BinaryMetrics]], dict[str, dict[str, BinaryMetrics]]]:
    """Each row's metrics on the splits it answered, and per hospital over the simulated cases it
    answered.

    Returns:
        ``(results, per_hospital)``: row -> split -> metrics, and row -> hospital -> metrics.
    """
    answered = {name: set(preds.record_id) for name, preds in predictions.items()}
    results = {
        name: {
            split: evaluate_predictions(preds, part, n_boot=n_boot, seed=seed)
            for split, part in by_split.items()
            if answered[name].issuperset(part["record_id"].to_list())
        }
        for name, preds in predictions.items()
    }
    per_hospital = {
        name: evaluate_predictions_by_group(
            preds,
            simulated.filter(pl.col("record_id").is_in(list(answered[name]))),
            "hospital",
            n_boot=n_boot,
            seed=seed,
        )
        for name, preds in predictions.items()
    }
    return results, per_hospital


def pair_rows(
    pairs: Sequence[tuple[str, str]],
    predictions: Mapping[str, Predictions],
    results: Mapping[str, Mapping[str, BinaryMetrics]],
    by_split: Mapping[str, pl.DataFrame],
    n_boot: int,
    seed: int,
) -> list[PairedRecord]:
    """The paired comparison of each ``(a, b)`` on every split both rows answered.

    Raises:
        ValueError: when a pair names a row that is not in ``predictions``.
    """
    paired = []
    for a, b in pairs:
        unknown = [n for n in (a, b) if n not in predictions]
        if unknown:
            raise ValueError(f"paired comparison names {unknown} are not rows (rows: {list(predictions)})")
        for split, part in by_split.items():
            if split not in results[a] or split not in results[b]:
                continue  # a row that did not answer this split (the Bayes ceiling on real records)
            y, pa, _ = align(predictions[a], part)
            _, pb, _ = align(predictions[b], part)
            paired.append(PairedRecord(a, b, split, compare_paired(y, pa, pb, n_boot=n_boot, seed=seed)))
    return paired


def metrics_document(comparison: Comparison, by_split: Mapping[str, pl.DataFrame]) -> dict[str, Any]:
    """What ``metrics.json`` holds: the splits, every row x split, per hospital, paired, files."""
    return {
        "splits": {
            split: {
                "n": part.height,
                "n_positive": int((part["label"] == ISCHEMIC).sum()),
                "hospitals": sorted(part["hospital"].unique().to_list()),
                **(
                    {"notes": comparison.note_shift[split].as_dict()}
                    if split in comparison.note_shift
                    else {}
                ),
            }
            for split, part in by_split.items()
        },
        "rows": [
            {
                "name": name,
                "kind": comparison.kinds[name],
                "split": split,
                **m.flat(),
                "confusion": m.confusion,
            }
            for name, by in comparison.results.items()
            for split, m in by.items()
        ],
        "clinicians": {"ppv": clinicians_metrics().ppv.value, "source": CLINICIANS_SOURCE, "measured": False},
        "per_hospital": {
            name: {h: m.flat() for h, m in groups.items()} for name, groups in comparison.per_hospital.items()
        },
        "paired": [p.as_dict() for p in comparison.paired],
        "models": {name: str(path) for name, path in comparison.models.items()},
        "stages": {name: None if s is None else str(s) for name, s in comparison.stages.items()},
        "files": {k: str(v) for k, v in comparison.files.items()},
        "real_records": comparison.real_records,
    }
