"""A step longer than the Redis broker's visibility timeout runs once.

A private ``redis-server`` (free port, temporary folder, no persistence) and real dagster-celery
workers started by ``dagster-celery worker start`` from ``dagster_project/stack/celery.yaml``, with
only the visibility timeout cut to a few seconds (and kombu's sweep for overdue messages run every
second, so that what it does shows within the test). The task works like a training step: it holds
the stage folder's lock while its body runs, for longer than the timeout.

- Without the heartbeat (the settings file less its ``imports``), Redis hands the running step out
  again and its worker runs it a second time once the first ended: the lock, free by then, does
  not stop it.
- With the project's settings, the step is delivered once and its body runs once, on one of two
  idle workers, and nothing comes after.

Skips only where ``redis-server`` is missing and cannot be installed (``stack.sh install``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from test_stack import alive, free_port

REPO = Path(__file__).resolve().parents[1]
SETTINGS = REPO / "dagster_project" / "stack" / "celery.yaml"
VISIBILITY_TIMEOUT = 3
STEP_SECONDS = 10  # more than three visibility timeouts
# kombu looks for overdue messages every 10 x 10 s by default: every second here. It changes when
# an overdue message is found, not whether.
SWEEP_EVERY_SECOND = {"unacked_restore_interval": 1, "unacked_restore_throttle": 1}
QUEUE = "default"


def redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    # The stack's own installer (apt); exit status 3: it cannot install here.
    install = subprocess.run(
        ["bash", str(REPO / "scripts" / "stack.sh"), "install"], capture_output=True, text=True, timeout=600
    )
    if install.returncode == 3:
        pytest.skip(f"redis-server is missing and cannot be installed here: {install.stderr.strip()[-300:]}")
    assert install.returncode == 0, install.stderr
    found = shutil.which("redis-server")
    assert found, "stack.sh install succeeded, yet no redis-server on PATH"
    return found


def stop_group(process: subprocess.Popen, grace: float) -> None:
    """TERM the process's group (its own session) unless ``grace`` is 0, then KILL what is left."""
    if grace:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


@contextlib.contextmanager
def tracked(process: subprocess.Popen, grace: float) -> Iterator[subprocess.Popen]:
    """Stop ``process`` and every descendant on leaving, and fail if one survives."""
    seen: list[psutil.Process] = []
    try:
        yield process
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(process.pid)
            seen = [root, *root.children(recursive=True)]
        stop_group(process, grace)
        # Killed processes of the group that were reparented take a moment to go.
        _, left = psutil.wait_procs([p for p in seen if alive(p)], timeout=10)
        left = [p for p in left if alive(p)]
        for leftover in left:  # never leave a stray process, even when failing
            with contextlib.suppress(psutil.NoSuchProcess):
                leftover.kill()
        assert not left, f"processes left behind: {[(p.pid, p.name()) for p in left]}"


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    import redis

    port = free_port()
    data = tmp_path / "redis"
    data.mkdir()
    server = subprocess.Popen(
        [redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)]
        + ["--save", "", "--appendonly", "no"],
        stdout=(data / "redis.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    with tracked(server, grace=5):
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            assert server.poll() is None, (data / "redis.log").read_text()
            assert time.monotonic() < deadline, "redis-server did not answer in 30 s"
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}"


def settings_file(tmp_path: Path, redis_url: str, heartbeat: bool) -> Path:
    """The project's Celery settings on the private Redis, with the short visibility timeout."""
    settings = yaml.safe_load(SETTINGS.read_text())
    config = settings["execution"]["config"]
    config["broker"], config["backend"] = f"{redis_url}/0", f"{redis_url}/1"
    source = config["config_source"]
    source["broker_transport_options"] |= {"visibility_timeout": VISIBILITY_TIMEOUT, **SWEEP_EVERY_SECOND}
    if not heartbeat:
        assert source.pop("imports") == ["dagster_project.celery_heartbeat"]
    path = tmp_path / "celery.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


@contextlib.contextmanager
def workers(settings: Path, count: int, tmp_path: Path) -> Iterator[None]:
    """``count`` workers on the queue, one task at a time each, as ``stack.sh worker`` starts them."""
    env = {
        **os.environ,
        "DAGSTER_HOME": str(tmp_path / "dagster-home"),  # the CLI writes the settings module there
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)]),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    }
    (tmp_path / "dagster-home").mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        logs = []
        for number in range(count):
            log = tmp_path / f"worker-{number}.log"
            process = subprocess.Popen(
                [str(Path(sys.executable).parent / "dagster-celery"), "worker", "start"]
                + ["-A", "celery_redelivery_app", "-y", str(settings), "-q", QUEUE]
                + ["-n", f"redelivery-{number}", "-l", "INFO", "--", "--concurrency=1"],
                env=env,
                stdout=log.open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            # Killed outright: a warm shutdown would wait for the running task, and these workers
            # hold nothing worth keeping.
            stack.enter_context(tracked(process, grace=0))
            logs.append((process, log))
        deadline = time.monotonic() + 120
        for process, log in logs:
            while " ready." not in log.read_text():
                assert process.poll() is None, f"a worker exited:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, (
                    f"a worker did not start in 120 s:\n{log.read_text()[-3000:]}"
                )
                time.sleep(0.2)
        yield


def submit(settings: Path, folder: Path):
    """Send the step as the Celery executor of a Dagster run sends one."""
    from dagster_celery.executor import CeleryExecutor
    from dagster_celery.make_app import make_app

    config = yaml.safe_load(settings.read_text())["execution"]["config"]
    app = make_app(CeleryExecutor.for_cli(**config).app_args())
    return app.send_task(
        "train_into",
        args=[str(folder), STEP_SECONDS],
        queue=QUEUE,
        routing_key=f"{QUEUE}.execute_plan",
    )


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.is_file() else []


@contextlib.contextmanager
def step_on_workers(tmp_path: Path, redis_url: str, heartbeat: bool, count: int) -> Iterator[tuple]:
    """The step sent to ``count`` fresh workers: its result and stage folder (workers stop on leaving)."""
    settings = settings_file(tmp_path, redis_url, heartbeat)
    stage = tmp_path / "stage" / "sft_model"
    with workers(settings, count, tmp_path):
        yield submit(settings, stage), stage


@pytest.mark.slow
def test_without_the_heartbeat_redis_hands_a_running_step_out_again(tmp_path, redis_url):
    with step_on_workers(tmp_path, redis_url, heartbeat=False, count=1) as (result, stage):
        deadline = time.monotonic() + 3 * STEP_SECONDS + 30
        while len([line for line in lines(stage / "body.log") if line.startswith("start")]) < 2:
            assert not result.failed(), result.traceback
            assert time.monotonic() < deadline, f"the step ran only once: {lines(stage / 'body.log')}"
            time.sleep(0.5)
    deliveries = lines(stage.parent / "deliveries.log")
    assert deliveries[0].endswith("redelivered=False") and deliveries[1].endswith("redelivered=True")
    body = lines(stage / "body.log")
    # The second run started once the first ended: the folder's lock was free again.
    assert body[0].startswith("start") and body[1].startswith("end") and body[2].startswith("start")


@pytest.mark.slow
def test_with_the_projects_settings_a_step_longer_than_the_timeout_runs_once(tmp_path, redis_url):
    # Two idle workers: a second delivery would be taken at once by the other one.
    with step_on_workers(tmp_path, redis_url, heartbeat=True, count=2) as (result, stage):
        pid = result.get(timeout=STEP_SECONDS + 60)
        # Long enough for an overdue copy to be found and run (the sweep runs every second).
        time.sleep(2 * VISIBILITY_TIMEOUT + 2)
        deliveries = lines(stage.parent / "deliveries.log")
        body = lines(stage / "body.log")
    assert deliveries == [f"{pid} redelivered=False"]
    assert [line.split()[:2] for line in body] == [["start", str(pid)], ["end", str(pid)]]
    started, ended = (float(line.split()[2]) for line in body)
    assert ended - started >= STEP_SECONDS > 3 * VISIBILITY_TIMEOUT
