"""The pipeline beyond one process: ``scripts/stack.sh`` starts PostgreSQL, Redis, an MLflow
server and two dagster-celery workers (queues ``default`` and ``gpu``); the data job and a short
SFT job run through the Celery executor; the process running the SFT step on the gpu worker is
killed mid-training; the run still succeeds (the step resumes from its checkpoint), its events are
in PostgreSQL and its metrics on the MLflow server; ``stack.sh down`` leaves no process behind.

The stack lives in a temporary folder on free ports, so it never meets a ``make stack-up`` stack.
It skips only when PostgreSQL and Redis cannot be installed (``stack.sh`` exits 3).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from test_train import tiny_test_profile

REPO = Path(__file__).resolve().parents[1]
STACK = REPO / "scripts" / "stack.sh"
SAVE_STEPS = 5
SFT_STEPS = 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_env_file(path: Path) -> dict[str, str]:
    """The ``export K=V`` lines ``stack.sh`` writes."""
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            env[key] = shlex.split(value)[0] if value else ""
    return env


def stack_processes(stack_dir: Path) -> list[psutil.Process]:
    """Every process of the stack: the pid files' process trees and the PostgreSQL postmaster's."""
    roots = [int(p.read_text()) for p in (stack_dir / "run").glob("*.pid") if p.read_text().strip()]
    postmaster = stack_dir / "postgres" / "postmaster.pid"
    if postmaster.is_file():
        roots.append(int(postmaster.read_text().split()[0]))
    found = []
    for pid in roots:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            found += [root, *root.children(recursive=True)]
    return found


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def stack() -> Iterator[dict]:
    # Not pytest's tmp_path: that folder is private to root, and PostgreSQL runs as `postgres`.
    stack_dir = Path(tempfile.mkdtemp(prefix="ecg-r1-stack-"))
    stack_dir.chmod(0o755)
    env = {
        **os.environ,
        "ECG_R1_STACK_DIR": str(stack_dir),
        "ECG_R1_PG_PORT": str(free_port()),
        "ECG_R1_REDIS_PORT": str(free_port()),
        "ECG_R1_MLFLOW_PORT": str(free_port()),
        "ECG_R1_STACK_WORKERS": "default gpu",
        "ECG_R1_PYTHON": sys.executable,
        # Tiny matrices on a shared 2-core machine: one thread per worker avoids OpenMP contention.
        "OMP_NUM_THREADS": "1",
        # The workers import this checkout's code.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    started = time.perf_counter()
    up = subprocess.run(["bash", str(STACK), "up"], env=env, capture_output=True, text=True, timeout=900)
    up_seconds = time.perf_counter() - started
    processes = stack_processes(stack_dir)
    try:
        if up.returncode == 3:
            pytest.skip(f"the stack's services cannot be installed here: {up.stderr.strip()[-300:]}")
        assert up.returncode == 0, f"stack.sh up failed:\n{up.stderr[-3000:]}"
        env.update(read_env_file(stack_dir / "env"))
        yield {"dir": stack_dir, "env": env, "up_seconds": up_seconds, "processes": processes}
    finally:
        processes += stack_processes(stack_dir)  # workers started since, and their children
        down = subprocess.run(
            ["bash", str(STACK), "down"], env=env, capture_output=True, text=True, timeout=300
        )
        left = [p for p in processes if alive(p)]
        for process in left:  # never leave a stray process on the machine, even when failing
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        shutil.rmtree(stack_dir, ignore_errors=True)
        assert down.returncode == 0, down.stderr
        assert not left, f"stack.sh down left processes: {[(p.pid, p.name()) for p in left]}"


def dagster(job: str, config: Path, env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        # `make stack-run`'s command; --target-path: the dg project, as the run's cwd is tmp_path
        [str(Path(sys.executable).parent / "dg"), "launch", "--job", job, "--config", str(config)]
        + ["--target-path", str(REPO)],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def kill_step_process_at_checkpoint(stack_dir: Path, checkpoints: Path, job: subprocess.Popen) -> int:
    """Wait for the SFT step's first complete checkpoint, then SIGKILL the gpu worker's process
    running it (what an out-of-memory kill does). Returns the killed pid."""
    deadline = time.monotonic() + 600
    marker = checkpoints / f"checkpoint-{SAVE_STEPS}" / "trainer_state.json"
    while not marker.is_file():
        assert job.poll() is None, (
            f"the job ended before the SFT step saved a checkpoint:\n{job.stdout.read()}"
        )
        assert time.monotonic() < deadline, "no SFT checkpoint within 10 minutes"
        time.sleep(0.05)
    launcher = psutil.Process(int((stack_dir / "run" / "worker-gpu.pid").read_text()))
    [celery_main] = launcher.children()
    [pool_process] = celery_main.children()  # --concurrency=1: the process running the step
    pool_process.send_signal(signal.SIGKILL)
    return pool_process.pid


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.stack
def test_jobs_survive_a_killed_worker_process_on_postgres_redis_and_the_mlflow_server(stack, tmp_path):
    import psycopg2

    from mlflow import MlflowClient

    env = stack["env"]
    home = tmp_path / "home"
    home.mkdir()
    profile = tiny_test_profile(tmp_path / "tiny-test.yaml", sft={"save_steps": SAVE_STEPS})
    resources = {
        "layout": {"config": {"home": str(home)}},
        "dvc": {"config": {"home": str(home), "track": False}},
    }
    data_config = tmp_path / "data.yaml"
    data_config.write_text(
        yaml.safe_dump(
            {
                "ops": {
                    "simulated_raw": {"config": {"n": 80, "hospitals": 4, "seed": 3}},
                    "raw_cohort": {"config": {"workers": 1}},
                    "cohort_splits": {"config": {"held_out_hospitals": ["hospital_d"], "seed": 1}},
                },
                "resources": resources,
            }
        )
    )
    stage = {"profile": str(profile)}
    sft_config = tmp_path / "sft.yaml"
    sft_config.write_text(
        yaml.safe_dump(
            {
                "ops": {
                    "ecg_images": {"config": {"profile": str(profile), "workers": 1}},
                    "base_model": {"config": stage},
                    "vision_pretrained_model": {"config": {**stage, "max_steps": 2}},
                    "sft_model": {"config": {**stage, "max_steps": SFT_STEPS}},
                },
                "resources": resources,
            }
        )
    )

    started = time.perf_counter()
    data = dagster("data_job", data_config, env, tmp_path)
    data_out, _ = data.communicate(timeout=600)
    data_seconds = time.perf_counter() - started
    assert data.returncode == 0, data_out[-3000:]

    started = time.perf_counter()
    sft = dagster("sft_job", sft_config, env, tmp_path)
    killed = kill_step_process_at_checkpoint(
        stack["dir"], home / "data" / "models" / "sft_model" / "checkpoints", sft
    )
    sft_out, _ = sft.communicate(timeout=900)
    sft_seconds = time.perf_counter() - started
    assert sft.returncode == 0, sft_out[-3000:]
    assert not psutil.pid_exists(killed) or not alive(psutil.Process(killed))

    # The runs, their steps and the workers that ran them, read straight from PostgreSQL.
    connection = psycopg2.connect(
        host=env["ECG_R1_PG_HOST"],
        port=env["ECG_R1_PG_PORT"],
        user=env["ECG_R1_PG_USER"],
        password=env["ECG_R1_PG_PASSWORD"],
        dbname=env["ECG_R1_PG_DB"],
    )
    with connection, connection.cursor() as cursor:
        cursor.execute("SELECT run_id, pipeline_name, status FROM runs")
        runs = {name: (run_id, status) for run_id, name, status in cursor.fetchall()}
        assert runs["data_job"][1] == "SUCCESS" and runs["sft_job"][1] == "SUCCESS", runs
        cursor.execute(
            "SELECT step_key, dagster_event_type, event FROM event_logs WHERE run_id = %s",
            (runs["sft_job"][0],),
        )
        events = cursor.fetchall()
    connection.close()
    succeeded = {step for step, kind, _ in events if kind == "STEP_SUCCESS"}
    assert {"ecg_images", "base_model", "vision_pretrained_model", "sft_model"} <= succeeded
    # Each step ran on its queue's worker; the SFT step twice on the gpu worker (killed, then again).
    ran_on = {}
    for step, kind, body in events:
        if kind == "ENGINE_EVENT" and "in celery worker" in body:
            worker = (
                "ecg-r1-gpu"
                if "ecg-r1-gpu@" in body
                else "ecg-r1-default"
                if "ecg-r1-default@" in body
                else "?"
            )
            ran_on.setdefault(step, []).append(worker)
    assert ran_on["ecg_images"] == ["ecg-r1-default"], ran_on
    assert ran_on["base_model"] == ["ecg-r1-gpu"] and ran_on["vision_pretrained_model"] == ["ecg-r1-gpu"]
    assert ran_on["sft_model"] == ["ecg-r1-gpu", "ecg-r1-gpu"], ran_on
    starts = [step for step, kind, _ in events if kind == "STEP_START"]
    assert starts.count("sft_model") == 2

    # The SFT run on the MLflow server: resumed from the checkpoint, every step's loss logged once
    # per attempt up to the end, and its model registered.
    client = MlflowClient(tracking_uri=env["ECG_R1_MLFLOW_URI"], registry_uri=env["ECG_R1_MLFLOW_URI"])
    result = yaml.safe_load((home / "data" / "models" / "sft_model" / "result.json").read_text())
    assert result["resumed_from"] == SAVE_STEPS and result["steps"] == SFT_STEPS
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    loss_steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")})
    assert loss_steps[-1] == SFT_STEPS and len(loss_steps) >= SFT_STEPS - 1
    name, version = result["registered"].split("/")
    assert client.get_model_version(name, version).run_id == run.info.run_id
    print(
        f"\nstack up {stack['up_seconds']:.0f} s; data_job {data_seconds:.0f} s; "
        f"sft_job {sft_seconds:.0f} s (killed pid {killed} at checkpoint {SAVE_STEPS})"
    )
