"""The Qwen2-VL builder every model built here goes through: its config from text and vision
sizes (:func:`qwen2_vl_config`) and the saved folder with processor and summary
(:func:`save_built_model`). :mod:`ecg_r1.modeling.build` (the tiny model) and
:mod:`ecg_r1.modeling.pretrained` (a transplanted language model) both use it, and neither
imports the other for it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ecg_r1.modeling.models import save_model_folder
from ecg_r1.modeling.processor import (
    EOS_TOKEN,
    PAD_TOKEN,
    QWEN2_VL_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    _processor_class,
    image_tokens,
    make_image_processor,
)
from ecg_r1.modeling.profiles import Profile, ProfileError

if TYPE_CHECKING:  # heavy imports stay lazy so `ecg-r1 --help` and profile tests stay fast
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


def qwen2_vl_config(text: Mapping[str, Any], vision: Mapping[str, Any], tokenizer: Any) -> Any:
    """A ``Qwen2VLConfig`` from text and vision sizes, with token ids taken from the tokenizer.

    Args:
        text: ``Qwen2VLTextConfig`` fields; ``rope_theta`` (default 1e6) and ``mrope_section``
            (default head_dim/2 split 1:1.5:1.5 over time, height and width, as in the real model)
            are moved into ``rope_parameters``; ``tie_word_embeddings`` applies to the whole model.
            The vocabulary size is the tokenizer's.
        vision: ``Qwen2VLVisionConfig`` fields; ``hidden_size`` (the merger's output) defaults to
            the text width.
        tokenizer: a tokenizer holding :data:`SPECIAL_TOKENS`.

    Raises:
        ProfileError: when the sizes are inconsistent (heads not dividing the hidden size,
            ``mrope_section`` not summing to head_dim / 2).
    """
    from transformers import Qwen2VLConfig

    text, vision = dict(text), dict(vision)
    hidden, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
    if hidden % heads:
        raise ProfileError(f"text hidden_size {hidden} must be divisible by num_attention_heads {heads}")
    half = hidden // heads // 2
    mrope = text.pop("mrope_section", None)
    if mrope is None:
        # Qwen2-VL splits head_dim/2 = 64 as [16, 24, 24]: a quarter for time, the rest for h and w.
        t = half // 4
        h = (half - t) // 2
        mrope = [t, h, half - t - h]
    if sum(mrope) != half:
        raise ProfileError(f"mrope_section {mrope} must sum to head_dim/2 = {half}")
    rope_theta = float(text.pop("rope_theta", 1_000_000.0))
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    text.update(
        vocab_size=max(len(tokenizer), int(text.get("vocab_size", 0))),
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": list(mrope)},
        bos_token_id=None,
        eos_token_id=ids[EOS_TOKEN],
        pad_token_id=ids[PAD_TOKEN],
    )
    vision.setdefault("hidden_size", hidden)  # the merger projects into the text width
    if int(vision["embed_dim"]) % int(vision["num_heads"]):
        raise ProfileError(
            f"vision embed_dim {vision['embed_dim']} must be divisible by num_heads {vision['num_heads']}"
        )
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
    )


def save_built_model(
    profile: Profile, model: PreTrainedModel, tokenizer: Any, out_dir: str | Path, info: Mapping[str, Any]
) -> Path:
    """Save a Qwen2-VL built here with its processor and an ``ecg_r1_model.json`` summary.

    Sets the generation config's stop and pad ids from the config (a completion ends at
    ``<|im_end|>`` or ``<|endoftext|>``) and wraps the tokenizer in :class:`ECGProcessor` with the
    profile's image bounds and :data:`QWEN2_VL_CHAT_TEMPLATE`.

    Args:
        profile: the profile (name, seed, image size for the summary, pixel bounds).
        model: a ``Qwen2VLForConditionalGeneration``.
        tokenizer: its tokenizer.
        out_dir: the folder (created).
        info: extra summary entries (``source``...).

    Returns:
        The folder.
    """
    text_config = model.config.text_config
    model.generation_config.eos_token_id = [text_config.eos_token_id, text_config.pad_token_id]
    model.generation_config.pad_token_id = text_config.pad_token_id
    processor = _processor_class()(
        make_image_processor(profile), tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE
    )
    summary = {
        "profile": profile.name,
        "seed": profile.seed,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "image_tokens": image_tokens(profile),
        **info,
    }
    save_model_folder(model, processor, out_dir, info=summary)
    logger.info(
        "built %s Qwen2-VL: %s parameters, vocabulary %d, in %s",
        summary.get("source"),
        f"{summary['parameters']:,}",
        len(tokenizer),
        out_dir,
    )
    return Path(out_dir)
