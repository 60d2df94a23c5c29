"""Model profiles, the tiny Qwen2-VL, its tokenizer and processor, and model folders.

The GPU profiles are checked for the configuration they produce (trainer config values, LoRA
targets) without loading their weights; the tiny profile is built and run.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ecg_r1.modeling.build import build_base_model, corpus_from_cases, train_tokenizer
from ecg_r1.modeling.contract import format_target
from ecg_r1.modeling.models import MODEL_INFO_FILE, load_model_and_processor, save_model_folder
from ecg_r1.modeling.processor import SPECIAL_TOKENS, image_tokens, load_processor
from ecg_r1.modeling.profiles import (
    ProfileError,
    available_profiles,
    load_profile,
    lora_config,
)
from ecg_r1.modeling.prompts import build_multimodal_prompt
from ecg_r1.modeling.stage_settings import STAGE_DEFAULTS, STAGE_SECTIONS

CASES = [
    {
        "age": 40 + i,
        "sex": "MF"[i % 2],
        "note": f"Chest pain {i} h, troponin {i / 10:.1f} ng/mL.",
        "twi_leads": "V1,V2,V3",
    }
    for i in range(40)
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_base_model(
        load_profile("tiny"), corpus_from_cases(CASES), tmp_path_factory.mktemp("tiny") / "base"
    )


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model_and_processor(tiny_dir, load_profile("tiny"))


def rendered_page(profile):
    from ecg_r1.imaging.draw import render_page

    signal = np.random.default_rng(0).normal(0, 0.2, (12, 5000)).astype(np.float32)
    return render_page(signal, profile.render_config())


def write_profile(tmp_path: Path, base: str = "tiny", **changes) -> Path:
    raw = yaml.safe_load(load_profile(base).path.read_text())
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = tmp_path / f"{base}-variant.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class TestLoadProfile:
    def test_shipped_profiles_load(self):
        assert {"tiny", "qwen2-vl-2b", "qwen2-vl-7b"} <= set(available_profiles())
        for name in available_profiles():
            profile = load_profile(name)
            assert profile.name == name and profile.path.is_file()

    def test_stage_defaults_are_what_the_shipped_profiles_use(self):
        """A setting every measured profile sets the same way is the default, not a repeated key."""
        for name in available_profiles():
            raw = yaml.safe_load(load_profile(name).path.read_text())
            assert "finding_targets" not in (raw.get("stages") or {}).get("vision_pretrain", {}), name
            assert load_profile(name).stage_settings("vision")["finding_targets"] is False

    def test_tiny_is_built_here_and_gpu_profiles_come_from_the_hub(self):
        assert load_profile("tiny").is_tiny and load_profile("tiny").dtype == "float32"
        for name, hub_id in (
            ("qwen2-vl-2b", "Qwen/Qwen2-VL-2B-Instruct"),
            ("qwen2-vl-7b", "Qwen/Qwen2-VL-7B-Instruct"),
        ):
            profile = load_profile(name)
            assert profile.source == hub_id and profile.tiny is None
            assert profile.dtype == "bfloat16" and profile.gradient_checkpointing

    def test_unknown_profile_lists_the_shipped_ones(self):
        with pytest.raises(ProfileError, match="qwen2-vl-2b"):
            load_profile("gpt-5")

    def test_unknown_key_is_named(self, tmp_path):
        with pytest.raises(ProfileError, match="learning_rat"):
            load_profile(write_profile(tmp_path, model__learning_rat=1)).trainer_kwargs("sft")

    def test_misspelt_trainer_field_is_refused(self, tmp_path):
        profile = load_profile(write_profile(tmp_path, grpo__num_generation=4))
        with pytest.raises(ProfileError, match="num_generation.*GRPOConfig"):
            profile.trainer_kwargs("grpo")

    def test_bad_dtype_and_pixel_bounds_are_refused(self, tmp_path):
        with pytest.raises(ProfileError, match="dtype"):
            load_profile(write_profile(tmp_path, model__dtype="int8"))
        with pytest.raises(ProfileError, match="min_pixels"):
            load_profile(write_profile(tmp_path, image__min_pixels=10**7))
        with pytest.raises(ProfileError, match="vllm_mode"):
            load_profile(write_profile(tmp_path, model__vllm_mode="remote"))
        with pytest.raises(ProfileError, match="image.layout 'medians'.*medians\+rhythm"):
            load_profile(write_profile(tmp_path, image__layout="medians"))
        page = load_profile(write_profile(tmp_path, image__layout="medians+rhythm")).render_config()
        assert page.layout == "medians+rhythm" and page.width_px == 224
        with pytest.raises(ProfileError, match="image.position 'last'.*before_question"):
            load_profile(write_profile(tmp_path, image__position="last"))
        with pytest.raises(ProfileError, match="model.unseen_note_words 'drop' is not one of keep, mark"):
            load_profile(write_profile(tmp_path, model__unseen_note_words="drop"))
        # the default where a profile is silent
        assert load_profile("qwen2-vl-2b").unseen_note_words == "keep"

    def test_generations_must_divide_the_batch(self, tmp_path):
        profile = load_profile(write_profile(tmp_path, grpo__num_generations=3))
        with pytest.raises(ProfileError, match="divisible by num_generations"):
            profile.trainer_kwargs("grpo")

    def test_stage_settings_fill_defaults_and_refuse_unknown_keys(self, tmp_path):
        tiny = load_profile("tiny")
        for stage, section in STAGE_SECTIONS.items():
            assert set(tiny.stage_settings(stage)) == set(STAGE_DEFAULTS[section])
        assert tiny.stage_settings("sft")["note_dropout"] == 0.33  # the profile's value wins
        assert tiny.stage_settings("sft")["rationale_findings"] is False  # the library default
        with pytest.raises(ProfileError, match="note_dropuot.*stages.sft"):
            load_profile(write_profile(tmp_path, stages__sft__note_dropuot=0.5))
        with pytest.raises(ProfileError, match="stages"):
            load_profile(write_profile(tmp_path, stages__vision=dict(steps=3)))

    def test_image_tokens_follow_the_page_size(self):
        assert image_tokens(load_profile("tiny")) == 48  # 224 x 173 page -> 224 x 168 -> 8 x 6
        assert image_tokens(load_profile("qwen2-vl-2b")) == 800  # 896 x 692 -> 896 x 700 -> 32 x 25


class TestTrainerKwargs:
    def test_gpu_grpo_config_has_the_paper_setting(self, tmp_path):
        from trl import GRPOConfig

        kwargs = load_profile("qwen2-vl-2b").trainer_kwargs("grpo")
        # use_cpu only so this CPU machine accepts bf16; every other value is the profile's.
        config = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, **kwargs)
        assert config.bf16 and config.gradient_checkpointing
        assert config.num_generations == 8 and config.beta == 0.04 and config.temperature == 1.0
        assert config.max_completion_length == 512 and config.learning_rate == 1e-6
        assert config.reward_weights == [1.0, 1.0, 0.0]
        assert not config.use_vllm

    def test_sft_has_no_length_cap_unless_the_profile_sets_one(self, tmp_path):
        from trl import SFTConfig

        assert "max_length" not in load_profile("tiny").sft  # the default, not a profile key
        assert (
            SFTConfig(output_dir=str(tmp_path), **load_profile("tiny").trainer_kwargs("sft")).max_length
            is None
        )
        capped = load_profile(write_profile(tmp_path, sft__max_length=2048))
        assert capped.trainer_kwargs("sft")["max_length"] == 2048
        assert "max_length" not in capped.trainer_kwargs("grpo")

    def test_gpu_sft_config(self, tmp_path):
        from trl import SFTConfig

        config = SFTConfig(
            output_dir=str(tmp_path), use_cpu=True, **load_profile("qwen2-vl-7b").trainer_kwargs("sft")
        )
        assert config.bf16 and config.max_length is None and config.learning_rate == 1e-4

    def test_tiny_configs_run_on_cpu(self, tmp_path):
        from trl import GRPOConfig, SFTConfig

        tiny = load_profile("tiny")
        grpo = GRPOConfig(output_dir=str(tmp_path), **tiny.trainer_kwargs("grpo"))
        sft = SFTConfig(output_dir=str(tmp_path), **tiny.trainer_kwargs("sft"))
        assert not grpo.bf16 and not grpo.gradient_checkpointing and not sft.bf16
        assert grpo.per_device_train_batch_size % grpo.num_generations == 0
        assert sft.max_length is None  # a length cap can cut through image tokens

    def test_mixed_precision_trains_float32_weights_in_bfloat16(self, tmp_path):
        from trl import SFTConfig

        profile = load_profile(write_profile(tmp_path, model__mixed_precision="bfloat16"))
        assert profile.dtype == "float32" and profile.torch_dtype() == torch.float32
        kwargs = profile.trainer_kwargs("sft")
        assert kwargs["bf16"] is True and kwargs["fp16"] is False
        assert SFTConfig(output_dir=str(tmp_path), use_cpu=True, **kwargs).bf16
        assert load_profile("smol").trainer_kwargs("grpo")["bf16"] is True  # the CPU long run's setting
        assert load_profile("tiny").training_precision == "float32"  # tiny: autocast overhead, no gain
        with pytest.raises(
            ProfileError, match="model.mixed_precision .float32. is not one of bfloat16, float16 or null"
        ):
            load_profile(write_profile(tmp_path, model__mixed_precision="float32"))

    def test_vllm_switch_reaches_grpo(self, tmp_path):
        kwargs = load_profile(write_profile(tmp_path, "qwen2-vl-2b", model__use_vllm=True)).trainer_kwargs(
            "grpo"
        )
        assert kwargs["use_vllm"] is True and kwargs["vllm_mode"] == "server"

    def test_unknown_kind_is_refused(self):
        with pytest.raises(ProfileError, match="'sft' or 'grpo'"):
            load_profile("tiny").trainer_kwargs("dpo")


class TestLoraConfig:
    def test_full_fine_tuning_profiles_give_none(self):
        assert lora_config(load_profile("tiny")) is None
        assert lora_config(load_profile("qwen2-vl-2b")) is None

    def test_7b_lora_targets_the_language_model_projections(self):
        config = lora_config(load_profile("qwen2-vl-7b"))
        assert config.r == 64 and config.lora_alpha == 128
        assert set(config.target_modules) == {
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        }

    def test_targets_hit_only_the_language_model_of_the_real_architecture(self, tiny_dir):
        from peft import get_peft_model

        model, _ = load_model_and_processor(tiny_dir, load_profile("tiny"))
        peft_model = get_peft_model(model, lora_config(load_profile("qwen2-vl-7b")))
        adapted = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")]
        assert adapted and all(".language_model." in name for name in adapted)
        assert {name.rsplit(".", 1)[-1] for name in adapted} == set(
            lora_config(load_profile("qwen2-vl-7b")).target_modules
        )
        trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)


class TestTokenizer:
    def test_special_tokens_come_first_and_text_round_trips(self):
        tokenizer = train_tokenizer(corpus_from_cases(CASES), vocab_size=300)
        assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(7))
        assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
        text = format_target(True, "T-wave inversion in V1-V3 (anterior). Ünïcode ok")
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
        assert len(tokenizer) <= 300

    def test_tiny_vocabulary_spells_each_answer_as_one_token(self, tiny):
        # so P(Yes) in ecg_r1.modeling.inference is a plain next-token probability for the tiny model
        tokenizer = tiny[1].tokenizer
        assert len(tokenizer("Yes", add_special_tokens=False)["input_ids"]) == 1
        assert len(tokenizer("No", add_special_tokens=False)["input_ids"]) == 1

    def test_empty_corpus_is_refused(self):
        with pytest.raises(ValueError, match="corpus is empty"):
            train_tokenizer([])


class TestBuildBaseModel:
    def test_folder_holds_model_tokenizer_processor_and_summary(self, tiny_dir):
        names = {p.name for p in tiny_dir.iterdir()}
        assert {
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "processor_config.json",
            MODEL_INFO_FILE,
        } <= names
        info = json.loads((tiny_dir / MODEL_INFO_FILE).read_text())
        assert info["profile"] == "tiny" and info["image_tokens"] == 48
        assert 1_000_000 < info["parameters"] < 4_000_000

    def test_config_token_ids_match_the_tokenizer(self, tiny):
        model, processor = tiny
        tokenizer = processor.tokenizer
        assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
        assert model.config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
        assert model.config.text_config.vocab_size == len(tokenizer)

    def test_forward_pass_with_a_rendered_page(self, tiny):
        model, processor = tiny
        profile = load_profile("tiny")
        text = processor.apply_chat_template(
            build_multimodal_prompt(63, "F", "chest pain"), add_generation_prompt=True
        )
        assert "<|vision_start|><|image_pad|><|vision_end|>" in text and text.endswith(
            "<|im_start|>assistant\n"
        )
        inputs = processor(text=[text], images=[rendered_page(profile).convert("RGB")], return_tensors="pt")
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == image_tokens(profile)
        with torch.no_grad():
            logits = model(**inputs).logits
        assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))
        assert torch.isfinite(logits).all()

    def test_a_tower_merging_4x4_patches_gets_pages_cut_for_it(self, tmp_path):
        profile = load_profile(write_profile(tmp_path, model__tiny__vision__spatial_merge_size=4))
        assert image_tokens(profile) == 12  # 224 x 173 px -> 16 x 12 patches -> 4 x 3 tokens
        folder = build_base_model(profile, corpus_from_cases(CASES), tmp_path / "merge4")
        model, processor = load_model_and_processor(folder, profile)  # the saved processor reloads
        text = processor.apply_chat_template(
            build_multimodal_prompt(63, "F", None), add_generation_prompt=True
        )
        inputs = processor(text=[text], images=[rendered_page(profile).convert("RGB")], return_tensors="pt")
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 12
        with torch.no_grad():
            assert torch.isfinite(model(**inputs).logits).all()

    def test_same_seed_same_weights(self, tiny_dir, tmp_path):
        again = build_base_model(load_profile("tiny"), corpus_from_cases(CASES), tmp_path / "again")
        first = (tiny_dir / "model.safetensors").read_bytes()
        assert (again / "model.safetensors").read_bytes() == first

    def test_hub_profile_with_a_local_folder_builds_nothing(self, tiny_dir, tmp_path):
        profile = load_profile(write_profile(tmp_path, "qwen2-vl-2b", model__source=str(tiny_dir)))
        assert build_base_model(profile, [], tmp_path / "unused") == tiny_dir
        assert not (tmp_path / "unused").exists()

    def test_unresolvable_hub_source_says_what_to_do(self, tmp_path):
        profile = load_profile(write_profile(tmp_path, "qwen2-vl-2b", model__source="not a repo id!"))
        with pytest.raises(ValueError, match="cannot resolve model"):
            build_base_model(profile, [], tmp_path / "x")


class TestProcessor:
    def test_loads_without_a_video_processor_with_profile_pixel_bounds(self, tiny_dir, tmp_path):
        profile = load_profile(write_profile(tmp_path, image__max_pixels=28 * 28 * 16))
        processor = load_processor(tiny_dir, profile)
        assert type(processor).__name__ == "ECGProcessor"
        assert not hasattr(processor, "video_processor")
        inputs = processor(
            text=["<|image_pad|>"], images=[rendered_page(load_profile("tiny")).convert("RGB")]
        )
        assert len(inputs["input_ids"][0]) <= 16  # the cap on image tokens comes from the profile

    def test_prompts_put_the_page_where_the_profile_says(self, tiny_dir, tmp_path):
        from ecg_r1.modeling.inference import prompt_texts

        example = {"image": rendered_page(load_profile("tiny")), "age": 50, "sex": "M", "note": "chest pain"}
        at_first = load_profile(write_profile(tmp_path, image__position="first"))
        first = prompt_texts(load_processor(tiny_dir, at_first), [example])[0]
        profile = load_profile(write_profile(tmp_path, image__position="before_question"))
        late = prompt_texts(load_processor(tiny_dir, profile), [example])[0]
        page = "<|vision_start|><|image_pad|><|vision_end|>"
        assert first.index(page) < first.index("chest pain")
        assert late.index("chest pain") < late.index(page) < late.index("Is the T-wave inversion")

    def test_unseen_note_words_are_marked_with_the_vocabulary_the_folder_carries(
        self, tiny_dir, tmp_path, caplog
    ):
        import shutil

        from ecg_r1.modeling.inference import prompt_texts
        from ecg_r1.modeling.processor import NOTE_VOCABULARY_FILE, read_note_vocabulary

        example = {
            "image": rendered_page(load_profile("tiny")),
            "age": 50,
            "sex": "M",
            "note": "Kein Brustschmerz, chest pain 4,5",
        }
        marking = load_profile(write_profile(tmp_path, model__unseen_note_words="mark"))
        folder = tmp_path / "model"
        shutil.copytree(tiny_dir, folder)
        # A folder no training stage wrote has no vocabulary: the notes go as written, with a warning.
        assert read_note_vocabulary(folder) is None
        with caplog.at_level("WARNING", logger="ecg_r1.modeling.inference"):
            unmarked = prompt_texts(load_processor(folder, marking), [example])[0]
        assert "Kein Brustschmerz" in unmarked and "no note_vocabulary.json" in caplog.text
        processor = load_processor(folder, marking)
        processor.note_vocabulary = frozenset({"chest", "pain"})
        save_model_folder(load_model_and_processor(folder, marking)[0], processor, folder)
        assert json.loads((folder / NOTE_VOCABULARY_FILE).read_text()) == ["chest", "pain"]
        marked = prompt_texts(load_processor(folder, marking), [example])[0]
        assert "Clinical note: ? ?, chest pain 4,5" in marked
        keeping = load_profile(write_profile(tmp_path, model__unseen_note_words="keep"))
        kept = prompt_texts(load_processor(folder, keeping), [example])[0]
        assert "Clinical note: Kein Brustschmerz, chest pain 4,5" in kept
        (folder / NOTE_VOCABULARY_FILE).write_text('{"chest": 1}')
        with pytest.raises(ValueError, match="JSON list of words"):
            load_processor(folder, marking)

    def test_pickles(self, tiny):
        _, processor = tiny
        restored = pickle.loads(pickle.dumps(processor))
        assert restored.tokenizer.get_vocab() == processor.tokenizer.get_vocab()

    def test_folder_without_a_model_is_refused(self, tmp_path):
        with pytest.raises(ValueError, match="not a model folder"):
            load_model_and_processor(tmp_path, load_profile("tiny"))


class TestSaveModelFolder:
    def test_lora_model_is_saved_merged_and_reloads_alone(self, tiny_dir, tmp_path):
        from peft import get_peft_model

        profile = load_profile("tiny")
        model, processor = load_model_and_processor(tiny_dir, profile)
        peft_model = get_peft_model(model, lora_config(load_profile("qwen2-vl-7b")))
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.5)  # a trained adapter changes the weights
        out = save_model_folder(peft_model, processor, tmp_path / "merged", info={"stage": "sft"})
        reloaded, _ = load_model_and_processor(out, profile)
        base, _ = load_model_and_processor(tiny_dir, profile)
        key = "model.language_model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(reloaded.state_dict()[key], base.state_dict()[key])
        assert not any("lora" in k for k in reloaded.state_dict())
        assert json.loads((out / MODEL_INFO_FILE).read_text()) == {"stage": "sft"}
