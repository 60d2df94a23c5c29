"""What the model is asked: the system prompt and the user message with the patient's details and
the ECG page, as TRL's trainers and the processor's chat template take them. The answer it must
give is :mod:`ecg_r1.modeling.contract`."""

from __future__ import annotations

from typing import Literal, get_args

from ecg_r1.modeling.contract import SYSTEM_PROMPT

QUESTION = "Is the T-wave inversion on this ECG ischemic?"


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


# Where the page sits in the user message. "first": before the clinical details (Qwen2-VL's and
# TRL's convention). "before_question": after them, next to the question, so the page's tokens
# are the last thing the model reads before it answers (docs/research/tiny_recipe.md, X14-X16).
ImagePosition = Literal["first", "before_question"]
IMAGE_POSITIONS: tuple[str, ...] = get_args(ImagePosition)


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
