"""The Celery app of ``tests/test_celery_redelivery.py``'s workers: dagster-celery's own app, built
the way ``dagster-celery worker start -A dagster_celery.app -y SETTINGS`` builds it (the CLI writes
the settings file's ``config_source`` where ``make_app`` reads it), with one task that works like
a training step: it holds the stage folder's lock while its body writes into the folder.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from celery import Task
from dagster_celery.make_app import make_app

from dagster_project.defs.launching import one_run_per_folder

DELIVERIES = "deliveries.log"
BODY = "body.log"

app = make_app()


def _append(path: Path, line: str) -> None:
    with path.open("a") as handle:
        handle.write(line + "\n")


@app.task(bind=True, name="train_into")
def train_into(self: Task, folder: str, seconds: float) -> int:
    """Record the delivery, then, under the folder's lock, the body's start and end."""
    out_dir = Path(folder)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    redelivered = bool(self.request.delivery_info.get("redelivered"))
    _append(out_dir.parent / DELIVERIES, f"{os.getpid()} redelivered={redelivered}")
    with one_run_per_folder(out_dir):
        _append(out_dir / BODY, f"start {os.getpid()} {time.time():.2f}")
        time.sleep(seconds)
        _append(out_dir / BODY, f"end {os.getpid()} {time.time():.2f}")
    return os.getpid()
