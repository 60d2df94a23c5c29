"""The model comparison on a tiny cohort with an untrained tiny model, and ``ecg-r1 evaluate`` / ``where``.

An untrained model writes no valid completion: every answer must count as wrong, and the table
must say so through its valid rate.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from test_train import make_cohort, tiny_test_profile

from ecg_r1.evaluation.baselines import CLINICIANS_NAME
from ecg_r1.evaluation.cases import (
    EVAL_SPLITS,
    add_features,
    evaluation_cases,
    gather_cases,
    sample_per_split,
)
from ecg_r1.evaluation.comparison import ComparisonInputs, ComparisonSettings, run_comparison
from ecg_r1.evaluation.note_shift import note_shift
from ecg_r1.evaluation.outputs import read_predictions
from ecg_r1.evaluation.predictions import predict_cases, stage_folder
from ecg_r1.evaluation.references import ReferenceBaselines
from ecg_r1.evaluation.results import Comparison
from ecg_r1.modeling.build import build_base_model, corpus_from_cases
from ecg_r1.modeling.profiles import load_profile

N_BOOT = 200


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("comparison")
    data = make_cohort(root, n=32)
    profile_path = tiny_test_profile(root / "profile.yaml", grpo={"max_completion_length": 8})
    profile = load_profile(profile_path)
    cases = pl.read_parquet(data["cohort"] / "cohort.parquet").to_dicts()
    model = build_base_model(profile, corpus_from_cases(cases), root / "stage" / "model")
    # A stage folder with a training history that logged rewards (as GRPO writes it).
    history = [
        {"step": s, "reward": 0.1 * s, "rewards/format/mean": 0.05 * s, "loss": 1.0} for s in range(1, 6)
    ]
    history.append({"step": 5, "train_runtime": 1.0})
    (root / "stage" / "result.json").write_text(
        json.dumps(
            {
                "stage": "grpo",
                "model_dir": str(model),
                "run_id": None,
                "registered": None,
                "steps": 5,
                "resumed_from": 0,
                "seconds": 1.0,
                "seconds_per_step": 0.2,
                "samples_per_second": 1.0,
                "peak_rss_mb": 1.0,
                "metrics": {},
                "history": history,
            }
        )
    )
    # Truth of a simulator: a posterior per case (here the label, slightly softened).
    cohort = pl.read_parquet(data["cohort"] / "cohort.parquet")
    truth = cohort.select(
        "record_id",
        pl.when(pl.col("label") == "ischemic").then(0.9).otherwise(0.2).alias("posterior_ischemic"),
    )
    truth.write_parquet(root / "truth.parquet")
    return {
        **data,
        "profile": profile_path,
        "stage": root / "stage",
        "model": model,
        "truth": root / "truth.parquet",
    }


def compare(
    setup: dict[str, Path],
    out: Path,
    models: dict[str, Path] | None = None,
    truth_path: Path | None = None,
    baselines_dir: Path | None = None,
    **settings,
) -> Comparison:
    """:func:`run_comparison` of the setup's cohort (default: its untrained model as "SFT")."""
    inputs = ComparisonInputs(
        setup["cohort"], setup["splits"], setup["images"], truth_path=truth_path, baselines_dir=baselines_dir
    )
    return run_comparison(
        models or {"SFT": setup["model"]}, setup["profile"], inputs, out, ComparisonSettings(**settings)
    )


@pytest.fixture(scope="module")
def result(setup, tmp_path_factory) -> Comparison:
    return compare(
        setup,
        tmp_path_factory.mktemp("out"),
        {"GRPO": setup["stage"], "SFT": setup["model"]},
        truth_path=setup["truth"],
        n_boot=N_BOOT,
        max_new_tokens=8,
    )


@pytest.mark.slow  # trains and evaluates tiny models (fixture ~7 s)
class TestRunComparison:
    def test_table_has_every_row_on_both_splits_with_n_and_intervals(self, result):
        table = result.table
        for split in ("internal test", "cross-hospital"):
            for row in (
                "GRPO",
                "SFT",
                "Feature baseline",
                "Majority class",
                "Bayes-optimal ceiling",
                CLINICIANS_NAME,
            ):
                assert any(
                    line.startswith(f"| {row}") and f"| {split} |" in line for line in table.splitlines()
                ), (
                    row,
                    split,
                )
        external = pl.read_parquet(result.files["cases"]).filter(pl.col("split") == "test_external")
        feature_row = next(
            line
            for line in table.splitlines()
            if line.startswith("| Feature baseline") and "cross-hospital" in line
        )
        assert f"| {external.height} |" in feature_row
        assert "[" in feature_row  # a bootstrap interval beside the accuracy
        assert "(cited)" in table and "positive predictive value" in table

    def test_invalid_outputs_count_wrong_and_the_invalid_rate_is_reported(self, result):
        for split in EVAL_SPLITS:
            m = result.results["GRPO"][split]
            assert m.n_invalid == m.n  # an untrained model never follows the output contract
            assert m.valid_rate.value == 0.0
            assert m.accuracy.value == 0.0  # invalid = wrong, whatever the label
        # P(Yes) is read for every case even so (the external split holds both classes).
        assert np.isfinite(result.results["GRPO"]["test_external"].auroc.value)
        rows = json.loads(result.files["metrics"].read_text())["rows"]
        grpo = next(r for r in rows if r["name"] == "GRPO" and r["split"] == "test_external")
        assert grpo["n_invalid"] == grpo["n"] > 0 and grpo["valid_rate"] == 0.0

    def test_reference_rows_are_measured_on_the_same_cases(self, result):
        majority = result.results["Majority class"]["test_internal"]
        bayes = result.results["Bayes-optimal ceiling (simulator)"]["test_internal"]
        assert majority.n == bayes.n == result.results["GRPO"]["test_internal"].n
        assert bayes.accuracy.value == 1.0  # the posterior thresholded at 0.5 gives the label here
        assert majority.valid_rate.value == 1.0

    def test_paired_comparison_and_per_hospital(self, result):
        assert {(p.a, p.b, p.split) for p in result.paired} == {
            ("GRPO", "SFT", "test_internal"),
            ("GRPO", "SFT", "test_external"),
        }
        # The same untrained weights: identical answers, no discordant case.
        assert all(p.result.only_a_correct == p.result.only_b_correct == 0 for p in result.paired)
        assert set(result.per_hospital["GRPO"]) == {"H1", "H2"}
        assert "Paired comparisons" in result.table

    def test_files_written(self, result):
        for key in (
            "table",
            "metrics",
            "cases",
            "confusion_matrices",
            "accuracy_per_hospital",
            "cases_figure",
        ):
            assert result.files[key].is_file(), key
        assert result.files["roc_test_external"].is_file()
        assert "reward_curves_grpo" in result.files  # from the stage's history
        # The SFT row was given the model folder inside the stage folder: it finds the stage too.
        assert "reward_curves_sft" in result.files
        saved = read_predictions(result.out_dir, "GRPO")
        assert saved.record_id == result.predictions["GRPO"].record_id
        assert all(v is None for v in saved.y_pred)
        frame = pl.read_parquet(result.files["predictions_grpo"])
        assert {"completion", "reasoning", "split"} <= set(frame.columns)
        metrics = result.model_metrics("GRPO")["test_external"]
        assert metrics["test_external/n"] == result.results["GRPO"]["test_external"].n
        assert "hospital/h2/accuracy" in metrics

    def test_each_split_reports_the_note_words_no_training_note_holds(self, setup, result):
        training = evaluation_cases(setup["cohort"], setup["splits"], setup["images"], "train")["note"]
        document = json.loads(result.files["metrics"].read_text())
        for split in EVAL_SPLITS:
            notes = evaluation_cases(setup["cohort"], setup["splits"], setup["images"], split)["note"]
            expected = note_shift(training.to_list(), notes.to_list())
            assert result.note_shift[split] == expected
            assert document["splits"][split]["notes"] == expected.as_dict()
            assert expected.notes == notes.drop_nulls().len()
        assert "## Note words the models never saw" in result.table

    def test_without_labelled_training_cases_the_note_shift_is_left_out(self, setup, tmp_path, caplog):
        splits = pl.read_parquet(setup["splits"])
        no_train = splits.with_columns(pl.col("split").replace("train", "val"))
        no_train.write_parquet(tmp_path / "splits.parquet")
        with caplog.at_level("WARNING", logger="ecg_r1.evaluation.cases"):
            data = gather_cases(setup["cohort"], tmp_path / "splits.parquet", setup["images"], seed=0)
        assert data.note_shift == {} and "no note shift reported" in caplog.text
        assert data.by_split["test_external"].height > 0

    def test_without_truth_there_is_no_bayes_row(self, setup, tmp_path):
        baselines = ReferenceBaselines.fit(
            add_features(
                evaluation_cases(setup["cohort"], setup["splits"], setup["images"], "train"),
                setup["cohort"],
            )
        )
        baselines.save(tmp_path / "baselines")
        out = compare(
            setup,
            tmp_path / "out",
            baselines_dir=tmp_path / "baselines",
            n_boot=0,
            max_new_tokens=4,
            n_case_figures=0,
        )
        assert "Bayes" not in out.table
        assert set(out.results) == {"SFT", "Feature baseline (gradient boosting)", "Majority class"}

    def test_sample_per_split_is_seeded_and_bounded(self, setup):
        cases = evaluation_cases(setup["cohort"], setup["splits"], setup["images"], list(EVAL_SPLITS))
        sample = sample_per_split(cases, 3, seed=1)
        assert sample["split"].value_counts().sort("split")["count"].to_list() == [3, 3]
        assert sample.equals(sample_per_split(cases, 3, seed=1))
        assert sample_per_split(cases, 100, seed=1).equals(cases)
        with pytest.raises(ValueError, match="at least 1"):
            sample_per_split(cases, 0, seed=1)

    def test_truth_missing_cases_is_refused(self, setup, tmp_path):
        partial = pl.read_parquet(setup["truth"]).head(3)
        partial.write_parquet(tmp_path / "truth.parquet")
        with pytest.raises(ValueError, match="not in the truth table"):
            compare(
                setup,
                tmp_path / "out",
                truth_path=tmp_path / "truth.parquet",
                n_boot=0,
                max_new_tokens=2,
                n_case_figures=0,
            )

    def test_stage_folder_of_a_bare_model_folder_is_none(self, setup, tmp_path):
        import shutil

        bare = shutil.copytree(setup["model"], tmp_path / "bare")
        assert stage_folder(bare) == (bare, None)
        assert stage_folder(setup["stage"]) == (setup["model"], setup["stage"])

    def test_not_a_model_folder_is_refused(self, tmp_path):
        with pytest.raises(ValueError, match="neither a model folder"):
            stage_folder(tmp_path)


@pytest.mark.slow  # the CLI on trained models
class TestEvaluateCommand:
    def test_prints_the_table_for_a_model_folder(self, setup, tmp_path, capsys):
        from ecg_r1.cli import main

        code = main(
            [
                "evaluate",
                "--model",
                f"SFT={setup['model']}",
                "--cohort",
                str(setup["cohort"]),
                "--splits",
                str(setup["splits"]),
                "--images",
                str(setup["images"]),
                "--out",
                str(tmp_path / "out"),
                "--truth",
                str(setup["truth"]),
                "--profile",
                str(setup["profile"]),
                "--n-boot",
                "0",
                "--max-new-tokens",
                "2",
            ]
        )
        out = capsys.readouterr().out
        assert code == 0
        assert "| SFT | cross-hospital |" in out and "| Majority class |" in out and "Bayes-optimal" in out
        assert (tmp_path / "out" / "comparison.md").read_text() in out

    def test_unknown_registry_version_is_a_clear_error(self, setup, tmp_path, monkeypatch, seed_mlflow_db):
        from ecg_r1.cli import main

        seed_mlflow_db(tmp_path / "mlflow" / "mlflow.db")  # commands that read models create no store
        # The command points MLflow at the store through the environment: restore it afterwards.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
        monkeypatch.setenv("MLFLOW_REGISTRY_URI", "")

        with pytest.raises(SystemExit, match="ecg-r1-grpo/99"):
            main(
                [
                    "evaluate",
                    "--model",
                    "models:/ecg-r1-grpo/99",
                    "--cohort",
                    str(setup["cohort"]),
                    "--splits",
                    str(setup["splits"]),
                    "--images",
                    str(setup["images"]),
                    "--out",
                    str(tmp_path / "out"),
                    "--mlflow-root",
                    str(tmp_path),
                ]
            )

    def test_log_and_promote_leave_the_records_the_assets_leave(
        self, setup, tmp_path, monkeypatch, seed_mlflow_db, capsys
    ):
        """`evaluate --log` puts the metrics and answers on the registered version's run and writes
        registered.json; `promote` then makes the first version champion and records why."""
        import mlflow
        from ecg_r1.cli import main
        from ecg_r1.evaluation import registry
        from ecg_r1.tracking import model_registry
        from ecg_r1.tracking import runs as tracking

        seed_mlflow_db(tmp_path / "mlflow" / "mlflow.db")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
        monkeypatch.setenv("MLFLOW_REGISTRY_URI", "")
        previous = mlflow.get_tracking_uri()
        tracking.configure(tmp_path)
        try:
            with tracking.start_or_resume_run("tiny-test", "sft") as run:
                version = model_registry.register_model_version(
                    run.info.run_id, setup["model"], "ecg-r1-sft", profile=setup["profile"]
                )
            out = tmp_path / "out"
            common = ["--cohort", str(setup["cohort"]), "--splits", str(setup["splits"])]
            common += ["--images", str(setup["images"]), "--profile", str(setup["profile"])]
            assert (
                main(
                    ["evaluate", "--model", f"SFT=models:/ecg-r1-sft/{version}", *common, "--out", str(out)]
                    + ["--n-boot", "0", "--max-new-tokens", "2", "--log", "--mlflow-root", str(tmp_path)]
                )
                == 0
            )
            assert json.loads((out / registry.REGISTRY_FILE).read_text()) == {"SFT": f"ecg-r1-sft/{version}"}
            version_run = model_registry.version_run_id("ecg-r1-sft", version)
            metrics = mlflow.MlflowClient().get_run(version_run).data.metrics
            assert any(key.startswith("test_external") for key in metrics), sorted(metrics)
            artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(version_run, "evaluation")}
            assert registry.VERSION_PREDICTIONS in artifacts

            assert main(["promote", "--evaluation", str(out), "--mlflow-root", str(tmp_path)]) == 0
            assert "promoted" in capsys.readouterr().out
            assert model_registry.alias_version("ecg-r1-sft", "champion") == version
            (decision,) = json.loads((out / registry.PROMOTION_FILE).read_text())
            assert decision["model"] == "ecg-r1-sft" and decision["decision"] == "promoted"
        finally:
            mlflow.set_tracking_uri(previous)
            mlflow.set_registry_uri(previous)


@pytest.mark.slow  # predicts with trained models
class TestAblations:
    def test_what_each_ablation_shows_the_model(self, setup, monkeypatch):
        """The image ablation shows every case one flat-line page; the note ablation no note."""
        import ecg_r1.modeling.inference as inference

        shown: list[dict] = []

        def spy(model, processor, examples, **kwargs):
            shown.extend(examples)
            return ["<think></think><answer>No</answer>"] * len(examples), np.full(len(examples), 0.1)

        monkeypatch.setattr(inference, "generate_and_score", spy)
        cases = evaluation_cases(setup["cohort"], setup["splits"], setup["images"], ["test_external"])
        for ablation in (None, "image", "note"):
            shown.clear()
            preds, _ = predict_cases(setup["model"], setup["profile"], cases, ablation=ablation)
            assert len(shown) == cases.height and all(p is False for p in preds.y_pred)
            notes = [ex["note"] for ex in shown]
            pages = {ex["image"].tobytes() for ex in shown}
            if ablation == "note":
                assert notes == [None] * cases.height
            else:
                assert notes == cases["note"].to_list()
            if ablation == "image":
                assert len(pages) == 1
                page = np.asarray(next(ex["image"] for ex in shown))
                assert page.shape[:2] == (173, 224) and len(np.unique(page.reshape(-1, 3), axis=0)) > 1
            else:
                assert len(pages) == cases.height  # every case its own ECG

        # The English notes are other cases, not an input taken away: predict_models passes them.
        with pytest.raises(ValueError, match="english_note_cases"):
            predict_cases(setup["model"], setup["profile"], cases, ablation="english_note")

    def test_rows_and_self_pairs_for_every_model(self, setup, tmp_path):
        result = compare(
            setup,
            tmp_path,
            n_boot=N_BOOT,
            max_new_tokens=8,
            max_cases_per_split=3,
            n_case_figures=0,
            ablations=["image", "note"],
        )
        assert {"SFT", "SFT (no ECG)", "SFT (no note)"} <= set(result.results)
        assert "| SFT (no ECG) |" in result.table and "| SFT (no note) |" in result.table
        pairs = {(p.a, p.b) for p in result.paired}
        assert {("SFT", "SFT (no ECG)"), ("SFT", "SFT (no note)")} <= pairs
        assert result.files["predictions_sft_no_ecg"].is_file()

    def test_english_note_rows_answer_the_splits_with_notes_in_another_language(self, setup, tmp_path):
        splits = pl.read_parquet(setup["splits"])
        cohort = pl.read_parquet(setup["cohort"] / "cohort.parquet").join(
            splits.select("record_id", "split"), on="record_id"
        )
        # the external split's notes "in another language": their English version differs
        truth = cohort.select(
            "record_id",
            pl.lit(0.5).alias("posterior_ischemic"),
            pl.when(pl.col("split") == "test_external")
            .then(pl.lit("in English: ") + pl.col("note"))
            .otherwise(pl.col("note"))
            .alias("note_english"),
        )
        truth.write_parquet(tmp_path / "truth.parquet")
        result = compare(
            setup,
            tmp_path / "out",
            truth_path=tmp_path / "truth.parquet",
            n_boot=N_BOOT,
            max_new_tokens=8,
            max_cases_per_split=3,
            n_case_figures=0,
            ablations=["english_note"],
        )
        assert set(result.results["SFT (note in English)"]) == {"test_external"}
        assert set(result.results["SFT"]) == {"test_internal", "test_external"}
        assert ("SFT", "SFT (note in English)") in {(p.a, p.b) for p in result.paired}
        assert "| SFT (note in English) | cross-hospital |" in result.table
        with pytest.raises(ValueError, match="needs the simulator's truth.parquet"):
            compare(setup, tmp_path / "none", ablations=["english_note"])
        with pytest.raises(ValueError, match="no note_english column"):
            compare(setup, tmp_path / "old", truth_path=setup["truth"], ablations=["english_note"])

    def test_english_note_cases_replace_the_notes_of_whole_splits(self):
        from ecg_r1.evaluation.predictions import english_note_cases

        cases = pl.DataFrame(
            {
                "record_id": ["a", "b", "c", "d"],
                "split": ["test_internal", "test_internal", "test_external", "test_external"],
                "note": ["chest pain", None, "Brustschmerz", "Dyspnoe"],
                "note_english": ["chest pain", None, "chest pain", None],
            }
        )
        shown = english_note_cases(cases)
        assert shown["record_id"].to_list() == ["c", "d"]  # the split with a note in another language
        assert shown["note"].to_list() == ["chest pain", "Dyspnoe"]  # no English version: kept
        assert english_note_cases(cases.filter(pl.col("split") == "test_internal")).height == 0
        with pytest.raises(ValueError, match="note_english"):
            english_note_cases(cases.drop("note_english"))

    def test_unknown_ablation_is_refused(self, setup, tmp_path):
        with pytest.raises(ValueError, match="unknown ablations"):
            compare(
                setup,
                tmp_path,
                ablations=["ecg"],
            )


class TestWhatTheCohortAllows:
    def test_the_truth_counts_only_when_it_knows_every_split_record(self, tmp_path, caplog):
        from ecg_r1.evaluation.comparison import covering_truth

        splits = tmp_path / "splits.parquet"
        pl.DataFrame({"record_id": ["a", "b"]}).write_parquet(splits)
        truth = tmp_path / "truth.parquet"
        assert covering_truth(truth, splits) is None  # none written
        pl.DataFrame({"record_id": ["a", "b", "c"]}).write_parquet(truth)
        assert covering_truth(truth, splits) == truth
        pl.DataFrame({"record_id": ["a"]}).write_parquet(truth)  # the truth of another cohort
        with caplog.at_level("INFO", logger="ecg_r1.evaluation.comparison"):
            assert covering_truth(truth, splits) is None
        assert "no Bayes ceiling row" in caplog.text

    def test_note_in_english_rows_need_english_notes_in_the_truth(self, tmp_path):
        from ecg_r1.evaluation.cases import ENGLISH_NOTE_COLUMN
        from ecg_r1.evaluation.comparison import possible_ablations

        wanted = ["image", "note", "english_note"]
        assert possible_ablations(wanted, None) == ["image", "note"]
        plain = tmp_path / "plain.parquet"
        pl.DataFrame({"record_id": ["a"]}).write_parquet(plain)
        assert possible_ablations(wanted, plain) == ["image", "note"]
        english = tmp_path / "english.parquet"
        pl.DataFrame({"record_id": ["a"], ENGLISH_NOTE_COLUMN: ["chest pain"]}).write_parquet(english)
        assert possible_ablations(wanted, english) == wanted
