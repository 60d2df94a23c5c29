"""Launch configurations for training beyond one GPU, and the pre-flight check that reads them.

A **launch configuration** is an ``accelerate`` config file (``ecg_r1/configs/launch/*.yaml``:
``ddp`` for multi-GPU data parallel, ``zero2`` / ``zero3`` for DeepSpeed ZeRO with the JSON
DeepSpeed configs beside them). ``accelerate launch --config_file FILE`` runs ``ecg-r1 train`` once
per GPU with it. What can go wrong there is found here first, on any machine, without a GPU:

- the YAML must load with accelerate's own config class (unknown keys are refused there too);
- beside a ``deepspeed_config_file`` accelerate refuses ``mixed_precision`` and the DeepSpeed
  fields the JSON owns; every ``"auto"`` in the JSON must be one transformers fills from the
  training arguments, and explicit values must agree with them (transformers' own filling code
  is run: :func:`fill_deepspeed_config`);
- the **global batch** (``per_device_train_batch_size x gradient_accumulation_steps x
  num_processes``) stays the profile's: a profile's trainer section is written for one GPU, and
  its learning rate was chosen for that batch. :func:`plan_launch` spreads it over the processes
  (fewer accumulation steps first, then a smaller per-device batch) and says so when it cannot;
- for GRPO, TRL's generation batch (``per_device_train_batch_size x num_processes x
  steps_per_generation``) must hold whole groups of ``num_generations`` completions;
- ZeRO-3 is not combined with settings TRL refuses or silently overrides.

``ecg-r1 launch-check`` prints the plan; ``ecg-r1 train --launch-config FILE`` runs the same check
in every process and trains under the file's DeepSpeed JSON. Every stage keeps the profile's
global batch over the processes actually running (``WORLD_SIZE``), launch config or not.

The batch spread itself (and :class:`LaunchError`) is :mod:`ecg_r1.training.processes`'s: every
stage applies it, launch config or not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ecg_r1.constants import REPO_ROOT
from ecg_r1.data.yaml_config import ConfigFileError, load_yaml_mapping
from ecg_r1.modeling.profiles import Profile, config_path, shipped_names
from ecg_r1.training.processes import TRL_DEFAULTS, LaunchError, batch_of, keep_global_batch

LAUNCH_DIR = Path(__file__).resolve().parents[1] / "configs" / "launch"

# accelerate (DeepSpeedPlugin._deepspeed_config_checks) refuses these accelerate-config fields
# beside a deepspeed_config_file: the JSON owns them.
_FIELDS_OWNED_BY_DEEPSPEED_JSON = (
    "gradient_accumulation_steps",
    "gradient_clipping",
    "zero_stage",
    "offload_optimizer_device",
    "offload_param_device",
    "offload_param_nvme_path",
    "offload_optimizer_nvme_path",
    "zero3_save_16bit_model",
)


@dataclass(frozen=True)
class LaunchConfig:
    """One accelerate config file, read by :func:`load_launch_config`.

    Attributes:
        path: the YAML file.
        distributed_type: accelerate's ``distributed_type`` (``MULTI_GPU``, ``DEEPSPEED``...).
        num_processes: processes (GPUs) on all machines together.
        zero_stage: the DeepSpeed ZeRO stage, or None without DeepSpeed.
        zero3_init_flag: accelerate builds the model sharded (ZeRO-3).
        deepspeed: the DeepSpeed JSON as written (``"auto"`` values unfilled), or None.
        deepspeed_path: where that JSON was found, or None.
    """

    path: Path
    distributed_type: str
    num_processes: int
    zero_stage: int | None = None
    zero3_init_flag: bool = False
    deepspeed: Mapping[str, Any] | None = None
    deepspeed_path: Path | None = None


@dataclass(frozen=True)
class LaunchPlan:
    """The batch layout of one training stage under a launch configuration.

    Attributes:
        kind: ``sft`` or ``grpo`` (the profile section).
        num_processes: processes (GPUs) training.
        per_device_train_batch_size, gradient_accumulation_steps: what each process uses.
        global_batch: samples (GRPO: completions) per optimiser step over all processes: the
            profile's own per-device batch x accumulation steps, as on one GPU.
        num_generations: GRPO completions per prompt (None for SFT).
        generation_batch: GRPO completions generated at once over all processes (None for SFT).
    """

    kind: str
    num_processes: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    global_batch: int
    num_generations: int | None = None
    generation_batch: int | None = None

    def trainer_overrides(self) -> dict[str, int]:
        """The trainer fields that realise this plan in every process."""
        return {
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
        }


def available_launch_configs() -> list[str]:
    """Names of the launch configurations shipped in ``ecg_r1/configs/launch``."""
    return shipped_names(LAUNCH_DIR)


def _resolve(path_text: str, config_path: Path) -> Path:
    path = Path(path_text)
    if path.is_absolute():
        return path
    # Relative paths in a launch config (the DeepSpeed JSON) are relative to the directory
    # `accelerate launch` runs in: the repository root, whose ecg_r1/ is this package.
    for base in (Path.cwd(), REPO_ROOT, config_path.parent):
        if (base / path).is_file():
            return base / path
    return path


def load_launch_config(name_or_path: str | Path) -> LaunchConfig:
    """Read an accelerate config file with accelerate's own ``ClusterConfig`` and check it.

    Args:
        name_or_path: a shipped configuration's name (``ddp``, ``zero2``, ``zero3``) or a path.

    Returns:
        The :class:`LaunchConfig`.

    Raises:
        LaunchError: when the file is missing or accelerate refuses it, when a DeepSpeed config is
            missing, not JSON, or set beside fields accelerate refuses with it, or when the ZeRO
            stage of the JSON is missing.
    """
    from accelerate.commands.config.config_args import ClusterConfig

    path = config_path(name_or_path, LAUNCH_DIR)
    if not path.is_file():
        raise LaunchError(
            f"no launch config {str(name_or_path)!r}: {path} does not exist; shipped: {available_launch_configs()}"
        )
    try:
        # Read through the one YAML loader first: a file it refuses (a tag, a parse error, a list)
        # fails in one line here instead of a traceback from accelerate's own read of it.
        load_yaml_mapping(path)
    except ConfigFileError as exc:
        raise LaunchError(str(exc)) from exc
    try:
        cluster = ClusterConfig.from_yaml_file(str(path))
    except (ValueError, TypeError) as error:  # unknown keys, a missing distributed_type...
        raise LaunchError(f"{path}: accelerate refuses it: {error}") from error
    distributed = str(getattr(cluster.distributed_type, "value", cluster.distributed_type))
    processes = cluster.num_processes
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise LaunchError(f"{path}: num_processes must be a whole number of at least 1, got {processes!r}")
    if not isinstance(cluster.deepspeed_config or {}, dict):
        raise LaunchError(f"{path}: deepspeed_config must be a mapping of settings")
    ds_fields = dict(cluster.deepspeed_config or {})
    if distributed != "DEEPSPEED":
        if ds_fields:
            raise LaunchError(f"{path}: deepspeed_config is set but distributed_type is {distributed}")
        return LaunchConfig(path=path, distributed_type=distributed, num_processes=cluster.num_processes)
    file_text = ds_fields.get("deepspeed_config_file")
    if not file_text:
        raise LaunchError(
            f"{path}: a DeepSpeed launch config names its JSON in deepspeed_config.deepspeed_config_file "
            '(the JSON\'s "auto" values are filled from the training arguments)'
        )
    if clash := sorted(set(ds_fields) & set(_FIELDS_OWNED_BY_DEEPSPEED_JSON)):
        raise LaunchError(
            f"{path}: accelerate refuses {clash} beside deepspeed_config_file; set them in the JSON"
        )
    if cluster.mixed_precision not in (None, "no"):
        raise LaunchError(
            f"{path}: accelerate refuses mixed_precision beside deepspeed_config_file; the JSON's "
            '"bf16"/"fp16" {"enabled": "auto"} take the profile\'s dtype'
        )
    ds_path = _resolve(str(file_text), path)
    if not ds_path.is_file():
        raise LaunchError(f"{path}: DeepSpeed config {file_text} not found (launch from the repository root)")
    try:
        deepspeed = json.loads(ds_path.read_text())
    except json.JSONDecodeError as error:
        raise LaunchError(f"{ds_path} is not valid JSON: {error}") from error
    zero = deepspeed.get("zero_optimization") if isinstance(deepspeed, dict) else None
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3):
        raise LaunchError(f"{ds_path}: zero_optimization.stage must be 0-3, got {stage!r}")
    zero3_init = bool(ds_fields.get("zero3_init_flag", False))
    if zero3_init and stage != 3:
        raise LaunchError(f"{path}: zero3_init_flag is only for ZeRO stage 3 ({ds_path} has stage {stage})")
    return LaunchConfig(
        path=path,
        distributed_type=distributed,
        num_processes=cluster.num_processes,
        zero_stage=int(stage),
        zero3_init_flag=zero3_init,
        deepspeed=deepspeed,
        deepspeed_path=ds_path,
    )


def plan_launch(profile: Profile, kind: str, num_processes: int) -> LaunchPlan:
    """Spread a profile's one-GPU batch over ``num_processes`` without changing the global batch.

    The per-device batch is kept and the accumulation steps divided where they divide; otherwise
    the per-device batch shrinks to the largest divisor of the per-process share, with more
    accumulation steps (the same samples per optimiser step, less memory per GPU).

    Args:
        profile: the profile.
        kind: ``"sft"`` or ``"grpo"``.
        num_processes: processes (GPUs) training.

    Returns:
        The :class:`LaunchPlan`.

    Raises:
        LaunchError: when the profile's global batch does not split evenly over the processes,
            or a GRPO generation batch would split a prompt's group of completions.
    """
    if kind not in ("sft", "grpo"):
        raise LaunchError(f"trainer kind must be 'sft' or 'grpo', got {kind!r}")
    if num_processes < 1:
        raise LaunchError(f"num_processes must be at least 1, got {num_processes}")
    section = profile.sft if kind == "sft" else profile.grpo
    per_device, accumulation = batch_of(section)
    spread = keep_global_batch(section, num_processes, f"profile {profile.name!r} ({kind})")
    plan = LaunchPlan(
        kind=kind, num_processes=num_processes, global_batch=per_device * accumulation, **spread
    )
    if kind == "grpo":
        plan = _with_generation_batch(plan, profile)
    return plan


def _with_generation_batch(plan: LaunchPlan, profile: Profile) -> LaunchPlan:
    """Check TRL's GRPO batch rule (GRPOConfig.__post_init__) for the planned layout."""
    generations = int(profile.grpo.get("num_generations", TRL_DEFAULTS["num_generations"]))
    if generations < 2:
        raise LaunchError(f"profile {profile.name!r}: GRPO needs num_generations >= 2, got {generations}")
    per_step = plan.per_device_train_batch_size * plan.num_processes
    generation_batch = profile.grpo.get("generation_batch_size")
    steps = profile.grpo.get("steps_per_generation")
    if generation_batch is not None and steps is not None:
        raise LaunchError(
            f"profile {profile.name!r}: generation_batch_size and steps_per_generation are exclusive (TRL)"
        )
    if generation_batch is None:
        generation_batch = per_step * int(steps if steps is not None else plan.gradient_accumulation_steps)
    elif int(generation_batch) % per_step:
        raise LaunchError(
            f"profile {profile.name!r}: generation_batch_size ({generation_batch}) must be divisible by "
            f"per_device_train_batch_size x num_processes ({plan.per_device_train_batch_size} x "
            f"{plan.num_processes} = {per_step})"
        )
    if int(generation_batch) % generations:
        raise LaunchError(
            f"profile {profile.name!r} on {plan.num_processes} processes: the generation batch "
            f"({generation_batch} completions) must be divisible by num_generations ({generations}), "
            "or a prompt's group of completions would be split"
        )
    return replace(plan, num_generations=generations, generation_batch=int(generation_batch))


def check_zero3(profile: Profile, kind: str, launch: LaunchConfig) -> None:
    """Refuse settings TRL does not support, or silently overrides, under DeepSpeed ZeRO-3.

    - GRPO with vLLM needs the full weights to send to vLLM: ``ds3_gather_for_generation: false``
      "is not compatible with vLLM generation" (GRPOConfig's help).
    - LoRA: the final model folder holds the adapters merged into the base, which needs the whole
      weights in one process; under ZeRO-3 each holds a part. LoRA's optimizer state is small, so
      DDP or ZeRO-2 is the launch for it; ZeRO-3 is for full fine-tuning.

    Raises:
        LaunchError: naming the setting and what to change.
    """
    if launch.zero_stage != 3:
        return
    section = profile.sft if kind == "sft" else profile.grpo
    if kind == "grpo" and profile.use_vllm and section.get("ds3_gather_for_generation", True) is False:
        raise LaunchError(
            f"profile {profile.name!r}: ds3_gather_for_generation: false is not compatible with vLLM "
            f"generation under ZeRO-3 ({launch.path.name}); remove it or set model.use_vllm: false"
        )
    if profile.lora.enabled:
        raise LaunchError(
            f"profile {profile.name!r} ({kind}): LoRA under ZeRO-3 ({launch.path.name}) is refused: merging "
            "the adapters into the saved model needs the whole weights; launch with ddp or zero2, or set "
            "lora.enabled: false to fine-tune in full under ZeRO-3"
        )


def fill_deepspeed_config(
    deepspeed: Mapping[str, Any],
    trainer_kwargs: Mapping[str, Any],
    num_processes: int,
    hidden_size: int,
    num_training_steps: int = 1000,
) -> dict[str, Any]:
    """Fill a DeepSpeed config's ``"auto"`` values as the trainer will, with transformers' own code.

    ``HfTrainerDeepSpeedConfig.trainer_config_process`` / ``trainer_config_finalize`` replace
    every ``"auto"`` they know from the training arguments and record explicit values that
    disagree with them. Only its constructor needs the ``deepspeed`` package (a version check), so
    it is skipped here: the filling runs on any machine.

    Args:
        deepspeed: the DeepSpeed JSON as a dict (not modified).
        trainer_kwargs: the trainer fields of the stage (a profile's ``trainer_kwargs`` plus the
            plan's overrides); precision comes from ``bf16`` / ``fp16``.
        num_processes: processes (GPUs) training.
        hidden_size: the model's hidden size (the bucket sizes are derived from it).
        num_training_steps: optimiser steps (for a scheduler section's ``"auto"``).

    Returns:
        The filled config.

    Raises:
        LaunchError: when an explicit value disagrees with the training arguments, or an ``"auto"``
            is left that nothing fills (DeepSpeed would then read the string ``"auto"``).
    """
    from accelerate.utils.deepspeed import HfDeepSpeedConfig as AccelerateDeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    # Without deepspeed installed, transformers' class does not derive from accelerate's (which holds
    # get_value, is_zero3...): listing both bases gives the same class either way.
    class _Filler(HfTrainerDeepSpeedConfig, AccelerateDeepSpeedConfig):
        def __init__(self, config: Mapping[str, Any]) -> None:
            AccelerateDeepSpeedConfig.__init__(self, dict(config))  # parses the config; no deepspeed import
            self._dtype = None
            self.mismatches = []

    fields = {k: v for k, v in trainer_kwargs.items() if k in TrainingArguments.__dataclass_fields__}
    # Built on this machine with no precision (a CPU refuses bf16); the view below restores it.
    args = TrainingArguments(
        output_dir=os.devnull,
        **(fields | {"bf16": False, "fp16": False, "use_cpu": True, "report_to": "none"}),
    )
    view = _ArgsView(
        args,
        world_size=num_processes,
        bf16=bool(trainer_kwargs.get("bf16")),
        fp16=bool(trainer_kwargs.get("fp16")),
    )
    filler = _Filler(deepspeed)
    filler.trainer_config_process(view)
    model = _ModelWithHiddenSize(hidden_size)
    try:
        filler.trainer_config_finalize(view, model, num_training_steps)
    except ValueError as error:  # transformers raises on mismatches between the JSON and the arguments
        raise LaunchError(f"DeepSpeed config disagrees with the training arguments: {error}") from error
    if left := sorted(_auto_keys(filler.config)):
        raise LaunchError(f'DeepSpeed config: "auto" at {left} is filled by nothing in transformers')
    return filler.config


class _ArgsView:
    """Training arguments as seen on ``world_size`` GPUs with the profile's precision."""

    def __init__(self, args: Any, world_size: int, bf16: bool, fp16: bool) -> None:
        self._args = args
        self.world_size = world_size
        self.bf16 = bf16
        self.fp16 = fp16

    def __getattr__(self, name: str) -> Any:
        return getattr(self._args, name)


class _ModelWithHiddenSize:
    def __init__(self, hidden_size: int) -> None:
        from types import SimpleNamespace

        self.config = SimpleNamespace(hidden_size=hidden_size)


def _auto_keys(config: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        if isinstance(value, Mapping):
            keys.extend(_auto_keys(value, f"{prefix}{key}."))
        elif value == "auto":
            keys.append(f"{prefix}{key}")
    return keys


# Hidden size of the language model, for the ZeRO bucket sizes: read from the model where it is at
# hand; these are the checkpoints the shipped profiles name.
_KNOWN_HIDDEN_SIZES = {
    "Qwen/Qwen2-VL-2B-Instruct": 1536,
    "Qwen/Qwen2-VL-7B-Instruct": 3584,
    "smollm2-135m": 576,
}


def profile_hidden_size(profile: Profile) -> int:
    """The language model's hidden size for a profile (for DeepSpeed's ``"auto"`` bucket sizes).

    Reads ``config.json`` when the profile's source is a local model folder; otherwise the known
    size of a shipped profile's checkpoint, or the tiny model's configured size.
    """
    source = Path(profile.source)
    if (source / "config.json").is_file():
        config = json.loads((source / "config.json").read_text())
        text = config.get("text_config") or {}
        if size := config.get("hidden_size") or text.get("hidden_size"):
            return int(size)
    if profile.tiny is not None:
        return int(profile.tiny.text["hidden_size"])
    if profile.source in _KNOWN_HIDDEN_SIZES:
        return _KNOWN_HIDDEN_SIZES[profile.source]
    raise LaunchError(
        f"profile {profile.name!r}: hidden size of {profile.source!r} unknown; use a local model folder"
    )


def preflight(
    profile: Profile, kind: str, launch: LaunchConfig | str | Path, num_processes: int | None = None
) -> LaunchPlan:
    """Every check of a launch before it starts: batch plan, ZeRO-3 rules, DeepSpeed "auto" filling.

    Args:
        profile: the profile.
        kind: ``"sft"`` or ``"grpo"`` (the warm-up stage trains with the ``sft`` section).
        launch: a :class:`LaunchConfig`, or a name / path for :func:`load_launch_config`.
        num_processes: the process count when ``accelerate launch --num_processes`` overrides the
            file's; default: the file's.

    Returns:
        The :class:`LaunchPlan` to train with.

    Raises:
        LaunchError: with the first problem found.
    """
    if not isinstance(launch, LaunchConfig):
        launch = load_launch_config(launch)
    processes = num_processes or launch.num_processes
    plan = plan_launch(profile, kind, processes)
    check_zero3(profile, kind, launch)
    if kind == "grpo" and profile.use_vllm and profile.vllm_mode not in ("colocate", "server"):
        raise LaunchError(
            f"profile {profile.name!r}: vllm_mode must be colocate or server, got {profile.vllm_mode!r}"
        )
    if launch.deepspeed is not None:
        kwargs = profile.trainer_kwargs(kind) | plan.trainer_overrides()
        fill_deepspeed_config(launch.deepspeed, kwargs, processes, profile_hidden_size(profile))
    return plan


def with_launch_config(profile: Profile, kind: str, launch: LaunchConfig) -> Profile:
    """The profile whose ``kind`` section trains under ``launch``'s DeepSpeed JSON, if it has one.

    The trainer arguments then carry ``deepspeed``: creating them (before the model, see
    :func:`ecg_r1.training.runner.run_trainer`) turns on transformers' ZeRO-3 switch, so
    ``from_pretrained`` builds the model partitioned, under ``torchrun`` as under
    ``accelerate launch``. The batch layout is not written here: every stage spreads its batch
    over the running processes itself (:func:`ecg_r1.training.processes.keep_global_batch`).
    """
    if launch.deepspeed_path is None:
        return profile
    section = dict(profile.sft if kind == "sft" else profile.grpo) | {"deepspeed": str(launch.deepspeed_path)}
    return replace(profile, **{kind: section})


__all__ = [
    "LAUNCH_DIR",
    "LaunchConfig",
    "LaunchError",
    "LaunchPlan",
    "available_launch_configs",
    "check_zero3",
    "fill_deepspeed_config",
    "load_launch_config",
    "plan_launch",
    "preflight",
    "profile_hidden_size",
    "with_launch_config",
]
