"""Where steps run: in-process by default, on Celery workers when the stack is selected.

``ECG_R1_EXECUTOR=celery`` (``scripts/stack.sh`` writes it into ``.stack/env``) makes every job
use ``dagster_celery``'s executor with the settings of ``dagster_project/stack/celery.yaml``, the
same file the workers start from. Without it the jobs keep the executors they always had
(``make run`` stays one process).

Steps are routed by tag: data and rendering to the ``default`` queue, training and evaluation to
``gpu`` (:data:`DEFAULT_QUEUE`, :data:`GPU_QUEUE`). Steps pass nothing large through the broker:
every asset writes its files under the project's ``data/`` (:class:`DataLayout`), which on
several machines is a shared filesystem, and returns only flat metadata.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import yaml

EXECUTOR_ENV = "ECG_R1_EXECUTOR"
CELERY_SETTINGS = Path(__file__).resolve().parents[1] / "stack" / "celery.yaml"
# dagster_celery's tag name (dagster_celery.tags.DAGSTER_CELERY_QUEUE_TAG), spelled out so that the
# default, in-process install needs no dagster-celery.
QUEUE_TAG = "dagster-celery/queue"
DEFAULT_QUEUE = {QUEUE_TAG: "default"}
GPU_QUEUE = {QUEUE_TAG: "gpu"}

# For steps that can fail for reasons outside the data: a worker process killed or out of
# memory, the tracking server briefly away. A training step resumes from its last checkpoint, so
# a retry costs the steps since then. Errors the data causes raise dg.Failure(allow_retries=False).
TRANSIENT_RETRY = dg.RetryPolicy(max_retries=2, delay=5, backoff=dg.Backoff.EXPONENTIAL)


def celery_selected() -> bool:
    """Whether ``$ECG_R1_EXECUTOR`` asks for the Celery executor (anything else than ``celery``,
    or nothing, keeps the in-process default)."""
    value = os.environ.get(EXECUTOR_ENV, "").strip().lower()
    if value not in ("", "in_process", "celery"):
        raise ValueError(f"{EXECUTOR_ENV}={value!r}: use 'celery' or leave it unset (in-process)")
    return value == "celery"


def celery_settings() -> dict:
    """The executor config of ``dagster_project/stack/celery.yaml`` (broker and backend as env
    sources, resolved when a run starts)."""
    return yaml.safe_load(CELERY_SETTINGS.read_text())["execution"]["config"]


def job_executor(default: dg.ExecutorDefinition | None) -> dg.ExecutorDefinition | None:
    """The executor a job uses: Celery when selected, else ``default`` (None: Dagster's).

    The workers load the same definitions, so they must see the same ``$ECG_R1_EXECUTOR``; the
    stack's worker start-up sources ``.stack/env`` for that.
    """
    if not celery_selected():
        return default
    from dagster_celery import celery_executor

    return celery_executor.configured(celery_settings(), name="celery")
