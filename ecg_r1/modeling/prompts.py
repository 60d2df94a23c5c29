"""What the model is asked, what it must answer, and the one parser that checks the answer.

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

(About 490 lines, half of them docstrings: the prompt, the targets and the parser are the one output
contract, and keeping them together keeps them in step.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ecg_r1.data.canonical import LEADS

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

QUESTION = "Is the T-wave inversion on this ECG ischemic?"

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


def describe_patient(age: float | int | None, sex: str | None, note: str | None) -> str:
    """The clinical text block of the user message; missing fields say so rather than vanish.

    Args:
        age: years, or None / NaN when unknown.
        sex: "M", "F" (any case, or "male"/"female"), or None when unknown.
        note: the clinical note as the source has it, or None.

    Returns:
        Three lines: age, sex, clinical note.
    """
    # age != age is NaN, how pandas hands over a null.
    age_text = "unknown" if age is None or age != age else f"{float(age):.0f} years"
    sex_key = (sex or "").strip().lower()
    sex_text = {"m": "male", "male": "male", "f": "female", "female": "female"}.get(sex_key, "unknown")
    note_text = (note or "").strip() or "none given"
    return f"Age: {age_text}\nSex: {sex_text}\nClinical note: {note_text}"


def user_text(age: float | int | None, sex: str | None, note: str | None) -> str:
    """The user message's text: the clinical details, then the question."""
    return f"{describe_patient(age, sex, note)}\n{QUESTION}"


# Note words: runs of two or more letters (digits, units' symbols and single letters such as the
# "K" of "K+" are values and abbreviations, not vocabulary).
_NOTE_WORD_RE = re.compile(r"[^\W\d_]{2,}")

# What the model sees of the note words it never learned (``model.unseen_note_words``). "keep":
# the words as written. "mark": each word no training note holds becomes UNSEEN_WORD, so a note in
# another language reads as what it is to the model, a note of unknown words, and training can
# show that form exactly (``note_scramble`` then marks every word of the note).
UNSEEN_NOTE_WORDS: tuple[str, ...] = ("keep", "mark")
UNSEEN_WORD = "?"
# A note with more than this share of its words unseen is shown with every word marked, the form
# of a scrambled training note: the few words a foreign note shares with the training notes
# ("Diabetes", "PCI", "normal" in a German one) read out of their context turned the tiny models'
# answers to "No" at the held-out hospital (docs/tiny_recipe.md, the unreadable-note gate).
UNREADABLE_NOTE_SHARE = 0.5


def note_words(note: str | None) -> list[str]:
    """The words of a note, lower-cased, in order (none for a missing note)."""
    return [word.lower() for word in _NOTE_WORD_RE.findall(note)] if note else []


def note_vocabulary(notes: Iterable[str | None]) -> frozenset[str]:
    """Every word of the given notes (the training notes: what a model can have learned)."""
    return frozenset(word for note in notes for word in note_words(note))


def is_unreadable(note: str | None, vocabulary: frozenset[str] | set[str]) -> bool:
    """Whether more than :data:`UNREADABLE_NOTE_SHARE` of the note's words are outside ``vocabulary``
    (a note without words is not)."""
    words = note_words(note)
    return sum(word not in vocabulary for word in words) > UNREADABLE_NOTE_SHARE * len(words)


def mark_unseen_words(note: str | None, vocabulary: frozenset[str] | set[str]) -> str | None:
    """The note with each word outside ``vocabulary`` replaced by :data:`UNSEEN_WORD`, and every
    word replaced when the note :func:`is_unreadable`.

    Numbers, punctuation, single letters and layout are kept. With an empty vocabulary every word
    is marked: the training form of a note the model cannot read.
    """
    if not note:
        return note
    if is_unreadable(note, vocabulary):
        vocabulary = frozenset()
    return _NOTE_WORD_RE.sub(lambda m: m.group(0) if m.group(0).lower() in vocabulary else UNSEEN_WORD, note)


# Where the page sits in the user message. "first": before the clinical details (Qwen2-VL's and
# TRL's convention). "before_question": after them, next to the question, so the page's tokens
# are the last thing the model reads before it answers (docs/tiny_recipe.md, X14-X16).
IMAGE_POSITIONS: tuple[str, ...] = ("first", "before_question")


def user_content(
    age: float | int | None, sex: str | None, note: str | None, image_position: str = "first"
) -> list[dict]:
    """The user message as typed parts, with the image slot at ``image_position``.

    Raises:
        ValueError: for a position not in :data:`IMAGE_POSITIONS`.
    """
    if image_position == "first":
        return [{"type": "image"}, {"type": "text", "text": user_text(age, sex, note)}]
    if image_position == "before_question":
        return [
            {"type": "text", "text": describe_patient(age, sex, note) + "\n"},
            {"type": "image"},
            {"type": "text", "text": QUESTION},
        ]
    raise ValueError(f"image position {image_position!r} is not one of {', '.join(IMAGE_POSITIONS)}")


def build_prompt(
    age: float | int | None, sex: str | None, note: str | None, image_position: str = "first"
) -> list[dict]:
    """Conversational prompt for TRL's GRPOTrainer (and for inference).

    With the image first the content is plain strings: GRPOTrainer inserts the image placeholder
    at the start of the first user message itself when the dataset row has an ``image`` column.
    Elsewhere the user content is typed parts with the placeholder in place, which TRL fills.

    Args:
        age: patient age in years, or None.
        sex: "M" / "F" or None.
        note: clinical text shown to the model.
        image_position: one of :data:`IMAGE_POSITIONS`.

    Returns:
        ``[{"role": "system", ...}, {"role": "user", ...}]``.
    """
    if image_position == "first":
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user_text(age, sex, note)},
        ]
    return build_multimodal_prompt(age, sex, note, image_position)


def build_multimodal_prompt(
    age: float | int | None, sex: str | None, note: str | None, image_position: str = "first"
) -> list[dict]:
    """The prompt with structured content and the image slot at ``image_position`` (:func:`user_content`).

    This is the form a processor's chat template renders into ``<|vision_start|><|image_pad|>
    <|vision_end|>`` + text; used by SFT (through :func:`build_sft_messages`) and inference.

    Returns:
        ``[system, user]`` messages whose content is a list of typed parts.
    """
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": user_content(age, sex, note, image_position)},
    ]


def build_sft_messages(
    age: float | int | None, sex: str | None, note: str | None, target: str, image_position: str = "first"
) -> list[dict]:
    """Messages for TRL's SFTTrainer: structured content on every message (with an ``images``
    column holding the one image), the assistant message being the target completion.

    Args:
        age, sex, note, image_position: as in :func:`build_prompt`.
        target: the assistant completion, usually from :func:`format_target`.

    Returns:
        ``[system, user (image + text), assistant]`` messages.
    """
    return [
        *build_multimodal_prompt(age, sex, note, image_position),
        {"role": "assistant", "content": [{"type": "text", "text": target}]},
    ]


# Lead names as they appear in reasoning. Word boundaries keep "V1" out of "V10" and "I" out of
# "II"; limb leads are matched case-insensitively (aVR, AVR), "I"/"II"/"III" only in capitals
# so that the pronoun-like "i" of free text is not a lead.
_LEAD_TOKEN_RE = re.compile(
    r"(?<![A-Za-z0-9])(III|II|I|[aA][vV][rRlLfF]|V[1-6])(?:\s*[-\u2013]\s*(V[1-6]))?(?![A-Za-z0-9])"
)
_LEAD_CASE = {name.lower(): name for name in LEADS}


def leads_in_text(text: str) -> set[str]:
    """The standard lead names mentioned in a text, ranges like ``V1-V4`` expanded.

    Limb leads aVR/aVL/aVF match in any case; ``I``, ``II``, ``III`` and ``V1``..``V6`` only as
    written (capitals), so ordinary words are not read as leads.

    Args:
        text: free text, e.g. a think block.

    Returns:
        A set of names from :data:`ecg_r1.data.canonical.LEADS`.

    Example:
        >>> sorted(leads_in_text("TWI in V2-V4 and aVL, not in II"))
        ['II', 'V2', 'V3', 'V4', 'aVL']
    """
    found: set[str] = set()
    for match in _LEAD_TOKEN_RE.finditer(text or ""):
        first, last = _LEAD_CASE[match.group(1).lower()], match.group(2)
        if last and first.startswith("V"):
            lo, hi = sorted((int(first[1:]), int(last[1:])))
            found.update(f"V{i}" for i in range(lo, hi + 1))
        else:
            found.add(first)
            if last:
                found.add(last)
    return found


def parse_leads(twi_leads: str | Iterable[str] | None) -> list[str]:
    """Normalise a ``twi_leads`` value (comma-joined string or list) to lead names in LEADS order.

    Args:
        twi_leads: e.g. ``"V1,V2,V3"``, ``["aVL", "I"]``, "" or None.

    Returns:
        Distinct standard lead names, ordered as in :data:`ecg_r1.data.canonical.LEADS`.

    Raises:
        ValueError: when a name is not one of the 12 standard leads.
    """
    if twi_leads is None:
        return []
    items = twi_leads.split(",") if isinstance(twi_leads, str) else list(twi_leads)
    names = set()
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        name = _LEAD_CASE.get(item.lower())
        if name is None:
            raise ValueError(f"unknown lead name {item!r} in twi_leads; expected names from {LEADS}")
        names.add(name)
    return [lead for lead in LEADS if lead in names]


def format_leads(leads: list[str]) -> str:
    """Write a list of leads compactly, contiguous precordial runs as ranges (``V1-V4``)."""
    limb = [lead for lead in leads if not lead.startswith("V")]
    chest = sorted(int(lead[1:]) for lead in leads if lead.startswith("V"))
    parts = list(limb)
    run: list[int] = []
    for number in [*chest, None]:
        if run and (number is None or number != run[-1] + 1):
            parts.append(f"V{run[0]}-V{run[-1]}" if len(run) >= 3 else ", ".join(f"V{n}" for n in run))
            run = []
        if number is not None:
            run.append(number)
    return ", ".join(parts)


# Territories a clinician names; the rationale says which one the TWI fits, a fact about the
# leads and not a verdict on ischemia.
_TERRITORIES = (
    ("anterior", {"V1", "V2", "V3", "V4"}),
    ("lateral", {"I", "aVL", "V5", "V6"}),
    ("inferior", {"II", "III", "aVF"}),
)


def rationale_from_findings(
    twi_leads: str | Iterable[str] | None, features_row: Mapping[str, Any] | None = None
) -> str:
    """Build a short reasoning text from known or measured findings, for SFT targets.

    The rationale states findings only (leads with TWI, their territory, measured values when
    given); it never states the label, so a model trained on it still has to decide. Only the
    TWI sentence names leads, so a model imitating it is not pushed to name other leads (which
    the grounding reward would count against it).

    Args:
        twi_leads: the leads with TWI (comma-joined string or list), known on simulated cases or
            measured from the signal (``twi_leads`` of :func:`ecg_r1.data.features.measure_features`).
        features_row: optional row of :func:`ecg_r1.data.features.measure_features`; read when present
            (None and NaN skipped): ``hr_bpm``, ``qrs_ms``, ``qt_ms``, ``t_amp_<lead>`` (deepest T
            over the TWI leads), ``t_sym_<lead>`` (mean over the TWI leads), ``st_<lead>`` and
            ``qrs_amp_<lead>`` (extremes over all leads).

    Returns:
        One or a few sentences, e.g. "T-wave inversion in V1-V4 (anterior). Normal rate. Deep
        inverted T waves, symmetric. Narrow QRS. Normal QRS voltage. Normal QT."
    """
    leads = parse_leads(twi_leads)
    if leads:
        lead_set = set(leads)
        territories = [name for name, members in _TERRITORIES if len(lead_set & members) >= 2]
        where = f" ({', '.join(territories)})" if territories else ""
        sentences = [f"T-wave inversion in {format_leads(leads)}{where}."]
    else:
        sentences = ["No lead-level T-wave inversion findings are available."]
    if features_row:
        sentences.extend(_feature_sentences(features_row, leads))
    return " ".join(sentences)


def _number(row: Mapping[str, Any], key: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if number != number else number


def _over_leads(row: Mapping[str, Any], prefix: str, leads: Iterable[str]) -> list[float]:
    return [v for lead in leads if (v := _number(row, f"{prefix}{lead}")) is not None]


# Findings are stated as the categories a reader names, not as numbers: a small model reads and
# writes "deep" far more reliably than "-0.62 mV", and the categories are what the decision turns
# on. Cut-offs are the usual clinical ones; the T-depth and QTc cut-offs were checked against the
# simulator's own categories (medians of the measured values per category: shallow -0.24, deep
# -0.65, giant -1.37 mV; QTc 396 ms without long QT, 489 ms with it).
_SYMMETRY_RATIO = 1.3  # rise and fall within this ratio of each other: symmetric
_BRADY_BPM, _TACHY_BPM = 60.0, 100.0
_DEEP_T_MV, _GIANT_T_MV = -0.4, -1.0
_ST_DEPRESSION_MV, _ST_ELEVATION_MV = -0.1, 0.1
_WIDE_QRS_MS = 120.0
_HIGH_VOLTAGE_MV = 2.0  # largest QRS peak-to-peak of any lead
_LONG_QTC_MS = 450.0  # Bazett


FINDING_FLAGS: tuple[str, ...] = (
    "bradycardia",
    "tachycardia",
    "deep_t",
    "giant_t",
    "symmetric_t",
    "st_depression",
    "st_elevation",
    "wide_qrs",
    "high_voltage",
    "long_qt",
)
"""The categorical findings of :func:`finding_flags`: what the findings rationale states and what the
vision pre-training learns to see (``ecg_r1.training.vision``)."""


def finding_flags(row: Mapping[str, Any], twi: Iterable[str]) -> dict[str, bool | None]:
    """The categorical findings of a case from its measured features, None where unmeasured.

    Args:
        row: a :func:`ecg_r1.data.features.measure_features` row (missing or NaN values allowed).
        twi: the leads with TWI; T depth and symmetry are read over them (None without any).

    Returns:
        :data:`FINDING_FLAGS` -> True / False / None.
    """
    twi = list(twi)
    flags: dict[str, bool | None] = dict.fromkeys(FINDING_FLAGS)
    rate = _number(row, "hr_bpm")
    if rate is not None:
        flags["bradycardia"], flags["tachycardia"] = rate < _BRADY_BPM, rate > _TACHY_BPM
    if twi and (depths := _over_leads(row, "t_amp_", twi)):
        flags["deep_t"], flags["giant_t"] = min(depths) <= _DEEP_T_MV, min(depths) <= _GIANT_T_MV
    if twi and (ratios := [r for r in _over_leads(row, "t_sym_", twi) if r > 0]):
        ratio = float(np.exp(np.mean(np.log(ratios))))  # geometric mean: ratios are scale-free
        flags["symmetric_t"] = 1 / _SYMMETRY_RATIO <= ratio <= _SYMMETRY_RATIO
    if st := _over_leads(row, "st_", LEADS):
        flags["st_depression"], flags["st_elevation"] = (
            min(st) <= _ST_DEPRESSION_MV,
            max(st) >= _ST_ELEVATION_MV,
        )
    if (qrs := _number(row, "qrs_ms")) is not None:
        flags["wide_qrs"] = qrs >= _WIDE_QRS_MS
    if voltages := _over_leads(row, "qrs_amp_", LEADS):
        flags["high_voltage"] = max(voltages) >= _HIGH_VOLTAGE_MV
    if (qt := _number(row, "qt_ms")) is not None and rate:
        flags["long_qt"] = qt / float(np.sqrt(60.0 / rate)) >= _LONG_QTC_MS
    return flags


def _feature_sentences(row: Mapping[str, Any], twi: list[str]) -> list[str]:
    f = finding_flags(row, twi)
    out = []
    if f["bradycardia"] is not None:
        out.append(
            "Bradycardia." if f["bradycardia"] else "Tachycardia." if f["tachycardia"] else "Normal rate."
        )
    if f["deep_t"] is not None:
        depth = "Giant" if f["giant_t"] else "Deep" if f["deep_t"] else "Shallow"
        shape = "" if f["symmetric_t"] is None else ", symmetric" if f["symmetric_t"] else ", asymmetric"
        out.append(f"{depth} inverted T waves{shape}.")
    if f["st_depression"]:
        out.append("ST depression.")
    if f["st_elevation"]:
        out.append("ST elevation.")
    if f["wide_qrs"] is not None:
        out.append("Wide QRS." if f["wide_qrs"] else "Narrow QRS.")
    if f["high_voltage"] is not None:
        out.append("High QRS voltage." if f["high_voltage"] else "Normal QRS voltage.")
    if f["long_qt"] is not None:
        out.append("Long QT." if f["long_qt"] else "Normal QT.")
    return out
