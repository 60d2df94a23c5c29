"""Missing samples and records spread over several signal files: each storage format's
missing-sample marker reads as NaN on every read path, as ``wfdb.rdrecord`` reads it, and such a
record is quarantined as ``nan_samples``, never loaded with the marker as a voltage; the signal
files a header names are part of its record, not orphans."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import wfdb
from test_bad_input import FS, ecg

from ecg_r1.data.canonical import LEADS
from ecg_r1.data.ingest import ingest
from ecg_r1.data.readers.wfdb_header import INVALID_SAMPLE, parse_header
from ecg_r1.data.readers.wfdb_signal import read_signal
from ecg_r1.data.readers.wfdb_write import write_record
from ecg_r1.data.store import open_signals, read_cohort, read_quarantine

# Every format wfdb.wrsamp writes (FLAC through soundfile, which wfdb requires). Twelve leads are
# more than one FLAC file holds (8 channels), so wfdb writes those records as NAME_1.dat + NAME_2.dat.
WRITTEN_FORMATS = ["80", "212", "16", "24", "32", "508", "516", "524"]
# Gaps: a few samples in two leads, inside the 10 s ingest keeps.
GAPS = ((slice(1000, 1010), 2), (slice(4000, 4003), 7))


def _with_gaps(seed: int) -> np.ndarray:
    signal = ecg(seed)
    for rows, lead in GAPS:
        signal[rows, lead] = np.nan
    return signal


def _wrsamp(folder: Path, name: str, signal: np.ndarray, fmt: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(
        name, fs=FS, units=["mV"] * 12, sig_name=list(LEADS), p_signal=signal, fmt=[fmt] * 12,
        write_dir=str(folder),
    )  # fmt: skip
    return folder / f"{name}.hea"


def _assert_reads_as_wfdb(header: Path) -> None:
    """Every sample matches wfdb.rdrecord of the same files: NaN where it has NaN, else within one
    ADC unit (plus a microvolt: float32 rounds 24- and 32-bit samples, at the gains wfdb picks
    for them, by more than one unit, yet far below any ECG's resolution)."""
    parsed = parse_header(header)
    ours = read_signal(parsed).signal
    reference = wfdb.rdrecord(str(header.with_suffix(""))).p_signal
    assert ours.shape == reference.shape
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(reference))
    assert np.isnan(reference).any()
    one_unit = np.array([spec.mv_per_unit for spec in parsed.signals])
    present = ~np.isnan(reference)
    tolerance = np.broadcast_to(one_unit * 1.001 + 1e-6, ours.shape)
    assert (np.abs(ours - reference)[present] <= tolerance[present]).all()


def test_marker_table_is_wfdb_s() -> None:
    from wfdb.io._signal import INVALID_SAMPLE_VALUE

    assert {int(k): v for k, v in INVALID_SAMPLE_VALUE.items()} == INVALID_SAMPLE


@pytest.mark.parametrize("fmt", WRITTEN_FORMATS)
def test_gaps_in_each_written_format_read_as_wfdb(tmp_path: Path, fmt: str) -> None:
    _assert_reads_as_wfdb(_wrsamp(tmp_path, f"r{fmt}", _with_gaps(1), fmt))


@pytest.mark.parametrize(("fmt", "dtype", "offset"), [(61, ">i2", 0), (160, "<u2", 1 << 15)])
def test_gaps_in_hand_written_16_bit_formats_read_as_wfdb(
    tmp_path: Path, fmt: int, dtype: str, offset: int
) -> None:
    # Formats wfdb reads but does not write: the format-16 samples stored big-endian (61) or as
    # offset binary (160). (Format 8, first differences, has no marker.)
    header = write_record(tmp_path / f"r{fmt}", _with_gaps(1), FS, LEADS)
    data = header.with_suffix(".dat")
    digital = np.fromfile(data, dtype="<i2").astype(np.int64)
    (digital + offset).astype(dtype).tofile(data)
    header.write_text(header.read_text().replace(".dat 16 ", f".dat {fmt} "))
    _assert_reads_as_wfdb(header)


def _pack_10_bit(samples: np.ndarray, fmt: int) -> bytes:
    """10-bit samples (a multiple of 3) in WFDB format 310 or 311: three samples in 4 bytes."""
    unsigned = samples.astype(np.int64).reshape(-1, 3) & 0x3FF
    s0, s1, s2 = unsigned.T
    if fmt == 311:  # one little-endian 32-bit word: bits 0-9, 10-19, 20-29
        return (s0 | (s1 << 10) | (s2 << 20)).astype("<u4").tobytes()
    # 310: two little-endian 16-bit words, a sample in bits 1-10 of each, the third split over
    # both words' bits 11-15 (low half in the first).
    words = np.stack([(s0 << 1) | ((s2 & 0x1F) << 11), (s1 << 1) | ((s2 >> 5) << 11)], axis=1)
    return words.astype("<u2").tobytes()


@pytest.mark.parametrize("fmt", [310, 311])
def test_gaps_in_hand_written_10_bit_formats_read_as_wfdb(tmp_path: Path, fmt: int) -> None:
    gain = 100  # the ECG's +-1.3 mV in +-130 of the 10 bits' +-511
    signal = _with_gaps(1)
    digital = np.round(np.nan_to_num(signal) * gain).astype(np.int64)
    digital[np.isnan(signal)] = INVALID_SAMPLE[fmt]
    header = write_record(tmp_path / f"r{fmt}", signal, FS, LEADS)
    header.with_suffix(".dat").write_bytes(_pack_10_bit(digital.ravel(), fmt))
    header.write_text(header.read_text().replace(".dat 16 1000/mV 16 ", f".dat {fmt} {gain}/mV 10 "))
    _assert_reads_as_wfdb(header)
    # The packing is right (wfdb and this reader decode the samples that were meant).
    meant = np.where(np.isnan(signal), np.nan, digital / gain)
    np.testing.assert_allclose(read_signal(parse_header(header)).signal, meant, rtol=1e-6)


def test_skewed_signal_tail_reads_as_wfdb(tmp_path: Path) -> None:
    # A skew of 40 samples on V1: its last 40 samples lie beyond the file, which wfdb fills with
    # the marker; here they must be NaN too (10 s read, so the tail is inside the page).
    header = write_record(tmp_path / "skewed", ecg(2), FS, LEADS)
    lines = header.read_text().splitlines()
    lines[7] = lines[7].replace(".dat 16 ", ".dat 16:40 ")
    header.write_text("\n".join(lines) + "\n")
    ours = read_signal(parse_header(header)).signal
    _assert_reads_as_wfdb(header)
    assert np.isnan(ours[-40:, 6]).all() and not np.isnan(ours[:-40]).any()


def test_gap_in_a_signal_of_two_samples_a_frame_is_missing_in_its_frames(tmp_path: Path) -> None:
    # Lead I at 1 kHz (2 samples a 500 Hz frame), the others at 500 Hz. A frame is one sample of
    # the record; a frame holding a missing sample is missing, else the mean of its samples, as
    # wfdb reads the expanded (per-sample) signal. (wfdb's own smoothing averages a marker with a
    # real sample into a plausible value: frame 1000 below.)
    signal = ecg(1)
    expanded = [np.repeat(signal[:, 0], 2)] + [signal[:, k].copy() for k in range(1, 12)]
    expanded[0][2001:2004] = np.nan  # frame 1000 half, frame 1001 whole
    expanded[5][3000:3002] = np.nan
    record = wfdb.Record(
        record_name="mfq", n_sig=12, fs=FS, sig_len=len(signal), units=["mV"] * 12, sig_name=list(LEADS),
        file_name=["mfq.dat"] * 12, fmt=["16"] * 12, samps_per_frame=[2] + [1] * 11,
        adc_gain=[1000.0] * 12, baseline=[0] * 12, e_p_signal=expanded,
    )  # fmt: skip
    record.set_d_features(do_adc=True, expanded=True)
    record.set_defaults()
    record.wrsamp(expanded=True, write_dir=str(tmp_path))
    ours = read_signal(parse_header(tmp_path / "mfq.hea")).signal
    reference = wfdb.rdrecord(str(tmp_path / "mfq"), smooth_frames=False).e_p_signal
    frames = [channel.reshape(len(signal), -1) for channel in reference]
    expected = np.stack([channel.mean(axis=1) for channel in frames], axis=1)  # NaN where any is
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(expected))
    assert list(np.flatnonzero(np.isnan(ours[:, 0]))) == [1000, 1001]
    np.testing.assert_allclose(ours, expected, atol=1e-3 + 1e-6)


def _multi_file(folder: Path, name: str, signal: np.ndarray) -> Path:
    """A record whose first six leads are in NAME_a.dat (format 16), the rest in NAME_b.dat (212)."""
    folder.mkdir(parents=True, exist_ok=True)
    record = wfdb.Record(
        record_name=name, n_sig=12, fs=FS, sig_len=len(signal), units=["mV"] * 12, sig_name=list(LEADS),
        file_name=[f"{name}_a.dat"] * 6 + [f"{name}_b.dat"] * 6, fmt=["16"] * 6 + ["212"] * 6,
        adc_gain=[1000.0] * 6 + [200.0] * 6, baseline=[0] * 12, p_signal=signal,
    )  # fmt: skip
    record.set_d_features(do_adc=True)
    record.set_defaults()
    record.wrsamp(write_dir=str(folder))
    return folder / f"{name}.hea"


def test_gaps_in_a_record_spread_over_two_files_read_as_wfdb(tmp_path: Path) -> None:
    _assert_reads_as_wfdb(_multi_file(tmp_path, "mf", _with_gaps(3)))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, list[str]]:
    root = tmp_path_factory.mktemp("gaps")
    folder = root / "export"
    write_record(folder / "E1", ecg(1), FS, LEADS)
    _multi_file(folder, "E2", ecg(2))  # no gap: read whole and loaded
    gapped = ["E3"]
    _multi_file(folder, "E3", _with_gaps(3))
    for index, fmt in enumerate(WRITTEN_FORMATS, start=4):
        _wrsamp(folder, f"E{index}", _with_gaps(index), fmt)
        gapped.append(f"E{index}")
    summary = ingest([folder], root / "out", workers=1)
    return root / "out", summary, gapped


class TestCohort:
    """Ingest of a folder of such records: each counted once, the gaps quarantined as
    ``nan_samples`` (also formats 24 and 32, not ``implausible_amplitude``), the rest loaded."""

    def test_each_record_is_counted_once(self, run) -> None:
        out, summary, gapped = run
        assert summary.records_in == 2 + len(gapped)
        assert "missing_header" not in summary.quarantined

    def test_gaps_are_quarantined_as_missing_samples(self, run) -> None:
        out, summary, gapped = run
        quarantine = read_quarantine(out)
        assert sorted(quarantine["record_id"].to_list()) == sorted(f"export/{name}" for name in gapped)
        assert set(quarantine["reason"]) == {"nan_samples"}
        assert summary.quarantined == {"nan_samples": len(gapped)}

    def test_loaded_signals_hold_no_marker(self, run, tmp_path: Path) -> None:
        out, summary, _ = run
        cohort = read_cohort(out)
        assert sorted(cohort["record_id"]) == ["export/E1", "export/E2"]
        signals = open_signals(out)
        assert np.isfinite(signals).all()
        for row in cohort.iter_rows(named=True):
            reference = ecg(int(row["record_id"][-1]))
            np.testing.assert_allclose(signals[row["row"]], reference.T, atol=0.006)


def test_record_missing_one_of_its_files_is_refused_as_such(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    write_record(folder / "E1", ecg(1), FS, LEADS)
    _multi_file(folder, "E2", ecg(2))
    (folder / "E2_b.dat").unlink()
    summary = ingest([folder], tmp_path / "out", workers=1)
    assert summary.records_in == 2 and summary.quarantined == {"missing_signal_file": 1}
    assert "E2_b.dat" in read_quarantine(tmp_path / "out")["message"][0]


def test_gap_after_the_first_10_s_is_cropped_away(tmp_path: Path) -> None:
    # Only the first 10 s are kept: a gap beyond them leaves with the rest and the record loads.
    folder = tmp_path / "export"
    signal = ecg(1, n=6000)
    signal[5500:5510, 4] = np.nan
    write_record(folder / "E1", signal, FS, LEADS)
    summary = ingest([folder], tmp_path / "out", workers=1)
    assert summary.loaded == 1 and np.isfinite(open_signals(tmp_path / "out")).all()
