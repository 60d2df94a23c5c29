"""Ingest of the real shared records into a cohort folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ecg_r1.cli import main as cli_main
from ecg_r1.data.canonical import LEADS, N_SAMPLES
from ecg_r1.data.ingest import ingest
from ecg_r1.data.readers import read_record
from ecg_r1.data.readers.wfdb_write import write_record
from ecg_r1.data.signal_checks import signal_quality
from ecg_r1.data.store import COHORT_SCHEMA, open_signals, read_cohort, read_quarantine


@pytest.fixture(scope="module")
def shared_cohort(tmp_path_factory: pytest.TempPathFactory, ludb_dir: Path, cinc_dir: Path):
    out = tmp_path_factory.mktemp("cohort")
    return out, ingest([ludb_dir, cinc_dir], out)


class TestSharedRecords:
    def test_summary_adds_up(self, shared_cohort) -> None:
        out, summary = shared_cohort
        assert summary.records_in == 252  # 200 LUDB + 52 CinC
        assert summary.records_in == summary.loaded + sum(summary.quarantined.values())
        assert sum(summary.by_label.values()) == summary.loaded == sum(summary.by_hospital.values())
        assert json.loads((out / "summary.json").read_text()) == summary.to_dict()
        # Real faults in the shared data: JS20004/JS20008 have all-zero leads, LUDB 115 a clipped lead II,
        # E07510 is E07509 byte for byte (same .mat, same header comments) under its own patient id.
        quarantine = read_quarantine(out)
        assert dict(zip(quarantine["record_id"], quarantine["reason"], strict=True)) == {
            "ludb/115": "saturated_lead",
            "cinc2021/JS20004": "flat_lead",
            "cinc2021/JS20008": "flat_lead",
            "cinc2021/E07510": "duplicate_signal",
        }

    def test_cohort_table_and_signals_agree(self, shared_cohort, cinc_dir: Path) -> None:
        out, summary = shared_cohort
        cohort = read_cohort(out)
        assert dict(cohort.schema) == COHORT_SCHEMA
        assert cohort["record_id"].is_unique().all()
        assert cohort["row"].to_list() == list(range(summary.loaded))
        signals = open_signals(out)
        assert isinstance(signals, np.memmap) and signals.shape == (summary.loaded, len(LEADS), N_SAMPLES)
        row = cohort.filter(pl.col("record_id") == "cinc2021/E00666").to_dicts()[0]
        np.testing.assert_array_equal(signals[row["row"]], read_record(cinc_dir / "E00666.hea").signal)
        assert row["hospital"] == "cinc-georgia" and row["checksum"] and row["source_fs"] == 500.0
        # Every stored signal passes the checks that admitted it.
        quality = signal_quality(signals)
        assert quality["nan_samples"].sum() == 0 and (quality["flat_leads"] == "").all()

    def test_labels_by_source(self, shared_cohort) -> None:
        _, summary = shared_cohort
        ludb, cinc = summary.by_source["ludb"], summary.by_source["cinc"]
        assert ludb["records"] == 199 and ludb["ischemic"] == 51 and ludb["unknown"] == 7
        assert cinc["records"] == 49 and cinc["ischemic"] == 2
        assert summary.twi_cases == ludb["twi"] + cinc["twi"] > 0
        assert summary.twi_by_label["ischemic"] >= 1 and summary.twi_by_label["non-ischemic"] >= 1

    def test_ludb_twi_keeps_leads_and_codes(self, shared_cohort) -> None:
        out, _ = shared_cohort
        cohort = read_cohort(out)
        twi = cohort.filter(pl.col("twi") & (pl.col("source_format") == "ludb"))
        assert twi.height > 0
        assert twi["twi_leads"].str.split(",").list.len().min() >= 2
        assert twi["raw_codes"].str.contains("T-:").all()
        # A single inverted lead is kept in twi_leads but does not make a TWI case (min_leads 2).
        single = cohort.filter(~pl.col("twi") & pl.col("twi_leads").is_not_null())
        assert (single["twi_leads"].str.split(",").list.len() == 1).all()


def test_workers_give_the_same_cohort(cinc_dir: Path, tmp_path: Path) -> None:
    one = ingest([cinc_dir], tmp_path / "one", workers=1)
    two = ingest([cinc_dir], tmp_path / "two", workers=2)
    assert one.by_label == two.by_label and one.quarantined == two.quarantined
    assert read_cohort(tmp_path / "one").equals(read_cohort(tmp_path / "two"))
    np.testing.assert_array_equal(open_signals(tmp_path / "one"), open_signals(tmp_path / "two"))


def test_manifest_export(tmp_path: Path, cinc_dir: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    for suffix in (".hea", ".mat"):
        shutil.copy(cinc_dir / f"E07500{suffix}", export / f"E07500{suffix}")
    signal = read_record(cinc_dir / "E07500.hea").signal.T
    write_record(export / "sub" / "r2", signal, 500, LEADS)
    (export / "manifest.csv").write_text(
        "record_id,patient_id,hospital,signal_path,label,twi_leads,age,sex,note,ward\n"
        "A-1,P1,north,E07500.mat,non-ischemic,,64,F,chest pain 2 h; troponin negative,ED\n"
        'A-2,P2,north,sub/r2.hea,ischemic,"v4, V5",,male,,\n'
    )
    summary = ingest([export / "manifest.csv"], tmp_path / "out")
    assert summary.loaded == 2 and summary.extra_columns == {"ward": 1}
    cohort = read_cohort(tmp_path / "out").sort("record_id")
    first, second = cohort.to_dicts()
    assert first["source_format"] == "manifest" and first["hospital"] == "north"
    assert first["note"] == "chest pain 2 h; troponin negative" and first["sex"] == "F" and first["age"] == 64
    assert first["twi"] is True  # no twi column: a manifest is a TWI export by default (labels.yaml)
    assert json.loads(first["extra"]) == {"ward": "ED"} and second["extra"] is None
    assert second["twi_leads"] == "V4,V5" and second["label"] == "ischemic" and second["sex"] == "M"
    signals = open_signals(tmp_path / "out")
    np.testing.assert_allclose(signals[second["row"]], signals[first["row"]], atol=1e-3)


def test_cli_prints_summary_json_last(
    tmp_path: Path, cinc_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main(["ingest", str(cinc_dir), "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["records_in"] == 52 and printed["loaded"] == 49  # 2 flat, 1 duplicate
    assert printed["records_in"] == printed["loaded"] + sum(printed["quarantined"].values())
