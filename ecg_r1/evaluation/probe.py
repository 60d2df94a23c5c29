"""Linear probe of a vision tower: how much of the label its image tokens carry.

The language model receives the vision tower's merged tokens (:func:`ecg_r1.training.vision.page_tokens`).
A logistic regression on those tokens, fitted on the training split with the regularisation
chosen on the validation split, says what a reader of the tokens can get from the image alone.
Beside a trained model's row without the note, it separates the two ways an image pathway
fails: a tower whose tokens do not carry the answer, or a language model that does not read
them (README, "Which recipe works for the tiny profile").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ecg_r1.evaluation.evaluate import BinaryMetrics, evaluate_binary

# Inverse L2 strengths tried; the tokens number thousands per page against about a thousand
# training cases, so only strong regularisation generalises (measured: best 0.001-0.03).
DEFAULT_CS: tuple[float, ...] = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)


@dataclass(frozen=True)
class ProbeResult:
    """A fitted probe's choice and its held-out figures.

    Attributes:
        c: the inverse regularisation strength chosen on the selection split.
        selection_accuracy: every tried ``C`` -> accuracy on the selection split.
        metrics: split -> accuracy, AUROC and the rest with bootstrap CIs, for every test split.
    """

    c: float
    selection_accuracy: dict[float, float]
    metrics: dict[str, BinaryMetrics]


def fit_probe(
    train: tuple[np.ndarray, np.ndarray],
    select: tuple[np.ndarray, np.ndarray],
    tests: Mapping[str, tuple[np.ndarray, np.ndarray]],
    cs: Sequence[float] = DEFAULT_CS,
    n_boot: int = 2000,
    seed: int = 0,
) -> ProbeResult:
    """Fit a logistic regression per ``C`` on ``train``, keep the best on ``select``, score ``tests``.

    Args:
        train, select: ``(features, is_ischemic)``; features ``(cases, ...)`` are flattened per case.
        tests: split name -> ``(features, is_ischemic)``; never used for fitting or choosing.
        cs: inverse regularisation strengths to try; ties go to the stronger regularisation.
        n_boot, seed: bootstrap of the test metrics' CIs.

    Raises:
        ValueError: when the training split lacks one of the classes, or ``cs`` is empty.
    """
    from sklearn.linear_model import LogisticRegression

    def flat(x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64).reshape(len(x), -1)

    x_train, y_train = flat(train[0]), np.asarray(train[1], dtype=bool)
    if len(set(y_train.tolist())) < 2:
        raise ValueError("the training split needs ischemic and non-ischemic cases to fit a probe")
    if not cs:
        raise ValueError("no regularisation strength to try")
    x_select, y_select = flat(select[0]), np.asarray(select[1], dtype=bool)
    fitted, scores = {}, {}
    for c in sorted(cs):
        fitted[c] = LogisticRegression(C=c, max_iter=3000).fit(x_train, y_train)
        scores[c] = float((fitted[c].predict(x_select) == y_select).mean())
    best = max(sorted(cs), key=lambda c: scores[c])  # max keeps the first (smallest C) among ties
    metrics = {}
    for name, (x, y) in tests.items():
        p_yes = fitted[best].predict_proba(flat(x))[:, 1]
        metrics[name] = evaluate_binary(
            np.asarray(y, dtype=bool), p_yes >= 0.5, p_yes, n_boot=n_boot, seed=seed
        )
    return ProbeResult(c=best, selection_accuracy=scores, metrics=metrics)
