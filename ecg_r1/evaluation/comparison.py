"""The model comparison: every model and reference row on the internal and cross-hospital test splits.

:func:`run_comparison` is the whole evaluation behind ``ecg-r1 evaluate`` and the Dagster
``model_comparison`` asset. It reads the labelled TWI cases of ``test_internal`` and
``test_external`` (the held-out hospitals), lets each model answer them (:func:`predict_cases`:
greedy generation, the strict parser, P(Yes) at the answer position), adds the reference rows
(:func:`reference_predictions`: majority class, the feature baseline, the cited clinicians and, on
the simulated cohort, the Bayes ceiling), and evaluates every row with :mod:`ecg_r1.evaluation.evaluate`
(n, 95 % bootstrap intervals, per hospital, paired comparisons). Given a real-record folder
(:mod:`ecg_r1.evaluation.real_records`) it adds a third section, "real records (sim-to-real)": the same models
and the baselines that apply to real data on labelled TWI records no model was trained on. It
writes under ``out_dir``::

    comparison.md                 the table (internal and cross-hospital) and the paired comparisons
    metrics.json                  every figure: rows x splits, per hospital, paired, files
    cases.parquet                 the evaluated cases (record_id, split, hospital, label)
    predictions/<row>.parquet     each row's answers (models: also reasoning and raw completion)
    plots/*.png                   confusion matrices, ROC per split, accuracy per hospital,
                                  reward curves per trained stage, cases with the model's reasoning

The statistics live in :mod:`ecg_r1.evaluation.evaluate`, the drawings in :mod:`ecg_r1.evaluation.report`, the
baselines in :mod:`ecg_r1.evaluation.baselines`: this module only wires them together.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ecg_r1.data.features import with_features
from ecg_r1.data.split import TEST_EXTERNAL, TEST_INTERNAL, TRAIN
from ecg_r1.evaluation import report
from ecg_r1.evaluation.baselines import (
    CLINICIANS_ACCURACY,
    CLINICIANS_NAME,
    CLINICIANS_SOURCE,
    FeatureBaseline,
    MajorityBaseline,
    bayes_ceiling,
    clinicians_metrics,
)
from ecg_r1.evaluation.evaluate import (
    DEFAULT_BOOTSTRAP,
    BinaryMetrics,
    PairedComparison,
    Predictions,
    align,
    compare_paired,
    evaluate_predictions,
    evaluate_predictions_by_group,
)
from ecg_r1.evaluation.real_records import REAL_SPLIT, REAL_TITLE, read_real_records

logger = logging.getLogger(__name__)

EVAL_SPLITS: tuple[str, ...] = (TEST_INTERNAL, TEST_EXTERNAL)
# Input ablations: what the model is shown instead -> the row-name suffix. "image": the ECG page
# with flat traces (grid, labels and calibration pulse kept, no ECG); "note": no clinical note
# ("none given"). A model whose accuracy does not drop without the ECG is reading the note only.
ABLATIONS: dict[str, str] = {"image": "no ECG", "note": "no note"}
SPLIT_TITLES = {TEST_INTERNAL: report.INTERNAL, TEST_EXTERNAL: report.CROSS_HOSPITAL, REAL_SPLIT: REAL_TITLE}
TABLE_FILE = "comparison.md"
METRICS_FILE = "metrics.json"
CASES_FILE = "cases.parquet"
PREDICTIONS_DIR = "predictions"
PLOTS_DIR = "plots"
MAJORITY_FILE = "majority.json"
FEATURE_FILE = "feature_baseline.parquet"  # training rows + parameters: data, never code
RESULT_FILE = "result.json"  # a training stage's StageResult (ecg_r1.training.stages)


def slug(name: str) -> str:
    """A file- and metric-safe name: ``"GRPO from SFT"`` -> ``"grpo_from_sft"``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "model"


# ------------------------------------------------------------------------------------------------
# Cases


def evaluation_cases(
    cohort_dir: str | Path, splits_path: str | Path, images_dir: str | Path, splits: str | Sequence[str]
) -> pl.DataFrame:
    """The labelled TWI cases of some splits, labels as the cohort writes them.

    :func:`ecg_r1.training.data.load_cases` selects the cases (the one place the selection rules
    live, so training and evaluation see the same kind of case); its boolean label is mapped back
    to ``"ischemic"`` / ``"non-ischemic"``, the labels :mod:`ecg_r1.evaluation.evaluate` and the baselines read.

    Returns:
        The cases table of ``load_cases`` with a string ``label``.

    Raises:
        ecg_r1.training.data.TrainingDataError: when files are missing or no case is left.
    """
    from ecg_r1.training.data import load_cases

    cases = load_cases(cohort_dir, splits_path, images_dir, splits, labelled_only=True)
    return cases.with_columns(
        pl.when(pl.col("label")).then(pl.lit("ischemic")).otherwise(pl.lit("non-ischemic")).alias("label")
    )


def sample_per_split(cases: pl.DataFrame, max_cases: int, seed: int) -> pl.DataFrame:
    """At most ``max_cases`` cases of each split, a seeded random sample in the original order.

    Raises:
        ValueError: when ``max_cases`` is below 1.
    """
    if max_cases < 1:
        raise ValueError(f"max_cases_per_split={max_cases} must be at least 1 (or None for every case)")
    rng = np.random.default_rng(seed)
    keep = np.zeros(cases.height, dtype=bool)
    splits = cases["split"].to_numpy()
    for split in np.unique(splits):
        where = np.flatnonzero(splits == split)
        if len(where) > max_cases:
            logger.info("evaluating %d of %d %s cases (max_cases_per_split)", max_cases, len(where), split)
            where = rng.choice(where, size=max_cases, replace=False)
        keep[where] = True
    return cases.filter(pl.Series(keep))


def add_features(cases: pl.DataFrame, cohort_dir: str | Path) -> pl.DataFrame:
    """The cases with their measured ECG features (what the feature baseline reads)."""
    from ecg_r1.data.store import open_signals

    return with_features(cases, open_signals(cohort_dir))


def real_record_cases(
    real_dir: str | Path, cohort_dir: str | Path, splits_path: str | Path
) -> tuple[pl.DataFrame, list[str]]:
    """The labelled TWI cases of a real-record folder, none of them in the main cohort.

    A real record that is also in the main cohort's split manifest (the same record id, or the same
    signal file checksum under another id) may have been trained on, or is already a test case:
    it is left out, so the real-record section only holds records no model has seen.

    Args:
        real_dir: a folder :func:`ecg_r1.evaluation.real_records.prepare_real_records` wrote.
        cohort_dir, splits_path: the main (training) cohort and its split manifest.

    Returns:
        ``(cases, excluded)``: the cases in split :data:`~ecg_r1.evaluation.real_records.REAL_SPLIT` with
        their features measured on the real cohort's signals, and the record ids left out.

    Raises:
        FileNotFoundError: when ``real_dir`` is not a prepared folder.
        ecg_r1.training.data.TrainingDataError: when no case is in the folder.
    """
    from ecg_r1.data.store import read_cohort

    real = read_real_records(real_dir)
    cases = evaluation_cases(real.cohort, real.splits, real.images, REAL_SPLIT)
    manifest = pl.read_parquet(splits_path, columns=["record_id"])
    main = read_cohort(cohort_dir).join(manifest, on="record_id", how="semi")
    known_sums = main["checksum"].drop_nulls()
    real_sums = read_cohort(real.cohort).select("record_id", "checksum")
    seen_ids = real_sums.filter(
        pl.col("record_id").is_in(manifest["record_id"].implode())
        | pl.col("checksum").is_in(known_sums.implode())
    )["record_id"]
    seen = pl.col("record_id").is_in(seen_ids.implode())
    excluded = cases.filter(seen)["record_id"].to_list()
    if excluded:
        logger.warning(
            "%d real records are also in the main cohort and are left out of the real-record section: %s",
            len(excluded),
            excluded[:5],
        )
    cases = cases.filter(~seen)
    # Features from the real cohort's own signals: its row indexes point into its signal file only.
    return add_features(cases, real.cohort), excluded


# ------------------------------------------------------------------------------------------------
# Models


def predict_cases(
    model_dir: str | Path,
    profile: Any,
    cases: pl.DataFrame,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    name: str | None = None,
    progress: bool = False,
    ablation: str | None = None,
) -> tuple[Predictions, list[str]]:
    """A model's answers on the cases: greedy completion, strict parse, P(Yes) at the answer.

    Images are opened a batch at a time, so a split of any size never sits in memory.

    Args:
        model_dir: a model folder (:func:`ecg_r1.modeling.models.load_model_and_processor`).
        profile: the model's profile (a :class:`ecg_r1.modeling.profiles.Profile` or its name / path).
        cases: ``record_id``, ``image_path``, ``age``, ``sex``, ``note`` per case.
        batch_size: examples per forward pass.
        max_new_tokens: completion cap; None: the profile's GRPO ``max_completion_length``.
        name: the row name (default: the folder name).
        progress: show a tqdm progress bar.
        ablation: None, or a key of :data:`ABLATIONS`: ``"image"`` shows every case the same page
            with flat traces instead of its ECG, ``"note"`` shows no clinical note.

    Returns:
        ``(predictions, completions)``: answers (None where the completion broke the output
        contract, which the evaluation counts as wrong), P(Yes) for every case, and as reasoning
        the think block of a valid completion or the raw text of an invalid one; and the raw
        completions in case order.
    """
    from PIL import Image

    from ecg_r1.modeling.inference import answer_probability, generate
    from ecg_r1.modeling.models import load_model_and_processor
    from ecg_r1.modeling.profiles import Profile, load_profile
    from ecg_r1.modeling.prompts import parse_completion

    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    if ablation is not None and ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; choose one of {sorted(ABLATIONS)}")
    if max_new_tokens is None:
        max_new_tokens = profile.max_completion_length
    model, processor = load_model_and_processor(model_dir, profile)
    completions: list[str] = []
    p_yes = np.empty(cases.height, dtype=np.float64)
    rows = cases.select("image_path", "age", "sex", "note").to_dicts()
    blank_page = None
    if ablation == "image":
        from ecg_r1.data.canonical import LEADS, N_SAMPLES
        from ecg_r1.imaging.render import render_page

        blank_page = render_page(np.zeros((len(LEADS), N_SAMPLES), np.float32), profile.render_config())
        blank_page = blank_page.convert("RGB")
    if ablation == "note":
        rows = [{**row, "note": None} for row in rows]
    starts = range(0, len(rows), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"predict {name or Path(model_dir).name}", unit="batch")
    for start in starts:
        batch = rows[start : start + batch_size]
        examples = []
        for row in batch:
            if blank_page is not None:
                examples.append({**row, "image": blank_page})
                continue
            with Image.open(row["image_path"]) as image:
                examples.append({**row, "image": image.convert("RGB")})
        texts = generate(model, processor, examples, max_new_tokens=max_new_tokens, batch_size=batch_size)
        p_yes[start : start + len(batch)] = answer_probability(
            model, processor, examples, completions=texts, batch_size=batch_size
        )
        completions.extend(texts)
    parsed = [parse_completion(text) for text in completions]
    invalid = sum(not p.valid for p in parsed)
    logger.info("%s: %d of %d completions invalid", name or model_dir, invalid, len(parsed))
    predictions = Predictions(
        name=name or Path(model_dir).name,
        record_id=cases["record_id"].to_list(),
        y_pred=[p.answer for p in parsed],
        p_yes=p_yes,
        reasoning=[p.think if p.valid else text for p, text in zip(parsed, completions, strict=True)],
    )
    return predictions, completions


def stage_folder(path: str | Path) -> tuple[Path, Path | None]:
    """The model folder and the training stage folder (holding ``result.json``) of a path.

    Accepts a stage folder (``result.json`` + ``model/``), a model folder inside one, or a bare
    model folder (no stage: no reward curves, no registered version).

    Raises:
        ValueError: when the path holds no model.
    """
    path = Path(path)
    if (path / RESULT_FILE).is_file():
        from ecg_r1.training.runner import read_result

        result = read_result(path)
        model_dir = Path(result.model_dir) if result and Path(result.model_dir).is_dir() else path / "model"
        return model_dir, path
    if (path / "config.json").is_file():
        return path, path.parent if (path.parent / RESULT_FILE).is_file() else None
    raise ValueError(
        f"{path} is neither a model folder (config.json) nor a training stage folder (result.json + model/); "
        "train the model first or pass the folder a stage wrote"
    )


# ------------------------------------------------------------------------------------------------
# Reference rows


@dataclass
class ReferenceBaselines:
    """The fitted reference classifiers (trained on the training split)."""

    majority: MajorityBaseline
    feature: FeatureBaseline

    @classmethod
    def fit(cls, train: pl.DataFrame, seed: int = 0) -> ReferenceBaselines:
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
    seed: int = 0,
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


# ------------------------------------------------------------------------------------------------
# The comparison


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
    """What :func:`run_comparison` produced.

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

    @property
    def plots(self) -> dict[str, Path]:
        """The PNG files, by name."""
        return {k: v for k, v in self.files.items() if v.suffix == ".png"}

    def model_metrics(self, name: str) -> dict[str, float]:
        """Flat metrics of one row, ``<split>/<metric>`` (with ``_low``/``_high``), plus
        ``hospital/<h>/accuracy``: what is logged on a model version's MLflow run."""
        out: dict[str, float] = {}
        for split, metrics in self.results[name].items():
            out |= metrics.flat(prefix=f"{split}/")
        for hospital, metrics in self.per_hospital.get(name, {}).items():
            out[f"hospital/{slug(hospital)}/accuracy"] = metrics.accuracy.value
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


def _paired_markdown(paired: Sequence[PairedRecord]) -> str:
    if not paired:
        return ""
    lines = [
        "\n## Paired comparisons (same cases)\n",
        "| A | B | Split | n | Accuracy A | Accuracy B | A - B [95% CI] | only A right | only B right "
        "| McNemar mid-p |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for rec in paired:
        r = rec.result
        lines.append(
            f"| {rec.a} | {rec.b} | {SPLIT_TITLES.get(rec.split, rec.split)} | {r.n} | {r.accuracy_a:.3f} "
            f"| {r.accuracy_b:.3f} | {r.difference} | {r.only_a_correct} | {r.only_b_correct} | {r.p_mid:.3g} |"
        )
    lines.append(
        "\nDifference: paired bootstrap over cases (the same resampled cases for both rows); "
        "McNemar's mid-p on the discordant cases. Invalid outputs count as wrong for both."
    )
    return "\n".join(lines) + "\n"


def _real_records_markdown(info: Mapping[str, Any], cases: pl.DataFrame) -> str:
    """What the real-record section is: a sim-to-real check, its n, sources and exclusions."""
    sources = ", ".join(f"{k} {v}" for k, v in cases["hospital"].value_counts(sort=True).iter_rows())
    positive = int((cases["label"] == "ischemic").sum())
    text = (
        f"\n**{REAL_TITLE}**: {cases.height} labelled TWI records ({positive} ischemic) read from "
        f"{', '.join(info['inputs'])} (by hospital: {sources}). The models were trained on simulated ECGs "
        "only and none of these records was trained on; the majority class and the feature baseline "
        "are fitted on the simulated training split. At this n the intervals are wide: read the "
        "section as a sim-to-real check, not as a benchmark."
    )
    if info["excluded_in_main_cohort"]:
        text += f" Left out: {len(info['excluded_in_main_cohort'])} records also in the main cohort."
    return text + "\n"


def _reward_log(stage_dir: Path | None) -> pl.DataFrame | None:
    """The reward columns of a stage's training history, or None when it logged no rewards."""
    if stage_dir is None:
        return None
    from ecg_r1.training.runner import read_result

    result = read_result(stage_dir)
    history = [h for h in (result.history if result else []) if "step" in h]
    if not history:
        return None
    # Keys differ between log entries (the final summary has no rewards): read them all.
    log = pl.from_dicts(history, infer_schema_length=None)
    rewards = [c for c in log.columns if c == "reward" or (c.startswith("rewards/") and c.endswith("/mean"))]
    if not rewards:
        return None
    # The share of groups whose completions all scored alike: no advantage, nothing learned.
    rewards += [c for c in log.columns if c == "frac_reward_zero_std"]
    log = log.select("step", *rewards).filter(pl.any_horizontal(pl.col(rewards).is_not_null()))
    return log if log.height else None


def _pick_cases(predictions: Predictions, cases: pl.DataFrame, k: int, seed: int) -> list[int]:
    """Up to ``k`` row positions of ``cases``: right and wrong answers alike, seeded."""
    y, pred, _ = align(predictions, cases)
    right = [i for i in range(len(y)) if pred[i] is not None and pred[i] == y[i]]
    wrong = [i for i in range(len(y)) if i not in set(right)]
    rng = np.random.default_rng(seed)
    rng.shuffle(right)
    rng.shuffle(wrong)
    chosen: list[int] = []
    while len(chosen) < k and (right or wrong):
        for pool in (wrong, right):
            if pool and len(chosen) < k:
                chosen.append(pool.pop())
    return sorted(chosen)


def _printable(text: str | None) -> str | None:
    # An untrained model writes control characters that no font can draw.
    if text is None:
        return None
    return "".join(ch if ch.isprintable() or ch == "\n" else "\ufffd" for ch in text)


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def run_comparison(
    models: Mapping[str, str | Path],
    profile: Any,
    cohort_dir: str | Path,
    splits_path: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    truth_path: str | Path | None = None,
    seed: int = 0,
    *,
    baselines_dir: str | Path | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
    n_boot: int = DEFAULT_BOOTSTRAP,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    n_case_figures: int = 4,
    max_cases_per_split: int | None = None,
    progress: bool = False,
    ablations: Sequence[str] = (),
    real_records: str | Path | None = None,
) -> Comparison:
    """Evaluate models and reference rows on the internal and cross-hospital test splits, and
    optionally on real records (a sim-to-real check).

    Args:
        models: row name -> model folder or training stage folder (``result.json`` + ``model/``),
            in table order (e.g. ``{"GRPO": ..., "GRPO from SFT": ..., "SFT": ...}``).
        profile: the models' profile (name, path or :class:`ecg_r1.modeling.profiles.Profile`).
        cohort_dir, splits_path, images_dir: the cohort, split manifest and rendered images.
        out_dir: where the table, metrics, predictions and plots go (created).
        truth_path: the simulator's ``truth.parquet`` for the Bayes ceiling; None on real data.
        seed: seeds the bootstrap, the feature baseline and the cases shown.
        baselines_dir: fitted reference baselines (:meth:`ReferenceBaselines.save`); None fits
            them here on the training split.
        pairs: ``(a, b)`` row names to compare on the same cases; None: every pair of models.
        n_boot: bootstrap resamples per interval.
        batch_size: examples per forward pass.
        max_new_tokens: completion cap; None: the profile's.
        n_case_figures: cases shown beside the first model's reasoning (0: no cases figure).
        max_cases_per_split: evaluate a seeded random sample of at most this many cases per split
            (None: all). For time-boxed runs on a CPU; the table's n says how many were used.
        progress: tqdm progress bars while the models answer.
        ablations: keys of :data:`ABLATIONS`; each model is also evaluated with that input taken
            away (row ``"<name> (no ECG)"`` / ``"<name> (no note)"``) and paired with itself.
        real_records: a folder :func:`ecg_r1.evaluation.real_records.prepare_real_records` wrote; its cases
            (less any also in the main cohort, see :func:`real_record_cases`) become a third split,
            :data:`~ecg_r1.evaluation.real_records.REAL_SPLIT`, titled "real records (sim-to-real)", with the
            models, their ablations, majority class and feature baseline (fitted on the training
            split) and the paired comparisons. None: no such section.

    Returns:
        A :class:`Comparison` with the written files.

    Raises:
        ValueError: with no model, an unknown row in ``pairs``, a truth table missing cases, or
            real records that are all in the main cohort.
        FileNotFoundError: when ``real_records`` is not a prepared real-record folder.
        ecg_r1.training.data.TrainingDataError: when the data cannot give test cases.
    """
    from ecg_r1.modeling.profiles import Profile, load_profile

    if not models:
        raise ValueError("no models to compare: pass at least one name -> model folder")
    if unknown_ablations := [a for a in ablations if a not in ABLATIONS]:
        raise ValueError(f"unknown ablations {unknown_ablations}; choose from {sorted(ABLATIONS)}")
    profile = profile if isinstance(profile, Profile) else load_profile(profile)
    out = Path(out_dir)
    (out / PREDICTIONS_DIR).mkdir(parents=True, exist_ok=True)
    (out / PLOTS_DIR).mkdir(parents=True, exist_ok=True)

    cases = evaluation_cases(cohort_dir, splits_path, images_dir, list(EVAL_SPLITS))
    if max_cases_per_split is not None:
        cases = sample_per_split(cases, max_cases_per_split, seed)
    cases = add_features(cases, cohort_dir)
    splits = list(EVAL_SPLITS)
    real_info: dict[str, Any] | None = None
    if real_records is not None:
        real_cases, excluded = real_record_cases(real_records, cohort_dir, splits_path)
        if real_cases.height == 0:
            raise ValueError(
                f"every labelled TWI record of {real_records} is also in the main cohort ({len(excluded)}); "
                "a sim-to-real check needs records the models were not trained on"
            )
        if max_cases_per_split is not None:
            real_cases = sample_per_split(real_cases, max_cases_per_split, seed)
        # Same columns (load_cases + features), so one table and one pass of each model over it.
        cases = pl.concat([cases, real_cases.select(cases.columns)], how="vertical_relaxed")
        splits.append(REAL_SPLIT)
        real_info = {
            "folder": str(real_records),
            "inputs": read_real_records(real_records).inputs,
            "excluded_in_main_cohort": excluded,
        }
    by_split = {split: cases.filter(pl.col("split") == split) for split in splits}
    for split, part in by_split.items():
        if part.height == 0:
            raise ValueError(f"split {split} has no labelled TWI cases in {splits_path}; nothing to evaluate")
    # Simulated test cases: what the per-hospital figures, the Bayes ceiling and the promotion read.
    sim_cases = cases.filter(pl.col("split").is_in(EVAL_SPLITS))
    files: dict[str, Path] = {}
    files["cases"] = out / CASES_FILE
    cases.select("record_id", "split", "hospital", "label").write_parquet(files["cases"])

    # Models: one pass over both splits' cases.
    folders = {name: stage_folder(path) for name, path in models.items()}
    predictions: dict[str, Predictions] = {}
    kinds: dict[str, str] = {}
    ablated: dict[str, tuple[str, str]] = {}  # ablated row -> (model row, ablation)
    for name, (model_dir, _) in folders.items():
        for ablation in (None, *ablations):
            row = name if ablation is None else f"{name} ({ABLATIONS[ablation]})"
            preds, completions = predict_cases(
                model_dir,
                profile,
                cases,
                batch_size,
                max_new_tokens,
                name=row,
                progress=progress,
                ablation=ablation,
            )
            predictions[row], kinds[row] = preds, report.MEASURED
            if ablation is not None:
                ablated[row] = (name, ablation)
            frame = preds.to_frame().with_columns(
                split=cases["split"], completion=pl.Series(completions, dtype=pl.String)
            )
            files[f"predictions_{slug(row)}"] = out / PREDICTIONS_DIR / f"{slug(row)}.parquet"
            frame.write_parquet(files[f"predictions_{slug(row)}"])

    # Reference rows: the baselines answer every case, the simulator's ceiling only simulated ones.
    truth = pl.read_parquet(truth_path) if truth_path is not None else None
    if baselines_dir is not None:
        baselines = ReferenceBaselines.load(baselines_dir)
    else:
        train = add_features(evaluation_cases(cohort_dir, splits_path, images_dir, TRAIN), cohort_dir)
        baselines = ReferenceBaselines.fit(train, seed=seed)
    references = reference_predictions(None, cases, baselines=baselines)
    if truth is not None:
        references.append(bayes_ceiling(truth, sim_cases))
    case_splits = cases.select("record_id", "split")
    for preds in references:
        predictions[preds.name], kinds[preds.name] = preds, report.REFERENCE
        files[f"predictions_{slug(preds.name)}"] = out / PREDICTIONS_DIR / f"{slug(preds.name)}.parquet"
        preds.to_frame().join(case_splits, on="record_id", how="left", maintain_order="left").write_parquet(
            files[f"predictions_{slug(preds.name)}"]
        )

    # Metrics per row and split (the splits a row answered), per hospital over both test splits.
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
        name: evaluate_predictions_by_group(preds, sim_cases, "hospital", n_boot=n_boot, seed=seed)
        for name, preds in predictions.items()
    }

    # Paired comparisons on the same cases.
    if pairs is None:
        names = list(models)
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    # Each model against itself without an input: how much of its accuracy that input carries.
    pairs = [*pairs, *((name, row) for row, (name, _) in ablated.items())]
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

    # The table: per split, models then reference rows, then the cited clinicians (whose figure
    # is about the paper's hospitals, so it is not repeated under the real records).
    rows = []
    for split in by_split:
        for name in predictions:
            if split in results[name]:
                rows.append(report.TableRow(name, SPLIT_TITLES[split], results[name][split], kinds[name]))
        if split in EVAL_SPLITS:
            rows.append(
                report.TableRow(
                    CLINICIANS_NAME,
                    SPLIT_TITLES[split],
                    clinicians_metrics(),
                    report.CITED,
                    CLINICIANS_SOURCE,
                )
            )
    table = "# Model comparison\n\n" + report.comparison_table(rows)
    if real_info is not None:
        table += _real_records_markdown(real_info, by_split[REAL_SPLIT])
    table += _paired_markdown(paired)
    files["table"] = out / TABLE_FILE
    files["table"].write_text(table)

    # Plots.
    plots = out / PLOTS_DIR
    files["confusion_matrices"] = report.plot_confusion_matrices(
        {f"{name}, {SPLIT_TITLES[s]}": results[name][s] for name in models for s in by_split},
        plots / "confusion_matrices.png",
    )
    # Ablated rows stay out of the plots: they are diagnostics, read in the table and the pairs.
    plotted = {name: preds for name, preds in predictions.items() if name not in ablated}
    for split, part in by_split.items():
        curves = {}
        for name, preds in plotted.items():
            if split not in results[name]:
                continue
            y, _, p = align(preds, part)
            if p is not None:
                curves[name] = (y, p)
        files[f"roc_{split}"] = report.plot_roc_curves(
            curves, plots / f"roc_{split}.png", title=f"ROC, {SPLIT_TITLES[split]}"
        )
    files["accuracy_per_hospital"] = report.plot_group_accuracy(
        {name: per_hospital[name] for name in plotted},
        plots / "accuracy_per_hospital.png",
        reference={"clinicians ~50% (cited PPV)": CLINICIANS_ACCURACY},
    )
    for name, (_, stage_dir) in folders.items():
        log = _reward_log(stage_dir)
        if log is not None:
            files[f"reward_curves_{slug(name)}"] = report.plot_reward_curves(
                log, plots / f"reward_curves_{slug(name)}.png", title=f"Rewards during training: {name}"
            )
    first = next(iter(models))
    if n_case_figures > 0:
        shown = by_split[TEST_EXTERNAL]
        picks = _pick_cases(predictions[first], shown, n_case_figures, seed)
        where = {rid: i for i, rid in enumerate(predictions[first].record_id)}
        views = []
        for i in picks:
            row = shown.row(i, named=True)
            k = where[row["record_id"]]
            p = predictions[first]
            views.append(
                report.CaseView(
                    record_id=row["record_id"],
                    image=row["image_path"],
                    label=row["label"],
                    answer=p.y_pred[k],
                    reasoning=_printable(p.reasoning[k]) if p.reasoning else None,
                    p_yes=float(p.p_yes[k]) if p.p_yes is not None else None,
                )
            )
        files["cases_figure"] = report.plot_cases(views, plots / f"cases_{slug(first)}.png")

    comparison = Comparison(
        out_dir=out,
        table=table,
        models={name: folder for name, (folder, _) in folders.items()},
        stages={name: stage for name, (_, stage) in folders.items()},
        results=results,
        kinds=kinds,
        per_hospital=per_hospital,
        paired=paired,
        predictions=predictions,
        files=files,
        real_records=real_info,
    )
    files["metrics"] = out / METRICS_FILE
    document = _metrics_document(comparison, by_split) | {"profile": str(profile.path or profile.name)}
    files["metrics"].write_text(json.dumps(_nan_to_none(document), indent=2))
    return comparison


def _metrics_document(comparison: Comparison, by_split: Mapping[str, pl.DataFrame]) -> dict[str, Any]:
    return {
        "splits": {
            split: {
                "n": part.height,
                "n_positive": int((part["label"] == "ischemic").sum()),
                "hospitals": sorted(part["hospital"].unique().to_list()),
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


def read_metrics(out_dir: str | Path) -> dict[str, Any]:
    """The ``metrics.json`` a comparison wrote (null stands for an undefined metric)."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the comparison first (ecg-r1 evaluate or make run)")
    return json.loads(path.read_text())


def read_predictions(out_dir: str | Path, name: str) -> Predictions:
    """A row's predictions as :func:`run_comparison` saved them (both test splits)."""
    path = Path(out_dir) / PREDICTIONS_DIR / f"{slug(name)}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {name!r} was not in the comparison at {out_dir}")
    return Predictions.from_frame(name, pl.read_parquet(path))
