"""Validate a cohort with a Great Expectations suite and split it into passing and quarantined records.

The suite runs on the cohort table (polars, converted to pandas for GE 1.x) joined with two kinds
of per-record helper columns:

* ``patient_hospitals``: the number of hospitals the record's patient occurs in;
* the signal measures of :func:`ecg_r1.data.signal_checks.signal_quality` (NaN samples, flat and
  saturated leads, largest amplitude), computed chunk by chunk over the memory-mapped signals.

Two kinds of expectation (``meta["fatal"]`` on each expectation):

* **Fatal** (the cohort as a whole is unusable; downstream stops): the columns of
  :data:`ecg_r1.data.store.COHORT_SCHEMA` present with castable types, at least one record, unique
  non-null record ids, and a ``row`` index that is unique and inside the signal array. None of
  these can be fixed by dropping a few records: they mean the table and the signals do not belong
  together or the table was not written by ingest. Also fatal: more than
  :attr:`ValidationConfig.max_quarantine_fraction` of the records failing the per-record checks,
  which points at a systematic fault (a hospital exported in µV, a column shifted) that
  quarantining would hide.
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
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ecg_r1.data.canonical import FS, MIN_DURATION_S, N_SAMPLES
from ecg_r1.data.labels import LABELS
from ecg_r1.data.signal_checks import MAX_PTP_MV, MIN_RECORD_PTP_MV, signal_quality
from ecg_r1.data.store import COHORT_FILE, COHORT_SCHEMA, QUARANTINE_SCHEMA, open_signals, read_cohort

logger = logging.getLogger(__name__)

VALIDATED_FILE = "validated.parquet"
VALIDATION_QUARANTINE_FILE = "validation_quarantine.parquet"
VALIDATION_REPORT_FILE = "validation.json"


@dataclass(frozen=True)
class ValidationConfig:
    """Thresholds of the suite (defaults follow the canonical form and the ingest signal checks)."""

    min_age: float = 0.0
    max_age: float = 120.0
    # PTB-XL's 100 Hz is the lowest rate a real ECG export here has; above 10 kHz is not an ECG.
    min_source_fs: float = 100.0
    max_source_fs: float = 10_000.0
    max_ptp_mv: float = MAX_PTP_MV
    min_record_ptp_mv: float = MIN_RECORD_PTP_MV
    # More failing records than this share means a systematic fault: stop instead of quarantining.
    max_quarantine_fraction: float = 0.25
    # Records per signal-quality chunk: about 120 MB of float32 at a time whatever the cohort size.
    chunk_size: int = 512


@dataclass
class ExpectationOutcome:
    """One expectation's result, flattened for JSON and the Dagster UI."""

    reason: str  # the quarantine / failure key
    expectation: str  # the GE expectation type
    column: str | None
    fatal: bool
    success: bool
    unexpected_count: int = 0
    unexpected_percent: float | None = None
    observed: Any = None  # observed_value, or a few unexpected values
    kwargs: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # an exception GE caught while evaluating it


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
    table, type_problems = _conform(cohort)
    frame = _with_helpers(table, signals, config)
    outcomes: list[ExpectationOutcome] = []
    if type_problems:
        outcomes.append(
            ExpectationOutcome(
                reason="column_types",
                expectation="polars_schema",
                column=None,
                fatal=True,
                success=False,
                unexpected_count=len(type_problems),
                observed=type_problems,
            )
        )
    suite_outcomes, failing = _run_suite(frame, signals, config, skip=set(type_problems))
    outcomes.extend(suite_outcomes)

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


# --------------------------------------------------------------------------------------------
# The suite


def _conform(cohort: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, str]]:
    """Cast present schema columns to their schema type; report the ones that cannot be cast."""
    problems: dict[str, str] = {}
    casts = {}
    for column, dtype in COHORT_SCHEMA.items():
        if column not in cohort.columns or cohort.schema[column] == dtype:
            continue
        try:
            cohort.get_column(column).cast(dtype, strict=True)
            casts[column] = dtype
        except (pl.exceptions.InvalidOperationError, pl.exceptions.ComputeError):
            problems[column] = f"{cohort.schema[column]} (expected {dtype})"
    return (cohort.cast(casts) if casts else cohort), problems


def _with_helpers(table: pl.DataFrame, signals: np.ndarray | None, config: ValidationConfig) -> pl.DataFrame:
    """The columns the suite reads, plus per-record helper columns."""
    frame = table
    if "patient_id" in frame.columns and "hospital" in frame.columns:
        # Records without a patient id fail on that; they are not one patient in many hospitals.
        frame = frame.with_columns(
            pl.when(pl.col("patient_id").is_not_null())
            .then(pl.col("hospital").drop_nulls().n_unique().over("patient_id"))
            .alias("patient_hospitals")
        )
    if signals is not None and "row" in frame.columns:
        frame = pl.concat(
            [frame, _quality(frame.get_column("row"), signals, config.chunk_size)], how="horizontal"
        )
    return frame


def _quality(rows: pl.Series, signals: np.ndarray, chunk_size: int) -> pl.DataFrame:
    """Signal quality per cohort row; null where ``row`` does not index the signal array."""
    index = rows.to_numpy()
    valid = ~rows.is_null().to_numpy() & (np.nan_to_num(index, nan=-1) >= 0)
    valid &= np.nan_to_num(index, nan=-1) < len(signals)
    positions = np.flatnonzero(valid)
    parts = []
    for start in range(0, len(positions), chunk_size):
        chunk = positions[start : start + chunk_size]
        # Sorted reads walk the memmap forwards; fancy indexing copies only this chunk.
        rows_chunk = index[chunk].astype(np.int64)
        rank = np.argsort(np.argsort(rows_chunk))
        quality = signal_quality(np.asarray(signals[np.sort(rows_chunk)]))
        parts.append(quality.select(pl.all().gather(rank)))
    if not parts:
        # The measures' columns without rows (measured on one blank record, then emptied).
        parts.append(signal_quality(np.zeros((1, *signals.shape[1:]), dtype=np.float32)).clear())
    measured = pl.concat(parts).with_columns(pl.Series("_position", positions, dtype=pl.Int64))
    # Back to one row per cohort row, null where the row index was invalid.
    return (
        pl.DataFrame({"_position": np.arange(len(rows), dtype=np.int64)})
        .join(measured, on="_position", how="left")
        .sort("_position")
        .drop("_position")
    )


def _expectations(
    frame: pl.DataFrame, signals: np.ndarray | None, config: ValidationConfig, skip: set[str]
) -> list[Any]:
    import great_expectations.expectations as gxe

    columns = set(frame.columns) - skip

    def meta(reason: str, fatal: bool) -> dict[str, Any]:
        return {"reason": reason, "fatal": fatal}

    out: list[Any] = [
        gxe.ExpectTableColumnsToMatchSet(
            column_set=list(COHORT_SCHEMA), exact_match=False, meta=meta("schema", True)
        ),
        gxe.ExpectTableRowCountToBeBetween(min_value=1, meta=meta("empty_cohort", True)),
    ]
    if "record_id" in columns:
        out += [
            gxe.ExpectColumnValuesToNotBeNull(column="record_id", meta=meta("missing_record_id", True)),
            gxe.ExpectColumnValuesToBeUnique(column="record_id", meta=meta("duplicate_record_id", True)),
        ]
    if "row" in columns:
        out += [
            gxe.ExpectColumnValuesToNotBeNull(column="row", meta=meta("signal_index", True)),
            gxe.ExpectColumnValuesToBeUnique(column="row", meta=meta("signal_index", True)),
        ]
        if signals is not None:
            out.append(
                gxe.ExpectColumnValuesToBeBetween(
                    column="row",
                    min_value=0,
                    max_value=max(len(signals) - 1, 0),
                    meta=meta("signal_index", True),
                )
            )
    per_record = [
        ("patient_id", gxe.ExpectColumnValuesToNotBeNull, {}, "missing_patient_id"),
        ("hospital", gxe.ExpectColumnValuesToNotBeNull, {}, "missing_hospital"),
        ("hospital", gxe.ExpectColumnValueLengthsToBeBetween, {"min_value": 1}, "missing_hospital"),
        (
            "age",
            gxe.ExpectColumnValuesToBeBetween,
            {"min_value": config.min_age, "max_value": config.max_age},
            "age_out_of_range",
        ),
        ("sex", gxe.ExpectColumnValuesToBeInSet, {"value_set": ["M", "F"]}, "invalid_sex"),
        ("source_fs", gxe.ExpectColumnValuesToNotBeNull, {}, "implausible_sampling_rate"),
        (
            "source_fs",
            gxe.ExpectColumnValuesToBeBetween,
            {"min_value": config.min_source_fs, "max_value": config.max_source_fs},
            "implausible_sampling_rate",
        ),
        (
            "source_gain",
            gxe.ExpectColumnValuesToBeBetween,
            {"min_value": 0, "strict_min": True},
            "implausible_gain",
        ),
        (
            "padded_samples",
            gxe.ExpectColumnValuesToBeBetween,
            {"min_value": 0, "max_value": N_SAMPLES - int(MIN_DURATION_S * FS)},
            "invalid_duration",
        ),
        ("cropped_samples", gxe.ExpectColumnValuesToBeBetween, {"min_value": 0}, "invalid_duration"),
        ("label", gxe.ExpectColumnValuesToNotBeNull, {}, "invalid_label"),
        ("label", gxe.ExpectColumnValuesToBeInSet, {"value_set": list(LABELS)}, "invalid_label"),
        ("twi", gxe.ExpectColumnValuesToNotBeNull, {}, "missing_twi_flag"),
        (
            "patient_hospitals",
            gxe.ExpectColumnValuesToBeBetween,
            {"max_value": 1},
            "patient_in_several_hospitals",
        ),
        ("nan_samples", gxe.ExpectColumnValuesToBeBetween, {"max_value": 0}, "nan_samples"),
        ("flat_leads", gxe.ExpectColumnValuesToBeInSet, {"value_set": [""]}, "flat_lead"),
        ("saturated_leads", gxe.ExpectColumnValuesToBeInSet, {"value_set": [""]}, "saturated_lead"),
        (
            "max_ptp_mv",
            gxe.ExpectColumnValuesToBeBetween,
            {"min_value": config.min_record_ptp_mv, "max_value": config.max_ptp_mv},
            "implausible_amplitude",
        ),
    ]
    for column, expectation, kwargs, reason in per_record:
        if column in columns:
            out.append(expectation(column=column, **kwargs, meta=meta(reason, False)))
    return out


def _context() -> Any:
    # GE reads this before the context exists: no usage statistics from machines without internet.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _run_suite(
    frame: pl.DataFrame, signals: np.ndarray | None, config: ValidationConfig, skip: set[str]
) -> tuple[list[ExpectationOutcome], dict[str, set[str]]]:
    # GE is imported here, not at module level: it takes seconds, and every Dagster process
    # importing the asset definitions would pay for it.
    import great_expectations as gx

    context = _context()
    source = context.data_sources.add_pandas("cohort")
    asset = source.add_dataframe_asset("cohort_table")
    batch_definition = asset.add_batch_definition_whole_dataframe("whole_cohort")
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame.to_pandas()})
    suite = gx.ExpectationSuite(name="ecg_r1_cohort")
    for expectation in _expectations(frame, signals, config, skip):
        suite.add_expectation(expectation)
    has_ids = "record_id" in frame.columns and "record_id" not in skip
    result_format: dict[str, Any] = {"result_format": "COMPLETE"}
    if has_ids:
        # Name failing rows by record id instead of pandas index.
        result_format["unexpected_index_column_names"] = ["record_id"]
    validation = batch.validate(suite, result_format=result_format)

    outcomes = []
    failing: dict[str, set[str]] = {}
    for item in validation.results:
        config_ = item.expectation_config
        meta = config_.meta or {}
        result = item.result or {}
        kwargs = {k: v for k, v in config_.kwargs.items() if k not in ("column", "batch_id")}
        error = None
        if item.exception_info and item.exception_info.get("raised_exception"):
            error = str(item.exception_info.get("exception_message"))
        observed = result.get("observed_value")
        if observed is None and not item.success:
            observed = [_plain(v) for v in (result.get("partial_unexpected_list") or [])[:5]]
        elif observed is not None and not item.success and isinstance(result.get("details"), dict):
            observed = {"observed": _plain(observed), "details": _plain(result["details"])}
        outcome = ExpectationOutcome(
            reason=meta.get("reason", config_.type),
            expectation=config_.type,
            column=config_.kwargs.get("column"),
            fatal=bool(meta.get("fatal", True)),
            success=bool(item.success),
            unexpected_count=int(result.get("unexpected_count") or 0),
            unexpected_percent=_plain(result.get("unexpected_percent")),
            observed=_plain(observed),
            kwargs=_plain(kwargs),
            error=error,
        )
        outcomes.append(outcome)
        if not item.success and has_ids:
            ids = {
                str(entry["record_id"])
                for entry in result.get("unexpected_index_list") or []
                if isinstance(entry, dict) and entry.get("record_id") is not None
            }
            if ids:
                failing.setdefault(outcome.reason, set()).update(ids)
    return outcomes, failing


def _plain(value: Any) -> Any:
    """Numpy scalars and containers to JSON-able Python values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and value != value:  # NaN is not valid JSON
        return None
    return value
