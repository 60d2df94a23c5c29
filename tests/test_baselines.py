"""Reference rows: majority class, the feature baseline, the cited clinicians, the Bayes ceiling."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from test_features import T_AMPS, synthetic_ecg

from ecg_r1.data.features import with_features
from ecg_r1.evaluation.baselines import (
    CLINICIANS_ACCURACY,
    CLINICIANS_PPV,
    CLINICIANS_SOURCE,
    MEASURED_COLUMNS,
    FeatureBaseline,
    MajorityBaseline,
    bayes_ceiling,
    clinicians_metrics,
)
from ecg_r1.evaluation.evaluate import evaluate_predictions

NOTES_POS = ["chest pain since this morning, troponin raised", "crushing chest pain, smoker"]
NOTES_NEG = ["routine check, no chest pain", "athlete, no symptoms, troponin normal"]


def learnable_cases(n: int, seed: int, signal_from_note: bool = True) -> pl.DataFrame:
    """Label from deep TWI in V2 and, when asked, from the note; 10 % label noise; 40 % ischemic."""
    rng = np.random.default_rng(seed)
    ischemic = rng.random(n) < 0.4
    cols = {c: rng.normal(0, 1, n) for c in MEASURED_COLUMNS}
    # The ECG tells part of the story: deeper TWI in V2 when ischemic.
    cols["t_amp_V2"] = np.where(ischemic, rng.normal(-0.5, 0.15, n), rng.normal(-0.2, 0.15, n))
    cols["qt_ms"][rng.random(n) < 0.1] = np.nan  # unmeasured values stay missing
    if signal_from_note:
        notes = [NOTES_POS[i % 2] if y else NOTES_NEG[i % 2] for i, y in enumerate(ischemic)]
    else:
        notes = ["routine note"] * n
    label = np.where(rng.random(n) < 0.1, ~ischemic, ischemic)
    return pl.DataFrame(
        {
            "record_id": [f"s{seed}_{i}" for i in range(n)],
            "hospital": ["H1"] * n,
            "age": rng.integers(30, 90, n).astype(float),
            "sex": rng.choice(["M", "F"], n).tolist(),
            "note": notes,
            "label": ["ischemic" if v else "non-ischemic" for v in label],
            **cols,
        }
    )


class TestMajority:
    def test_answers_training_majority_everywhere(self) -> None:
        train = learnable_cases(300, 0)
        test = learnable_cases(100, 1)
        base = MajorityBaseline().fit(train)
        assert base.answer is False  # 40 % ischemic
        preds = base.predict(test)
        assert set(preds.y_pred) == {False}
        m = evaluate_predictions(preds, test, n_boot=200)
        truth = (test["label"] == "ischemic").to_numpy()
        assert m.accuracy.value == pytest.approx(1 - truth.mean())
        assert m.auroc.value == pytest.approx(0.5)  # a constant score ranks nothing

    def test_unlabelled_training_rows_are_left_out(self) -> None:
        train = pl.DataFrame({"record_id": ["a", "b", "c"], "label": ["ischemic", "unknown", "ischemic"]})
        assert MajorityBaseline().fit(train).prevalence == 1.0

    def test_unfitted_raises(self) -> None:
        with pytest.raises(RuntimeError, match="fit"):
            MajorityBaseline().predict(pl.DataFrame({"record_id": ["a"]}))


class TestFeatureBaseline:
    @pytest.fixture(scope="class")
    @classmethod
    def fitted(cls) -> tuple[FeatureBaseline, pl.DataFrame, pl.DataFrame]:
        train, test = learnable_cases(600, 0), learnable_cases(300, 1)
        return FeatureBaseline(seed=0, max_iter=100).fit(train), train, test

    def test_beats_majority_on_a_learnable_problem(self, fitted) -> None:
        model, train, test = fitted
        ours = evaluate_predictions(model.predict(test), test, n_boot=500)
        majority = evaluate_predictions(MajorityBaseline().fit(train).predict(test), test, n_boot=500)
        assert ours.accuracy.low > majority.accuracy.value + 0.1
        assert ours.auroc.value > 0.8
        assert ours.valid_rate.value == 1.0

    def test_uses_the_note(self) -> None:
        train, test = learnable_cases(600, 2), learnable_cases(300, 3)
        with_note = evaluate_predictions(
            FeatureBaseline(max_iter=100).fit(train).predict(test), test, n_boot=0
        )
        no_note = evaluate_predictions(
            FeatureBaseline(max_iter=100, use_note=False).fit(train).predict(test), test, n_boot=0
        )
        assert with_note.accuracy.value > no_note.accuracy.value + 0.03

    def test_save_and_load_give_same_scores(self, fitted, tmp_path) -> None:
        model, _, test = fitted
        back = FeatureBaseline.load(model.save(tmp_path / "fb.parquet"))
        np.testing.assert_array_equal(back.predict(test).p_yes, model.predict(test).p_yes)

    def test_short_notes_fall_back_to_no_note_flags(self, caplog) -> None:
        train = learnable_cases(60, 4, signal_from_note=False).with_columns(
            pl.lit(None, pl.String).alias("note")
        )
        with caplog.at_level("WARNING", logger="ecg_r1.evaluation.baselines"):
            model = FeatureBaseline(max_iter=20).fit(train)
        assert "training without note flags" in caplog.text
        # the fitted pipeline reads the numbers only: no note block ...
        blocks = [name for name, _, _ in model.pipeline.named_steps["columns"].transformers]
        assert blocks == ["numeric"]
        # ... and answers as the baseline built without the note does
        without = FeatureBaseline(max_iter=20, use_note=False).fit(train)
        np.testing.assert_array_equal(model.predict(train).p_yes, without.predict(train).p_yes)
        assert len(model.predict(train).y_pred) == 60

    def test_missing_feature_columns_explained(self) -> None:
        cases = pl.DataFrame({"record_id": ["a", "b"], "label": ["ischemic", "non-ischemic"]})
        with pytest.raises(ValueError, match="with_features"):
            FeatureBaseline().fit(cases)

    def test_one_class_refused(self) -> None:
        train = learnable_cases(50, 5).with_columns(pl.lit("ischemic").alias("label"))
        with pytest.raises(ValueError, match="one class"):
            FeatureBaseline().fit(train)


class TestWithFeatures:
    def test_measures_each_row_of_the_cohort(self) -> None:
        flat = {lead: 0.3 for lead in T_AMPS}
        signals = np.stack([synthetic_ecg(T_AMPS, seed=0), synthetic_ecg(flat, seed=1)])
        cohort = pl.DataFrame(
            {"record_id": ["b", "a"], "row": [1, 0], "twi_leads": ["", "V2,V3"], "label": ["x", "y"]}
        )
        out = with_features(cohort, signals)
        assert out["record_id"].to_list() == ["b", "a"]
        assert out["twi_leads"].to_list() == ["", "V2,V3"]  # the source's list is kept
        assert out["measured_twi_leads"].to_list() == ["", "aVL,V2,V3,V4"]
        assert out["t_amp_V2"][1] == pytest.approx(-0.5, abs=0.05)

    def test_rows_outside_the_signal_array_refused(self) -> None:
        with pytest.raises(ValueError, match="signal array"):
            with_features(pl.DataFrame({"record_id": ["a"], "row": [3]}), np.zeros((1, 12, 5000), np.float32))


class TestCitedAndCeiling:
    def test_clinicians_row_is_cited_not_measured(self) -> None:
        m = clinicians_metrics()
        # the paper quotes a PPV of about 50 %: only that is set, with no interval and n = 0
        assert m.ppv.value == CLINICIANS_PPV == CLINICIANS_ACCURACY == 0.5
        assert (
            m.n == 0 and math.isnan(m.ppv.low) and math.isnan(m.accuracy.value) and math.isnan(m.auroc.value)
        )
        assert "cited, not measured" in CLINICIANS_SOURCE and "doi:10.2196/87227" in CLINICIANS_SOURCE

    def test_bayes_ceiling_from_the_posterior(self) -> None:
        truth = pl.DataFrame(
            {
                "record_id": ["a", "b", "c", "d"],
                "posterior_ischemic": [0.9, 0.2, 0.6, 0.4],
                "label": ["ischemic", "non-ischemic", "non-ischemic", "ischemic"],
            }
        )
        cases = truth.select("record_id", "label")[[3, 0, 1]]
        preds = bayes_ceiling(truth, cases)
        assert preds.record_id == ["d", "a", "b"] and preds.y_pred == [False, True, False]
        m = evaluate_predictions(preds, cases, n_boot=0)
        assert m.accuracy.value == pytest.approx(2 / 3) and m.auroc.value == pytest.approx(1.0)

    def test_bayes_ceiling_refuses_unknown_cases_and_real_cohorts(self) -> None:
        truth = pl.DataFrame({"record_id": ["a"], "posterior": [0.7]})
        with pytest.raises(ValueError, match="not in the truth table"):
            bayes_ceiling(truth, pl.DataFrame({"record_id": ["a", "z"]}))
        with pytest.raises(ValueError, match="simulated"):
            bayes_ceiling(pl.DataFrame({"record_id": ["a"]}))


def test_with_features_on_the_whole_array_in_order_matches_a_subset() -> None:
    signals = np.stack([synthetic_ecg(T_AMPS, hr=60 + 8 * i, seed=i) for i in range(3)])
    whole = with_features(pl.DataFrame({"record_id": ["a", "b", "c"], "row": [0, 1, 2]}), signals)
    some = with_features(pl.DataFrame({"record_id": ["c", "a"], "row": [2, 0]}), signals)
    assert some["hr_bpm"].to_list() == [whole["hr_bpm"][2], whole["hr_bpm"][0]]
