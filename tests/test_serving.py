"""The registered model as an MLflow pyfunc: its predict in-process (each request limit
checked row by row), its link to the run; tests/test_serving_http.py serves it over HTTP.

The model is a small untrained tiny-profile model: its completions break the answer format, so a
well-formed response has answer and reasoning null, a problem named, and P(Yes) in [0, 1].
"""

from __future__ import annotations

import base64
import importlib.metadata
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ecg_r1.modeling import inference
from ecg_r1.modeling.build import build_base_model, corpus_from_cases
from ecg_r1.modeling.profiles import load_profile
from ecg_r1.tracking import serving

mlflow = pytest.importorskip("mlflow")

MAX_NEW_TOKENS = 12  # at most the tiny profile's cap (16)
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
        assert frame.iloc[0].to_dict() == {"id": None, **direct}  # the function behind ecg-r1 predict

    def test_optional_fields_may_be_missing(self, served):
        frame = pd.DataFrame([{"image": serving.encode_image(page(3))}])
        [row] = served.predict(None, frame, {"max_new_tokens": MAX_NEW_TOKENS}).to_dict(orient="records")
        assert 0.0 <= row["p_yes"] <= 1.0

    @pytest.mark.parametrize(
        "change,problem",
        [
            ({"image": "not base64!"}, "image: not base64"),
            ({"image": "aGVsbG8="}, "image: not a PNG or JPEG"),
            ({"sex": "X"}, "sex: must be one of"),
            ({"age": "old"}, "age: must be a number"),
            ({"age": float("inf")}, "age: must be within 0-130"),
            ({"age": -5.0}, "age: must be within 0-130"),
            ({"age": 400}, "age: must be within 0-130"),
            ({"note": "x" * (serving.MAX_NOTE_CHARS + 1)}, "note: more than 2,000 characters"),
            ({"id": "x" * (serving.MAX_ID_CHARS + 1)}, "id: must be text"),
        ],
    )
    def test_a_malformed_row_is_answered_with_its_field(self, served, change, problem):
        """The bad row is refused, its neighbour answered as if alone."""
        frame = request_frame(2)
        for key, value in change.items():
            frame[key] = [value, frame[key][1] if key in frame else None]
        refused, answered = served.predict(None, frame, {"max_new_tokens": MAX_NEW_TOKENS}).to_dict(
            orient="records"
        )
        assert refused["valid"] is False and refused["problem"].startswith(problem)
        assert refused["completion"] is None and refused["p_yes"] is None
        [alone] = served.predict(None, frame.iloc[1:], {"max_new_tokens": MAX_NEW_TOKENS}).to_dict(
            orient="records"
        )
        assert answered == alone

    def test_a_request_without_image_is_answered_as_refused(self, served):
        [row] = served.predict(None, pd.DataFrame([{"note": "x"}])).to_dict(orient="records")
        assert row["valid"] is False and row["problem"] == "image: missing"

    def test_only_png_and_jpeg_are_opened(self, monkeypatch):
        """An EPS page (which PIL renders with Ghostscript) is refused by its first bytes: PIL is
        never asked to open it."""
        from PIL import Image

        eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
        assert Image.open(io.BytesIO(eps)).format == "EPS"  # what the old decode opened
        opened = []
        monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1))
        with pytest.raises(serving.RowProblem, match="image: not a PNG or JPEG"):
            serving.decode_image(base64.b64encode(eps).decode())
        assert opened == []

    def test_the_pixel_count_is_checked_before_decoding(self, monkeypatch):
        from PIL import Image, ImageFile

        big = serving.encode_image(Image.new("L", (5001, 5000)), format="JPEG")
        decoded = []
        monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1))
        with pytest.raises(serving.RowProblem, match="5001 x 5000 px, more than 25,000,000"):
            serving.decode_image(big)
        assert decoded == []

    def test_whole_request_limits(self, served):
        """Too many rows, too much text in all, or a completion cap above the profile's: every
        row refused, the model not run."""
        many = pd.concat([request_frame(1)] * (serving.MAX_ROWS + 1), ignore_index=True)
        huge = pd.DataFrame([{"image": "A" * (serving.MAX_REQUEST_CHARS // 7)}] * 8)
        for frame, params, problem in [
            (many, None, "request: 17 rows, at most 16"),
            (huge, None, "request: more than 64 MiB"),
            (request_frame(1), {"max_new_tokens": served.max_new_tokens + 1}, "max_new_tokens: must be"),
            (request_frame(1), {"max_new_tokens": 2.5}, "max_new_tokens: must be"),
        ]:
            rows = served.predict(None, frame, params).to_dict(orient="records")
            assert len(rows) == len(frame)
            assert all(not row["valid"] and row["problem"].startswith(problem) for row in rows)


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
        # the pyfunc pins what it runs on to the versions installed where it was logged
        pinned = (local / "requirements.txt").read_text().splitlines()
        installed = importlib.metadata.version
        assert {f"torch=={installed('torch')}", f"transformers=={installed('transformers')}"} <= set(pinned)

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
        assert (param.name, param.default) == ("max_new_tokens", 7.0)

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


class TestServeCommand:
    def test_resolves_the_alias_to_its_version(self, store, champion):
        from ecg_r1.cli.serve import served_version

        root, _ = store
        version, _ = champion
        assert served_version("models:/ecg-r1-grpo@champion", root) == f"models:/ecg-r1-grpo/{version}"

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

    def test_a_host_beyond_loopback_is_warned_about(self, store, champion, monkeypatch, capsys):
        import uvicorn

        from ecg_r1.cli import main
        from ecg_r1.tracking import serving_app

        root, _ = store
        started = []
        monkeypatch.setattr(serving_app, "scoring_app", lambda uri: uri)
        monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.append(options))
        main(
            [
                "serve",
                "--model",
                "models:/ecg-r1-grpo@champion",
                "--host",
                "0.0.0.0",
                "--mlflow-root",
                str(root),
            ]
        )
        assert started == [{"host": "0.0.0.0", "port": 5001, "workers": 1}]
        assert "no authentication nor TLS" in capsys.readouterr().err
