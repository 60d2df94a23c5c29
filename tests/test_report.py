"""The comparison table and the plots: written, non-empty, showing what they claim."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from PIL import Image

from ecg_r1.evaluation.baselines import CLINICIANS_NAME, CLINICIANS_SOURCE, clinicians_metrics
from ecg_r1.evaluation.evaluate import evaluate_binary, evaluate_by_group
from ecg_r1.evaluation.report import (
    CITED,
    CROSS_HOSPITAL,
    INTERNAL,
    REFERENCE,
    CaseView,
    TableRow,
    comparison_table,
    plot_cases,
    plot_confusion_matrices,
    plot_group_accuracy,
    plot_reward_curves,
    plot_roc_curves,
    write_comparison_table,
)

RNG = np.random.default_rng(0)
Y = RNG.random(200) < 0.4
SCORES = np.clip(np.where(Y, 0.65, 0.35) + RNG.normal(0, 0.2, 200), 0, 1)
PRED = [bool(s >= 0.5) for s in SCORES]
PRED[:7] = [None] * 7  # a few invalid outputs
HOSP = np.where(np.arange(200) % 3 == 0, "H1", np.where(np.arange(200) % 3 == 1, "H2", "H3"))


def _png_ok(path) -> None:
    assert path.exists() and path.stat().st_size > 2000
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 200 and im.height > 150
        # not a blank canvas: several distinct colours were drawn
        assert len(im.convert("RGB").getcolors(maxcolors=1_000_000) or []) > 10


class TestComparisonTable:
    def test_rows_values_intervals_and_cited_mark(self, tmp_path) -> None:
        model = evaluate_binary(Y, PRED, SCORES, n_boot=300)
        rows = [
            TableRow("GRPO", INTERNAL, model),
            TableRow(
                "Majority class", CROSS_HOSPITAL, evaluate_binary(Y, [False] * 200, n_boot=300), REFERENCE
            ),
            TableRow(CLINICIANS_NAME, CROSS_HOSPITAL, clinicians_metrics(), CITED, CLINICIANS_SOURCE),
        ]
        text = comparison_table(rows)
        lines = text.splitlines()
        assert lines[0].startswith(
            "| Model | Split | n | Accuracy [95% CI] | Sensitivity | Specificity | PPV |"
        )
        grpo = lines[2]
        assert f"| GRPO | {INTERNAL} | 200 | {model.accuracy.value:.3f} [{model.accuracy.low:.3f}, " in grpo
        assert f"{model.auroc.value:.3f} [" in grpo
        assert f"| {model.valid_rate.value:.3f} |" in grpo and "0.965" in grpo  # 7 of 200 invalid
        assert "| Majority class |" in lines[3] and "n/a" in lines[3]  # no AUROC without scores
        assert f"{CLINICIANS_NAME}* | {CROSS_HOSPITAL} | — | — | — | — | 0.50 (cited) | — |" in lines[4]
        assert f"* {CLINICIANS_SOURCE}" in text
        path = write_comparison_table(rows, tmp_path / "t" / "comparison.md")
        assert path.read_text() == text


class TestPlots:
    def test_confusion_matrices(self, tmp_path) -> None:
        res = {"GRPO internal": evaluate_binary(Y, PRED, n_boot=0), "SFT": evaluate_binary(Y, Y, n_boot=0)}
        _png_ok(plot_confusion_matrices(res, tmp_path / "cm.png"))

    def test_roc_curves_skip_one_class_entries(self, tmp_path) -> None:
        curves = {"GRPO": (Y, SCORES), "one class": (np.ones(5, bool), np.linspace(0, 1, 5))}
        _png_ok(plot_roc_curves(curves, tmp_path / "roc.png", title=CROSS_HOSPITAL))

    def test_group_accuracy_with_intervals(self, tmp_path) -> None:
        per = {
            "GRPO": evaluate_by_group(Y, PRED, HOSP, n_boot=200),
            "Feature baseline": evaluate_by_group(Y, [bool(v) for v in Y], HOSP, n_boot=200),
        }
        _png_ok(plot_group_accuracy(per, tmp_path / "hosp.png", reference={"clinicians (cited)": 0.5}))

    def test_reward_curves(self, tmp_path) -> None:
        steps = np.arange(50)
        log = pl.DataFrame(
            {
                "step": steps,
                "rewards/format_reward/mean": np.minimum(1, steps / 30),
                "rewards/accuracy_reward/mean": 0.5 + 0.004 * steps,
                "loss": RNG.random(50),
            }
        )
        _png_ok(plot_reward_curves(log, tmp_path / "reward.png"))
        with pytest.raises(ValueError, match="step"):
            plot_reward_curves(log.drop("step"), tmp_path / "x.png")
        with pytest.raises(ValueError, match="not in the training log"):
            plot_reward_curves(log, tmp_path / "x.png", rewards=["kl"])

    def test_cases_figure_from_image_files(self, tmp_path) -> None:
        img = np.full((300, 400, 3), 255, np.uint8)
        img[::20] = (255, 180, 180)
        img[150, :] = 0
        Image.fromarray(img).save(tmp_path / "ecg.png")
        cases = [
            CaseView(
                "sim_000001",
                tmp_path / "ecg.png",
                "ischemic",
                True,
                "Deep symmetric TWI in V2-V4. " * 20,
                0.83,
            ),
            CaseView("sim_000002", img, "non-ischemic", None, None),
        ]
        _png_ok(plot_cases(cases, tmp_path / "cases.png"))
        with pytest.raises(ValueError, match="no cases"):
            plot_cases([], tmp_path / "none.png")
