"""SFT (TRL ``SFTTrainer``) and the label-free format warm-up: the same trainer on prompt-completion
data, the warm-up with its answer word masked or drawn at random."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ecg_r1.modeling.notes import note_vocabulary
from ecg_r1.modeling.profiles import Profile, lora_config
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
from ecg_r1.training.runner import (
    REPO_ROOT,
    RunOptions,
    StageResult,
    TrainerJob,
    as_profile,
    config_digest,
    run_trainer,
    trainer_config,
)

# How the warm-up writes the answer word: kept out of the loss, or a fair coin trained on.
WARMUP_ANSWER_MODES = ("masked", "random")

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
    options: RunOptions,
    prompts: PromptOptions,
) -> StageResult:
    dataset = sft_dataset(cases, targets, prompts, seed=int(seed if seed is not None else profile.seed))
    config_kwargs = trainer_config(profile, "sft", Path(out_dir), max_steps, seed, overrides)
    # Prompt-completion data: TRL puts only the completion in the loss (completion_only_loss).
    config_kwargs.setdefault("completion_only_loss", True)
    params = {
        **params,
        "stage": stage,
        "start_model": str(start_model),
        "data": data_summary(cases),
        "trainer": config_kwargs | {"output_dir": "<out_dir>/checkpoints"},
    }
    params["config_digest"] = config_digest(params["trainer"] | {"stage": stage})
    samples = None
    if eval_cases is not None and eval_cases.height:
        samples = sample_generations(eval_cases, max_new_tokens=profile.max_completion_length, n=8)
    job = TrainerJob(
        stage=stage,
        profile=profile,
        start_model=Path(start_model),
        out_dir=Path(out_dir),
        make_args=_sft_args(config_kwargs),
        make_trainer=_sft_trainer_factory(profile, dataset, mask_answer),
        params=params,
        register_as=register_as,
        samples=samples,
        note_vocabulary=note_vocabulary(cases["note"].to_list()),
    )
    return run_trainer(job, options)


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
    profile = as_profile(profile)
    stage_cfg = profile.stage_settings("warmup")
    answer = answer or str(stage_cfg["answer"])
    if answer not in WARMUP_ANSWER_MODES:
        raise ValueError(f"format warm-up answer mode must be one of {WARMUP_ANSWER_MODES}, got {answer!r}")
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
        eval_cases=validation_cases(cohort_dir, splits_path, images_dir),
        prompts=PromptOptions(image_position=profile.image_position),
        options=RunOptions(
            tracking, progress, resume, Path(repo_root), run_name, callbacks, Path(splits_path)
        ),
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
    from ecg_r1.tracking.model_registry import MODEL_NAMES

    profile = as_profile(profile)
    rationale = profile.sft_rationale if rationale is None else bool(rationale)
    with_findings = rationale and findings_rationale(profile)
    prompts = prompt_options(profile, "sft")
    cases = load_cases(cohort_dir, splits_path, images_dir, "train")
    findings = case_findings(cases, cohort_dir) if with_findings else None
    targets = sft_targets(cases, rationale=rationale, findings=findings)
    eval_cases = validation_cases(cohort_dir, splits_path, images_dir)
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
            **asdict(prompts),
            "seed": seed if seed is not None else profile.seed,
        },
        register_as=MODEL_NAMES["sft"] if register and tracking else None,
        eval_cases=eval_cases,
        prompts=prompts,
        options=RunOptions(
            tracking, progress, resume, Path(repo_root), run_name, callbacks, Path(splits_path)
        ),
    )
