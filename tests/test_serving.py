"""The registered model as an MLflow pyfunc: its predict in-process, its link to the run, and
``mlflow models serve`` answering over HTTP on 127.0.0.1.

The model is a small untrained tiny-profile model: its completions break the answer format, so a
well-formed response has answer and reasoning null, a problem named, and P(Yes) in [0, 1].
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import ecg_r1
from ecg_r1.modeling import inference
from ecg_r1.modeling.build import build_base_model, corpus_from_cases
from ecg_r1.modeling.profiles import load_profile
from ecg_r1.tracking import serving

mlflow = pytest.importorskip("mlflow")

MAX_NEW_TOKENS = 40
CASES = [{"age": 50 + i, "sex": "F", "note": f"Troponin {i}.", "twi_leads": "V2,V3"} for i in range(20)]


def page(seed: int):
    from ecg_r1.imaging.draw import render_page

    signal_ = np.random.default_rng(seed).normal(0, 0.3, (12, 5000)).astype(np.float32)
    return render_page(signal_, load_profile("tiny").render_config())


@pytest.fixture(scope="module")
def taught_model(small_profile_path, tmp_path_factory) -> Path:
    """A small untrained model (the tiny profile's architecture, smaller sizes)."""
    profile = load_profile(small_profile_path)
    return build_base_model(profile, corpus_from_cases(CASES), tmp_path_factory.mktemp("served") / "base")


def request_frame(n: int = 1) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"image": serving.encode_image(page(i)), "note": "Chest pain.", "age": 63.0 + i, "sex": "F"}
            for i in range(n)
        ]
    )


def assert_well_formed(row: dict) -> None:
    assert set(row) == set(serving.OUTPUT_COLUMNS)
    assert isinstance(row["completion"], str) and isinstance(row["valid"], bool)
    assert 0.0 <= row["p_yes"] <= 1.0
    if row["valid"]:
        assert row["answer"] in ("Yes", "No") and isinstance(row["reasoning"], str) and row["problem"] is None
    else:  # an untrained model breaks the format, and the answer says so
        assert row["answer"] is None and row["reasoning"] is None and isinstance(row["problem"], str)


@pytest.fixture(scope="module")
def served(taught_model):
    model = serving.ECGR1Model()
    model.load_folder(taught_model)
    return model


class TestPredict:
    def test_answers_each_row_as_the_cli_does(self, served):
        frame = served.predict(None, request_frame(2), {"max_new_tokens": MAX_NEW_TOKENS})
        assert list(frame.columns) == list(serving.OUTPUT_COLUMNS) and len(frame) == 2
        for row in frame.to_dict(orient="records"):
            assert_well_formed(row)
        example = {"image": page(0), "age": 63.0, "sex": "F", "note": "Chest pain."}
        [direct] = inference.predict(served.model, served.processor, [example], max_new_tokens=MAX_NEW_TOKENS)
        assert frame.iloc[0].to_dict() == direct  # the function behind ecg-r1 predict

    def test_optional_fields_may_be_missing(self, served):
        frame = pd.DataFrame([{"image": serving.encode_image(page(3))}])
        [row] = served.predict(None, frame, {"max_new_tokens": MAX_NEW_TOKENS}).to_dict(orient="records")
        assert 0.0 <= row["p_yes"] <= 1.0

    @pytest.mark.parametrize(
        "change,message",
        [
            ({"image": "not base64!"}, "not a base64-encoded image"),
            ({"image": "aGVsbG8="}, "not a base64-encoded image"),
            ({"sex": "X"}, "'sex' must be one of"),
            ({"age": "old"}, "'age' must be a number"),
        ],
    )
    def test_a_malformed_row_is_refused_with_its_field(self, served, change, message):
        frame = request_frame(1)
        for key, value in change.items():
            frame[key] = [value]
        with pytest.raises(ValueError, match=message):
            served.predict(None, frame)

    def test_a_request_without_image_is_refused(self, served):
        with pytest.raises(ValueError, match="needs an 'image' column"):
            served.predict(None, pd.DataFrame([{"note": "x"}]))


@pytest.fixture(scope="module")
def champion(store, taught_model) -> tuple[int, str]:
    from ecg_r1.tracking import model_registry
    from ecg_r1.tracking import runs as tracking

    with tracking.start_or_resume_run("tiny", "grpo") as run:
        version = model_registry.register_model_version(
            run.info.run_id, taught_model, "ecg-r1-grpo", tags={"profile": "tiny"}
        )
    model_registry.set_alias("ecg-r1-grpo", "champion", version)
    return version, run.info.run_id


class TestRegisteredPyfunc:
    def test_the_logged_model_links_run_and_version(self, champion):
        from mlflow.entities import LoggedModelStatus

        version, run_id = champion
        client = mlflow.MlflowClient()
        found = client.get_model_version("ecg-r1-grpo", str(version))
        [output] = client.get_run(run_id).outputs.model_outputs  # the runs table's Models column
        logged = client.get_logged_model(output.model_id)
        # the version names the logged model as its source and the run behind it...
        assert found.source == f"models:/{logged.model_id}" and found.run_id == run_id
        assert logged.source_run_id == run_id
        assert client.get_model_version_download_uri("ecg-r1-grpo", str(version)) == logged.artifact_location
        # ...and the logged model lists the version (what the model pages show)
        assert json.loads(logged.tags["mlflow.modelVersions"]) == [
            {"name": "ecg-r1-grpo", "version": version}
        ]
        assert logged.status == LoggedModelStatus.READY and logged.tags["profile"] == "tiny"
        assert found.tags["profile"] == "tiny"
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{logged.model_id}"))
        mlmodel = yaml.safe_load((local / "MLmodel").read_text())
        flavor = mlmodel["flavors"]["python_function"]
        # nothing pickled: the served class is code (MLflow records its cloudpickle version anyway)
        assert flavor["model_code_path"].endswith("served_model.py") and "python_model" not in flavor
        assert not list(local.rglob("*.pkl"))
        assert mlmodel["signature"]["inputs"] and mlmodel["signature"]["params"]
        assert "saved_input_example_info" not in mlmodel  # so MLflow did not serve it to validate it

    def test_registration_never_loads_the_model(self, store, taught_model, monkeypatch):
        """Registration happens in every training stage: it copies the folder, and MLflow does not
        load the model to infer a signature or validate an example."""
        from ecg_r1.tracking import model_registry
        from ecg_r1.tracking import runs as tracking

        loaded = []
        monkeypatch.setattr(serving.ECGR1Model, "load_context", lambda self, context: loaded.append(1))
        with tracking.start_or_resume_run("tiny", "sft") as run:
            model_registry.register_model_version(run.info.run_id, taught_model, "ecg-r1-sft")
        assert loaded == []

    def test_the_served_model_carries_its_profile(self, store, taught_model, tmp_path):
        """A model trained from a profile file names a profile no one can load by name; the pyfunc
        carries the file, and loads and caps completions with it."""
        from ecg_r1.modeling.models import MODEL_INFO_FILE
        from ecg_r1.tracking import model_registry
        from ecg_r1.tracking import runs as tracking

        raw = yaml.safe_load(load_profile("tiny").path.read_text())
        raw["name"] = "served-custom"
        raw["grpo"]["max_completion_length"] = 7
        (tmp_path / "custom.yaml").write_text(yaml.safe_dump(raw))
        folder = shutil.copytree(taught_model, tmp_path / "model")
        (folder / MODEL_INFO_FILE).write_text(json.dumps({"profile": "served-custom"}))
        with tracking.start_or_resume_run("tiny", "sft") as run:
            with pytest.raises(ValueError, match="not a shipped profile"):
                model_registry.register_model_version(run.info.run_id, folder, "ecg-r1-custom")
            version = model_registry.register_model_version(
                run.info.run_id, folder, "ecg-r1-custom", profile=tmp_path / "custom.yaml"
            )
        model = mlflow.pyfunc.load_model(f"models:/ecg-r1-custom/{version}")
        assert model.unwrap_python_model().max_new_tokens == 7
        [param] = model.metadata.get_params_schema().params
        assert (param.name, param.default) == ("max_new_tokens", 7)

    def test_loads_from_code_and_answers_in_process(self, champion):
        model = mlflow.pyfunc.load_model("models:/ecg-r1-grpo@champion")
        [row] = model.predict(request_frame(1), params={"max_new_tokens": MAX_NEW_TOKENS}).to_dict(
            orient="records"
        )
        assert_well_formed(row)

    def test_load_registered_returns_the_model_folder_inside(self, champion, taught_model):
        from ecg_r1.tracking import model_registry

        folder = model_registry.load_registered("models:/ecg-r1-grpo@champion")
        assert (folder / "config.json").read_text() == (taught_model / "config.json").read_text()
        assert model_registry.load_registered("models:/ecg-r1-grpo@champion") == folder  # cached


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_mlflow_models_serve_answers_over_http(store, champion, tmp_path):
    """``mlflow models serve -m models:/ecg-r1-grpo@champion`` on 127.0.0.1 answers a request."""
    _, uri = store
    port = _free_port()
    from ecg_r1.cli.serve import server_environment

    env = {
        **os.environ,
        **server_environment(uri),  # the store, and uvicorn on PATH (mlflow starts it from there)
        # the served code imports this checkout's ecg_r1
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(ecg_r1.__file__).parents[1]), os.environ.get("PYTHONPATH")])
        ),
    }
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/ecg-r1-grpo@champion"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    log = tmp_path / "server.log"
    with log.open("wb") as out:  # a file, not a pipe nobody reads that could fill and stall the server
        server = subprocess.Popen(
            command, env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT
        )
    pgid = server.pid
    try:
        deadline = time.monotonic() + 90
        while True:
            if server.poll() is not None:
                pytest.fail(f"the server exited ({server.returncode}): {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"no answer to /ping in 90 s: {log.read_text()[-2000:]}"
            time.sleep(0.5)
        body = {
            "dataframe_records": request_frame(1).to_dict(orient="records"),
            "params": {"max_new_tokens": MAX_NEW_TOKENS},
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as reply:
            answer = json.loads(reply.read())
        [row] = answer["predictions"]
        assert_well_formed(row)
        bad = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"dataframe_records": [{"image": "x", "sex": "F"}]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=30)
        assert refused.value.code in (400, 500) and "base64" in refused.value.read().decode()
    finally:  # the whole group: `mlflow models serve` runs uvicorn in a child process
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            server.wait(timeout=5)
        deadline = time.monotonic() + 10
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = _group_alive(pgid)
        if alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
    assert not alive, "a server process outlived SIGTERM"


class TestServeCommand:
    def test_resolves_the_alias_and_binds_localhost(self, store, champion):
        from ecg_r1.cli.serve import serve_command

        root, uri = store
        version, _ = champion
        command, env = serve_command("models:/ecg-r1-grpo@champion", root, "127.0.0.1", 5009)
        expected = ["-m", f"models:/ecg-r1-grpo/{version}", "--env-manager", "local", "-h", "127.0.0.1"]
        assert command[-8:] == [*expected, "-p", "5009"]
        assert env["MLFLOW_TRACKING_URI"] == uri
        # mlflow models serve runs `uvicorn` from PATH: this interpreter's bin comes first
        assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)

    def test_a_version_stored_elsewhere_is_refused(self, store, taught_model, tmp_path):
        from ecg_r1.cli import main
        from ecg_r1.tracking import model_registry

        root, _ = store
        client = mlflow.MlflowClient()
        elsewhere = client.create_experiment("serve-elsewhere", artifact_location=(tmp_path / "x").as_uri())
        run = client.create_run(elsewhere)
        (tmp_path / "fake").mkdir()
        (tmp_path / "fake" / "config.json").write_text("{}")
        number = model_registry.register_model_version(run.info.run_id, tmp_path / "fake", "ecg-r1-elsewhere")
        with pytest.raises(SystemExit, match="outside this store's artifacts"):
            main(["serve", "--model", f"models:/ecg-r1-elsewhere/{number}", "--mlflow-root", str(root)])
