"""The simulated cohort: export layout, lead relations, mechanisms, hospitals, determinism, the truth."""

from __future__ import annotations

import filecmp
import json
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import wfdb

from ecg_r1.data.canonical import LEADS, canonicalize
from ecg_r1.simulate import SimulationSummary, simulate_cohort, truth
from ecg_r1.simulate.device import record
from ecg_r1.simulate.hospitals import hospital_profiles
from ecg_r1.simulate.mechanisms import PATTERN_LEADS, ecg_parameters
from ecg_r1.simulate.writer import write_wfdb

N_COHORT = 360
LATERAL = set(PATTERN_LEADS["lateral"])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SimulationSummary]:
    out = tmp_path_factory.mktemp("sim")
    return out, simulate_cohort(out, n=N_COHORT, hospitals=4, seed=11)


@pytest.fixture(scope="module")
def tables(cohort: tuple[Path, SimulationSummary]) -> tuple[pl.DataFrame, pl.DataFrame]:
    out, _ = cohort
    manifest = pl.read_csv(out / "manifest.csv", schema_overrides={"twi_leads": pl.String})
    return manifest, pl.read_parquet(out / "truth.parquet")


@pytest.fixture(scope="module")
def canonical(
    cohort: tuple[Path, SimulationSummary], tables: tuple[pl.DataFrame, pl.DataFrame]
) -> np.ndarray:
    """Every record read back with wfdb and brought to the canonical form, as ingest does."""
    out, _ = cohort
    manifest, _ = tables
    signals = []
    for path in manifest["signal_path"]:
        rec = wfdb.rdrecord(str(out / path[: -len(".hea")]))
        signals.append(canonicalize(rec.p_signal, rec.fs, rec.sig_name).signal)
    return np.stack(signals)


@pytest.fixture(scope="module")
def features(canonical: np.ndarray) -> pl.DataFrame:
    from ecg_r1.data.features import measure_features

    return measure_features(canonical)


class TestExport:
    def test_layout_and_manifest_columns(self, cohort, tables):
        out, summary = cohort
        manifest, truth_df = tables
        assert {
            "signal_path",
            "record_id",
            "patient_id",
            "hospital",
            "label",
            "twi",
            "twi_leads",
            "age",
            "sex",
            "note",
        } <= set(manifest.columns)
        assert len(manifest) == len(truth_df) == N_COHORT == summary.n
        assert manifest["record_id"].is_unique().all()
        assert set(manifest["label"]) == {"ischemic", "non-ischemic"}
        assert manifest["twi"].all()
        assert set(manifest["sex"]) <= {"M", "F"}
        for path in manifest["signal_path"]:
            assert (out / path).is_file() and (out / path).with_suffix(".dat").is_file()
        assert json.loads((out / "summary.json").read_text()) == summary.to_dict()

    def test_each_hospital_records_at_its_own_rate_and_gain(self, cohort, tables):
        out, _ = cohort
        manifest, _ = tables
        for profile in hospital_profiles(4):
            path = manifest.filter(pl.col("hospital") == profile.name)["signal_path"][0]
            header = wfdb.rdheader(str(out / path[: -len(".hea")]))
            assert header.fs == profile.fs
            assert header.sig_len == 10 * profile.fs
            assert set(header.adc_gain) == {profile.adc_gain}
            assert set(header.fmt) == {"16"}

    def test_fast_writer_is_byte_identical_to_wrsamp(self, tmp_path):
        adc = (np.random.default_rng(0).standard_normal((750, 12)) * 400).astype(np.int16)
        (tmp_path / "ours").mkdir()
        (tmp_path / "wfdb").mkdir()
        write_wfdb(tmp_path / "ours" / "r1", adc, 250, 200.0, LEADS)
        wfdb.wrsamp(
            "r1", fs=250, units=["mV"] * 12, sig_name=list(LEADS), d_signal=adc.astype(np.int64),
            fmt=["16"] * 12, adc_gain=[200.0] * 12, baseline=[0] * 12, write_dir=str(tmp_path / "wfdb"),
        )  # fmt: skip
        for suffix in (".hea", ".dat"):
            assert filecmp.cmp(
                tmp_path / "ours" / f"r1{suffix}", tmp_path / "wfdb" / f"r1{suffix}", shallow=False
            )

    def test_every_case_has_twi_in_at_least_two_leads(self, tables):
        manifest, _ = tables
        counts = manifest["twi_leads"].str.split(",").list.len()
        assert counts.min() >= 2

    def test_notes_never_state_the_label(self, tables):
        manifest, _ = tables
        notes = " ".join(manifest["note"]).lower()
        for word in ("ischem", "ischaem", "ischäm", "non-ischemic", "wellens", "strain"):
            assert word not in notes
        assert manifest["note"].str.len_chars().min() > 10

    def test_bad_arguments_are_refused_with_a_reason(self, tmp_path):
        with pytest.raises(ValueError, match="n must be at least 1"):
            simulate_cohort(tmp_path, n=0)
        with pytest.raises(ValueError, match="hospitals must be at least 1"):
            simulate_cohort(tmp_path, n=5, hospitals=0)


class TestLeadRelations:
    def test_limb_relations_hold_exactly_before_quantisation(self):
        rng = np.random.default_rng(3)
        profile = hospital_profiles(4)[1]  # noisy, 250 Hz, mains hum
        cases = truth.draw_cases(rng, 16, profile.case_mix(), profile.age_shift, profile.missing_rate)
        sig, _ = record(rng, ecg_parameters(rng, cases.ecg, cases.age, cases.male), profile)
        i, ii, iii, avr, avl, avf = (
            sig[:, LEADS.index(n)].astype(np.float64) for n in ("I", "II", "III", "aVR", "aVL", "aVF")
        )
        for got, want in ((iii, ii - i), (avr, -(i + ii) / 2), (avl, i - ii / 2), (avf, ii - i / 2)):
            np.testing.assert_allclose(got, want, atol=1e-5)

    def test_limb_relations_hold_in_the_written_records(self, cohort, tables):
        out, _ = cohort
        manifest, _ = tables
        for path in manifest["signal_path"][::40]:
            rec = wfdb.rdrecord(str(out / path[: -len(".hea")]))
            x = {n.lower(): rec.p_signal[:, k] for k, n in enumerate(rec.sig_name)}
            tol = 1.6 / rec.adc_gain[0]  # each written lead is rounded to half an ADC unit
            np.testing.assert_allclose(x["iii"], x["ii"] - x["i"], atol=tol)
            np.testing.assert_allclose(x["avr"], -(x["i"] + x["ii"]) / 2, atol=tol)
            np.testing.assert_allclose(x["avl"], x["i"] - x["ii"] / 2, atol=tol)
            np.testing.assert_allclose(x["avf"], x["ii"] - x["i"] / 2, atol=tol)

    def test_beats_vary(self, canonical):
        # RR intervals and R amplitudes change from beat to beat (respiration, jitter)
        lead_ii = canonical[0, LEADS.index("II")]
        from scipy.signal import find_peaks

        peaks, _ = find_peaks(
            np.abs(np.diff(lead_ii)), distance=150, height=np.percentile(np.abs(np.diff(lead_ii)), 99.5) / 2
        )
        rr = np.diff(peaks)
        assert len(rr) >= 5 and rr.std() > 0


class TestMechanisms:
    def test_lvh_strain_has_high_voltage_and_lateral_twi(self, tables, features):
        _, t = tables
        f = features.with_columns(mechanism=t["mechanism"], high_voltage=t["high_voltage"])
        sokolow = f["qrs_amp_V1"] / 2 + f["qrs_amp_V5"]  # ~ S(V1) + R(V5)
        f = f.with_columns(sokolow=sokolow)
        lvh = f.filter(pl.col("mechanism") == "lvh_strain")
        isch = f.filter(pl.col("mechanism").str.starts_with("ischemia"))
        assert lvh["sokolow"].median() > 1.15 * isch["sokolow"].median()  # LVH in some ischemic cases too
        hv = f.filter(pl.col("high_voltage") == "yes")["sokolow"].median()
        assert hv > 1.6 * f.filter(pl.col("high_voltage") == "no")["sokolow"].median()
        lateral = [bool(set(s.split(",")) & LATERAL) for s in lvh["twi_leads"].fill_null("")]
        assert np.mean(lateral) > 0.6

    def test_bundle_branch_block_widens_the_qrs(self, tables, features):
        _, t = tables
        f = features.with_columns(mechanism=t["mechanism"], conduction=t["conduction"])
        bbb = f.filter(pl.col("conduction") != "normal")["qrs_ms"].drop_nulls()
        normal = f.filter(pl.col("conduction") == "normal")["qrs_ms"].drop_nulls()
        assert len(bbb) >= 5
        assert bbb.median() >= 120
        assert normal.median() < 110
        assert t.filter(pl.col("conduction") != "normal")["qrs_ms"].min() > 115

    def test_generated_twi_leads_are_what_the_signal_shows(self, tables, features):
        manifest, _ = tables
        gen = [set(s.split(",")) for s in manifest["twi_leads"]]
        meas = [set((s or "").split(",")) - {""} for s in features["twi_leads"]]
        jaccard = [len(a & b) / max(1, len(a | b)) for a, b in zip(gen, meas, strict=True)]
        assert np.mean(jaccard) > 0.8

    def test_territories_show_in_their_leads(self, tables):
        _, t = tables
        for mech, leads in (("ischemia_inferior", {"II", "aVF"}), ("ischemia_anterior", {"V2", "V3"})):
            sub = t.filter(pl.col("mechanism") == mech)["twi_leads"]
            assert np.mean([bool(set(s.split(",")) & leads) for s in sub]) > 0.6


class TestHospitals:
    def test_prevalence_case_mix_and_age_differ(self):
        rng = np.random.default_rng(0)
        prev, athletes, age = {}, {}, {}
        for p in hospital_profiles(4):
            c = truth.draw_cases(rng, 20000, p.case_mix(), p.age_shift, p.missing_rate)
            prev[p.name] = c.ischemic.mean()
            athletes[p.name] = np.mean(c.mechanism == truth.MECHANISMS.index("athlete"))
            age[p.name] = c.age.mean()
        assert prev["hospital_c"] > prev["hospital_a"] + 0.08 > prev["hospital_b"] + 0.16
        assert min(prev.values()) >= 0.28 and max(prev.values()) <= 0.62
        assert athletes["hospital_b"] > 2 * athletes["hospital_c"]
        assert age["hospital_d"] > age["hospital_b"] + 5

    def test_devices_differ_in_noise_and_mains(self):
        rng = np.random.default_rng(5)
        power = {}
        for p in hospital_profiles(4):
            c = truth.draw_cases(rng, 8, p.case_mix(), p.age_shift, p.missing_rate)
            sig, _ = record(rng, ecg_parameters(rng, c.ecg, c.age, c.male), p)
            spec = np.abs(np.fft.rfft(sig[:, LEADS.index("V1")], axis=-1)).mean(0)
            freqs = np.fft.rfftfreq(sig.shape[-1], 1 / p.fs)
            power[p.name] = {hz: spec[np.argmin(np.abs(freqs - hz))] for hz in (50, 60)}
            power[p.name]["ref"] = np.median(spec[(freqs > 45) & (freqs < 65)])
        assert power["hospital_d"][60] > 5 * power["hospital_d"]["ref"]  # 60 Hz mains
        assert power["hospital_b"][50] > 5 * power["hospital_b"]["ref"]  # 50 Hz mains
        assert power["hospital_a"][50] < 3 * power["hospital_a"]["ref"]  # notch on

    def test_a_faster_device_samples_the_same_heart(self):
        from dataclasses import replace

        slow = hospital_profiles(4)[0]
        fast = replace(slow, fs=1000)
        rng = np.random.default_rng(2)
        c = truth.draw_cases(rng, 4, slow.case_mix(), 0.0, 0.1)
        params = ecg_parameters(rng, c.ecg, c.age, c.male)
        at_500, _ = record(np.random.default_rng(9), params, slow)
        at_1000, _ = record(np.random.default_rng(9), params, fast)
        assert at_1000.shape[-1] == 2 * at_500.shape[-1]
        np.testing.assert_allclose(at_1000[..., ::2], at_500, atol=1e-3)

    def test_note_styles_differ(self, tables):
        manifest, _ = tables
        notes = {
            h: " ".join(manifest.filter(pl.col("hospital") == h)["note"])
            for h in manifest["hospital"].unique()
        }
        assert "jährige" in notes["hospital_d"] and "year-old" not in notes["hospital_d"]
        assert "Age:" in notes["hospital_c"]
        assert "year-old" in notes["hospital_a"]

    def test_truth_holds_each_note_in_english_with_the_same_findings(self, tables):
        import re

        manifest, truth = tables
        both = manifest.select("record_id", "hospital", "note").join(
            truth.select("record_id", "note_english", "troponin"), on="record_id"
        )
        english = both.filter(pl.col("hospital") != "hospital_d")
        assert (english["note"] == english["note_english"]).all()  # already in English: its own note
        german = both.filter(pl.col("hospital") == "hospital_d")
        assert german.height > 0 and (german["note"] != german["note_english"]).all()
        assert not german["note_english"].str.contains("jährig|Patient|Risikofaktoren").any()
        assert german["note_english"].str.contains("year-old").all()
        for note, note_english, troponin in german.select("note", "note_english", "troponin").iter_rows():
            # the same lab value, in the other language's words
            shown = re.search(r"Troponin T (\d+) ng/l", note)
            assert (shown is None) == (re.search(r"troponin (\d+) ng/L", note_english) is None)
            if shown:
                assert f"troponin {shown.group(1)} ng/L" in note_english
                assert ("erhöht" in note) == (troponin == "elevated")


class TestDeterminism:
    def test_same_seed_same_files_whatever_the_workers(self, tmp_path):
        a = simulate_cohort(tmp_path / "a", n=30, seed=4)
        b = simulate_cohort(tmp_path / "b", n=30, seed=4, workers=2)
        c = simulate_cohort(tmp_path / "c", n=30, seed=5)
        assert a == b
        assert c != a
        assert filecmp.cmp(tmp_path / "a" / "manifest.csv", tmp_path / "b" / "manifest.csv", shallow=False)
        rec = "hospital_c/hospital_c_000003.dat"
        assert filecmp.cmp(tmp_path / "a" / rec, tmp_path / "b" / rec, shallow=False)
        assert not filecmp.cmp(tmp_path / "a" / rec, tmp_path / "c" / rec, shallow=False)


@pytest.fixture(scope="module")
def large() -> dict[str, np.ndarray]:
    """60,000 cases of the discrete model (no signals): enough for tight checks of the truth."""
    rng = np.random.default_rng(1)
    out: dict[str, list] = {k: [] for k in ("y", "post", "ecg", "text", "naive")}
    for p in hospital_profiles(4):
        c = truth.draw_cases(rng, 15000, p.case_mix(), p.age_shift, p.missing_rate)
        out["y"].append(c.ischemic)
        out["post"].append(truth.posterior_ischemic(c, p.case_mix(), p.age_shift))
        out["ecg"].append(truth.posterior_ischemic(c, p.case_mix(), p.age_shift, use_text=False))
        out["text"].append(truth.posterior_ischemic(c, p.case_mix(), p.age_shift, use_ecg=False))
        out["naive"].append(truth.naive_rule(c))
    return {k: np.concatenate(v) for k, v in out.items()}


class TestTruth:
    def test_posterior_is_calibrated(self, large):
        bins = np.digitize(large["post"], np.linspace(0, 1, 11)[1:-1])
        for b in range(10):
            sel = bins == b
            if sel.sum() > 500:
                assert abs(large["y"][sel].mean() - large["post"][sel].mean()) < 0.03

    def test_task_is_learnable_but_hard(self, large):
        y = large["y"]
        bayes = np.mean((large["post"] >= 0.5) == y)
        assert 0.84 <= bayes <= 0.91
        assert 0.55 <= np.mean(large["naive"] == y) <= 0.65
        assert np.mean((large["ecg"] >= 0.5) == y) < bayes - 0.05
        assert np.mean((large["text"] >= 0.5) == y) < bayes - 0.08
        assert truth.auroc(y, large["post"]) > 0.9

    def test_summary_reports_the_ceilings(self, cohort):
        _, s = cohort
        assert 0.75 <= s.bayes_accuracy <= 0.97
        assert s.naive_rule_accuracy < s.bayes_accuracy - 0.1
        assert set(s.bayes_per_hospital) == set(s.hospitals) and s.held_out_hospital == "hospital_d"
        assert sum(s.cases_per_hospital.values()) == N_COHORT == sum(s.cases_per_mechanism.values())
        meta = s.metadata()
        assert all(isinstance(v, int | float | str) for v in meta.values())
        assert meta["bayes_accuracy"] == round(s.bayes_accuracy, 4) and meta["cases/hospital_d"] > 0


class TestSingleModalityClassifiers:
    """Text alone and signal alone must each fall well short of the Bayes-optimal accuracy."""

    @staticmethod
    def _cv_accuracy(x, y) -> float:
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_val_score
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        # shuffled folds: the cohort is ordered by hospital, and unshuffled folds would test on
        # an unseen hospital (another note language, another device) instead of the modality
        model = make_pipeline(StandardScaler(with_mean=False), LogisticRegression(C=1.0, max_iter=3000))
        folds = StratifiedKFold(5, shuffle=True, random_state=0)
        return float(cross_val_score(model, x, y, cv=folds, scoring="accuracy").mean())

    @staticmethod
    def _signal_features(f: pl.DataFrame) -> np.ndarray:
        """What a reader of the tracing would use: where T is inverted, how deep and how
        symmetric, QRS width and voltage, ST level, QT and rate (measured by ecg_r1.data.features)."""
        inverted = np.array([[lead in (s or "").split(",") for lead in LEADS] for s in f["twi_leads"]], float)
        t_amp = f.select([f"t_amp_{lead}" for lead in LEADS]).to_numpy()
        t_sym = f.select([f"t_sym_{lead}" for lead in LEADS]).to_numpy()
        st = f.select([f"st_{lead}" for lead in LEADS]).to_numpy()
        qrs_amp = f.select([f"qrs_amp_{lead}" for lead in LEADS]).to_numpy()
        with warnings.catch_warnings():  # records without an inverted lead give an all-NaN row
            warnings.simplefilter("ignore", RuntimeWarning)
            sym_inverted = np.nanmedian(np.where(t_amp < -0.1, t_sym, np.nan), axis=1)
        columns = [
            inverted,
            np.nanmin(t_amp, axis=1),
            sym_inverted,
            f["qrs_ms"].to_numpy(),
            qrs_amp[:, LEADS.index("V1")] + qrs_amp[:, LEADS.index("V5")],
            np.nanmin(st, axis=1),
            f["qt_ms"].to_numpy(),
            f["hr_bpm"].to_numpy(),
        ]
        x = np.column_stack([np.asarray(c, dtype=float) for c in columns])
        return np.where(np.isfinite(x), x, np.nanmedian(np.where(np.isfinite(x), x, np.nan), axis=0))

    def test_text_only_and_signal_only_fall_short(self, tables, features):
        from scipy.sparse import csr_matrix, hstack
        from sklearn.feature_extraction.text import TfidfVectorizer

        manifest, t = tables
        y = (t["label"] == "ischemic").to_numpy()
        bayes = float(np.mean((t["posterior_ischemic"].to_numpy() >= 0.5) == y))
        words = TfidfVectorizer(ngram_range=(1, 2), min_df=2).fit_transform(manifest["note"].to_list())
        demo = csr_matrix(np.c_[manifest["age"].to_numpy() / 100, (manifest["sex"] == "M").to_numpy()])
        text_acc = self._cv_accuracy(hstack([words, demo]).tocsr(), y)
        signal_acc = self._cv_accuracy(self._signal_features(features), y)
        majority = max(y.mean(), 1 - y.mean())
        assert text_acc < bayes - 0.08, (text_acc, bayes)
        assert signal_acc < bayes - 0.08, (signal_acc, bayes)
        # each modality carries information of its own (so the margins above are not met trivially)
        assert text_acc > majority + 0.03, (text_acc, majority)
        assert signal_acc > majority + 0.01, (signal_acc, majority)


class TestIngest:
    def test_ingest_loads_every_simulated_record(self, cohort, tables, tmp_path):
        ingest_mod = pytest.importorskip(
            "ecg_r1.data.ingest", reason="the manifest reader (ecg_r1.data.ingest) is not there"
        )
        from ecg_r1.data.store import open_signals, read_cohort

        out, _ = cohort
        manifest, _ = tables
        summary = ingest_mod.ingest([out / "manifest.csv"], tmp_path / "cohort")
        assert summary.quarantined == {} and summary.loaded == N_COHORT
        loaded = read_cohort(tmp_path / "cohort")
        assert set(loaded["hospital"]) == set(manifest["hospital"])
        cols = ["record_id", "label", "note", "twi_leads"]
        joined = loaded.select(cols).join(manifest.select(cols), on="record_id")
        assert len(joined) == N_COHORT
        for col in ("label", "note", "twi_leads"):
            assert (joined[col] == joined[f"{col}_right"]).all(), col
        assert open_signals(tmp_path / "cohort").shape == (N_COHORT, 12, 5000)
