"""Hospital-aware, patient-level, label-stratified splits of the cohort.

Rules:

* Records of the configured **held-out hospitals** form ``test_external``, the cross-hospital
  test set. No record of those hospitals reaches ``train``, ``val`` or ``test_internal``.
* The remaining records are split into ``train`` / ``val`` / ``test_internal`` **by patient**:
  all records of a patient land in one split, so a model never sees a patient at test time that
  it trained on.
* The split is **stratified** by (hospital, label): patients are grouped by their hospital and
  their majority label, shuffled with the seed inside each group, and handed one by one to the
  split furthest below its target number of records. The targets run on across the groups, so a
  group too small to give every split a patient still leaves the overall fractions right.
* **Deterministic** for a seed: the groups are visited in sorted order and patients sorted before
  the seeded shuffle, so the same cohort and seed always give the same split, whatever the row
  order of the input table.

:func:`split_cohort` returns one row a record (record_id, patient_id, hospital, label, split);
:func:`write_splits` writes it as ``splits.parquet`` (the split manifest) beside a per split x
hospital x label count table.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl

from ecg_r1.data.labels import UNKNOWN

logger = logging.getLogger(__name__)

TRAIN, VAL, TEST_INTERNAL, TEST_EXTERNAL = "train", "val", "test_internal", "test_external"
SPLITS: tuple[str, ...] = (TRAIN, VAL, TEST_INTERNAL, TEST_EXTERNAL)
SPLIT_COLUMNS: tuple[str, ...] = ("record_id", "patient_id", "hospital", "label", "split")
SPLITS_FILE = "splits.parquet"
SUMMARY_FILE = "split_summary.csv"


class SplitError(ValueError):
    """The cohort cannot be split as configured; the message says what to change."""


def split_cohort(
    cohort: pl.DataFrame,
    held_out_hospitals: list[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    twi_only: bool = True,
    labelled_only: bool = True,
) -> pl.DataFrame:
    """Split a cohort table into train / val / test_internal / test_external.

    Args:
        cohort: the (validated) cohort table; needs ``record_id``, ``patient_id``, ``hospital``,
            ``label`` and, when ``twi_only``, ``twi``.
        held_out_hospitals: hospitals whose records form ``test_external``; each must occur in the
            cohort. An empty list means no cross-hospital test set.
        val_fraction: share of the non-held-out records for ``val``, in [0, 1).
        test_fraction: share of the non-held-out records for ``test_internal``, in [0, 1).
        seed: seed of the patient shuffle.
        twi_only: keep only records in the T-wave-inversion cohort (``twi`` true).
        labelled_only: drop records labelled ``unknown`` (they can be neither trained on nor scored).

    Returns:
        One row a kept record with columns ``record_id, patient_id, hospital, label, split``,
        sorted by split then record id.

    Raises:
        SplitError: on bad fractions, a held-out hospital that is not in the cohort, a patient
            seen in both a held-out and a training hospital, or a split with a positive fraction
            (or a held-out hospital) that would end up empty.
    """
    _check_fractions(val_fraction, test_fraction)
    table = _records_to_split(cohort, held_out_hospitals, twi_only, labelled_only)
    held = set(held_out_hospitals)
    is_held = pl.col("hospital").is_in(list(held))
    _check_no_patient_crosses(table, is_held)
    external = table.filter(is_held).with_columns(pl.lit(TEST_EXTERNAL).alias("split"))
    for hospital in sorted(held):
        if external.filter(pl.col("hospital") == hospital).height == 0:
            raise SplitError(
                f"held-out hospital {hospital!r} has no records left after filtering "
                f"(twi_only={twi_only}, labelled_only={labelled_only}); test_external would lack it"
            )
    internal = table.filter(~is_held)
    fractions = {TRAIN: 1.0 - val_fraction - test_fraction, VAL: val_fraction, TEST_INTERNAL: test_fraction}
    assignment = _assign_patients(internal, fractions, seed)
    internal = internal.join(assignment, on="patient_id", how="left")

    result = pl.concat([internal, external]).select(SPLIT_COLUMNS).sort("split", "record_id")
    counts = dict(result.group_by("split").len().iter_rows())
    for name, fraction in fractions.items():
        if fraction > 0 and counts.get(name, 0) == 0:
            raise SplitError(
                f"split {name!r} would be empty: {internal.height} record(s) of "
                f"{internal.get_column('patient_id').n_unique()} patient(s) outside the held-out "
                f"hospitals are too few for fraction {fraction:.3f}; use a larger cohort or fraction"
            )
    logger.info("split %d records: %s", result.height, counts)
    return result


def _records_to_split(
    cohort: pl.DataFrame, held_out_hospitals: list[str], twi_only: bool, labelled_only: bool
) -> pl.DataFrame:
    """The records the split covers (``record_id, patient_id, hospital, label``), after checking
    the columns, the held-out hospitals' names and that every record has a hospital and patient."""
    required = {"record_id", "patient_id", "hospital", "label"} | ({"twi"} if twi_only else set())
    missing = sorted(required - set(cohort.columns))
    if missing:
        raise SplitError(f"the cohort table lacks column(s) {missing}; pass the cohort written by ingest")

    all_hospitals = set(cohort.get_column("hospital").drop_nulls().unique().to_list())
    unknown = sorted(set(held_out_hospitals) - all_hospitals)
    if unknown:
        raise SplitError(
            f"held-out hospital(s) {unknown} are not in the cohort, which has {sorted(all_hospitals)}; "
            "fix held_out_hospitals in the split config"
        )

    table = cohort.select("record_id", "patient_id", "hospital", "label", *(["twi"] if twi_only else []))
    if table.get_column("hospital").null_count() or table.get_column("patient_id").null_count():
        raise SplitError("records without hospital or patient_id cannot be split; validate the cohort first")
    if twi_only:
        table = table.filter(pl.col("twi").fill_null(False)).drop("twi")
    if labelled_only:
        table = table.filter(pl.col("label").is_not_null() & (pl.col("label") != UNKNOWN))
    if table.height == 0:
        raise SplitError(
            f"no records left to split (twi_only={twi_only}, labelled_only={labelled_only}); "
            "the cohort has no labelled TWI records"
        )
    return table


def _check_no_patient_crosses(table: pl.DataFrame, is_held: pl.Expr) -> None:
    """Refuse a patient with records on both sides: it would leak into the external test."""
    crossing = (
        table.group_by("patient_id")
        .agg(is_held.any().alias("any_held"), is_held.all().alias("all_held"))
        .filter(pl.col("any_held") & ~pl.col("all_held"))
        .get_column("patient_id")
        .sort()
        .to_list()
    )
    if crossing:
        raise SplitError(
            f"{len(crossing)} patient(s) have records in a held-out and in a training hospital "
            f"(e.g. {crossing[:5]}); validate the cohort (a patient must belong to one hospital)"
        )


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise SplitError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise SplitError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves nothing to train on; "
            "it must be below 1"
        )


def _assign_patients(internal: pl.DataFrame, fractions: dict[str, float], seed: int) -> pl.DataFrame:
    """Give every patient one split, stratified by (hospital, majority label)."""
    if internal.height == 0:
        return pl.DataFrame(schema={"patient_id": pl.String, "split": pl.String})
    # The patient's stratum: its hospital (one after validation; the commonest otherwise) and its
    # commonest label, ties broken by name so the result does not depend on row order.
    patients = (
        internal.group_by("patient_id")
        .agg(
            pl.len().alias("n"),
            pl.col("hospital").mode().sort().first().alias("hospital"),
            pl.col("label").mode().sort().first().alias("label"),
        )
        .sort("hospital", "label", "patient_id")
    )
    rng = np.random.default_rng(seed)
    names = list(fractions)
    share = np.array([fractions[name] for name in names])
    target = np.zeros(len(names))
    assigned = np.zeros(len(names))
    out_ids: list[str] = []
    out_splits: list[str] = []
    for _, group in patients.group_by(["hospital", "label"], maintain_order=True):
        order = rng.permutation(group.height)
        ids = group.get_column("patient_id").to_numpy()[order]
        sizes = group.get_column("n").to_numpy()[order]
        # Targets run on across strata, so rounding left over in one stratum is made up in the next.
        target += share * sizes.sum()
        for patient, size in zip(ids, sizes, strict=True):
            # Largest deficit first; a split with a zero share never gets a patient.
            deficit = np.where(share > 0, target - assigned, -np.inf)
            pick = int(np.argmax(deficit))
            assigned[pick] += size
            out_ids.append(str(patient))
            out_splits.append(names[pick])
    return pl.DataFrame({"patient_id": out_ids, "split": out_splits})


def split_summary(splits: pl.DataFrame) -> pl.DataFrame:
    """Count records and patients per split x hospital x label.

    Args:
        splits: the table :func:`split_cohort` returns.

    Returns:
        Columns ``split, hospital, label, records, patients``, in split order.
    """
    order = {name: i for i, name in enumerate(SPLITS)}
    return (
        splits.group_by("split", "hospital", "label")
        .agg(pl.len().alias("records"), pl.col("patient_id").n_unique().alias("patients"))
        .with_columns(pl.col("split").replace_strict(order, default=len(order)).alias("_order"))
        .sort("_order", "hospital", "label")
        .drop("_order")
    )


def patients_in_several_splits(splits: pl.DataFrame) -> list[str]:
    """Return the patient ids that occur in more than one split (empty for a sound split)."""
    return (
        splits.group_by("patient_id")
        .agg(pl.col("split").n_unique().alias("n"))
        .filter(pl.col("n") > 1)
        .get_column("patient_id")
        .sort()
        .to_list()
    )


def held_out_leaks(splits: pl.DataFrame, held_out_hospitals: list[str]) -> pl.DataFrame:
    """Return the records of held-out hospitals that sit outside ``test_external`` (empty when sound)."""
    return splits.filter(pl.col("hospital").is_in(held_out_hospitals) & (pl.col("split") != TEST_EXTERNAL))


def write_splits(splits: pl.DataFrame, path: str | Path) -> Path:
    """Write the split manifest and its count table.

    Args:
        splits: the table :func:`split_cohort` returns.
        path: the manifest file (``.../splits.parquet``) or the folder to write it into.

    Returns:
        The manifest's path; ``split_summary.csv`` is written beside it.
    """
    path = Path(path)
    if path.suffix != ".parquet":
        path = path / SPLITS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    splits.write_parquet(path)
    split_summary(splits).write_csv(path.parent / SUMMARY_FILE)
    return path


def read_splits(path: str | Path) -> pl.DataFrame:
    """Read a split manifest written by :func:`write_splits` (file or its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / SPLITS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no split manifest at {path}; materialize cohort_splits or run the split first"
        )
    return pl.read_parquet(path)
