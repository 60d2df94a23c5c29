"""Hostile input: a record never reads outside the folder the user named, never opens anything but
a regular file, never echoes a file's contents, and the rest of the batch still loads."""

from __future__ import annotations

import csv
import os
import pickle
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_bad_input import FS, ecg

from ecg_r1.canonical import LEADS
from ecg_r1.cli import main as cli_main
from ecg_r1.ingest import ingest
from ecg_r1.labels import label_cinc, label_ptbxl, load_rules, parse_dx
from ecg_r1.readers.wfdb_io import write_record
from ecg_r1.store import read_cohort, read_quarantine

SECRET = "SECRET-LINE do not copy me"


@pytest.fixture
def no_hang() -> Iterator[None]:
    """Turn a hang (a FIFO opened for reading waits for a writer) into a failure."""

    def fail(*_: object) -> None:
        raise TimeoutError("ingest hung")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the input holding what must never be read: a text file and a signal file."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_text(SECRET + "\n")
    write_record(folder / "stolen", ecg(99), FS, LEADS)
    return folder


def _reasons(out: Path) -> dict[str, str]:
    """record id (or source path) -> quarantine reason."""
    rows = read_quarantine(out).to_dicts()
    return {(row["record_id"] or row["source_path"]).split("/")[-1]: row["reason"] for row in rows}


def _assert_never_echoed(out: Path) -> None:
    messages = " ".join(read_quarantine(out)["message"].to_list())
    assert "SECRET" not in messages


class TestConfinement:
    def test_header_naming_a_file_outside_is_refused_unread(self, tmp_path: Path, outside: Path) -> None:
        folder = tmp_path / "export"
        write_record(folder / "E1", ecg(1), FS, LEADS)
        for name, target in (("E2", str(outside / "stolen.dat")), ("E3", "../outside/stolen.dat")):
            header = write_record(folder / name, ecg(2), FS, LEADS)
            header.write_text(header.read_text().replace(f"{name}.dat ", f"{target} "))
        summary = ingest([folder], tmp_path / "out", workers=1)
        assert _reasons(tmp_path / "out") == {"E2": "path_escapes_folder", "E3": "path_escapes_folder"}
        assert summary.loaded == 1 and summary.records_in == 3
        _assert_never_echoed(tmp_path / "out")

    def test_links_pointing_outside_are_not_followed(self, tmp_path: Path, outside: Path) -> None:
        folder = tmp_path / "export"
        write_record(folder / "E1", ecg(1), FS, LEADS)
        (folder / "E2.hea").symlink_to(outside / "secret.txt")  # its first line would be echoed
        (folder / "E3.hea").symlink_to("/dev/zero")  # would read until memory runs out
        linked = write_record(folder / "E4", ecg(4), FS, LEADS)
        linked.with_suffix(".dat").unlink()
        linked.with_suffix(".dat").symlink_to(outside / "stolen.dat")
        summary = ingest([folder], tmp_path / "out", workers=1)
        assert _reasons(tmp_path / "out") == {
            "E2": "path_escapes_folder",
            "E3": "path_escapes_folder",
            "E4": "path_escapes_folder",
        }
        assert summary.loaded == 1
        _assert_never_echoed(tmp_path / "out")

    def test_links_inside_the_folder_are_read(self, tmp_path: Path) -> None:
        folder = tmp_path / "export"
        write_record(folder / "store" / "X1", ecg(1), FS, LEADS)
        (folder / "E5.hea").symlink_to(folder / "store" / "X1.hea")  # names X1.dat, beside the link
        (folder / "X1.dat").symlink_to(folder / "store" / "X1.dat")
        summary = ingest([folder], tmp_path / "out", workers=1)
        assert summary.loaded == 2 and summary.quarantined == {}

    def test_manifest_row_inside_whose_header_points_outside_is_refused(
        self, tmp_path: Path, outside: Path
    ) -> None:
        export = tmp_path / "export"
        header = write_record(export / "records" / "h1", ecg(1), FS, LEADS)
        header.write_text(header.read_text().replace("h1.dat ", "../../outside/stolen.dat "))
        write_record(export / "records" / "h2", ecg(2), FS, LEADS)
        with (export / "manifest.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["signal_path", "record_id", "patient_id", "hospital"])
            writer.writerows([("records/h1.hea", "H1", "P1", "a"), ("records/h2.hea", "H2", "P2", "a")])
        summary = ingest([export], tmp_path / "out", workers=1)
        assert _reasons(tmp_path / "out") == {"H1": "path_escapes_folder"}
        assert read_cohort(tmp_path / "out")["record_id"].to_list() == ["H2"]
        assert summary.records_in == 2

    def test_fifo_header_is_refused_not_waited_on(self, tmp_path: Path, no_hang: None) -> None:
        folder = tmp_path / "export"
        write_record(folder / "E1", ecg(1), FS, LEADS)
        os.mkfifo(folder / "E2.hea")
        fifo_signal = write_record(folder / "E3", ecg(3), FS, LEADS).with_suffix(".dat")
        fifo_signal.unlink()
        os.mkfifo(fifo_signal)
        summary = ingest([folder], tmp_path / "out", workers=1)
        assert _reasons(tmp_path / "out") == {"E2": "not_a_regular_file", "E3": "not_a_regular_file"}
        assert summary.loaded == 1

    def test_messages_never_quote_the_file(self, tmp_path: Path) -> None:
        """A header may be any file someone copied in (hard links cannot be told apart): a message
        names the line that is wrong, never repeats it."""
        folder = tmp_path / "export"
        write_record(folder / "E1", ecg(1), FS, LEADS)
        (folder / "E2.hea").write_text(f"{SECRET}\n")
        (folder / "E3.hea").write_text(f"E3 1 500 5000\nE3.dat 16 {SECRET} 16 0\n")
        (folder / "E4.hea").write_text(f"E4 1 500 5000\nE4.dat 16 200/mV 16 0 0 0 0 {SECRET}é\n")
        ingest([folder], tmp_path / "out", workers=1)
        assert set(_reasons(tmp_path / "out").values()) == {"bad_header"}
        _assert_never_echoed(tmp_path / "out")


class _Payload:
    """Unpickling this runs a command: what a crafted ``feature_baseline.pkl`` would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


class TestNoCodeFromData:
    @pytest.mark.parametrize("name", ["feature_baseline.pkl", "feature_baseline.parquet"])
    def test_baselines_folder_cannot_run_code(self, tmp_path: Path, name: str) -> None:
        from ecg_r1.comparison import MAJORITY_FILE, ReferenceBaselines

        marker = tmp_path / "ran"
        folder = tmp_path / "baselines"
        folder.mkdir()
        (folder / MAJORITY_FILE).write_text('{"prevalence": 0.4, "answer": false}')
        (folder / name).write_bytes(pickle.dumps(_Payload(marker)))
        with pytest.raises((FileNotFoundError, ValueError, OSError)):
            ReferenceBaselines.load(folder)
        assert not marker.exists()

    @pytest.mark.parametrize("model", ["models:/ecg-r1-grpo", "models:/ecg-r1-grpo/1"])
    def test_predict_with_a_bad_model_creates_no_store(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str
    ) -> None:
        header = write_record(tmp_path / "rec" / "E1", ecg(1), FS, LEADS)
        monkeypatch.chdir(tmp_path)
        with pytest.raises(SystemExit) as exc:
            cli_main(["predict", str(header), "--model", model, "--mlflow-root", str(tmp_path)])
        assert "URI" in str(exc.value) or "no MLflow store" in str(exc.value)
        assert not (tmp_path / "mlflow").exists()


class TestLabelsOnlyFromUnderstoodCodes:
    @pytest.mark.parametrize(
        ("dx", "label", "twi"),
        [
            ("Unknown", "unknown", False),
            ("NaN", "unknown", False),
            ("chest pain, see report", "unknown", False),
            ("123456789", "unknown", False),  # digits, but no SNOMED CT id (check digit)
            ("164934002 426783006", "non-ischemic", True),  # space-separated codes
            ("59931005 (T wave inversion)", "non-ischemic", True),  # a code with a comment
            ("59931005,Unknown", "non-ischemic", True),
        ],
    )
    def test_snomed_dialect(self, dx: str, label: str, twi: bool) -> None:
        decision = label_cinc(parse_dx(dx), load_rules())
        assert (decision.label, decision.twi) == (label, twi)

    @pytest.mark.parametrize(
        ("dx", "label", "twi"),
        [
            ("STD", "ischemic", False),  # ST depression: ischemic by the project's rules
            ("std", "ischemic", False),
            ("STE", "unknown", False),
            ("RBBB", "non-ischemic", False),
            ("I-AVB,PVC", "non-ischemic", False),
            ("Normal", "non-ischemic", False),
            ("PR", "unknown", False),  # pacing rhythm
            ("TInv,STD", "ischemic", True),
        ],
    )
    def test_cpsc_abbreviation_dialect(self, dx: str, label: str, twi: bool) -> None:
        decision = label_cinc(parse_dx(dx), load_rules())
        assert (decision.label, decision.twi, decision.unrecognised) == (label, twi, ())

    def test_ptbxl_statement_outside_the_table_is_not_understood(self, tmp_path: Path) -> None:
        table = tmp_path / "scp_statements.csv"
        table.write_text(",diagnostic_class\nNORM,NORM\nIMI,MI\nINVT,\n")
        rules = load_rules().with_ptbxl_statements(table)
        decision = label_ptbxl({"XYZ": 100.0}, rules)
        assert (decision.label, decision.unrecognised) == ("unknown", ("XYZ",))
        assert label_ptbxl({"XYZ": 100.0, "NORM": 100.0}, rules).label == "non-ischemic"

    def test_ingest_counts_unrecognised_codes(self, tmp_path: Path) -> None:
        folder = tmp_path / "cpsc"
        for name, dx in (("A1", "Unknown"), ("A2", "NaN"), ("A3", "STD"), ("A4", "Unknown,59931005")):
            write_record(folder / name, ecg(int(name[1])), FS, LEADS, comments=[f"Dx: {dx}"])
        summary = ingest([folder], tmp_path / "out", workers=1)
        assert summary.unrecognised_codes == {"Unknown": 2, "NaN": 1}
        labels = dict(read_cohort(tmp_path / "out").select("record_id", "label").iter_rows())
        assert labels == {
            "cpsc/A1": "unknown",
            "cpsc/A2": "unknown",
            "cpsc/A3": "ischemic",
            "cpsc/A4": "non-ischemic",
        }
