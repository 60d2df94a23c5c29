"""A training run killed part-way (SIGKILL, as an out-of-memory kill or a lost machine would)
resumes from its last checkpoint at that step, not from step 0, and keeps logging to the same
MLflow run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from test_train import make_cohort, tiny_test_profile  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 40


def _command(profile: Path, data: dict[str, Path], out: Path, store: Path) -> list[str]:
    return [
        sys.executable,
        "-c",
        "import sys; from ecg_r1.cli import main; sys.exit(main(sys.argv[1:]))",
        "train",
        "sft",
        "--profile",
        str(profile),
        "--cohort",
        str(data["cohort"]),
        "--splits",
        str(data["splits"]),
        "--images",
        str(data["images"]),
        "--out",
        str(out),
        "--mlflow",
        str(store),
        "--max-steps",
        str(MAX_STEPS),
        "--threads",
        "1",
        "--no-progress",
    ]


def _complete_checkpoints(out: Path) -> list[int]:
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(
        int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()
    )


@pytest.mark.slow
def test_a_killed_sft_run_resumes_at_its_checkpoint_in_the_same_mlflow_run(
    tmp_path: Path, seed_mlflow_db
) -> None:
    from ecg_r1.tracking import runs as tracking
    from mlflow import MlflowClient

    data = make_cohort(tmp_path / "data", n=16)
    # The profile reads the pages make_cohort draws (ecg-r1 train refuses pages of another layout).
    profile = tiny_test_profile(
        tmp_path / "profile.yaml",
        sft={"save_steps": 2, "save_total_limit": 2},
        image={"layout": "3x4+rhythm"},
    )
    assert yaml.safe_load(profile.read_text())["sft"]["save_steps"] == 2
    out, store = tmp_path / "run", tmp_path / "store"
    seed_mlflow_db(store / "mlflow" / "mlflow.db")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        _command(profile, data, out, store), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 300
    try:
        while not _complete_checkpoints(out):
            if first.poll() is not None:
                pytest.fail(
                    f"training exited ({first.returncode}) before a checkpoint: {(tmp_path / 'first.log').read_text()[-2000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within 300 s")
            time.sleep(0.1)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    assert first.returncode == -signal.SIGKILL
    assert not (out / "result.json").exists(), (
        "the first attempt finished before it was killed; raise MAX_STEPS"
    )
    run_id = (out / tracking.RUN_ID_FILE).read_text().strip()
    checkpoint = max(_complete_checkpoints(out))
    assert 0 < checkpoint < MAX_STEPS

    tracking.configure(store)
    client = MlflowClient()
    logged_before = {m.step for m in client.get_metric_history(run_id, "loss")}
    assert client.get_run(run_id).info.status == "RUNNING"  # killed: never ended
    assert checkpoint <= max(logged_before) < MAX_STEPS

    second = subprocess.run(
        _command(profile, data, out, store), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stderr[-3000:]
    result = json.loads(second.stdout[second.stdout.index("{") :])
    assert result["resumed_from"] == checkpoint
    assert result["steps"] == MAX_STEPS
    assert result["run_id"] == run_id

    history = client.get_metric_history(run_id, "loss")
    steps = [m.step for m in history]
    assert set(steps) == set(range(1, MAX_STEPS + 1))
    # the resumed attempt logged only the steps after its checkpoint: nothing restarted at step 1
    assert steps.count(1) == 1
    resumed_steps = [s for s in steps if s > checkpoint]
    assert sorted(set(resumed_steps)) == list(range(checkpoint + 1, MAX_STEPS + 1))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert result["registered"].startswith("ecg-r1-sft/")
