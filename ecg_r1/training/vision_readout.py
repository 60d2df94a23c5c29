"""What the vision pre-training reads and scores (:mod:`ecg_r1.training.vision` trains on it).

Targets measured from the **raw signal** (:func:`ecg_r1.data.features.measure_features`), never
the ischemia label, so the stage runs on real cohorts as on simulated ones:

* which leads show T-wave inversion (12 binary targets) and the categorical findings the findings
  rationale states (rate, T depth and symmetry, ST, QRS width and voltage, QT; binary targets);
* per-lead T amplitude and symmetry, ST level and QRS voltage, QRS width, QT and heart rate
  (regression targets, standardised on the training cases).

The head (``stages.vision_pretrain.head``, :func:`readout_head`) reads the vision tower's merged
tokens (:func:`tower_tokens`: the exact vectors the language model receives as image tokens).
``positional``: a small per-token projection followed by a linear map over token positions (the
page layout is fixed, so *where* a token sits says which lead it shows). ``pooled``: a linear map
of the tokens' mean, which makes the tower write every finding where an attention head that has
not learned where to look finds it. ``positional+pooled``: both readouts, each scored on every
target.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from ecg_r1.data.canonical import LEADS
from ecg_r1.data.store import open_signals
from ecg_r1.modeling.findings import FINDING_FLAGS, finding_flags

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

REGRESSION_TARGETS = (
    *(f"t_amp_{lead}" for lead in LEADS),
    *(f"t_sym_{lead}" for lead in LEADS),
    *(f"st_{lead}" for lead in LEADS),
    *(f"qrs_amp_{lead}" for lead in LEADS),
    "qrs_ms",
    "qt_ms",
    "hr_bpm",
)


@dataclass(frozen=True)
class VisionTargets:
    """Per-case targets measured from the signal.

    Attributes:
        twi: ``(n, 12 + f)`` float: 1 where the lead shows TWI, then the categorical findings of
            :data:`ecg_r1.modeling.findings.FINDING_FLAGS` (the ones the findings rationale states); NaN
            where unmeasurable.
        regression: ``(n, k)`` standardised measurements, NaN where unmeasurable.
        mean, std: the standardisation (from the cases it was built on).
        names: regression target names.
    """

    twi: np.ndarray
    regression: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    names: tuple[str, ...] = REGRESSION_TARGETS


def measured_targets(features: pl.DataFrame, finding_targets: bool) -> VisionTargets:
    """Turn :func:`ecg_r1.data.features.measure_features` output into training targets.

    Args:
        features: one row per case with the per-lead ``t_amp_*``, ``st_*``, ``qrs_amp_*``
            columns, ``qrs_ms``, ``hr_bpm`` and ``twi_leads``.
        finding_targets: add the categorical findings (:data:`ecg_r1.modeling.findings.FINDING_FLAGS`) to
            the binary targets. On the tiny tower (300 steps) they cost TWI-lead F1 (0.80 against
            0.91 without them), and the SFT model on top read the image less, so the tiny profile
            leaves them off (``stages.vision_pretrain.finding_targets``).

    Returns:
        :class:`VisionTargets`; a record that could not be measured has NaN targets (left out of
        the loss, not dropped).
    """
    missing = [name for name in (*REGRESSION_TARGETS, "twi_leads") if name not in features.columns]
    if missing:
        raise ValueError(
            f"features lack columns {missing}; compute them with ecg_r1.data.features.measure_features"
        )
    n = features.height
    flag_names = FINDING_FLAGS if finding_targets else ()
    twi = np.full((n, len(LEADS) + len(flag_names)), np.nan)
    for i, row in enumerate(features.iter_rows(named=True)):
        if row["twi_leads"] is None:  # unmeasurable record
            continue
        found = [name.strip() for name in row["twi_leads"].split(",") if name.strip()]
        twi[i, : len(LEADS)] = [1.0 if lead in found else 0.0 for lead in LEADS]
        flags = finding_flags(row, found)
        twi[i, len(LEADS) :] = [np.nan if flags[k] is None else float(flags[k]) for k in flag_names]
    values = features.select(REGRESSION_TARGETS).to_numpy().astype(np.float64)
    mean = np.nanmean(values, axis=0) if n else np.zeros(len(REGRESSION_TARGETS))
    std = np.nanstd(values, axis=0) if n else np.ones(len(REGRESSION_TARGETS))
    mean = np.nan_to_num(mean)
    std = np.where(np.isfinite(std) & (std > 1e-6), std, 1.0)
    return VisionTargets(twi=twi, regression=(values - mean) / std, mean=mean, std=std)


def readout_head(kind: str, hidden: int, tokens: int, outputs: int, width: int = 8) -> torch.nn.Module:
    """A new readout head of the merged tokens (``stages.vision_pretrain.head``).

    Args:
        kind: ``positional``, ``pooled`` or ``positional+pooled``.
        hidden, tokens: the merged tokens' width and number per page.
        outputs: the binary targets then the regression targets.
        width: features per token of the positional readout.

    Returns:
        A module mapping ``(batch, tokens, hidden)`` to ``(readouts, batch, outputs)``.

    Raises:
        ValueError: for an unknown ``kind``.
    """
    import torch

    class PooledHead(torch.nn.Module):
        """A linear map of the mean of the merged tokens.

        The language model reads image tokens through attention, and an attention head that has
        not yet learned where to look averages them. With this head the pre-training puts every
        finding where such an average finds it, linearly, so the language model can use the
        findings from its first SFT steps instead of first learning which token shows which lead.
        """

        def __init__(self) -> None:
            super().__init__()
            self.out = torch.nn.Linear(hidden, outputs)

        def forward(self, merged: torch.Tensor) -> torch.Tensor:  # (batch, tokens, hidden)
            return self.out(merged.mean(dim=1))[None]  # (1, batch, outputs)

    class PositionalHead(torch.nn.Module):
        """Per-token projection to ``width`` features, then a linear map over all positions."""

        def __init__(self) -> None:
            super().__init__()
            self.norm = torch.nn.LayerNorm(hidden)
            self.token = torch.nn.Linear(hidden, width)
            self.out = torch.nn.Linear(tokens * width, outputs)

        def forward(self, merged: torch.Tensor) -> torch.Tensor:  # (batch, tokens, hidden)
            x = torch.nn.functional.gelu(self.token(self.norm(merged)))
            return self.out(x.flatten(1))[None]  # (1, batch, outputs)

    class BothHeads(torch.nn.Module):
        """Both readouts, each trained on every target: the tower must show each finding where
        its lead sits *and* in the tokens' mean, so the language model's attention, which starts
        out averaging the image tokens, finds the findings from its first SFT steps while the
        positional readout keeps the tower locating leads (the pooled head alone could not)."""

        def __init__(self) -> None:
            super().__init__()
            self.positional, self.pooled = PositionalHead(), PooledHead()

        def forward(self, merged: torch.Tensor) -> torch.Tensor:  # (batch, tokens, hidden)
            return torch.cat([self.positional(merged), self.pooled(merged)])  # (2, batch, outputs)

    heads = {"positional": PositionalHead, "pooled": PooledHead, "positional+pooled": BothHeads}
    if kind not in heads:
        raise ValueError(f"vision pre-training head must be one of {tuple(heads)}, got {kind!r}")
    return heads[kind]()


def pixel_batches(processor: Any, image_paths: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-process every page once: ``(n, patches, dim)`` pixel values and the common grid."""
    import torch
    from PIL import Image

    pixels, grid = [], None
    for path in image_paths:
        with Image.open(path) as image:
            out = processor.image_processor(images=[image.convert("RGB")], return_tensors="pt")
        if grid is None:
            grid = out["image_grid_thw"][0]
        elif not torch.equal(grid, out["image_grid_thw"][0]):
            raise ValueError(
                f"{path} gives an image grid {out['image_grid_thw'][0].tolist()} unlike the first page's "
                f"{grid.tolist()}: render all pages at one size for the vision pre-training"
            )
        # float16 halves the cache (a 224 px page is 192 x 1176 values); the model sees float32.
        pixels.append(out["pixel_values"].to(torch.float16))
    return torch.stack(pixels), grid


def tower_tokens(visual: Any, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The merged tokens the language model receives for a batch of pages of one size.

    Args:
        visual: the model's vision tower (``model.model.visual``).
        pixels: ``(pages, patches, dim)`` pixel values from :func:`pixel_batches`.
        grid: the pages' common ``image_grid_thw`` row.

    Returns:
        ``(pages, tokens, hidden)``.
    """
    import torch

    device = next(visual.parameters()).device
    merged = visual(
        pixels.to(device=device, dtype=torch.float32).flatten(0, 1),
        grid_thw=grid.to(device).unsqueeze(0).repeat(len(pixels), 1),
    ).pooler_output
    return merged.view(len(pixels), -1, merged.shape[-1])


def page_tokens(model: Any, processor: Any, image_paths: list[str], batch_size: int = 32) -> np.ndarray:
    """:func:`tower_tokens` of every page, computed in batches without gradients.

    Returns:
        A float32 ``(pages, tokens, hidden)`` array.

    Raises:
        ValueError: when the pages do not all give the same image grid.
    """
    import torch

    visual, parts, first = model.model.visual, [], None
    visual.eval()
    with torch.no_grad():
        for start in range(0, len(image_paths), batch_size):
            pixels, grid = pixel_batches(processor, image_paths[start : start + batch_size])
            if first is None:
                first = grid
            elif not torch.equal(grid, first):
                raise ValueError(
                    f"pages from {image_paths[start]} on give an image grid {grid.tolist()} unlike the "
                    f"first page's {first.tolist()}: render all pages at one size"
                )
            parts.append(tower_tokens(visual, pixels, grid).float().cpu().numpy())
    return np.concatenate(parts)


def signal_targets(cohort_dir: str | Path, signal_rows: list[int], finding_targets: bool) -> VisionTargets:
    """:func:`measured_targets` of the cases' signals."""
    from ecg_r1.data.features import measure_features

    started = time.perf_counter()
    signals = open_signals(cohort_dir)
    features = measure_features(np.asarray(signals[np.asarray(signal_rows)]))
    targets = measured_targets(features, finding_targets=finding_targets)
    logger.info(
        "measured vision targets for %d cases in %.1f s", len(signal_rows), time.perf_counter() - started
    )
    return targets
