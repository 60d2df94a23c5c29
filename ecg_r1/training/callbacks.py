"""Trainer callbacks: per-step metrics into *our* MLflow run, a progress bar, log lines, and the
sample completions table.

Why not ``report_to=["mlflow"]``: Hugging Face's MLflow callback also logs every
``TrainingArguments`` field as a run parameter, and a resumed run whose arguments differ in any
field (paths, the resume flag) is refused by MLflow ("changing param values is not allowed"); it
logs asynchronously, so a killed run loses its last metrics; and it attaches to whatever run
happens to be active. :class:`MlflowMetricsCallback` writes synchronously into the run id the
training started or resumed (:func:`ecg_r1.tracking.runs.start_or_resume_run`), at the trainer's
global step, so a resumed run continues the same curves.
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Any

from transformers import TrainerCallback

from ecg_r1.modeling.contract import completion_text, parse_completion

logger = logging.getLogger(__name__)

# Metrics shown on the progress bar and in the periodic log lines, when present.
KEY_METRICS = (
    "loss",
    "reward",
    "rewards/accuracy_reward/mean",
    "rewards/format_reward/mean",
    "kl",
    "completions/mean_length",
    "learning_rate",
)
_SHORT = {
    "rewards/accuracy_reward/mean": "acc",
    "rewards/format_reward/mean": "fmt",
    "completions/mean_length": "len",
    "learning_rate": "lr",
}
_KEY_RE = re.compile(r"[^0-9A-Za-z_\-. /]")


def _numbers(logs: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in logs.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        out[_KEY_RE.sub("_", key)] = float(value)
    return out


class MlflowMetricsCallback(TrainerCallback):
    """Log every ``on_log`` dict as metrics of one MLflow run, at the trainer's global step.

    GRPO runs also get ``format_valid_rate`` (share of the latest generation batch that follows
    the output contract, read with the evaluation's parser).

    Args:
        run_id: the MLflow run to write into.
        prefix: prepended to metric names (e.g. ``"warmup/"``), empty by default.
    """

    def __init__(self, run_id: str, prefix: str = "") -> None:
        self.run_id = run_id
        self.prefix = prefix
        self.trainer: Any = None  # set by the caller after the trainer exists (for GRPO's samples)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        from ecg_r1.tracking.runs import log_metrics

        values = _numbers(logs)
        # only on a step's log (it carries the rewards), not on the end-of-training summary
        rate = latest_format_valid_rate(self.trainer) if "reward" in logs else None
        if rate is not None:
            values["format_valid_rate"] = rate
        log_metrics(self.run_id, {f"{self.prefix}{k}": v for k, v in values.items()}, int(state.global_step))


def latest_format_valid_rate(trainer: Any) -> float | None:
    """Share of GRPO's latest generated completions that follow the output contract; None for
    trainers that do not generate."""
    logs = getattr(trainer, "_logs", None)
    if not logs or not logs.get("completion"):
        return None
    completions = list(logs["completion"])
    valid = sum(parse_completion(completion_text(c)).valid for c in completions)
    return valid / len(completions)


class CompletionSamplesCallback(TrainerCallback):
    """Keep a few of GRPO's generated completions at every logging step, for the samples table.

    Args:
        per_step: completions kept per logging step.
    """

    def __init__(self, per_step: int = 4) -> None:
        self.per_step = per_step
        self.rows: list[dict[str, Any]] = []
        self.trainer: Any = None

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        logs_buffer = getattr(self.trainer, "_logs", None)
        if not logs or "reward" not in logs or not logs_buffer or not logs_buffer.get("completion"):
            return
        completions = list(logs_buffer["completion"])[: self.per_step]
        rewards = {name: list(values)[: self.per_step] for name, values in logs_buffer["rewards"].items()}
        prompts = list(logs_buffer["prompt"])[: self.per_step]
        for i, completion in enumerate(completions):
            text = completion_text(completion)
            parsed = parse_completion(text)
            row: dict[str, Any] = {"step": int(state.global_step), "completion": text, "valid": parsed.valid}
            row["answer"] = None if parsed.answer is None else ("Yes" if parsed.answer else "No")
            for name, values in rewards.items():
                row[f"reward_{name}"] = (
                    float(values[i]) if i < len(values) and values[i] == values[i] else None
                )
            if i < len(prompts):
                # the user message (clinical details); the system prompt is the same for all
                row["case"] = completion_text([m for m in prompts[i] if m.get("role") == "user"])[:300]
            self.rows.append(row)


class ProgressCallback(TrainerCallback):
    """A tqdm progress bar with the key metrics as its postfix (in place of the trainer's bar,
    which prints every log dict in full)."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.bar: Any = None
        self.seen = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc=self.description, unit="step"
            )
            self.seen = state.global_step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.seen)
            self.seen = state.global_step

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if self.bar is not None and logs:
            shown = {_SHORT.get(k, k): f"{v:.3g}" for k, v in _numbers(logs).items() if k in KEY_METRICS}
            self.bar.set_postfix(shown, refresh=False)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LogLinesCallback(TrainerCallback):
    """A compact ``logging`` line at every logging step (what Dagster's run log shows)."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.started = time.perf_counter()

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not logs or not state.is_world_process_zero:  # one line a step, not one per process
            return
        numbers = _numbers(logs)
        shown = ", ".join(f"{_SHORT.get(k, k)} {numbers[k]:.4g}" for k in KEY_METRICS if k in numbers)
        logger.info(
            "%s step %d/%d (%.0f s): %s",
            self.stage,
            state.global_step,
            state.max_steps,
            time.perf_counter() - self.started,
            shown or ", ".join(f"{k} {v:.4g}" for k, v in list(numbers.items())[:4]),
        )
