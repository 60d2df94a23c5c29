"""Two models on the same cases: the accuracy difference with its paired bootstrap interval, and
McNemar's test on the discordant cases.

The conventions are :mod:`ecg_r1.evaluation.evaluate`'s: ``y_true`` a boolean per case, answers
True / False or None where the output was invalid (counted wrong for either model), intervals
from the same seeded resamples of cases for both models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import polars as pl
from scipy.stats import binom, binomtest

from ecg_r1.constants import DEFAULT_SEED, N_BOOT
from ecg_r1.evaluation.evaluate import (
    Estimate,
    as_predictions,
    as_truth,
    bootstrap_indices,
    check_lengths,
    percentile_interval,
)


@dataclass(frozen=True)
class PairedComparison:
    """Two models on the same cases: accuracy difference (a - b) and McNemar's test."""

    n: int
    accuracy_a: float
    accuracy_b: float
    difference: Estimate  # accuracy_a - accuracy_b, paired bootstrap interval
    only_a_correct: int  # discordant cases a got right and b wrong
    only_b_correct: int
    p_exact: float  # McNemar exact (two-sided binomial on the discordant pairs)
    p_mid: float  # McNemar mid-p (less conservative; recommended by Fagerland et al. 2013)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_paired(
    y_true: Sequence[bool] | np.ndarray | pl.Series,
    pred_a: Sequence[bool | None] | np.ndarray | pl.Series,
    pred_b: Sequence[bool | None] | np.ndarray | pl.Series,
    n_boot: int = N_BOOT,
    seed: int = DEFAULT_SEED,
    alpha: float = 0.05,
) -> PairedComparison:
    """Compare two models' answers on the same cases (invalid counts as wrong for both).

    Args:
        y_true: True where ischemic.
        pred_a: model a's answers (None = invalid).
        pred_b: model b's answers on the same cases, same order.
        n_boot: paired bootstrap resamples (the same resampled cases for both models).
        seed: resampling seed.
        alpha: 1 - confidence level of the difference's interval.

    Returns:
        :class:`PairedComparison` with the accuracy difference a - b and McNemar p-values.

    Example:
        >>> c = compare_paired([True] * 4, [True, True, True, False], [True, False, False, False], n_boot=0)
        >>> c.only_a_correct, c.only_b_correct, round(c.difference.value, 2)
        (2, 0, 0.5)
    """
    y = as_truth(y_true)
    a, va = as_predictions(pred_a)
    b, vb = as_predictions(pred_b)
    n = check_lengths(y_true=y, pred_a=a, pred_b=b)
    if n == 0:
        raise ValueError("no cases to compare")
    ca = va & (a == y)
    cb = vb & (b == y)
    only_a = int((ca & ~cb).sum())
    only_b = int((cb & ~ca).sum())
    p_exact, p_mid = mcnemar(only_a, only_b)
    diff = float(ca.mean() - cb.mean())
    low = high = math.nan
    if n_boot > 0:
        diffs = [ca[idx].mean(axis=1) - cb[idx].mean(axis=1) for idx in bootstrap_indices(n, n_boot, seed)]
        low, high = percentile_interval(np.concatenate(diffs), alpha)
    return PairedComparison(
        n=n,
        accuracy_a=float(ca.mean()),
        accuracy_b=float(cb.mean()),
        difference=Estimate(diff, low, high, n),
        only_a_correct=only_a,
        only_b_correct=only_b,
        p_exact=p_exact,
        p_mid=p_mid,
    )


def mcnemar(only_a: int, only_b: int) -> tuple[float, float]:
    """McNemar's exact and mid-p two-sided p-values from the two discordant counts.

    Args:
        only_a: cases model a got right and model b wrong.
        only_b: the reverse.

    Returns:
        ``(p_exact, p_mid)``; both 1.0 when there are no discordant cases.
    """
    m = only_a + only_b
    if m == 0:
        return 1.0, 1.0
    k = min(only_a, only_b)
    p_exact = float(binomtest(k, m, 0.5).pvalue)
    p_mid = float(min(1.0, 2 * (binom.cdf(k, m, 0.5) - 0.5 * binom.pmf(k, m, 0.5))))
    return p_exact, p_mid
