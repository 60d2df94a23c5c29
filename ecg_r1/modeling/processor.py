"""The processor of every model here: Qwen2-VL's image processor and tokenizer, its special tokens
and chat template, and how many image tokens a page becomes.

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
import math
from pathlib import Path
from typing import Any

from ecg_r1.modeling.profiles import Profile

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

    # Picklable by reference (DataLoader workers, accelerate): ecg_r1.modeling.processor.ECGProcessor resolves
    # through the module's __getattr__.
    ECGProcessor.__module__ = __name__
    ECGProcessor.__qualname__ = "ECGProcessor"
    _ECG_PROCESSOR = ECGProcessor
    return ECGProcessor


_ECG_PROCESSOR: type | None = None


def __getattr__(name: str) -> Any:
    # `from ecg_r1.modeling.processor import ECGProcessor` works without importing transformers at module import.
    if name == "ECGProcessor":
        return _processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tower_patching(profile: Profile) -> tuple[int, int]:
    """``(patch_size, merge_size)`` of the vision tower the profile builds; Qwen2-VL's for a hub model.

    A tower the profile builds (tiny, or a new tower beside a pretrained language model) may set
    ``patch_size`` and ``spatial_merge_size``; the processor must cut pages the same way.
    """
    from transformers import Qwen2VLVisionConfig

    tower = (profile.tiny.vision if profile.tiny is not None else profile.vision) or {}
    defaults = Qwen2VLVisionConfig()
    return (
        int(tower.get("patch_size", defaults.patch_size)),
        int(tower.get("spatial_merge_size", defaults.spatial_merge_size)),
    )


def make_image_processor(profile: Profile) -> Any:
    """A ``Qwen2VLImageProcessor`` bounded by the profile's min/max pixels, cutting pages into the
    patches and token groups of the profile's tower (:func:`tower_patching`).

    Without torchvision it falls back to its PIL backend (a warning, same results).
    """
    import warnings

    from transformers import Qwen2VLImageProcessor

    patch, merge = tower_patching(profile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Qwen2VLImageProcessor(
            min_pixels=profile.image_min_pixels,
            max_pixels=profile.image_max_pixels,
            patch_size=patch,
            merge_size=merge,
        )


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
    # How the profile lays out prompts travels with the processor to every inference path
    # (ecg_r1.modeling.inference.prompt_texts), as the pixel bounds do; so do the note words the
    # model was trained on, which a trained folder carries (save_model_folder writes them).
    processor.image_position = profile.image_position
    processor.unseen_note_words = profile.unseen_note_words
    processor.note_vocabulary = read_note_vocabulary(model_dir_or_id)
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = PAD_TOKEN
    if not getattr(processor, "chat_template", None):
        processor.chat_template = QWEN2_VL_CHAT_TEMPLATE
    return processor


NOTE_VOCABULARY_FILE = "note_vocabulary.json"


def read_note_vocabulary(model_dir: str | Path) -> frozenset[str] | None:
    """The training notes' words a model folder carries (None: a folder without them, or a hub id).

    Raises:
        ValueError: when the file is not a JSON list of strings.
    """
    path = Path(model_dir) / NOTE_VOCABULARY_FILE
    if not path.is_file():
        return None
    words = json.loads(path.read_text())
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise ValueError(f"{path} must be a JSON list of words")
    return frozenset(words)


def write_note_vocabulary(model_dir: str | Path, vocabulary: frozenset[str]) -> Path:
    """Write the training notes' words into a model folder (sorted, one JSON list)."""
    path = Path(model_dir) / NOTE_VOCABULARY_FILE
    path.write_text(json.dumps(sorted(vocabulary), ensure_ascii=False))
    return path


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

    Mirrors Qwen2-VL's ``smart_resize`` (sides rounded to multiples of patch x merge size, 28 by
    default, area clamped to the pixel bounds), then one token per merge x merge patches.
    """
    if width is None or height is None:
        page = profile.render_config()
        width, height = width or page.width_px, height or page.height_px
    patch, merge = tower_patching(profile)
    factor = patch * merge
    h_bar, w_bar = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h_bar * w_bar > profile.image_max_pixels:
        beta = math.sqrt(height * width / profile.image_max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < profile.image_min_pixels:
        beta = math.sqrt(profile.image_min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return (h_bar // factor) * (w_bar // factor)
