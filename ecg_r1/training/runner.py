"""What every training stage shares: its output folder, checkpoints and resume, MLflow run and
registration, and the generic TRL trainer run.

``out_dir`` layout of a stage::

    out_dir/checkpoints/checkpoint-<step>/   trainer checkpoints (TRL / transformers format)
    out_dir/mlflow_run_id.txt                the run this training logs to
    out_dir/model/                           the final model folder
    out_dir/result.json                      written last: the stage finished

**Resume**: when ``out_dir`` holds checkpoints but no ``result.json`` (the process was killed),
the stage resumes from the last checkpoint at its step, with its optimizer, scheduler and RNG
state, and logs to the same MLflow run. When ``result.json`` exists, the previous run finished,
and a new call starts a new run from scratch.

:func:`run_trainer` runs one :class:`TrainerJob` (what to train) under :class:`RunOptions` (how:
tracking, progress, resume); :mod:`ecg_r1.training.sft` and :mod:`ecg_r1.training.grpo` build
the jobs. (A little over 400 lines: the trainer run and the folder, resume and MLflow plumbing
it alone uses are kept together.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ecg_r1.constants import REPO_ROOT
from ecg_r1.modeling.device import float32_vision_tower, resolve_device, training_dtype
from ecg_r1.modeling.models import load_model_and_processor, save_model_folder
from ecg_r1.modeling.profiles import Profile, load_profile
from ecg_r1.training.processes import keep_global_batch, world_size_from_env

logger = logging.getLogger(__name__)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from the tokenizer

CHECKPOINTS = "checkpoints"
MODEL = "model"
RESULT_FILE = "result.json"


@dataclass
class StageResult:
    """What a training stage produced.

    Attributes:
        stage: ``vision`` | ``warmup`` | ``sft`` | ``grpo``.
        model_dir: the saved model folder.
        run_id: the MLflow run (None when tracking was off).
        registered: ``"ecg-r1-sft/3"``-style name/version, or None.
        steps: the global step reached.
        resumed_from: the checkpoint step the run resumed from (0 for a fresh run).
        seconds: wall time of the training loop in this process.
        seconds_per_step: mean over the steps run in this process.
        samples_per_second: training samples (prompts) per second in this process.
        peak_rss_mb: the process's peak resident memory.
        metrics: the last logged value of every metric, plus summary figures.
        history: the trainer's log history (one dict per logging step).
    """

    stage: str
    model_dir: Path
    run_id: str | None
    registered: str | None
    steps: int
    resumed_from: int
    seconds: float
    seconds_per_step: float
    samples_per_second: float
    peak_rss_mb: float
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        data = asdict(self)
        data["model_dir"] = str(self.model_dir)
        return json.dumps(data, indent=2, default=str)

    @classmethod
    def from_json(cls, text: str) -> StageResult:
        data = json.loads(text)
        data["model_dir"] = Path(data["model_dir"])
        return cls(**data)


def read_result(out_dir: str | Path) -> StageResult | None:
    """The result of a finished stage in ``out_dir``; None when it has not finished."""
    path = Path(out_dir) / RESULT_FILE
    return StageResult.from_json(path.read_text()) if path.is_file() else None


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)


# ------------------------------------------------------------------------------------------------
# Shared plumbing


def as_profile(profile: Profile | str | Path) -> Profile:
    return profile if isinstance(profile, Profile) else load_profile(profile)


def last_checkpoint(checkpoints: str | Path) -> Path | None:
    """The newest *complete* checkpoint in a trainer's output folder, or None.

    The trainer writes ``trainer_state.json`` last, after the weights, optimizer, scheduler and
    RNG states; a process killed while saving leaves a folder without it. Such a folder is removed
    (resuming from it would fail, or silently start over), and the previous checkpoint is used.
    """
    folder = Path(checkpoints)
    if not folder.is_dir():
        return None
    found = []
    for path in folder.iterdir():
        name, _, number = path.name.rpartition("-")
        if path.is_dir() and name == "checkpoint" and number.isdigit():
            found.append((int(number), path))
    for _, path in sorted(found, reverse=True):
        if (path / "trainer_state.json").is_file():
            return path
        logger.warning("removing incomplete checkpoint %s (the run was killed while saving it)", path)
        shutil.rmtree(path)
    return None


def prepare_out_dir(out_dir: Path, resume: bool) -> str | None:
    """Make ``out_dir`` ready; return the checkpoint to resume from, if any."""
    from ecg_r1.tracking.runs import RUN_ID_FILE

    checkpoints = out_dir / CHECKPOINTS
    finished = (out_dir / RESULT_FILE).is_file()
    if finished or not resume:
        # A finished (or deliberately restarted) stage starts over: a new run, fresh checkpoints.
        for stale in (checkpoints, out_dir / MODEL):
            if stale.exists():
                shutil.rmtree(stale)
        for stale_file in (out_dir / RESULT_FILE, out_dir / RUN_ID_FILE):
            stale_file.unlink(missing_ok=True)
    checkpoints.mkdir(parents=True, exist_ok=True)
    last = last_checkpoint(checkpoints)
    if last is None and (out_dir / RUN_ID_FILE).is_file():
        # Killed before the first checkpoint: nothing to resume; the run id is kept so the
        # metrics of the restarted attempt land in the same MLflow run.
        logger.info("no checkpoint in %s: the stage starts from step 0", checkpoints)
    return str(last) if last is not None else None


@contextlib.contextmanager
def tracked_run(
    enabled: bool, profile: Profile, stage: str, out_dir: Path, run_name: str | None, tags: Mapping[str, str]
) -> Iterator[str | None]:
    if not enabled:
        yield None
        return
    from ecg_r1.tracking.runs import start_or_resume_run

    name = run_name or f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    with start_or_resume_run(profile.name, name, state_dir=out_dir, tags={"stage": stage, **tags}) as run:
        yield run.info.run_id


def run_provenance(repo_root: Path) -> dict[str, str]:
    from ecg_r1.tracking.runs import run_context

    return run_context(repo_root)


def log_run_params(run_id: str | None, params: Mapping[str, Any]) -> None:
    if run_id is None:
        return
    from ecg_r1.tracking.runs import log_params_flat

    log_params_flat(params, run_id=run_id)


def log_run_metrics(run_id: str | None, metrics: Mapping[str, float], step: int) -> None:
    """Log a stage's metrics on its run (nothing when untracked)."""
    if run_id is not None:
        from ecg_r1.tracking.runs import log_metrics

        log_metrics(run_id, metrics, step)


def log_model_folder(run_id: str, model_dir: Path) -> None:
    """Log an intermediate stage's model folder as the run's ``model/`` artifacts (the registered
    stages log theirs as a servable pyfunc through
    :func:`ecg_r1.tracking.model_registry.register_model_version`)."""
    from ecg_r1.tracking.model_registry import MODEL_ARTIFACT_PATH
    from mlflow import MlflowClient

    MlflowClient().log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT_PATH)


def profile_params(profile: Profile) -> dict[str, Any]:
    return {
        "name": profile.name,
        "source": profile.source,
        "dtype": profile.dtype,
        "image": f"{profile.image_width}x{profile.image_height}",
        "image_max_pixels": profile.image_max_pixels,
        "lora": profile.lora.enabled,
        "sft_rationale": profile.sft_rationale,
        "tiny": asdict(profile.tiny) if profile.tiny is not None else None,
        "vision": dict(profile.vision) if profile.vision is not None else None,
        "path": str(profile.path),
    }


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
        tracking: log the run to MLflow (and register SFT / GRPO models).
        progress: draw a progress bar.
        resume: continue from the last checkpoint of an unfinished run in the same folder.
        repo_root: the repository whose git commit and DVC data version are the provenance.
        run_name: the MLflow run name (default ``<stage>-<time>``).
        callbacks: extra trainer callbacks.
        splits_path: the split manifest, logged as the run's dataset inputs.
    """

    tracking: bool = True
    progress: bool = False
    resume: bool = True
    repo_root: Path = REPO_ROOT
    run_name: str | None = None
    callbacks: Sequence[Any] = ()
    splits_path: Path | None = None


@dataclass(frozen=True)
class TrainerJob:
    """What one TRL trainer run trains.

    Attributes:
        stage: the stage name (``warmup``, ``sft``, ``grpo``).
        profile: the model profile.
        start_model: the model folder training starts from.
        out_dir: the stage's folder (layout in the module docstring).
        make_args: ``make_args()`` returns the trainer's arguments (``SFTConfig`` / ``GRPOConfig``);
            called before the model is loaded (ZeRO-3 builds it partitioned only then).
        make_trainer: ``make_trainer(model, processor, args)`` returns the configured trainer.
        params: parameters logged with the run (``config_digest`` tags the registered version).
        register_as: the registered model name, or None to log the model folder only.
        samples: ``samples(model, processor, step)`` returns sample-completion rows, or None.
        note_vocabulary: the words of the training cases' notes; the trained model folder carries
            them (``note_vocabulary.json``), what ``model.unseen_note_words: mark`` reads at inference.
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
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    score_labelled_positions_only()
    stage, profile, start_model, params = job.stage, job.profile, job.start_model, job.params
    out_dir = Path(job.out_dir)
    # The trainer arguments come before the model: they start the process group (the barriers
    # below) and, under a DeepSpeed ZeRO-3 config, switch transformers to building the model
    # partitioned (zero.Init in from_pretrained); a model loaded before them is whole on every GPU
    # and its saved weights are empty partitions.
    args = job.make_args()
    state = PartialState()
    main = state.is_main_process
    with state.main_process_first():  # the main process clears or keeps the folder; the others read it
        checkpoint = prepare_out_dir(out_dir, options.resume) if main else _resume_point(out_dir)
    provenance = run_provenance(Path(options.repo_root))
    tags = {"profile": profile.name, **provenance}
    with tracked_run(options.tracking and main, profile, stage, out_dir, options.run_name, tags) as run_id:
        log_run_params(run_id, {**params, **provenance, "profile": profile_params(profile)})
        if run_id is not None and options.splits_path is not None:
            from ecg_r1.tracking.runs import log_split_inputs

            log_split_inputs(options.splits_path, provenance["data_version"])
        # float32 master weights where weights train in full (ecg_r1.modeling.device)
        model, processor = load_model_and_processor(start_model, profile, dtype=training_dtype(profile))
        if resolve_device(profile) == "cpu" and profile.training_precision != "float32":
            float32_vision_tower(model)
        if job.note_vocabulary is not None:  # saved with the model (save_model_folder)
            processor.note_vocabulary = job.note_vocabulary
        if profile.stage_settings(stage)["freeze_vision"]:
            freeze_vision_tower(model)
        trainer = job.make_trainer(model, processor, args)
        attached = _attach_callbacks(trainer, stage, run_id, options.progress, options.callbacks)
        resumed_from = 0
        if checkpoint is not None:
            resumed_from = int(Path(checkpoint).name.rsplit("-", 1)[-1])
            logger.info("%s: resuming from %s (step %d)", stage, checkpoint, resumed_from)
        started = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=checkpoint)
        seconds = time.perf_counter() - started
        steps = int(trainer.state.global_step)
        run_steps = max(1, steps - resumed_from)
        batch = trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
        batch *= state.num_processes
        if stage == "grpo":  # a GRPO step consumes batch / num_generations distinct prompts
            batch = batch // max(1, trainer.args.num_generations)
        trained = trainer.model
        model_dir = out_dir / MODEL
        info = {
            "stage": stage,
            "profile": profile.name,
            "started_from": str(start_model),
            "steps": steps,
            "mlflow_run_id": run_id,
            **provenance,
        }
        save_final_model(trainer, trained, processor, model_dir, info, main)
        samples = []
        # Samples are logged by the main process; under ZeRO-3 generating needs every process
        # (each holds a part of the weights).
        if job.samples is not None and options.tracking and (main or is_deepspeed_zero3_enabled()):
            samples = job.samples(trained, processor, steps)
        if not main:
            state.wait_for_everyone()  # until the main process has written result.json
            result = read_result(out_dir)
            if result is None:
                raise RuntimeError(f"{stage}: the main process wrote no {out_dir / RESULT_FILE}")
            return result
        history = list(trainer.state.log_history)
        metrics = _final_metrics(history)
        summary = {
            "train_seconds": seconds,
            "seconds_per_step": seconds / run_steps,
            "samples_per_second": run_steps * batch / seconds if seconds > 0 else 0.0,
            "peak_rss_mb": peak_rss_mb(),
            "train_loss_mean": float(output.training_loss),
        }
        log_run_metrics(run_id, summary, steps)
        rows = []
        for callback in attached:
            rows.extend(getattr(callback, "rows", []))
        rows.extend(samples)
        if run_id is not None and rows:
            from ecg_r1.tracking.runs import log_completions_table

            log_completions_table(rows, "samples/completions.json", run_id=run_id)
        registered = None
        if run_id is not None and job.register_as is None:
            log_model_folder(run_id, model_dir)
        if run_id is not None and job.register_as is not None:
            from ecg_r1.tracking.model_registry import register_model_version

            version = register_model_version(
                run_id,
                model_dir,
                job.register_as,
                tags={
                    "stage": stage,
                    "profile": profile.name,
                    "config": params.get("config_digest", ""),
                    "start_model": str(start_model),
                    **provenance,
                },
                profile=profile,
            )
            registered = f"{job.register_as}/{version}"
    result = StageResult(
        stage=stage,
        model_dir=model_dir,
        run_id=run_id,
        registered=registered,
        steps=steps,
        resumed_from=resumed_from,
        seconds=seconds,
        seconds_per_step=summary["seconds_per_step"],
        samples_per_second=summary["samples_per_second"],
        peak_rss_mb=summary["peak_rss_mb"],
        metrics={**metrics, **summary},
        history=history,
    )
    (out_dir / RESULT_FILE).write_text(result.to_json())
    state.wait_for_everyone()
    return result


def _resume_point(out_dir: Path) -> str | None:
    """The checkpoint a non-main process resumes from, once the main one prepared ``out_dir``."""
    last = last_checkpoint(out_dir / CHECKPOINTS)
    return str(last) if last is not None else None


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


def config_digest(values: Mapping[str, Any]) -> str:
    import hashlib

    return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]
