"""Profiles are read against their typed definitions (ecg_r1.modeling.profiles.Profile, the stage
settings classes): each setting's type, default and bounds are written once, and a file that
breaks one fails in one line naming the file, the key and what it must be."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from test_models import write_profile

from ecg_r1.data.yaml_config import ConfigFileError, typed_settings
from ecg_r1.modeling import stage_settings
from ecg_r1.modeling.profiles import (
    DEFAULT_MAX_COMPLETION_LENGTH,
    TRAINER_KINDS,
    LoraSettings,
    Profile,
    ProfileError,
    TinyArchitecture,
    available_profiles,
    load_profile,
    load_random_architecture,
)

# A change to the tiny profile (write_profile's dotted keys) -> what the one-line error says.
REFUSED = {
    "wrong type": ({"image__width": "wide"}, "image.width 'wide' is not an integer"),
    "wrong type, boolean": ({"model__use_vllm": "maybe"}, "model.use_vllm 'maybe' is not true or false"),
    "wrong type, nested": ({"lora__r": 2.5}, "lora.r 2.5 is not an integer"),
    "wrong type, stage": ({"stages__sft__freeze_vision": [1]}, r"stages.sft.freeze_vision \[1\] is not true"),
    "section not a mapping": ({"image": 5}, "image 5 is not a mapping"),
    "stage not a mapping": ({"stages__grpo": "sft"}, "stages.grpo 'sft' is not a mapping"),
    "unknown top-level key": ({"modle": {}}, "unknown key modle; allowed: grpo, image, lora, model, name"),
    "unknown key": ({"image__dpi": 200}, "unknown key image.dpi; allowed in image: height, layout"),
    "unknown nested key": ({"lora__rank": 8}, "unknown key lora.rank; allowed in lora: alpha, dropout"),
    "unknown size section": (
        {"model__tiny__txt": {}},
        "unknown key model.tiny.txt; allowed in model.tiny: text",
    ),
    "unknown stage": (
        {"stages__sft_extra": {}},
        "unknown key stages.sft_extra; allowed in stages: format_warmup",
    ),
    "below the bound": ({"image__width": 0}, "image.width 0 is not greater than 0"),
    "above the bound": ({"lora__dropout": 1.0}, "lora.dropout 1.0 is not below 1"),
    "fraction above 1": ({"stages__sft__note_dropout": 1.5}, "stages.sft.note_dropout 1.5 is not at most 1"),
    "fractions over all cases": (
        {"stages__grpo__note_dropout": 0.6, "stages__grpo__note_scramble": 0.6},
        "stages.grpo: note_dropout \\+ note_scramble is 1.2, more than 1",
    ),
    "no steps": ({"stages__vision_pretrain__steps": 0}, "stages.vision_pretrain.steps 0 is not at least 1"),
    "negative seed": ({"seed": -1}, "seed -1 is not at least 0"),
    "no rewards": ({"rewards": {}}, "rewards must not be empty"),
    "unknown choice": (
        {"stages__vision_pretrain__head": "mean"},
        "stages.vision_pretrain.head 'mean' is not one of positional, pooled, positional\\+pooled",
    ),
    "unknown start": ({"stages__grpo__start": "scratch"}, "stages.grpo.start 'scratch' is not one of base"),
    "required key": ({"model__tiny": {"vision": {}}}, "model.tiny.text is required"),
    "sizes for another source": (
        {"model__source": "Qwen/Qwen2-VL-2B-Instruct"},
        "model.tiny is only for source 'tiny'",
    ),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_bad_setting_is_one_line_naming_the_file_and_the_key(tmp_path: Path, case: str) -> None:
    changes, message = REFUSED[case]
    path = write_profile(tmp_path, **changes)
    with pytest.raises(ProfileError, match=message) as refused:
        load_profile(path)
    assert str(refused.value).startswith(f"{path}: ") and "\n" not in str(refused.value)


def test_the_tiny_source_needs_its_sizes(tmp_path: Path) -> None:
    raw = yaml.safe_load(load_profile("tiny").path.read_text())
    del raw["model"]["tiny"]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ProfileError, match="model.tiny needs its text and vision sizes"):
        load_profile(tmp_path / "p.yaml")


def test_a_quoted_boolean_is_read_as_written(tmp_path: Path) -> None:
    """``"false"`` is false (the hand validator's ``bool("false")`` made it true)."""
    profile = load_profile(write_profile(tmp_path, "qwen2-vl-2b", model__gradient_checkpointing="false"))
    assert profile.gradient_checkpointing is False


def test_stage_values_get_their_types_when_the_profile_loads(tmp_path: Path) -> None:
    """A stage setting of the wrong type fails at load, not when the stage reads it; a number
    written as YAML reads it (``1e-3`` without a dot is a string to YAML) becomes the number."""
    with pytest.raises(ProfileError, match="stages.vision_pretrain.steps 'many' is not an integer"):
        load_profile(write_profile(tmp_path, stages__vision_pretrain__steps="many"))
    profile = load_profile(write_profile(tmp_path, stages__format_warmup__learning_rate="1e-3"))
    assert profile.stage_settings("warmup")["learning_rate"] == 1e-3


def test_an_empty_key_takes_its_default(tmp_path: Path) -> None:
    """null keeps the default where the type has no None (lora, the tokenizer sizes), is None
    where None means something (attn_implementation: transformers' choice), and an empty stage
    section is there with every setting at its default."""
    profile = load_profile(
        write_profile(
            tmp_path,
            lora=None,
            model__tiny__tokenizer=None,
            model__attn_implementation=None,
            stages__vision_pretrain=None,
        )
    )
    assert profile.lora == LoraSettings() and profile.tiny.tokenizer == {}
    assert profile.attn_implementation is None
    assert profile.pretrains_vision
    assert profile.stage_settings("vision") == stage_settings.STAGE_DEFAULTS["vision_pretrain"]


def test_a_profile_silent_on_a_setting_gets_the_dataclass_default(tmp_path: Path) -> None:
    """The loader has no defaults of its own: a file with only the model is the Profile of it."""
    sizes = {"text": {"hidden_size": 64}, "vision": {"embed_dim": 32}}
    (tmp_path / "bare.yaml").write_text(yaml.safe_dump({"model": {"source": "tiny", "tiny": sizes}}))
    loaded = load_profile(tmp_path / "bare.yaml")
    assert loaded == Profile(
        name="bare", source="tiny", tiny=TinyArchitecture(**sizes), path=tmp_path / "bare.yaml"
    )
    assert loaded.stages == {} and loaded.stage_settings("grpo")["start"] == "warmup"


def test_stage_defaults_are_the_settings_classes() -> None:
    for section, cls in stage_settings.STAGE_SETTINGS.items():
        assert stage_settings.STAGE_DEFAULTS[section] == dataclasses.asdict(cls())
    assert set(stage_settings.STAGE_SETTINGS) == set(stage_settings.STAGE_SECTIONS.values())


def test_every_shipped_profile_and_size_file_validates() -> None:
    for name in available_profiles():
        assert load_profile(name).path.stem == name
    for name in ("qwen2-vl-2b", "qwen2-vl-2b-standin"):
        assert load_random_architecture(name).text["hidden_size"] > 0


def test_a_size_file_with_an_unknown_section_is_refused(tmp_path: Path) -> None:
    (tmp_path / "sizes.yaml").write_text("text: {hidden_size: 64}\nvision: {embed_dim: 32}\naudio: {}\n")
    with pytest.raises(ProfileError, match="sizes.yaml: unknown key audio; allowed: text, tokenizer, vision"):
        load_random_architecture(tmp_path / "sizes.yaml")


class TestTypedSettings:
    """The generic reader on a small class of its own."""

    @dataclasses.dataclass(frozen=True)
    class Page:
        width: int = dataclasses.field(default=224, metadata={"yaml": "image.width"})
        label: str | None = dataclasses.field(default="x", metadata={"yaml": "label"})
        origin: str = dataclasses.field(default="", metadata={"yaml": None})

    def test_fields_are_read_from_their_places(self) -> None:
        page = typed_settings(
            self.Page, {"image": {"width": 100}, "label": None}, "f.yaml", given={"origin": "here"}
        )
        assert page == self.Page(width=100, label=None, origin="here")
        assert typed_settings(self.Page, {}, "f.yaml") == self.Page()

    def test_a_field_set_by_the_caller_is_not_a_key_of_the_file(self) -> None:
        with pytest.raises(ConfigFileError, match="f.yaml: unknown key origin; allowed: image, label"):
            typed_settings(self.Page, {"origin": "there"}, "f.yaml")

    def test_the_prefix_places_the_keys(self) -> None:
        with pytest.raises(ConfigFileError, match="f.yaml: stages.x.image.width 'a' is not an integer"):
            typed_settings(self.Page, {"image": {"width": "a"}}, "f.yaml", prefix="stages.x")


def test_the_command_line_and_dagster_read_the_settings_choices() -> None:
    """The CLI's choices and the Dagster asset map come from the typed settings, not copies."""
    import argparse

    from dagster_project.defs.assets.model_assets import GRPO_STARTS
    from ecg_r1.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    options = {
        (command, action.dest): action.choices
        for command in ("train", "launch-check")
        for action in commands[command]._actions
    }
    assert options[("train", "answer")] == stage_settings.WARMUP_ANSWERS
    assert options[("launch-check", "stage")] == TRAINER_KINDS
    assert tuple(GRPO_STARTS) == stage_settings.GRPO_STARTS


def test_the_completion_cap_default_is_trls() -> None:
    from trl import GRPOConfig

    assert GRPOConfig.__dataclass_fields__["max_completion_length"].default == DEFAULT_MAX_COMPLETION_LENGTH
