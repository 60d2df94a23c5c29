"""The training stages: vision pre-training, format warm-up, SFT and GRPO.

Every stage is one function with the same shape::

    run_<stage>(profile, start_model, cohort_dir, splits_path, images_dir, out_dir, ...) -> StageResult

It reads the training split, trains from ``start_model`` (a model folder), saves the result in
``out_dir/model`` and records the run in MLflow (the profile's experiment): parameters (profile,
hyperparameters, data version, git commit, seed, start model), per-step metrics, sample
completions as a table, and, for SFT and GRPO, a registered version of ``ecg-r1-sft`` /
``ecg-r1-grpo`` tagged with the data version and configuration.

``out_dir`` layout::

    out_dir/checkpoints/checkpoint-<step>/   trainer checkpoints (TRL / transformers format)
    out_dir/mlflow_run_id.txt                the run this training logs to
    out_dir/model/                           the final model folder
    out_dir/result.json                      written last: the stage finished

**Resume**: when ``out_dir`` holds checkpoints but no ``result.json`` (the process was killed),
the stage resumes from the last checkpoint at its step, with its optimizer, scheduler and RNG
state, and logs to the same MLflow run. When ``result.json`` exists, the previous run finished,
and a new call starts a new run from scratch.
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from ecg_r1.modeling.models import load_model_and_processor, save_model_folder, vision_token_ids
from ecg_r1.modeling.profiles import Profile, load_profile, lora_config
from ecg_r1.training.data import (
    balance_hospitals,
    case_findings,
    data_summary,
    grpo_dataset,
    load_cases,
    random_answers,
    sft_dataset,
    sft_targets,
)

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
CHECKPOINTS = "checkpoints"
MODEL = "model"
RESULT_FILE = "result.json"
STAGES = ("vision", "warmup", "sft", "grpo")
WARMUP_ANSWER_MODES = ("masked", "random")


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


def _as_profile(profile: Profile | str | Path) -> Profile:
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


def _prepare_out_dir(out_dir: Path, resume: bool) -> str | None:
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
def _tracked_run(
    enabled: bool, profile: Profile, stage: str, out_dir: Path, run_name: str | None, tags: Mapping[str, str]
) -> Iterator[str | None]:
    if not enabled:
        yield None
        return
    from ecg_r1.tracking.runs import start_or_resume_run

    name = run_name or f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    with start_or_resume_run(profile.name, name, state_dir=out_dir, tags={"stage": stage, **tags}) as run:
        yield run.info.run_id


def _provenance(repo_root: Path) -> dict[str, str]:
    from ecg_r1.tracking.runs import run_context

    return run_context(repo_root)


def _log_params(run_id: str | None, params: Mapping[str, Any]) -> None:
    if run_id is None:
        return
    from ecg_r1.tracking.runs import log_params_flat

    log_params_flat(params, run_id=run_id)


def _log_metrics(run_id: str | None, metrics: Mapping[str, float], step: int) -> None:
    if run_id is None:
        return
    from mlflow.entities import Metric

    from mlflow import MlflowClient

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, int | float)]
    if batch:
        MlflowClient().log_batch(run_id, metrics=batch, synchronous=True)


def _log_model(run_id: str, model_dir: Path) -> None:
    """Log an intermediate stage's model folder as the run's ``model/`` artifacts (the registered
    stages do this through :func:`ecg_r1.tracking.runs.register_model_version`)."""
    from ecg_r1.tracking.runs import MODEL_ARTIFACT_PATH
    from mlflow import MlflowClient

    MlflowClient().log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT_PATH)


def _profile_params(profile: Profile) -> dict[str, Any]:
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


def _base_config(
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


def _train(
    *,
    stage: str,
    profile: Profile,
    start_model: Path,
    out_dir: Path,
    make_trainer: Any,
    params: dict[str, Any],
    tracking: bool,
    progress: bool,
    resume: bool,
    repo_root: Path,
    run_name: str | None,
    register_as: str | None,
    callbacks: Sequence[Any],
    samples_fn: Any,
    samples_per_step: int,
    splits_path: Path | None = None,
) -> StageResult:
    """Run one TRL trainer with checkpoints, resume, MLflow logging and registration."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = _prepare_out_dir(out_dir, resume)
    provenance = _provenance(repo_root)
    tags = {"profile": profile.name, **provenance}
    with _tracked_run(tracking, profile, stage, out_dir, run_name, tags) as run_id:
        _log_params(run_id, {**params, **provenance, "profile": _profile_params(profile)})
        if run_id is not None and splits_path is not None:
            from ecg_r1.tracking.runs import log_split_inputs

            log_split_inputs(splits_path, provenance["data_version"])
        model, processor = load_model_and_processor(start_model, profile)
        if profile.stage_settings(stage).get("freeze_vision", False):
            freeze_vision_tower(model)
        trainer = make_trainer(model, processor)
        attached = _attach_callbacks(trainer, stage, run_id, progress, callbacks)
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
        if stage == "grpo":  # a GRPO step consumes batch / num_generations distinct prompts
            batch = batch // max(1, trainer.args.num_generations)
        model_dir = out_dir / MODEL
        info = {
            "stage": stage,
            "profile": profile.name,
            "started_from": str(start_model),
            "steps": steps,
            "mlflow_run_id": run_id,
            **provenance,
        }
        save_model_folder(trainer.model, processor, model_dir, info=info)
        history = list(trainer.state.log_history)
        metrics = _final_metrics(history)
        summary = {
            "train_seconds": seconds,
            "seconds_per_step": seconds / run_steps,
            "samples_per_second": run_steps * batch / seconds if seconds > 0 else 0.0,
            "peak_rss_mb": peak_rss_mb(),
            "train_loss_mean": float(output.training_loss),
        }
        _log_metrics(run_id, summary, steps)
        rows = []
        for callback in attached:
            rows.extend(getattr(callback, "rows", []))
        if samples_fn is not None and samples_per_step and run_id is not None:
            rows.extend(samples_fn(trainer.model, processor, steps))
        if run_id is not None and rows:
            from ecg_r1.tracking.runs import log_completions_table

            log_completions_table(rows, "samples/completions.json", run_id=run_id)
        registered = None
        if run_id is not None and register_as is None:
            _log_model(run_id, model_dir)
        if run_id is not None and register_as is not None:
            from ecg_r1.tracking.runs import register_model_version

            version = register_model_version(
                run_id,
                model_dir,
                register_as,
                tags={
                    "stage": stage,
                    "profile": profile.name,
                    "config": params.get("config_digest", ""),
                    "start_model": str(start_model),
                    **provenance,
                },
            )
            registered = f"{register_as}/{version}"
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
    return result


def note_settings(profile: Profile, stage: str) -> dict[str, float]:
    """``note_dropout`` and ``note_scramble`` of a stage (fractions of the training cases shown
    without their note, or with it scrambled; :func:`ecg_r1.training.data.sft_dataset`)."""
    settings = profile.stage_settings(stage)
    return {key: float(settings.get(key, 0.0)) for key in ("note_dropout", "note_scramble")}


def training_cases(
    profile: Profile, stage: str, cohort_dir: str | Path, splits_path: str | Path, images_dir: str | Path
) -> pl.DataFrame:
    """The labelled training cases a label-driven stage (SFT, GRPO) trains on: the train split,
    with each hospital balanced to 1:1 when the stage's ``balance_hospitals`` is set
    (:func:`ecg_r1.training.data.balance_hospitals`)."""
    cases = load_cases(cohort_dir, splits_path, images_dir, "train")
    if profile.stage_settings(stage).get("balance_hospitals", False):
        cases = balance_hospitals(cases, seed=profile.seed)
    return cases


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


def _digest(values: Mapping[str, Any]) -> str:
    import hashlib

    return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _sample_generations(cases: Any, max_new_tokens: int, n: int) -> Any:
    """A function generating greedy completions for ``n`` cases, for the samples table."""
    from PIL import Image

    chosen = cases.head(n)

    def sample(model: Any, processor: Any, step: int) -> list[dict[str, Any]]:
        from ecg_r1.modeling.inference import generate
        from ecg_r1.modeling.prompts import parse_completion

        examples = []
        for row in chosen.iter_rows(named=True):
            with Image.open(row["image_path"]) as image:
                examples.append(
                    {"image": image.convert("RGB"), "age": row["age"], "sex": row["sex"], "note": row["note"]}
                )
        texts = generate(model, processor, examples, max_new_tokens=max_new_tokens, batch_size=len(examples))
        rows = []
        for row, text in zip(chosen.iter_rows(named=True), texts, strict=True):
            parsed = parse_completion(text)
            rows.append(
                {
                    "step": step,
                    "record_id": row["record_id"],
                    "label": None if row["label"] is None else ("Yes" if row["label"] else "No"),
                    "completion": text,
                    "valid": parsed.valid,
                    "answer": None if parsed.answer is None else ("Yes" if parsed.answer else "No"),
                }
            )
        return rows

    return sample


# ------------------------------------------------------------------------------------------------
# SFT and the format warm-up


class AnswerMaskingCollator:
    """Wraps TRL's vision-language collator and takes the answer word out of the loss.

    In every row, the tokens of ``Yes`` / ``No`` that stand right before ``</answer>`` get label
    -100: the model learns the output contract (think block, answer tags, end of turn) but not
    which answer goes with which case. Used by the label-free format warm-up.

    Raises (when called):
        ValueError: when a row's completion has no answer to mask (the targets are malformed).
    """

    def __init__(self, collator: Any, tokenizer: Any) -> None:
        from ecg_r1.modeling.prompts import ANSWER_CLOSE, NO, YES

        self.collator = collator
        self.close = tokenizer.encode(ANSWER_CLOSE, add_special_tokens=False)
        self.words = [tokenizer.encode(word, add_special_tokens=False) for word in (YES, NO)]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        ids, labels = batch["input_ids"], batch["labels"]
        for row in range(ids.shape[0]):
            if not self._mask_row(ids[row].tolist(), labels[row]):
                raise ValueError(
                    "format warm-up: no Yes/No answer before </answer> in a training row; the targets must "
                    "follow the output contract (ecg_r1.modeling.prompts.format_target)"
                )
        return batch

    def _mask_row(self, ids: list[int], labels: Any) -> bool:
        close = self.close
        for end in range(len(ids) - len(close), -1, -1):
            if ids[end : end + len(close)] != close:
                continue
            for word in self.words:
                start = end - len(word)
                if start >= 0 and ids[start:end] == word:
                    labels[start:end] = -100
                    return True
        return False


def _sft_trainer_factory(
    profile: Profile, config_kwargs: dict[str, Any], dataset: Any, mask_answer: bool
) -> Any:
    def make(model: Any, processor: Any) -> Any:
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(**config_kwargs)
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=processor,
            peft_config=lora_config(profile),
        )
        if mask_answer:
            trainer.data_collator = AnswerMaskingCollator(trainer.data_collator, processor.tokenizer)
        return trainer

    return make


def _sft_like(
    *,
    stage: str,
    profile: Profile,
    start_model: Path,
    cases: Any,
    targets: list[str],
    out_dir: Path,
    overrides: dict[str, Any],
    max_steps: int | None,
    seed: int | None,
    mask_answer: bool,
    params: dict[str, Any],
    register_as: str | None,
    eval_cases: Any,
    notes: Mapping[str, float] | None = None,
    **common: Any,
) -> StageResult:
    dataset = sft_dataset(
        cases, targets, **(notes or {}), seed=int(seed if seed is not None else profile.seed)
    )
    config_kwargs = _base_config(profile, "sft", Path(out_dir), max_steps, seed, overrides)
    # Prompt-completion data: TRL puts only the completion in the loss (completion_only_loss).
    config_kwargs.setdefault("completion_only_loss", True)
    config_kwargs["max_length"] = None  # a cap can cut through image tokens
    params = {
        **params,
        "stage": stage,
        "start_model": str(start_model),
        "data": data_summary(cases),
        "trainer": config_kwargs | {"output_dir": "<out_dir>/checkpoints"},
    }
    params["config_digest"] = _digest(params["trainer"] | {"stage": stage})
    samples = None
    if eval_cases is not None and eval_cases.height:
        samples = _sample_generations(eval_cases, max_new_tokens=profile.max_completion_length, n=8)
    return _train(
        stage=stage,
        profile=profile,
        start_model=Path(start_model),
        out_dir=Path(out_dir),
        make_trainer=_sft_trainer_factory(profile, config_kwargs, dataset, mask_answer),
        params=params,
        register_as=register_as,
        samples_fn=samples,
        samples_per_step=8,
        **common,
    )


def _common(
    tracking: bool,
    progress: bool,
    resume: bool,
    repo_root: str | Path,
    run_name: str | None,
    callbacks: Sequence[Any],
    splits_path: str | Path,
) -> dict[str, Any]:
    return {
        "splits_path": Path(splits_path),
        "tracking": tracking,
        "progress": progress,
        "resume": resume,
        "repo_root": Path(repo_root),
        "run_name": run_name,
        "callbacks": callbacks,
    }


def _eval_cases(cohort_dir: Any, splits_path: Any, images_dir: Any) -> Any:
    from ecg_r1.training.data import TrainingDataError

    try:
        return load_cases(cohort_dir, splits_path, images_dir, "val")
    except TrainingDataError as error:  # samples are a nicety; a cohort without val still trains
        logger.info("no validation cases for sample completions: %s", error)
        return None


def run_format_warmup(
    profile: Profile | str | Path,
    start_model: str | Path,
    cohort_dir: str | Path,
    splits_path: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    *,
    answer: str | None = None,
    max_steps: int | None = None,
    seed: int | None = None,
    tracking: bool = True,
    progress: bool = False,
    resume: bool = True,
    repo_root: str | Path = REPO_ROOT,
    run_name: str | None = None,
    callbacks: Sequence[Any] = (),
) -> StageResult:
    """Label-free format warm-up: teach the output contract without teaching the answer.

    Targets are ``<think>RATIONALE</think><answer>X</answer>`` where the rationale comes from the
    case's known or measured findings (leads with TWI, territory; never the label) and ``X`` is a
    fair coin, either kept out of the loss (``answer="masked"``) or trained on (``"random"``: the
    model learns to answer Yes or No at chance). Either way no label is used, so any accuracy the
    following GRPO reaches is learned by reinforcement. Unlabelled TWI cases of the training split
    are used too.

    Args:
        profile: a :class:`~ecg_r1.modeling.profiles.Profile` or its name / YAML path; ``stages.format_warmup``
            gives ``steps``, ``learning_rate``, ``batch_size`` and ``answer``.
        start_model: the model folder to start from (base or vision-pre-trained model).
        cohort_dir, splits_path, images_dir: the data (see :func:`ecg_r1.training.data.load_cases`).
        out_dir: the stage's folder (checkpoints, model, result).
        answer: ``"masked"`` or ``"random"``; default from the profile.
        max_steps: override the stage's steps.
        seed: override the profile's seed.
        tracking: log to MLflow (the current tracking URI).
        progress: show a progress bar.
        resume: resume from the last checkpoint in ``out_dir`` when the stage did not finish.
        repo_root: where the git commit and DVC data version are read.
        run_name: MLflow run name (default ``warmup-<time>``).
        callbacks: extra ``transformers.TrainerCallback`` objects.

    Returns:
        A :class:`StageResult`; the model is not registered (it is a starting point, not a
        classifier).
    """
    profile = _as_profile(profile)
    stage_cfg = profile.stage_settings("warmup")
    answer = answer or str(stage_cfg.get("answer", "masked"))
    if answer not in WARMUP_ANSWER_MODES:
        raise ValueError(f"format warm-up answer mode must be one of {WARMUP_ANSWER_MODES}, got {answer!r}")
    cases = load_cases(cohort_dir, splits_path, images_dir, "train", labelled_only=False)
    run_seed = int(seed if seed is not None else profile.seed)
    targets = sft_targets(cases, rationale=True, answers=random_answers(cases.height, run_seed))
    overrides = {
        "learning_rate": float(stage_cfg.get("learning_rate", profile.sft.get("learning_rate", 1e-3))),
        "per_device_train_batch_size": int(
            stage_cfg.get("batch_size", profile.sft.get("per_device_train_batch_size", 8))
        ),
        "max_steps": int(stage_cfg.get("steps", 100)),
    }
    return _sft_like(
        stage="warmup",
        profile=profile,
        start_model=Path(start_model),
        cases=cases,
        targets=targets,
        out_dir=Path(out_dir),
        overrides=overrides,
        max_steps=max_steps,
        seed=seed,
        mask_answer=answer == "masked",
        params={"warmup_answer": answer, "seed": run_seed},
        register_as=None,
        eval_cases=_eval_cases(cohort_dir, splits_path, images_dir),
        **_common(tracking, progress, resume, repo_root, run_name, callbacks, splits_path),
    )


def run_sft(
    profile: Profile | str | Path,
    start_model: str | Path,
    cohort_dir: str | Path,
    splits_path: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    *,
    rationale: bool | None = None,
    max_steps: int | None = None,
    seed: int | None = None,
    register: bool = True,
    tracking: bool = True,
    progress: bool = False,
    resume: bool = True,
    repo_root: str | Path = REPO_ROOT,
    run_name: str | None = None,
    callbacks: Sequence[Any] = (),
) -> StageResult:
    """Supervised fine-tuning (the paper's baseline) with TRL's ``SFTTrainer``.

    Targets are the case's answer, with a rationale from its known or measured findings in the
    think block when ``rationale`` (default: the profile's ``model.sft_rationale``), else an empty
    think block. Hyperparameters come from the profile's ``sft`` section.

    Args:
        profile, start_model, cohort_dir, splits_path, images_dir, out_dir: as in
            :func:`run_format_warmup`.
        rationale: include the findings rationale in the targets.
        max_steps: override the number of steps (default: the profile's epochs).
        seed: override the profile's seed.
        register: register the model as a version of ``ecg-r1-sft`` (needs tracking).
        tracking, progress, resume, repo_root, run_name, callbacks: as in :func:`run_format_warmup`.

    Returns:
        A :class:`StageResult` with ``registered`` set when registered.
    """
    from ecg_r1.tracking.runs import MODEL_NAMES

    profile = _as_profile(profile)
    rationale = profile.sft_rationale if rationale is None else bool(rationale)
    with_findings = rationale and findings_rationale(profile)
    notes = note_settings(profile, "sft")
    cases = training_cases(profile, "sft", cohort_dir, splits_path, images_dir)
    findings = case_findings(cases, cohort_dir) if with_findings else None
    targets = sft_targets(cases, rationale=rationale, findings=findings)
    return _sft_like(
        stage="sft",
        profile=profile,
        start_model=Path(start_model),
        cases=cases,
        targets=targets,
        out_dir=Path(out_dir),
        overrides={},
        max_steps=max_steps,
        seed=seed,
        mask_answer=False,
        params={
            "sft_rationale": rationale,
            "rationale_findings": with_findings,
            **notes,
            "seed": seed if seed is not None else profile.seed,
        },
        register_as=MODEL_NAMES["sft"] if register and tracking else None,
        eval_cases=_eval_cases(cohort_dir, splits_path, images_dir),
        notes=notes,
        **_common(tracking, progress, resume, repo_root, run_name, callbacks, splits_path),
    )


# ------------------------------------------------------------------------------------------------
# GRPO


def run_grpo(
    profile: Profile | str | Path,
    start_model: str | Path,
    cohort_dir: str | Path,
    splits_path: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    *,
    max_steps: int | None = None,
    seed: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    rewards: Mapping[str, float] | None = None,
    register: bool = True,
    tracking: bool = True,
    progress: bool = False,
    resume: bool = True,
    repo_root: str | Path = REPO_ROOT,
    run_name: str | None = None,
    callbacks: Sequence[Any] = (),
) -> StageResult:
    """GRPO with TRL's ``GRPOTrainer``: format, accuracy (and optionally grounding) rewards.

    The profile's ``grpo`` section gives num_generations, beta, temperature,
    max_completion_length, learning rate and batch; its ``rewards`` section the reward functions
    (:data:`ecg_r1.training.rewards.REWARD_FUNCS`) and weights. Start from the format warm-up model (the
    paper's setting for a model that cannot yet write the format) or from the SFT model (the
    common R1 recipe).

    Args:
        profile, start_model, cohort_dir, splits_path, images_dir, out_dir: as in :func:`run_sft`.
        max_steps: override the number of steps (default: the profile's epochs).
        seed: override the profile's seed.
        overrides: GRPOConfig fields to override (for tuning: ``learning_rate``, ``beta``...).
        rewards: reward name -> weight, replacing the profile's ``rewards`` section.
        register: register the model as a version of ``ecg-r1-grpo``.
        tracking, progress, resume, repo_root, run_name, callbacks: as in :func:`run_sft`.

    Returns:
        A :class:`StageResult`; ``metrics`` holds the last logged reward means, KL, completion
        length and format-valid rate.
    """
    from ecg_r1.tracking.runs import MODEL_NAMES
    from ecg_r1.training.rewards import get_reward_funcs

    profile = _as_profile(profile)
    cases = training_cases(profile, "grpo", cohort_dir, splits_path, images_dir)
    config_seed = int(seed if seed is not None else profile.seed)
    dataset = grpo_dataset(cases, **note_settings(profile, "grpo"), seed=config_seed)
    reward_map = dict(rewards) if rewards is not None else dict(profile.rewards)
    reward_funcs = get_reward_funcs(list(reward_map))
    config_kwargs = _base_config(profile, "grpo", Path(out_dir), max_steps, seed, dict(overrides or {}))
    config_kwargs["reward_weights"] = [float(w) for w in reward_map.values()]
    config_kwargs["log_completions"] = False  # our CompletionSamplesCallback keeps samples
    params = {
        "stage": "grpo",
        "start_model": str(start_model),
        "rewards": reward_map,
        "seed": config_kwargs["seed"],
        "data": data_summary(cases),
        "trainer": config_kwargs | {"output_dir": "<out_dir>/checkpoints"},
    }
    params["config_digest"] = _digest(params["trainer"] | {"rewards": reward_map})

    def make(model: Any, processor: Any) -> Any:
        from trl import GRPOConfig, GRPOTrainer

        # TRL keeps a sampled <|image_pad|> out of completions; a sampled <|vision_start|> or
        # <|video_pad|> breaks Qwen2-VL's position ids just the same (the forward pass then counts
        # one image or video more than it was given), so no vision token may be sampled.
        generation = dict(config_kwargs.get("generation_kwargs") or {})
        generation["suppress_tokens"] = vision_token_ids(model.config)
        # TRL left-pads the prompt ids it generates from, but takes Qwen2-VL's per-token image
        # markers (mm_token_type_ids) from a processor call padded on the tokenizer's side: with
        # right padding they mark the wrong tokens as image in every padded prompt, silently
        # (wrong positions) or, once a prompt is padded past its image, as a crash in
        # get_rope_index. Prompts of unequal length (note dropout) make it common.
        processor.tokenizer.padding_side = "left"
        return GRPOTrainer(
            model=model,
            reward_funcs=reward_funcs,
            args=GRPOConfig(**(config_kwargs | {"generation_kwargs": generation})),
            train_dataset=dataset,
            processing_class=processor,
            peft_config=lora_config(profile),
        )

    return _train(
        stage="grpo",
        profile=profile,
        start_model=Path(start_model),
        out_dir=Path(out_dir),
        make_trainer=make,
        params=params,
        register_as=MODEL_NAMES["grpo"] if register and tracking else None,
        samples_fn=None,
        samples_per_step=0,
        **_common(tracking, progress, resume, repo_root, run_name, callbacks, splits_path),
    )


# ------------------------------------------------------------------------------------------------
# Vision pre-training as a tracked stage


def run_vision_stage(
    profile: Profile | str | Path,
    start_model: str | Path,
    cohort_dir: str | Path,
    splits_path: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    *,
    max_steps: int | None = None,
    seed: int | None = None,
    tracking: bool = True,
    repo_root: str | Path = REPO_ROOT,
    run_name: str | None = None,
) -> StageResult:
    """Signal-grounded vision pre-training (:func:`ecg_r1.training.vision.run_vision_pretrain`)
    on the training split's TWI cases (labelled or not), tracked in MLflow like the other stages.

    The stage is short (a few minutes at most), so it is re-run from the start when interrupted
    rather than checkpointed.

    Returns:
        A :class:`StageResult` whose ``metrics`` include the held-out TWI-lead accuracy.
    """
    from ecg_r1.training.vision import run_vision_pretrain

    profile = _as_profile(profile)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _prepare_out_dir(out_dir, resume=False)
    cases = load_cases(cohort_dir, splits_path, images_dir, "train", labelled_only=False)
    provenance = _provenance(Path(repo_root))
    stage_cfg = profile.stage_settings("vision")
    with _tracked_run(
        tracking, profile, "vision", out_dir, run_name, {"profile": profile.name, **provenance}
    ) as run_id:
        steps = int(max_steps if max_steps is not None else stage_cfg.get("steps", 300))
        _log_params(
            run_id,
            {
                "stage": "vision",
                "start_model": str(start_model),
                "seed": seed if seed is not None else profile.seed,
                "data": data_summary(cases),
                "vision_pretrain": stage_cfg | {"steps": steps},
                "profile": _profile_params(profile),
                **provenance,
            },
        )
        started = time.perf_counter()
        outcome = run_vision_pretrain(
            start_model,
            profile,
            cases["image_path"].to_list(),
            cases["row"].to_list(),
            cohort_dir,
            out_dir / MODEL,
            steps=steps,
            seed=seed,
            on_step=lambda step, metrics: _log_metrics(run_id, metrics, step),
        )
        seconds = time.perf_counter() - started
        batch = int(stage_cfg.get("batch_size", 32))
        summary = {
            "train_seconds": outcome.seconds,
            "seconds_per_step": outcome.seconds / max(1, outcome.steps),
            "samples_per_second": outcome.steps * batch / outcome.seconds if outcome.seconds else 0.0,
            "peak_rss_mb": peak_rss_mb(),
            **outcome.eval,
        }
        _log_metrics(run_id, summary, outcome.steps)
        if run_id is not None:
            _log_model(run_id, outcome.model_dir)
    result = StageResult(
        stage="vision",
        model_dir=outcome.model_dir,
        run_id=run_id,
        registered=None,
        steps=outcome.steps,
        resumed_from=0,
        seconds=seconds,
        seconds_per_step=summary["seconds_per_step"],
        samples_per_second=summary["samples_per_second"],
        peak_rss_mb=summary["peak_rss_mb"],
        metrics={**(outcome.history[-1] if outcome.history else {}), **summary},
        history=outcome.history,
    )
    (out_dir / RESULT_FILE).write_text(result.to_json())
    return result


def build_start_model(
    profile: Profile | str | Path,
    cohort_dir: str | Path,
    splits_path: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
) -> Path:
    """The profile's base model: for ``tiny``, built with a tokenizer trained on the training
    split's prompts and answer texts (:func:`ecg_r1.modeling.models.corpus_from_cases`); for a
    pretrained-language source (``smollm2-135m``), converted from the installed weights; for hub
    profiles, the pretrained checkpoint's folder. An existing built model in ``out_dir`` is reused.

    Returns:
        The model folder.
    """
    from ecg_r1.modeling.models import build_base_model, corpus_from_cases

    profile = _as_profile(profile)
    out_dir = Path(out_dir)
    if profile.builds_here and (out_dir / "config.json").is_file():
        return out_dir
    cases = load_cases(cohort_dir, splits_path, images_dir, "train", labelled_only=False)
    if findings_rationale(profile):  # the tokenizer learns the words and numbers of the findings too
        cases = pl.concat([cases, case_findings(cases, cohort_dir).drop("record_id")], how="horizontal")
    return build_base_model(profile, corpus_from_cases(cases.to_dicts()), out_dir)


def findings_rationale(profile: Profile) -> bool:
    """Whether the profile's SFT targets state the measured findings (``stages.sft.rationale_findings``,
    only with ``model.sft_rationale`` on)."""
    return profile.sft_rationale and bool(profile.stage_settings("sft").get("rationale_findings", False))


def stage_function(stage: str) -> Any:
    """The run function of a stage name (``vision``, ``warmup``, ``sft``, ``grpo``)."""
    functions = {"vision": run_vision_stage, "warmup": run_format_warmup, "sft": run_sft, "grpo": run_grpo}
    if stage not in functions:
        raise ValueError(f"unknown training stage {stage!r}; choose one of {STAGES}")
    return functions[stage]


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from the tokenizer
