"""Launch configurations for more than one GPU (ecg_r1/configs/launch), checked on a CPU.

Each accelerate YAML is read with accelerate's own config class, each DeepSpeed JSON is filled
with transformers' own "auto" code, and every shipped launch config x GPU profile x stage keeps the
profile's global batch and GRPO's whole groups of completions.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from ecg_r1.modeling.profiles import load_profile
from ecg_r1.training.launch import (
    LaunchError,
    available_launch_configs,
    check_zero3,
    fill_deepspeed_config,
    load_launch_config,
    plan_launch,
    preflight,
    profile_hidden_size,
    with_launch_config,
)

GPU_PROFILES = ("qwen2-vl-2b", "qwen2-vl-7b", "smol")
SHIPPED = ("ddp", "zero2", "zero3")
PROCESS_COUNTS = (1, 2, 4, 8)


def write_launch(tmp_path: Path, base: str, **changes) -> Path:
    raw = yaml.safe_load(load_launch_config(base).path.read_text())
    raw.update(changes)
    path = tmp_path / f"{base}-variant.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class TestLoadLaunchConfig:
    def test_shipped_configs_load_with_accelerate(self):
        from accelerate.commands.config.config_args import ClusterConfig

        assert set(SHIPPED) <= set(available_launch_configs())
        for name in SHIPPED:
            launch = load_launch_config(name)
            cluster = ClusterConfig.from_yaml_file(str(launch.path))
            assert cluster.num_processes == launch.num_processes >= 2

    def test_kinds_and_zero_stages(self):
        assert load_launch_config("ddp").distributed_type == "MULTI_GPU"
        assert load_launch_config("ddp").deepspeed is None
        zero2, zero3 = load_launch_config("zero2"), load_launch_config("zero3")
        assert (zero2.distributed_type, zero2.zero_stage, zero2.zero3_init_flag) == ("DEEPSPEED", 2, False)
        assert (zero3.distributed_type, zero3.zero_stage, zero3.zero3_init_flag) == ("DEEPSPEED", 3, True)

    def test_deepspeed_json_path_is_relative_to_the_repository_root(self):
        for name in ("zero2", "zero3"):
            launch = load_launch_config(name)
            written = yaml.safe_load(launch.path.read_text())["deepspeed_config"]["deepspeed_config_file"]
            assert not Path(written).is_absolute()
            assert launch.deepspeed_path.samefile(Path(__file__).resolve().parents[1] / written)

    def test_unknown_key_is_refused_by_accelerate(self, tmp_path):
        with pytest.raises(LaunchError, match="accelerate refuses.*num_gpus"):
            load_launch_config(write_launch(tmp_path, "ddp", num_gpus=4))

    def test_mixed_precision_beside_a_deepspeed_json_is_refused(self, tmp_path):
        with pytest.raises(LaunchError, match="mixed_precision"):
            load_launch_config(write_launch(tmp_path, "zero2", mixed_precision="bf16"))

    def test_zero_stage_beside_a_deepspeed_json_is_refused(self, tmp_path):
        raw = yaml.safe_load(load_launch_config("zero2").path.read_text())
        raw["deepspeed_config"]["zero_stage"] = 2
        path = tmp_path / "clash.yaml"
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(LaunchError, match="zero_stage"):
            load_launch_config(path)

    def test_missing_deepspeed_json_is_refused(self, tmp_path):
        raw = yaml.safe_load(load_launch_config("zero3").path.read_text())
        raw["deepspeed_config"]["deepspeed_config_file"] = "nowhere/ds.json"
        path = tmp_path / "missing.yaml"
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(LaunchError, match="not found"):
            load_launch_config(path)

    def test_unknown_name_lists_the_shipped_ones(self):
        with pytest.raises(LaunchError, match="zero3"):
            load_launch_config("zero4")


class TestPlan:
    @pytest.mark.parametrize("profile_name", GPU_PROFILES)
    @pytest.mark.parametrize("kind", ["sft", "grpo"])
    @pytest.mark.parametrize("processes", PROCESS_COUNTS)
    def test_global_batch_is_the_profiles(self, profile_name, kind, processes):
        profile = load_profile(profile_name)
        section = profile.sft if kind == "sft" else profile.grpo
        intended = section["per_device_train_batch_size"] * section["gradient_accumulation_steps"]
        plan = plan_launch(profile, kind, processes)
        assert plan.per_device_train_batch_size * plan.gradient_accumulation_steps * processes == intended
        assert plan.global_batch == intended
        assert plan.per_device_train_batch_size <= section["per_device_train_batch_size"]
        if kind == "grpo":
            assert plan.generation_batch % section["num_generations"] == 0

    def test_accumulation_shrinks_before_the_per_device_batch(self):
        plan = plan_launch(load_profile("qwen2-vl-2b"), "sft", 4)  # 4 x 4 on one GPU
        assert (plan.per_device_train_batch_size, plan.gradient_accumulation_steps) == (4, 1)
        plan = plan_launch(load_profile("qwen2-vl-2b"), "grpo", 4)  # 8 x 2 on one GPU
        assert (plan.per_device_train_batch_size, plan.gradient_accumulation_steps) == (4, 1)

    def test_a_batch_that_does_not_split_is_refused(self):
        with pytest.raises(LaunchError, match=r"does not split over 3 processes.*\[1, 2, 4, 8, 16\]"):
            plan_launch(load_profile("qwen2-vl-2b"), "grpo", 3)

    def test_split_prompt_groups_are_refused(self):
        profile = load_profile("qwen2-vl-2b")
        # 16 completions a step in groups of 3: the sixth prompt's group would be split.
        odd = replace(profile, grpo={**profile.grpo, "num_generations": 3})
        with pytest.raises(
            LaunchError, match=r"\(16 completions\) must be divisible by num_generations \(3\)"
        ):
            plan_launch(odd, "grpo", 2)

    def test_generation_batch_must_hold_whole_steps(self):
        profile = load_profile("qwen2-vl-2b")
        # On 2 processes a step is 8 x 2 = 16 completions; TRL generates whole steps at a time.
        odd = replace(profile, grpo={**profile.grpo, "generation_batch_size": 12})
        with pytest.raises(LaunchError, match=r"generation_batch_size \(12\) must be divisible"):
            plan_launch(odd, "grpo", 2)
        steps = replace(profile, grpo={**profile.grpo, "steps_per_generation": 4})
        assert plan_launch(steps, "grpo", 2).generation_batch == 8 * 2 * 4

    @pytest.mark.parametrize("profile_name", GPU_PROFILES)
    def test_generation_batch_agrees_with_trl_on_one_process(self, profile_name, tmp_path):
        from trl import GRPOConfig

        profile = load_profile(profile_name)
        plan = plan_launch(profile, "grpo", 1)
        kwargs = profile.trainer_kwargs("grpo") | plan.trainer_overrides() | {"bf16": False}
        config = GRPOConfig(output_dir=str(tmp_path), **kwargs)
        assert config.generation_batch_size == plan.generation_batch
        assert config.per_device_train_batch_size == plan.per_device_train_batch_size

    def test_a_deepspeed_launch_adds_only_its_json_to_the_stage(self):
        profile = load_profile("qwen2-vl-2b")
        planned = with_launch_config(profile, "grpo", load_launch_config("zero3"))
        assert Path(planned.grpo.pop("deepspeed")) == load_launch_config("zero3").deepspeed_path
        assert planned.grpo == profile.grpo and planned.sft == profile.sft
        assert with_launch_config(profile, "sft", load_launch_config("ddp")) == profile


class TestDeepSpeedJson:
    @pytest.mark.parametrize("name", ["zero2", "zero3"])
    @pytest.mark.parametrize("profile_name", GPU_PROFILES)
    @pytest.mark.parametrize("kind", ["sft", "grpo"])
    def test_every_auto_is_filled_from_the_training_arguments(self, name, profile_name, kind):
        launch = load_launch_config(name)
        profile = load_profile(profile_name)
        plan = plan_launch(profile, kind, launch.num_processes)
        kwargs = profile.trainer_kwargs(kind) | plan.trainer_overrides()
        filled = fill_deepspeed_config(
            launch.deepspeed, kwargs, launch.num_processes, profile_hidden_size(profile)
        )
        assert "auto" not in json.dumps(filled)
        assert filled["train_batch_size"] == plan.global_batch
        assert filled["train_micro_batch_size_per_gpu"] == plan.per_device_train_batch_size
        assert filled["gradient_accumulation_steps"] == plan.gradient_accumulation_steps
        assert filled["bf16"]["enabled"] is (profile.training_precision == "bfloat16")
        assert filled["zero_optimization"]["stage"] == launch.zero_stage
        assert launch.deepspeed["train_batch_size"] == "auto"  # the loaded JSON is left as written

    def test_explicit_value_that_disagrees_is_refused(self):
        launch = load_launch_config("zero2")
        profile = load_profile("qwen2-vl-2b")
        wrong = {**launch.deepspeed, "train_batch_size": 64}
        with pytest.raises(LaunchError, match="train_batch_size"):
            fill_deepspeed_config(wrong, profile.trainer_kwargs("sft"), 8, 1536)

    def test_auto_that_nothing_fills_is_refused(self):
        launch = load_launch_config("zero3")
        profile = load_profile("qwen2-vl-2b")
        odd = json.loads(json.dumps(launch.deepspeed))
        odd["zero_optimization"]["stage3_max_live_parameters"] = "auto"
        with pytest.raises(LaunchError, match="stage3_max_live_parameters"):
            fill_deepspeed_config(odd, profile.trainer_kwargs("sft"), 8, 1536)

    def test_hidden_sizes(self):
        assert profile_hidden_size(load_profile("qwen2-vl-2b")) == 1536
        assert profile_hidden_size(load_profile("qwen2-vl-7b")) == 3584
        assert profile_hidden_size(load_profile("smol")) == 576
        assert profile_hidden_size(load_profile("tiny")) == 192


class TestZero3AndVllm:
    def test_vllm_without_gathered_weights_is_refused_under_zero3_only(self):
        profile = load_profile("qwen2-vl-2b")
        odd = replace(profile, use_vllm=True, grpo={**profile.grpo, "ds3_gather_for_generation": False})
        with pytest.raises(LaunchError, match="ds3_gather_for_generation"):
            check_zero3(odd, "grpo", load_launch_config("zero3"))
        check_zero3(odd, "grpo", load_launch_config("zero2"))  # only ZeRO-3 shards the weights

    def test_lora_is_refused_under_zero3_only(self):
        profile = load_profile("qwen2-vl-7b")  # LoRA
        with pytest.raises(LaunchError, match="LoRA under ZeRO-3"):
            check_zero3(profile, "sft", load_launch_config("zero3"))
        check_zero3(profile, "sft", load_launch_config("zero2"))
        check_zero3(
            replace(profile, lora=replace(profile.lora, enabled=False)), "sft", load_launch_config("zero3")
        )

    @pytest.mark.parametrize("profile_name", ["qwen2-vl-2b", "qwen2-vl-7b"])
    def test_vllm_server_mode_is_the_gpu_profiles_choice(self, profile_name):
        profile = load_profile(profile_name)
        assert profile.vllm_mode == "server" and not profile.use_vllm  # a one-GPU run has no server
        kwargs = replace(profile, use_vllm=True).trainer_kwargs("grpo")  # checked against GRPOConfig
        assert kwargs["use_vllm"] is True and kwargs["vllm_mode"] == "server"

    @pytest.mark.parametrize("name", SHIPPED)
    @pytest.mark.parametrize("profile_name", GPU_PROFILES)
    def test_preflight_passes_for_every_shipped_config_with_the_vllm_server(self, name, profile_name):
        # The vLLM server takes one GPU of eight: training runs on the other four of a power of two.
        profile = replace(load_profile(profile_name), use_vllm=True, vllm_mode="server")
        if name == "zero3" and profile.lora.enabled:
            with pytest.raises(LaunchError, match="LoRA under ZeRO-3"):
                preflight(profile, "grpo", name, num_processes=4)
            return
        plan = preflight(profile, "grpo", name, num_processes=4)
        assert plan.num_processes == 4 and plan.generation_batch % plan.num_generations == 0


class TestCommandLine:
    def test_launch_check_prints_the_plan(self, capsys):
        from ecg_r1.cli import main

        code = main(
            ["launch-check", "zero3", "--profile", "qwen2-vl-2b", "--num-processes", "4", "--vllm-server"]
        )
        plan = json.loads(capsys.readouterr().out)
        assert code == 0
        assert (plan["num_processes"], plan["per_device_train_batch_size"], plan["global_batch"]) == (
            4,
            4,
            16,
        )

    def test_launch_check_explains_a_bad_process_count(self, capsys):
        from ecg_r1.cli import main

        assert main(["launch-check", "ddp", "--profile", "qwen2-vl-2b", "--num-processes", "3"]) == 2
        assert "does not split over 3 processes" in capsys.readouterr().err

    def test_train_checks_the_launch_and_keeps_the_profiles_batch(self, monkeypatch):
        from ecg_r1.cli.train import _planned_profile

        monkeypatch.setenv("WORLD_SIZE", "4")
        profile = load_profile("smol")
        assert _planned_profile(profile, "sft", "ddp") == profile  # the stage spreads the batch itself
        monkeypatch.setenv("WORLD_SIZE", "3")
        with pytest.raises(LaunchError, match="does not split over 3 processes"):
            _planned_profile(profile, "sft", "ddp")
        with pytest.raises(ValueError, match="sft and grpo"):
            _planned_profile(profile, "warmup", "ddp")


class TestGlobalBatchWithoutLaunchConfig:
    """`torchrun --nproc_per_node N` alone (no --launch-config) keeps the profile's global batch."""

    @pytest.fixture(autouse=True)
    def _gpu_profiles_on_the_cpu(self, monkeypatch):
        monkeypatch.setenv("ECG_R1_DEVICE", "cpu")  # the GPU profiles' batches, on this CPU on purpose

    @pytest.mark.parametrize("processes", [1, 2, 4, 8])
    @pytest.mark.parametrize("kind", ["sft", "grpo"])
    def test_the_trainer_arguments_spread_the_batch_over_the_processes(
        self, monkeypatch, tmp_path, kind, processes
    ):
        from ecg_r1.training.runner import trainer_config

        profile = load_profile("qwen2-vl-2b")
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        one = trainer_config(profile, kind, tmp_path, None, None, {})
        monkeypatch.setenv("WORLD_SIZE", str(processes))
        many = trainer_config(profile, kind, tmp_path, None, None, {})
        per_step = many["per_device_train_batch_size"] * many["gradient_accumulation_steps"] * processes
        assert per_step == one["per_device_train_batch_size"] * one["gradient_accumulation_steps"]

    def test_a_stage_override_is_spread_too(self, monkeypatch, tmp_path):
        from ecg_r1.training.runner import trainer_config

        monkeypatch.setenv("WORLD_SIZE", "2")
        kwargs = trainer_config(
            load_profile("tiny"), "sft", tmp_path, None, None, {"per_device_train_batch_size": 16}
        )
        assert (kwargs["per_device_train_batch_size"], kwargs["gradient_accumulation_steps"]) == (8, 1)

    def test_a_batch_that_does_not_split_is_refused_in_one_line(self, monkeypatch, tmp_path):
        from ecg_r1.training.runner import trainer_config

        monkeypatch.setenv("WORLD_SIZE", "3")
        with pytest.raises(
            LaunchError, match=r"^profile 'tiny' \(sft\).*does not split over 3 processes[^\n]*$"
        ):
            trainer_config(load_profile("tiny"), "sft", tmp_path, None, None, {})
