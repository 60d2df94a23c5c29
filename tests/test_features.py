"""Measured ECG features: known synthetic waves, real LUDB records against cardiologists' marks."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from ecg_r1.data.canonical import FS, LEADS, N_SAMPLES
from ecg_r1.data.features import (
    FEATURE_COLUMNS,
    TWI_THRESHOLD_MV,
    UPRIGHT_T_LEADS,
    measure_features,
    twi_lead_set,
)

T_AMPS = {  # mV per lead: inverted in V2-V4 and aVL, negative in aVR and V1 as is normal
    "I": 0.3,
    "II": 0.4,
    "III": 0.1,
    "aVR": -0.35,
    "aVL": -0.25,
    "aVF": 0.2,
    "V1": -0.2,
    "V2": -0.5,
    "V3": -0.4,
    "V4": -0.15,
    "V5": 0.3,
    "V6": 0.25,
}


def _gauss(t: np.ndarray, centre: float, sigma: float) -> np.ndarray:
    return np.exp(-0.5 * ((t - centre) / sigma) ** 2)


def synthetic_ecg(
    t_amps: dict[str, float],
    hr: float = 75.0,
    t_rise_ms: float = 40.0,
    t_fall_ms: float = 40.0,
    st_mv: float = 0.0,
    noise_mv: float = 0.01,
    wander_mv: float = 0.1,
    seed: int = 0,
) -> np.ndarray:
    """A 12-lead ECG with a known T amplitude per lead (a skewed Gaussian T wave) and ST shift."""
    rng = np.random.default_rng(seed)
    t = np.arange(N_SAMPLES) / FS
    rr = 60.0 / hr
    out = np.zeros((len(LEADS), N_SAMPLES))
    for beat in np.arange(0.4, 10.0, rr):
        qrs = (
            1.2 * _gauss(t, beat, 0.012)
            - 0.25 * _gauss(t, beat + 0.03, 0.01)
            - 0.1 * _gauss(t, beat - 0.03, 0.008)
        )
        p = 0.12 * _gauss(t, beat - 0.16, 0.025)
        tc = beat + 0.30 * np.sqrt(rr)  # the T wave comes earlier at faster rates, as QT shortens
        sigma = np.where(t < tc, t_rise_ms / 1000, t_fall_ms / 1000)
        twave = np.exp(-0.5 * ((t - tc) / sigma) ** 2)
        # An ST shift from J (QRS end) into the T wave, as a plateau that fades at T end.
        st = st_mv * ((t > beat + 0.05) & (t < tc + 0.1))
        for j, lead in enumerate(LEADS):
            out[j] += qrs + p + t_amps[lead] * twave + st
    out += wander_mv * np.sin(2 * np.pi * 0.2 * t + rng.uniform(0, 6))[None, :]
    out += rng.normal(0, noise_mv, out.shape)
    return out.astype(np.float32)


class TestSyntheticSignals:
    @pytest.fixture(scope="class")
    @classmethod
    def table(cls) -> pl.DataFrame:
        signals = np.stack(
            [
                synthetic_ecg(T_AMPS, hr=75, seed=1),
                synthetic_ecg(T_AMPS, hr=110, seed=2),
                synthetic_ecg({lead: 0.3 for lead in LEADS}, hr=60, t_rise_ms=60, t_fall_ms=30, seed=3),
                synthetic_ecg({lead: 0.3 for lead in LEADS}, hr=60, st_mv=-0.15, seed=4),
            ]
        )
        return measure_features(signals)

    def test_one_row_per_record_with_every_column(self, table: pl.DataFrame) -> None:
        assert table.height == 4
        assert list(table.columns) == [*FEATURE_COLUMNS, "twi_leads", "n_twi_leads"]

    def test_t_amplitude_matches_the_known_wave(self, table: pl.DataFrame) -> None:
        for row in (0, 1):
            for lead, amp in T_AMPS.items():
                assert table[f"t_amp_{lead}"][row] == pytest.approx(amp, abs=0.04), (row, lead)

    def test_heart_rate(self, table: pl.DataFrame) -> None:
        assert table["hr_bpm"].to_list() == pytest.approx([75, 110, 60, 60], abs=1.5)

    def test_twi_leads_follow_the_documented_rule(self, table: pl.DataFrame) -> None:
        expected = [lead for lead in LEADS if lead in UPRIGHT_T_LEADS and T_AMPS[lead] < TWI_THRESHOLD_MV]
        assert expected == ["aVL", "V2", "V3", "V4"]
        assert table["twi_leads"][0] == ",".join(expected)
        assert table["n_twi_leads"][0] == 4
        # aVR and V1 are negative too, but a negative T is normal there
        assert "aVR" not in table["twi_leads"][0] and "V1" not in table["twi_leads"][0]
        assert table["twi_leads"][2] == "" and table["n_twi_leads"][2] == 0

    def test_symmetric_t_wave_ratio_near_one_and_skewed_one_above(self, table: pl.DataFrame) -> None:
        assert table["t_sym_II"][0] == pytest.approx(1.0, abs=0.2)
        assert table["t_sym_II"][2] == pytest.approx(2.0, abs=0.4)  # rise 60 ms, fall 30 ms

    def test_st_depression_is_measured(self, table: pl.DataFrame) -> None:
        assert table["st_II"][3] == pytest.approx(-0.15, abs=0.05)
        assert abs(table["st_II"][2]) < 0.05

    def test_qrs_duration_and_amplitude_plausible(self, table: pl.DataFrame) -> None:
        for value in table["qrs_ms"]:
            assert 50 <= value <= 120
        assert table["qrs_amp_II"][0] == pytest.approx(1.45, abs=0.2)
        assert 300 <= table["qt_ms"][0] <= 480


class TestUnmeasurableRecords:
    def test_bad_rows_get_nulls_and_the_batch_survives(self) -> None:
        good = synthetic_ecg(T_AMPS, seed=5)
        nan_rec = good.copy()
        nan_rec[3, 100:200] = np.nan
        flat = np.zeros_like(good)
        one_beat = np.zeros_like(good)
        one_beat[:, 2400:2420] = 1.0
        table = measure_features(np.stack([good, nan_rec, flat, one_beat, good]))
        assert table.height == 5
        for row in (1, 2, 3):
            assert table["hr_bpm"][row] is None
            assert table["t_amp_II"][row] is None
            assert table["twi_leads"][row] is None
            assert table["n_twi_leads"][row] is None
        assert table["twi_leads"][0] == table["twi_leads"][4] == "aVL,V2,V3,V4"

    def test_a_flat_lead_is_null_and_never_inverted(self) -> None:
        signal = synthetic_ecg(T_AMPS, seed=6)
        signal[LEADS.index("V3")] = 0.0
        table = measure_features(signal[None])
        assert table["t_amp_V3"][0] is None
        assert table["twi_leads"][0] == "aVL,V2,V4"
        assert table["t_amp_V2"][0] == pytest.approx(-0.5, abs=0.04)

    def test_wrong_shape_is_refused_with_a_hint(self) -> None:
        with pytest.raises(ValueError, match="canonicalize"):
            measure_features(np.zeros((2, 12, 1000), dtype=np.float32))

    def test_empty_input_gives_empty_table(self) -> None:
        table = measure_features(np.zeros((0, 12, N_SAMPLES), dtype=np.float32))
        assert table.height == 0 and "twi_leads" in table.columns

    def test_chunking_does_not_change_results(self) -> None:
        signals = np.stack([synthetic_ecg(T_AMPS, hr=60 + 10 * i, seed=i) for i in range(5)])
        assert measure_features(signals, chunk_size=2).equals(measure_features(signals, chunk_size=128))


class TestTwiLeadSet:
    def test_parses_and_normalises(self) -> None:
        assert twi_lead_set("V2, v3,AVL,") == {"V2", "V3", "aVL"}

    def test_empty_and_none(self) -> None:
        assert twi_lead_set("") == set() and twi_lead_set(None) == set()

    def test_unknown_lead_raises_unless_lenient(self) -> None:
        with pytest.raises(ValueError, match="not a lead name"):
            twi_lead_set("V2,V7")
        assert twi_lead_set("V2,V7", strict=False) == {"V2"}


LUDB_IDS = list(range(1, 201, 8))  # 25 records spread over the database keeps the test fast
ANN_EXT = {lead: lead.lower() for lead in LEADS}


class TestLudbAgainstCardiologists:
    @pytest.fixture(scope="class")
    @classmethod
    def measured(cls, ludb_dir) -> tuple[np.ndarray, pl.DataFrame]:
        wfdb = pytest.importorskip("wfdb")
        from ecg_r1.data.canonical import canonicalize

        signals = []
        for rid in LUDB_IDS:
            rec = wfdb.rdrecord(str(ludb_dir / "data" / str(rid)))
            signals.append(canonicalize(rec.p_signal, rec.fs, rec.sig_name).signal)
        signals = np.stack(signals)
        return signals, measure_features(signals)

    def test_t_polarity_agrees_with_annotated_t_peaks(self, ludb_dir, measured) -> None:
        """The sign of the T wave at the cardiologist's T peak (vs QRS onset) matches ours."""
        import wfdb

        signals, table = measured
        agree = total = 0
        for n, rid in enumerate(LUDB_IDS):
            for j, lead in enumerate(LEADS):
                ann = wfdb.rdann(str(ludb_dir / "data" / str(rid)), ANN_EXT[lead])
                sym, at = np.array(ann.symbol), ann.sample
                amps = []
                for k in np.flatnonzero(sym == "t"):
                    qrs = np.flatnonzero((sym == "N") & (at < at[k]))
                    if len(qrs) and qrs[-1] >= 1 and sym[qrs[-1] - 1] == "(":
                        onset = at[qrs[-1] - 1]
                        amps.append(
                            signals[n, j, at[k]] - signals[n, j, max(onset - 5, 0) : onset + 1].mean()
                        )
                ours = table[f"t_amp_{lead}"][n]
                if amps and ours is not None and abs(np.median(amps)) > 0.1:
                    total += 1
                    agree += int(np.sign(np.median(amps)) == np.sign(ours))
        assert total > 150
        assert agree / total >= 0.93, f"T polarity agrees on {agree}/{total} leads"

    def test_heart_rate_matches_annotated_beats(self, ludb_dir, measured) -> None:
        import wfdb

        _, table = measured
        errors = []
        for n, rid in enumerate(LUDB_IDS):
            ann = wfdb.rdann(str(ludb_dir / "data" / str(rid)), "ii")
            r = ann.sample[np.array(ann.symbol) == "N"]
            errors.append(table["hr_bpm"][n] - 60 * FS / np.median(np.diff(r)))
        assert np.median(np.abs(errors)) < 2.0

    def test_every_record_is_measured(self, measured) -> None:
        _, table = measured
        assert table["hr_bpm"].null_count() == 0
        assert table["t_amp_II"].null_count() == 0
