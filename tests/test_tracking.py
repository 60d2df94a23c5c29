"""MLflow helpers against a temporary SQLite store: experiments, resumed runs, params, the registry."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

mlflow = pytest.importorskip("mlflow")

from ecg_r1.tracking import model_registry  # noqa: E402
from ecg_r1.tracking import runs as tracking  # noqa: E402


@pytest.fixture
def model_dir(tmp_path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    return folder


class TestTrackingUri:
    def test_is_sqlite_under_mlflow_with_artifacts_beside(self, tmp_path):
        uri = tracking.tracking_uri(tmp_path)
        assert uri == f"sqlite:///{(tmp_path / 'mlflow' / 'mlflow.db').resolve()}"
        assert (tmp_path / "mlflow" / "artifacts").is_dir()
        assert tracking.artifact_root_for(uri) == (tmp_path / "mlflow" / "artifacts").resolve()


class TestExperimentFor:
    def test_one_experiment_per_profile_reused(self, store):
        root, _ = store
        first = tracking.experiment_for("tiny")
        assert tracking.experiment_for("tiny") == first
        assert tracking.experiment_for("qwen2-vl-2b") != first
        experiment = mlflow.get_experiment(first)
        assert experiment.name == "ecg-r1-tiny"
        assert experiment.artifact_location.startswith((root / "mlflow" / "artifacts").resolve().as_uri())

    def test_experiments_open_in_the_model_training_view(self, store):
        experiment = mlflow.get_experiment(tracking.experiment_for("kind-new"))
        assert experiment.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
        # An experiment made before the tag existed (the MLflow UI shows it as GenAI) gets it.
        old = mlflow.MlflowClient().create_experiment(tracking.experiment_name("kind-old"))
        assert tracking.EXPERIMENT_KIND_TAG not in mlflow.get_experiment(old).tags
        assert tracking.experiment_for("kind-old") == old
        assert mlflow.get_experiment(old).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


class TestSplitInputs:
    def test_each_split_is_a_dataset_with_the_data_version_as_digest(self, store, tmp_path):
        import polars as pl

        splits = tmp_path / "splits.parquet"
        pl.DataFrame(
            {
                "record_id": ["r1", "r2", "r3", "r4"],
                "patient_id": ["p1", "p2", "p3", "p4"],
                "hospital": ["a", "b", "a", "d"],
                "label": ["ischemic", "non-ischemic", "ischemic", "non-ischemic"],
                "split": ["train", "train", "test_internal", "test_external"],
            }
        ).write_parquet(splits)
        with tracking.start_or_resume_run("inputs", "run") as run:
            names = tracking.log_split_inputs(splits, "0123456789abcdef0123456789abcdef.dir")
        assert names == ["ecg-r1-test_external", "ecg-r1-test_internal", "ecg-r1-train"]
        inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
        found = {}
        for item in inputs:
            tags = {t.key: t.value for t in item.tags}
            found[item.dataset.name] = (item.dataset.digest, tags["mlflow.data.context"], tags["hospital"])
        assert found["ecg-r1-train"] == ("0123456789abcdef0123456789abcdef", "train", "a,b")
        assert found["ecg-r1-test_external"][1:] == ("test_external", "d")
        train = next(i.dataset for i in inputs if i.dataset.name == "ecg-r1-train")
        assert json.loads(train.profile)["num_rows"] == 2

    def test_outside_a_run_it_says_so(self, store, tmp_path):
        with pytest.raises(ValueError, match="no active MLflow run"):
            tracking.log_split_inputs(tmp_path / "splits.parquet", "untracked")


class TestStartOrResumeRun:
    def test_resume_logs_to_the_same_run(self, store, tmp_path):
        with tracking.start_or_resume_run("tiny", "sft", state_dir=tmp_path) as run:
            run_id = run.info.run_id
            mlflow.log_metric("loss", 2.0, step=1)
        assert (tmp_path / tracking.RUN_ID_FILE).read_text() == run_id
        with tracking.start_or_resume_run("tiny", "sft", state_dir=tmp_path) as resumed:
            assert resumed.info.run_id == run_id
            mlflow.log_metric("loss", 1.0, step=2)
        history = mlflow.MlflowClient().get_metric_history(run_id, "loss")
        assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 1.0)]
        assert mlflow.get_run(run_id).info.status == "FINISHED"

    def test_without_state_a_new_run_starts(self, store, tmp_path):
        with tracking.start_or_resume_run("tiny", "a") as one:
            pass
        with tracking.start_or_resume_run("tiny", "a") as two:
            pass
        assert one.info.run_id != two.info.run_id

    def test_exception_marks_the_run_failed(self, store, tmp_path):
        with (
            pytest.raises(RuntimeError),
            tracking.start_or_resume_run("tiny", "x", state_dir=tmp_path) as run,
        ):
            raise RuntimeError("boom")
        assert mlflow.get_run(run.info.run_id).info.status == "FAILED"

    def test_run_of_another_profile_is_refused(self, store, tmp_path):
        with tracking.start_or_resume_run("tiny", "x", state_dir=tmp_path):
            pass
        with (
            pytest.raises(ValueError, match="belongs to experiment"),
            tracking.start_or_resume_run("qwen2-vl-2b", "x", state_dir=tmp_path),
        ):
            pass


class TestLogParamsFlat:
    def test_flattens_nested_params(self, store):
        params = {
            "profile": {"name": "tiny", "sft": {"learning_rate": 0.001}},
            "seed": 7,
            "leads": ["I", "V1"],
        }
        with tracking.start_or_resume_run("tiny", "p") as run:
            flat = tracking.log_params_flat(params, prefix="ecg_r1.")
        logged = mlflow.get_run(run.info.run_id).data.params
        assert logged["ecg_r1.profile.sft.learning_rate"] == "0.001"
        assert logged["ecg_r1.seed"] == "7"
        assert logged["ecg_r1.leads"] == '["I", "V1"]'
        assert flat == {k: v for k, v in logged.items() if k.startswith("ecg_r1.")}

    def test_same_values_on_resume_are_accepted_changed_ones_refused(self, store, tmp_path):
        with tracking.start_or_resume_run("tiny", "p", state_dir=tmp_path):
            tracking.log_params_flat({"lr": 0.1, "seed": 1})
        with tracking.start_or_resume_run("tiny", "p", state_dir=tmp_path):
            tracking.log_params_flat({"lr": 0.1, "seed": 1, "new": "x"})
            with pytest.raises(ValueError, match="different values"):
                tracking.log_params_flat({"lr": 0.2})

    def test_long_values_are_truncated_not_refused(self):
        flat = tracking.flatten_params({"note": "x" * 10_000})
        assert len(flat["note"]) == 6000 and flat["note"].endswith("[truncated]")

    def test_without_a_run_it_says_so(self, store):
        with pytest.raises(ValueError, match="no active MLflow run"):
            tracking.log_params_flat({"a": 1})


class TestRegistry:
    def test_versions_aliases_and_loading(self, store, model_dir, tmp_path):
        with tracking.start_or_resume_run("tiny", "sft") as run:
            first = model_registry.register_model_version(
                run.info.run_id, model_dir, "ecg-r1-sft", tags={"data_version": "abc", "profile": "tiny"}
            )
        (model_dir / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "v": 2}))
        with tracking.start_or_resume_run("tiny", "sft") as run2:
            second = model_registry.register_model_version(run2.info.run_id, model_dir, "ecg-r1-sft")
        assert second == first + 1
        version = mlflow.MlflowClient().get_model_version("ecg-r1-sft", str(first))
        assert version.tags == {"data_version": "abc", "profile": "tiny"}
        assert version.run_id == run.info.run_id

        model_registry.set_alias("ecg-r1-sft", "champion", first)
        by_alias = model_registry.load_registered("models:/ecg-r1-sft@champion", dst=tmp_path / "a")
        by_number = model_registry.load_registered(f"models:/ecg-r1-sft/{second}", dst=tmp_path / "b")
        assert json.loads((by_alias / "config.json").read_text()) == {"model_type": "qwen2_vl"}
        assert json.loads((by_number / "config.json").read_text())["v"] == 2
        assert (by_alias / "model.safetensors").stat().st_size == 64
        assert model_registry.resolve_version("ecg-r1-sft@champion") == ("ecg-r1-sft", first)

    def test_default_destination_is_a_reused_cache(self, store, model_dir):
        with tracking.start_or_resume_run("tiny", "grpo") as run:
            number = model_registry.register_model_version(run.info.run_id, model_dir, "ecg-r1-grpo")
        root, _ = store
        first = model_registry.load_registered(f"models:/ecg-r1-grpo/{number}")
        assert first.is_relative_to((root / "mlflow" / "cache" / "ecg-r1-grpo" / str(number)).resolve())
        assert (first / "config.json").is_file()
        (first / "marker").write_text("kept")  # a second call reuses the folder, no new download
        assert model_registry.load_registered(f"models:/ecg-r1-grpo/{number}") == first
        assert (first / "marker").is_file()

    def test_unknown_version_or_alias_is_a_clear_error(self, store, model_dir):
        with tracking.start_or_resume_run("tiny", "sft") as run:
            model_registry.register_model_version(run.info.run_id, model_dir, "ecg-r1-sft")
        with pytest.raises(ValueError, match="not in the registry"):
            model_registry.load_registered("models:/ecg-r1-sft/999")
        with pytest.raises(ValueError, match="not in the registry"):
            model_registry.load_registered("models:/ecg-r1-sft@nobody")

    def test_version_stored_outside_the_store_is_refused(self, store, model_dir, tmp_path):
        """A registry entry may point anywhere; models load only from the store's own artifacts."""
        client = mlflow.MlflowClient()
        elsewhere = client.create_experiment("elsewhere", artifact_location=(tmp_path / "x").as_uri())
        run = client.create_run(elsewhere)
        number = model_registry.register_model_version(run.info.run_id, model_dir, "ecg-r1-elsewhere")
        with pytest.raises(ValueError, match="outside this store's artifacts"):
            model_registry.load_registered(f"models:/ecg-r1-elsewhere/{number}", dst=tmp_path / "dst")
        assert not (tmp_path / "dst" / "config.json").exists()

    @pytest.mark.parametrize("uri", ["models:/ecg-r1-sft", "ecg-r1-sft/latest", "models:/@x"])
    def test_malformed_uri_is_refused(self, uri):
        with pytest.raises(ValueError, match="cannot read model URI"):
            model_registry.resolve_version(uri)

    def test_a_folder_without_a_model_is_refused(self, store, tmp_path):
        with (
            tracking.start_or_resume_run("tiny", "x") as run,
            pytest.raises(ValueError, match="not a model folder"),
        ):
            model_registry.register_model_version(run.info.run_id, tmp_path, "ecg-r1-sft")


class TestVersionEvaluation:
    def test_metrics_land_on_the_logged_model_by_dataset_and_on_the_version_run(self, store, model_dir):
        import pandas as pd

        with tracking.start_or_resume_run("tiny", "grpo") as run:
            version = model_registry.register_model_version(run.info.run_id, model_dir, "ecg-r1-eval")
        dataset = mlflow.data.from_pandas(pd.DataFrame({"record_id": ["a"], "label": ["x"]}), name="external")
        run_id = model_registry.log_version_metrics(
            "ecg-r1-eval", version, {"external/accuracy": 0.71, "external/auroc": float("nan")}, dataset
        )
        assert run_id == run.info.run_id
        assert mlflow.get_run(run_id).data.metrics == {"external/accuracy": 0.71}  # NaN skipped, not 0
        found = mlflow.MlflowClient().get_model_version("ecg-r1-eval", str(version))
        model = mlflow.MlflowClient().get_logged_model(model_registry.logged_model_id(found))
        assert [(m.key, m.value, m.dataset_name, m.dataset_digest) for m in model.metrics] == [
            ("external/accuracy", 0.71, "external", dataset.digest)
        ]
        assert not found.tags.get("metric.external/accuracy")  # one source: the logged model

    def test_the_card_is_the_description_and_an_artifact_of_the_logged_model(self, store, model_dir):
        with tracking.start_or_resume_run("tiny", "grpo") as run:
            version = model_registry.register_model_version(run.info.run_id, model_dir, "ecg-r1-card")
        model_registry.set_model_card("ecg-r1-card", version, "# Card\n\nresearch use")
        client = mlflow.MlflowClient()
        found = client.get_model_version("ecg-r1-card", str(version))
        assert found.description == "# Card\n\nresearch use"
        model_id = model_registry.logged_model_id(found)
        assert model_registry.MODEL_CARD_FILE in {
            a.path for a in client.list_logged_model_artifacts(model_id)
        }

    def test_a_card_longer_than_the_description_column_is_cut_at_a_section(self, store, model_dir):
        with tracking.start_or_resume_run("tiny", "grpo") as run:
            version = model_registry.register_model_version(run.info.run_id, model_dir, "ecg-r1-long")
        card = "# Card\n\n## Performance\n\n" + "x" * 3000 + "\n\n## Limitations\n\n" + "y" * 3000 + "\n"
        model_registry.set_model_card("ecg-r1-long", version, card)
        description = mlflow.MlflowClient().get_model_version("ecg-r1-long", str(version)).description
        assert len(description) <= model_registry.MAX_DESCRIPTION_CHARS
        assert "x" * 3000 in description and "## Limitations" not in description
        assert model_registry.MODEL_CARD_FILE in description

    def test_a_version_from_run_artifacts_has_no_logged_model(self):
        assert model_registry.logged_model_id(SimpleNamespace(source="runs:/abc/model")) is None
        assert model_registry.logged_model_id(SimpleNamespace(source="models:/m-12ab")) == "m-12ab"
        assert model_registry.logged_model_id(SimpleNamespace(source="models:/ecg-r1-sft/1")) is None

    def test_alias_version_is_none_until_set(self, store, model_dir):
        assert model_registry.alias_version("ecg-r1-none", "champion") is None
        with tracking.start_or_resume_run("tiny", "grpo") as run:
            version = model_registry.register_model_version(run.info.run_id, model_dir, "ecg-r1-alias")
        assert model_registry.alias_version("ecg-r1-alias", "champion") is None
        model_registry.set_alias("ecg-r1-alias", "champion", version)
        assert model_registry.alias_version("ecg-r1-alias", "champion") == version

    def test_unknown_version_is_a_clear_error(self, store):
        with pytest.raises(ValueError, match="not in the registry"):
            model_registry.version_run_id("ecg-r1-alias", 99)


class TestProvenance:
    def test_dvc_file_gives_the_data_version(self, tmp_path):
        (tmp_path / "data.dvc").write_text("outs:\n- md5: 0123abcd.dir\n  path: data\n")
        assert tracking.run_context(tmp_path)["data_version"] == "0123abcd.dir"

    def test_dvc_lock_outputs_give_a_data_version(self, tmp_path):
        lock = (
            "stages:\n  s:\n    outs:\n    - path: data/a\n      md5: aa\n    - path: other\n      md5: bb\n"
        )
        (tmp_path / "dvc.lock").write_text(lock)
        version = tracking.run_context(tmp_path)["data_version"]
        assert len(version) == 32 and version == tracking.run_context(tmp_path)["data_version"]
        (tmp_path / "dvc.lock").write_text(lock.replace("md5: aa", "md5: ab"))
        assert tracking.run_context(tmp_path)["data_version"] != version

    def test_untracked_data_and_no_git_say_so(self, tmp_path):
        assert tracking.run_context(tmp_path) == {"git_commit": "unknown", "data_version": "untracked"}


class TestCompletionsTable:
    def test_logs_a_table_artifact(self, store):
        rows = [{"prompt": "p", "completion": "<think></think><answer>Yes</answer>", "reward": 1.0}]
        with tracking.start_or_resume_run("tiny", "t") as run:
            tracking.log_completions_table(rows, "samples/step_1.json")
        artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "samples")]
        assert artifacts == ["samples/step_1.json"]
