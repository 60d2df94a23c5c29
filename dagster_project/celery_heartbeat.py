"""Keeps a running step's Celery message from being handed out again while its worker lives.

With ``task_acks_late`` (``dagster_project/stack/celery.yaml``) a step's message stays
unacknowledged while the step runs, and the Redis transport (kombu) hands every unacknowledged
message out again once it was delivered more than ``visibility_timeout`` seconds ago, whether or
not its step still runs. A step longer than the timeout then started again: on an idle worker at
once, or on its own worker as soon as it ended, and again after that
(``tests/test_celery_redelivery.py`` shows it). The stage folder's lock cannot stop the second
form: by then the folder is free.

Every worker imports this module (the ``imports`` setting of ``celery.yaml``). While a task runs, a
thread of the process running it moves the message's delivery time in kombu's unacknowledged
index (``unacked_index``) to now, every quarter of the visibility timeout. The timeout then bounds
how long a worker may be gone (machine lost, process killed) before its step is handed to another
worker, not how long a step may run. Brokers other than Redis are left alone.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import Task, signals
from kombu import Connection

log = logging.getLogger(__name__)
# Renewals per visibility timeout: three may be missed (a broker blip) before the step is redelivered.
RENEWALS_PER_TIMEOUT = 4
JOIN_SECONDS = 10.0

_running: dict[str, tuple[threading.Event, threading.Thread, Connection]] = {}


def _renew(connection: Connection, delivery_tag: str, stop: threading.Event) -> None:
    channel = connection.default_channel
    while not stop.wait(channel.visibility_timeout / RENEWALS_PER_TIMEOUT):
        try:
            with channel.conn_or_acquire() as client:
                # xx: only a message still unacknowledged; once acknowledged or handed back it is
                # not put back.
                client.zadd(channel.unacked_index_key, {delivery_tag: time.time()}, xx=True)
        except connection.connection_errors as error:
            log.warning("could not renew the delivery of %s (tried again shortly): %s", delivery_tag, error)


@signals.task_prerun.connect
def start_renewing(task_id: str, task: Task, **_: Any) -> None:
    """Start renewing the delivery of the task's message (the task is about to run)."""
    delivery_tag = (task.request.properties or {}).get("delivery_tag")
    if delivery_tag is None:
        return
    connection = task.app.connection_for_write()
    if connection.transport.driver_type != "redis":
        connection.release()
        return
    stop = threading.Event()
    thread = threading.Thread(
        target=_renew, args=(connection, delivery_tag, stop), name=f"renew-{task_id}", daemon=True
    )
    _running[task_id] = (stop, thread, connection)
    thread.start()


@signals.task_postrun.connect
def stop_renewing(task_id: str, **_: Any) -> None:
    """Stop renewing once the task returned or raised: the worker acknowledges its message next."""
    running = _running.pop(task_id, None)
    if running is None:
        return
    stop, thread, connection = running
    stop.set()
    # Bounded: a renewal stuck on an unreachable broker must not hold the task's end back.
    thread.join(timeout=JOIN_SECONDS)
    connection.release()
