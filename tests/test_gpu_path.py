"""The GPU profiles' code path on a CPU: float32 master weights under bfloat16 autocast, the
device rule (a GPU profile without a GPU stops unless ECG_R1_DEVICE=cpu), the stand-in
checkpoint, and vLLM's generation arguments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import make_cohort

from ecg_r1.modeling import device as device_rule
from ecg_r1.modeling.build import build_random_model, corpus_from_cases
from ecg_r1.modeling.profiles import PROFILES_DIR, load_profile, random_architecture

REPO = Path(__file__).resolve().parents[1]
STANDIN_SIZES = REPO / "ecg_r1" / "configs" / "random_models" / "qwen2-vl-2b-standin.yaml"
CORPUS = [{"age": 60, "sex": "F", "note": "chest pain, troponin raised", "twi_leads": "V2,V3"}] * 4


def standin_model(folder: Path) -> Path:
    import yaml

    sizes = random_architecture(yaml.safe_load(STANDIN_SIZES.read_text()), str(STANDIN_SIZES))
    profile = load_profile("qwen2-vl-2b")
    return build_random_model(profile, sizes, corpus_from_cases(CORPUS), folder, source="random")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return {name: tensor.float() for name, tensor in tensors.items()}


def moved_fraction(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per weight matrix (2-D or more) the share of elements that changed."""
    return {
        name: float((after[name] != value).float().mean())
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
            tracking=False,
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
