"""A model folder: saving a model with its processor and summary, loading it back, and the token
ids a model must never write. Built here by :mod:`ecg_r1.modeling.build`, trained by
:mod:`ecg_r1.training`, registered by :mod:`ecg_r1.tracking`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ecg_r1.modeling.processor import load_processor, write_note_vocabulary
from ecg_r1.modeling.profiles import Profile

if TYPE_CHECKING:  # heavy imports stay lazy so `ecg-r1 --help` and profile tests stay fast
    import torch
    from transformers import PreTrainedModel

MODEL_INFO_FILE = "ecg_r1_model.json"


def save_model_folder(
    model: PreTrainedModel, processor: Any, out_dir: str | Path, info: Mapping[str, Any] | None = None
) -> Path:
    """Save a model, its processor, and an optional summary (``ecg_r1_model.json``) to a folder.

    A processor carrying its training notes' words (``note_vocabulary``, set by the training
    stages) leaves them in the folder too (:func:`ecg_r1.modeling.processor.write_note_vocabulary`).

    A PEFT model is merged into its base first, so the folder always loads with
    :func:`load_model_and_processor` alone.

    Returns:
        The folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):  # a peft model: save the merged weights
        model = model.merge_and_unload()
    model.save_pretrained(out)
    write_model_companions(processor, out, info)
    return out


def write_model_companions(
    processor: Any, out_dir: str | Path, info: Mapping[str, Any] | None = None
) -> None:
    """Write what a model folder holds beside the weights: the processor, its note words and the
    summary (``ecg_r1_model.json``); for weights saved elsewhere (a trainer's ``save_model``)."""
    out = Path(out_dir)
    processor.save_pretrained(out)
    if (vocabulary := getattr(processor, "note_vocabulary", None)) is not None:
        write_note_vocabulary(out, vocabulary)
    if info is not None:
        (out / MODEL_INFO_FILE).write_text(json.dumps(dict(info), indent=2, default=str))


def load_model_and_processor(
    model_dir_or_id: str | Path,
    profile: Profile,
    *,
    dtype: torch.dtype | None = None,
    device: str | None = None,
) -> tuple[PreTrainedModel, Any]:
    """Load a Qwen2-VL model and its :class:`ECGProcessor`.

    Args:
        model_dir_or_id: a model folder (from :func:`build_base_model`, a trainer, or
            :func:`ecg_r1.tracking.model_registry.load_registered`) or a hub id.
        profile: supplies dtype, attention implementation and the image pixel bounds.
        dtype: the weights' dtype; None: the profile's (training passes
            :func:`ecg_r1.modeling.device.training_dtype`).
        device: where the model goes (inference passes
            :func:`ecg_r1.modeling.device.resolve_device`); None: the CPU, for a trainer to place.

    Returns:
        ``(model, processor)``; the model is in eval mode.

    Raises:
        ValueError: when the folder holds no model.
    """
    from transformers import AutoModelForImageTextToText

    source = str(model_dir_or_id)
    local = Path(source).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise ValueError(
            f"{local} has no config.json: not a model folder (expected one saved by save_model_folder)"
        )
    kwargs: dict[str, Any] = {"dtype": dtype or profile.torch_dtype()}
    if profile.attn_implementation:
        kwargs["attn_implementation"] = profile.attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
    model.eval()
    if device is not None:
        model.to(device)
    processor = load_processor(source, profile)
    return model, processor


def vision_token_ids(config: Any) -> list[int]:
    """The ids of Qwen2-VL's image, video and vision start / end tokens (from the model config).

    A model must never write them: a completion holding one makes the next forward pass count an
    image or video it was not given (Qwen2-VL's position ids then fail to line up).
    """
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return sorted({int(getattr(config, name)) for name in names if getattr(config, name, None) is not None})
