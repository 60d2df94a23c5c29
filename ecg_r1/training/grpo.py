"""GRPO (TRL ``GRPOTrainer``) with the format and accuracy rewards of :mod:`ecg_r1.training.rewards`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ecg_r1.modeling.models import vision_token_ids
from ecg_r1.modeling.notes import note_vocabulary
from ecg_r1.modeling.profiles import Profile, lora_config
from ecg_r1.training.data import data_summary, grpo_dataset, load_cases, prompt_options
from ecg_r1.training.run_log import config_digest
from ecg_r1.training.runner import RunOptions, TrainerJob, as_profile, run_trainer, trainer_config
from ecg_r1.training.stage_folder import StageResult

# ------------------------------------------------------------------------------------------------
# GRPO

# A logit bias that no logit of a trained model overcomes (they stay within a few tens).
VLLM_SUPPRESS_BIAS = -100.0


def suppressed_tokens(use_vllm: bool, token_ids: Sequence[int]) -> dict[str, Any]:
    """The generation kwargs that keep ``token_ids`` out of GRPO's completions.

    With vLLM, TRL hands ``generation_kwargs`` to vLLM's ``SamplingParams``, which has no
    ``suppress_tokens`` (a transformers ``generate`` argument) and raises on it; its own mechanism
    is ``logit_bias`` (token id -> bias added to the logit).
    """
    ids = [int(token) for token in token_ids]
    if use_vllm:
        return {"logit_bias": dict.fromkeys(ids, VLLM_SUPPRESS_BIAS)}
    return {"suppress_tokens": ids}


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
    options: RunOptions | None = None,
) -> StageResult:
    """GRPO with TRL's ``GRPOTrainer``: format, accuracy (and optionally grounding) rewards.

    The profile's ``grpo`` section gives num_generations, beta, temperature,
    max_completion_length, learning rate and batch; its ``rewards`` section the reward functions
    (:data:`ecg_r1.training.rewards.REWARD_FUNCS`) and weights. Start from the format warm-up model (the
    paper's setting for a model that cannot yet write the format) or from the SFT model (the
    common R1 recipe).

    Args:
        profile, start_model, cohort_dir, splits_path, images_dir, out_dir: as in :func:`run_sft`
            (the six every stage takes, so its callers call each stage alike; hence nine parameters).
        max_steps: override the number of steps (default: the profile's epochs).
        seed: override the profile's seed.
        options: how the stage runs (tracking, registration as a version of ``ecg-r1-grpo``,
            progress, resume); default :class:`RunOptions`'s.

    Returns:
        A :class:`StageResult`; ``metrics`` holds the last logged reward means, KL, completion
        length and format-valid rate.
    """
    from ecg_r1.tracking.model_registry import MODEL_NAMES
    from ecg_r1.training.rewards import get_reward_funcs

    profile = as_profile(profile)
    cases = load_cases(cohort_dir, splits_path, images_dir, "train")
    config_seed = int(seed if seed is not None else profile.seed)
    dataset = grpo_dataset(cases, prompt_options(profile, "grpo"), seed=config_seed)
    reward_map = dict(profile.rewards)
    reward_funcs = get_reward_funcs(list(reward_map))
    config_kwargs = trainer_config(profile, "grpo", Path(out_dir), max_steps, seed, {})
    config_kwargs["log_completions"] = False  # our CompletionSamplesCallback keeps samples
    params = {
        "stage": "grpo",
        "start_model": str(start_model),
        "rewards": reward_map,
        "seed": config_kwargs["seed"],
        "data": data_summary(cases),
        "trainer": config_kwargs | {"output_dir": "<out_dir>/checkpoints"},
    }
    params["config_digest"] = config_digest(params["trainer"] | {"rewards": reward_map})
    job = TrainerJob(
        stage="grpo",
        profile=profile,
        start_model=Path(start_model),
        out_dir=Path(out_dir),
        make_args=_grpo_args(profile, Path(start_model), config_kwargs),
        make_trainer=_grpo_trainer_factory(profile, dataset, reward_funcs),
        params=params,
        register_as=MODEL_NAMES["grpo"],
        note_vocabulary=note_vocabulary(cases["note"].to_list()),
        splits_path=Path(splits_path),
    )
    return run_trainer(job, options or RunOptions())


def _grpo_args(profile: Profile, start_model: Path, config_kwargs: dict[str, Any]) -> Callable[[], Any]:
    def make_args() -> Any:
        from transformers import AutoConfig
        from trl import GRPOConfig

        # TRL keeps a sampled <|image_pad|> out of completions; a sampled <|vision_start|> or
        # <|video_pad|> breaks Qwen2-VL's position ids just the same (the forward pass then counts
        # one image or video more than it was given), so no vision token may be sampled. Read
        # from the config: the arguments come before the model (runner.run_trainer).
        generation = dict(config_kwargs.get("generation_kwargs") or {})
        generation |= suppressed_tokens(
            profile.use_vllm, vision_token_ids(AutoConfig.from_pretrained(str(start_model)))
        )
        return GRPOConfig(**(config_kwargs | {"generation_kwargs": generation}))

    return make_args


def _grpo_trainer_factory(
    profile: Profile, dataset: Any, reward_funcs: list[Any]
) -> Callable[[Any, Any, Any], Any]:
    def make(model: Any, processor: Any, args: Any) -> Any:
        from trl import GRPOTrainer

        # TRL left-pads the prompt ids it generates from, but takes Qwen2-VL's per-token image
        # markers (mm_token_type_ids) from a processor call padded on the tokenizer's side: with
        # right padding they mark the wrong tokens as image in every padded prompt, silently
        # (wrong positions) or, once a prompt is padded past its image, as a crash in
        # get_rope_index. Prompts of unequal length (note dropout) make it common.
        processor.tokenizer.padding_side = "left"
        return GRPOTrainer(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=dataset,
            processing_class=processor,
            peft_config=lora_config(profile),
        )

    return make
