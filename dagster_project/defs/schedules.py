"""Periodic retraining: ``retrain_job`` on a cron schedule, off until a user turns it on.

The cron string comes from ``$ECG_R1_RETRAIN_CRON`` (default ``0 3 * * 1``: Mondays at 03:00)
and its time zone from ``$ECG_R1_RETRAIN_TZ`` (default UTC), both read when the code location
loads. Turn it on in the UI (Automation > retrain_schedule) or with
``dagster schedule start retrain_schedule``; it runs while the Dagster daemon runs (``make ui``
starts one).

Each run ingests the same sources as the inbox sensor's runs (the base sources plus every export
in the inbox), so a scheduled retraining never forgets data a hospital sent.
"""

from __future__ import annotations

import os

import dagster as dg

from dagster_project.defs.resources import DataLayout
from dagster_project.defs.sensors import RETRAIN_JOB, inbox_dir, ingest_run_config, scan_inbox, settle_seconds

CRON_ENV = "ECG_R1_RETRAIN_CRON"
TZ_ENV = "ECG_R1_RETRAIN_TZ"
DEFAULT_CRON = "0 3 * * 1"  # weekly, Monday 03:00, when nobody waits on the machine
DEFAULT_TZ = "UTC"


def retrain_cron() -> str:
    """The retraining cron string: ``$ECG_R1_RETRAIN_CRON`` or weekly on Monday at 03:00.

    Raises:
        ValueError: when the variable is not a five-field cron string Dagster accepts.
    """
    cron = os.environ.get(CRON_ENV, "").strip() or DEFAULT_CRON
    from dagster._utils.schedules import is_valid_cron_string  # Dagster's own check, so both agree

    if not is_valid_cron_string(cron):
        raise ValueError(
            f"{CRON_ENV}={cron!r} is not a valid cron string; use five fields, e.g. '0 3 * * 1' "
            "(Mondays 03:00) or '0 2 * * *' (daily 02:00)"
        )
    return cron


@dg.schedule(
    cron_schedule=retrain_cron(),
    job_name=RETRAIN_JOB,
    execution_timezone=os.environ.get(TZ_ENV) or DEFAULT_TZ,
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description=f"Periodic retraining (retrain_job); cron from ${CRON_ENV} (default '{DEFAULT_CRON}'). "
    "Off until turned on.",
)
def retrain_schedule(context: dg.ScheduleEvaluationContext, layout: DataLayout) -> dg.RunRequest:
    """A retraining run on the base sources plus every settled export in the inbox."""
    settle_s = settle_seconds()
    exports = [e for e in scan_inbox(inbox_dir(layout))[0] if e.age_s >= settle_s]
    return dg.RunRequest(
        run_key=None,
        run_config=ingest_run_config(layout, exports),
        tags={
            "ecg_r1/trigger": "retrain_schedule",
            "ecg_r1/inbox_exports": ",".join(e.name for e in exports),
        },
    )
