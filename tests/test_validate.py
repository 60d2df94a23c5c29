"""The Great Expectations suite on the cohort (ecg_r1.data.expectations, ecg_r1.data.validate)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ecg_r1.data.canonical import FS, LEADS, N_SAMPLES
from ecg_r1.data.expectations import ValidationConfig
from ecg_r1.data.store import COHORT_FILE, COHORT_SCHEMA, QUARANTINE_SCHEMA, SignalWriter
from ecg_r1.data.validate import (
    VALIDATED_FILE,
    VALIDATION_QUARANTINE_FILE,
    ValidationResult,
    clear_validation,
    read_validated_cohort,
    read_validation,
    split_validated,
    validate_cohort,
    validate_cohort_dir,
)

HOSPITALS = ("hospital_a", "hospital_b", "hospital_c")


def ecg_like(rng: np.random.Generator) -> np.ndarray:
    """A plausible canonical signal: a QRS-like spike and a T wave every second on every lead, plus noise."""
    t = np.arange(N_SAMPLES) / FS
    phase = (t * rng.uniform(0.9, 1.3)) % 1.0
    beat = 1.2 * np.exp(-(((phase - 0.3) / 0.012) ** 2)) - 0.3 * np.exp(-(((phase - 0.6) / 0.05) ** 2))
    gains = rng.uniform(-1.0, 1.0, size=(len(LEADS), 1))
    noise = rng.normal(0, 0.01, size=(len(LEADS), N_SAMPLES))
    return (gains * beat + noise).astype(np.float32)


def write_cohort(folder: Path, n: int = 60, seed: int = 0, edit=None) -> pl.DataFrame:
    """Write a cohort folder (table + signals) the way ingest does; ``edit(i, row, signal)`` breaks records."""
    rng = np.random.default_rng(seed)
    rows = []
    with SignalWriter(folder) as writer:
        for i in range(n):
            hospital = HOSPITALS[i % len(HOSPITALS)]
            row = {
                "record_id": f"sim/{i:04d}",
                "patient_id": f"{hospital}/p{i:04d}",
                "hospital": hospital,
                "source_format": "manifest",
                "source_path": f"/data/{i:04d}.hea",
                "checksum": f"{i:064x}",
                "source_fs": 500.0,
                "source_gain": 1000.0,
                "derived_leads": "",
                "cropped_samples": 0,
                "padded_samples": 0,
                "age": float(rng.integers(20, 90)),
                "sex": "M" if i % 2 else "F",
                "note": "chest pain",
                "report": None,
                "raw_codes": "59931005",
                "twi": True,
                "twi_leads": "V1,V2",
                "label": "ischemic" if i % 3 else "non-ischemic",
            }
            signal = ecg_like(rng)
            if edit is not None:
                signal = edit(i, row, signal)
            row["row"] = writer.append(signal)
            rows.append(row)
    cohort = pl.DataFrame(rows, schema=COHORT_SCHEMA)
    cohort.write_parquet(folder / COHORT_FILE)
    return cohort


def break_records(i: int, row: dict, signal: np.ndarray) -> np.ndarray:
    """One defect a record for records 0..9; the rest stay sound."""
    if i == 0:
        row["age"] = 150.0
    elif i == 1:
        row["sex"] = "male"
    elif i == 2:
        row["label"] = "probably ischemic"
    elif i == 3:
        row["hospital"] = None
    elif i == 4:
        row["source_fs"] = 5.0
    elif i == 5:
        signal[2, 100:140] = np.nan
    elif i == 6:
        signal[7] = 0.0
    elif i == 7:
        signal[1] = np.clip(signal[1], -0.05, 0.05)  # clipped amplifier: plateaus at the limits
    elif i == 8:
        signal = signal * 1000.0  # µV read as mV
    elif i == 9:
        row["patient_id"] = "hospital_b/p0010"  # record 10's patient, seen at another hospital
        row["hospital"] = "hospital_a"
    return signal


EXPECTED_REASONS = {
    "sim/0000": "age_out_of_range",
    "sim/0001": "invalid_sex",
    "sim/0002": "invalid_label",
    "sim/0003": "missing_hospital",
    "sim/0004": "implausible_sampling_rate",
    "sim/0005": "nan_samples",
    "sim/0006": "flat_lead",
    "sim/0007": "saturated_lead",
    "sim/0008": "implausible_amplitude",
    "sim/0009": "patient_in_several_hospitals",
    "sim/0010": "patient_in_several_hospitals",
}


@pytest.fixture(scope="module")
def broken_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("broken")
    write_cohort(folder, edit=break_records)
    return folder


@pytest.fixture(scope="module")
def broken_result(broken_dir) -> ValidationResult:
    return validate_cohort_dir(broken_dir)


class TestSoundCohort:
    def test_sound_cohort_passes_everything(self, tmp_path):
        cohort = write_cohort(tmp_path, n=30)
        result = validate_cohort_dir(tmp_path)
        assert result.success and not result.fatal
        assert (result.n_records, result.n_passed, result.n_quarantined) == (30, 30, 0)
        assert result.failing_records == {}
        assert read_validated_cohort(tmp_path).equals(cohort)
        assert pl.read_parquet(tmp_path / VALIDATION_QUARANTINE_FILE).height == 0
        # every expectation of the suite ran, with the signal checks among them
        reasons = {o.reason for o in result.expectations}
        assert {
            "schema",
            "duplicate_record_id",
            "age_out_of_range",
            "flat_lead",
            "implausible_amplitude",
        } <= reasons


class TestPerRecordFailures:
    def test_each_defect_is_found_with_its_reason(self, broken_result):
        assert not broken_result.success
        assert not broken_result.fatal  # 11 of 60 < 25 %
        found = {record: reason for reason, ids in broken_result.failing_records.items() for record in ids}
        for record, reason in EXPECTED_REASONS.items():
            assert record in broken_result.failing_records[reason], (record, reason, found.get(record))
        assert broken_result.n_quarantined == len(EXPECTED_REASONS)
        assert broken_result.n_passed == 60 - len(EXPECTED_REASONS)

    def test_observed_values_are_reported(self, broken_result):
        age = next(o for o in broken_result.expectations if o.reason == "age_out_of_range")
        assert not age.success and age.unexpected_count == 1
        assert age.observed == [150.0]
        assert age.kwargs["max_value"] == 120.0

    def test_failures_go_to_quarantine_nothing_vanishes(self, broken_dir, broken_result):
        validated = pl.read_parquet(broken_dir / VALIDATED_FILE)
        quarantine = pl.read_parquet(broken_dir / VALIDATION_QUARANTINE_FILE)
        assert quarantine.schema == pl.Schema(QUARANTINE_SCHEMA)
        assert validated.height + quarantine.height == 60
        assert set(validated.get_column("record_id")).isdisjoint(set(quarantine.get_column("record_id")))
        reasons = dict(zip(quarantine.get_column("record_id"), quarantine.get_column("reason"), strict=True))
        assert reasons == EXPECTED_REASONS
        assert broken_result.quarantined_by_reason()["patient_in_several_hospitals"] == 2
        message = quarantine.filter(pl.col("record_id") == "sim/0000").get_column("message")[0]
        assert "[0, 120]" in message

    def test_report_round_trips_and_renders(self, broken_dir, broken_result):
        again = read_validation(broken_dir)
        assert again.failing_records == broken_result.failing_records
        assert again.n_quarantined == broken_result.n_quarantined
        markdown = broken_result.to_markdown()
        assert "| age_out_of_range |" in markdown and "11 quarantined" in markdown
        json.dumps(broken_result.to_dict())  # JSON-able for the Dagster UI

    def test_missing_age_and_sex_are_allowed(self, tmp_path):
        cohort = write_cohort(tmp_path, n=12)
        blanked = cohort.with_columns(pl.lit(None, dtype=pl.Float64).alias("age"), pl.lit(None).alias("sex"))
        result = validate_cohort(blanked, None)
        assert result.success, result.to_markdown()


class TestFatalFailures:
    def test_duplicate_record_ids_are_fatal_and_nothing_is_validated(self, tmp_path):
        def duplicate(i, row, signal):
            if i == 5:
                row["record_id"] = "sim/0004"
            return signal

        write_cohort(tmp_path, n=20, edit=duplicate)
        (tmp_path / VALIDATED_FILE).write_bytes(b"stale")
        result = validate_cohort_dir(tmp_path)
        assert result.fatal and "duplicate_record_id" in result.fatal_reasons
        assert result.failing_records["duplicate_record_id"] == ["sim/0004"]
        assert not (tmp_path / VALIDATED_FILE).exists(), "a stale validated table survived a fatal validation"
        with pytest.raises(RuntimeError, match="failed validation"):
            read_validated_cohort(tmp_path)

    def test_missing_schema_column_is_fatal(self, tmp_path):
        cohort = write_cohort(tmp_path, n=10).drop("label")
        result = validate_cohort(cohort, None)
        assert result.fatal and "schema" in result.fatal_reasons
        schema = next(o for o in result.expectations if o.reason == "schema")
        assert "label" in json.dumps(schema.observed)

    def test_uncastable_column_type_is_fatal(self, tmp_path):
        cohort = write_cohort(tmp_path, n=10).with_columns(pl.lit("forty").alias("age"))
        result = validate_cohort(cohort, None)
        assert result.fatal and "column_types" in result.fatal_reasons

    def test_row_outside_the_signal_array_is_fatal(self, tmp_path):
        write_cohort(tmp_path, n=10)
        cohort = pl.read_parquet(tmp_path / COHORT_FILE).with_columns(
            pl.when(pl.col("row") == 9).then(99).otherwise("row").alias("row")
        )
        from ecg_r1.data.store import open_signals

        result = validate_cohort(cohort, open_signals(tmp_path))
        assert result.fatal and "signal_index" in result.fatal_reasons

    def test_systematic_failure_is_fatal_not_quarantined(self, tmp_path):
        def microvolts(i, row, signal):
            return signal * 1000.0 if i % 2 else signal

        write_cohort(tmp_path, n=20, edit=microvolts)
        result = validate_cohort_dir(tmp_path, ValidationConfig(max_quarantine_fraction=0.25))
        assert result.fatal and result.fatal_reasons == ["too_many_quarantined"]
        assert result.n_quarantined == 10

    def test_empty_cohort_is_fatal(self):
        result = validate_cohort(pl.DataFrame(schema=COHORT_SCHEMA), np.zeros((0, 12, N_SAMPLES), np.float32))
        assert result.fatal and "empty_cohort" in result.fatal_reasons


class TestSplitValidated:
    def test_split_validated_keeps_row_order_and_columns(self, tmp_path):
        cohort = write_cohort(tmp_path, n=15, edit=break_records)
        result = validate_cohort(cohort, None)  # no signals: only table checks
        validated, quarantine = split_validated(cohort, result)
        assert validated.columns == cohort.columns
        assert validated.get_column("row").is_sorted()
        assert "sim/0005" in set(validated.get_column("record_id"))  # NaN signal not checked without signals
        assert "sim/0000" in set(quarantine.get_column("record_id"))


class TestFiles:
    def test_missing_cohort_says_to_ingest_first(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="ingest first"):
            validate_cohort_dir(tmp_path)

    def test_never_validated_cohort_says_what_to_materialize(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="materialize validated_cohort"):
            read_validated_cohort(tmp_path)

    def test_clear_validation_removes_every_output(self, tmp_path):
        write_cohort(tmp_path, n=6)
        validate_cohort_dir(tmp_path)
        clear_validation(tmp_path)
        assert not any(
            (tmp_path / name).exists()
            for name in (VALIDATED_FILE, VALIDATION_QUARANTINE_FILE, "validation.json")
        )
        assert (tmp_path / COHORT_FILE).exists()
