"""Hostile input: a record never reads outside the folder the user named, never opens anything but
a regular file, never echoes a file's contents, and the rest of the batch still loads."""

from __future__ import annotations

import codecs
import csv
import os
import pickle
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_bad_input import FS, ecg

from ecg_r1.cli import main as cli_main
from ecg_r1.data.canonical import LEADS
from ecg_r1.data.ingest import ingest
from ecg_r1.data.labels import label_cinc, label_ptbxl, load_rules, parse_dx
from ecg_r1.data.readers.wfdb_write import write_record
from ecg_r1.data.store import open_signals, read_cohort, read_quarantine

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
        write_record(folder / "store" / "E5", ecg(1), FS, LEADS)
        (folder / "E5.hea").symlink_to(folder / "store" / "E5.hea")
        (folder / "E5.dat").symlink_to(folder / "store" / "E5.dat")
        summary = ingest([folder], tmp_path / "out", workers=1)
        # The link is read (the original, the same record id, comes second and is the duplicate).
        assert summary.loaded == 1 and summary.quarantined == {"duplicate_record_id": 1}
        assert read_cohort(tmp_path / "out")["source_path"].to_list() == [str(folder / "E5.dat")]

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
        from ecg_r1.evaluation.references import MAJORITY_FILE, ReferenceBaselines

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


def _manifest(folder: Path, lines: list[str], n_records: int = 3) -> Path:
    """A manifest folder with records r0..r{n-1} and the given CSV lines after the header."""
    for index in range(n_records):
        write_record(folder / f"r{index}", ecg(index), FS, LEADS)
    text = "signal_path,record_id,patient_id,hospital,note\n" + "".join(line + "\n" for line in lines)
    (folder / "manifest.csv").write_text(text)
    return folder


class TestRobustParsing:
    def test_huge_cell_and_unterminated_quote_cost_one_row_each(self, tmp_path: Path) -> None:
        export = _manifest(
            tmp_path / "export",
            [
                "r0.hea,R0,P0,a,fine",
                f"r1.hea,R1,P1,a,{'x' * 200_000}",  # over the csv module's field limit
                'r2.hea,R2,P2,a,"a quote never closed',
                "r2.hea,R3,P3,a,swallowed before: read now",
            ],
        )
        summary = ingest([export], tmp_path / "out", workers=1)
        assert summary.quarantined == {"bad_manifest_row": 2}
        assert sorted(read_cohort(tmp_path / "out")["record_id"]) == ["R0", "R3"]
        assert summary.records_in == 4

    def test_non_utf8_manifest_names_the_file(self, tmp_path: Path) -> None:
        export = _manifest(tmp_path / "export", ["r0.hea,R0,P0,a,Übelkeit"])
        path = export / "manifest.csv"
        path.write_bytes(path.read_text().encode("cp1252"))
        ingest([export], tmp_path / "out", workers=1)
        [message] = read_quarantine(tmp_path / "out")["message"].to_list()
        assert str(path) in message and "not UTF-8" in message

    def test_bom_in_manifest_and_header_is_accepted(self, tmp_path: Path) -> None:
        export = _manifest(tmp_path / "export", ["r0.hea,R0,P0,a,"], n_records=1)
        for path in (export / "manifest.csv", export / "r0.hea"):
            path.write_bytes(codecs.BOM_UTF8 + path.read_bytes())
        summary = ingest([export], tmp_path / "out", workers=1)
        assert summary.loaded == 1, read_quarantine(tmp_path / "out")["message"].to_list()

    @pytest.mark.parametrize(
        ("edit", "reason"),
        [
            (lambda h: h.replace(f" {FS} ", " 0.5 ", 1), "implausible_rate"),
            (lambda h: h.replace(f" {FS} 5000", " 1e-5 5000", 1), "implausible_rate"),
            (lambda h: h.replace(f" {FS} 5000", f" {FS} 1000000000", 1), "record_too_large"),
            (lambda h: h.replace(".dat 16 ", ".dat 0 "), "unsupported_format"),
            (lambda h: h.replace(".dat 16 ", ".dat 999 "), "unsupported_format"),
            (lambda h: h.replace(" aVR\n", " I\n"), "duplicate_leads"),
        ],
        ids=["fs-0.5", "fs-1e-5", "1e9-samples", "format-0", "format-999", "lead-I-twice"],
    )
    def test_implausible_header_is_refused_with_its_reason(self, tmp_path: Path, edit, reason: str) -> None:
        folder = tmp_path / "export"
        write_record(folder / "E1", ecg(1), FS, LEADS)
        header = write_record(folder / "E2", ecg(2), FS, LEADS)
        header.write_text(edit(header.read_text()))
        summary = ingest([folder], tmp_path / "out", workers=1)
        assert _reasons(tmp_path / "out") == {"E2": reason}
        assert summary.loaded == 1

    def test_orphan_dat_and_folder_named_like_a_header_are_counted(self, tmp_path: Path) -> None:
        folder = tmp_path / "export"
        write_record(folder / "E1", ecg(1), FS, LEADS)
        write_record(folder / "E2", ecg(2), FS, LEADS).unlink()
        (folder / "E3.hea").mkdir()
        summary = ingest([folder], tmp_path / "out", workers=1)
        assert _reasons(tmp_path / "out") == {"E2": "missing_header", "E3": "not_a_regular_file"}
        assert summary.records_in == 3 and summary.loaded == 1


class TestUnits:
    """Voltages are converted from the units a header names; units that are no known voltage are
    refused (a scale guessed as mV would load confident, wrong voltages)."""

    @staticmethod
    def _with_units(header: Path, units: str, lead: str | None = None) -> None:
        lines = header.read_text().splitlines()
        for number, line in enumerate(lines[1:], start=1):
            if lead is None or line.endswith(f" {lead}"):
                lines[number] = line.replace("/mV ", f"/{units} ")
        header.write_text("\n".join(lines) + "\n")

    @pytest.mark.parametrize("units", ["mmHg", "counts", "mV2", "%"])
    def test_unknown_units_on_a_lead_are_quarantined(self, tmp_path: Path, units: str) -> None:
        folder = tmp_path / "export"
        write_record(folder / "E1", ecg(1), FS, LEADS)
        self._with_units(write_record(folder / "E2", ecg(2), FS, LEADS), units, lead="V3")
        summary = ingest([folder], tmp_path / "out", workers=1)
        assert _reasons(tmp_path / "out") == {"E2": "unknown_units"}
        assert "signal line 9" in read_quarantine(tmp_path / "out")["message"][0]
        assert summary.records_in == summary.loaded + 1 == 2

    @pytest.mark.parametrize(
        ("units", "gain_factor"), [("uV", 1e-3), ("microvolts", 1e-3), ("V", 1e3), ("Millivolts", 1)]
    )
    def test_known_units_are_converted(self, tmp_path: Path, units: str, gain_factor: float) -> None:
        folder = tmp_path / "export"
        signal = ecg(1)
        # The same digital values at a gain per `units` that describes the same voltages.
        header = write_record(folder / "E1", signal, FS, LEADS)
        header.write_text(header.read_text().replace(" 1000/mV ", f" {1000 * gain_factor:g}/{units} "))
        ingest([folder], tmp_path / "out", workers=1)
        stored = open_signals(tmp_path / "out")[0]
        np.testing.assert_allclose(stored, signal.T.astype(np.float32), atol=1e-3)

    def test_other_channel_in_other_units_is_ignored(self, tmp_path: Path) -> None:
        folder = tmp_path / "export"
        pressure = np.full((len(ecg(1)), 1), 0.1)
        header = write_record(folder / "E1", np.hstack([ecg(1), pressure]), FS, [*LEADS, "ABP"])
        self._with_units(header, "mmHg", lead="ABP")
        summary = ingest([folder], tmp_path / "out", workers=1)
        assert summary.loaded == 1 and summary.quarantined == {}


class TestDuplicateSignals:
    @pytest.mark.parametrize("workers", [1, 2])
    def test_same_signal_under_another_patient_or_hospital_is_quarantined(
        self, tmp_path: Path, workers: int, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import ecg_r1.data.record_loader as record_loader

        monkeypatch.setattr(record_loader, "CHUNK_SIZE", 1)  # the first record must win across workers
        export = _manifest(
            tmp_path / "export",
            [
                "r0.hea,A1,P1,a,",
                "r1.hea,A2,P2,a,",
                "copy.hea,B1,P9,b,",  # r0's bytes under another name, patient and hospital
                "r0.hea,B2,P8,b,",  # r0's file itself under another patient and hospital
                "r1.hea,A3,P2,a,",  # the same patient's record exported twice
            ],
            n_records=2,
        )
        write_record(export / "copy", ecg(0), FS, LEADS)
        summary = ingest([export], tmp_path / "out", workers=workers)
        assert read_cohort(tmp_path / "out")["record_id"].to_list() == ["A1", "A2"]
        quarantine = read_quarantine(tmp_path / "out").sort("record_id")
        assert quarantine["reason"].to_list() == ["duplicate_signal"] * 3
        first = dict(zip(quarantine["record_id"], quarantine["message"], strict=True))
        assert "'A1'" in first["B1"] and "'A1'" in first["B2"] and "'A2'" in first["A3"]
        assert "another patient" in first["B1"] and "same patient" in first["A3"]
        assert summary.quarantined == {"duplicate_signal": 3}
        assert summary.records_in == summary.loaded + 3 == 5


def _pack_212(samples: np.ndarray) -> bytes:
    """12-bit samples (even count) in WFDB format 212: two samples in three bytes."""
    unsigned = samples.astype(np.int64) & 0xFFF
    first, second = unsigned[0::2], unsigned[1::2]
    packed = np.stack([first & 0xFF, (first >> 8) | ((second >> 8) << 4), second & 0xFF], axis=1)
    return packed.astype(np.uint8).tobytes()


class TestImplausibleSignals:
    RNG = np.random.default_rng(0)

    @pytest.mark.parametrize(
        ("fmt", "gain", "data"),
        [
            # Without each format's missing-sample marker (-2048, -32768): refused as missing
            # samples before this check.
            (212, 200, _pack_212(RNG.integers(-2047, 2048, 5000 * 12))),
            (16, 4000, RNG.integers(-32767, 32768, 5000 * 12).astype("<i2").tobytes()),
        ],
        ids=["format-212", "format-16"],  # gains that put the noise in a plausible mV range
    )
    def test_random_bytes_are_refused_as_no_ecg(
        self, tmp_path: Path, fmt: int, gain: int, data: bytes
    ) -> None:
        folder = tmp_path / "export"
        write_record(folder / "E1", ecg(1), FS, LEADS)
        header = write_record(folder / "E2", ecg(2), FS, LEADS)
        header.write_text(header.read_text().replace(".dat 16 1000/mV 16 ", f".dat {fmt} {gain}/mV 12 "))
        header.with_suffix(".dat").write_bytes(data)
        summary = ingest([folder], tmp_path / "out", workers=1)
        assert _reasons(tmp_path / "out") == {"E2": "no_ecg_structure"}
        assert summary.loaded == 1 and summary.records_in == 2

    @pytest.mark.parametrize("fs", [50, 100, 160])
    def test_noise_sampled_slowly_is_refused_as_no_ecg(self, tmp_path: Path, fs: int) -> None:
        # Smooth once resampled to 500 Hz: the lag-1 test passes it, the QRS structure test does not.
        folder = tmp_path / "export"
        write_record(folder / "E1", ecg(1), FS, LEADS)
        write_record(folder / "E2", self.RNG.normal(0, 0.3, (10 * fs, 12)), fs, LEADS)
        summary = ingest([folder], tmp_path / "out", workers=1)
        assert _reasons(tmp_path / "out") == {"E2": "no_ecg_structure"}
        assert "no QRS complexes" in read_quarantine(tmp_path / "out")["message"][0]
        assert summary.loaded == 1 and summary.records_in == 2

    def test_smoothed_noise_is_refused_as_no_ecg(self, tmp_path: Path) -> None:
        from scipy.signal import butter, lfilter

        folder = tmp_path / "export"
        write_record(folder / "E1", ecg(1), FS, LEADS)
        b, a = butter(4, 20 / (FS / 2))
        write_record(folder / "E2", lfilter(b, a, self.RNG.normal(0, 1, (5000, 12)), axis=0), FS, LEADS)
        ingest([folder], tmp_path / "out", workers=1)
        assert _reasons(tmp_path / "out") == {"E2": "no_ecg_structure"}

    def test_rate_declared_ten_times_too_low_is_refused(self, tmp_path: Path) -> None:
        # 500 Hz samples declared as 50 Hz: 1 s of ECG stretched over 10 s (one or two beats).
        folder = tmp_path / "export"
        write_record(folder / "E1", ecg(1), FS, LEADS)
        write_record(folder / "E2", ecg(2), 50, LEADS)
        summary = ingest([folder], tmp_path / "out", workers=1)
        assert _reasons(tmp_path / "out") == {"E2": "implausible_rate"}
        assert "sampling rate" in read_quarantine(tmp_path / "out")["message"][0]
        assert summary.loaded == 1

    def test_rate_declared_ten_times_too_high_leaves_too_short_a_record(self, tmp_path: Path) -> None:
        folder = tmp_path / "export"
        write_record(folder / "E1", ecg(1), FS, LEADS)
        write_record(folder / "E2", ecg(2), 5000, LEADS)  # 10 s of samples read as 1 s
        ingest([folder], tmp_path / "out", workers=1)
        assert _reasons(tmp_path / "out") == {"E2": "too_short"}

    def test_no_real_record_is_refused_by_the_plausibility_checks(
        self, ludb_dir: Path, cinc_dir: Path, tmp_path: Path
    ) -> None:
        summary = ingest([ludb_dir, cinc_dir], tmp_path / "out", workers=2)
        # The known faults of the shared copies: LUDB 115 clipped, two CinC records with empty leads,
        # CinC E07510 a byte copy of E07509.
        assert summary.quarantined == {"duplicate_signal": 1, "flat_lead": 2, "saturated_lead": 1}


class TestMatlabSignals:
    @staticmethod
    def _record_with_mat(folder: Path, name: str) -> Path:
        """A record whose header names ``NAME.mat`` (written by the test) instead of its .dat."""
        header = write_record(folder / name, ecg(1), FS, LEADS)
        header.with_suffix(".dat").unlink()
        header.write_text(header.read_text().replace(f"{name}.dat ", f"{name}.mat "))
        return header.with_suffix(".mat")

    def test_complex_and_non_finite_signals_are_refused(self, tmp_path: Path) -> None:
        from scipy.io import savemat

        folder = tmp_path / "export"
        write_record(folder / "E1", ecg(1), FS, LEADS)
        val = np.round(ecg(2).T * 1000)
        savemat(self._record_with_mat(folder, "E2"), {"val": val + 1j * val})
        savemat(self._record_with_mat(folder, "E3"), {"val": np.full((12, 5000), np.inf)})
        summary = ingest([folder], tmp_path / "out", workers=1)
        assert _reasons(tmp_path / "out") == {"E2": "complex_signal", "E3": "nan_samples"}
        quarantine = read_quarantine(tmp_path / "out")
        assert "not finite" in quarantine.filter(quarantine["reason"] == "nan_samples")["message"][0]
        assert summary.loaded == 1

    def test_compressed_matrix_expansion_is_bounded(self, tmp_path: Path) -> None:
        """A small file whose compressed element expands to 150 MB is refused before it is expanded."""
        import struct
        import zlib

        folder = tmp_path / "export"
        write_record(folder / "E1", ecg(1), FS, LEADS)
        packer = zlib.compressobj(9)
        chunk = bytes(1 << 20)
        body = b"".join(packer.compress(chunk) for _ in range(150)) + packer.flush()
        header = b"MATLAB 5.0 MAT-file".ljust(116) + bytes(8) + b"\x00\x01IM"
        self._record_with_mat(folder, "E2").write_bytes(header + struct.pack("<II", 15, len(body)) + body)
        summary = ingest([folder], tmp_path / "out", workers=1)
        assert _reasons(tmp_path / "out") == {"E2": "record_too_large"}
        assert summary.loaded == 1


def _children() -> list[int]:
    """Process ids of this process's children still alive (zombies included)."""
    me = str(os.getpid())
    children = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:
            children.append(int(stat_file.parent.name))
    return children


class TestRecordTimeout:
    """A record that hangs costs its limit and a ``timeout`` quarantine, never the batch."""

    LIMIT_S = 0.5
    HANG_S = 30.0  # far beyond the limit: without it the record would load (and the test fail)

    @pytest.fixture
    def export(self, tmp_path: Path) -> Path:
        folder = tmp_path / "export"
        for index in range(6):
            write_record(folder / f"E{index}", ecg(index), FS, LEADS)
        return folder

    @staticmethod
    def _hang_on(monkeypatch: pytest.MonkeyPatch, record_id: str, block_alarm: bool = False) -> None:
        """Make reading ``record_id`` hang (workers are forked: they inherit the patch)."""
        import time

        import ecg_r1.data.record_loader as record_loader

        real = record_loader.load_ref

        def hanging(ref, rules, out=None):
            if ref.record_id.endswith(f"/{record_id}"):
                if block_alarm:  # as C code that never returns to the interpreter would
                    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
                time.sleep(TestRecordTimeout.HANG_S)
            return real(ref, rules, out=out)

        monkeypatch.setattr(record_loader, "load_ref", hanging)

    def _stuck_on_e2(self, monkeypatch: pytest.MonkeyPatch) -> Any:
        """Chunks of 2 records, a 0.5 s grace, and E2 stuck where no signal reaches; the module."""
        import ecg_r1.data.record_loader as record_loader

        monkeypatch.setattr(record_loader, "CHUNK_SIZE", 2)
        monkeypatch.setattr(record_loader, "STUCK_GRACE_S", 0.5)
        self._hang_on(monkeypatch, "E2", block_alarm=True)
        return record_loader

    @pytest.mark.parametrize("workers", [1, 2])
    def test_hanging_record_is_quarantined_and_the_rest_load(
        self, export: Path, tmp_path: Path, workers: int, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import ecg_r1.data.record_loader as record_loader

        monkeypatch.setattr(record_loader, "CHUNK_SIZE", 2)
        self._hang_on(monkeypatch, "E3")
        summary = ingest([export], tmp_path / "out", workers=workers, record_timeout_s=self.LIMIT_S)
        assert _reasons(tmp_path / "out") == {"E3": "timeout"}
        message = read_quarantine(tmp_path / "out")["message"][0]
        assert "longer than the 0.5 s" in message and "--record-timeout" in message
        assert sorted(r.split("/")[-1] for r in read_cohort(tmp_path / "out")["record_id"]) == [
            "E0",
            "E1",
            "E2",
            "E4",
            "E5",
        ]
        assert summary.records_in == summary.loaded + 1 == 6
        assert _children() == []

    @pytest.mark.slow  # waits out a stuck worker's limit: about 4 s
    def test_worker_stuck_beyond_signals_is_ended_and_only_its_record_lost(
        self, export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self._stuck_on_e2(monkeypatch)
        summary = ingest([export], tmp_path / "out", workers=2, record_timeout_s=self.LIMIT_S)
        assert _reasons(tmp_path / "out") == {"E2": "timeout"}
        assert "stopped responding" in read_quarantine(tmp_path / "out")["message"][0]
        assert sorted(r.split("/")[-1] for r in read_cohort(tmp_path / "out")["record_id"]) == [
            "E0",
            "E1",
            "E3",
            "E4",
            "E5",
        ]
        assert summary.records_in == summary.loaded + 1 == 6
        assert _children() == []

    @pytest.mark.slow  # each worker starts 2.5 s late: about 11 s
    def test_workers_slow_to_start_are_not_taken_for_stuck(
        self, export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A loaded machine: each worker takes longer to start than a chunk's limit. The limit
        # counted from the wait, not the chunk's start, and every record was quarantined as stuck.
        import time

        record_loader = self._stuck_on_e2(monkeypatch)
        start_worker = record_loader._init_pool_worker

        def slow_start(*args):
            time.sleep(2.5)  # beyond a 2-record chunk's 2 s
            start_worker(*args)

        monkeypatch.setattr(record_loader, "_init_pool_worker", slow_start)
        ingest([export], tmp_path / "out", workers=2, record_timeout_s=self.LIMIT_S)
        assert _reasons(tmp_path / "out") == {"E2": "timeout"}
        assert _children() == []

    def test_caller_alarm_is_kept(self, export: Path, tmp_path: Path) -> None:
        previous = signal.signal(signal.SIGALRM, signal.SIG_IGN)
        signal.setitimer(signal.ITIMER_REAL, 100.0)
        try:
            ingest([export], tmp_path / "out", workers=1, record_timeout_s=self.LIMIT_S)
            assert signal.getsignal(signal.SIGALRM) is signal.SIG_IGN
            assert 50 < signal.getitimer(signal.ITIMER_REAL)[0] <= 100
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    def test_limit_must_be_positive(self, export: Path, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="positive"):
            ingest([export], tmp_path / "out", record_timeout_s=0)


class TestAtomicOutputs:
    @pytest.fixture
    def cohort(self, tmp_path: Path) -> tuple[Path, Path, dict[str, bytes]]:
        """An input folder of 3 records, a cohort ingested from it, and that cohort's files."""
        folder = tmp_path / "export"
        for index in range(3):
            write_record(folder / f"E{index}", ecg(index), FS, LEADS)
        out = tmp_path / "cohort"
        ingest([folder], out, workers=1)
        return folder, out, {p.name: p.read_bytes() for p in out.iterdir()}

    @staticmethod
    def _unchanged(out: Path, files: dict[str, bytes]) -> None:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == files
        assert [p.name for p in out.parent.iterdir() if ".partial-" in p.name or ".old-" in p.name] == []

    def test_interrupted_ingest_leaves_the_old_cohort(self, cohort, monkeypatch: pytest.MonkeyPatch) -> None:
        import ecg_r1.data.record_loader as record_loader

        folder, out, files = cohort
        real = record_loader._load_chunk
        calls = []

        def interrupt_second_chunk(task):
            calls.append(task)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(task)

        monkeypatch.setattr(record_loader, "CHUNK_SIZE", 1)
        monkeypatch.setattr(record_loader, "_load_chunk", interrupt_second_chunk)
        with pytest.raises(KeyboardInterrupt):
            ingest([folder], out, workers=1)
        self._unchanged(out, files)

    def test_one_worker_ingest_leaves_ctrl_c_working(self, cohort) -> None:
        folder, out, _ = cohort
        # Start from Python's own Ctrl-C handler whatever the test runner was started with (a
        # background job inherits SIGINT ignored), and put the runner's back afterwards.
        before = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            ingest([folder], out, workers=1)
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        finally:
            signal.signal(signal.SIGINT, before)

    def test_second_writer_is_refused(self, cohort) -> None:
        from ecg_r1.data.ingest import IngestRefused, _exclusive

        folder, out, files = cohort
        with _exclusive(out), pytest.raises(IngestRefused, match="another ingest"):
            ingest([folder], out, workers=1)
        self._unchanged(out, files)

    def test_mistyped_input_keeps_the_cohort_unless_forced(self, cohort, tmp_path: Path) -> None:
        from ecg_r1.data.ingest import IngestRefused

        _, out, files = cohort
        with pytest.raises(IngestRefused, match="--force"):
            ingest([tmp_path / "exprot"], out, workers=1)
        self._unchanged(out, files)
        assert ingest([tmp_path / "exprot"], out, workers=1, force=True).loaded == 0

    @pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o755), (0o002, 0o775), (0o077, 0o700)])
    def test_cohort_folder_follows_the_umask(self, cohort, umask: int, mode: int) -> None:
        folder, out, _ = cohort
        previous = os.umask(umask)
        try:
            ingest([folder], out, workers=1)
        finally:
            os.umask(previous)
        assert out.stat().st_mode & 0o777 == mode
        assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {mode & 0o666}

    def test_folder_that_is_no_cohort_is_not_replaced(self, cohort, tmp_path: Path) -> None:
        from ecg_r1.data.ingest import IngestRefused

        folder, _, _ = cohort
        (tmp_path / "home").mkdir()
        (tmp_path / "home" / "thesis.tex").write_text("years of work")
        with pytest.raises(IngestRefused, match="holds no cohort"):
            ingest([folder], tmp_path / "home", workers=1)
        assert (tmp_path / "home" / "thesis.tex").read_text() == "years of work"


class TestCleanCliErrors:
    @pytest.mark.parametrize(
        "argv",
        [
            ["simulate", "--n", "-1"],
            ["simulate", "--n", "4", "--hospitals", "0"],
            ["simulate", "--n", "4", "--out", "{file}/cohort"],
            ["ingest", "{missing}", "--out", "{file}/cohort", "--no-progress"],
            ["ingest", "{missing}", "--out", "{missing}/cohort", "--record-timeout", "0"],
        ],
        ids=["n-negative", "no-hospitals", "out-under-a-file", "ingest-out-under-a-file", "record-timeout-0"],
    )
    def test_user_errors_are_one_line(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
    ) -> None:
        (tmp_path / "file").write_text("")
        places = {"file": tmp_path / "file", "missing": tmp_path / "missing"}
        argv = [arg.format(**places) for arg in argv]
        if argv[0] == "simulate" and "--out" not in argv:
            argv += ["--out", str(tmp_path / "sim")]
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"ecg-r1 {argv[0]}: error:") and "\n" not in err

    @pytest.mark.parametrize(
        "command",
        [
            "ingest {e} --out {out} --no-progress",
            "ingest {e} --out {out}/cohort --no-progress",
            "simulate --n 4 --out {out}",
            "render {e} --out {out}",
            "train sft --cohort {e} --splits {e} --images {e} --out {out}",
            "evaluate --model {e} --cohort {e} --splits {e} --images {e} --out {out}",
        ],
        ids=["ingest", "ingest-inside-a-file", "simulate", "render", "train", "evaluate"],
    )
    def test_out_folder_that_is_a_file_is_refused_untouched(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
    ) -> None:
        notes = tmp_path / "notes.txt"
        notes.write_text("years of work")
        export = tmp_path / "export"
        write_record(export / "E1", ecg(1), FS, LEADS)
        before = sorted(p.name for p in tmp_path.iterdir())
        argv = [arg.format(e=export, out=notes) for arg in command.split()]
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"ecg-r1 {argv[0]}: error:") and "\n" not in err and "notes.txt" in err
        assert notes.read_text() == "years of work"
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # no lock, no partial folder

    def test_every_command_writing_an_out_folder_is_checked_above(self) -> None:
        import argparse

        from ecg_r1.cli import build_parser

        subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        with_out = {
            name
            for name, parser in subparsers.choices.items()
            if any("--out" in action.option_strings for action in parser._actions)
        }
        assert with_out == {"ingest", "simulate", "render", "train", "evaluate"}
