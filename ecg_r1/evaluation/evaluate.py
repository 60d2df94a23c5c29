"""Metrics of a yes/no classifier with bootstrap intervals, per hospital, and the predictions they read.

Conventions every model and reference row shares:

* ``y_true`` is a boolean per case (True = ischemic). Cases labelled "unknown" must be filtered
  out before evaluation; a None in ``y_true`` is an error.
* ``y_pred`` is True / False, or **None where the model's output was invalid** (it broke the
  output contract). An invalid output counts as wrong: a positive case answered invalidly is a
  false negative, a negative one a false positive. ``valid_rate`` reports how often that happened.
* ``p_yes`` (optional) is the model's probability of "Yes" at the answer position; AUROC comes
  from it. A missing score (NaN) also counts as wrong: the case is ranked as badly as possible
  (a positive below every score, a negative above every score).
* Every metric is an :class:`Estimate`: the point value on all cases, a 95 % percentile
  bootstrap interval (cases resampled with replacement, seeded, all resamples computed at once
  as arrays), and n. A metric undefined on the data (sensitivity without positives) is NaN; a
  resample where it is undefined is left out of the interval.

Two models on the same cases (the paired bootstrap and McNemar's test) are
:mod:`ecg_r1.evaluation.paired`'s, on the same conventions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from ecg_r1.constants import DEFAULT_SEED, N_BOOT
from ecg_r1.data.labels import ISCHEMIC, KNOWN_LABELS, NON_ISCHEMIC

log = logging.getLogger(__name__)

METRICS: tuple[str, ...] = (
    "accuracy",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "f1",
    "auroc",
    "valid_rate",
)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95 % bootstrap interval and the number of cases behind it."""

    value: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        if math.isnan(self.value):
            return "n/a"
        if math.isnan(self.low):
            return f"{self.value:.3f}"
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass(frozen=True)
class BinaryMetrics:
    """All metrics of one model on one set of cases."""

    accuracy: Estimate
    sensitivity: Estimate
    specificity: Estimate
    ppv: Estimate
    npv: Estimate
    f1: Estimate
    auroc: Estimate
    valid_rate: Estimate
    n: int
    n_positive: int
    n_invalid: int
    confusion: dict[str, int] = field(default_factory=dict)  # tp, fp, tn, fn (invalid counted wrong)

    def flat(self, prefix: str = "") -> dict[str, float]:
        """Flat ``{name: value}`` for MLflow / Dagster metadata: ``accuracy``, ``accuracy_low``, ..."""
        out: dict[str, float] = {}
        for name in METRICS:
            est: Estimate = getattr(self, name)
            out[f"{prefix}{name}"] = est.value
            out[f"{prefix}{name}_low"] = est.low
            out[f"{prefix}{name}_high"] = est.high
        out[f"{prefix}n"] = float(self.n)
        out[f"{prefix}n_invalid"] = float(self.n_invalid)
        return out


def as_predictions(y_pred: Sequence[bool | None] | np.ndarray | pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """Split predictions with None for invalid outputs into (prediction, valid) boolean arrays.

    Args:
        y_pred: True / False per case, None (or NaN) where the output was invalid.

    Returns:
        ``(pred, valid)``: boolean arrays; ``pred`` is False where invalid (never read there).

    Raises:
        ValueError: on a value that is not a boolean, 0/1 or None.
    """
    values = y_pred.to_list() if isinstance(y_pred, pl.Series) else list(np.asarray(y_pred, dtype=object))
    pred = np.zeros(len(values), dtype=bool)
    valid = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        if isinstance(v, (bool, np.bool_)) or v in (0, 1):
            pred[i], valid[i] = bool(v), True
        else:
            raise ValueError(
                f"prediction {i} is {v!r}; predictions must be True/False, or None for an invalid output "
                "(parse the completion with ecg_r1.modeling.contract.parse_completion first)"
            )
    return pred, valid


def as_truth(y_true: Sequence[bool] | np.ndarray | pl.Series) -> np.ndarray:
    """``y_true`` as a boolean array; a None or NaN (an unknown label) is a ValueError."""
    values = y_true.to_list() if isinstance(y_true, pl.Series) else list(np.asarray(y_true, dtype=object))
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        raise ValueError("y_true contains None/NaN: filter out cases labelled 'unknown' before evaluating")
    return np.asarray(values, dtype=bool)


def check_lengths(**arrays: Any) -> int:
    """The common length of the named per-case inputs (None ones ignored); a ValueError naming
    each length when they differ."""
    lengths = {name: len(a) for name, a in arrays.items() if a is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs differ in length: {lengths}; pass one value per case, in the same order")
    return next(iter(lengths.values()))


def _rates(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    """Metrics from confusion counts (arrays: one entry per resample); NaN where undefined."""
    with np.errstate(divide="ignore", invalid="ignore"):
        n = tp + fp + tn + fn
        sens = tp / (tp + fn)
        ppv = tp / (tp + fp)
        return {
            "accuracy": (tp + tn) / n,
            "sensitivity": sens,
            "specificity": tn / (tn + fp),
            "ppv": ppv,
            "npv": tn / (tn + fn),
            "f1": 2 * tp / (2 * tp + fp + fn),
        }


def _auroc_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """AUROC of each row of (labels, scores) by the Mann-Whitney rank sum; NaN without both classes."""
    ranks = rankdata(s, axis=-1)  # average ranks for ties, as the Mann-Whitney statistic needs
    n_pos = y.sum(axis=-1)
    n_neg = y.shape[-1] - n_pos
    with np.errstate(divide="ignore", invalid="ignore"):
        return ((ranks * y).sum(axis=-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def rank_missing_as_wrong(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Replace missing scores so the case ranks as wrongly as possible."""
    s = np.asarray(scores, dtype=float).copy()
    missing = ~np.isfinite(s)
    if missing.any():
        lo, hi = (np.nanmin(s[~missing]), np.nanmax(s[~missing])) if (~missing).any() else (0.0, 1.0)
        s[missing & y] = lo - 1.0
        s[missing & ~y] = hi + 1.0
    return s


def bootstrap_indices(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap index matrices (resample x case) of ``n_boot`` seeded resamples of ``n`` cases,
    in blocks of at most ~4 M entries, so memory stays bounded."""
    rng = np.random.default_rng(seed)
    block = max(1, min(n_boot, 4_000_000 // max(n, 1)))
    for start in range(0, n_boot, block):
        yield rng.integers(0, n, size=(min(block, n_boot - start), n))


def percentile_interval(samples: np.ndarray, alpha: float) -> tuple[float, float]:
    """The two-sided ``1 - alpha`` percentile interval of the finite resampled values; NaN, NaN
    with fewer than 10 of them."""
    finite = samples[np.isfinite(samples)]
    if len(finite) < 10:  # too few resamples where the metric exists to say anything
        return float("nan"), float("nan")
    lo, hi = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def evaluate_binary(
    y_true: Sequence[bool] | np.ndarray | pl.Series,
    y_pred: Sequence[bool | None] | np.ndarray | pl.Series,
    p_yes: Sequence[float] | np.ndarray | None = None,
    n_boot: int = N_BOOT,
    seed: int = DEFAULT_SEED,
    alpha: float = 0.05,
) -> BinaryMetrics:
    """Accuracy, sensitivity, specificity, PPV, NPV, F1, AUROC and valid rate with bootstrap CIs.

    Args:
        y_true: True where the case is ischemic.
        y_pred: the model's answer per case, None where the output was invalid (counted wrong).
        p_yes: optional probability of "Yes" per case, for AUROC (NaN = missing, counted wrong).
        n_boot: bootstrap resamples (0 gives point estimates with NaN intervals).
        seed: seed of the resampling, so the same inputs give the same interval.
        alpha: 1 - confidence level.

    Returns:
        :class:`BinaryMetrics`; AUROC is NaN without ``p_yes`` or without both classes.

    Raises:
        ValueError: on inputs of different lengths, no cases, or unknown labels in ``y_true``.

    Example:
        >>> m = evaluate_binary([True, False, True, False], [True, False, None, True], n_boot=0)
        >>> m.accuracy.value, m.valid_rate.value, m.n_invalid
        (0.5, 0.75, 1)
    """
    y = as_truth(y_true)
    pred, valid = as_predictions(y_pred)
    n = check_lengths(y_true=y, y_pred=pred, p_yes=p_yes)
    if n == 0:
        raise ValueError("no cases to evaluate: the split or group is empty")
    # Invalid counts as wrong: the effective answer is the opposite of the truth.
    eff = np.where(valid, pred, ~y)
    tp_c, fp_c = eff & y, eff & ~y
    tn_c, fn_c = ~eff & ~y, ~eff & y
    point = _rates(*(np.array([m.sum()]) for m in (tp_c, fp_c, tn_c, fn_c)))
    point["valid_rate"] = np.array([valid.mean()])
    scores = None if p_yes is None else rank_missing_as_wrong(y, np.asarray(p_yes, dtype=float))
    if scores is not None and 0 < y.sum() < n:
        point["auroc"] = np.array([roc_auc_score(y, scores)])
    else:
        point["auroc"] = np.array([np.nan])

    boot: dict[str, np.ndarray] = {}
    if n_boot > 0:
        parts = []
        for idx in bootstrap_indices(n, n_boot, seed):
            # Counts per resample are sums over the resampled indicator matrices: no Python loop.
            part = _rates(*(m[idx].sum(axis=1) for m in (tp_c, fp_c, tn_c, fn_c)))
            part["valid_rate"] = valid[idx].mean(axis=1)
            part["auroc"] = (
                _auroc_rows(y[idx], scores[idx]) if scores is not None else np.full(len(idx), np.nan)
            )
            parts.append(part)
        boot = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    est = {}
    for name in METRICS:
        value = float(point[name][0])
        low, high = (
            percentile_interval(boot[name], alpha) if boot and not math.isnan(value) else (math.nan, math.nan)
        )
        est[name] = Estimate(value, low, high, n)
    return BinaryMetrics(
        **est,
        n=n,
        n_positive=int(y.sum()),
        n_invalid=int((~valid).sum()),
        confusion={
            "tp": int(tp_c.sum()),
            "fp": int(fp_c.sum()),
            "tn": int(tn_c.sum()),
            "fn": int(fn_c.sum()),
        },
    )


def evaluate_by_group(
    y_true: Sequence[bool] | np.ndarray | pl.Series,
    y_pred: Sequence[bool | None] | np.ndarray | pl.Series,
    groups: Sequence[str] | np.ndarray | pl.Series,
    p_yes: Sequence[float] | np.ndarray | None = None,
    n_boot: int = N_BOOT,
    seed: int = DEFAULT_SEED,
) -> dict[str, BinaryMetrics]:
    """:func:`evaluate_binary` per group (hospital), groups in sorted order.

    Args:
        y_true, y_pred, p_yes, n_boot, seed: as in :func:`evaluate_binary`.
        groups: the group (hospital) of each case.

    Returns:
        ``{group: BinaryMetrics}``.
    """
    y = as_truth(y_true)
    pred_list = y_pred.to_list() if isinstance(y_pred, pl.Series) else list(y_pred)
    g = np.asarray(groups.to_list() if isinstance(groups, pl.Series) else list(groups), dtype=object)
    check_lengths(y_true=y, y_pred=pred_list, groups=g, p_yes=p_yes)
    scores = None if p_yes is None else np.asarray(p_yes, dtype=float)
    out = {}
    for name in sorted({str(v) for v in g}):
        sel = np.flatnonzero(g.astype(str) == name)
        out[name] = evaluate_binary(
            y[sel],
            [pred_list[i] for i in sel],
            None if scores is None else scores[sel],
            n_boot=n_boot,
            seed=seed,
        )
    return out


def metrics_table(results: Mapping[str, BinaryMetrics]) -> pl.DataFrame:
    """One row per named result (model or group): value, low, high of every metric, n, n_invalid."""
    rows = []
    for name, m in results.items():
        rows.append({"name": name, **m.flat()})
    return pl.DataFrame(rows)


def labels_to_truth(labels: Sequence[str] | pl.Series) -> np.ndarray:
    """Map cohort labels to ``y_true``: "ischemic" -> True, "non-ischemic" -> False.

    Raises:
        ValueError: on any other label ("unknown" included), naming how many and which.
    """
    values = labels.to_list() if isinstance(labels, pl.Series) else list(labels)
    bad = sorted({str(v) for v in values if v not in KNOWN_LABELS})
    if bad:
        raise ValueError(
            f"labels {bad} are neither {ISCHEMIC!r} nor {NON_ISCHEMIC!r}; "
            "evaluate only labelled cases (filter label != 'unknown' first)"
        )
    return np.array([v == ISCHEMIC for v in values], dtype=bool)


@dataclass(frozen=True)
class Predictions:
    """One model's (or reference row's) answers on a set of cases, keyed by record id.

    Attributes:
        name: the row name in reports ("GRPO v3", "feature baseline", ...).
        record_id: the cases, in the order of the other fields.
        y_pred: True / False, None where the output was invalid.
        p_yes: probability of "Yes" per case (NaN where missing), or None when the model gives none.
        reasoning: the model's reasoning text per case, where it writes one (for the cases figure).
    """

    name: str
    record_id: list[str]
    y_pred: list[bool | None]
    p_yes: np.ndarray | None = None
    reasoning: list[str | None] | None = None

    def __post_init__(self) -> None:
        check_lengths(
            record_id=self.record_id, y_pred=self.y_pred, p_yes=self.p_yes, reasoning=self.reasoning
        )
        if len(set(self.record_id)) != len(self.record_id):
            raise ValueError(f"{self.name}: record ids repeat; one prediction per case")

    def to_frame(self) -> pl.DataFrame:
        """``record_id``, ``y_pred``, ``p_yes`` (and ``reasoning``) as a table, e.g. to save as Parquet."""
        data: dict[str, Any] = {
            "record_id": pl.Series(self.record_id, dtype=pl.String),
            "y_pred": pl.Series(self.y_pred, dtype=pl.Boolean),
            "p_yes": pl.Series(
                self.p_yes if self.p_yes is not None else [None] * len(self.record_id),
                dtype=pl.Float64,
                nan_to_null=True,
            ),
        }
        if self.reasoning is not None:
            data["reasoning"] = pl.Series(self.reasoning, dtype=pl.String)
        return pl.DataFrame(data)

    @classmethod
    def from_frame(cls, name: str, frame: pl.DataFrame) -> Predictions:
        """Inverse of :meth:`to_frame` (a null ``p_yes`` becomes NaN; all-null means no scores)."""
        p = frame["p_yes"] if "p_yes" in frame.columns else None
        scores = (
            None if p is None or p.null_count() == len(p) else p.cast(pl.Float64).fill_null(np.nan).to_numpy()
        )
        return cls(
            name=name,
            record_id=frame["record_id"].to_list(),
            y_pred=frame["y_pred"].to_list(),
            p_yes=scores,
            reasoning=frame["reasoning"].to_list() if "reasoning" in frame.columns else None,
        )


def align(
    predictions: Predictions, cases: pl.DataFrame
) -> tuple[np.ndarray, list[bool | None], np.ndarray | None]:
    """The predictions for exactly the given cases, in their order, with their truth.

    Args:
        predictions: a model's predictions (may cover more cases than asked for).
        cases: table with ``record_id`` and ``label``.

    Returns:
        ``(y_true, y_pred, p_yes)`` in the order of ``cases``.

    Raises:
        ValueError: when some cases have no prediction (a missing prediction is never dropped
            silently: predict them, or count them invalid by passing None).
    """
    where = {rid: i for i, rid in enumerate(predictions.record_id)}
    ids = cases["record_id"].to_list()
    missing = [rid for rid in ids if rid not in where]
    if missing:
        raise ValueError(
            f"{predictions.name}: {len(missing)} of {len(ids)} cases have no prediction "
            f"(first: {missing[:3]}); predict every case of the split"
        )
    pos = np.array([where[rid] for rid in ids], dtype=np.int64)
    y_pred = [predictions.y_pred[i] for i in pos]
    p = None if predictions.p_yes is None else np.asarray(predictions.p_yes, dtype=float)[pos]
    return labels_to_truth(cases["label"]), y_pred, p


def evaluate_predictions(
    predictions: Predictions, cases: pl.DataFrame, n_boot: int = N_BOOT, seed: int = DEFAULT_SEED
) -> BinaryMetrics:
    """:func:`evaluate_binary` of a model's predictions on the cases of a split (``record_id``, ``label``)."""
    y, pred, p = align(predictions, cases)
    return evaluate_binary(y, pred, p, n_boot=n_boot, seed=seed)


def evaluate_predictions_by_group(
    predictions: Predictions,
    cases: pl.DataFrame,
    group: str = "hospital",
    n_boot: int = N_BOOT,
    seed: int = DEFAULT_SEED,
) -> dict[str, BinaryMetrics]:
    """:func:`evaluate_by_group` of a model's predictions, grouped by a column of ``cases``."""
    if group not in cases.columns:
        raise ValueError(f"cases have no {group!r} column to group by (columns: {cases.columns})")
    y, pred, p = align(predictions, cases)
    return evaluate_by_group(y, pred, cases[group].cast(pl.String), p, n_boot=n_boot, seed=seed)
