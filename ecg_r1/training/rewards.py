"""GRPO reward functions with TRL's signature, and a name registry.

Every function takes ``completions`` (TRL 1.16 passes ``[{"role": "assistant", "content": ...}]``
lists for conversational prompts; plain strings are accepted too) plus dataset columns as keyword
arguments, and returns one float per completion, or None where the reward does not apply (TRL then
leaves that reward out for that sample). All of them read completions through
:func:`ecg_r1.modeling.contract.parse_completion`, the parser the evaluation uses, so "valid" means the same
thing in training and in evaluation.

TRL logs each reward as ``rewards/<function __name__>/mean`` and ``.../std``; the names are chosen
for that. Weights live in the profile (``rewards:`` section), not here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ecg_r1.data.labels import ISCHEMIC, LABEL_WORDS, NON_ISCHEMIC
from ecg_r1.modeling.contract import completion_text, parse_completion
from ecg_r1.modeling.findings import leads_in_text, parse_leads

_ANSWER = {ISCHEMIC: True, NON_ISCHEMIC: False}


def label_answer(label: Any) -> bool | None:
    """The answer a label calls for: True (ischemic, "Yes"), False ("No"), None (unlabelled).

    Args:
        label: a cohort label (``"ischemic"``, ``"non-ischemic"``, ``"unknown"``), a bool, 0/1,
            ``"Yes"``/``"No"``, or None.

    Returns:
        True, False, or None for unknown / missing labels.

    Raises:
        ValueError: for a value that is none of these (a wrong column would otherwise score 0).
    """
    if label is None:
        return None
    if isinstance(label, bool):
        return label
    if isinstance(label, int | float):
        if label != label:  # NaN
            return None
        if label in (0, 1):
            return bool(label)
    key = str(label).strip().lower()
    if key in LABEL_WORDS:
        return _ANSWER.get(LABEL_WORDS[key])
    raise ValueError(
        f"cannot read label {label!r}: expected 'ischemic', 'non-ischemic', 'unknown', a bool, 0/1, or None"
    )


def _broadcast(values: Any, n: int, name: str) -> Sequence[Any]:
    # TRL passes one value per completion; a scalar is accepted for direct calls.
    if isinstance(values, str) or not isinstance(values, Sequence):
        return [values] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values for {n} completions; pass one per completion")
    return values


def format_reward(completions: list[Any], **kwargs: Any) -> list[float]:
    """1.0 when a completion follows the output contract exactly, else 0.0.

    The contract (see :mod:`ecg_r1.modeling.contract`): one ``<think>`` block, then one ``<answer>`` block
    holding exactly ``Yes`` or ``No``, nothing after it. "Yes or No", an empty answer, two
    answers, text after the answer, nested tags and truncated completions all score 0.

    Args:
        completions: the generated completions.
        **kwargs: other dataset columns (ignored).

    Returns:
        One float per completion.
    """
    return [1.0 if parse_completion(completion_text(c)).valid else 0.0 for c in completions]


def accuracy_reward(completions: list[Any], label: Any, **kwargs: Any) -> list[float | None]:
    """1.0 when a valid completion's answer matches the label exactly, 0.0 otherwise, None when
    the case is unlabelled.

    An invalid completion scores 0 even if it contains the right word: substring matching is what
    "Yes or No" answers exploit.

    Args:
        completions: the generated completions.
        label: one label per completion (see :func:`label_answer` for accepted values).
        **kwargs: other dataset columns (ignored).

    Returns:
        One float or None per completion.
    """
    labels = _broadcast(label, len(completions), "label")
    rewards: list[float | None] = []
    for completion, case_label in zip(completions, labels, strict=True):
        truth = label_answer(case_label)
        if truth is None:
            rewards.append(None)
            continue
        parsed = parse_completion(completion_text(completion))
        rewards.append(1.0 if parsed.valid and parsed.answer == truth else 0.0)
    return rewards


def lead_overlap(named: set[str], truth: set[str], metric: str = "f1") -> float:
    """Overlap between the leads a reasoning names and the leads with TWI.

    Args:
        named: leads named in the reasoning.
        truth: leads where TWI is known or measured (non-empty).
        metric: ``"f1"`` (harmonic mean of precision and recall) or ``"jaccard"`` (intersection
            over union).

    Returns:
        A value in [0, 1]; naming every lead is penalised by precision, naming none scores 0.
    """
    if metric not in ("f1", "jaccard"):
        raise ValueError(f"metric must be 'f1' or 'jaccard', got {metric!r}")
    hit = len(named & truth)
    if hit == 0:
        return 0.0
    if metric == "jaccard":
        return hit / len(named | truth)
    return 2 * hit / (len(named) + len(truth))


class GroundingReward:
    """Rewards reasoning that names the leads where TWI is measured in the signal.

    The think block's lead names (``V1-V3`` ranges expanded, see
    :func:`ecg_r1.modeling.findings.leads_in_text`) are compared with the case's ``twi_leads`` column. An
    invalid completion scores 0; a case without known TWI leads gets None (skipped).

    Built by :func:`get_grounding_reward`; a class rather than a closure so it pickles.
    """

    def __init__(self, metric: str = "f1") -> None:
        if metric not in ("f1", "jaccard"):
            raise ValueError(f"grounding metric must be 'f1' or 'jaccard', got {metric!r}")
        self.metric = metric
        self.__name__ = "grounding_reward" if metric == "f1" else f"grounding_{metric}_reward"

    def __call__(self, completions: list[Any], twi_leads: Any, **kwargs: Any) -> list[float | None]:
        """Args:
            completions: the generated completions.
            twi_leads: one value per completion: comma-joined lead names or a list; "" / None
                when unknown.

        Returns:
            One float or None per completion.
        """
        per_case = _broadcast(twi_leads, len(completions), "twi_leads")
        rewards: list[float | None] = []
        for completion, leads in zip(completions, per_case, strict=True):
            truth = set(parse_leads(leads))
            if not truth:
                rewards.append(None)
                continue
            parsed = parse_completion(completion_text(completion))
            if not parsed.valid:
                rewards.append(0.0)
                continue
            rewards.append(lead_overlap(leads_in_text(parsed.think or ""), truth, self.metric))
        return rewards

    def __repr__(self) -> str:
        return f"GroundingReward(metric={self.metric!r})"


def get_grounding_reward(metric: str = "f1") -> GroundingReward:
    """A grounding reward scoring lead overlap by ``metric`` (``"f1"`` or ``"jaccard"``).

    Raises:
        ValueError: for an unknown metric.
    """
    return GroundingReward(metric)


grounding_reward = GroundingReward("f1")
"""Module-level grounding reward (F1 overlap); see :class:`GroundingReward`."""

REWARD_FUNCS: dict[str, Callable[..., list[float | None]]] = {
    "format": format_reward,
    "accuracy": accuracy_reward,
    "grounding": grounding_reward,
    "grounding_jaccard": GroundingReward("jaccard"),
}
"""Reward name (as written in a profile's ``rewards:`` section) -> function."""


def get_reward_funcs(names: Sequence[str]) -> list[Callable[..., list[float | None]]]:
    """Resolve reward names to functions, in order (pair with ``Profile.reward_weights``).

    Args:
        names: names from :data:`REWARD_FUNCS`, e.g. ``profile.reward_names``.

    Returns:
        The functions, for GRPOTrainer's ``reward_funcs``.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
    """
    unknown = [name for name in names if name not in REWARD_FUNCS]
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; known rewards: {sorted(REWARD_FUNCS)}")
    if not names:
        raise ValueError(f"no reward named; choose from {sorted(REWARD_FUNCS)}")
    return [REWARD_FUNCS[name] for name in names]
