"""Reports people look at: the comparison table (markdown) and PNG plots.

Takes: metrics (:mod:`ecg_r1.evaluation.evaluate`), paired comparisons
(:mod:`ecg_r1.evaluation.results`), curves and cases. Gives: markdown text (the table
:func:`comparison_table`, the paired comparisons :func:`paired_markdown`, the real-record note
:func:`real_records_markdown`) and PNG files.

Every function writes one file and returns its path, so a caller can log it to MLflow
(``mlflow.log_artifact``) and show it in Dagster metadata (``MetadataValue.path`` / ``.md``).
Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, not through ``pyplot``:
no global figure state, no display needed, safe in worker processes.

Plots: confusion matrices (:func:`plot_confusion_matrices`), ROC curves (:func:`plot_roc_curves`),
accuracy per hospital with 95 % intervals (:func:`plot_group_accuracy`), reward curves from a
training log (:func:`plot_reward_curves`) and a handful of cases, the rendered ECG beside the
model's reasoning (:func:`plot_cases`).
"""

from __future__ import annotations

import logging
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import auc, roc_curve

from ecg_r1.data.labels import ISCHEMIC
from ecg_r1.data.split import TEST_EXTERNAL, TEST_INTERNAL
from ecg_r1.evaluation.evaluate import BinaryMetrics, Estimate, rank_missing_as_wrong
from ecg_r1.evaluation.note_shift import NoteShift
from ecg_r1.evaluation.real_records import REAL_SPLIT, REAL_TITLE
from ecg_r1.evaluation.results import PairedRecord

log = logging.getLogger(__name__)

INTERNAL = "internal test"
CROSS_HOSPITAL = "cross-hospital"
MEASURED, REFERENCE, CITED = "measured", "reference", "cited"
SPLIT_TITLES = {TEST_INTERNAL: INTERNAL, TEST_EXTERNAL: CROSS_HOSPITAL, REAL_SPLIT: REAL_TITLE}


@dataclass(frozen=True)
class TableRow:
    """One row of the comparison table.

    Attributes:
        model: the row's name ("GRPO v3", "Majority class", ...).
        split: :data:`INTERNAL` or :data:`CROSS_HOSPITAL` (any text is shown as is).
        metrics: the row's metrics (for a cited row, :func:`ecg_r1.evaluation.baselines.clinicians_metrics`).
        kind: :data:`MEASURED` (a model), :data:`REFERENCE` (baselines, ceiling) or :data:`CITED`
            (a figure from the literature, not measured here; shown as such).
        source: for a cited row, where the figure comes from (printed under the table).
    """

    model: str
    split: str
    metrics: BinaryMetrics
    kind: str = MEASURED
    source: str | None = None


def _ci(est: Estimate) -> str:
    return str(est)


def _val(est: Estimate) -> str:
    return "—" if math.isnan(est.value) else f"{est.value:.3f}"


def comparison_table(rows: Sequence[TableRow]) -> str:
    """The comparison as a markdown table, rows in the given order, cited rows marked.

    Args:
        rows: the table rows (models and reference rows, each split).

    Returns:
        Markdown text: the table and, under it, one footnote per cited source.
    """
    header = (
        "| Model | Split | n | Accuracy [95% CI] | Sensitivity | Specificity | PPV | AUROC [95% CI] | F1 "
        "| Valid rate |\n|---|---|---:|---|---:|---:|---:|---|---:|---:|"
    )
    lines = [header]
    notes: list[str] = []
    for row in rows:
        m = row.metrics
        cells = [m.accuracy, m.sensitivity, m.specificity, m.ppv, m.auroc, m.f1, m.valid_rate]
        if row.kind == CITED:
            if row.source and row.source not in notes:
                notes.append(row.source)
            mark = "*" * (notes.index(row.source) + 1) if row.source else ""
            shown = " | ".join("—" if math.isnan(e.value) else f"{e.value:.2f} (cited)" for e in cells)
            lines.append(f"| {row.model}{mark} | {row.split} | — | {shown} |")
            continue
        lines.append(
            f"| {row.model} | {row.split} | {m.n} | {_ci(m.accuracy)} | {_val(m.sensitivity)} | "
            f"{_val(m.specificity)} | {_val(m.ppv)} | {_ci(m.auroc)} | {_val(m.f1)} | {_val(m.valid_rate)} |"
        )
    text = "\n".join(lines) + "\n"
    for i, source in enumerate(notes):
        text += f"\n{'*' * (i + 1)} {source}\n"
    text += (
        "\nIntervals: 95 % percentile bootstrap over cases. Invalid outputs count as wrong; "
        "the valid rate is the share of outputs that followed the answer format.\n"
    )
    return text


def paired_markdown(paired: Sequence[PairedRecord]) -> str:
    """The paired comparisons as a markdown section ("" when there are none)."""
    if not paired:
        return ""
    lines = [
        "\n## Paired comparisons (same cases)\n",
        "| A | B | Split | n | Accuracy A | Accuracy B | A - B [95% CI] | only A right | only B right "
        "| McNemar mid-p |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for rec in paired:
        r = rec.result
        lines.append(
            f"| {rec.a} | {rec.b} | {SPLIT_TITLES.get(rec.split, rec.split)} | {r.n} | {r.accuracy_a:.3f} "
            f"| {r.accuracy_b:.3f} | {r.difference} | {r.only_a_correct} | {r.only_b_correct} | {r.p_mid:.3g} |"
        )
    lines.append(
        "\nDifference: paired bootstrap over cases (the same resampled cases for both rows); "
        "McNemar's mid-p on the discordant cases. Invalid outputs count as wrong for both."
    )
    return "\n".join(lines) + "\n"


def note_shift_markdown(shift: Mapping[str, NoteShift]) -> str:
    """How many of each split's note words no training note holds (:mod:`.note_shift`); "" without
    any split."""
    if not shift:
        return ""
    lines = [
        "\n## Note words the models never saw\n",
        "| Split | notes | words | unseen words | notes with one | unreadable notes | most frequent unseen |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for split, s in shift.items():
        lines.append(
            f"| {SPLIT_TITLES.get(split, split)} | {s.notes} | {s.words} | {s.unseen_words:.1%} "
            f"| {s.notes_with_unseen:.1%} | {s.unreadable_notes:.1%} | {', '.join(s.examples) or '—'} |"
        )
    lines.append(
        "\nA word no training note holds is one the models learned nothing about: where many are "
        "unseen (another language, another hospital's shorthand), the split's accuracy measures the "
        "language as much as the ECG; its no-note row shows how much the note then costs. A note with "
        "most of its words unseen is unreadable: with `model.unseen_note_words: mark` the models see "
        "it with every word as `?`, as they saw their scrambled training notes."
    )
    return "\n".join(lines) + "\n"


def real_records_markdown(info: Mapping[str, Any], cases: pl.DataFrame) -> str:
    """What the real-record section is: a sim-to-real check, its n, sources and exclusions."""
    sources = ", ".join(f"{k} {v}" for k, v in cases["hospital"].value_counts(sort=True).iter_rows())
    positive = int((cases["label"] == ISCHEMIC).sum())
    text = (
        f"\n**{REAL_TITLE}**: {cases.height} labelled TWI records ({positive} ischemic) read from "
        f"{', '.join(info['inputs'])} (by hospital: {sources}). The models were trained on simulated ECGs "
        "only and none of these records was trained on; the majority class and the feature baseline "
        "are fitted on the simulated training split. At this n the intervals are wide: read the "
        "section as a sim-to-real check, not as a benchmark."
    )
    if info["excluded_in_main_cohort"]:
        text += f" Left out: {len(info['excluded_in_main_cohort'])} records also in the main cohort."
    return text + "\n"


def write_comparison_table(rows: Sequence[TableRow], path: str | Path) -> Path:
    """Write :func:`comparison_table` to ``path`` (markdown) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(comparison_table(rows))
    return path


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    log.info("wrote %s", path)
    return path


def plot_confusion_matrices(results: Mapping[str, BinaryMetrics], path: str | Path) -> Path:
    """One confusion matrix per named result (invalid outputs counted wrong, as in the metrics).

    Args:
        results: ``{title: metrics}``, e.g. ``{"GRPO, cross-hospital": m, ...}``.
        path: the PNG to write.
    """
    if not results:
        raise ValueError("no results to draw confusion matrices for")
    n = len(results)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.6 * cols, 3.3 * rows))
    for k, (title, m) in enumerate(results.items()):
        ax = fig.add_subplot(rows, cols, k + 1)
        c = m.confusion
        grid = np.array([[c.get("tn", 0), c.get("fp", 0)], [c.get("fn", 0), c.get("tp", 0)]])
        ax.imshow(grid, cmap="Blues", vmin=0, vmax=max(1, grid.max()))
        for i in range(2):
            for j in range(2):
                colour = "white" if grid[i, j] > grid.max() / 2 else "black"
                ax.text(j, i, str(grid[i, j]), ha="center", va="center", color=colour, fontsize=12)
        ax.set_xticks([0, 1], ["No", "Yes"])
        ax.set_yticks([0, 1], ["non-isch.", ISCHEMIC])
        ax.set_xlabel("answer")
        ax.set_ylabel("truth")
        ax.set_title(f"{title}\nacc {m.accuracy.value:.2f}, invalid {m.n_invalid}", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_roc_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "ROC"
) -> Path:
    """ROC curves of several models on the same cases.

    Args:
        curves: ``{name: (y_true, p_yes)}``; a NaN score is ranked as wrongly as possible, as in
            :func:`ecg_r1.evaluation.evaluate.evaluate_binary`. Entries without both classes are skipped.
        path: the PNG to write.
        title: plot title (e.g. the split).
    """
    fig = Figure(figsize=(4.8, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="chance")
    drawn = 0
    for name, (y_true, scores) in curves.items():
        y = np.asarray(y_true, dtype=bool)
        if y.all() or not y.any():
            log.warning("ROC of %s skipped: the cases hold one class only", name)
            continue
        s = rank_missing_as_wrong(y, np.asarray(scores, dtype=float))
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, lw=1.6, label=f"{name} (AUROC {auc(fpr, tpr):.2f})")
        drawn += 1
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    if not drawn:
        ax.text(0.5, 0.5, "no curve: every entry has one class only", ha="center")
    return _save(fig, path)


def plot_group_accuracy(
    per_group: Mapping[str, Mapping[str, BinaryMetrics]],
    path: str | Path,
    reference: Mapping[str, float] | None = None,
    title: str = "Accuracy per hospital (95 % CI)",
) -> Path:
    """Accuracy per hospital for each model, with bootstrap intervals as error bars.

    Args:
        per_group: ``{model: {hospital: metrics}}`` (e.g. from
            :func:`ecg_r1.evaluation.evaluate.evaluate_predictions_by_group`).
        path: the PNG to write.
        reference: horizontal reference lines ``{label: accuracy}``, e.g. the cited clinicians.
        title: plot title.
    """
    groups = sorted({g for res in per_group.values() for g in res})
    if not groups:
        raise ValueError("no groups to plot")
    fig = Figure(figsize=(max(5.0, 1.2 * len(groups) * max(1, len(per_group)) ** 0.5 + 2), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(per_group))
    x = np.arange(len(groups))
    for k, (model, res) in enumerate(per_group.items()):
        vals = np.array([res[g].accuracy.value if g in res else np.nan for g in groups])
        lo = np.array([res[g].accuracy.low if g in res else np.nan for g in groups])
        hi = np.array([res[g].accuracy.high if g in res else np.nan for g in groups])
        err = np.vstack([np.nan_to_num(vals - lo), np.nan_to_num(hi - vals)])
        ax.errorbar(
            x + (k - (len(per_group) - 1) / 2) * width, vals, yerr=err, fmt="o", capsize=3, label=model
        )
    for label, value in (reference or {}).items():
        ax.axhline(value, color="grey", ls=":", lw=1)
        ax.text(len(groups) - 0.5, value, f" {label}", va="bottom", ha="right", fontsize=7, color="grey")
    counts = {g: max((res[g].n for res in per_group.values() if g in res), default=0) for g in groups}
    ax.set_xticks(x, [f"{g}\n(n={counts[g]})" for g in groups], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def plot_reward_curves(
    training_log: pl.DataFrame,
    path: str | Path,
    step: str = "step",
    rewards: Sequence[str] | None = None,
    window: int = 10,
    title: str = "Rewards during training",
) -> Path:
    """Reward means per step, raw and as a rolling mean over ``window`` steps.

    Args:
        training_log: one row per logged step; a ``step`` column and reward columns.
        path: the PNG to write.
        step: the step column.
        rewards: columns to draw; by default every column whose name contains "reward".
        window: rolling-mean window in logged steps.
        title: plot title.

    Raises:
        ValueError: without the step column or any reward column.
    """
    if step not in training_log.columns:
        raise ValueError(f"training log has no {step!r} column (columns: {training_log.columns})")
    cols = (
        list(rewards) if rewards is not None else [c for c in training_log.columns if "reward" in c.lower()]
    )
    missing = [c for c in cols if c not in training_log.columns]
    if missing or not cols:
        raise ValueError(
            f"reward columns {missing or 'containing reward'} not in the training log (columns: {training_log.columns})"
        )
    data = training_log.sort(step)
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    x = data[step].to_numpy()
    for col in cols:
        y = data[col].cast(pl.Float64).to_numpy()
        line = ax.plot(x, y, lw=0.7, alpha=0.35)[0]
        smooth = data[col].cast(pl.Float64).rolling_mean(window, min_samples=1).to_numpy()
        ax.plot(x, smooth, lw=1.8, color=line.get_color(), label=col)
    ax.set_xlabel(step)
    ax.set_ylabel("reward (mean over generations)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


@dataclass(frozen=True)
class CaseView:
    """One case for :func:`plot_cases`: the rendered ECG beside the model's answer and reasoning."""

    record_id: str
    image: str | Path | np.ndarray | Image.Image
    label: str
    answer: bool | None  # None: invalid output
    reasoning: str | None
    p_yes: float | None = None


def plot_cases(cases: Sequence[CaseView], path: str | Path, wrap: int = 70, max_chars: int = 900) -> Path:
    """A few cases, one per row: the rendered ECG on the left, truth, answer and reasoning on the right.

    Args:
        cases: the cases to show (a handful; each adds a row).
        path: the PNG to write.
        wrap: characters per line of reasoning.
        max_chars: reasoning beyond this is cut (marked with an ellipsis).
    """
    if not cases:
        raise ValueError("no cases to show")
    fig = Figure(figsize=(14, 3.4 * len(cases)))
    grid = fig.add_gridspec(len(cases), 2, width_ratios=[1.5, 1])  # the ECG page needs the width
    for k, case in enumerate(cases):
        ax_img = fig.add_subplot(grid[k, 0])
        image = case.image
        if isinstance(image, (str, Path)):
            with Image.open(image) as im:
                image = np.asarray(im.convert("RGB"))
        elif isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
        ax_img.imshow(image)
        ax_img.set_axis_off()
        ax_img.set_title(case.record_id, fontsize=9)
        ax_txt = fig.add_subplot(grid[k, 1])
        ax_txt.set_axis_off()
        answer = "invalid output" if case.answer is None else ("Yes (ischemic)" if case.answer else "No")
        truth = case.label
        right = case.answer is not None and (case.answer == (truth == ISCHEMIC))
        head = f"truth: {truth}   model: {answer}" + (
            f"   p(Yes) = {case.p_yes:.2f}" if case.p_yes is not None else ""
        )
        text = (case.reasoning or "(no reasoning)").strip()
        if len(text) > max_chars:
            text = text[:max_chars].rstrip() + " …"
        body = "\n".join(textwrap.fill(par, wrap) for par in text.splitlines() if par.strip())
        ax_txt.text(
            0, 1, head, va="top", fontsize=10, weight="bold", color="darkgreen" if right else "darkred"
        )
        ax_txt.text(0, 0.86, body, va="top", fontsize=8, family="monospace")
    fig.tight_layout()
    return _save(fig, path)
