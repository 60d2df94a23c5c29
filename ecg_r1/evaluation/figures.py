"""The comparison's plots: which rows and cases each figure shows.

Takes: a :class:`~ecg_r1.evaluation.results.Comparison` (the rows' answers, metrics per split
and per hospital, the models' training stage folders) and the cases by split. Gives: the PNGs
under ``plots/`` (:func:`write_plots`): confusion matrices of the models, ROC curves per split,
accuracy per hospital, reward curves per trained stage and a few cases beside the first model's
reasoning.
The drawing itself is :mod:`ecg_r1.evaluation.report`'s.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np
import polars as pl

from ecg_r1.constants import DEFAULT_SEED
from ecg_r1.data.split import TEST_EXTERNAL
from ecg_r1.evaluation import report
from ecg_r1.evaluation.baselines import CLINICIANS_ACCURACY
from ecg_r1.evaluation.evaluate import Predictions, align
from ecg_r1.evaluation.outputs import PLOTS_DIR, slug
from ecg_r1.evaluation.report import SPLIT_TITLES
from ecg_r1.evaluation.results import Comparison


def write_plots(
    comparison: Comparison,
    by_split: Mapping[str, pl.DataFrame],
    diagnostics: Collection[str] = (),
    n_case_figures: int = 4,
    seed: int = DEFAULT_SEED,
) -> dict[str, Path]:
    """Draw every figure of a comparison into its ``plots/`` folder (which exists).

    Args:
        comparison: the evaluated rows; its models (``stages``, in table order) get the confusion
            matrices and their reward curves, the first one's reasoning is shown beside the cases.
        by_split: the cases of each split.
        diagnostics: rows left out of the ROC and per-hospital plots (the ablations).
        n_case_figures: cases shown (0: no cases figure).
        seed: seeds the choice of cases.

    Returns:
        Name -> PNG file.
    """
    plots = comparison.out_dir / PLOTS_DIR
    stages, predictions = comparison.stages, comparison.predictions
    results, per_hospital = comparison.results, comparison.per_hospital
    files: dict[str, Path] = {}
    files["confusion_matrices"] = report.plot_confusion_matrices(
        {f"{name}, {SPLIT_TITLES[s]}": results[name][s] for name in stages for s in by_split},
        plots / "confusion_matrices.png",
    )
    # Ablated rows stay out of the plots: they are diagnostics, read in the table and the pairs.
    plotted = {name: preds for name, preds in predictions.items() if name not in diagnostics}
    for split, part in by_split.items():
        curves = {}
        for name, preds in plotted.items():
            if split not in results[name]:
                continue
            y, _, p = align(preds, part)
            if p is not None:
                curves[name] = (y, p)
        files[f"roc_{split}"] = report.plot_roc_curves(
            curves, plots / f"roc_{split}.png", title=f"ROC, {SPLIT_TITLES[split]}"
        )
    files["accuracy_per_hospital"] = report.plot_group_accuracy(
        {name: per_hospital[name] for name in plotted},
        plots / "accuracy_per_hospital.png",
        reference={"clinicians ~50% (cited PPV)": CLINICIANS_ACCURACY},
    )
    for name, stage_dir in stages.items():
        log = _reward_log(stage_dir)
        if log is not None:
            files[f"reward_curves_{slug(name)}"] = report.plot_reward_curves(
                log, plots / f"reward_curves_{slug(name)}.png", title=f"Rewards during training: {name}"
            )
    if n_case_figures > 0:
        first = next(iter(stages))
        files["cases_figure"] = report.plot_cases(
            _case_views(predictions[first], by_split[TEST_EXTERNAL], n_case_figures, seed),
            plots / f"cases_{slug(first)}.png",
        )
    return files


def _case_views(predictions: Predictions, shown: pl.DataFrame, k: int, seed: int) -> list[report.CaseView]:
    """Up to ``k`` cases of ``shown`` with the row's answer and reasoning (:func:`_pick_cases`)."""
    where = {rid: i for i, rid in enumerate(predictions.record_id)}
    views = []
    for i in _pick_cases(predictions, shown, k, seed):
        row = shown.row(i, named=True)
        j = where[row["record_id"]]
        views.append(
            report.CaseView(
                record_id=row["record_id"],
                image=row["image_path"],
                label=row["label"],
                answer=predictions.y_pred[j],
                reasoning=_printable(predictions.reasoning[j]) if predictions.reasoning else None,
                p_yes=float(predictions.p_yes[j]) if predictions.p_yes is not None else None,
            )
        )
    return views


def _reward_log(stage_dir: Path | None) -> pl.DataFrame | None:
    """The reward columns of a stage's training history, or None when it logged no rewards."""
    if stage_dir is None:
        return None
    from ecg_r1.training.stage_folder import read_result

    result = read_result(stage_dir)
    history = [h for h in (result.history if result else []) if "step" in h]
    if not history:
        return None
    # Keys differ between log entries (the final summary has no rewards): read them all.
    log = pl.from_dicts(history, infer_schema_length=None)
    rewards = [c for c in log.columns if c == "reward" or (c.startswith("rewards/") and c.endswith("/mean"))]
    if not rewards:
        return None
    # The share of groups whose completions all scored alike: no advantage, nothing learned.
    rewards += [c for c in log.columns if c == "frac_reward_zero_std"]
    log = log.select("step", *rewards).filter(pl.any_horizontal(pl.col(rewards).is_not_null()))
    return log if log.height else None


def _pick_cases(predictions: Predictions, cases: pl.DataFrame, k: int, seed: int) -> list[int]:
    """Up to ``k`` row positions of ``cases``: right and wrong answers alike, seeded."""
    y, pred, _ = align(predictions, cases)
    right = [i for i in range(len(y)) if pred[i] is not None and pred[i] == y[i]]
    wrong = [i for i in range(len(y)) if i not in set(right)]
    rng = np.random.default_rng(seed)
    rng.shuffle(right)
    rng.shuffle(wrong)
    chosen: list[int] = []
    while len(chosen) < k and (right or wrong):
        for pool in (wrong, right):
            if pool and len(chosen) < k:
                chosen.append(pool.pop())
    return sorted(chosen)


def _printable(text: str | None) -> str | None:
    # An untrained model writes control characters that no font can draw.
    if text is None:
        return None
    return "".join(ch if ch.isprintable() or ch == "\n" else "\ufffd" for ch in text)
