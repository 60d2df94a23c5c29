"""The generic TRL trainer run every trainer stage shares: :func:`run_trainer` runs one
:class:`TrainerJob` (what to train) under :class:`RunOptions` (how: tracking, registration,
progress, resume), in the stage's folder (:mod:`ecg_r1.training.stage_folder`: layout, resume,
result) and MLflow run (:mod:`ecg_r1.training.run_log`); :mod:`ecg_r1.training.sft` and
:mod:`ecg_r1.training.grpo` build the jobs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecg_r1.constants import REPO_ROOT
from ecg_r1.modeling.device import float32_vision_tower, resolve_device, training_dtype
from ecg_r1.modeling.models import load_model_and_processor, save_model_folder
from ecg_r1.modeling.profiles import Profile, load_profile
from ecg_r1.training.processes import keep_global_batch, world_size_from_env
from ecg_r1.training.run_log import (
    log_model_folder,
    log_run_metrics,
    log_run_params,
    profile_params,
    run_provenance,
    tracked_run,
)
from ecg_r1.training.stage_folder import (
    CHECKPOINTS,
    MODEL,
    RESULT_FILE,
    StageResult,
    prepare_out_dir,
    read_result,
    resume_point,
    speed_summary,
    write_result,
)

logger = logging.getLogger(__name__)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from the tokenizer


def as_profile(profile: Profile | str | Path) -> Profile:
    return profile if isinstance(profile, Profile) else load_profile(profile)


def trainer_config(
    profile: Profile,
    kind: str,
    out_dir: Path,
    max_steps: int | None,
    seed: int | None,
    overrides: Mapping[str, Any],
) -> dict[str, Any]:
    kwargs = profile.trainer_kwargs(kind)
    kwargs.update(overrides)
    if max_steps is not None:
        kwargs["max_steps"] = int(max_steps)
    if seed is not None:
        kwargs["seed"] = int(seed)
    # One GPU's batch, spread over the processes torchrun / accelerate started (WORLD_SIZE).
    kwargs.update(keep_global_batch(kwargs, world_size_from_env() or 1, f"profile {profile.name!r} ({kind})"))
    if resolve_device(profile) == "cpu":
        # A CPU run on purpose (a float32 profile, or ECG_R1_DEVICE=cpu): transformers refuses half
        # precision without a GPU unless told, and would take a GPU it finds; accelerate treats
        # processes under torchrun as unrelated single runs (DistributedType.NO) unless cpu=True
        # gives them gloo (MULTI_CPU).
        kwargs["use_cpu"] = True
    kwargs.update(
        output_dir=str(out_dir / CHECKPOINTS),
        report_to="none",  # metrics go to our run through MlflowMetricsCallback (see callbacks.py)
        disable_tqdm=True,  # our ProgressCallback draws the bar
        save_strategy="steps",
        dataloader_num_workers=0,
        data_seed=kwargs.get("seed", profile.seed),
    )
    return kwargs


def _attach_callbacks(
    trainer: Any, stage: str, run_id: str | None, progress: bool, extra: Sequence[Any]
) -> list[Any]:
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_callback import ProgressCallback as HFProgress

    from ecg_r1.training.callbacks import (
        CompletionSamplesCallback,
        LogLinesCallback,
        MlflowMetricsCallback,
        ProgressCallback,
    )

    # The trainer's own printer / bar print every log dict in full; ours are compact.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(HFProgress)
    callbacks: list[Any] = [LogLinesCallback(stage)]
    if progress:
        callbacks.append(ProgressCallback(stage))
    if run_id is not None:
        callbacks.append(MlflowMetricsCallback(run_id))
    if stage == "grpo":
        callbacks.append(CompletionSamplesCallback())
    callbacks.extend(extra)
    for callback in callbacks:
        if hasattr(callback, "trainer"):
            callback.trainer = trainer
        trainer.add_callback(callback)
    return callbacks


def _final_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
    last: dict[str, float] = {}
    for entry in history:
        for key, value in entry.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                last[key] = float(value)
    return last


@dataclass(frozen=True)
class RunOptions:
    """How a stage runs, whatever it trains.

    Attributes:
        tracking: log the run to MLflow.
        register: register the SFT / GRPO model as a version in MLflow's registry (needs
            ``tracking``; the other stages log their model folder only).
        progress: draw a progress bar.
        resume: continue from the last checkpoint of an unfinished run in the same folder.
        repo_root: the repository whose git commit and DVC data version are the provenance.
        run_name: the MLflow run name (default ``<stage>-<time>``).
        callbacks: extra trainer callbacks.
    """

    tracking: bool = True
    register: bool = True
    progress: bool = False
    resume: bool = True
    repo_root: Path = REPO_ROOT
    run_name: str | None = None
    callbacks: Sequence[Any] = ()


@dataclass(frozen=True)
class TrainerJob:
    """What one TRL trainer run trains.

    Attributes:
        stage: the stage name (``warmup``, ``sft``, ``grpo``).
        profile: the model profile.
        start_model: the model folder training starts from.
        out_dir: the stage's folder (layout: :mod:`ecg_r1.training.stage_folder`).
        make_args: ``make_args()`` returns the trainer's arguments (``SFTConfig`` / ``GRPOConfig``);
            called before the model is loaded (ZeRO-3 builds it partitioned only then).
        make_trainer: ``make_trainer(model, processor, args)`` returns the configured trainer.
        params: parameters logged with the run (``config_digest`` tags the registered version).
        register_as: the registered model name (where :attr:`RunOptions.register` asks for it), or
            None to log the model folder only.
        samples: ``samples(model, processor, step)`` returns sample-completion rows, or None.
        note_vocabulary: the words of the training cases' notes; the trained model folder carries
            them (``note_vocabulary.json``), what ``model.unseen_note_words: mark`` reads at inference.
        splits_path: the split manifest the cases come from, logged as the run's dataset inputs.
    """

    stage: str
    profile: Profile
    start_model: Path
    out_dir: Path
    make_args: Callable[[], Any]
    make_trainer: Callable[[Any, Any, Any], Any]
    params: dict[str, Any]
    register_as: str | None = None
    samples: Callable[[Any, Any, int], list[dict[str, Any]]] | None = None
    note_vocabulary: frozenset[str] | None = None
    splits_path: Path | None = None


@dataclass(frozen=True)
class _Training:
    """What one ``trainer.train`` call did in this process."""

    steps: int  # the global step reached
    resumed_from: int  # the checkpoint step it resumed from (0: a fresh run)
    seconds: float
    samples_per_step: int  # training samples (GRPO: prompts) per optimiser step, all processes
    loss: float  # the mean training loss


def score_labelled_positions_only() -> None:
    """Make TRL's fused LM head score only the positions that carry a label, on every device.

    TRL 1.16's SFT and GRPO losses go through a fused LM head (``trl.trainer.utils.add_fused_lm_head``)
    that scores only the labelled positions on CUDA/XPU but every position elsewhere, to keep
    Neuron's tile shapes fixed between batches. On a CPU that means the 49k-word head over all
    ~300 positions of a sequence whose loss covers the ~12 tokens of the answer: about a third of
    an SFT step of the smol profile (docs/benchmarks.md). The values are the same either way
    (tested); only the unlabelled positions' work goes. Idempotent.
    """
    import trl.trainer.utils as trl_utils

    use_triton = trl_utils._use_triton
    if getattr(use_triton, "scores_labelled_only", False):
        return

    def compact(device: Any) -> bool:
        return device.type == "cpu" or use_triton(device)

    compact.scores_labelled_only = True  # type: ignore[attr-defined]
    trl_utils._use_triton = compact


def run_trainer(job: TrainerJob, options: RunOptions) -> StageResult:
    """Run one TRL trainer with checkpoints, resume, MLflow logging and registration.

    Under ``torchrun`` / ``accelerate launch`` every process calls it; only the main one touches
    the folder and MLflow (creates or resumes the run, logs, saves the model's companions,
    registers the version, writes ``result.json``), the others train and wait for it at the
    barriers. Every process returns the main process's result.
    """
    from accelerate import PartialState

    score_labelled_positions_only()
    out_dir = Path(job.out_dir)
    # The trainer arguments come before the model: they start the process group (the barriers
    # below) and, under a DeepSpeed ZeRO-3 config, switch transformers to building the model
    # partitioned (zero.Init in from_pretrained); a model loaded before them is whole on every GPU
    # and its saved weights are empty partitions.
    args = job.make_args()
    state = PartialState()
    main = state.is_main_process
    with state.main_process_first():  # the main process clears or keeps the folder; the others read it
        checkpoint = prepare_out_dir(out_dir, options.resume) if main else resume_point(out_dir)
    provenance = run_provenance(Path(options.repo_root))
    tags = {"profile": job.profile.name, **provenance}
    with tracked_run(
        options.tracking and main, job.profile, job.stage, out_dir, options.run_name, tags
    ) as run_id:
        _log_inputs(job, run_id, provenance)
        model, processor = _load_model(job)
        trainer = job.make_trainer(model, processor, args)
        attached = _attach_callbacks(trainer, job.stage, run_id, options.progress, options.callbacks)
        training = _train(trainer, job.stage, checkpoint, state.num_processes)
        model_dir = out_dir / MODEL
        info = {
            "stage": job.stage,
            "profile": job.profile.name,
            "started_from": str(job.start_model),
            "steps": training.steps,
            "mlflow_run_id": run_id,
            **provenance,
        }
        save_final_model(trainer, trainer.model, processor, model_dir, info, main)
        samples = _sample_completions(job, trainer.model, processor, training.steps, options.tracking, main)
        if not main:
            state.wait_for_everyone()  # until the main process has written result.json
            return _main_process_result(out_dir, job.stage)
        history = list(trainer.state.log_history)
        run_steps = max(1, training.steps - training.resumed_from)
        summary = speed_summary(training.seconds, run_steps, training.samples_per_step)
        summary["train_loss_mean"] = training.loss
        log_run_metrics(run_id, summary, training.steps)
        _log_completions(run_id, [row for c in attached for row in getattr(c, "rows", [])] + samples)
        registered = _record_model(job, run_id, model_dir, provenance, options.register)
    result = StageResult(
        stage=job.stage,
        model_dir=model_dir,
        run_id=run_id,
        registered=registered,
        steps=training.steps,
        resumed_from=training.resumed_from,
        seconds=training.seconds,
        seconds_per_step=summary["seconds_per_step"],
        samples_per_second=summary["samples_per_second"],
        peak_rss_mb=summary["peak_rss_mb"],
        metrics={**_final_metrics(history), **summary},
        history=history,
    )
    write_result(out_dir, result)
    state.wait_for_everyone()
    return result


def _log_inputs(job: TrainerJob, run_id: str | None, provenance: Mapping[str, str]) -> None:
    """The run's parameters (the job's, the provenance, the profile) and its dataset inputs."""
    log_run_params(run_id, {**job.params, **provenance, "profile": profile_params(job.profile)})
    if run_id is not None and job.splits_path is not None:
        from ecg_r1.tracking.runs import log_split_inputs

        log_split_inputs(job.splits_path, provenance["data_version"])


def _load_model(job: TrainerJob) -> tuple[Any, Any]:
    """The start model and its processor, ready to train as the profile and stage ask."""
    profile = job.profile
    # float32 master weights where weights train in full (ecg_r1.modeling.device)
    model, processor = load_model_and_processor(job.start_model, profile, dtype=training_dtype(profile))
    if resolve_device(profile) == "cpu" and profile.training_precision != "float32":
        float32_vision_tower(model)
    if job.note_vocabulary is not None:  # saved with the model (save_model_folder)
        processor.note_vocabulary = job.note_vocabulary
    if profile.stage_settings(job.stage)["freeze_vision"]:
        freeze_vision_tower(model)
    return model, processor


def _train(trainer: Any, stage: str, checkpoint: str | None, num_processes: int) -> _Training:
    """``trainer.train``, from ``checkpoint`` when there is one, timed."""
    resumed_from = 0
    if checkpoint is not None:
        resumed_from = int(Path(checkpoint).name.rsplit("-", 1)[-1])
        logger.info("%s: resuming from %s (step %d)", stage, checkpoint, resumed_from)
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - started
    batch = trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
    batch *= num_processes
    if stage == "grpo":  # a GRPO step consumes batch / num_generations distinct prompts
        batch = batch // max(1, trainer.args.num_generations)
    return _Training(
        steps=int(trainer.state.global_step),
        resumed_from=resumed_from,
        seconds=seconds,
        samples_per_step=batch,
        loss=float(output.training_loss),
    )


def _sample_completions(
    job: TrainerJob, model: Any, processor: Any, step: int, tracking: bool, main: bool
) -> list[dict[str, Any]]:
    """The job's sample completions of the trained model, for the run's samples table."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    # Samples are logged by the main process; under ZeRO-3 generating needs every process
    # (each holds a part of the weights).
    if job.samples is not None and tracking and (main or is_deepspeed_zero3_enabled()):
        return job.samples(model, processor, step)
    return []


def _main_process_result(out_dir: Path, stage: str) -> StageResult:
    """The result the main process wrote (read by the other processes once it has)."""
    result = read_result(out_dir)
    if result is None:
        raise RuntimeError(f"{stage}: the main process wrote no {out_dir / RESULT_FILE}")
    return result


def _log_completions(run_id: str | None, rows: list[dict[str, Any]]) -> None:
    if run_id is not None and rows:
        from ecg_r1.tracking.runs import log_completions_table

        log_completions_table(rows, "samples/completions.json", run_id=run_id)


def _record_model(
    job: TrainerJob, run_id: str | None, model_dir: Path, provenance: Mapping[str, str], register: bool
) -> str | None:
    """Register the model (``name/version``, returned) where the job and options ask for it, else
    log its folder on the run; nothing untracked."""
    if run_id is None:
        return None
    if job.register_as is None or not register:
        log_model_folder(run_id, model_dir)
        return None
    from ecg_r1.tracking.model_registry import register_model_version

    version = register_model_version(
        run_id,
        model_dir,
        job.register_as,
        tags={
            "stage": job.stage,
            "profile": job.profile.name,
            "config": job.params.get("config_digest", ""),
            "start_model": str(job.start_model),
            **provenance,
        },
        profile=job.profile,
    )
    return f"{job.register_as}/{version}"


def save_final_model(
    trainer: Any, model: Any, processor: Any, model_dir: Path, info: Mapping[str, Any], main: bool
) -> None:
    """Save the trained model into ``model_dir``; every process calls it.

    A full model goes through ``trainer.save_model`` on every process: under ZeRO-3 that gathers
    the partitions into whole tensors (a collective), and only the main process writes. A PEFT
    model is merged into its base on the main process (its weights are whole there: ZeRO-3 with
    LoRA is refused before training, :func:`ecg_r1.training.launch.check_zero3`). The main process
    then adds the processor, note words and summary (:func:`save_model_folder`'s companions).
    """
    from ecg_r1.modeling.models import write_model_companions

    if hasattr(model, "merge_and_unload"):
        if main:
            save_model_folder(model, processor, model_dir, info=info)
    else:
        trainer.save_model(str(model_dir))
        if main:
            write_model_companions(processor, model_dir, info)
    trainer.accelerator.wait_for_everyone()


def freeze_vision_tower(model: Any) -> int:
    """Keep the vision tower (patch embedding, blocks and merger) out of training.

    After the signal-grounded pre-training the tower already reads the page; freezing it keeps
    what it learned from being overwritten by a few hundred label-driven steps, and saves its
    backward pass, which is most of a tiny model's step on a CPU (measured with cProfile: the
    vision forward alone is over half the model's forward at 224 px).

    Returns:
        The number of parameters frozen.
    """
    visual = model.model.visual
    visual.requires_grad_(False)
    return sum(p.numel() for p in visual.parameters())
