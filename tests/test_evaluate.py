"""Metrics, intervals, invalid outputs, per-hospital breakdown and paired comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ecg_r1.evaluation.evaluate import (
    Estimate,
    _auroc_rows,
    as_predictions,
    evaluate_binary,
    evaluate_by_group,
    metrics_table,
)
from ecg_r1.evaluation.paired import compare_paired, mcnemar

# 4 ischemic, 6 not. Answers: 3 TP, 1 FN, 4 TN, 1 FP, and one invalid on a negative case.
Y = [True, True, True, True, False, False, False, False, False, False]
P = [True, True, True, False, False, False, False, False, True, None]


class TestEvaluateBinary:
    def test_hand_computed_metrics_with_invalid_counted_wrong(self) -> None:
        m = evaluate_binary(Y, P, n_boot=0)
        assert m.confusion == {"tp": 3, "fp": 2, "tn": 4, "fn": 1}
        assert m.accuracy.value == pytest.approx(7 / 10)
        assert m.sensitivity.value == pytest.approx(3 / 4)
        assert m.specificity.value == pytest.approx(4 / 6)
        assert m.ppv.value == pytest.approx(3 / 5)
        assert m.npv.value == pytest.approx(4 / 5)
        assert m.f1.value == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
        assert m.valid_rate.value == pytest.approx(0.9)
        assert (m.n, m.n_positive, m.n_invalid) == (10, 4, 1)
        assert math.isnan(m.auroc.value)  # no scores given

    def test_invalid_on_a_positive_case_is_a_false_negative(self) -> None:
        m = evaluate_binary([True, True], [True, None], n_boot=0)
        assert m.sensitivity.value == 0.5 and m.accuracy.value == 0.5

    def test_all_invalid_scores_zero_accuracy(self) -> None:
        m = evaluate_binary([True, False, True], [None, None, None], n_boot=0)
        assert m.accuracy.value == 0.0 and m.valid_rate.value == 0.0

    def test_auroc_from_scores(self) -> None:
        m = evaluate_binary(
            [True, True, False, False], [True, False, True, False], [0.9, 0.4, 0.5, 0.1], n_boot=0
        )
        assert m.auroc.value == pytest.approx(0.75)

    def test_missing_score_ranks_as_wrong(self) -> None:
        m = evaluate_binary([True, False, True, False], [True] * 4, [float("nan"), 0.2, 0.9, 0.1], n_boot=0)
        # the NaN positive ranks below both negatives: pairs won 2 of 4
        assert m.auroc.value == pytest.approx(0.5)

    def test_interval_contains_point_and_narrows_with_n(self) -> None:
        rng = np.random.default_rng(1)
        widths = []
        for n in (100, 2000):
            y = rng.random(n) < 0.4
            pred = np.where(rng.random(n) < 0.8, y, ~y)
            scores = np.where(y, rng.normal(1, 1, n), rng.normal(0, 1, n))
            m = evaluate_binary(y, pred, scores, n_boot=1000, seed=0)
            for name in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "auroc"):
                est: Estimate = getattr(m, name)
                assert est.low <= est.value <= est.high, name
                assert est.n == n
            widths.append(m.accuracy.high - m.accuracy.low)
        assert widths[1] < widths[0] / 3  # width shrinks about as 1/sqrt(n): sqrt(20) = 4.5

    def test_interval_is_close_to_the_normal_approximation(self) -> None:
        y = np.array([True] * 500 + [False] * 500)
        pred = y.copy()
        pred[:200] = ~pred[:200]  # accuracy 0.8
        m = evaluate_binary(y, pred, n_boot=2000, seed=3)
        half = 1.96 * math.sqrt(0.8 * 0.2 / 1000)
        assert m.accuracy.low == pytest.approx(0.8 - half, abs=0.01)
        assert m.accuracy.high == pytest.approx(0.8 + half, abs=0.01)

    def test_seeded(self) -> None:
        scores = np.linspace(0, 1, len(Y))
        a = evaluate_binary(Y, P, scores, n_boot=500, seed=7)
        assert a == evaluate_binary(Y, P, scores, n_boot=500, seed=7)
        assert a != evaluate_binary(Y, P, scores, n_boot=500, seed=8)

    def test_undefined_metric_is_nan_not_an_error(self) -> None:
        m = evaluate_binary([False, False, False], [False, True, False], [0.1, 0.9, 0.2], n_boot=200)
        assert math.isnan(m.sensitivity.value) and math.isnan(m.auroc.value)
        assert m.specificity.value == pytest.approx(2 / 3)
        assert str(m.sensitivity) == "n/a"

    def test_bad_inputs_raise_clear_errors(self) -> None:
        with pytest.raises(ValueError, match="differ in length"):
            evaluate_binary([True, False], [True])
        with pytest.raises(ValueError, match="unknown"):
            evaluate_binary([True, None], [True, False])
        with pytest.raises(ValueError, match="must be True/False"):
            evaluate_binary([True], ["Yes"])
        with pytest.raises(ValueError, match="no cases"):
            evaluate_binary([], [])

    def test_flat_dict_for_tracking(self) -> None:
        flat = evaluate_binary(Y, P, n_boot=100).flat("test_")
        assert flat["test_accuracy"] == pytest.approx(0.7)
        assert {"test_accuracy_low", "test_auroc_high", "test_n", "test_n_invalid"} <= set(flat)


class TestAurocRows:
    def test_matches_sklearn_with_ties(self) -> None:
        rng = np.random.default_rng(0)
        y = rng.random((20, 50)) < 0.5
        s = np.round(rng.random((20, 50)), 1)  # many ties
        ours = _auroc_rows(y, s)
        for i in range(20):
            assert ours[i] == pytest.approx(roc_auc_score(y[i], s[i]))


class TestAsPredictions:
    def test_none_and_nan_are_invalid(self) -> None:
        pred, valid = as_predictions([True, None, False, float("nan"), 1, 0])
        assert valid.tolist() == [True, False, True, False, True, True]
        assert pred[valid].tolist() == [True, False, True, False]


class TestByGroup:
    def test_each_hospital_on_its_own_cases(self) -> None:
        groups = ["A"] * 5 + ["B"] * 5
        res = evaluate_by_group(Y, P, groups, n_boot=100)
        assert list(res) == ["A", "B"]
        assert res["A"].n == 5 and res["B"].n == 5
        assert res["A"].accuracy.value == pytest.approx(4 / 5)  # T T T F(FN) F(TN)
        assert res["B"].accuracy.value == pytest.approx(3 / 5)  # TN TN TN FP invalid
        table = metrics_table(res)
        assert table["name"].to_list() == ["A", "B"] and "accuracy_low" in table.columns


class TestPaired:
    def test_mcnemar_known_table(self) -> None:
        # 1 vs 9 discordant pairs: exact p = 2 * P(X <= 1 | 10, 0.5) = 2 * 11 / 1024
        p_exact, p_mid = mcnemar(1, 9)
        assert p_exact == pytest.approx(22 / 1024)
        assert p_mid == pytest.approx(2 * (11 / 1024 - 0.5 * 10 / 1024))
        assert mcnemar(0, 0) == (1.0, 1.0)
        assert mcnemar(5, 5)[0] == pytest.approx(1.0)

    def test_compare_counts_discordant_cases_and_bootstraps_difference(self) -> None:
        rng = np.random.default_rng(2)
        n = 600
        y = rng.random(n) < 0.5
        a = np.where(rng.random(n) < 0.85, y, ~y)
        b = np.where(rng.random(n) < 0.65, y, ~y).astype(object)
        b[:30] = None  # invalid outputs of b count as wrong
        c = compare_paired(y, a, b, n_boot=1000)
        ca = a == y
        cb = (b == y) & np.array([v is not None for v in b])
        assert c.only_a_correct == int((ca & ~cb).sum())
        assert c.only_b_correct == int((cb & ~ca).sum())
        assert c.difference.value == pytest.approx(ca.mean() - cb.mean())
        assert c.difference.low <= c.difference.value <= c.difference.high
        assert c.difference.low > 0  # a is clearly better
        assert c.p_exact < 1e-6 and c.p_mid <= c.p_exact

    def test_identical_models_do_not_differ(self) -> None:
        c = compare_paired(Y, P, P, n_boot=200)
        assert c.difference.value == 0 and c.p_exact == 1.0
        assert c.difference.low == 0 and c.difference.high == 0


class TestPredictions:
    def _cases(self):
        import polars as pl

        return pl.DataFrame(
            {
                "record_id": [f"r{i}" for i in range(10)],
                "label": ["ischemic" if y else "non-ischemic" for y in Y],
                "hospital": ["A"] * 5 + ["B"] * 5,
            }
        )

    def test_evaluates_in_case_order_whatever_the_prediction_order(self) -> None:
        from ecg_r1.evaluation.evaluate import (
            Predictions,
            evaluate_predictions,
            evaluate_predictions_by_group,
        )

        order = list(reversed(range(10)))
        preds = Predictions(
            "m", [f"r{i}" for i in order], [P[i] for i in order], np.linspace(0, 1, 10)[order]
        )
        m = evaluate_predictions(preds, self._cases(), n_boot=0)
        assert m.accuracy.value == pytest.approx(0.7) and m.n_invalid == 1
        by = evaluate_predictions_by_group(preds, self._cases(), n_boot=0)
        assert by["A"].accuracy.value == pytest.approx(0.8)

    def test_missing_predictions_are_an_error_not_dropped(self) -> None:
        from ecg_r1.evaluation.evaluate import Predictions, evaluate_predictions

        preds = Predictions("m", [f"r{i}" for i in range(9)], P[:9])
        with pytest.raises(ValueError, match="1 of 10 cases have no prediction"):
            evaluate_predictions(preds, self._cases())

    def test_unknown_labels_refused(self) -> None:
        from ecg_r1.evaluation.evaluate import labels_to_truth

        assert labels_to_truth(["ischemic", "non-ischemic"]).tolist() == [True, False]
        with pytest.raises(ValueError, match="unknown"):
            labels_to_truth(["ischemic", "unknown"])

    def test_frame_round_trip(self) -> None:
        from ecg_r1.evaluation.evaluate import Predictions

        preds = Predictions(
            "m", ["a", "b", "c"], [True, None, False], np.array([0.9, np.nan, 0.2]), ["x", None, "z"]
        )
        back = Predictions.from_frame("m", preds.to_frame())
        assert back.y_pred == [True, None, False] and back.reasoning == ["x", None, "z"]
        assert np.isnan(back.p_yes[1]) and back.p_yes[0] == 0.9
        with pytest.raises(ValueError, match="repeat"):
            Predictions("m", ["a", "a"], [True, False])
