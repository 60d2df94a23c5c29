"""The Great Expectations suite that checks a cohort: what it expects of the table and the
signals, and what it found.

Takes: a cohort table (:data:`ecg_r1.data.store.COHORT_SCHEMA`), its signal array (or None) and
the thresholds (:class:`ValidationConfig`). Gives (:func:`run_suite`): one
:class:`ExpectationOutcome` per expectation (``reason`` its quarantine or failure key,
``fatal`` whether a failure stops the cohort) and, per reason, the ids of the records failing it.
Which failures are fatal, how many refusals are too many and what is written are
:mod:`ecg_r1.data.validate`'s.

The suite runs on the cohort table (polars, converted to pandas for GE 1.x) joined with two kinds
of per-record helper columns:

* ``patient_hospitals``: the number of hospitals the record's patient occurs in;
* the signal measures of :func:`ecg_r1.data.signal_checks.signal_quality` (NaN samples, flat and
  saturated leads, largest amplitude), computed chunk by chunk over the memory-mapped signals.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from ecg_r1.data.canonical import FS, MIN_DURATION_S, N_SAMPLES
from ecg_r1.data.labels import LABELS
from ecg_r1.data.signal_checks import MAX_PTP_MV, MIN_RECORD_PTP_MV, signal_quality
from ecg_r1.data.store import COHORT_SCHEMA


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


def run_suite(
    cohort: pl.DataFrame, signals: np.ndarray | None, config: ValidationConfig
) -> tuple[list[ExpectationOutcome], dict[str, set[str]]]:
    """Run the suite on a cohort table and its signals.

    Columns whose type cannot be cast to the schema's are reported as one fatal ``column_types``
    outcome (first in the list) and left out of the expectations.

    Args:
        cohort: the cohort table.
        signals: its signal array (n, 12, 5000); None skips the signal checks (and the ``row``
            bound).
        config: the thresholds.

    Returns:
        ``(outcomes, failing)``: every expectation's outcome, and per reason the record ids that
        failed it.
    """
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
    suite_outcomes, failing = _run_expectations(frame, signals, config, skip=set(type_problems))
    outcomes.extend(suite_outcomes)
    return outcomes, failing


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
    """The suite's expectations on the columns ``frame`` has (less ``skip``): the table's fatal
    ones first, then one per per-record rule (a failing record is quarantined)."""
    import great_expectations.expectations as gxe

    columns = set(frame.columns) - skip
    out = _table_expectations(gxe, columns, signals)
    for column, expectation, kwargs, reason in _record_rules(gxe, config):
        if column in columns:
            out.append(expectation(column=column, **kwargs, meta=_meta(reason, False)))
    return out


def _meta(reason: str, fatal: bool) -> dict[str, Any]:
    """An expectation's meta: its quarantine / failure key and whether a failure stops the cohort."""
    return {"reason": reason, "fatal": fatal}


def _table_expectations(gxe: Any, columns: set[str], signals: np.ndarray | None) -> list[Any]:
    """The fatal expectations on the table as a whole: schema, rows, unique record ids and signal rows."""
    out: list[Any] = [
        gxe.ExpectTableColumnsToMatchSet(
            column_set=list(COHORT_SCHEMA), exact_match=False, meta=_meta("schema", True)
        ),
        gxe.ExpectTableRowCountToBeBetween(min_value=1, meta=_meta("empty_cohort", True)),
    ]
    if "record_id" in columns:
        out += [
            gxe.ExpectColumnValuesToNotBeNull(column="record_id", meta=_meta("missing_record_id", True)),
            gxe.ExpectColumnValuesToBeUnique(column="record_id", meta=_meta("duplicate_record_id", True)),
        ]
    if "row" in columns:
        out += [
            gxe.ExpectColumnValuesToNotBeNull(column="row", meta=_meta("signal_index", True)),
            gxe.ExpectColumnValuesToBeUnique(column="row", meta=_meta("signal_index", True)),
        ]
        if signals is not None:
            out.append(
                gxe.ExpectColumnValuesToBeBetween(
                    column="row",
                    min_value=0,
                    max_value=max(len(signals) - 1, 0),
                    meta=_meta("signal_index", True),
                )
            )
    return out


def _record_rules(gxe: Any, config: ValidationConfig) -> list[tuple[str, Any, dict[str, Any], str]]:
    """The per-record rules: (column, expectation class, its arguments, quarantine reason)."""
    return [
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


def _run_expectations(
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
