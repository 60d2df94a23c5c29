"""The model card (ecg_r1.evaluation.model_card) and the evaluation logged on each version's
LoggedModel by dataset (ecg_r1.evaluation.registry.log_comparison)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from mlflow_store import PROVENANCE, ROWS, build_logged_store

from ecg_r1.evaluation.evaluate import BinaryMetrics, evaluate_binary
from ecg_r1.evaluation.model_card import NOT_FOR_CLINICAL_USE, model_card
from ecg_r1.evaluation.report import MEASURED, REFERENCE
from ecg_r1.evaluation.results import Comparison, SplitCounts
from ecg_r1.modeling.profiles import load_profile

TAGS = {"stage": "grpo", "data_version": "abc123.dir", "git_commit": "f00d"}


def metrics(n_right: int, n: int, seed: int) -> BinaryMetrics:
    """Metrics of answers right on ``n_right`` of ``n`` cases (half of them ischemic)."""
    y = np.arange(n) % 2 == 0
    answers = y.copy()
    answers[n_right:] = ~answers[n_right:]
    return evaluate_binary(y, answers, np.where(answers, 0.8, 0.2), n_boot=50, seed=seed)


def comparison(profile: str = "tiny", simulated: bool = True) -> Comparison:
    """A comparison of one model (GRPO), its no-ECG row and two reference rows on both test splits."""
    cases = pl.DataFrame(
        {
            "record_id": ["a", "b", "c", "d"],
            "split": ["test_internal", "test_internal", "test_external", "test_external"],
            "hospital": ["H1", "H1", "H2", "H2"],
            "label": ["ischemic", "non-ischemic", "ischemic", "non-ischemic"],
        }
    )
    results = {
        "GRPO": {"test_internal": metrics(18, 20, 0), "test_external": metrics(11, 20, 1)},
        "GRPO (no ECG)": {"test_internal": metrics(12, 20, 2), "test_external": metrics(10, 20, 3)},
        "Majority class": {"test_internal": metrics(10, 20, 4), "test_external": metrics(10, 20, 5)},
        "Feature baseline (gradient boosting)": {"test_internal": metrics(16, 20, 6)},
    }
    kinds = {"GRPO": MEASURED, "GRPO (no ECG)": MEASURED}
    kinds |= {"Majority class": REFERENCE, "Feature baseline (gradient boosting)": REFERENCE}
    return Comparison(
        out_dir=Path("unused"),
        table="",
        models={"GRPO": Path("model")},
        stages={"GRPO": None},
        results=results,
        kinds=kinds,
        per_hospital={"GRPO": {"H1": metrics(18, 20, 7), "H2": metrics(11, 20, 8)}},
        paired=[],
        predictions={},
        cases=cases,
        ablated={"GRPO (no ECG)": ("GRPO", "image")},
        data_splits={
            "train": SplitCounts(140, 63, ("H1",)),
            "test_internal": SplitCounts(20, 10, ("H1",)),
            "test_external": SplitCounts(20, 10, ("H2",)),
        },
        profile=load_profile(profile),
        simulated=simulated,
    )


class TestModelCard:
    def test_the_card_holds_every_figure_with_n_and_intervals(self):
        result = comparison()
        card = model_card(result, "GRPO", "ecg-r1-grpo", 3, TAGS, "beef.dir")
        assert card.startswith("# Model card: ecg-r1-grpo version 3 (GRPO)")
        assert NOT_FOR_CLINICAL_USE in card and "must not be used to diagnose" in card
        for title, split in (("internal test", "test_internal"), ("cross-hospital", "test_external")):
            m = result.results["GRPO"][split]
            assert f"| {title} | 20 | {m.accuracy} | {m.sensitivity} | {m.specificity} | {m.auroc} |" in card
            ablated = result.results["GRPO (no ECG)"][split]
            assert f"| no ECG, {title} | 20 | {ablated.accuracy} |" in card
            assert (
                f"| Majority class, {title} | 20 | {result.results['Majority class'][split].accuracy} |"
                in card
            )
        assert f"| H2 | 20 | {result.per_hospital['GRPO']['H2'].accuracy} |" in card
        assert "| Feature baseline (gradient boosting), internal test | 20 |" in card
        assert "| train | 140 | 63 (45%) | H1 |" in card
        assert "`abc123.dir`" in card and "`beef.dir`" in card and "`f00d`" in card
        assert "trained by ECG-R1's `grpo` stage" in card
        # A description cut to the registry's 5,000 characters loses reference rows, not limitations.
        assert card.index("## Limitations") < card.index("## Performance") < card.index("## Reference rows")

    def test_limitations_name_simulated_data_the_cpu_model_and_no_reasoning(self):
        card = model_card(comparison(), "GRPO", "ecg-r1-grpo", 1, TAGS, "beef.dir")
        limitations = card.split("## Limitations")[1].split("\n## ")[0]
        assert "simulated ECGs" in limitations
        assert "CPU-sized model (profile `tiny`)" in limitations
        assert "No reasoning" in limitations and "answer-only" in limitations
        external = comparison().results["GRPO"]["test_external"].accuracy
        assert f"(cross-hospital, n = 20) its accuracy is {external}" in limitations

    def test_a_pretrained_model_with_rationales_on_real_records_has_none_of_those(self):
        card = model_card(comparison("qwen2-vl-2b", simulated=False), "GRPO", "ecg-r1-grpo", 1, TAGS, "x")
        limitations = card.split("## Limitations")[1].split("\n## ")[0]
        assert "simulated" not in limitations
        assert "CPU-sized" not in limitations and "No reasoning" not in limitations
        assert "ecg_r1/configs/labels.yaml" in card  # the label rules of ingested records

    def test_an_unknown_row_is_refused(self):
        with pytest.raises(KeyError, match="not a row"):
            model_card(comparison(), "SFT", "ecg-r1-sft", 1, TAGS, "x")


class TestModelMetrics:
    def test_each_split_holds_its_metrics_its_hospitals_and_the_ablation_rows(self):
        logged = comparison().model_metrics("GRPO")
        assert set(logged) == {"test_internal", "test_external"}
        external = logged["test_external"]
        assert external["test_external/accuracy"] == pytest.approx(11 / 20)
        for key in ("accuracy", "auroc", "sensitivity", "specificity"):
            assert {f"test_external/{key}_low", f"test_external/{key}_high"} <= set(external)
        assert external["test_external/n"] == 20
        # H2's cases are all in test_external: its figures are measured on that dataset.
        assert "hospital/h2/accuracy" in external and "hospital/h2/accuracy" not in logged["test_internal"]
        assert external["no_ecg/test_external/accuracy"] == pytest.approx(10 / 20)
        assert not any(k.startswith("test_internal/") for k in external)


@pytest.fixture(scope="module")
def logged(tmp_path_factory, seed_mlflow_db):
    import mlflow

    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        yield build_logged_store(tmp_path_factory.mktemp("logged"), seed_mlflow_db)
        mlflow.set_tracking_uri(previous)


@pytest.mark.slow  # registers, compares and logs two tiny models (~25 s)
class TestLoggedEvaluation:
    def test_search_logged_models_returns_both_models_with_test_metrics_per_dataset(self, logged):
        import mlflow
        from ecg_r1.evaluation.registry import evaluation_datasets
        from ecg_r1.tracking import model_registry

        experiment = mlflow.get_experiment_by_name(logged.experiment).experiment_id
        found = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
        assert len(found) == 2
        digests = {split: d.digest for split, d in evaluation_datasets(logged.comparison).items()}
        for row, (_, name) in ROWS.items():
            version = mlflow.MlflowClient().get_model_version(name, "1")
            model = next(m for m in found if m.model_id == model_registry.logged_model_id(version))
            by_key = {(m.key, m.dataset_name): m for m in model.metrics}
            for split, digest in digests.items():
                m = logged.comparison.results[row][split]
                accuracy = by_key[(f"{split}/accuracy", split)]
                assert accuracy.value == pytest.approx(m.accuracy.value)
                assert accuracy.dataset_digest == digest
                assert by_key[(f"{split}/accuracy_low", split)].value == pytest.approx(m.accuracy.low)
                assert (f"no_ecg/{split}/accuracy", split) in by_key
            assert ("hospital/h2/accuracy", "test_external") in by_key
            # The registry's version comparison compares runs: the run has them too, no tag copies.
            assert "test_external/accuracy" in mlflow.get_run(version.run_id).data.metrics
            assert not any(k.startswith("metric.") for k in version.tags)
            assert version.tags["evaluation.data_version"] == PROVENANCE["data_version"]

    def test_sorting_by_the_held_out_hospitals_accuracy_puts_the_better_model_first(self, logged):
        import mlflow
        from ecg_r1.tracking import model_registry

        results = logged.comparison.results
        assert (
            results["GRPO"]["test_external"].accuracy.value > results["SFT"]["test_external"].accuracy.value
        )
        experiment = mlflow.get_experiment_by_name(logged.experiment).experiment_id
        ranked = mlflow.search_logged_models(
            experiment_ids=[experiment],
            order_by=[{"field_name": "metrics.test_external/accuracy", "ascending": False}],
            output_format="list",
        )
        grpo = mlflow.MlflowClient().get_model_version("ecg-r1-grpo", "1")
        assert ranked[0].model_id == model_registry.logged_model_id(grpo)

    def test_each_version_describes_itself_with_its_card_also_in_its_artifacts(self, logged):
        import mlflow
        from ecg_r1.tracking import model_registry

        client = mlflow.MlflowClient()
        for row, (_, name) in ROWS.items():
            version = client.get_model_version(name, "1")
            card = model_card(logged.comparison, row, name, 1, version.tags, PROVENANCE["data_version"])
            assert version.description == card
            model = client.get_logged_model(model_registry.logged_model_id(version))
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{model.artifact_location}/{model_registry.MODEL_CARD_FILE}"
            )
            assert Path(local).read_text() == card

    def test_where_prints_each_versions_cross_hospital_accuracy(self, logged, capsys):
        from ecg_r1.cli import main

        assert main(["where", "--root", str(logged.root)]) == 0
        out = capsys.readouterr().out
        accuracy = logged.comparison.results["GRPO"]["test_external"].accuracy.value
        assert f"cross-hospital accuracy {accuracy:.3f}" in out
