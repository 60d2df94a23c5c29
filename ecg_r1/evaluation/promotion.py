"""The promotion rule: when a newly trained model (the challenger) replaces the champion.

The challenger becomes champion only if its accuracy on the cross-hospital split (hospitals no
model trained on) is **not significantly worse** than the champion's on the same cases, by a
paired test; with no champion yet, the challenger is promoted. "Not worse" rather than "better":
a retrained model on new data should not have to beat the old one by a significant margin to
replace it (that would freeze the first model in place), but it must not lose accuracy where it
matters most, at an unseen hospital.

Two paired tests are offered, both from :func:`ecg_r1.evaluation.paired.compare_paired` (the statistics
live there, once):

* ``"mcnemar"``: refuse when the challenger's accuracy is lower and McNemar's two-sided mid-p
  value on the discordant cases is below ``alpha``. McNemar tests equality, so it takes no margin.
* ``"paired_bootstrap"``: refuse when the whole two-sided ``1 - alpha`` paired-bootstrap interval
  of the accuracy difference (challenger - champion) lies below ``-margin``. With a margin above 0
  this is a non-inferiority rule: a loss smaller than the margin is tolerated.

Invalid outputs count as wrong for both models, as in every evaluation. The decision carries its
figures (accuracies, difference and interval, discordant counts, p-values, n) so the asset that
applies it can show them and :func:`record_decision` can write them on the model version.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from ecg_r1.constants import (
    DEFAULT_SEED,
    N_BOOT,
    PROMOTION_ALPHA,
    PROMOTION_MARGIN,
    PROMOTION_TEST,
    PROMOTION_TESTS,
)
from ecg_r1.evaluation.evaluate import evaluate_binary
from ecg_r1.evaluation.paired import PairedComparison, compare_paired

logger = logging.getLogger(__name__)

METRICS = ("accuracy",)
CHAMPION = "champion"
CHALLENGER = "challenger"

Predictions = Sequence[bool | None] | np.ndarray


@dataclass(frozen=True)
class PromotionRule:
    """How a challenger is judged against the champion (configurable from Dagster config).

    Attributes:
        metric: the compared metric; only ``"accuracy"`` has a paired test here.
        split: the split the predictions come from (the caller selects the cases; recorded in
            the figures). Default ``"test_external"``: the cross-hospital split.
        test: ``"mcnemar"`` or ``"paired_bootstrap"`` (see the module docstring).
        alpha: significance level of the two-sided test, in (0, 0.5].
        margin: non-inferiority margin in accuracy points (0.02 = 2 points); 0 means "not
            significantly worse". Only the paired bootstrap takes a margin.
        n_boot: paired bootstrap resamples.
        seed: resampling seed, so a decision can be reproduced.
    """

    metric: str = "accuracy"
    split: str = "test_external"
    test: Literal["mcnemar", "paired_bootstrap"] = PROMOTION_TEST
    alpha: float = PROMOTION_ALPHA
    margin: float = PROMOTION_MARGIN
    n_boot: int = N_BOOT
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"promotion metric {self.metric!r} is not supported; use one of {METRICS}")
        if self.test not in PROMOTION_TESTS:
            raise ValueError(f"promotion test {self.test!r} is unknown; use one of {PROMOTION_TESTS}")
        if not 0.0 < self.alpha <= 0.5:
            raise ValueError(f"alpha={self.alpha} must lie in (0, 0.5]; 0.05 is the usual choice")
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"margin={self.margin} must lie in [0, 1) (accuracy points, 0.02 = 2 points)")
        if self.margin > 0 and self.test != "paired_bootstrap":
            raise ValueError(
                f"margin={self.margin} needs test='paired_bootstrap': McNemar's test asks whether two "
                "accuracies differ and cannot test non-inferiority within a margin"
            )
        if self.test == "paired_bootstrap" and self.n_boot < 100:
            raise ValueError(f"n_boot={self.n_boot} is too few for a bootstrap interval; use at least 1000")


@dataclass(frozen=True)
class PromotionDecision:
    """The outcome of :func:`decide_promotion`.

    Attributes:
        promote: True when the challenger should become champion.
        reason: one sentence a person can read in the UI or the MLflow tags.
        figures: flat scalars behind the decision (for Dagster metadata and MLflow tags).
    """

    promote: bool
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide_promotion(
    y_true: Sequence[bool] | np.ndarray,
    champion_pred: Predictions | None,
    challenger_pred: Predictions,
    rule: PromotionRule | None = None,
) -> PromotionDecision:
    """Decide whether the challenger replaces the champion on the rule's split.

    Args:
        y_true: True where the case is ischemic, one per case of the rule's split (unknown labels
            filtered out).
        champion_pred: the champion's answers on the same cases in the same order (True / False,
            None where its output was invalid); None when there is no champion yet.
        challenger_pred: the challenger's answers, likewise.
        rule: the promotion rule; default :class:`PromotionRule` (McNemar, alpha 0.05, no margin).

    Returns:
        :class:`PromotionDecision`; ``figures`` holds ``n``, both accuracies, the difference
        (challenger - champion) with its interval, the discordant counts and the p-values.

    Raises:
        ValueError: on inputs of different lengths, no cases, or predictions that are not
            True / False / None.

    Example:
        >>> y = [True, False] * 50
        >>> decide_promotion(y, None, y).promote
        True
        >>> worse = [not v for v in y[:40]] + y[40:]
        >>> decide_promotion(y, y, worse).promote
        False
    """
    rule = rule or PromotionRule()
    if champion_pred is None:
        return _first_champion(y_true, challenger_pred, rule)
    # a = challenger, b = champion: the difference is challenger - champion.
    comparison = compare_paired(
        y_true, challenger_pred, champion_pred, n_boot=rule.n_boot, seed=rule.seed, alpha=rule.alpha
    )
    diff = comparison.difference
    figures = _rule_figures(rule) | {
        "has_champion": True,
        "n": comparison.n,
        "challenger_accuracy": comparison.accuracy_a,
        "champion_accuracy": comparison.accuracy_b,
        "difference": diff.value,
        "difference_low": diff.low,
        "difference_high": diff.high,
        "only_challenger_correct": comparison.only_a_correct,
        "only_champion_correct": comparison.only_b_correct,
        "mcnemar_p_exact": comparison.p_exact,
        "mcnemar_p_mid": comparison.p_mid,
    }
    summary = (
        f"{rule.split} accuracy {comparison.accuracy_a:.3f} (challenger) vs {comparison.accuracy_b:.3f} "
        f"(champion), difference {diff.value:+.3f}"
    )
    significantly_worse, evidence = _significantly_worse(comparison, rule)
    if significantly_worse:
        decision = PromotionDecision(
            False, f"refused: the challenger is significantly worse: {summary}; {evidence}", figures
        )
    else:
        decision = PromotionDecision(
            True, f"promoted: the challenger is not significantly worse: {summary}; {evidence}", figures
        )
    logger.info(decision.reason)
    return decision


def _rule_figures(rule: PromotionRule) -> dict[str, Any]:
    """The rule's settings, the figures every decision carries."""
    return {
        "metric": rule.metric,
        "split": rule.split,
        "test": rule.test,
        "alpha": rule.alpha,
        "margin": rule.margin,
    }


def _first_champion(
    y_true: Sequence[bool] | np.ndarray, challenger_pred: Predictions, rule: PromotionRule
) -> PromotionDecision:
    """With no champion yet the challenger is promoted; the figures hold its accuracy."""
    challenger = evaluate_binary(y_true, challenger_pred, n_boot=0)
    figures = _rule_figures(rule) | {
        "n": challenger.n,
        "challenger_accuracy": challenger.accuracy.value,
        "has_champion": False,
    }
    reason = (
        f"no champion yet: the challenger is promoted (its {rule.split} accuracy "
        f"{challenger.accuracy.value:.3f}, n={challenger.n})"
    )
    logger.info(reason)
    return PromotionDecision(True, reason, figures)


def _significantly_worse(comparison: PairedComparison, rule: PromotionRule) -> tuple[bool, str]:
    """Whether the rule's test finds the challenger (a) significantly worse than the champion (b),
    and the evidence in words."""
    diff = comparison.difference
    if rule.test == "mcnemar":
        evidence = (
            f"McNemar mid-p {comparison.p_mid:.3g} on {comparison.only_a_correct}+"
            f"{comparison.only_b_correct} discordant cases, alpha {rule.alpha}"
        )
        return diff.value < 0 and comparison.p_mid < rule.alpha, evidence
    if math.isnan(diff.high):
        raise ValueError(
            f"the paired bootstrap gave no interval on n={comparison.n} cases; the split is too small "
            "to decide, add cases or use test='mcnemar'"
        )
    level = round(100 * (1 - rule.alpha), 1)
    evidence = (
        f"{level:g}% paired bootstrap interval [{diff.low:+.3f}, {diff.high:+.3f}], margin {rule.margin}"
    )
    return diff.high < -rule.margin, evidence


def record_decision(
    model_name: str, challenger_version: int | str, decision: PromotionDecision
) -> dict[str, str]:
    """Apply a decision in the MLflow registry (the tracking URI must already be configured).

    The challenger version always gets the ``challenger`` alias and tags with the decision and its
    figures (``promotion.decision``, ``promotion.reason``, ``promotion.<figure>``); when promoted it
    also gets the ``champion`` alias, which moves the alias away from the old champion.

    Args:
        model_name: registered model, e.g. ``ecg-r1-grpo``.
        challenger_version: the challenger's version number.
        decision: from :func:`decide_promotion`.

    Returns:
        The tags written on the version.
    """
    from ecg_r1.tracking.model_registry import set_alias
    from mlflow import MlflowClient

    version = str(challenger_version)
    tags = {
        "promotion.decision": "promoted" if decision.promote else "refused",
        "promotion.reason": decision.reason[:5000],  # MLflow caps tag values
    }
    tags |= {f"promotion.{key}": str(value) for key, value in decision.figures.items()}
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    set_alias(model_name, CHALLENGER, version)
    if decision.promote:
        set_alias(model_name, CHAMPION, version)
    logger.info("%s version %s: %s", model_name, version, tags["promotion.decision"])
    return tags
