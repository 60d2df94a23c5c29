"""The cases an evaluation runs on: labelled TWI cases of the test splits and of real records.

Takes: the cohort, its split manifest and rendered images (and optionally a real-record folder of
:mod:`ecg_r1.evaluation.real_records`). Gives: case tables with a string ``label``
(``"ischemic"`` / ``"non-ischemic"``) and the measured ECG features the feature baseline reads;
:func:`gather_cases` is the first step of :func:`ecg_r1.evaluation.comparison.run_comparison`:
every case of :data:`EVAL_SPLITS` (and the real records) in one table, by split.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ecg_r1.data.features import with_features
from ecg_r1.data.labels import ISCHEMIC, NON_ISCHEMIC
from ecg_r1.data.split import TEST_EXTERNAL, TEST_INTERNAL, TRAIN
from ecg_r1.evaluation.note_shift import NoteShift, note_shift
from ecg_r1.evaluation.real_records import REAL_SPLIT, read_real_records

logger = logging.getLogger(__name__)

EVAL_SPLITS: tuple[str, ...] = (TEST_INTERNAL, TEST_EXTERNAL)
# The simulator truth's column holding each note written in English (ecg_r1.simulate.cohort), for
# the english_note ablation (ecg_r1.evaluation.predictions.ABLATIONS).
ENGLISH_NOTE_COLUMN = "note_english"


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
        pl.when(pl.col("label")).then(pl.lit(ISCHEMIC)).otherwise(pl.lit(NON_ISCHEMIC)).alias("label")
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


@dataclass(frozen=True)
class EvaluationCases:
    """Every case a comparison evaluates.

    Attributes:
        cases: all of them, with features: the test splits' cases, then the real records'.
        by_split: split -> its cases, in :data:`EVAL_SPLITS` order (then the real records).
        simulated: the cases of :data:`EVAL_SPLITS` (what the per-hospital figures, the Bayes
            ceiling and the promotion read).
        real_records: None without real records; else their folder, inputs and the record ids
            left out because they are in the main cohort.
        note_shift: split -> how many of its notes' words no training note holds.
    """

    cases: pl.DataFrame
    by_split: dict[str, pl.DataFrame]
    simulated: pl.DataFrame
    real_records: dict[str, Any] | None
    note_shift: dict[str, NoteShift]


def gather_cases(
    cohort_dir: str | Path,
    splits_path: str | Path,
    images_dir: str | Path,
    seed: int,
    max_cases_per_split: int | None = None,
    real_records: str | Path | None = None,
) -> EvaluationCases:
    """The cases of :data:`EVAL_SPLITS` and, given a real-record folder, its unseen records, with
    each split's note words measured against the training notes (:mod:`.note_shift`).

    Args:
        cohort_dir, splits_path, images_dir: the cohort, split manifest and rendered images.
        seed: seeds the sample of :func:`sample_per_split`.
        max_cases_per_split: at most this many cases per split (None: all).
        real_records: a folder :func:`ecg_r1.evaluation.real_records.prepare_real_records` wrote.

    Raises:
        ValueError: when a split has no case or every real record is in the main cohort.
    """
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
    simulated = cases.filter(pl.col("split").is_in(EVAL_SPLITS))
    return EvaluationCases(
        cases, by_split, simulated, real_info, _note_shifts(cohort_dir, splits_path, images_dir, by_split)
    )


def _note_shifts(
    cohort_dir: str | Path, splits_path: str | Path, images_dir: str | Path, by_split: dict[str, pl.DataFrame]
) -> dict[str, NoteShift]:
    """Each split's notes against the training split's (none where the manifest has no labelled
    training case: a comparison of models trained elsewhere still runs)."""
    from ecg_r1.training.data import TrainingDataError

    try:
        training_notes = evaluation_cases(cohort_dir, splits_path, images_dir, TRAIN)["note"].to_list()
    except TrainingDataError as exc:
        logger.warning("no note shift reported: the training split gives no notes (%s)", exc)
        return {}
    return {split: note_shift(training_notes, part["note"].to_list()) for split, part in by_split.items()}


def has_english_notes(truth_path: str | Path | None) -> bool:
    """Whether a simulator truth table holds each note in English (older simulations do not)."""
    return truth_path is not None and ENGLISH_NOTE_COLUMN in pl.read_parquet_schema(truth_path)


def with_english_notes(cases: pl.DataFrame, truth_path: str | Path | None) -> pl.DataFrame:
    """The cases with the simulator truth's ``note_english`` (for the english_note ablation).

    Raises:
        ValueError: without a truth table, or with one that has no English notes.
    """
    if truth_path is None:
        raise ValueError(
            "the english_note ablation needs the simulator's truth.parquet (--truth); "
            "a cohort that was not simulated has no English version of its notes"
        )
    if not has_english_notes(truth_path):
        raise ValueError(
            f"{truth_path} has no {ENGLISH_NOTE_COLUMN} column (simulated by an older version); "
            "simulate the cohort again or drop the english_note ablation"
        )
    english = pl.read_parquet(truth_path, columns=["record_id", ENGLISH_NOTE_COLUMN])
    return cases.join(english, on="record_id", how="left")
