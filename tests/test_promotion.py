"""The promotion rule: a challenger replaces the champion only if not significantly worse."""

from __future__ import annotations

import numpy as np
import pytest

from ecg_r1.evaluation.promotion import PromotionDecision, PromotionRule, decide_promotion, record_decision

N = 400


def _cases(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(N) < 0.45


def _with_accuracy(y: np.ndarray, accuracy: float, seed: int) -> list[bool]:
    """Answers right on exactly ``accuracy`` of the cases (which ones drawn with ``seed``)."""
    wrong = np.random.default_rng(seed).permutation(len(y))[: round((1 - accuracy) * len(y))]
    pred = y.copy()
    pred[wrong] = ~pred[wrong]
    return pred.tolist()


BOTH_TESTS = [PromotionRule(test="mcnemar"), PromotionRule(test="paired_bootstrap", n_boot=1000)]


class TestNoChampion:
    def test_challenger_is_promoted(self):
        y = _cases()
        decision = decide_promotion(y, None, _with_accuracy(y, 0.6, seed=1))
        assert decision.promote is True
        assert "no champion" in decision.reason
        assert decision.figures["has_champion"] is False
        assert decision.figures["challenger_accuracy"] == pytest.approx(0.6)
        assert decision.figures["n"] == N

    def test_even_a_poor_first_model_becomes_champion(self):
        # Nothing to compare against: refusing would leave no model to serve.
        y = _cases()
        assert decide_promotion(y, None, [None] * N).promote is True


@pytest.mark.parametrize("rule", BOTH_TESTS, ids=lambda r: r.test)
class TestBothDirections:
    def test_clearly_worse_challenger_is_refused(self, rule):
        y = _cases()
        decision = decide_promotion(y, _with_accuracy(y, 0.85, seed=1), _with_accuracy(y, 0.65, seed=2), rule)
        assert decision.promote is False
        assert decision.reason.startswith("refused")
        assert decision.figures["champion_accuracy"] == pytest.approx(0.85)
        assert decision.figures["challenger_accuracy"] == pytest.approx(0.65)
        assert decision.figures["difference"] == pytest.approx(-0.20)

    def test_identical_challenger_is_promoted(self, rule):
        y = _cases()
        same = _with_accuracy(y, 0.8, seed=1)
        decision = decide_promotion(y, same, list(same), rule)
        assert decision.promote is True
        assert decision.figures["difference"] == 0.0

    def test_equally_accurate_on_other_cases_is_promoted(self, rule):
        y = _cases()
        decision = decide_promotion(y, _with_accuracy(y, 0.8, seed=1), _with_accuracy(y, 0.8, seed=2), rule)
        assert decision.promote is True
        assert decision.figures["only_challenger_correct"] == decision.figures["only_champion_correct"]

    def test_better_challenger_is_promoted(self, rule):
        y = _cases()
        decision = decide_promotion(y, _with_accuracy(y, 0.7, seed=1), _with_accuracy(y, 0.9, seed=2), rule)
        assert decision.promote is True
        assert decision.figures["difference"] == pytest.approx(0.2)

    def test_slightly_worse_within_noise_is_promoted(self, rule):
        # One point lower on 400 cases is well within chance: not "significantly worse".
        y = _cases()
        decision = decide_promotion(y, _with_accuracy(y, 0.80, seed=1), _with_accuracy(y, 0.79, seed=2), rule)
        assert decision.promote is True
        assert decision.figures["difference"] == pytest.approx(-0.01)

    def test_invalid_outputs_count_as_wrong(self, rule):
        # A challenger whose answers would be perfect but are invalid on 30% of cases loses.
        y = _cases()
        challenger: list[bool | None] = y.tolist()
        for i in range(0, N, 10):
            challenger[i : i + 3] = [None, None, None]
        decision = decide_promotion(y, _with_accuracy(y, 0.95, seed=1), challenger, rule)
        assert decision.figures["challenger_accuracy"] == pytest.approx(0.7)
        assert decision.promote is False


class TestMargin:
    def test_margin_tolerates_a_small_significant_loss(self):
        y = np.random.default_rng(3).random(4000) < 0.5
        champion = _with_accuracy(y, 0.85, seed=1)
        challenger = _with_accuracy(y, 0.82, seed=2)
        strict = decide_promotion(y, champion, challenger, PromotionRule(test="paired_bootstrap"))
        lenient = decide_promotion(
            y, champion, challenger, PromotionRule(test="paired_bootstrap", margin=0.06)
        )
        assert strict.promote is False  # 3 points on 4000 cases is significant
        assert lenient.promote is True  # ... but within a 6-point non-inferiority margin
        assert lenient.figures["difference_low"] > -0.06

    def test_margin_is_refused_with_mcnemar(self):
        with pytest.raises(ValueError, match="paired_bootstrap"):
            PromotionRule(test="mcnemar", margin=0.02)


class TestAlpha:
    def test_stricter_alpha_lets_a_borderline_loss_through(self):
        y = _cases()
        champion = _with_accuracy(y, 0.85, seed=1)
        challenger = _with_accuracy(y, 0.80, seed=4)
        loose = decide_promotion(y, champion, challenger, PromotionRule(alpha=0.5))
        strict = decide_promotion(y, champion, challenger, PromotionRule(alpha=1e-6))
        p = loose.figures["mcnemar_p_mid"]
        assert 1e-6 < p < 0.5, p  # the case is borderline between the two levels
        assert loose.promote is False
        assert strict.promote is True


class TestBadInput:
    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"metric": "auroc"}, "not supported"),
            ({"test": "t-test"}, "unknown"),
            ({"alpha": 0.0}, "alpha"),
            ({"alpha": 0.9}, "alpha"),
            ({"test": "paired_bootstrap", "margin": -0.1}, "margin"),
            ({"test": "paired_bootstrap", "n_boot": 10}, "n_boot"),
        ],
    )
    def test_bad_rule_says_what_to_use(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            PromotionRule(**kwargs)

    def test_predictions_of_other_cases_are_refused(self):
        y = _cases()
        with pytest.raises(ValueError, match="length"):
            decide_promotion(y, y.tolist(), y.tolist()[:-1])

    def test_string_answers_are_refused(self):
        with pytest.raises(ValueError, match="True/False"):
            decide_promotion([True, False], [True, False], ["Yes", "No"])


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory, seed_mlflow_db):
    """One registry (creating an MLflow database takes seconds) with two versions of ecg-r1-grpo."""
    mlflow = pytest.importorskip("mlflow")
    tmp_path = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{seed_mlflow_db(tmp_path / 'mlflow.db')}"
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_REGISTRY_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        client = mlflow.MlflowClient()
        experiment = client.create_experiment(
            "promotion", artifact_location=(tmp_path / "artifacts").as_uri()
        )
        client.create_registered_model("ecg-r1-grpo")
        for _ in range(2):
            run = client.create_run(experiment)
            client.create_model_version(
                "ecg-r1-grpo", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
            )
        yield client
        mlflow.set_tracking_uri(previous)
        mlflow.set_registry_uri(previous)


class TestRecordDecision:
    def test_promotion_moves_the_champion_alias(self, mlflow_store):
        client = mlflow_store
        client.set_registered_model_alias("ecg-r1-grpo", "champion", "1")
        decision = PromotionDecision(True, "promoted: test", {"difference": 0.01, "n": 10})
        record_decision("ecg-r1-grpo", 2, decision)
        assert int(client.get_model_version_by_alias("ecg-r1-grpo", "champion").version) == 2
        assert int(client.get_model_version_by_alias("ecg-r1-grpo", "challenger").version) == 2
        tags = client.get_model_version("ecg-r1-grpo", "2").tags
        assert tags["promotion.decision"] == "promoted"
        assert tags["promotion.difference"] == "0.01"

    def test_refusal_keeps_the_champion(self, mlflow_store):
        client = mlflow_store
        client.set_registered_model_alias("ecg-r1-grpo", "champion", "1")
        record_decision("ecg-r1-grpo", "2", PromotionDecision(False, "refused: worse", {"n": 10}))
        assert int(client.get_model_version_by_alias("ecg-r1-grpo", "champion").version) == 1
        assert int(client.get_model_version_by_alias("ecg-r1-grpo", "challenger").version) == 2
        assert client.get_model_version("ecg-r1-grpo", "2").tags["promotion.reason"] == "refused: worse"
