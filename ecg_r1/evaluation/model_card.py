"""The model card of a registered model version, from the figures of the comparison that evaluated it.

Takes: a :class:`~ecg_r1.evaluation.results.Comparison`, the row that is the version, and the
version's name, number and training tags. Gives: markdown (:func:`model_card`): what the model is,
its intended use and what it must not be used for, its limitations, its training data, its
performance with n and 95 % intervals per split and hospital, its ablation rows, and the reference
rows on the same cases. :func:`ecg_r1.evaluation.registry.log_comparison` writes it as the version's
description and as ``MODEL_CARD.md`` among the logged model's artifacts (the sections follow
Mitchell et al. 2019, "Model Cards for Model Reporting", and TRIPOD+AI's items on intended use,
data, performance and limitations).
"""

from __future__ import annotations

from collections.abc import Mapping

from ecg_r1.data.split import TEST_EXTERNAL
from ecg_r1.evaluation.evaluate import BinaryMetrics
from ecg_r1.evaluation.predictions import ABLATIONS
from ecg_r1.evaluation.report import REFERENCE, SPLIT_TITLES
from ecg_r1.evaluation.results import Comparison

NOT_FOR_CLINICAL_USE = "Research use only, not for clinical decisions."
_METRICS = ("accuracy", "sensitivity", "specificity", "auroc")
_HEADER = (
    "| {first} | n | Accuracy [95% CI] | Sensitivity [95% CI] | Specificity [95% CI] | AUROC [95% CI] "
    "| Valid rate |\n|---|---:|---|---|---|---|---:|"
)


def _row(first: str, m: BinaryMetrics) -> str:
    cells = " | ".join(str(getattr(m, name)) for name in _METRICS)
    return f"| {first} | {m.n} | {cells} | {m.valid_rate.value:.3f} |"


def _title(split: str) -> str:
    return SPLIT_TITLES.get(split, split)


def _training_data(comparison: Comparison, tags: Mapping[str, str], evaluation_data_version: str) -> str:
    if comparison.simulated:
        source = (
            "a simulated cohort (`ecg_r1.simulate`, see docs/simulator.md); the label is the simulated "
            "mechanism: *ischemic* exactly for the three ischemic TWI mechanisms, as angiography would "
            "settle it"
        )
    else:
        source = (
            "ingested ECG records; labels by the rules of `ecg_r1/configs/labels.yaml` (ischemic when an "
            "ischemic code or statement is present, unknown ones left out, non-ischemic otherwise)"
        )
    lines = [
        "## Training data\n",
        f"- Source: {source}.",
        f"- Data version (DVC) it was trained on: `{tags.get('data_version', 'unknown')}`; "
        f"evaluated on: `{evaluation_data_version}`.",
        f"- Code commit: `{tags.get('git_commit', 'unknown')}`.",
        "",
        "| Split | n | ischemic | hospitals |",
        "|---|---:|---:|---|",
    ]
    for split, counts in comparison.data_splits.items():
        share = counts.n_ischemic / counts.n if counts.n else float("nan")
        lines.append(
            f"| {split} | {counts.n} | {counts.n_ischemic} ({share:.0%}) | {', '.join(counts.hospitals)} |"
        )
    return "\n".join(lines) + "\n"


def _performance(comparison: Comparison, row: str) -> str:
    lines = ["## Performance\n", _HEADER.format(first="Split")]
    lines += [_row(_title(split), m) for split, m in comparison.results[row].items()]
    hospitals = comparison.per_hospital.get(row, {})
    if hospitals:
        lines += ["", "Per hospital (both test splits):", "", _HEADER.format(first="Hospital")]
        lines += [_row(hospital, m) for hospital, m in sorted(hospitals.items())]
    lines.append(
        "\nIntervals: 95 % percentile bootstrap over cases. An output that does not follow the answer "
        "format counts as wrong; the valid rate is the share that did."
    )
    return "\n".join(lines) + "\n"


def _ablations(comparison: Comparison, row: str) -> str:
    mine = {ablated: ablation for ablated, (model, ablation) in comparison.ablated.items() if model == row}
    if not mine:
        return ""
    lines = ["## Ablations (an input taken away, same cases)\n", _HEADER.format(first="Input / split")]
    for ablated, ablation in mine.items():
        for split, m in comparison.results[ablated].items():
            lines.append(_row(f"{ABLATIONS[ablation]}, {_title(split)}", m))
    return "\n".join(lines) + "\n"


def _references(comparison: Comparison) -> str:
    rows = [name for name, kind in comparison.kinds.items() if kind == REFERENCE]
    if not rows:
        return ""
    lines = ["## Reference rows (same cases)\n", _HEADER.format(first="Row / split")]
    for name in rows:
        for split, m in comparison.results[name].items():
            lines.append(_row(f"{name}, {_title(split)}", m))
    return "\n".join(lines) + "\n"


def _limitations(comparison: Comparison, row: str) -> str:
    profile = comparison.profile
    items = []
    if comparison.simulated:
        items.append(
            "Trained and tested on simulated ECGs and notes: the figures say how well it reads the "
            "simulator, not real patients."
        )
    if profile is not None and profile.tiny is not None:
        items.append(
            f"CPU-sized model (profile `{profile.name}`): a small Qwen2-VL initialised at random, "
            "not the paper's pre-trained 2B model; its figures are not the paper's."
        )
    elif profile is not None and not profile.source.startswith("Qwen/"):
        items.append(
            f"CPU-sized model (profile `{profile.name}`, language model `{profile.source}`), not the "
            "paper's Qwen2-VL 2B."
        )
    if profile is not None and not profile.sft_rationale:
        items.append(
            "No reasoning: its SFT targets were answer-only (`<think></think><answer>...</answer>`), so "
            "the think block holds no rationale to check."
        )
    external = comparison.results[row].get(TEST_EXTERNAL)
    if external is not None:
        items.append(
            f"At the held-out hospital ({_title(TEST_EXTERNAL)}, n = {external.n}) its accuracy is "
            f"{external.accuracy}: read the cross-hospital row before using it anywhere else."
        )
    items.append("Intervals at these n are wide; a difference inside them is not a difference.")
    return "## Limitations\n\n" + "\n".join(f"- {item}" for item in items) + "\n"


def model_card(
    comparison: Comparison,
    row: str,
    model_name: str,
    version: int,
    tags: Mapping[str, str],
    evaluation_data_version: str,
) -> str:
    """The model card of one registered version, in markdown.

    Args:
        comparison: the comparison that evaluated it.
        row: its row in the comparison (e.g. ``"GRPO"``).
        model_name: the registered model (``ecg-r1-grpo``).
        version: its version number.
        tags: the version's tags from training (``stage``, ``data_version``, ``git_commit``).
        evaluation_data_version: the DVC data version of the evaluation.

    Returns:
        The card: what it is, intended use, limitations, training data, performance, ablations,
        reference rows.

    Raises:
        KeyError: when ``row`` is not a row of the comparison.
    """
    if row not in comparison.results:
        raise KeyError(f"{row!r} is not a row of the comparison (rows: {list(comparison.results)})")
    profile = comparison.profile
    stage = tags.get("stage", row)
    described = f"profile `{profile.name}`, base `{profile.source}`" if profile is not None else "its profile"
    head = (
        f"# Model card: {model_name} version {version} ({row})\n\n"
        f"**{NOT_FOR_CLINICAL_USE}**\n\n"
        "## What it is\n\n"
        f"A Qwen2-VL vision-language model ({described}) trained by ECG-R1's `{stage}` stage to tell "
        "ischemic from non-ischemic T-wave inversion. Input: a rendered 12-lead ECG page with age, sex "
        "and the clinical note; output: `<think>...</think><answer>Yes|No</answer>` (Yes: ischemic).\n\n"
        "## Intended use\n\n"
        "Research on vision-language models for ECG interpretation, and comparing training recipes "
        "(SFT, GRPO) on the same cases. It must not be used to diagnose, triage or treat anyone, nor "
        "as a second reader in care: it was not validated on real patients, and an ECG without T-wave "
        "inversion is outside what it was trained for.\n"
    )
    # Limitations before the tables: a registry that keeps only the first 5,000 characters
    # (:func:`ecg_r1.tracking.model_registry.set_model_card`) loses the reference rows first.
    sections = [
        head,
        _limitations(comparison, row),
        _training_data(comparison, tags, evaluation_data_version),
        _performance(comparison, row),
        _ablations(comparison, row),
        _references(comparison),
    ]
    return "\n".join(s for s in sections if s)
