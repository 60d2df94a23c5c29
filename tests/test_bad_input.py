"""Bad input: every refused record is counted by reason, listed with its path and what to do,
and never stops the batch."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from ecg_r1.cli import main as cli_main
from ecg_r1.data.canonical import LEADS
from ecg_r1.data.ingest import ingest
from ecg_r1.data.readers.wfdb_write import write_record
from ecg_r1.data.store import open_signals, read_cohort, read_quarantine

FS = 500
N = 5000


def ecg(seed: int, n: int = N) -> np.ndarray:
    """A plausible 12-lead ECG in mV, shape (n, 12): P, QRS and T waves at 75 bpm plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / FS
    beat = np.zeros(n)
    for onset in np.arange(0.3, n / FS, 0.8):
        beat += 0.15 * np.exp(-(((t - onset + 0.16) / 0.02) ** 2))
        beat += 1.2 * np.exp(-(((t - onset) / 0.012) ** 2))
        beat += 0.3 * np.exp(-(((t - onset - 0.28) / 0.05) ** 2))
    scale = np.array([0.8, 1.0, 0.3, -0.9, 0.4, 0.6, -0.5, 0.7, 1.1, 1.3, 1.0, 0.8])
    return beat[:, None] * scale + rng.normal(0, 0.01, (n, 12))


def _cp1252_comment(header: Path, text: str) -> None:
    with header.open("ab") as handle:
        handle.write(f"# Hx: {text}\n".encode("cp1252"))


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("bad")
    wfdb_dir = root / "wfdb_export"
    good = write_record(
        wfdb_dir / "E90001", ecg(1), FS, LEADS, comments=["Age: 61", "Sex: Male", "Dx: 59931005"]
    )

    truncated = write_record(wfdb_dir / "E90002", ecg(2), FS, LEADS, comments=["Dx: 59931005"])
    data = truncated.with_suffix(".dat")
    data.write_bytes(data.read_bytes()[:-7])  # cut mid-frame, as an interrupted copy does

    short = write_record(wfdb_dir / "E90003", ecg(3), FS, LEADS)
    short.with_suffix(".dat").write_bytes(short.with_suffix(".dat").read_bytes()[: 4000 * 24])

    write_record(wfdb_dir / "E90004", ecg(4), FS, [*LEADS[:6], "X1", *LEADS[7:]])
    write_record(wfdb_dir / "E90005", ecg(5)[:, :11], FS, LEADS[:11])

    with_nan = ecg(6)
    with_nan[1000:1010, 2] = np.nan
    write_record(wfdb_dir / "E90006", with_nan, FS, LEADS)

    zero_lead = ecg(7)
    zero_lead[:, 8] = 0.0
    write_record(wfdb_dir / "E90007", zero_lead, FS, LEADS)

    gain = write_record(wfdb_dir / "E90008", ecg(8), FS, LEADS)
    gain.write_text(gain.read_text().replace(" 1000/mV ", " 1/mV "))  # 1000 times too small a gain

    latin = write_record(wfdb_dir / "E90009", ecg(9), FS, LEADS, comments=["Age: 70", "Dx: 426783006"])
    _cp1252_comment(latin, "Übelkeit, Brustschmerz seit 2 Std.")

    bad_line = write_record(wfdb_dir / "E90010", ecg(10), FS, LEADS)
    bad_line.write_bytes(bad_line.read_bytes().replace(b" V1\n", b" V1\xe9\n"))

    orphan = write_record(wfdb_dir / "E90011", ecg(11), FS, LEADS)
    orphan.with_suffix(".dat").unlink()

    export = root / "hospital_export"
    records = export / "records"
    for name in ("h1", "h2", "h3"):
        write_record(records / name, ecg(20 + len(name) + int(name[1])), FS, LEADS)
    rows = [
        # signal_path, record_id, patient_id, hospital, label, troponin (an extra column)
        ("records/h1.hea", "HX-1", "P1", "hospital-a", "ischemic", "0.9"),
        ("records/h2.hea", "HX-1", "P9", "hospital-a", "no", ""),  # repeated id
        ("records/h2.hea", "HX-2", "P2", "hospital-a", "no", ""),  # P2 in two hospitals
        ("records/h3.hea", "HX-3", "P2", "hospital-b", "yes", ""),
        ("../wfdb_export/E90001.hea", "HX-4", "P4", "hospital-a", "", ""),  # escapes the folder
        (str(good), "HX-5", "P5", "hospital-a", "", ""),  # absolute path
        ("records/h3.hea", "HX-6", "P6", "hospital-a", "maybe", ""),  # unreadable label
    ]
    export.mkdir(exist_ok=True)
    with (export / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["signal_path", "record_id", "patient_id", "hospital", "label", "troponin"])
        writer.writerows(rows)

    empty = root / "empty"
    empty.mkdir()
    out = root / "cohort"
    summary = ingest([wfdb_dir, export, empty, root / "not_there"], out)
    return out, summary


EXPECTED = {
    "truncated_signal": ("E90002", "copy it again"),
    "length_mismatch": ("E90003", "re-export"),
    "unknown_leads": ("E90004", "rename the leads"),
    "missing_leads": ("E90005", "rename the leads"),
    "nan_samples": ("E90006", "re-export"),
    "flat_lead": ("E90007", "re-record"),
    "implausible_amplitude": ("E90008", "check the ADC gain"),
    "bad_header": ("E90010", "re-export the header"),
    "missing_signal_file": ("E90011", "copy it beside the header"),
    "duplicate_record_id": ("HX-1", "rename one of them"),
    "path_escapes_folder": ("HX-4", "relative to"),
    "bad_manifest_row": ("HX-6", "fix the cell"),
    "empty_folder": ("empty", "point ingest at"),
    "missing_path": ("not_there", "check the path"),
}


class TestBadInputBatch:
    def test_every_reason_is_counted(self, bad_run) -> None:
        _, summary = bad_run
        expected = dict.fromkeys(EXPECTED, 1)
        expected.update(patient_in_two_hospitals=2, path_escapes_folder=2)
        assert summary.quarantined == expected
        assert summary.records_in == summary.loaded + sum(summary.quarantined.values())
        assert summary.loaded == 3  # E90001, E90009 (cp1252 comment), HX-1 from hospital-a

    @pytest.mark.parametrize("reason", sorted(EXPECTED))
    def test_quarantine_row_names_the_source_and_what_to_do(self, bad_run, reason: str) -> None:
        out, _ = bad_run
        rows = read_quarantine(out).filter(read_quarantine(out)["reason"] == reason).to_dicts()
        needle, advice = EXPECTED[reason]
        assert rows, reason
        assert any(needle in (row["source_path"] or "") + (row["record_id"] or "") for row in rows)
        assert all(row["source_path"] for row in rows)
        assert any(advice in row["message"] for row in rows), rows[0]["message"]

    def test_patient_in_two_hospitals_refuses_both(self, bad_run) -> None:
        out, _ = bad_run
        quarantine = read_quarantine(out)
        rows = quarantine.filter(quarantine["reason"] == "patient_in_two_hospitals")
        assert sorted(rows["record_id"]) == ["HX-2", "HX-3"]
        assert "hospital-a" in rows["message"][0] and "hospital-b" in rows["message"][0]

    def test_non_utf8_comment_is_read_not_lost(self, bad_run) -> None:
        out, _ = bad_run
        cohort = read_cohort(out)
        row = cohort.filter(cohort["record_id"].str.ends_with("E90009")).to_dicts()[0]
        assert row["note"] == "History: Übelkeit, Brustschmerz seit 2 Std."
        assert row["age"] == 70.0 and row["label"] == "non-ischemic"

    def test_loaded_records_are_intact(self, bad_run) -> None:
        out, _ = bad_run
        cohort = read_cohort(out)
        signals = open_signals(out)
        assert signals.shape == (cohort.height, 12, N)
        assert sorted(cohort["row"]) == list(range(cohort.height))
        manifest_row = cohort.filter(cohort["record_id"] == "HX-1").to_dicts()[0]
        assert manifest_row["label"] == "ischemic" and manifest_row["twi"] is True
        assert json.loads(manifest_row["extra"]) == {"troponin": "0.9"}
        np.testing.assert_allclose(signals[manifest_row["row"]], ecg(23).T, atol=1e-3)


class TestWholeInputFailures:
    def test_manifest_without_required_columns(self, tmp_path: Path) -> None:
        (tmp_path / "manifest.csv").write_text("path,id\nrecords/a.hea,1\n")
        summary = ingest([tmp_path], tmp_path / "out")
        assert summary.quarantined == {"bad_manifest": 1} and summary.records_in == 1
        message = read_quarantine(tmp_path / "out")["message"][0]
        assert "signal_path" in message and "Required" in message

    def test_cli_exits_2_when_nothing_loads_and_prints_summary_last(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        (tmp_path / "empty").mkdir()
        code = cli_main(["ingest", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--no-progress"])
        assert code == 2
        summary = json.loads(capsys.readouterr().out)
        assert summary["records_in"] == 1 and summary["quarantined"] == {"empty_folder": 1}
        assert summary["loaded"] == 0 and open_signals(tmp_path / "out").shape == (0, 12, N)
