"""Training stages as assets: base model -> vision pre-training -> SFT baseline, format warm-up, and
GRPO from the start the profile names (``stages.grpo.start``), plus GRPO after the label-free
warm-up (the paper's RL-only recipe) for comparison.

Each asset is one call of an ``ecg_r1.training`` stage function writing ``data/models/<asset>/``
(``model/``, ``checkpoints/``, ``result.json``); a run killed part-way resumes from its last
checkpoint when the asset is materialized again. Hyperparameters live in the profile YAML
(``ecg_r1/configs/profiles``); the config classes here only name the profile and override steps
or seed.
"""

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import dagster as dg
from pydantic import Field

from dagster_project.defs import launching
from dagster_project.defs.assets.image_assets import ecg_images
from dagster_project.defs.executors import GPU_QUEUE, TRANSIENT_RETRY
from dagster_project.defs.resources import DataLayout, DvcResource, MlflowResource
from dagster_project.pipes_train import result_metadata
from ecg_r1.data.split import SPLITS_FILE
from ecg_r1.modeling.build import checkpoint_record
from ecg_r1.modeling.device import DEVICE_ENV, device_setting
from ecg_r1.modeling.profiles import DEFAULT_PROFILE, load_profile
from ecg_r1.training import runner, stage_folder, stages

GROUP = "models"
MODEL_DIR = stage_folder.MODEL
CHECKPOINT_FILE = "checkpoint.json"  # base_model's record of a pretrained checkpoint


class StageConfig(dg.Config):
    """Which profile trains, and overrides of its stage settings."""

    profile: str = Field(
        default=DEFAULT_PROFILE, description="Profile name or YAML path (ecg_r1/configs/profiles)."
    )
    max_steps: int = Field(default=0, description="Optimiser steps; 0: the profile's setting.")
    seed: int = Field(default=-1, description="Random seed; -1: the profile's seed.")
    device: str = Field(
        default="",
        description=f"{DEVICE_ENV} for this asset: cpu runs a GPU profile on the CPU on purpose, cuda "
        "insists on a GPU; empty: the environment's, else the GPU when there is one.",
    )
    launcher: Literal["in_process", "torchrun"] = Field(
        default="in_process",
        description="in_process: the stage runs in this step's process (tiny, smol, one GPU). torchrun: "
        "nproc_per_node processes (one per GPU) launched through Dagster Pipes (sft, warmup, grpo).",
    )
    nproc_per_node: int = Field(default=1, description="torchrun: processes (GPUs) on this machine.")
    launch_config: str = Field(
        default="",
        description="torchrun: the launch config checked and used (ddp, zero2, zero3 or a YAML path); "
        "empty: plain DDP. The profile's global batch is kept either way.",
    )


class BaseModelConfig(StageConfig):
    """The base model: the profile's, or a checkpoint of one's own."""

    source: str = Field(
        default="",
        description="A local model folder (your own weights, no hub needed; relative to the project root) "
        "or hub id instead of the profile's model.source.",
    )
    random_init: str = Field(
        default="",
        description="Model sizes (a name in ecg_r1/configs/random_models, e.g. qwen2-vl-2b-standin, or a YAML "
        "path): build a random-initialised Qwen2-VL of those sizes into `source` when it holds no model yet "
        "(the CPU stand-in of a checkpoint).",
    )


def _data(layout: DataLayout) -> dict[str, Path]:
    return {
        "cohort_dir": layout.cohort,
        "splits_path": layout.splits / SPLITS_FILE,
        "images_dir": layout.images,
    }


def _overrides(config: StageConfig) -> dict:
    return {
        "max_steps": config.max_steps or None,
        "seed": None if config.seed < 0 else config.seed,
    }


def stage_dir(layout: DataLayout, asset_name: str) -> Path:
    return layout.models / asset_name


def model_folder(layout: DataLayout, asset_name: str) -> Path:
    """The model folder an upstream asset left (a finished stage's, the base model built here, or
    the pretrained checkpoint the base model recorded)."""
    record = stage_dir(layout, asset_name) / CHECKPOINT_FILE
    result = stage_folder.read_result(stage_dir(layout, asset_name))
    if record.is_file():
        folder = Path(json.loads(record.read_text())["model_dir"])
    else:
        folder = Path(result.model_dir) if result else stage_dir(layout, asset_name) / MODEL_DIR
    if not (folder / "config.json").is_file():
        raise dg.Failure(
            f"{asset_name} has no finished model in {folder}; materialize {asset_name} first",
            allow_retries=False,
        )
    return folder


def _metadata(reported: dict, mlflow: MlflowResource, extra: dict) -> dict:
    """A stage's asset metadata: its result (:func:`result_metadata`) with links, plus ``extra``."""
    run_id = reported["mlflow_run_id"]
    return {
        **reported,
        "model_dir": dg.MetadataValue.path(str(reported["model_dir"])),
        "mlflow_run": dg.MetadataValue.url(mlflow.run_url(run_id)) if run_id != "none" else "none",
        **extra,
    }


def _train(
    context: dg.AssetExecutionContext,
    stage: str,
    start_asset: str | None,
    config: StageConfig,
    layout: DataLayout,
    dvc: DvcResource,
    mlflow: MlflowResource,
    **kwargs,
) -> dg.MaterializeResult:
    uri = mlflow.configure()
    out_dir = stage_dir(layout, context.asset_key.path[-1])
    start = model_folder(layout, start_asset) if start_asset else None
    extra = {"profile": config.profile, "start_model": str(start), "launcher": config.launcher}
    if config.launcher == "torchrun":
        extra["processes"] = config.nproc_per_node
    with launching.one_run_per_folder(out_dir):
        reported = _run_stage(context, stage, start, config, layout, out_dir, uri, kwargs)
    return dg.MaterializeResult(metadata=_metadata(reported, mlflow, extra | dvc.record()))


def _run_stage(
    context: dg.AssetExecutionContext,
    stage: str,
    start: Path | None,
    config: StageConfig,
    layout: DataLayout,
    out_dir: Path,
    uri: str,
    kwargs: dict,
) -> dict:
    """Run the stage in this process or through torchrun; its result as plain metadata."""
    name = context.asset_key.path[-1]
    if config.launcher == "torchrun":
        args = launching.train_arguments(stage, config.profile, _data(layout), out_dir, start, name)
        args += launching.option_flags(_overrides(config), config.launch_config, **kwargs)
        return launching.launch_stage(context, args, out_dir, config.nproc_per_node, uri)
    common = {"out_dir": out_dir, **_data(layout), **_overrides(config)}
    if stage == "vision":
        result = stages.run_vision_stage(
            config.profile, start, repo_root=layout.root, run_name=name, **common
        )
    else:
        options = runner.RunOptions(repo_root=layout.root, run_name=name, **kwargs)
        result = stages.stage_function(stage)(config.profile, start, options=options, **common)
    context.log.info(f"{stage}: {result.steps} steps in {result.seconds:.0f} s, run {result.run_id}")
    return result_metadata(result)


@dg.asset(
    group_name=GROUP,
    deps=[ecg_images],
    kinds={"pytorch"},
    op_tags=GPU_QUEUE,
    retry_policy=TRANSIENT_RETRY,
)
def base_model(
    context: dg.AssetExecutionContext, config: BaseModelConfig, layout: DataLayout, dvc: DvcResource
) -> dg.MaterializeResult:
    """The profile's starting model: for ``tiny`` a random-init Qwen2-VL with a tokenizer trained on
    the training split's texts (built into ``model/``); for a pretrained checkpoint (the profile's
    hub id, or ``source``: a folder of one's own) a record of it in ``checkpoint.json`` (folder,
    hub revision or content hash), which the next stages read."""
    out_dir = stage_dir(layout, "base_model")
    shutil.rmtree(out_dir, ignore_errors=True)  # a new cohort means a new tokenizer
    source = str(layout.path(config.source)) if config.source else None
    folder = stages.build_start_model(
        config.profile,
        out_dir=out_dir / MODEL_DIR,
        source=source,
        random_sizes=config.random_init or None,
        **_data(layout),
    )
    checkpoint = {}
    if folder.resolve() != (out_dir / MODEL_DIR).resolve():
        checkpoint = checkpoint_record(folder, source or load_profile(config.profile).source)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / CHECKPOINT_FILE).write_text(json.dumps(checkpoint, indent=2))
    info_file = folder / "ecg_r1_model.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    return dg.MaterializeResult(
        metadata={
            "model_dir": dg.MetadataValue.path(str(folder)),
            **{k: v for k, v in info.items() if isinstance(v, int | float | str)},
            # after the model's own info (which names the profile): the config's name or path is
            # what the page check and the next stages load
            "profile": config.profile,
            **{f"checkpoint_{k}": v for k, v in checkpoint.items()},
            **dvc.record(),
        }
    )


def after_vision(profile: str) -> str:
    """The asset SFT and the warm-up start from: the vision-pre-trained model where the profile
    asks for that stage (a new tower), else the base model (a pretrained checkpoint's tower)."""
    return "vision_pretrained_model" if load_profile(profile).pretrains_vision else "base_model"


# Where GRPO may start (profile ``stages.grpo.start``, one of ecg_r1.modeling.stage_settings.GRPO_STARTS,
# checked when the profile loads) -> the asset holding that model.
GRPO_STARTS = {
    "base": "base_model",
    "vision": "vision_pretrained_model",
    "warmup": "format_warmup_model",
    "sft": "sft_model",
}


def grpo_start_asset(profile: str) -> str:
    """The asset the profile's GRPO starts from: the instruction-tuned base for the GPU profiles
    (as the paper does), the SFT model for ``tiny`` (the recipe measured to work on a CPU)."""
    return GRPO_STARTS[load_profile(profile).stage_settings("grpo")["start"]]


def _stage_asset(
    name: str,
    stage: str,
    start: str | Callable[[str], str],
    description: str,
    deps: tuple[str, ...],
    **stage_kwargs,
) -> dg.AssetsDefinition:
    """One training stage as an asset, starting from the model folder of the asset ``start``
    names, or that ``start(profile)`` returns (one of ``deps``)."""

    @dg.asset(
        name=name,
        group_name=GROUP,
        deps=[dg.AssetKey(d) for d in deps],
        kinds={"pytorch", "mlflow"},
        description=description,
        op_tags=GPU_QUEUE,
        retry_policy=TRANSIENT_RETRY,
    )
    def _asset(
        context: dg.AssetExecutionContext,
        config: StageConfig,
        layout: DataLayout,
        dvc: DvcResource,
        mlflow: MlflowResource,
    ) -> dg.MaterializeResult:
        if stage == "vision" and not load_profile(config.profile).pretrains_vision:
            shutil.rmtree(stage_dir(layout, name), ignore_errors=True)  # no stale tower for SFT to find
            return dg.MaterializeResult(
                metadata={
                    "skipped": f"profile {config.profile} has no stages.vision_pretrain: its tower is used as it is"
                }
            )
        start_asset = start if isinstance(start, str) else start(config.profile)
        with device_setting(config.device):
            return _train(context, stage, start_asset, config, layout, dvc, mlflow, **stage_kwargs)

    return _asset


vision_pretrained_model = _stage_asset(
    "vision_pretrained_model",
    "vision",
    "base_model",
    "Signal-grounded vision pre-training: the vision tower learns measurements of the raw signal "
    "(TWI leads, ST level, QRS width and voltage) from the rendered page; no ischemia label. Runs only "
    "where the profile has a stages.vision_pretrain section (a new tower).",
    deps=("base_model",),
)
format_warmup_model = _stage_asset(
    "format_warmup_model",
    "warmup",
    after_vision,
    "Label-free format warm-up: the output contract with the answer masked out of the loss (or "
    "random), so any accuracy GRPO reaches is learned by reinforcement.",
    deps=("base_model", "vision_pretrained_model"),
)
sft_model = _stage_asset(
    "sft_model",
    "sft",
    after_vision,
    "The SFT baseline (TRL SFTTrainer) from the vision-pre-trained model (the base model where the profile "
    "pre-trains no tower); registers a version of ecg-r1-sft.",
    deps=("base_model", "vision_pretrained_model"),
)
grpo_model = _stage_asset(
    "grpo_model",
    "grpo",
    grpo_start_asset,
    "GRPO (format + accuracy rewards, grounding switchable) from the model the profile's "
    "stages.grpo.start names (tiny: the SFT model; GPU profiles: the instruction-tuned base); "
    "registers a version of ecg-r1-grpo.",
    deps=tuple(GRPO_STARTS.values()),
)
grpo_after_warmup_model = _stage_asset(
    "grpo_after_warmup_model",
    "grpo",
    "format_warmup_model",
    "GRPO after the label-free format warm-up (the paper's RL-only recipe for a model that cannot "
    "yet write the format), for comparison; not registered.",
    deps=("format_warmup_model",),
    register=False,
)
