"""The settings of the training stages a profile's ``stages`` section holds: one dataclass a
section, whose fields are each setting's type, bounds and default, the one place these live
(:func:`ecg_r1.data.yaml_config.typed_settings` validates a section against them; an unknown key
is an error). :meth:`ecg_r1.modeling.profiles.Profile.stage_settings` reads them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal, get_args, get_type_hints

from annotated_types import Ge, Gt, Interval

from ecg_r1.data.yaml_config import FORBID_UNKNOWN_KEYS

# Training stage -> its section under a profile's ``stages``.
STAGE_SECTIONS = {"vision": "vision_pretrain", "warmup": "format_warmup", "sft": "sft", "grpo": "grpo"}

# The readouts of the vision pre-training (ecg_r1.training.vision), the answer of the format
# warm-up's targets (ecg_r1.training.sft), and the models GRPO may start from.
VisionHead = Literal["positional", "pooled", "positional+pooled"]
WarmupAnswer = Literal["masked", "random"]
GrpoStart = Literal["base", "vision", "warmup", "sft"]
WARMUP_ANSWERS: tuple[str, ...] = get_args(WarmupAnswer)
GRPO_STARTS: tuple[str, ...] = get_args(GrpoStart)

Steps = Annotated[int, Ge(1)]
BatchSize = Annotated[int, Ge(1)]
LearningRate = Annotated[float, Gt(0)]
Fraction = Annotated[float, Interval(ge=0, le=1)]


def _check_note_shares(note_dropout: float, note_scramble: float) -> None:
    """The cases shown without their note and those with it scrambled are drawn from one number a
    case (ecg_r1.training.data): together they are at most all of them."""
    if note_dropout + note_scramble > 1:
        raise ValueError(f"note_dropout + note_scramble is {note_dropout + note_scramble:g}, more than 1")


@dataclass(frozen=True)
class VisionPretrainSettings:
    """``stages.vision_pretrain``: the vision tower's pre-training on targets measured from the signal."""

    __pydantic_config__ = FORBID_UNKNOWN_KEYS
    steps: Steps = 300
    learning_rate: LearningRate = 1.0e-3
    batch_size: BatchSize = 32
    head: VisionHead = "positional"
    # The categorical findings as extra targets: off, they cost TWI-lead F1 at 300 steps
    # (docs/research/tiny_recipe.md).
    finding_targets: bool = False


@dataclass(frozen=True)
class FormatWarmupSettings:
    """``stages.format_warmup``: the label-free warm-up on the output contract."""

    __pydantic_config__ = FORBID_UNKNOWN_KEYS
    steps: Steps = 100
    learning_rate: LearningRate | None = None  # None: the sft section's learning_rate
    batch_size: BatchSize | None = None  # None: the sft section's per_device_train_batch_size
    answer: WarmupAnswer = "masked"
    freeze_vision: bool = False


@dataclass(frozen=True)
class SftStageSettings:
    """``stages.sft``: how SFT shows its cases."""

    __pydantic_config__ = FORBID_UNKNOWN_KEYS
    note_dropout: Fraction = 0.0
    note_scramble: Fraction = 0.0
    freeze_vision: bool = False
    rationale_findings: bool = False  # with model.sft_rationale: targets state the measured findings

    def __post_init__(self) -> None:
        _check_note_shares(self.note_dropout, self.note_scramble)


@dataclass(frozen=True)
class GrpoStageSettings:
    """``stages.grpo``: where GRPO starts and how it shows its prompts."""

    __pydantic_config__ = FORBID_UNKNOWN_KEYS
    start: GrpoStart = "warmup"
    note_dropout: Fraction = 0.0
    note_scramble: Fraction = 0.0
    freeze_vision: bool = False

    def __post_init__(self) -> None:
        _check_note_shares(self.note_dropout, self.note_scramble)


@dataclass(frozen=True)
class StageSections:
    """A profile's ``stages``: each section it names (an absent one is None)."""

    __pydantic_config__ = FORBID_UNKNOWN_KEYS
    vision_pretrain: VisionPretrainSettings | None = None
    format_warmup: FormatWarmupSettings | None = None
    sft: SftStageSettings | None = None
    grpo: GrpoStageSettings | None = None


# Section -> its settings class, and every setting with the value used where the profile leaves it out.
STAGE_SETTINGS: dict[str, type] = {
    name: next(arg for arg in get_args(hint) if arg is not type(None))
    for name, hint in get_type_hints(StageSections).items()
}
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {name: asdict(cls()) for name, cls in STAGE_SETTINGS.items()}
