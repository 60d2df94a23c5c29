"""Executor selection and queue routing of the Dagster jobs (no services needed)."""

from __future__ import annotations

import importlib

import dagster as dg
import pytest

from dagster_project.defs import executors

GPU_STEPS = {
    "base_model",
    "vision_pretrained_model",
    "format_warmup_model",
    "sft_model",
    "grpo_model",
    "grpo_after_warmup_model",
    "model_comparison",
    "model_promotion",
}
DEFAULT_STEPS = {
    "simulated_raw",
    "raw_cohort",
    "validated_cohort",
    "cohort_splits",
    "ecg_images",
    "reference_baselines",
    "real_record_cohort",
}


def all_assets() -> dict[str, dg.AssetsDefinition]:
    from dagster_project.definitions import defs

    assets = {}
    for asset in defs().assets or []:
        if isinstance(asset, dg.AssetsDefinition) and asset.is_executable:
            for key in asset.keys:
                assets[key.path[-1]] = asset
    return assets


class TestCeleryIsSelected:
    def test_unset_keeps_each_jobs_own_executor(self, monkeypatch):
        monkeypatch.delenv(executors.EXECUTOR_ENV, raising=False)
        assert not executors.celery_selected()
        assert executors.job_executor(dg.in_process_executor) is dg.in_process_executor
        assert executors.job_executor(None) is None

    def test_celery_gives_the_configured_celery_executor(self, monkeypatch):
        pytest.importorskip("dagster_celery")
        monkeypatch.setenv(executors.EXECUTOR_ENV, "celery")
        executor = executors.job_executor(dg.in_process_executor)
        assert executor is not None and executor.name == "celery"

    def test_a_misspelt_value_is_refused_not_ignored(self, monkeypatch):
        monkeypatch.setenv(executors.EXECUTOR_ENV, "celry")
        with pytest.raises(ValueError, match="celry"):
            executors.celery_selected()

    def test_the_workers_and_the_executor_read_one_settings_file(self):
        settings = executors.celery_settings()
        assert settings["broker"] == {"env": "ECG_R1_CELERY_BROKER"}
        assert settings["backend"] == {"env": "ECG_R1_CELERY_BACKEND"}
        # A worker process lost mid-step hands its task back instead of losing it.
        assert settings["config_source"]["task_acks_late"] is True
        assert settings["config_source"]["task_reject_on_worker_lost"] is True

    def test_every_worker_renews_the_delivery_of_its_running_step(self):
        # Redis redelivers an unacknowledged (acks_late) task once its delivery is older than
        # visibility_timeout: a step longer than that ran twice. The workers import the heartbeat
        # that renews it (tests/test_celery_redelivery.py runs it on real workers).
        source = executors.celery_settings()["config_source"]
        assert source["imports"] == ["dagster_project.celery_heartbeat"]
        importlib.import_module(source["imports"][0])

    def test_a_second_delivery_of_a_running_step_is_refused_and_the_first_goes_on(self, tmp_path):
        from dagster_project.defs.launching import one_run_per_folder

        with one_run_per_folder(tmp_path / "sft_model"):
            with (
                pytest.raises(dg.Failure, match="another process"),
                one_run_per_folder(tmp_path / "sft_model"),
            ):
                pytest.fail("a second step trained into the folder")
            assert (tmp_path / "sft_model").is_dir()  # untouched by the refused delivery
        with one_run_per_folder(tmp_path / "sft_model"):  # free again once the step ended
            pass


class TestRouting:
    def test_training_and_evaluation_go_to_gpu_data_and_rendering_to_default(self):
        assets = all_assets()
        assert set(assets) >= GPU_STEPS | DEFAULT_STEPS
        for name in GPU_STEPS:
            assert assets[name].op.tags.get(executors.QUEUE_TAG) == "gpu", name
        for name in DEFAULT_STEPS:
            assert assets[name].op.tags.get(executors.QUEUE_TAG) == "default", name

    def test_gpu_steps_retry_and_data_steps_do_not(self):
        assets = all_assets()
        for name in GPU_STEPS:
            assert assets[name].op.retry_policy == executors.TRANSIENT_RETRY, name
        for name in DEFAULT_STEPS:
            assert assets[name].op.retry_policy is None, name
