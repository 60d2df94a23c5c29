"""Retraining automation: the inbox sensor and the retraining schedule, as Dagster evaluates them."""

from __future__ import annotations

import csv
import importlib
import json
import os
import shutil
import time
from pathlib import Path

import dagster as dg
import pytest

from dagster_project.defs import schedules, sensors
from dagster_project.defs.resources import DataLayout

CINC_RECORDS = ("E07500", "E07501", "E07502")


@pytest.fixture(scope="module")
def defs() -> dg.Definitions:
    from dagster_project.definitions import defs as load

    return load()


@pytest.fixture(scope="module")
def retrain_job(defs: dg.Definitions) -> dg.JobDefinition:
    return defs.resolve_job_def(sensors.RETRAIN_JOB)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project home with the simulated export's folder and an empty inbox; no settle delay."""
    for var in (sensors.INBOX_ENV, sensors.SOURCES_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(sensors.SETTLE_ENV, "0")
    (tmp_path / "data" / "raw" / "simulated").mkdir(parents=True)
    (tmp_path / "data" / "inbox").mkdir(parents=True)
    return tmp_path


def _age(folder: Path, seconds: float) -> None:
    """Set every file's modification time ``seconds`` in the past (a copy that finished then)."""
    then = time.time() - seconds
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (then, then))


def drop_cinc_export(inbox: Path, name: str, cinc_dir: Path) -> Path:
    """A PhysioNet/CinC folder with three real records, as a hospital would send it."""
    folder = inbox / name
    folder.mkdir(parents=True)
    for record in CINC_RECORDS:
        for ext in (".hea", ".mat"):
            shutil.copy(cinc_dir / f"{record}{ext}", folder)
    return folder


def drop_manifest_export(inbox: Path, name: str, cinc_dir: Path) -> Path:
    """A manifest export: real signals under records/ and a manifest.csv naming them."""
    folder = inbox / name
    (folder / "records").mkdir(parents=True)
    rows = []
    for i, record in enumerate(CINC_RECORDS):
        for ext in (".hea", ".mat"):
            shutil.copy(cinc_dir / f"{record}{ext}", folder / "records")
        rows.append(
            {
                "signal_path": f"records/{record}.hea",
                "record_id": f"{name}/{record}",
                "patient_id": f"{name}-p{i}",
                "hospital": name,
                "label": "ischemic" if i % 2 else "non-ischemic",
                "note": "chest pain, troponin elevated" if i % 2 else "athlete, no symptoms",
            }
        )
    with open(folder / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


def evaluate(home: Path, cursor: str | None = None) -> dg.SensorResult:
    context = dg.build_sensor_context(cursor=cursor, resources={"layout": DataLayout(home=str(home))})
    return sensors.inbox_sensor(context)


def source_paths(request: dg.RunRequest) -> list[str]:
    return request.run_config["ops"]["raw_cohort"]["config"]["source_paths"]


class TestInboxSensor:
    def test_new_export_requests_retraining_of_it(self, home, cinc_dir, retrain_job):
        drop_manifest_export(home / "data" / "inbox", "hospital_e", cinc_dir)
        result = evaluate(home)
        assert result.skip_reason is None
        [request] = result.run_requests
        assert request.job_name is None  # the sensor's own job, retrain_job (tested below)
        # The new export is ingested beside the existing source (the simulated export).
        assert source_paths(request) == ["data/raw/simulated", "data/inbox/hospital_e"]
        assert request.tags["ecg_r1/inbox_exports"] == "hospital_e"
        assert request.tags["ecg_r1/inbox_layouts"] == "manifest"
        # The run config is valid for the real retrain_job (raw_cohort's config schema).
        assert dg.validate_run_config(retrain_job, request.run_config)
        assert "hospital_e" in json.loads(result.cursor)["seen"]

    def test_same_export_triggers_once(self, home, cinc_dir):
        drop_cinc_export(home / "data" / "inbox", "hospital_f", cinc_dir)
        first = evaluate(home)
        assert len(first.run_requests) == 1
        second = evaluate(home, cursor=first.cursor)
        assert not second.run_requests
        assert "no new export" in second.skip_reason.skip_message

    def test_second_export_is_ingested_with_the_first(self, home, cinc_dir):
        inbox = home / "data" / "inbox"
        drop_manifest_export(inbox, "hospital_e", cinc_dir)
        first = evaluate(home)
        drop_cinc_export(inbox, "hospital_f", cinc_dir)
        second = evaluate(home, cursor=first.cursor)
        [request] = second.run_requests
        assert request.tags["ecg_r1/inbox_exports"] == "hospital_f"
        assert request.tags["ecg_r1/inbox_layouts"] == "cinc"
        assert source_paths(request) == [
            "data/raw/simulated",
            "data/inbox/hospital_e",
            "data/inbox/hospital_f",
        ]
        assert request.run_key != first.run_requests[0].run_key

    def test_export_changed_after_its_run_is_named_not_retriggered(self, home, cinc_dir):
        folder = drop_cinc_export(home / "data" / "inbox", "hospital_f", cinc_dir)
        first = evaluate(home)
        shutil.copy(cinc_dir / "E07503.hea", folder)
        shutil.copy(cinc_dir / "E07503.mat", folder)
        second = evaluate(home, cursor=first.cursor)
        assert not second.run_requests
        assert "changed after their run was requested" in second.skip_reason.skip_message
        assert "hospital_f" in second.skip_reason.skip_message

    def test_empty_inbox_skips_with_reason(self, home):
        result = evaluate(home)
        assert not result.run_requests
        assert "no new export" in result.skip_reason.skip_message
        assert result.cursor is None  # nothing seen, nothing to remember

    def test_missing_inbox_is_empty_not_an_error(self, home):
        shutil.rmtree(home / "data" / "inbox")
        assert "no new export" in evaluate(home).skip_reason.skip_message

    def test_export_still_being_copied_waits(self, home, cinc_dir, monkeypatch):
        monkeypatch.setenv(sensors.SETTLE_ENV, "60")
        folder = drop_cinc_export(home / "data" / "inbox", "hospital_f", cinc_dir)
        waiting = evaluate(home)
        assert not waiting.run_requests
        assert "waiting for ['hospital_f']" in waiting.skip_reason.skip_message
        _age(folder, 120)  # the copy finished two minutes ago
        assert len(evaluate(home, cursor=waiting.cursor).run_requests) == 1

    def test_folders_that_are_not_exports_are_named_not_triggered(self, home, cinc_dir):
        inbox = home / "data" / "inbox"
        (inbox / "notes").mkdir()
        (inbox / "notes" / "readme.txt").write_text("not ECGs")
        (inbox / "loose.csv").write_text("a,b\n")
        (inbox / ".hospital_g").mkdir()  # a copy in progress, by convention
        drop_cinc_export(inbox / ".hospital_g", "x", cinc_dir)
        result = evaluate(home)
        assert not result.run_requests
        assert "ignored (not an export): ['loose.csv', 'notes']" in result.skip_reason.skip_message

    def test_inbox_and_base_sources_come_from_the_environment(
        self, home, cinc_dir, monkeypatch, tmp_path_factory
    ):
        elsewhere = tmp_path_factory.mktemp("hospital_inbox")
        ptbxl = tmp_path_factory.mktemp("ptbxl")
        monkeypatch.setenv(sensors.INBOX_ENV, str(elsewhere))
        monkeypatch.setenv(sensors.SOURCES_ENV, f"{ptbxl}{os.pathsep}data/raw/simulated")
        drop_cinc_export(elsewhere, "hospital_h", cinc_dir)
        [request] = evaluate(home).run_requests
        assert source_paths(request) == [
            str(ptbxl.resolve()),
            "data/raw/simulated",
            str(elsewhere / "hospital_h"),
        ]

    def test_no_simulated_export_means_only_the_inbox(self, home, cinc_dir):
        shutil.rmtree(home / "data" / "raw" / "simulated")
        drop_cinc_export(home / "data" / "inbox", "hospital_f", cinc_dir)
        [request] = evaluate(home).run_requests
        assert source_paths(request) == ["data/inbox/hospital_f"]

    def test_foreign_cursor_says_how_to_reset(self, home):
        with pytest.raises(ValueError, match="reset it"):
            evaluate(home, cursor="not json")

    def test_sensor_targets_retrain_job_and_is_off_by_default(self, defs):
        sensor = defs.resolve_sensor_def("inbox_sensor")
        assert sensor.job_name == "retrain_job"
        assert sensor.default_status == dg.DefaultSensorStatus.STOPPED


class TestRetrainSchedule:
    def test_stopped_by_default_and_weekly(self, defs):
        schedule = defs.resolve_schedule_def("retrain_schedule")
        assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
        assert schedule.job_name == "retrain_job"
        assert schedule.cron_schedule == schedules.DEFAULT_CRON == "0 3 * * 1"

    def test_cron_comes_from_the_environment(self, monkeypatch):
        monkeypatch.setenv(schedules.CRON_ENV, "30 1 * * *")
        try:
            reloaded = importlib.reload(schedules)
            assert reloaded.retrain_schedule.cron_schedule == "30 1 * * *"
            assert reloaded.retrain_schedule.default_status == dg.DefaultScheduleStatus.STOPPED
        finally:
            monkeypatch.delenv(schedules.CRON_ENV)
            importlib.reload(schedules)

    def test_bad_cron_says_what_to_write(self, monkeypatch):
        monkeypatch.setenv(schedules.CRON_ENV, "every monday")
        with pytest.raises(ValueError, match="ECG_R1_RETRAIN_CRON='every monday' is not a valid cron"):
            schedules.retrain_cron()

    def test_scheduled_run_ingests_base_sources_and_inbox(self, home, cinc_dir, retrain_job):
        drop_manifest_export(home / "data" / "inbox", "hospital_e", cinc_dir)
        context = dg.build_schedule_context(resources={"layout": DataLayout(home=str(home))})
        request = schedules.retrain_schedule.evaluate_tick(context).run_requests[0]
        assert source_paths(request) == ["data/raw/simulated", "data/inbox/hospital_e"]
        assert request.tags["ecg_r1/trigger"] == "retrain_schedule"
        assert dg.validate_run_config(retrain_job, request.run_config)
