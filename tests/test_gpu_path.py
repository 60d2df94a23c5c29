"""The GPU profiles' code path on a CPU: float32 master weights under bfloat16 autocast, the
device rule (a GPU profile without a GPU stops unless ECG_R1_DEVICE=cpu), the stand-in
checkpoint, and vLLM's generation arguments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_pretrained import ops_with_a_profile
from test_train import make_cohort

from ecg_r1.modeling import device as device_rule
from ecg_r1.modeling.build import build_random_model, corpus_from_cases
from ecg_r1.modeling.profiles import PROFILES_DIR, load_profile, load_random_architecture

REPO = Path(__file__).resolve().parents[1]
CORPUS = [{"age": 60, "sex": "F", "note": "chest pain, troponin raised", "twi_leads": "V2,V3"}] * 4


def standin_model(folder: Path) -> Path:
    sizes = load_random_architecture("qwen2-vl-2b-standin")
    profile = load_profile("qwen2-vl-2b")
    return build_random_model(profile, sizes, corpus_from_cases(CORPUS), folder, source="random")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def moved_fraction(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per weight matrix (2-D or more) the share of elements that changed, in the trained weights'
    dtype (a bfloat16 model is compared with its start as it was loaded: rounding is no update)."""
    return {
        name: float((after[name] != value.to(after[name].dtype)).float().mean())
        for name, value in before.items()
        if value.ndim >= 2
    }


@pytest.fixture(scope="module")
def cohort_896(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_cohort(tmp_path_factory.mktemp("cohort896"), n=12, width=896)


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return standin_model(tmp_path_factory.mktemp("standin") / "model")


class TestDeviceRule:
    def test_gpu_profile_without_cuda_names_the_switch(self, monkeypatch):
        monkeypatch.delenv(device_rule.DEVICE_ENV, raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(device_rule.DeviceError, match="ECG_R1_DEVICE=cpu"):
            device_rule.resolve_device(load_profile("qwen2-vl-2b"))
        assert device_rule.resolve_device(load_profile("tiny")) == "cpu"  # float32 profiles run there
        monkeypatch.setenv(device_rule.DEVICE_ENV, "cpu")
        assert device_rule.resolve_device(load_profile("qwen2-vl-2b")) == "cpu"

    def test_cuda_is_used_where_there_is_one(self, monkeypatch):
        monkeypatch.delenv(device_rule.DEVICE_ENV, raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert device_rule.resolve_device(load_profile("tiny")) == "cuda"
        monkeypatch.setenv(device_rule.DEVICE_ENV, "cpu")  # on purpose, even with a GPU
        assert device_rule.resolve_device(load_profile("qwen2-vl-2b")) == "cpu"

    def test_bad_values_are_refused(self, monkeypatch):
        monkeypatch.setenv(device_rule.DEVICE_ENV, "tpu")
        with pytest.raises(device_rule.DeviceError, match="choose one of cpu, cuda"):
            device_rule.resolve_device(load_profile("tiny"))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setenv(device_rule.DEVICE_ENV, "cuda")
        with pytest.raises(device_rule.DeviceError, match="no CUDA device"):
            device_rule.resolve_device(load_profile("tiny"))

    def test_device_setting_is_scoped(self, monkeypatch):
        monkeypatch.delenv(device_rule.DEVICE_ENV, raising=False)
        with device_rule.device_setting("cpu"):
            assert device_rule.requested_device() == "cpu"
        assert device_rule.requested_device() is None
        with pytest.raises(device_rule.DeviceError), device_rule.device_setting("gpu0"):
            pass

    @pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
    @pytest.mark.slow  # a fresh ecg-r1 process imports the training stack: about 5 s
    def test_train_cli_refuses_a_gpu_profile_in_one_line(self, tmp_path):
        env = {k: v for k, v in __import__("os").environ.items() if k != device_rule.DEVICE_ENV}
        args = ["--cohort", tmp_path, "--splits", tmp_path / "s.parquet", "--images", tmp_path]
        done = subprocess.run(
            [sys.executable, "-m", "ecg_r1.cli", "train", "sft", "--profile", "qwen2-vl-2b", *map(str, args)]
            + ["--out", str(tmp_path / "out"), "--no-tracking"],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=120,
        )
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode != 0
        assert len(lines) == 1 and "ECG_R1_DEVICE=cpu" in lines[0], done.stderr
        assert "Traceback" not in done.stderr

    def test_inference_paths_follow_the_rule(self, standin, monkeypatch):
        from ecg_r1.tracking.serving import ECGR1Model

        monkeypatch.delenv(device_rule.DEVICE_ENV, raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        served = ECGR1Model()
        with pytest.raises(device_rule.DeviceError, match="ECG_R1_DEVICE=cpu"):
            served.load_folder(standin, load_profile("qwen2-vl-2b"))
        monkeypatch.setenv(device_rule.DEVICE_ENV, "cpu")
        served.load_folder(standin, load_profile("qwen2-vl-2b"))
        assert served.model.device.type == "cpu" and served.model.dtype == torch.bfloat16


class TestMasterWeights:
    def test_training_dtype(self):
        assert device_rule.training_dtype(load_profile("qwen2-vl-2b")) == torch.float32  # full fine-tuning
        assert device_rule.training_dtype(load_profile("qwen2-vl-7b")) == torch.bfloat16  # frozen LoRA base
        assert device_rule.training_dtype(load_profile("smol")) == torch.float32

    @pytest.mark.slow
    def test_three_sft_steps_at_the_2b_settings_move_every_weight_matrix(
        self, standin, cohort_896, tmp_path, monkeypatch
    ):
        """lr 1e-5, bf16: pure bfloat16 weights keep most elements (an update below half an ulp
        rounds away); float32 master weights move them all."""
        import yaml

        from ecg_r1.training.runner import RunOptions
        from ecg_r1.training.sft import run_sft

        monkeypatch.setenv(device_rule.DEVICE_ENV, "cpu")
        raw = yaml.safe_load((PROFILES_DIR / "qwen2-vl-2b.yaml").read_text())
        raw["sft"].update(per_device_train_batch_size=2, gradient_accumulation_steps=1)  # CPU-sized batch
        path = tmp_path / "profile.yaml"
        path.write_text(yaml.safe_dump(raw))
        profile = load_profile(path)
        assert profile.sft["learning_rate"] == 1e-5 and profile.training_precision == "bfloat16"
        result = run_sft(
            profile,
            standin,
            cohort_896["cohort"],
            cohort_896["splits"],
            cohort_896["images"],
            tmp_path / "sft",
            max_steps=3,
            options=RunOptions(tracking=False),
        )
        assert result.steps == 3
        moved = moved_fraction(weights(standin), weights(result.model_dir))
        assert moved and min(moved.values()) >= 0.9, sorted(moved.items(), key=lambda kv: kv[1])[:5]


class TestVllmArguments:
    # vLLM's SamplingParams fields, from vllm/sampling_params.py (vllm-project/vllm, read at commit
    # 00388f6573cc; TRL 1.16 supports vllm>=0.22,<=0.31, where these fields are all present). vLLM
    # does not install on these CPU machines, so the list is pinned here.
    SAMPLING_PARAMS_FIELDS = frozenset(
        [
            "n",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "seed",
            "stop",
            "stop_token_ids",
            "ignore_eos",
            "max_tokens",
            "min_tokens",
            "logprobs",
            "prompt_logprobs",
            "detokenize",
            "skip_special_tokens",
            "spaces_between_special_tokens",
            "include_stop_str_in_output",
            "output_kind",
            "structured_outputs",
            "logit_bias",
            "allowed_token_ids",
            "extra_args",
            "bad_words",
        ]
    )

    def test_suppressed_tokens_use_vllms_own_field(self):
        from ecg_r1.training.grpo import suppressed_tokens

        vllm = suppressed_tokens(True, [7, 9])
        assert set(vllm) <= self.SAMPLING_PARAMS_FIELDS
        assert vllm["logit_bias"] == {7: -100.0, 9: -100.0}
        assert suppressed_tokens(False, [7, 9]) == {"suppress_tokens": [7, 9]}  # transformers' generate


STANDIN_RUN_CONFIG = REPO / "dagster_project" / "run_configs" / "qwen2-vl-2b-standin.yaml"


@pytest.mark.parametrize("name", ["qwen2-vl-2b-standin", "qwen2-vl-2b"])
def test_2b_run_configs_set_the_2b_profile_everywhere(name):
    import dagster as dg
    import yaml

    from dagster_project.definitions import defs

    run_config = yaml.safe_load((STANDIN_RUN_CONFIG.parent / f"{name}.yaml").read_text())
    job = defs().resolve_job_def("full_pipeline_job")
    assert dg.validate_run_config(job, run_config)
    with_profile = ops_with_a_profile(job)
    assert with_profile == {
        n for n, op in run_config["ops"].items() if op["config"].get("profile") == "qwen2-vl-2b"
    }


@pytest.mark.slow
@pytest.mark.heavy
def test_the_2b_standin_runs_the_full_pipeline_on_the_cpu(tmp_path, seed_mlflow_db, monkeypatch):
    """full_pipeline_job with the stand-in run config: base (a local checkpoint, recorded), SFT and
    GRPO from the base in the 2B settings, the comparison, both versions registered, the champion
    served."""
    import json

    import pandas as pd
    import yaml

    import mlflow
    from dagster_project.definitions import defs
    from ecg_r1.tracking import model_registry, serving

    seed_mlflow_db(tmp_path / "mlflow" / "mlflow.db")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", device_rule.DEVICE_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ECG_R1_HOME", str(tmp_path))
    previous_uri = mlflow.get_tracking_uri()
    run_config = yaml.safe_load(STANDIN_RUN_CONFIG.read_text())
    run_config["resources"] = {"dvc": {"config": {"track": False}}}
    try:
        result = defs().resolve_job_def("full_pipeline_job").execute_in_process(run_config=run_config)
        assert result.success
        models = tmp_path / "data" / "models"
        checkpoint = json.loads((models / "base_model" / "checkpoint.json").read_text())
        start = Path(checkpoint["model_dir"])
        assert start == (models / "standin").resolve() and len(checkpoint["content_sha256"]) == 64
        assert not (
            models / "vision_pretrained_model" / "result.json"
        ).exists()  # the 2B profile asks for none
        sft = json.loads((models / "sft_model" / "result.json").read_text())
        grpo = json.loads((models / "grpo_model" / "result.json").read_text())
        assert sft["steps"] == grpo["steps"] == 2
        moved = moved_fraction(weights(start), weights(Path(sft["model_dir"])))
        assert moved and min(moved.values()) >= 0.9, sorted(moved.items(), key=lambda kv: kv[1])[:5]
        info = json.loads((Path(grpo["model_dir"]) / "ecg_r1_model.json").read_text())
        assert Path(info["started_from"]).resolve() == start  # GRPO from the base, as the profile says
        assert sft["registered"].startswith("ecg-r1-sft/") and grpo["registered"].startswith("ecg-r1-grpo/")
        monkeypatch.setenv(device_rule.DEVICE_ENV, "cpu")  # the served 2B model, on the CPU on purpose
        served = mlflow.pyfunc.load_model("models:/ecg-r1-grpo@champion")
        page = __import__("PIL.Image", fromlist=["Image"]).open(
            next((tmp_path / "data" / "images").rglob("*.png"))
        )
        request = pd.DataFrame(
            [{"image": serving.encode_image(page), "note": "Chest pain.", "age": 63.0, "sex": "F"}]
        )
        [row] = served.predict(request, params={"max_new_tokens": 8}).to_dict(orient="records")
        assert set(row) == set(serving.OUTPUT_COLUMNS) and 0.0 <= row["p_yes"] <= 1.0
        assert model_registry.alias_version("ecg-r1-sft", "champion") is not None
    finally:
        mlflow.set_tracking_uri(previous_uri)


class TestPagesMatchTheProfile:
    def test_224_px_pages_are_refused_for_the_896_px_profile(self, tmp_path):
        from ecg_r1.imaging.render import PAGE_FILE, page_mismatch

        data = make_cohort(tmp_path, n=4, width=224)
        assert (data["images"] / PAGE_FILE).is_file()
        problem = page_mismatch(data["images"], load_profile("qwen2-vl-2b").render_config())
        assert problem and "224x173" in problem and "896x692" in problem
        (data["images"] / PAGE_FILE).unlink()  # a folder from before page.json: judged by its pages' size
        assert "224x173" in page_mismatch(data["images"], load_profile("qwen2-vl-2b").render_config())
        tiny_page = load_profile("tiny").render_config()  # the same size in another layout
        assert page_mismatch(data["images"], tiny_page) is None  # (layout unknown without page.json)

    @pytest.mark.slow  # a fresh ecg-r1 process imports the training stack: about 5 s
    def test_train_cli_refuses_pages_of_another_size(self, tmp_path):
        data = make_cohort(tmp_path, n=4, width=224)
        done = subprocess.run(
            [sys.executable, "-m", "ecg_r1.cli", "train", "sft", "--profile", "qwen2-vl-2b"]
            + [
                "--cohort",
                str(data["cohort"]),
                "--splits",
                str(data["splits"]),
                "--images",
                str(data["images"]),
            ]
            + ["--out", str(tmp_path / "out"), "--no-tracking"],
            capture_output=True,
            text=True,
            env={**__import__("os").environ, device_rule.DEVICE_ENV: "cpu"},
            cwd=REPO,
            timeout=120,
        )
        assert done.returncode != 0 and "896x692" in done.stderr and "Traceback" not in done.stderr
        assert not (tmp_path / "out" / "base_model").exists()  # refused before anything was fetched or built


class TestSetup:
    def _plan(self, tmp_path: Path, nvidia_smi: bool, *variables: str) -> list[str]:
        import os
        import shutil

        for name in ("Makefile", "pyproject.toml", "constraints.txt"):
            shutil.copy(REPO / name, tmp_path / name)
        fake = tmp_path / "bin"
        fake.mkdir(exist_ok=True)
        if nvidia_smi:
            (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100'\n")
            (fake / "nvidia-smi").chmod(0o755)
        path = os.pathsep.join([str(fake), *(p for p in os.environ["PATH"].split(os.pathsep) if p)])
        done = subprocess.run(
            ["make", "-n", ".venv/.installed", *variables],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={**os.environ, "PATH": path},
            check=True,
        )
        return [line for line in done.stdout.splitlines() if "pip install" in line]

    @pytest.mark.skipif(__import__("shutil").which("nvidia-smi") is not None, reason="a GPU machine")
    def test_make_setup_picks_the_torch_build(self, tmp_path):
        cpu = self._plan(tmp_path, nvidia_smi=False)
        assert any(line.endswith("pip install -q torch==2.13.0") for line in (c.rstrip() for c in cpu))
        assert not any("[gpu]" in line or "download.pytorch.org/whl/cu" in line for line in cpu)
        gpu = self._plan(tmp_path, nvidia_smi=True)
        assert any("torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" in line for line in gpu)
        assert any("'.[gpu]'" in line for line in gpu)
        forced = self._plan(tmp_path, True, "ECG_R1_TORCH=cpu")  # the override: a CPU build on a GPU machine
        assert not any("[gpu]" in line for line in forced)


def test_gpu_check_takes_the_cpu_switches_out_on_a_gpu():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    on_gpu, on_cpu = gpu_check.standin_run_config(False), gpu_check.standin_run_config(True)
    assert not any("device" in op["config"] for op in on_gpu["ops"].values())
    assert {op["config"].get("device") for op in on_cpu["ops"].values()} >= {"cpu"}
    assert on_gpu["resources"]["dvc"]["config"]["track"] is False


def test_the_graph_follows_the_profile_for_pretrained_sources():
    from dagster_project.defs.assets import model_assets as ma

    grpo_deps = {key.to_user_string() for key in ma.grpo_model.asset_deps[ma.grpo_model.key]}
    assert "base_model" in grpo_deps  # the 2B profile's GRPO start is upstream of GRPO
    assert ma.grpo_start_asset("qwen2-vl-2b") == "base_model" and ma.grpo_start_asset("tiny") == "sft_model"
    # a pretrained tower is not pre-trained again: SFT starts from the base model
    assert (
        ma.after_vision("qwen2-vl-2b") == "base_model"
        and ma.after_vision("tiny") == "vision_pretrained_model"
    )
