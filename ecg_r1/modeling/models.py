"""The Qwen2-VL a profile names (:mod:`ecg_r1.modeling.profiles`): the tiny builder, the
processor, and loading / saving of a model folder.

Why a processor subclass: transformers 5.x cannot build ``Qwen2VLProcessor`` without a video
processor, and the video processor needs torchvision, which does not load beside the CPU torch
used here (``operator torchvision::nms does not exist``). :class:`ECGProcessor` is ``Qwen2VLProcessor`` with the video
slot removed (the project never feeds video); it works with and without torchvision, so it is
used on every machine. ``AutoProcessor.from_pretrained`` on a saved folder silently returns only
the tokenizer, so always load with :func:`load_processor` and hand the processor to the trainers
explicitly (``processing_class=``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ecg_r1.data.canonical import LEADS
from ecg_r1.modeling.profiles import TINY_SOURCE, Profile, ProfileError
from ecg_r1.modeling.prompts import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    NO,
    SYSTEM_PROMPT,
    THINK_CLOSE,
    THINK_OPEN,
    YES,
    format_target,
    rationale_from_findings,
    user_text,
)

if TYPE_CHECKING:  # heavy imports stay lazy so `ecg-r1 --help` and profile tests stay fast
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

MODEL_INFO_FILE = "ecg_r1_model.json"

# Qwen2-VL's special tokens, in the order the tiny tokenizer gives them ids 0..6.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"

# Qwen2-VL-Instruct's chat template, byte for byte (TRL ships the same text as
# ``qwen2_5_vl.jinja`` and recognises it, so its training patch for assistant-only loss applies
# to the tiny model exactly as to the real one).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# --------------------------------------------------------------------------------------------
# Processor


def _processor_class() -> type:
    """Build :class:`ECGProcessor` lazily (importing transformers costs seconds)."""
    global _ECG_PROCESSOR
    if _ECG_PROCESSOR is not None:
        return _ECG_PROCESSOR
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ECGProcessor(Qwen2VLProcessor):
        """``Qwen2VLProcessor`` without the video slot: image processor + tokenizer.

        transformers reads a processor's parts from its ``__init__`` signature, so leaving
        ``video_processor`` out of it removes the need for torchvision. Everything else
        (image-token expansion, chat template, ``mm_token_type_ids``) is Qwen2VLProcessor's.
        """

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            # Qwen2VLProcessor.__init__ would pass a video processor to ProcessorMixin; set the
            # same attributes it sets and skip it.
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = getattr(
                tokenizer, "image_token_id", None
            ) or tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = getattr(
                tokenizer, "video_token_id", None
            ) or tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    # Picklable by reference (DataLoader workers, accelerate): ecg_r1.modeling.models.ECGProcessor resolves
    # through the module's __getattr__.
    ECGProcessor.__module__ = __name__
    ECGProcessor.__qualname__ = "ECGProcessor"
    _ECG_PROCESSOR = ECGProcessor
    return ECGProcessor


_ECG_PROCESSOR: type | None = None


def __getattr__(name: str) -> Any:
    # `from ecg_r1.modeling.models import ECGProcessor` works without importing transformers at module import.
    if name == "ECGProcessor":
        return _processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_image_processor(profile: Profile) -> Any:
    """A ``Qwen2VLImageProcessor`` bounded by the profile's min/max pixels.

    Without torchvision it falls back to its PIL backend (a warning, same results).
    """
    import warnings

    from transformers import Qwen2VLImageProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Qwen2VLImageProcessor(min_pixels=profile.image_min_pixels, max_pixels=profile.image_max_pixels)


def load_processor(model_dir_or_id: str | Path, profile: Profile) -> Any:
    """Load the processor (image processor + tokenizer + chat template) of a model folder or hub id.

    The image processor's pixel bounds are set from the profile, so the number of image tokens
    follows the profile whatever the checkpoint's defaults are.

    Args:
        model_dir_or_id: a folder written by :func:`save_model_folder` or a Qwen2-VL hub id.
        profile: the profile.

    Returns:
        An :class:`ECGProcessor`.
    """
    processor = _processor_class().from_pretrained(str(model_dir_or_id))
    _bound_image_processor(processor.image_processor, profile)
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = PAD_TOKEN
    if not getattr(processor, "chat_template", None):
        processor.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return processor


def _bound_image_processor(image_processor: Any, profile: Profile) -> None:
    image_processor.size = {
        "shortest_edge": profile.image_min_pixels,
        "longest_edge": profile.image_max_pixels,
    }
    # Older attribute names, still read by some code paths.
    for attr, value in (("min_pixels", profile.image_min_pixels), ("max_pixels", profile.image_max_pixels)):
        if hasattr(image_processor, attr):
            setattr(image_processor, attr, value)


def image_tokens(profile: Profile, width: int | None = None, height: int | None = None) -> int:
    """How many image tokens a page of the given size (default: the profile's rendered page) becomes.

    Mirrors Qwen2-VL's ``smart_resize`` (sides rounded to multiples of 28, area clamped to the
    pixel bounds), then one token per 2x2 patches of 14 px.
    """
    if width is None or height is None:
        page = profile.render_config()
        width, height = width or page.width_px, height or page.height_px
    factor = 28
    h_bar, w_bar = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h_bar * w_bar > profile.image_max_pixels:
        beta = math.sqrt(height * width / profile.image_max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < profile.image_min_pixels:
        beta = math.sqrt(profile.image_min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return (h_bar // factor) * (w_bar // factor)


# --------------------------------------------------------------------------------------------
# Tiny model


def corpus_from_cases(cases: Iterable[Mapping[str, Any]]) -> list[str]:
    """Texts for training the tiny tokenizer: each case's user message and target completions.

    Args:
        cases: mappings with ``age``, ``sex``, ``note`` and optionally ``twi_leads`` and the
            measured features a findings rationale states (rows of the cohort table, as dicts).

    Returns:
        A list of strings: for every case its prompt text, and both possible targets with the
        rationale from its findings (the tokenizer must not learn which answer goes with which
        case, only the words).
    """
    texts = []
    for case in cases:
        texts.append(user_text(case.get("age"), case.get("sex"), case.get("note")))
        rationale = rationale_from_findings(case.get("twi_leads"), case)
        texts.extend((format_target(True, rationale), format_target(False, rationale)))
    return texts


def _contract_texts() -> list[str]:
    # Always in the tokenizer corpus, so the output contract's words exist even for a tiny corpus.
    return [
        SYSTEM_PROMPT,
        f"{THINK_OPEN}{THINK_CLOSE}{ANSWER_OPEN}{YES}{ANSWER_CLOSE}",
        f"{THINK_OPEN}{THINK_CLOSE}{ANSWER_OPEN}{NO}{ANSWER_CLOSE}",
        " ".join(LEADS),
        "system\nuser\nassistant\n",
    ]


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2) -> Any:
    """Train a byte-level BPE tokenizer with the Qwen special tokens and the Qwen2-VL chat template.

    Byte-level means any text encodes (no unknown token); the corpus only decides which merges
    exist. In transformers 5.x ``Qwen2Tokenizer`` ignores ``tokenizer_object``, so the trained
    tokenizer is wrapped in ``PreTrainedTokenizerFast``.

    Args:
        corpus: training texts (prompts and answers); the contract's words are always added.
        vocab_size: upper bound on the vocabulary (BPE stops earlier on a small corpus).
        min_frequency: a pair must occur this often to become a merge.

    Returns:
        A ``PreTrainedTokenizerFast`` with pad ``<|endoftext|>`` and eos ``<|im_end|>``.

    Raises:
        ValueError: when the corpus is empty.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [text for text in corpus if text]
    if not texts:
        raise ValueError("the tokenizer corpus is empty: pass the cohort's prompts and answers")
    # The system prompt and the contract's tags are in every example the model sees; weighting
    # them as such lets BPE merge their words, which shortens every prompt (a once-seen word
    # stays split into bytes and pieces).
    texts.extend(_contract_texts() * max(2, len(texts) // 3))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
        model_max_length=32768,
    )


def tiny_config(profile: Profile, tokenizer: Any) -> Any:
    """The ``Qwen2VLConfig`` of the tiny model, with token ids taken from the tokenizer.

    Raises:
        ProfileError: when the sizes are inconsistent (see :func:`qwen2_vl_config`).
    """
    if profile.tiny is None:
        raise ProfileError(
            f"profile {profile.name!r} is not a tiny profile (model.source is {profile.source!r})"
        )
    return qwen2_vl_config(profile.tiny.text, profile.tiny.vision, tokenizer)


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
        vocab_size=len(tokenizer),
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


def build_base_model(profile: Profile, corpus: list[str], out_dir: Path) -> Path:
    """Produce the starting model folder of a profile.

    For ``tiny``: trains the tokenizer on ``corpus``, builds a randomly initialised Qwen2-VL
    (seeded by ``profile.seed``) and saves model, tokenizer, processor and an
    ``ecg_r1_model.json`` summary into ``out_dir``. For a pretrained-language source
    (``smollm2-135m``): converts the installed weights into a Qwen2-VL with a new vision tower
    (:func:`ecg_r1.modeling.pretrained.build_pretrained_language_model`) and saves it the same way. For hub
    profiles: nothing is built; a local folder is returned as is, a hub id is resolved to its
    local snapshot (downloaded by ``huggingface_hub`` where there is internet).

    Args:
        profile: the profile.
        corpus: texts for the tokenizer (see :func:`corpus_from_cases`); only the tiny profile
            trains a tokenizer, the others ignore it.
        out_dir: where a built model folder is written (created; existing files are replaced).

    Returns:
        The folder to load with :func:`load_model_and_processor`.

    Raises:
        ValueError: when the corpus is empty (tiny) or a hub checkpoint cannot be resolved.
    """
    if profile.vision is not None:
        from ecg_r1.modeling.pretrained import build_pretrained_language_model

        return build_pretrained_language_model(profile, out_dir)
    if not profile.is_tiny:
        return resolve_source(profile.source)
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    tokenizer = train_tokenizer(
        corpus,
        vocab_size=int(profile.tiny.tokenizer.get("vocab_size", 1024)),
        min_frequency=int(profile.tiny.tokenizer.get("min_frequency", 2)),
    )
    config = tiny_config(profile, tokenizer)
    torch.manual_seed(profile.seed)
    model = Qwen2VLForConditionalGeneration(config)
    return save_built_model(
        profile, model, tokenizer, out_dir, info={"source": TINY_SOURCE, "corpus_texts": len(corpus)}
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


def resolve_source(source: str | Path) -> Path:
    """A local folder for a model source: the folder itself, or a hub id's local snapshot.

    Raises:
        ValueError: when the source is neither an existing folder nor a reachable hub id.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json: it is not a model folder")
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source)))
    except Exception as exc:  # offline, unknown id, gated repo: all mean "get the weights first"
        raise ValueError(
            f"cannot resolve model {source!r}: not a local folder and the hub did not answer ({exc}). "
            "Download the checkpoint on a machine with internet (huggingface-cli download ...) and set "
            "model.source in the profile to that folder."
        ) from exc


# --------------------------------------------------------------------------------------------
# Loading and saving


def save_model_folder(
    model: PreTrainedModel, processor: Any, out_dir: str | Path, info: Mapping[str, Any] | None = None
) -> Path:
    """Save a model, its processor, and an optional summary (``ecg_r1_model.json``) to a folder.

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
    processor.save_pretrained(out)
    if info is not None:
        (out / MODEL_INFO_FILE).write_text(json.dumps(dict(info), indent=2, default=str))
    return out


def load_model_and_processor(model_dir_or_id: str | Path, profile: Profile) -> tuple[PreTrainedModel, Any]:
    """Load a Qwen2-VL model and its :class:`ECGProcessor`.

    Args:
        model_dir_or_id: a model folder (from :func:`build_base_model`, a trainer, or
            :func:`ecg_r1.tracking.model_registry.load_registered`) or a hub id.
        profile: supplies dtype, attention implementation and the image pixel bounds.

    Returns:
        ``(model, processor)``; the model is in eval mode on the CPU (trainers move it).

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
    kwargs: dict[str, Any] = {"dtype": profile.torch_dtype()}
    if profile.attn_implementation:
        kwargs["attn_implementation"] = profile.attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
    model.eval()
    processor = load_processor(source, profile)
    return model, processor


def vision_token_ids(config: Any) -> list[int]:
    """The ids of Qwen2-VL's image, video and vision start / end tokens (from the model config).

    A model must never write them: a completion holding one makes the next forward pass count an
    image or video it was not given (Qwen2-VL's position ids then fail to line up).
    """
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return sorted({int(getattr(config, name)) for name in names if getattr(config, name, None) is not None})
