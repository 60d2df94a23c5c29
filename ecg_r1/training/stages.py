"""The training stages: vision pre-training, format warm-up, SFT and GRPO, and the base model.

Every stage is one function with the same shape::

    run_<stage>(profile, start_model, cohort_dir, splits_path, images_dir, out_dir, ...) -> StageResult

It reads the training split, trains from ``start_model`` (a model folder), saves the result in
``out_dir/model`` and records the run in MLflow (the profile's experiment): parameters (profile,
hyperparameters, data version, git commit, seed, start model), per-step metrics, sample
completions as a table, and, for SFT and GRPO, a registered version of ``ecg-r1-sft`` /
``ecg-r1-grpo`` tagged with the data version and configuration. The folder layout and resume
rules are :mod:`ecg_r1.training.stage_folder`'s, the trainer run :mod:`ecg_r1.training.runner`'s;
SFT and the warm-up live in :mod:`ecg_r1.training.sft`, GRPO in :mod:`ecg_r1.training.grpo`; this
module adds the vision pre-training stage, the base model and the registry of stages. The trainer
stages take how they run (tracking, registration, progress, resume, run name) as one
:class:`ecg_r1.training.runner.RunOptions`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from ecg_r1.constants import REPO_ROOT
from ecg_r1.modeling.profiles import Profile, load_random_architecture
from ecg_r1.training.data import (
    case_findings,
    data_summary,
    findings_rationale,
    load_cases,
)
from ecg_r1.training.grpo import run_grpo
from ecg_r1.training.run_log import (
    log_model_folder,
    log_run_metrics,
    log_run_params,
    profile_params,
    run_provenance,
    tracked_run,
)
from ecg_r1.training.runner import as_profile
from ecg_r1.training.sft import run_format_warmup, run_sft
from ecg_r1.training.stage_folder import MODEL, StageResult, prepare_out_dir, speed_summary, write_result

if TYPE_CHECKING:
    from ecg_r1.training.vision import VisionPretrainResult

STAGES = ("vision", "warmup", "sft", "grpo")

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
    rather than checkpointed. Its eleven parameters are the ones every stage takes
    (:func:`stage_function`'s callers, the CLI and the Dagster assets, pass the same keywords to
    each stage).

    Returns:
        A :class:`StageResult` whose ``metrics`` include the held-out TWI-lead accuracy.
    """
    from ecg_r1.training.vision import run_vision_pretrain

    profile = as_profile(profile)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prepare_out_dir(out_dir, resume=False)
    cases = load_cases(cohort_dir, splits_path, images_dir, "train", labelled_only=False)
    provenance = run_provenance(Path(repo_root))
    settings = profile.stage_settings("vision")
    steps = int(max_steps if max_steps is not None else settings["steps"])
    tags = {"profile": profile.name, **provenance}
    with tracked_run(tracking, profile, "vision", out_dir, run_name, tags) as run_id:
        params = {
            "stage": "vision",
            "start_model": str(start_model),
            "seed": seed if seed is not None else profile.seed,
            "data": data_summary(cases),
            "vision_pretrain": settings | {"steps": steps},
            "profile": profile_params(profile),
            **provenance,
        }
        log_run_params(run_id, params)
        started = time.perf_counter()
        outcome = run_vision_pretrain(
            start_model,
            profile,
            cases,
            cohort_dir,
            out_dir / MODEL,
            steps=steps,
            seed=seed,
            on_step=lambda step, metrics: log_run_metrics(run_id, metrics, step),
        )
        seconds = time.perf_counter() - started
        summary = {
            **speed_summary(outcome.seconds, outcome.steps, int(settings["batch_size"])),
            **outcome.eval,
        }
        log_run_metrics(run_id, summary, outcome.steps)
        if run_id is not None:
            log_model_folder(run_id, outcome.model_dir)
    return write_result(out_dir, _vision_result(outcome, run_id, seconds, summary))


def _vision_result(
    outcome: VisionPretrainResult, run_id: str | None, seconds: float, summary: dict[str, float]
) -> StageResult:
    """The stage's :class:`StageResult`: a fresh run (no resume), not registered, its metrics
    the last logged step's and the summary."""
    return StageResult(
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


def build_start_model(
    profile: Profile | str | Path,
    cohort_dir: str | Path,
    splits_path: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    source: str | Path | None = None,
    random_sizes: str | Path | None = None,
) -> Path:
    """The profile's base model: for ``tiny``, built with a tokenizer trained on the training
    split's prompts and answer texts (:func:`ecg_r1.modeling.build.corpus_from_cases`); for a
    pretrained-language source (``smollm2-135m``), converted from the installed weights; for hub
    profiles, the pretrained checkpoint's folder. An existing built model in ``out_dir`` is reused.

    Args:
        source: a checkpoint (local folder or hub id) instead of the profile's ``model.source``.
        random_sizes: a shipped sizes name (``ecg_r1/configs/random_models``) or YAML (``text``,
            ``vision``, ``tokenizer``, as a tiny profile's ``model.tiny``): a random-initialised Qwen2-VL of those sizes is built into ``source``
            when that folder holds no model yet, the CPU stand-in of a pretrained checkpoint.

    Returns:
        The model folder.
    """
    from ecg_r1.modeling.build import build_base_model, build_random_model, corpus_from_cases, resolve_source

    profile = as_profile(profile)
    out_dir = Path(out_dir)
    if source is None and profile.builds_here and (out_dir / "config.json").is_file():
        return out_dir
    needs_corpus = (source is None and profile.builds_here) or random_sizes is not None
    if needs_corpus:
        cases = load_cases(cohort_dir, splits_path, images_dir, "train", labelled_only=False)
        if findings_rationale(profile):  # the tokenizer learns the words and numbers of the findings too
            cases = pl.concat([cases, case_findings(cases, cohort_dir).drop("record_id")], how="horizontal")
        corpus = corpus_from_cases(cases.to_dicts())
    if source is None:
        return build_base_model(profile, corpus if needs_corpus else [], out_dir)
    folder = Path(source).expanduser()
    if random_sizes is not None and not (folder / "config.json").is_file():
        sizes = load_random_architecture(random_sizes)
        build_random_model(profile, sizes, corpus, folder, source=f"random:{Path(random_sizes).stem}")
    return resolve_source(source)


def stage_function(stage: str) -> Any:
    """The run function of a stage name (``vision``, ``warmup``, ``sft``, ``grpo``)."""
    functions = {"vision": run_vision_stage, "warmup": run_format_warmup, "sft": run_sft, "grpo": run_grpo}
    if stage not in functions:
        raise ValueError(f"unknown training stage {stage!r}; choose one of {STAGES}")
    return functions[stage]
