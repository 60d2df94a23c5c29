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


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The figures the plot functions save, kept for the tests to read back (each PNG is still
    written and checked)."""
    from ecg_r1.evaluation import report

    figures = []
    save = report._save

    def keep(fig, path):
        figures.append(fig)
        written = save(fig, path)
        _png_ok(written)
        return written

    monkeypatch.setattr(report, "_save", keep)
    return figures


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


class TestPlots:
    def test_confusion_matrices_show_each_result_counts_accuracy_and_invalid_outputs(
        self, tmp_path, drawn
    ) -> None:
        res = {"GRPO internal": evaluate_binary(Y, PRED, n_boot=0), "SFT": evaluate_binary(Y, Y, n_boot=0)}
        plot_confusion_matrices(res, tmp_path / "cm.png")
        axes = drawn[0].axes
        assert len(axes) == 2
        for ax, (title, m) in zip(axes, res.items(), strict=True):
            c = m.confusion
            # rows: truth non-ischemic / ischemic; columns: answer No / Yes; invalid counted wrong
            assert _texts(ax) == [str(c["tn"]), str(c["fp"]), str(c["fn"]), str(c["tp"])]
            assert ax.get_title() == f"{title}\nacc {m.accuracy.value:.2f}, invalid {m.n_invalid}"
            assert [t.get_text() for t in ax.get_xticklabels()] == ["No", "Yes"]
            assert np.array_equal(ax.images[0].get_array(), [[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
        assert res["SFT"].confusion["fp"] == res["SFT"].confusion["fn"] == 0  # the perfect row
        assert res["GRPO internal"].n_invalid == 7

    def test_roc_curves_skip_one_class_entries(self, tmp_path, drawn) -> None:
        curves = {"GRPO": (Y, SCORES), "one class": (np.ones(5, bool), np.linspace(0, 1, 5))}
        plot_roc_curves(curves, tmp_path / "roc.png", title=CROSS_HOSPITAL)
        ax = drawn[0].axes[0]
        auroc = evaluate_binary(Y, PRED, SCORES, n_boot=0).auroc.value
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["chance", f"GRPO (AUROC {auroc:.2f})"]  # no curve for the one-class entry
        assert ax.get_title() == CROSS_HOSPITAL
        fpr, tpr = ax.lines[1].get_data()
        assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
        assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)

    def test_roc_without_any_two_class_entry_says_so(self, tmp_path, drawn) -> None:
        plot_roc_curves({"one class": (np.ones(5, bool), np.linspace(0, 1, 5))}, tmp_path / "roc.png")
        ax = drawn[0].axes[0]
        assert len(ax.lines) == 1  # the chance line only
        assert _texts(ax) == ["no curve: every entry has one class only"]

    def test_group_accuracy_shows_each_hospital_with_its_interval_and_the_reference(
        self, tmp_path, drawn
    ) -> None:
        per = {
            "GRPO": evaluate_by_group(Y, PRED, HOSP, n_boot=200),
            "Feature baseline": evaluate_by_group(Y, [bool(v) for v in Y], HOSP, n_boot=200),
        }
        plot_group_accuracy(per, tmp_path / "hosp.png", reference={"clinicians (cited)": 0.5})
        ax = drawn[0].axes[0]
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert ticks == [f"{h}\n(n={per['GRPO'][h].n})" for h in ("H1", "H2", "H3")]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == list(per)
        for container, res in zip(ax.containers, per.values(), strict=True):
            points, _, (bars,) = container
            assert np.allclose(points.get_ydata(), [res[h].accuracy.value for h in ("H1", "H2", "H3")])
            # each error bar spans the bootstrap interval
            spans = [segment[:, 1] for segment in bars.get_segments()]
            assert np.allclose(
                spans, [[res[h].accuracy.low, res[h].accuracy.high] for h in ("H1", "H2", "H3")]
            )
        assert _texts(ax) == [" clinicians (cited)"]
        assert any(np.allclose(line.get_ydata(), 0.5) for line in ax.lines)

    def test_reward_curves_draw_the_rewards_raw_and_smoothed(self, tmp_path, drawn) -> None:
        steps = np.arange(50)
        log = pl.DataFrame(
            {
                "step": steps,
                "rewards/format_reward/mean": np.minimum(1, steps / 30),
                "rewards/accuracy_reward/mean": 0.5 + 0.004 * steps,
                "loss": RNG.random(50),
            }
        )
        plot_reward_curves(log, tmp_path / "reward.png", window=10)
        ax = drawn[0].axes[0]
        rewards = ["rewards/format_reward/mean", "rewards/accuracy_reward/mean"]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == rewards  # not the loss
        assert len(ax.lines) == 4  # raw and smoothed per reward
        for k, col in enumerate(rewards):
            raw, smooth = ax.lines[2 * k], ax.lines[2 * k + 1]
            assert np.allclose(raw.get_ydata(), log[col].to_numpy())
            assert np.allclose(smooth.get_ydata(), log[col].rolling_mean(10, min_samples=1).to_numpy())
            assert raw.get_color() == smooth.get_color()
        with pytest.raises(ValueError, match="step"):
            plot_reward_curves(log.drop("step"), tmp_path / "x.png")
        with pytest.raises(ValueError, match="not in the training log"):
            plot_reward_curves(log, tmp_path / "x.png", rewards=["kl"])

    def test_cases_figure_shows_each_page_truth_answer_and_reasoning(self, tmp_path, drawn) -> None:
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
                "Deep symmetric TWI in V2-V4. " * 40,
                0.83,
            ),
            CaseView("sim_000002", img, "non-ischemic", None, None),
        ]
        plot_cases(cases, tmp_path / "cases.png", max_chars=200)
        page_one, text_one, page_two, text_two = drawn[0].axes
        assert page_one.get_title() == "sim_000001" and page_two.get_title() == "sim_000002"
        assert np.array_equal(page_one.images[0].get_array(), img)  # the page read from its file
        assert np.array_equal(page_two.images[0].get_array(), img)
        head, body = text_one.texts
        assert head.get_text() == "truth: ischemic   model: Yes (ischemic)   p(Yes) = 0.83"
        assert head.get_color() == "darkgreen"  # right
        assert body.get_text().startswith("Deep symmetric TWI in V2-V4.") and body.get_text().endswith("…")
        assert len(body.get_text().replace("\n", " ")) <= 200 + 2  # cut at max_chars, with the ellipsis
        head, body = text_two.texts
        assert head.get_text() == "truth: non-ischemic   model: invalid output"
        assert head.get_color() == "darkred"  # an invalid output counts as wrong
        assert body.get_text() == "(no reasoning)"
        with pytest.raises(ValueError, match="no cases"):
            plot_cases([], tmp_path / "none.png")
