"""SFT (TRL ``SFTTrainer``) and the label-free format warm-up: the same trainer on prompt-completion
data, the warm-up with its answer word masked or drawn at random."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ecg_r1.modeling.notes import note_vocabulary
from ecg_r1.modeling.profiles import Profile, lora_config
from ecg_r1.modeling.stage_settings import WARMUP_ANSWERS
from ecg_r1.training.data import (
    PromptOptions,
    case_examples,
    case_findings,
    data_summary,
    findings_rationale,
    load_cases,
    prompt_options,
    random_answers,
    sft_dataset,
    sft_targets,
    validation_cases,
)
from ecg_r1.training.run_log import config_digest
from ecg_r1.training.runner import RunOptions, TrainerJob, as_profile, run_trainer, trainer_config
from ecg_r1.training.stage_folder import StageResult

# ------------------------------------------------------------------------------------------------
# SFT and the format warm-up


def sample_generations(cases: Any, max_new_tokens: int, n: int) -> Any:
    """A function generating greedy completions for ``n`` cases, for the samples table."""
    chosen = cases.head(n)

    def sample(model: Any, processor: Any, step: int) -> list[dict[str, Any]]:
        from ecg_r1.modeling.contract import parse_completion
        from ecg_r1.modeling.inference import generate

        examples = case_examples(chosen)
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


class AnswerMaskingCollator:
    """Wraps TRL's vision-language collator and takes the answer word out of the loss.

    In every row, the tokens of ``Yes`` / ``No`` that stand right before ``</answer>`` get label
    -100: the model learns the output contract (think block, answer tags, end of turn) but not
    which answer goes with which case. Used by the label-free format warm-up.

    Raises (when called):
        ValueError: when a row's completion has no answer to mask (the targets are malformed).
    """

    def __init__(self, collator: Any, tokenizer: Any) -> None:
        from ecg_r1.modeling.contract import ANSWER_CLOSE, NO, YES

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
                    "follow the output contract (ecg_r1.modeling.contract.format_target)"
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


def _sft_args(config_kwargs: dict[str, Any]) -> Callable[[], Any]:
    def make_args() -> Any:
        from trl import SFTConfig

        return SFTConfig(**config_kwargs)

    return make_args


def _sft_trainer_factory(profile: Profile, dataset: Any, mask_answer: bool) -> Any:
    def make(model: Any, processor: Any, config: Any) -> Any:
        from trl import SFTTrainer

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


@dataclass(frozen=True)
class _SftRun:
    """What SFT and the format warm-up train on, and how they differ.

    Attributes:
        stage: ``sft`` or ``warmup``.
        cases: the training cases (``load_cases``).
        targets: one completion per case.
        prompts: how the prompts are written.
        overrides: trainer fields over the profile's ``sft`` section.
        mask_answer: keep the answer word out of the loss (the masked warm-up).
        params: the stage's own parameters logged with the run.
        register_as: the registered model name, or None.
        eval_cases: validation cases whose greedy completions are logged as samples, or None.
    """

    stage: str
    cases: Any
    targets: list[str]
    prompts: PromptOptions
    overrides: dict[str, Any]
    mask_answer: bool
    params: dict[str, Any]
    register_as: str | None
    eval_cases: Any


def _sft_job(
    run: _SftRun,
    profile: Profile,
    start_model: Path,
    out_dir: Path,
    max_steps: int | None,
    seed: int | None,
    splits_path: Path,
) -> TrainerJob:
    """The trainer job of an SFT-like stage."""
    dataset = sft_dataset(
        run.cases, run.targets, run.prompts, seed=int(seed if seed is not None else profile.seed)
    )
    config_kwargs = trainer_config(profile, "sft", out_dir, max_steps, seed, run.overrides)
    # Prompt-completion data: TRL puts only the completion in the loss (completion_only_loss).
    config_kwargs.setdefault("completion_only_loss", True)
    params = {
        **run.params,
        "stage": run.stage,
        "start_model": str(start_model),
        "data": data_summary(run.cases),
        "trainer": config_kwargs | {"output_dir": "<out_dir>/checkpoints"},
    }
    params["config_digest"] = config_digest(params["trainer"] | {"stage": run.stage})
    samples = None
    if run.eval_cases is not None and run.eval_cases.height:
        samples = sample_generations(run.eval_cases, max_new_tokens=profile.max_completion_length, n=8)
    return TrainerJob(
        stage=run.stage,
        profile=profile,
        start_model=start_model,
        out_dir=out_dir,
        make_args=_sft_args(config_kwargs),
        make_trainer=_sft_trainer_factory(profile, dataset, run.mask_answer),
        params=params,
        register_as=run.register_as,
        samples=samples,
        note_vocabulary=note_vocabulary(run.cases["note"].to_list()),
        splits_path=splits_path,
    )


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
    options: RunOptions | None = None,
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
        options: how the stage runs (tracking, progress, resume, provenance, run name, callbacks);
            default :class:`RunOptions`'s.

    The six positional parameters are the ones every stage takes (its callers, the CLI and the
    Dagster assets, call each stage alike): hence ten parameters.

    Returns:
        A :class:`StageResult`; the model is not registered (it is a starting point, not a
        classifier).
    """
    profile = as_profile(profile)
    stage_cfg = profile.stage_settings("warmup")
    answer = answer or str(stage_cfg["answer"])
    if answer not in WARMUP_ANSWERS:
        raise ValueError(f"format warm-up answer mode must be one of {WARMUP_ANSWERS}, got {answer!r}")
    cases = load_cases(cohort_dir, splits_path, images_dir, "train", labelled_only=False)
    run_seed = int(seed if seed is not None else profile.seed)
    targets = sft_targets(cases, rationale=True, answers=random_answers(cases.height, run_seed))
    # Learning rate and batch size unset here fall to the sft section's, then to SFTConfig's.
    overrides = {
        key: value
        for key, value in (
            ("learning_rate", stage_cfg["learning_rate"]),
            ("per_device_train_batch_size", stage_cfg["batch_size"]),
            ("max_steps", int(stage_cfg["steps"])),
        )
        if value is not None
    }
    run = _SftRun(
        stage="warmup",
        cases=cases,
        targets=targets,
        prompts=PromptOptions(image_position=profile.image_position),
        overrides=overrides,
        mask_answer=answer == "masked",
        params={"warmup_answer": answer, "seed": run_seed},
        register_as=None,
        eval_cases=validation_cases(cohort_dir, splits_path, images_dir),
    )
    job = _sft_job(run, profile, Path(start_model), Path(out_dir), max_steps, seed, Path(splits_path))
    return run_trainer(job, options or RunOptions())


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
    options: RunOptions | None = None,
) -> StageResult:
    """Supervised fine-tuning (the paper's baseline) with TRL's ``SFTTrainer``.

    Targets are the case's answer, with a rationale from its known or measured findings in the
    think block when ``rationale`` (default: the profile's ``model.sft_rationale``), else an empty
    think block. Hyperparameters come from the profile's ``sft`` section.

    Args:
        profile, start_model, cohort_dir, splits_path, images_dir, out_dir: as in
            :func:`run_format_warmup` (the six every stage takes: hence ten parameters).
        rationale: include the findings rationale in the targets.
        max_steps: override the number of steps (default: the profile's epochs).
        seed: override the profile's seed.
        options: how the stage runs (tracking, registration as a version of ``ecg-r1-sft``,
            progress, resume); default :class:`RunOptions`'s.

    Returns:
        A :class:`StageResult` with ``registered`` set when registered.
    """
    from ecg_r1.tracking.model_registry import MODEL_NAMES

    profile = as_profile(profile)
    rationale = profile.sft_rationale if rationale is None else bool(rationale)
    with_findings = rationale and findings_rationale(profile)
    prompts = prompt_options(profile, "sft")
    cases = load_cases(cohort_dir, splits_path, images_dir, "train")
    findings = case_findings(cases, cohort_dir) if with_findings else None
    run = _SftRun(
        stage="sft",
        cases=cases,
        targets=sft_targets(cases, rationale=rationale, findings=findings),
        prompts=prompts,
        overrides={},
        mask_answer=False,
        params={
            "sft_rationale": rationale,
            "rationale_findings": with_findings,
            **asdict(prompts),
            "seed": seed if seed is not None else profile.seed,
        },
        register_as=MODEL_NAMES["sft"],
        eval_cases=validation_cases(cohort_dir, splits_path, images_dir),
    )
    job = _sft_job(run, profile, Path(start_model), Path(out_dir), max_steps, seed, Path(splits_path))
    return run_trainer(job, options or RunOptions())
