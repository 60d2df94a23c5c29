"""Linear probes: how much of the label a model's inputs carry for a reader that uses them well.

The language model receives the vision tower's merged tokens (:func:`ecg_r1.training.vision.page_tokens`).
A logistic regression on those tokens, fitted on the training split with the regularisation
chosen on the validation split, says what a reader of the tokens can get from the image alone.
Beside a trained model's row without the note, it separates the two ways an image pathway
fails: a tower whose tokens do not carry the answer, or a language model that does not read
them (docs/tiny_recipe.md).

:func:`fit_page_and_note_probe` adds the note: a logistic regression on the note's word flags
(the feature baseline's :func:`ecg_r1.evaluation.baselines.note_vectorizer`) and the two readers'
log-odds combined by a logistic regression fitted on the validation split. Beside a trained
model's row with the note, it says what the prompt's two parts carry together for a linear reader.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ecg_r1.evaluation.evaluate import BinaryMetrics, evaluate_binary

# Inverse L2 strengths tried; the tokens number thousands per page against about a thousand
# training cases, so only strong regularisation generalises (measured: best 0.001-0.03).
DEFAULT_CS: tuple[float, ...] = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)
# The note's 300 word flags against about a thousand training cases: a wider range, reaching
# weaker regularisation (default cohort's val split: 0.654-0.683 over these, best 0.01).
NOTE_CS: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)


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


@dataclass(frozen=True)
class PageAndNoteResult:
    """Page reader, note reader and their combination, each scored on the same test splits.

    Attributes:
        page, note: each reader alone (:class:`ProbeResult`; ``C`` chosen on the selection split).
        weights: the combination's coefficients on the page's and the note's log-odds.
        metrics: split -> the combination's figures.
    """

    page: ProbeResult
    note: ProbeResult
    weights: tuple[float, float]
    metrics: dict[str, BinaryMetrics]


def _flat(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(len(x), -1)


def _labels(y: Any) -> np.ndarray:
    return np.asarray(y, dtype=bool)


def _fit_best(x_train: Any, y_train: np.ndarray, x_select: Any, y_select: np.ndarray, cs: Sequence[float]):
    """The logistic regression with the ``C`` of ``cs`` best on the selection split, and every score."""
    from sklearn.linear_model import LogisticRegression

    if len(set(y_train.tolist())) < 2:
        raise ValueError("the training split needs ischemic and non-ischemic cases to fit a probe")
    if not cs:
        raise ValueError("no regularisation strength to try")
    fitted, scores = {}, {}
    for c in sorted(cs):
        fitted[c] = LogisticRegression(C=c, max_iter=3000).fit(x_train, y_train)
        scores[c] = float((fitted[c].predict(x_select) == y_select).mean())
    best = max(sorted(cs), key=lambda c: scores[c])  # max keeps the first (smallest C) among ties
    return fitted[best], best, scores


def _score(y: np.ndarray, p_yes: np.ndarray, n_boot: int, seed: int) -> BinaryMetrics:
    return evaluate_binary(y, p_yes >= 0.5, p_yes, n_boot=n_boot, seed=seed)


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
    model, c, scores = _fit_best(_flat(train[0]), _labels(train[1]), _flat(select[0]), _labels(select[1]), cs)
    metrics = {
        name: _score(_labels(y), model.predict_proba(_flat(x))[:, 1], n_boot, seed)
        for name, (x, y) in tests.items()
    }
    return ProbeResult(c=c, selection_accuracy=scores, metrics=metrics)


def fit_page_and_note_probe(
    train: tuple[np.ndarray, Sequence[str | None], np.ndarray],
    select: tuple[np.ndarray, Sequence[str | None], np.ndarray],
    tests: Mapping[str, tuple[np.ndarray, Sequence[str | None], np.ndarray]],
    cs: Sequence[float] = DEFAULT_CS,
    note_cs: Sequence[float] = NOTE_CS,
    n_boot: int = 2000,
    seed: int = 0,
) -> PageAndNoteResult:
    """A page reader, a note reader and their combination, fitted on ``train``, chosen and combined on ``select``.

    Args:
        train, select: ``(page tokens, notes, is_ischemic)`` per case; a missing note is empty text.
        tests: split name -> the same triple; never used for fitting, choosing or combining.
        cs, note_cs: inverse regularisation strengths tried for the page and the note reader.
        n_boot, seed: bootstrap of the test metrics' CIs.

    Raises:
        ValueError: when the training split lacks one of the classes, a ``cs`` is empty, or the
            training notes hold no word in enough notes to be a flag.
    """
    from scipy.special import expit
    from sklearn.linear_model import LogisticRegression

    from ecg_r1.evaluation.baselines import note_vectorizer

    def texts(notes: Sequence[str | None]) -> list[str]:
        return [note or "" for note in notes]

    flags = note_vectorizer().fit(texts(train[1]))
    # Each split's page and note features, built once: the selection split serves both the choice
    # of C and the combination, every test split all three readers.
    splits = {"train": train, "select": select, **{f"test {name}": split for name, split in tests.items()}}
    pages = {key: _flat(split[0]) for key, split in splits.items()}
    notes = {key: flags.transform(texts(split[1])) for key, split in splits.items()}
    labels = {key: _labels(split[2]) for key, split in splits.items()}
    page, page_c, page_scores = _fit_best(
        pages["train"], labels["train"], pages["select"], labels["select"], cs
    )
    note, note_c, note_scores = _fit_best(
        notes["train"], labels["train"], notes["select"], labels["select"], note_cs
    )

    def log_odds(key: str) -> np.ndarray:
        return np.column_stack([page.decision_function(pages[key]), note.decision_function(notes[key])])

    combined = LogisticRegression().fit(log_odds("select"), labels["select"])
    page_metrics, note_metrics, metrics = {}, {}, {}
    for name in tests:
        y, z = labels[f"test {name}"], log_odds(f"test {name}")
        page_metrics[name] = _score(y, expit(z[:, 0]), n_boot, seed)
        note_metrics[name] = _score(y, expit(z[:, 1]), n_boot, seed)
        metrics[name] = _score(y, combined.predict_proba(z)[:, 1], n_boot, seed)
    return PageAndNoteResult(
        page=ProbeResult(c=page_c, selection_accuracy=page_scores, metrics=page_metrics),
        note=ProbeResult(c=note_c, selection_accuracy=note_scores, metrics=note_metrics),
        weights=(float(combined.coef_[0][0]), float(combined.coef_[0][1])),
        metrics=metrics,
    )
