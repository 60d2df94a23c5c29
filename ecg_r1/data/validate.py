"""Validate a cohort with a Great Expectations suite and split it into passing and quarantined records.

Takes: a cohort table and its signals (or a cohort folder written by ingest) and the thresholds
(:class:`ecg_r1.data.expectations.ValidationConfig`). Gives: a :class:`ValidationResult`, the
passing and refused records, and the files below. The suite itself (the expectations, the
helper columns it reads, running Great Expectations) is :mod:`ecg_r1.data.expectations`.

Two kinds of expectation (``meta["fatal"]`` on each expectation):

* **Fatal** (the cohort as a whole is unusable; downstream stops): the columns of
  :data:`ecg_r1.data.store.COHORT_SCHEMA` present with castable types, at least one record, unique
  non-null record ids, and a ``row`` index that is unique and inside the signal array. None of
  these can be fixed by dropping a few records: they mean the table and the signals do not belong
  together or the table was not written by ingest. Also fatal: more than
  :attr:`~ecg_r1.data.expectations.ValidationConfig.max_quarantine_fraction` of the records
  failing the per-record checks, which points at a systematic fault (a hospital exported in µV, a
  column shifted) that quarantining would hide.
* **Per record** (the record goes to quarantine, the rest continues): missing patient or hospital,
  age outside [0, 120], sex not M/F, implausible sampling rate or gain, a duration outside the
  canonical rules, a label outside :data:`ecg_r1.data.labels.LABELS`, a missing TWI flag, a patient found
  in several hospitals (all its records: which hospital is right cannot be told), NaN samples,
  flat or saturated leads, implausible amplitude. Nulls pass the range checks (a missing age is
  allowed; a wrong one is not).

Output, written beside the cohort by :func:`validate_cohort_dir`:

* ``validated.parquet``: the passing records (same schema; ``row`` still indexes ``signals.f32``,
  so signals are never copied). Not written when the result is fatal (a stale one is removed).
* ``validation_quarantine.parquet``: the refused records (:data:`ecg_r1.data.store.QUARANTINE_SCHEMA`),
  one row a record, ``reason`` the first failed check, ``message`` all of them. A separate file
  from ingest's ``quarantine.parquet``, so that ingest's ``records_in == loaded + quarantined``
  stays true and validation can be rerun without duplicating rows.
* ``validation.json``: the :class:`ValidationResult`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ecg_r1.data.canonical import MIN_DURATION_S
from ecg_r1.data.expectations import ExpectationOutcome, ValidationConfig, run_suite
from ecg_r1.data.labels import LABELS
from ecg_r1.data.store import COHORT_FILE, QUARANTINE_SCHEMA, open_signals, read_cohort

logger = logging.getLogger(__name__)

VALIDATED_FILE = "validated.parquet"
VALIDATION_QUARANTINE_FILE = "validation_quarantine.parquet"
VALIDATION_REPORT_FILE = "validation.json"


@dataclass
class ValidationResult:
    """What the suite found."""

    success: bool  # every expectation passed
    fatal: bool  # downstream must stop
    n_records: int
    n_passed: int
    n_quarantined: int
    expectations: list[ExpectationOutcome]
    failing_records: dict[str, list[str]]  # reason -> record ids (a record may fail several)
    fatal_reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ValidationResult:
        outcomes = [ExpectationOutcome(**item) for item in data["expectations"]]
        return cls(**(data | {"expectations": outcomes}))

    def quarantined_by_reason(self) -> dict[str, int]:
        """Count of quarantined records by their (first) reason."""
        return _count(self._first_reasons())

    def _first_reasons(self) -> dict[str, str]:
        first: dict[str, str] = {}
        for outcome in self.expectations:
            if outcome.fatal:
                continue
            for record in self.failing_records.get(outcome.reason, []):
                first.setdefault(record, outcome.reason)
        return first

    def to_markdown(self) -> str:
        """A table of the expectations for the Dagster UI."""
        lines = [
            f"**{'FATAL' if self.fatal else 'passed' if self.success else 'records quarantined'}**: "
            f"{self.n_passed} of {self.n_records} records pass, {self.n_quarantined} quarantined"
            + (f"; fatal: {', '.join(self.fatal_reasons)}" if self.fatal_reasons else ""),
            "",
            "| check | expectation | column | fatal | ok | unexpected | observed |",
            "|---|---|---|---|---|---|---|",
        ]
        for o in self.expectations:
            observed = json.dumps(o.observed, default=str)
            if len(observed) > 80:
                observed = observed[:77] + "..."
            lines.append(
                f"| {o.reason} | {o.expectation} | {o.column or ''} | {'yes' if o.fatal else 'no'} | "
                f"{'yes' if o.success else 'NO'} | {o.unexpected_count} | {observed.replace('|', '/')} |"
            )
        return "\n".join(lines)


def _count(first: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason in first.values():
        counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items()))


# Messages for the quarantine table: what was wrong and what to do.
MESSAGES: dict[str, str] = {
    "missing_patient_id": "no patient id: give every record a patient id (the record id if the source has none)",
    "missing_hospital": "no hospital: set the hospital column of the manifest or the reader's hospital",
    "age_out_of_range": "age outside [{min_age:g}, {max_age:g}] years: fix the age or leave it empty",
    "invalid_sex": "sex is not M or F: write M, F or leave it empty",
    "implausible_sampling_rate": "source sampling rate outside [{min_source_fs:g}, {max_source_fs:g}] Hz: "
    "check the header's rate",
    "implausible_gain": "ADC gain is not positive: check the header's gain (units per mV)",
    "invalid_duration": "padding or cropping outside the canonical rules (at least {min_s:g} s): "
    "the record is too short or its provenance is wrong",
    "invalid_label": "label is not one of " + ", ".join(LABELS) + ": check the label rules",
    "missing_twi_flag": "the TWI flag is missing: re-ingest with the label rules",
    "patient_in_several_hospitals": "the patient occurs in more than one hospital: patient ids collide "
    "across hospitals; prefix them with the hospital",
    "nan_samples": "the signal has missing (NaN) samples: re-export the record without gaps",
    "flat_lead": "a lead is flat: an electrode was off or the channel is empty",
    "saturated_lead": "a lead is clipped: the amplifier saturated",
    "implausible_amplitude": "largest peak-to-peak range outside [{min_record_ptp_mv:g}, {max_ptp_mv:g}] mV: "
    "wrong gain or units in the header",
}


def validate_cohort(
    cohort: pl.DataFrame, signals: np.ndarray | None, config: ValidationConfig | None = None
) -> ValidationResult:
    """Run the suite on a cohort table and its signals.

    Args:
        cohort: the cohort table (:data:`ecg_r1.data.store.COHORT_SCHEMA`).
        signals: the cohort's signal array (n, 12, 5000), usually the memmap of
            :func:`ecg_r1.data.store.open_signals`; None skips the signal checks (and the ``row`` bound).
        config: thresholds; the defaults when None.

    Returns:
        The :class:`ValidationResult`; nothing is written.
    """
    config = config or ValidationConfig()
    outcomes, failing = run_suite(cohort, signals, config)

    n = cohort.height
    refused = set()
    for outcome in outcomes:
        if not outcome.fatal:
            refused.update(failing.get(outcome.reason, []))
    fatal_reasons = sorted({o.reason for o in outcomes if o.fatal and not o.success})
    share = len(refused) / n if n else 0.0
    if share > config.max_quarantine_fraction:
        fatal_reasons.append("too_many_quarantined")
        outcomes.append(
            ExpectationOutcome(
                reason="too_many_quarantined",
                expectation="quarantine_fraction",
                column=None,
                fatal=True,
                success=False,
                unexpected_count=len(refused),
                unexpected_percent=round(100 * share, 3),
                observed=round(share, 4),
                kwargs={"max_value": config.max_quarantine_fraction},
            )
        )
    result = ValidationResult(
        success=all(o.success for o in outcomes),
        fatal=bool(fatal_reasons),
        n_records=n,
        n_passed=n - len(refused),
        n_quarantined=len(refused),
        expectations=outcomes,
        failing_records={reason: sorted(ids) for reason, ids in sorted(failing.items())},
        fatal_reasons=fatal_reasons,
    )
    logger.info(
        "validated %d records: %d pass, %d quarantined%s",
        n,
        result.n_passed,
        result.n_quarantined,
        f", FATAL: {fatal_reasons}" if fatal_reasons else "",
    )
    return result


def split_validated(
    cohort: pl.DataFrame, result: ValidationResult, config: ValidationConfig | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Separate the passing records from the refused ones.

    Args:
        cohort: the table that was validated.
        result: its :class:`ValidationResult`.
        config: the thresholds used (they appear in the messages).

    Returns:
        ``(validated, quarantine)``: the passing rows of ``cohort`` and one
        :data:`~ecg_r1.data.store.QUARANTINE_SCHEMA` row per refused record.
    """
    config = config or ValidationConfig()
    values = asdict(config) | {"min_s": MIN_DURATION_S}
    reasons: dict[str, list[str]] = {}
    for outcome in result.expectations:
        if outcome.fatal:
            continue
        for record in result.failing_records.get(outcome.reason, []):
            if outcome.reason not in reasons.setdefault(record, []):
                reasons[record].append(outcome.reason)
    refused_ids = list(reasons)
    validated = cohort.filter(~pl.col("record_id").is_in(refused_ids))
    columns = [c for c in QUARANTINE_SCHEMA if c in cohort.columns and c not in ("reason", "message")]
    refused = (
        cohort.filter(pl.col("record_id").is_in(refused_ids))
        .select(columns)
        .unique("record_id", keep="first")
    )
    rows = []
    for record in refused.iter_rows(named=True):
        record_reasons = reasons[record["record_id"]]
        message = "; ".join(f"{r}: {MESSAGES.get(r, r).format(**values)}" for r in record_reasons)
        rows.append(
            {k: record.get(k) for k in QUARANTINE_SCHEMA} | {"reason": record_reasons[0], "message": message}
        )
    quarantine = pl.DataFrame(rows, schema=QUARANTINE_SCHEMA)
    return validated, quarantine


def validate_cohort_dir(
    cohort_dir: str | Path, config: ValidationConfig | None = None, out_dir: str | Path | None = None
) -> ValidationResult:
    """Validate an ingested cohort folder and write the validated table, quarantine and report.

    Args:
        cohort_dir: a cohort folder written by :func:`ecg_r1.data.ingest.ingest`.
        config: thresholds; the defaults when None.
        out_dir: where to write (default: the cohort folder itself).

    Returns:
        The :class:`ValidationResult` (also in ``validation.json``). When it is fatal, no
        ``validated.parquet`` is left behind.
    """
    cohort_dir = Path(cohort_dir)
    if not (cohort_dir / COHORT_FILE).is_file():
        raise FileNotFoundError(
            f"no cohort table at {cohort_dir / COHORT_FILE}: ingest first (materialize raw_cohort or run ecg-r1 ingest)"
        )
    out_dir = Path(out_dir) if out_dir is not None else cohort_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    cohort = read_cohort(cohort_dir)
    signals = open_signals(cohort_dir)
    config = config or ValidationConfig()
    result = validate_cohort(cohort, signals, config)
    (out_dir / VALIDATION_REPORT_FILE).write_text(json.dumps(result.to_dict(), indent=2, default=str))
    validated_path = out_dir / VALIDATED_FILE
    if result.fatal:
        validated_path.unlink(missing_ok=True)
        quarantine = pl.DataFrame(schema=QUARANTINE_SCHEMA)
        logger.error("validation of %s failed fatally: %s", cohort_dir, ", ".join(result.fatal_reasons))
    else:
        validated, quarantine = split_validated(cohort, result, config)
        validated.write_parquet(validated_path)
    quarantine.write_parquet(out_dir / VALIDATION_QUARANTINE_FILE)
    return result


def clear_validation(cohort_dir: str | Path) -> None:
    """Remove a cohort folder's validation outputs (before re-ingesting into it, so none go stale)."""
    for name in (VALIDATED_FILE, VALIDATION_QUARANTINE_FILE, VALIDATION_REPORT_FILE):
        (Path(cohort_dir) / name).unlink(missing_ok=True)


def read_validation(cohort_dir: str | Path) -> ValidationResult:
    """Read the ``validation.json`` written by :func:`validate_cohort_dir`."""
    path = Path(cohort_dir) / VALIDATION_REPORT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no validation report at {path}: materialize validated_cohort first")
    return ValidationResult.from_dict(json.loads(path.read_text()))


def read_validated_cohort(cohort_dir: str | Path) -> pl.DataFrame:
    """Read the validated cohort table, refusing a cohort whose validation was fatal.

    Raises:
        RuntimeError: when the last validation was fatal.
        FileNotFoundError: when the cohort was never validated.
    """
    cohort_dir = Path(cohort_dir)
    result = read_validation(cohort_dir)
    if result.fatal:
        raise RuntimeError(
            f"the cohort in {cohort_dir} failed validation ({', '.join(result.fatal_reasons)}); "
            f"see {cohort_dir / VALIDATION_REPORT_FILE} and fix the input before splitting"
        )
    return pl.read_parquet(cohort_dir / VALIDATED_FILE)
