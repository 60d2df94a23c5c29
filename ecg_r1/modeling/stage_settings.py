"""The settings of the training stages a profile's ``stages`` section holds, with their defaults
(:meth:`ecg_r1.modeling.profiles.Profile.stage_settings` reads them; an unknown key is an error)."""

from __future__ import annotations

from typing import Any

# Training stage -> its section under a profile's ``stages``.
STAGE_SECTIONS = {"vision": "vision_pretrain", "warmup": "format_warmup", "sft": "sft", "grpo": "grpo"}

# Every setting the training stages read from a profile's ``stages`` section, with the value used
# when the profile leaves it out: the one place these defaults live. An unknown key is an error.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "vision_pretrain": {
        "steps": 300,
        "learning_rate": 1.0e-3,
        "batch_size": 32,
        "head": "positional",  # positional | pooled | positional+pooled (ecg_r1.training.vision)
        # The categorical findings as extra targets: off, they cost TWI-lead F1 at 300 steps
        # (docs/research/tiny_recipe.md).
        "finding_targets": False,
    },
    "format_warmup": {
        "steps": 100,
        "learning_rate": None,  # None: the sft section's learning_rate
        "batch_size": None,  # None: the sft section's per_device_train_batch_size
        "answer": "masked",  # masked | random (ecg_r1.training.sft)
        "freeze_vision": False,
    },
    "sft": {
        "note_dropout": 0.0,  # fractions of the training cases shown without their note ...
        "note_scramble": 0.0,  # ... or with its words' letters shuffled (ecg_r1.training.data)
        "freeze_vision": False,
        "rationale_findings": False,  # with model.sft_rationale: targets state the measured findings
    },
    "grpo": {
        "start": "warmup",  # base | vision | warmup | sft: the model GRPO starts from
        "note_dropout": 0.0,
        "note_scramble": 0.0,
        "freeze_vision": False,
    },
}
