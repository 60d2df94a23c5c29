"""Readers on the real records in ../shared/data, checked against wfdb as the reference."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import wfdb

from ecg_r1.data.canonical import LEADS, N_SAMPLES, CanonicalError
from ecg_r1.data.ingest import ingest
from ecg_r1.data.labels import load_rules
from ecg_r1.data.readers import detect_layout, discover, read_record
from ecg_r1.data.readers.cinc import cinc_hospital
from ecg_r1.data.readers.confined_read import read_bytes
from ecg_r1.data.readers.records import RecordError
from ecg_r1.data.readers.wfdb_annotations import read_annotations
from ecg_r1.data.readers.wfdb_header import parse_comments, parse_header
from ecg_r1.data.readers.wfdb_write import write_record
from ecg_r1.data.store import open_signals, read_cohort, read_quarantine

PTBXL_SIGNAL_IDS = range(6000, 6010)


def _wfdb_canonical(record: str) -> np.ndarray:
    """wfdb's physical signal in LEADS order, shape (12, n)."""
    rec = wfdb.rdrecord(record)
    names = [n.lower() for n in rec.sig_name]
    return np.stack([rec.p_signal[:, names.index(lead.lower())] for lead in LEADS])


class TestReadRecord:
    @pytest.mark.parametrize("name", ["E07500", "HR06003", "JS00666", "JS20001"])
    def test_cinc_signal_matches_wfdb(self, cinc_dir: Path, name: str) -> None:
        loaded = read_record(cinc_dir / f"{name}.hea")
        assert loaded.signal.shape == (12, N_SAMPLES) and loaded.signal.dtype == np.float32
        np.testing.assert_allclose(loaded.signal, _wfdb_canonical(str(cinc_dir / name)), atol=1e-5)
        assert loaded.meta["source_fs"] == 500 and loaded.meta["source_gain"] == 1000
        assert len(loaded.meta["checksum"]) == 64
        assert loaded.meta["lead_names"] == list(LEADS) and "_raw" not in loaded.meta

    def test_signal_file_path_reads_the_record_beside_it(self, cinc_dir: Path) -> None:
        by_header = read_record(cinc_dir / "E07501.hea")
        by_mat = read_record(cinc_dir / "E07501.mat")
        np.testing.assert_array_equal(by_header.signal, by_mat.signal)

    @pytest.mark.parametrize("number", ["1", "115", "200"])
    def test_ludb_signal_matches_wfdb(self, ludb_dir: Path, number: str) -> None:
        loaded = read_record(ludb_dir / "data" / f"{number}.hea")
        np.testing.assert_allclose(loaded.signal, _wfdb_canonical(str(ludb_dir / "data" / number)), atol=1e-5)

    def test_header_wfdb_refuses_is_read(self, cinc_dir: Path, tmp_path: Path) -> None:
        # E00666.hea names its record "E00666.mat": wfdb raises, the tolerant reader does not.
        with pytest.raises(Exception, match="invalid syntax"):
            wfdb.rdheader(str(cinc_dir / "E00666"))
        loaded = read_record(cinc_dir / "E00666.hea")
        # Reference: the same files with the record line fixed, read by wfdb.
        fixed = tmp_path / "E00666.hea"
        text = (cinc_dir / "E00666.hea").read_text()
        fixed.write_text(text.replace("E00666.mat 12 500", "E00666 12 500", 1))
        shutil.copy(cinc_dir / "E00666.mat", tmp_path / "E00666.mat")
        np.testing.assert_allclose(loaded.signal, _wfdb_canonical(str(tmp_path / "E00666")), atol=1e-5)
        # Its comments are written "#Dx:" without a space and are still read.
        assert loaded.meta["comments"]["dx"].startswith("428750005,426434006,59931005")
        assert loaded.meta["comments"]["age"] == "77"

    def test_missing_header_says_what_to_do(self, tmp_path: Path) -> None:
        with pytest.raises(RecordError) as info:
            read_record(tmp_path / "nothing.hea")
        assert info.value.reason == "missing_header" and "give the path" in str(info.value)


class TestHeaderParsing:
    def test_comment_keys_are_normalised(self) -> None:
        parsed = parse_comments(["<age>: 51", "Sex: Female", "#Dx: 1,2", "Rhythm: Sinus rhythm."])
        assert parsed["age"] == "51" and parsed["sex"] == "Female" and parsed["rhythm"] == "Sinus rhythm."

    def test_gain_baseline_and_units(self, ludb_dir: Path) -> None:
        header = parse_header(ludb_dir / "data" / "1.hea")
        first = header.signals[0]
        assert (first.gain, first.baseline, first.units, first.description) == (1716.0, 6, "mV", "i")
        assert header.fs == 500 and header.n_samples == 5000 and header.comments[0] == "<age>: 51"


class TestAnnotations:
    @pytest.mark.parametrize(("number", "lead"), [("1", "i"), ("127", "v4"), ("200", "avr"), ("64", "v1")])
    def test_matches_rdann(self, ludb_dir: Path, number: str, lead: str) -> None:
        # Record 127's files open with a SKIP word, the case a naive reader gets wrong.
        reference = wfdb.rdann(str(ludb_dir / "data" / number), lead)
        samples, symbols = read_annotations(ludb_dir / "data" / f"{number}.{lead}")
        np.testing.assert_array_equal(samples, reference.sample)
        assert symbols == list(reference.symbol)


class TestConfinedRead:
    """The open itself refuses what the path check before it cannot see (the tests of
    ``test_hostile_input.py`` cover links and FIFOs that are there before the check)."""

    def test_link_put_in_place_after_the_check_is_not_followed(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        folder = tmp_path / "export"
        folder.mkdir()
        (tmp_path / "secret.dat").write_bytes(b"SECRET")
        (folder / "E1.dat").symlink_to(tmp_path / "secret.dat")
        with pytest.raises(RecordError) as info, monkeypatch.context() as patch:
            # The check resolves the path as it was a moment earlier, a plain file; the link is
            # there by the time the file is opened.
            patch.setattr(os.path, "realpath", os.path.abspath)
            read_bytes(folder / "E1.dat", str(folder))
        assert info.value.reason == "path_escapes_folder"
        assert "SECRET" not in str(info.value)

    def test_fifo_put_in_place_after_the_check_is_not_waited_on(self, tmp_path: Path) -> None:
        # The path check passes whatever the file is; the type is checked on the opened descriptor.
        os.mkfifo(tmp_path / "E1.dat")
        with pytest.raises(RecordError) as info:
            read_bytes(tmp_path / "E1.dat", str(tmp_path))
        assert info.value.reason == "not_a_regular_file"

    def test_link_to_a_folder_outside_is_not_followed(self, tmp_path: Path) -> None:
        folder = tmp_path / "export"
        folder.mkdir()
        (tmp_path / "outside").mkdir()
        (tmp_path / "outside" / "E1.dat").write_bytes(b"SECRET")
        (folder / "sub").symlink_to(tmp_path / "outside")
        with pytest.raises(RecordError) as info:
            read_bytes(folder / "sub" / "E1.dat", str(folder))
        assert info.value.reason == "path_escapes_folder"

    def test_links_to_folders_and_files_inside_are_read(self, tmp_path: Path) -> None:
        (tmp_path / "store").mkdir()
        (tmp_path / "store" / "E1.dat").write_bytes(b"data")
        (tmp_path / "linked").symlink_to(tmp_path / "store")
        (tmp_path / "E1.dat").symlink_to(tmp_path / "store" / "E1.dat")
        assert read_bytes(tmp_path / "linked" / "E1.dat", str(tmp_path)) == b"data"
        assert read_bytes(tmp_path / "E1.dat", str(tmp_path)) == b"data"
        assert read_bytes(tmp_path / "store" / ".." / "store" / "E1.dat", str(tmp_path)) == b"data"

    def test_loop_of_links_is_refused_with_a_reason(self, tmp_path: Path) -> None:
        (tmp_path / "E1.dat").symlink_to(tmp_path / "E2.dat")
        (tmp_path / "E2.dat").symlink_to(tmp_path / "E1.dat")
        with pytest.raises(RecordError) as info:
            read_bytes(tmp_path / "E1.dat", str(tmp_path))
        assert info.value.reason == "path_escapes_folder"


class TestCincSources:
    @pytest.mark.parametrize(
        ("name", "hospital"),
        [
            ("E00666", "cinc-georgia"),
            ("HR06000", "cinc-ptbxl"),
            ("JS00666", "cinc-chapman-shaoxing"),
            ("JS20000", "cinc-ningbo"),
            ("A0001", "cinc-cpsc2018"),
            ("Q0001", "cinc-cpsc-extra"),
            ("I0001", "cinc-incart"),
            ("S0001", "cinc-ptb"),
            ("X1", "cinc-unknown-x"),
        ],
    )
    def test_hospital_from_prefix(self, name: str, hospital: str) -> None:
        assert cinc_hospital(name) == hospital

    def test_layouts_are_detected(
        self, cinc_dir: Path, ludb_dir: Path, ptbxl_meta_dir: Path, tmp_path: Path
    ) -> None:
        assert detect_layout(cinc_dir) == "cinc"
        assert detect_layout(ludb_dir) == "ludb"
        assert detect_layout(tmp_path) is None


@pytest.fixture(scope="module")
def ptbxl_folder(tmp_path_factory: pytest.TempPathFactory, cinc_dir: Path, ptbxl_meta_dir: Path) -> Path:
    """PTB-XL laid out as PhysioNet ships it: the real table rows, with the signals of HR06000..09.

    Shared by the module's tests; a test that changes it works on a copy."""
    root = tmp_path_factory.mktemp("ptbxl_layout") / "ptbxl"
    root.mkdir()
    shutil.copy(ptbxl_meta_dir / "scp_statements.csv", root / "scp_statements.csv")
    shutil.copy(ptbxl_meta_dir / "ptbxl_database_excerpt.csv", root / "ptbxl_database.csv")
    folder = root / "records500" / "06000"
    folder.mkdir(parents=True)
    for ecg_id in PTBXL_SIGNAL_IDS:
        rec = wfdb.rdrecord(str(cinc_dir / f"HR{ecg_id:05d}"), physical=False)
        wfdb.wrsamp(
            f"{ecg_id:05d}_hr",
            fs=rec.fs,
            units=rec.units,
            sig_name=rec.sig_name,
            d_signal=rec.d_signal,
            fmt=["16"] * 12,
            adc_gain=rec.adc_gain,
            baseline=rec.baseline,
            write_dir=str(folder),
        )
    return root


class TestPtbxl:
    def test_reader_on_real_table(self, ptbxl_folder: Path, cinc_dir: Path, tmp_path: Path) -> None:
        summary = ingest([ptbxl_folder], tmp_path / "cohort")
        assert summary.records_in == 12 and summary.loaded == 10
        # ecg_id 6015 and 6017 have table rows but no signal files here.
        assert summary.quarantined == {"missing_signal_file": 2}
        quarantine = read_quarantine(tmp_path / "cohort")
        assert sorted(quarantine["record_id"]) == ["ptbxl/6015", "ptbxl/6017"]
        assert all("records500/06000/0601" in p for p in quarantine["source_path"])

        cohort = read_cohort(tmp_path / "cohort")
        rows = {row["record_id"]: row for row in cohort.iter_rows(named=True)}
        with (ptbxl_folder / "ptbxl_database.csv").open() as handle:
            table = {row["ecg_id"]: row for row in csv.DictReader(handle)}
        first = rows["ptbxl/6000"]
        assert first["patient_id"] == "ptbxl/5028"
        assert first["hospital"] == f"ptbxl-site-{int(float(table['6000']['site']))}"
        assert first["sex"] == "F" and first["age"] == 59.0  # PTB-XL sex 1 is the Challenge's Female
        assert first["report"].startswith("sinus rhythm. minor non-specific t wave flattening")
        assert first["device"] == "AT-6     6"
        assert first["raw_codes"] == "NORM:100,NT_:0,SR:0"
        # NT_ is one of the switchable T-wave statements (on by default); NORM is not ischemic.
        assert first["twi"] is True and first["label"] == "non-ischemic"
        # The signals are the CinC copy of the same recordings.
        signals = open_signals(tmp_path / "cohort")
        for ecg_id in (6000, 6009):
            row = rows[f"ptbxl/{ecg_id}"]["row"]
            np.testing.assert_allclose(
                signals[row], read_record(cinc_dir / f"HR{ecg_id:05d}.hea").signal, atol=1e-5
            )

    def test_rows_without_signals_are_labelled_then_refused(self, ptbxl_folder: Path) -> None:
        refs, refused, _, layout = discover(ptbxl_folder, load_rules())
        assert layout == "ptbxl" and len(refs) == 10
        by_id = {q.record_id: q for q in refused}
        assert {q.reason for q in refused} == {"missing_signal_file"}
        assert "download the records500/" in by_id["ptbxl/6015"].message
        assert by_id["ptbxl/6015"].hospital.startswith("ptbxl-site-")

    def test_age_over_89_and_low_rate_fallback(
        self, ptbxl_folder: Path, cinc_dir: Path, tmp_path: Path
    ) -> None:
        table = ptbxl_folder / "ptbxl_database.csv"
        rows = list(csv.DictReader(table.open()))
        rows[0]["age"] = "300"
        # Record 6001 only at 100 Hz: read from records100 and resampled to 500 Hz.
        for suffix in (".hea", ".dat"):
            (ptbxl_folder / "records500" / "06000" / f"06001_hr{suffix}").unlink()
        source = wfdb.rdrecord(str(cinc_dir / "HR06001"))
        low = ptbxl_folder / "records100" / "06000"
        low.mkdir(parents=True)
        wfdb.wrsamp(
            "06001_lr",
            fs=100,
            units=source.units,
            sig_name=source.sig_name,
            p_signal=source.p_signal[::5],
            fmt=["16"] * 12,
            adc_gain=[1000.0] * 12,
            baseline=[0] * 12,
            write_dir=str(low),
        )
        with table.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        cohort_dir = tmp_path / "cohort"
        summary = ingest([ptbxl_folder], cohort_dir)
        assert summary.loaded == 10
        cohort = read_cohort(cohort_dir)
        assert cohort.filter(cohort["record_id"] == "ptbxl/6000")["age"].item() == 90.0
        resampled = cohort.filter(cohort["record_id"] == "ptbxl/6001")
        assert resampled["source_fs"].item() == 100.0 and resampled["source_path"].item().endswith(
            "06001_lr.dat"
        )


class TestFallbackAndCanonicalForm:
    def test_format_212_goes_through_wfdb(self, tmp_path: Path) -> None:
        rng = np.random.default_rng(0)
        signal = np.cumsum(rng.normal(0, 0.02, (5000, 12)), axis=0)
        wfdb.wrsamp(
            "r212", fs=500, units=["mV"] * 12, sig_name=list(LEADS), p_signal=signal, fmt=["212"] * 12,
            adc_gain=[200.0] * 12, baseline=[0] * 12, write_dir=str(tmp_path),
        )  # fmt: skip
        loaded = read_record(tmp_path / "r212.hea")
        assert loaded.meta["reader"] == "wfdb"
        np.testing.assert_allclose(loaded.signal, _wfdb_canonical(str(tmp_path / "r212")), atol=1e-5)

    def test_rate_duration_and_lead_spelling(self, tmp_path: Path) -> None:
        fs = 250
        t = np.arange(int(fs * 12)) / fs  # 12 s at 250 Hz: resampled, then cropped to 10 s
        wave = np.sin(2 * np.pi * 5 * t)
        signal = np.stack([wave * (k + 1) / 12 for k in range(12)], axis=1)
        names = ["i", "II", "iii", "AVR", "avl", "aVF", "v1", "V2", "v3", "V4", "v5", "V6"]
        write_record(tmp_path / "slow", signal, fs, names, gain=2000)
        loaded = read_record(tmp_path / "slow.hea")
        assert loaded.signal.shape == (12, N_SAMPLES)
        assert loaded.meta["source_fs"] == 250 and loaded.meta["cropped_samples"] == 1000
        expected = np.sin(2 * np.pi * 5 * np.arange(N_SAMPLES) / 500)
        # Polyphase filtering keeps a 5 Hz wave intact away from the edges.
        np.testing.assert_allclose(loaded.signal[11, 100:-100], expected[100:-100], atol=0.01)

    def test_short_records_are_padded_or_refused(self, tmp_path: Path) -> None:
        rng = np.random.default_rng(1)
        write_record(tmp_path / "nine", rng.normal(0, 0.1, (4500, 12)), 500, LEADS)
        loaded = read_record(tmp_path / "nine.hea")
        assert loaded.meta["padded_samples"] == 500
        median = np.median(loaded.signal[:, :4500], axis=1)
        np.testing.assert_allclose(
            loaded.signal[:, 4500:], np.repeat(median[:, None], 500, axis=1), atol=1e-6
        )
        write_record(tmp_path / "five", rng.normal(0, 0.1, (2500, 12)), 500, LEADS)
        with pytest.raises(CanonicalError) as info:
            read_record(tmp_path / "five.hea")
        assert info.value.reason == "too_short"

    def test_missing_limb_leads_are_derived(self, tmp_path: Path) -> None:
        rng = np.random.default_rng(2)
        eight = rng.normal(0, 0.3, (5000, 8))  # I, II, V1-V6
        write_record(tmp_path / "eight", eight, 500, ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"])
        loaded = read_record(tmp_path / "eight.hea")
        lead_i, lead_ii = loaded.signal[0], loaded.signal[1]
        np.testing.assert_allclose(loaded.signal[2], lead_ii - lead_i, atol=1e-6)
        np.testing.assert_allclose(loaded.signal[3], -(lead_i + lead_ii) / 2, atol=1e-6)
        assert loaded.meta["derived_leads"] == "III,aVR,aVL,aVF"

    def test_microvolt_units_are_converted(self, tmp_path: Path) -> None:
        rng = np.random.default_rng(3)
        signal = rng.normal(0, 0.5, (5000, 12))
        header = write_record(tmp_path / "mv", signal, 500, LEADS, gain=20)
        in_mv = read_record(header).signal
        # The same digital values declared as µV at a gain of 0.02 units/µV (= 20 units/mV).
        header.write_text(header.read_text().replace(" 20/mV ", " 0.02/uV "))
        np.testing.assert_allclose(read_record(header).signal, in_mv, rtol=1e-5, atol=1e-6)
