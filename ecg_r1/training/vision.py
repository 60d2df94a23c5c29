"""Signal-grounded pre-training of the vision tower.

A randomly initialised Qwen2-VL learns the text of the prompt long before it learns to read the
image tokens (measured: SFT from scratch copied the clinical text and ignored the image). This
stage teaches the vision tower to see what a cardiologist reads off the page: a readout head on
the tower's merged tokens learns the targets measured from the raw signal, never the ischemia
label (:mod:`ecg_r1.training.vision_readout` holds the targets, the heads and the token reading).
The head is thrown away; the updated vision tower (patch embedding, blocks and merger) is saved in
the model folder, and the language model is untouched.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from ecg_r1.data.canonical import LEADS
from ecg_r1.training.vision_readout import (
    REGRESSION_TARGETS,
    VisionTargets,
    pixel_batches,
    readout_head,
    signal_targets,
    tower_tokens,
)

if TYPE_CHECKING:
    import torch

    from ecg_r1.modeling.profiles import Profile

logger = logging.getLogger(__name__)


@dataclass
class VisionPretrainResult:
    """What :func:`run_vision_pretrain` did.

    Attributes:
        model_dir: the saved model folder (updated vision tower).
        steps: optimiser steps taken.
        seconds: training wall time.
        history: per logged step: step, loss, twi_loss, reg_loss, twi_accuracy (train batch;
            TWI leads and categorical findings).
        eval: held-out figures when eval cases were given (twi_accuracy, twi_f1,
            findings_accuracy, reg_mse).
    """

    model_dir: Path
    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    eval: dict[str, float] = field(default_factory=dict)


# Share of the cases held out to report target accuracy (only from 10 cases on), and the interval
# in steps of the logged training metrics.
EVAL_FRACTION = 0.1
LOG_EVERY = 10


def run_vision_pretrain(
    model_dir: str | Path,
    profile: Profile,
    cases: pl.DataFrame,
    cohort_dir: str | Path,
    out_dir: str | Path,
    *,
    steps: int | None = None,
    seed: int | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> VisionPretrainResult:
    """Pre-train the vision tower of a model folder on signal-measured targets.

    Args:
        model_dir: the starting model folder (usually the base model).
        profile: the model profile (image bounds, dtype; ``stages.vision_pretrain`` gives the
            steps, learning_rate, batch_size, head and finding_targets).
        cases: one row per case with its rendered page (``image_path``) and its row in the
            cohort's signal array (``row``; the targets are measured there), as
            :func:`ecg_r1.training.data.load_cases` gives them.
        cohort_dir: the cohort folder holding the signals.
        out_dir: where the model folder with the updated vision tower is saved.
        steps, seed: override the profile's steps and seed.
        on_step: called as ``on_step(step, metrics)`` every :data:`LOG_EVERY` steps and at the
            last one (MLflow, progress).

    Returns:
        A :class:`VisionPretrainResult`.

    Raises:
        ValueError: when no case is given or ``cases`` lacks a column.
    """
    import torch

    from ecg_r1.modeling.models import save_model_folder

    missing = sorted({"image_path", "row"} - set(cases.columns))
    if missing or cases.height == 0:
        raise ValueError(
            f"vision pre-training needs at least one case with image_path and row; got {cases.height} "
            f"cases lacking {missing}"
        )
    stage = profile.stage_settings("vision")
    steps = int(steps if steps is not None else stage["steps"])
    seed = int(seed if seed is not None else profile.seed)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    targets = signal_targets(cohort_dir, cases["row"].to_list(), bool(stage["finding_targets"]))
    tower, model, processor = _load_tower(model_dir, profile, cases["image_path"].to_list(), targets, stage)
    eval_idx, train_idx = _held_out_split(cases.height, rng)
    batch_size = int(stage["batch_size"])
    history, seconds = _train(
        tower, train_idx, steps, float(stage["learning_rate"]), batch_size, rng, on_step
    )
    evaluation = _evaluate(tower, eval_idx, batch_size) if len(eval_idx) else {}
    info = {
        "stage": "vision_pretrain",
        "profile": profile.name,
        "started_from": str(model_dir),
        "steps": steps,
        "learning_rate": float(stage["learning_rate"]),
        "batch_size": batch_size,
        "cases": cases.height,
        **evaluation,
    }
    save_model_folder(model, processor, out_dir, info=info)
    return VisionPretrainResult(Path(out_dir), steps, seconds, history, evaluation)


@dataclass
class _Tower:
    """The vision tower in training, its readout head, and the cases' pages and targets.

    Attributes:
        visual: the model's vision tower.
        head: the readout head (:func:`readout_head`); its first ``binary`` outputs are logits.
        pixels, grid: every page's pixel values and the common grid (:func:`pixel_batches`).
        twi, regression: the targets (:class:`VisionTargets`) on the device.
        profile, device: the profile's precision on ``device``.
    """

    visual: Any
    head: torch.nn.Module
    pixels: torch.Tensor
    grid: torch.Tensor
    twi: torch.Tensor
    regression: torch.Tensor
    profile: Profile
    device: str

    def forward(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits and values of cases ``idx``, one row per readout and case, with each row's case.

        Every readout is scored on every target; the outputs are float32 for the losses. The
        profile's precision on a GPU; float32 on a CPU, where this stage always ran (bfloat16
        there is slower for the tower's convolution and attention: ecg_r1.modeling.device).
        """
        import torch

        from ecg_r1.modeling.device import autocast

        binary = self.twi.shape[1]
        cuda = self.device == "cuda"
        with autocast(self.profile, self.device) if cuda else contextlib.nullcontext():
            out = self.head(tower_tokens(self.visual, self.pixels[torch.as_tensor(idx)], self.grid)).float()
        return (
            out[..., :binary].flatten(0, 1),
            out[..., binary:].flatten(0, 1),
            torch.as_tensor(np.tile(idx, len(out)), device=self.device),
        )

    def losses(
        self, logits: torch.Tensor, values: torch.Tensor, idx: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Binary cross-entropy on the measured binary targets plus the squared error of the
        measured regression targets (NaN targets left out), and the batch's binary accuracy."""
        import torch

        t, r = self.twi[idx], self.regression[idx]
        t_ok, r_ok = ~torch.isnan(t), ~torch.isnan(r)
        bce = (
            torch.nn.functional.binary_cross_entropy_with_logits(logits[t_ok], t[t_ok], reduction="mean")
            if t_ok.any()
            else logits.sum() * 0
        )
        mse = ((values[r_ok] - r[r_ok]) ** 2).mean() if r_ok.any() else values.sum() * 0
        hits = (
            ((logits[t_ok] > 0).float() == t[t_ok]).float().mean()
            if t_ok.any()
            else torch.tensor(float("nan"))
        )
        return {"loss": bce + mse, "twi_loss": bce, "reg_loss": mse, "twi_accuracy": hits}


def _load_tower(
    model_dir: str | Path,
    profile: Profile,
    image_paths: list[str],
    targets: VisionTargets,
    stage: Mapping[str, Any],
) -> tuple[_Tower, Any, Any]:
    """The model folder's tower with a new ``stage["head"]`` readout and the cases' pages, and
    the model and processor it belongs to."""
    import torch

    from ecg_r1.modeling.device import resolve_device
    from ecg_r1.modeling.models import load_model_and_processor

    # The tower trains in full: float32 weights on the device (a bfloat16 tower under the float32
    # head failed: "mat1 and mat2 must have the same dtype").
    device = resolve_device(profile)
    model, processor = load_model_and_processor(model_dir, profile, dtype=torch.float32, device=device)
    pixels, grid = pixel_batches(processor, image_paths)
    logger.info("pre-processed %d pages to %s pixel patches", len(image_paths), tuple(pixels.shape[1:]))
    visual = model.model.visual
    tokens = int(grid.prod()) // visual.spatial_merge_size**2
    outputs = targets.twi.shape[1] + len(REGRESSION_TARGETS)
    head = readout_head(str(stage["head"]), model.config.text_config.hidden_size, tokens, outputs).to(device)
    tower = _Tower(
        visual=visual,
        head=head,
        pixels=pixels,
        grid=grid,
        twi=torch.tensor(targets.twi, dtype=torch.float32, device=device),
        regression=torch.tensor(targets.regression, dtype=torch.float32, device=device),
        profile=profile,
        device=device,
    )
    return tower, model, processor


def _held_out_split(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Held-out and training case indices: :data:`EVAL_FRACTION` held out from 10 cases on."""
    order = rng.permutation(n)
    n_eval = int(round(EVAL_FRACTION * n)) if n >= 10 else 0
    return order[:n_eval], order[n_eval:]


def _lr_schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' cosine schedule with a linear warm-up over the first 5% of the steps (none
    under 20 steps): the schedule the tiny and smol profiles give SFT (``lr_scheduler_type:
    cosine``, ``warmup_steps: 0.05``)."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=steps // 20, num_training_steps=steps)


def _train(
    tower: _Tower,
    train_idx: np.ndarray,
    steps: int,
    learning_rate: float,
    batch_size: int,
    rng: np.random.Generator,
    on_step: Callable[[int, dict[str, float]], None] | None,
) -> tuple[list[dict[str, float]], float]:
    """Train the tower and head for ``steps`` AdamW steps on batches drawn without replacement
    from ``train_idx`` (reshuffled when an epoch ends).

    Returns:
        The logged steps' metrics (:attr:`VisionPretrainResult.history`) and the wall time.
    """
    import torch

    tower.visual.train()
    params = [*tower.visual.parameters(), *tower.head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.01)
    scheduler = _lr_schedule(optimizer, steps)
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    position = len(train_idx)
    for step in range(1, steps + 1):
        if position + batch_size > len(train_idx):
            rng.shuffle(train_idx)
            position = 0
        parts = tower.losses(*tower.forward(train_idx[position : position + batch_size]))
        position += batch_size
        optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if step % LOG_EVERY == 0 or step == steps:
            metrics = {name: float(value.detach()) for name, value in parts.items()}
            metrics["learning_rate"] = scheduler.get_last_lr()[0]
            history.append({"step": step, **metrics})
            logger.info(
                "vision pre-training step %d/%d: loss %.4f, TWI accuracy %.3f",
                step,
                steps,
                metrics["loss"],
                metrics["twi_accuracy"],
            )
            if on_step is not None:
                on_step(step, metrics)
    tower.visual.eval()
    return history, time.perf_counter() - started


def _evaluate(tower: _Tower, eval_idx: np.ndarray, batch_size: int) -> dict[str, float]:
    """Held-out figures of the first readout (positional where there is one): accuracy and F1
    of the TWI leads, accuracy of the categorical findings, squared error of the regression."""
    import torch

    tower.visual.eval()
    with torch.no_grad():
        logit_parts, value_parts = [], []
        for start in range(0, len(eval_idx), batch_size):
            batch_idx = eval_idx[start : start + batch_size]
            logits, values, _ = tower.forward(batch_idx)
            logit_parts.append(logits[: len(batch_idx)])  # the first readout
            value_parts.append(values[: len(batch_idx)])
        logits, values = torch.cat(logit_parts), torch.cat(value_parts)
    idx = torch.as_tensor(eval_idx, device=tower.device)
    t, r = tower.twi[idx], tower.regression[idx]
    t_ok, r_ok = ~torch.isnan(t), ~torch.isnan(r)
    leads = torch.zeros_like(t_ok)
    leads[:, : len(LEADS)] = True
    predicted, truth = (logits[t_ok & leads] > 0), t[t_ok & leads].bool()
    flags_ok = t_ok & ~leads
    evaluation = {
        "eval_cases": float(len(eval_idx)),
        "eval_twi_accuracy": float((predicted == truth).float().mean()),
        "eval_twi_f1": twi_f1(truth.cpu().numpy(), predicted.cpu().numpy()),
        "eval_findings_accuracy": float(((logits[flags_ok] > 0) == t[flags_ok].bool()).float().mean()),
        "eval_reg_mse": float(((values[r_ok] - r[r_ok]) ** 2).mean()) if r_ok.any() else float("nan"),
    }
    logger.info("vision pre-training held-out: %s", evaluation)
    return evaluation


def twi_f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    """F1 of the predicted TWI leads (scikit-learn's ``f1_score``): 0 where no lead is inverted
    nor predicted, NaN where no lead could be measured (as the accuracies beside it)."""
    from sklearn.metrics import f1_score

    if truth.size == 0:
        return float("nan")
    return float(f1_score(truth, predicted, zero_division=0.0))
