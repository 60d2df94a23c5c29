"""The output contract: what the model must answer, and the one parser that checks it.

The output contract is::

    <think>REASONING</think><answer>Yes</answer>     (the T-wave inversion is ischemic)
    <think>REASONING</think><answer>No</answer>      (it is not)

:func:`parse_completion` is the only place this contract is checked: the rewards
(:mod:`ecg_r1.training.rewards`) and the evaluation both call it, so a completion the reward calls valid is
valid for the evaluation too. It is strict on purpose, because GRPO finds every loophole of a loose
check (public GRPO reports: "Yes or No" answers, empty answers, garbled think blocks):

* whitespace is allowed before ``<think>``, between ``</think>`` and ``<answer>``, inside the
  answer tags around the word, and after ``</answer>``; nothing else is allowed outside the tags;
* exactly one ``<think>`` block, then exactly one ``<answer>`` block; no tag of the contract
  inside either block (nested or repeated tags are refused);
* the answer is exactly ``Yes`` or ``No``, case-sensitive (``yes`` is refused: a format the
  model must learn, and one the evaluation reads the same way);
* the reasoning may be empty (``<think></think>``): answer-only SFT targets use that form.

The prompt the model is asked is :mod:`ecg_r1.modeling.prompts`; the SFT targets
(:func:`format_target`) and the system prompt that states the contract live here with the parser,
so the three stay in step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
CONTRACT_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
YES, NO = "Yes", "No"

SYSTEM_PROMPT = (
    "You are a cardiologist reading 12-lead electrocardiograms. The user shows you an ECG with "
    "T-wave inversion and the patient's clinical details, and asks whether the T-wave inversion "
    "is ischemic. First reason about the ECG and the clinical details inside <think> </think> "
    "tags: name the leads that show T-wave inversion and the findings that matter. Then give "
    "the final answer inside <answer> </answer> tags, exactly Yes (ischemic) or No "
    "(non-ischemic), and write nothing after it. Example: "
    "<think>reasoning</think><answer>Yes</answer>"
)

# The whole completion: optional whitespace, think block, optional whitespace, answer block,
# optional whitespace. DOTALL so reasoning may span lines; the blocks' contents are checked for
# stray tags afterwards, which gives clearer problem messages than a cleverer regex would.
_CONTRACT_RE = re.compile(
    r"\A\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>(?P<rest>.*)\Z", re.DOTALL
)
_TAG_RE = re.compile(r"</?(?:think|answer)>", re.IGNORECASE)


@dataclass(frozen=True)
class ParsedCompletion:
    """The result of :func:`parse_completion`.

    Attributes:
        valid: True only when the completion follows the output contract exactly.
        answer: True for ``Yes`` (ischemic), False for ``No``; None when not valid.
        think: the reasoning text (stripped); None when not valid.
        problem: a short description of what broke the contract; None when valid.
    """

    valid: bool
    answer: bool | None
    think: str | None
    problem: str | None


def _invalid(problem: str) -> ParsedCompletion:
    return ParsedCompletion(valid=False, answer=None, think=None, problem=problem)


def completion_text(completion: Any) -> str:
    """Return the text of one completion as TRL passes it to reward functions.

    TRL 1.16 passes conversational completions as ``[{"role": "assistant", "content": "..."}]``
    and standard ones as plain strings; content may itself be a list of ``{"type": "text"}``
    parts.

    Args:
        completion: a string, a message dict, or a list of message dicts.

    Returns:
        The concatenated assistant text.

    Raises:
        TypeError: when the completion has none of these shapes.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        content = completion.get("content", "")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(part.get("text") or "" for part in content if isinstance(part, Mapping))
        raise TypeError(f"message content must be a string or a list of parts, got {type(content).__name__}")
    if isinstance(completion, list | tuple):
        return "".join(completion_text(message) for message in completion)
    raise TypeError(
        f"a completion must be a string or a list of {{'role', 'content'}} messages, got {type(completion).__name__}"
    )


def parse_completion(text: str) -> ParsedCompletion:
    """Check a completion against the output contract and read its answer.

    Args:
        text: the generated text (special tokens already removed).

    Returns:
        A :class:`ParsedCompletion`; ``problem`` names the first rule the text breaks.

    Example:
        >>> parse_completion("<think>TWI in V1-V3.</think><answer>Yes</answer>").answer
        True
        >>> parse_completion("<think>x</think><answer>Yes or No</answer>").problem
        "answer must be exactly 'Yes' or 'No', got 'Yes or No'"
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_completion expects a string, got {type(text).__name__}")
    if not text.strip():
        return _invalid("empty completion")
    match = _CONTRACT_RE.match(text)
    if match is None:
        return _invalid(_diagnose(text))
    think, answer, rest = match.group("think"), match.group("answer"), match.group("rest")
    if _TAG_RE.search(think):
        return _invalid("a contract tag inside the think block (nested or repeated tags)")
    if rest.strip():
        if _TAG_RE.search(rest):
            return _invalid("more than one answer block, or a tag after the answer")
        return _invalid(f"text after </answer>: {rest.strip()[:40]!r}")
    word = answer.strip()
    if _TAG_RE.search(answer):
        return _invalid("a contract tag inside the answer block")
    if word not in (YES, NO):
        if not word:
            return _invalid("empty answer")
        return _invalid(f"answer must be exactly 'Yes' or 'No', got {word[:40]!r}")
    return ParsedCompletion(valid=True, answer=word == YES, think=think.strip(), problem=None)


def _diagnose(text: str) -> str:
    """Say why a completion does not match the contract's overall shape."""
    stripped = text.lstrip()
    if not stripped.startswith(THINK_OPEN):
        if stripped.startswith(ANSWER_OPEN):
            return "missing <think> block before the answer"
        return "completion must start with <think>"
    if THINK_CLOSE not in text:
        return "truncated: <think> is never closed"
    if ANSWER_OPEN not in text:
        return "truncated or missing: no <answer> block after </think>"
    if ANSWER_CLOSE not in text:
        return "truncated: <answer> is never closed"
    return "text between </think> and <answer>, or tags out of order"


def format_target(answer: bool, rationale: str | None = None) -> str:
    """Write the completion a model should produce, for SFT targets and format warm-up.

    Args:
        answer: True for ischemic ("Yes"), False for non-ischemic ("No").
        rationale: the reasoning to put in the think block; None or "" leaves it empty.

    Returns:
        A string that :func:`parse_completion` accepts with the same answer.

    Raises:
        ValueError: when the rationale contains a contract tag (the target would not parse).
    """
    think = (rationale or "").strip()
    if _TAG_RE.search(think):
        raise ValueError(f"a rationale must not contain {CONTRACT_TAGS} tags: {think[:60]!r}")
    return f"{THINK_OPEN}{think}{THINK_CLOSE}{ANSWER_OPEN}{YES if answer else NO}{ANSWER_CLOSE}"
