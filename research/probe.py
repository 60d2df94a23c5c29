"""Probes: how much of the label, and of each measurement, a model's inputs carry for a good reader.

The language model receives the vision tower's merged tokens (:func:`ecg_r1.training.vision_readout.page_tokens`).
A logistic regression on those tokens, fitted on the training split with the regularisation
chosen on the validation split, says what a reader of the tokens can get from the image alone.
Beside a trained model's row without the note, it separates the two ways an image pathway
fails: a tower whose tokens do not carry the answer, or a language model that does not read
them (docs/research/tiny_recipe.md).

:func:`fit_page_and_note_probe` adds the note: a logistic regression on the note's word flags
(the feature baseline's :func:`ecg_r1.evaluation.baselines.note_vectorizer`) and the two readers'
log-odds combined by a logistic regression fitted on the validation split. Beside a trained
model's row with the note, it says what the prompt's two parts carry together for a linear reader.

Two more say what a linear reader of the label cannot:

* :func:`fit_measurement_probe`: ridge regressions from the tokens to each measurement of
  :func:`ecg_r1.data.features.measure_features` (the feature baseline's inputs, and the vision
  pre-training's regression targets), scored by R² on held-out pages. It names the finding a tower
  does not show: on the tiny `make run` tower T amplitude reads at R² 0.87 on val and T symmetry,
  the feature baseline's main in-hospital sign, at 0.21 (docs/research/tiny_recipe.md).
* :func:`fit_boosted_probe`: the feature baseline's gradient boosting with the page's principal
  components in place of the measured features, beside the age, sex and note word flags a model's
  prompt also holds: whether a non-linear reader of the same prompt reaches the feature baseline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ecg_r1.constants import DEFAULT_SEED, N_BOOT
from ecg_r1.data.canonical import LEADS
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


def _texts(notes: Sequence[str | None]) -> list[str]:
    """The notes as the word-flag reader takes them: a missing note is empty text."""
    return [note or "" for note in notes]


def _require_both_classes(y_train: np.ndarray) -> None:
    if len(set(y_train.tolist())) < 2:
        raise ValueError("the training split needs ischemic and non-ischemic cases to fit a probe")


def _fit_best(x_train: Any, y_train: np.ndarray, x_select: Any, y_select: np.ndarray, cs: Sequence[float]):
    """The logistic regression with the ``C`` of ``cs`` best on the selection split, and every score."""
    from sklearn.linear_model import LogisticRegression

    _require_both_classes(y_train)
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
    n_boot: int = N_BOOT,
    seed: int = DEFAULT_SEED,
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
    n_boot: int = N_BOOT,
    seed: int = DEFAULT_SEED,
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

    flags = note_vectorizer().fit(_texts(train[1]))
    # Each split's page and note features, built once: the selection split serves both the choice
    # of C and the combination, every test split all three readers.
    splits = {"train": train, "select": select, **{f"test {name}": split for name, split in tests.items()}}
    pages = {key: _flat(split[0]) for key, split in splits.items()}
    notes = {key: flags.transform(_texts(split[1])) for key, split in splits.items()}
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


# Ridge strengths tried for the measurement probe, chosen per measurement by leave-one-out on the
# training pages (scikit-learn's RidgeCV). The tokens go in as they are: a tower leaves the tokens
# of blank paper nearly constant, and standardising them made their noise the largest inputs
# (measured on a 448 px tower: R² -20 on val). The towers here chose 0.01-1e4.
MEASUREMENT_ALPHAS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
# Principal components of the page tokens the boosted probe reads: the tiny tower's 9,216 token
# values against about a thousand training pages; 64 components keep what a booster can split on.
PAGE_COMPONENTS: int = 64


@dataclass(frozen=True)
class MeasurementProbe:
    """How well a linear reader of the tokens recovers each measurement, per test split.

    Attributes:
        alphas: measurement -> ridge strength chosen on the training pages.
        r2: split -> measurement -> R² on that split's pages where the measurement exists.
    """

    alphas: dict[str, float]
    r2: dict[str, dict[str, float]]

    def by_family(self, split: str) -> dict[str, float]:
        """Mean R² per measurement family: per-lead columns (``t_sym_V2``...) as one, others alone."""
        families: dict[str, list[float]] = {}
        for name, value in self.r2[split].items():
            stem, _, lead = name.rpartition("_")
            families.setdefault(stem if lead in LEADS else name, []).append(value)
        return {family: float(np.mean(values)) for family, values in families.items()}


def fit_measurement_probe(
    train: tuple[np.ndarray, np.ndarray],
    tests: Mapping[str, tuple[np.ndarray, np.ndarray]],
    names: Sequence[str],
    alphas: Sequence[float] = MEASUREMENT_ALPHAS,
) -> MeasurementProbe:
    """Ridge regressions from the tokens to each measurement, scored by R² on every test split.

    Args:
        train: ``(tokens, measurements)``; tokens ``(cases, ...)`` are flattened per case,
            measurements ``(cases, len(names))`` with NaN where a record could not be measured.
        tests: split name -> the same pair; never used for fitting or choosing.
        names: the measurements' names, one per column.
        alphas: ridge strengths; each measurement gets the best by leave-one-out on ``train``.

    Raises:
        ValueError: when the columns do not match ``names``, or a measurement has fewer than
            three values in ``train``.
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score

    x_train, y_train = _flat(train[0]), np.asarray(train[1], dtype=np.float64)
    if y_train.ndim != 2 or y_train.shape[1] != len(names):
        raise ValueError(f"measurements have shape {y_train.shape}; expected (cases, {len(names)})")
    measured = np.isfinite(y_train)
    # Measurements missing on the same training pages share one fit (a multi-output ridge).
    groups: dict[bytes, list[int]] = {}
    for column in range(len(names)):
        if measured[:, column].sum() < 3:
            raise ValueError(f"{names[column]} has fewer than three measured training pages")
        groups.setdefault(measured[:, column].tobytes(), []).append(column)
    fits, chosen = [], {}
    for columns in groups.values():
        rows = measured[:, columns[0]]
        model = RidgeCV(alphas=tuple(alphas), alpha_per_target=True)
        model.fit(x_train[rows], y_train[rows][:, columns])
        fits.append((model, columns))
        chosen.update(zip((names[c] for c in columns), np.atleast_1d(model.alpha_).tolist(), strict=True))
    r2: dict[str, dict[str, float]] = {}
    for split, (tokens, values) in tests.items():
        x, y = _flat(tokens), np.asarray(values, dtype=np.float64)
        scores = {}
        for model, columns in fits:
            predicted = model.predict(x).reshape(len(x), len(columns))  # RidgeCV drops a 1-column axis
            for k, column in enumerate(columns):
                rows = np.isfinite(y[:, column])
                scores[names[column]] = (
                    float(r2_score(y[rows, column], predicted[rows, k])) if rows.sum() > 1 else float("nan")
                )
        r2[split] = {name: scores[name] for name in names}
    return MeasurementProbe(alphas=chosen, r2=r2)


def fit_boosted_probe(
    train: tuple[np.ndarray, np.ndarray, Sequence[str | None], np.ndarray],
    tests: Mapping[str, tuple[np.ndarray, np.ndarray, Sequence[str | None], np.ndarray]],
    with_note: bool = True,
    components: int = PAGE_COMPONENTS,
    n_boot: int = N_BOOT,
    seed: int = DEFAULT_SEED,
) -> dict[str, BinaryMetrics]:
    """The feature baseline's booster on the page's principal components, clinical numbers and note.

    Args:
        train: ``(page tokens, clinical numbers (cases, k), notes, is_ischemic)``; the clinical
            numbers are what the prompt states besides the note (age, sex as 1 = male), NaN where
            missing; a missing note is empty text.
        tests: split name -> the same quadruple; never used for fitting.
        with_note: add the note's word flags (:func:`ecg_r1.evaluation.baselines.note_vectorizer`).
        components: principal components of the tokens kept (at most the training pages' count
            and the tokens' size).
        n_boot, seed: bootstrap of the test metrics' CIs; ``seed`` also seeds the booster.

    Returns:
        split -> accuracy, AUROC and the rest with bootstrap CIs.

    Raises:
        ValueError: when the training split lacks one of the classes.
    """
    from sklearn.decomposition import PCA

    from ecg_r1.evaluation.baselines import boosted_classifier, note_vectorizer

    pages, y = _flat(train[0]), _labels(train[3])
    _require_both_classes(y)
    pca = PCA(n_components=min(components, *pages.shape), random_state=seed).fit(pages)
    flags = note_vectorizer().fit(_texts(train[2])) if with_note else None

    def inputs(split: tuple[np.ndarray, np.ndarray, Sequence[str | None], np.ndarray]) -> np.ndarray:
        parts = [pca.transform(_flat(split[0])), np.asarray(split[1], dtype=np.float64)]
        if flags is not None:
            parts.append(flags.transform(_texts(split[2])).toarray())
        return np.hstack(parts)

    booster = boosted_classifier(seed).fit(inputs(train), y)
    return {
        name: _score(_labels(split[3]), booster.predict_proba(inputs(split))[:, 1], n_boot, seed)
        for name, split in tests.items()
    }
