"""The data layer as Dagster assets: materialization, metadata, and blocking checks."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from test_validate import write_cohort

import ecg_r1.data.split
from dagster_project.defs import asset_checks
from dagster_project.defs.assets.data_assets import cohort_splits, raw_cohort, simulated_raw, validated_cohort
from dagster_project.defs.resources import REPO_ROOT, DataLayout, DvcResource
from ecg_r1.data.validate import validate_cohort_dir
from ecg_r1.tracking.versioning import DvcError, data_version, dvc_executable, git_commit

CHECKS = [
    asset_checks.check_ingest_accounts_for_every_record,
    asset_checks.check_validation_not_fatal,
    asset_checks.check_validated_records_accounted,
    asset_checks.check_no_patient_in_two_splits,
    asset_checks.check_held_out_hospital_not_in_training,
    asset_checks.check_every_split_has_both_labels,
]


def resources(home: Path, track: bool = False) -> dict:
    return {"layout": DataLayout(home=str(home)), "dvc": DvcResource(home=str(home), track=track)}


def materialization(result: dg.ExecuteInProcessResult, key: str) -> dict:
    events = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey(key)]
    assert events, f"{key} was not materialized"
    return events[-1].materialization.metadata


def check_outcomes(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {e.check_name: e.passed for e in result.get_asset_check_evaluations()}


@pytest.fixture(scope="module")
def validated_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project home holding a cohort that passes validation (hospitals a, b, c).

    Shared by the split tests: each run rewrites data/splits, and none changes the cohort.
    """
    home = tmp_path_factory.mktemp("home")
    cohort_dir = home / "data" / "cohort"
    cohort_dir.mkdir(parents=True)
    write_cohort(cohort_dir, n=90)
    assert not validate_cohort_dir(cohort_dir).fatal
    return home


# Downstream assets standing in for the image and model assets a blocking check must stop.
@dg.asset(deps=[cohort_splits])
def downstream_probe() -> None:
    pass


@dg.asset(deps=[validated_cohort])
def validated_probe() -> None:
    pass


@pytest.mark.slow  # materializes the simulated data chain
class TestDataChain:
    def test_simulated_chain_materializes_with_metadata(self, tmp_path):
        run_config = {
            "ops": {
                "simulated_raw": {"config": {"n": 80, "hospitals": 4, "seed": 3}},
                "raw_cohort": {"config": {"workers": 1}},
                "cohort_splits": {"config": {"held_out_hospitals": ["hospital_d"], "seed": 1}},
            }
        }
        result = dg.materialize(
            [simulated_raw, raw_cohort, validated_cohort, cohort_splits, *CHECKS],
            resources=resources(tmp_path),
            run_config=run_config,
        )
        assert result.success
        outcomes = check_outcomes(result)
        assert len(outcomes) == len(CHECKS) and all(outcomes.values()), outcomes

        sim = materialization(result, "simulated_raw")
        assert sim["n"].value == 80
        assert 0.5 < sim["bayes_accuracy"].value <= 1.0
        assert "hospital_d" in sim["cases_per_hospital"].value

        raw = materialization(result, "raw_cohort")
        assert raw["records_in"].value == 80 == raw["loaded"].value + raw["quarantined"].value
        assert "| hospital_a |" in raw["counts_by_hospital_and_label"].value

        validated = materialization(result, "validated_cohort")
        assert validated["fatal"].value is False
        assert validated["passed"].value + validated["quarantined"].value == raw["loaded"].value
        assert "| schema |" in validated["validation"].value

        splits = materialization(result, "cohort_splits")
        cohort = pl.read_parquet(tmp_path / "data" / "cohort" / "validated.parquet")
        assert (
            splits["test_external_records"].value == cohort.filter(pl.col("hospital") == "hospital_d").height
        )
        assert splits["train_records"].value > splits["val_records"].value > 0
        manifest = pl.read_parquet(tmp_path / "data" / "splits" / "splits.parquet")
        assert set(manifest.filter(pl.col("split") == "test_external").get_column("hospital")) == {
            "hospital_d"
        }

        assert splits["data_version"].value == "untracked"  # DVC tracking off here; see the test below

    def test_data_version_and_commit_are_attached(self, validated_home, tmp_path):
        if shutil.which("git") is None:
            pytest.skip("git is not installed")
        try:
            dvc_executable()
        except DvcError as error:
            pytest.skip(str(error))
        home = tmp_path / "home"
        shutil.copytree(validated_home, home)
        subprocess.run(["git", "init", "-q"], cwd=home, check=True)
        result = dg.materialize(
            [cohort_splits],
            resources=resources(home, track=True),
            run_config={"ops": {"cohort_splits": {"config": {"held_out_hospitals": ["hospital_c"]}}}},
        )
        metadata = materialization(result, "cohort_splits")
        assert metadata["data_version"].value == data_version(home)
        assert metadata["data_version"].value.endswith(".dir")
        assert metadata["git_commit"].value == (git_commit(REPO_ROOT) or "unknown")  # the code's commit
        assert any((home / ".dvc-storage").rglob("*")), "the version was not pushed to the local remote"

    def test_bring_your_own_data_path_without_simulator(self, tmp_path):
        """raw_cohort ingests configured sources (here a manifest export) when simulated_raw is not run."""
        export = tmp_path / "export"
        from ecg_r1.simulate import simulate_cohort

        simulate_cohort(export, n=12, hospitals=2, seed=5)
        result = dg.materialize(
            [raw_cohort],
            resources=resources(tmp_path),
            run_config={"ops": {"raw_cohort": {"config": {"source_paths": ["export"], "workers": 1}}}},
        )
        assert result.success
        assert materialization(result, "raw_cohort")["records_in"].value == 12
        assert not (tmp_path / "data" / "raw" / "simulated").exists()

    def test_missing_source_is_a_clear_failure(self, tmp_path):
        result = dg.materialize(
            [raw_cohort],
            resources=resources(tmp_path),
            run_config={"ops": {"raw_cohort": {"config": {"source_paths": ["nowhere"]}}}},
            raise_on_error=False,
        )
        assert not result.success
        failure = result.get_step_failure_events()[0].step_failure_data.error.message
        assert "nowhere" in failure and "source_paths" in failure


class TestBlockingChecks:
    def test_fatal_validation_blocks_downstream(self, tmp_path):
        cohort_dir = tmp_path / "data" / "cohort"
        cohort_dir.mkdir(parents=True)

        def duplicate(i, row, signal):
            if i == 3:
                row["record_id"] = "sim/0002"
            return signal

        write_cohort(cohort_dir, n=30, edit=duplicate)
        result = dg.materialize(
            [validated_cohort, validated_probe, asset_checks.check_validation_not_fatal],
            resources=resources(tmp_path),
            raise_on_error=False,
        )
        assert check_outcomes(result) == {"check_validation_not_fatal": False}
        metadata = materialization(result, "validated_cohort")  # the report still reaches the UI
        assert metadata["fatal"].value is True and "duplicate_record_id" in metadata["fatal_reasons"].value
        materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
        assert "validated_probe" not in materialized

    def test_patient_in_two_splits_fails_and_blocks(self, validated_home, monkeypatch):
        real = ecg_r1.data.split.split_cohort

        def leaky(*args, **kwargs):
            splits = real(*args, **kwargs)
            # give a validation record the patient of a training record
            patient = splits.filter(pl.col("split") == "train").get_column("patient_id")[0]
            record = splits.filter(pl.col("split") == "val").get_column("record_id")[0]
            return splits.with_columns(
                pl.when(pl.col("record_id") == record)
                .then(pl.lit(patient))
                .otherwise("patient_id")
                .alias("patient_id")
            )

        monkeypatch.setattr(ecg_r1.data.split, "split_cohort", leaky)
        result = self._run_splits(validated_home)
        outcomes = check_outcomes(result)
        assert outcomes["check_no_patient_in_two_splits"] is False
        assert outcomes["check_held_out_hospital_not_in_training"] is True
        self._assert_probe_blocked(result)

    def test_leaked_held_out_hospital_fails_and_blocks(self, validated_home, monkeypatch):
        real = ecg_r1.data.split.split_cohort

        def leaky(*args, **kwargs):
            splits = real(*args, **kwargs)
            external = splits.filter(pl.col("split") == "test_external")
            moved = set(external.get_column("patient_id").head(2))
            return splits.with_columns(
                pl.when(pl.col("patient_id").is_in(moved))
                .then(pl.lit("train"))
                .otherwise("split")
                .alias("split")
            )

        monkeypatch.setattr(ecg_r1.data.split, "split_cohort", leaky)
        result = self._run_splits(validated_home)
        outcomes = check_outcomes(result)
        assert outcomes["check_held_out_hospital_not_in_training"] is False
        assert outcomes["check_no_patient_in_two_splits"] is True
        self._assert_probe_blocked(result)

    def test_sound_split_lets_downstream_run(self, validated_home):
        result = self._run_splits(validated_home)
        assert result.success
        assert all(check_outcomes(result).values())
        materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
        assert "downstream_probe" in materialized

    def test_held_out_hospital_missing_from_cohort_fails_the_asset(self, validated_home):
        result = self._run_splits(validated_home, held_out=["hospital_z"])
        assert not result.success
        message = result.get_step_failure_events()[0].step_failure_data.error.message
        assert "hospital_z" in message and "not in the cohort" in message

    @staticmethod
    def _run_splits(home: Path, held_out: list[str] | None = None) -> dg.ExecuteInProcessResult:
        return dg.materialize(
            [
                cohort_splits,
                downstream_probe,
                asset_checks.check_no_patient_in_two_splits,
                asset_checks.check_held_out_hospital_not_in_training,
            ],
            resources=resources(home),
            run_config={
                "ops": {"cohort_splits": {"config": {"held_out_hospitals": held_out or ["hospital_c"]}}}
            },
            raise_on_error=False,
        )

    @staticmethod
    def _assert_probe_blocked(result: dg.ExecuteInProcessResult) -> None:
        materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
        assert "cohort_splits" in materialized
        assert "downstream_probe" not in materialized, "a failed blocking check let a downstream asset run"


class TestDefinitions:
    def test_definitions_load_everything_in_defs(self):
        from dagster_project.definitions import defs

        loaded = defs()
        keys = {k.to_user_string() for k in loaded.resolve_all_asset_keys()}
        assert {"simulated_raw", "raw_cohort", "validated_cohort", "cohort_splits"} <= keys
        assert {"layout", "dvc"} <= set(loaded.resources)
        graph = loaded.resolve_asset_graph()
        checks = {key.name for key in graph.asset_check_keys}
        assert {"check_validation_not_fatal", "check_no_patient_in_two_splits"} <= checks
        data_job = loaded.resolve_job_def("data_job")
        assert {"simulated_raw", "cohort_splits"} <= {n.name for n in data_job.nodes}
        ingest_job = loaded.resolve_job_def("ingest_job")
        assert "simulated_raw" not in {n.name for n in ingest_job.nodes}
        assert "raw_cohort" in {n.name for n in ingest_job.nodes}

    def test_layout_defaults_to_env_home(self, monkeypatch, tmp_path):
        monkeypatch.setenv("ECG_R1_HOME", str(tmp_path))
        layout = DataLayout()
        assert layout.cohort == tmp_path.resolve() / "data" / "cohort"
        assert DataLayout(home=str(tmp_path), splits_dir="/abs/splits").splits == Path("/abs/splits")
