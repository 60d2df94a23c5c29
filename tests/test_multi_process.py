"""Two training processes under ``torchrun`` on a CPU (gloo: the CPU stand-in of a two-GPU launch,
docs/multi_gpu.md) into a fresh MLflow folder: SFT killed after a checkpoint and launched again,
then GRPO from its model. Each stage has one MLflow run, one registered version, one model folder
holding the main process's full weights and one ``result.json``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_train import make_cohort, tiny_test_profile  # noqa: E402

from dagster_project.defs.launching import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SFT_STEPS = 12
SAVE_STEPS = 3


def torchrun(processes: int, *cli: str) -> list[str]:
    """``torchrun --nproc_per_node N -m ecg_r1.cli ...`` on this machine's loopback."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "ecg_r1.cli",
        *cli,
    ]


def _train(stage: str, setup: dict, out: Path, steps: int, start: Path | None = None) -> list[str]:
    data = setup["data"]
    command = ["train", stage, "--profile", str(setup["profile"]), "--cohort", str(data["cohort"])]
    command += ["--splits", str(data["splits"]), "--images", str(data["images"]), "--out", str(out)]
    command += ["--mlflow", str(setup["store"]), "--max-steps", str(steps), "--threads", "1", "--no-progress"]
    return torchrun(2, *command, *(["--from", str(start)] if start else []))


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "ECG_R1_MLFLOW_URI", "WORLD_SIZE", "RANK"):
        env.pop(name, None)
    return env


def _checkpoints(out: Path) -> list[int]:
    return sorted(
        int(p.name.split("-")[1])
        for p in (out / "checkpoints").glob("checkpoint-*")
        if (p / "trainer_state.json").is_file()
    )


def _kill_all(pid: int) -> None:
    """SIGKILL torchrun and its training processes at once (as a lost machine would)."""
    import psutil

    parent = psutil.Process(pid)
    for process in [*parent.children(recursive=True), parent]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)


def _run(command: list[str], log: Path) -> dict:
    done = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    log.write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr[-4000:]
    # One JSON result: the other process prints nothing.
    assert done.stdout.count('"stage"') == 1, done.stdout[-2000:]
    return json.loads(done.stdout[done.stdout.index("{") :])


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(next(folder.glob("*.safetensors"))))


def _client(store: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{store / 'mlflow' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("multi")
    profile = tiny_test_profile(
        root / "profile.yaml",
        sft={"save_steps": SAVE_STEPS, "save_total_limit": 2},
        grpo={"save_steps": 1000},
        image={"layout": "3x4+rhythm"},  # the layout make_cohort draws (ecg-r1 train checks the pages)
    )
    # A fresh folder: no store yet (two processes creating it at once crashed in its migration).
    return {
        "data": make_cohort(root / "data", n=16),
        "profile": profile,
        "store": root / "store",
        "root": root,
    }


@pytest.fixture(scope="module")
def sft(setup) -> dict:
    """SFT under torchrun, killed (all processes) after its first checkpoint, then launched again."""
    out = setup["root"] / "sft"
    log = (setup["root"] / "sft-first.log").open("w")
    first = subprocess.Popen(
        _train("sft", setup, out, SFT_STEPS),
        cwd=REPO,
        env=_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 240
    try:
        while not _checkpoints(out):
            if first.poll() is not None:
                pytest.fail(
                    f"exited ({first.returncode}) before a checkpoint: {Path(log.name).read_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within 240 s")
            time.sleep(0.05)
        _kill_all(first.pid)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            _kill_all(first.pid)
        log.close()
    assert not (out / "result.json").exists(), "SFT finished before it was killed; raise SFT_STEPS"
    killed_at = max(_checkpoints(out))
    result = _run(_train("sft", setup, out, SFT_STEPS), setup["root"] / "sft-second.log")
    return {"out": out, "result": result, "killed_at": killed_at}


@pytest.mark.slow
def test_two_processes_train_sft_into_one_run_one_version_and_one_model(setup, sft) -> None:
    from transformers import AutoConfig, AutoModelForImageTextToText

    from ecg_r1.modeling.models import load_model_and_processor
    from ecg_r1.modeling.profiles import load_profile
    from ecg_r1.training.stage_folder import read_result

    out, result = sft["out"], sft["result"]
    assert result["resumed_from"] == sft["killed_at"] > 0
    assert result["steps"] == SFT_STEPS
    client = _client(setup["store"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [result["run_id"]]  # the resumed launch kept its run
    assert runs[0].info.status == "FINISHED"
    versions = client.search_model_versions("name='ecg-r1-sft'")
    assert [v.run_id for v in versions] == [result["run_id"]]
    assert read_result(out).run_id == result["run_id"]
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".json")) == ["result.json"]

    # The folder holds the main process's last weights (its final checkpoint), whole: every tensor
    # has the shape a freshly built model of the config has, none is an empty ZeRO partition.
    saved = _weights(out / "model")
    trained = _weights(out / "checkpoints" / f"checkpoint-{SFT_STEPS}")
    assert saved.keys() == trained.keys()
    assert all(saved[k].equal(trained[k]) for k in saved)
    fresh = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(out / "model"))
    assert all(tensor.numel() > 0 for tensor in saved.values())
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in fresh.parameters())
    load_model_and_processor(out / "model", load_profile(setup["profile"]))


@pytest.mark.slow
def test_two_processes_train_grpo_from_the_sft_model(setup, sft) -> None:
    from ecg_r1.modeling.models import load_model_and_processor
    from ecg_r1.modeling.profiles import load_profile

    out = setup["root"] / "grpo"
    result = _run(_train("grpo", setup, out, 2, start=sft["out"] / "model"), setup["root"] / "grpo.log")
    assert result["steps"] == 2 and result["registered"].startswith("ecg-r1-grpo/")
    client = _client(setup["store"])
    experiment = client.get_experiment_by_name("ecg-r1-tiny-test")
    grpo_runs = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags["stage"] == "grpo"]
    assert [r.info.run_id for r in grpo_runs] == [result["run_id"]]
    assert len(client.search_model_versions("name='ecg-r1-grpo'")) == 1
    assert (out / "result.json").is_file()
    load_model_and_processor(out / "model", load_profile(setup["profile"]))


@pytest.mark.slow
def test_dagster_launches_sft_model_on_two_processes_through_pipes(setup, sft, monkeypatch) -> None:
    import shutil

    import dagster as dg

    from dagster_project.defs.assets.model_assets import sft_model
    from dagster_project.defs.resources import DataLayout, DvcResource, MlflowResource

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "ECG_R1_MLFLOW_URI"):
        monkeypatch.delenv(name, raising=False)
    root, data = setup["root"] / "dagster", setup["data"]
    # The upstream asset's model: the base model the torchrun SFT built.
    shutil.copytree(sft["out"] / "base_model", root / "models" / "vision_pretrained_model" / "model")
    layout = DataLayout(
        home=str(root),
        cohort_dir=str(data["cohort"]),
        splits_dir=str(data["splits"].parent),
        images_dir=str(data["images"]),
        models_dir=str(root / "models"),
    )
    config = {"profile": str(setup["profile"]), "max_steps": 2, "launcher": "torchrun", "nproc_per_node": 2}
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(
        [sft_model],
        resources={
            "layout": layout,
            "dvc": DvcResource(home=str(root), track=False),
            "mlflow": MlflowResource(home=str(setup["store"])),
        },
        run_config={"ops": {"sft_model": {"config": config}}},
        instance=instance,
    )
    assert result.success
    (event,) = result.get_asset_materialization_events()
    metadata = {k: getattr(v, "value", v) for k, v in event.materialization.metadata.items()}
    # What the main process reported through Pipes: the stage's result and final metrics.
    assert (metadata["steps"], metadata["processes"], metadata["launcher"]) == (2, 2, "torchrun")
    assert isinstance(metadata["final_loss"], float)
    assert metadata["registered_version"].startswith("ecg-r1-sft/")
    client = _client(setup["store"])
    assert client.get_run(metadata["mlflow_run_id"]).data.tags["mlflow.runName"] == "sft_model"
    # ...and its log lines, forwarded as they were written.
    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert any("sft step 2/2" in message for message in messages)


class _Stop(Exception):
    pass


def test_train_logs_to_the_projects_tracking_uri(monkeypatch, tmp_path) -> None:
    from ecg_r1.cli import main
    from ecg_r1.tracking import runs as tracking

    seen = []

    def use_store(uri: str) -> str:
        seen.append(uri)
        raise _Stop

    monkeypatch.setattr(tracking, "use_store", use_store)
    monkeypatch.setenv("ECG_R1_MLFLOW_URI", "http://mlflow-host:5000")
    args = ["train", "sft", "--profile", "tiny", "--cohort", str(tmp_path), "--splits", str(tmp_path / "s")]
    with pytest.raises(_Stop):
        main([*args, "--images", str(tmp_path), "--out", str(tmp_path / "out")])
    assert seen == ["http://mlflow-host:5000"]
