"""ZeRO-3 as far as a CPU (no deepspeed) shows it: the model is loaded after the trainer arguments,
i.e. inside transformers' ZeRO-3 switch (``is_deepspeed_zero3_enabled``, what makes
``from_pretrained`` build the model partitioned), and the final model is saved through
``trainer.save_model`` on every process (the collective that gathers the partitions), its
companions written by the main process only."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from ecg_r1.modeling.profiles import load_profile
from ecg_r1.training import runner


class _ZeroThree:
    """Stands for the ``HfTrainerDeepSpeedConfig`` a ZeRO-3 ``TrainingArguments`` creates."""

    def is_zero3(self) -> bool:
        return True


class _Stop(Exception):
    pass


def test_the_model_is_loaded_inside_the_zero3_switch_the_arguments_turn_on(tmp_path, monkeypatch):
    from transformers.integrations import deepspeed as hf_deepspeed

    seen: list[bool] = []
    keep: list[object] = []

    def make_args() -> object:
        # What TrainingArguments(deepspeed=<ZeRO-3 JSON>) does: a weak reference transformers reads.
        config = _ZeroThree()
        keep.append(config)
        hf_deepspeed.set_hf_deepspeed_config(config)
        return SimpleNamespace()

    def load(start_model, profile, dtype=None):
        seen.append(hf_deepspeed.is_deepspeed_zero3_enabled())
        raise _Stop

    monkeypatch.setattr(runner, "load_model_and_processor", load)
    monkeypatch.setattr(runner, "run_provenance", lambda root: {"git_commit": "x", "data_version": "y"})
    job = runner.TrainerJob(
        stage="sft",
        profile=load_profile("tiny"),
        start_model=tmp_path / "start",
        out_dir=tmp_path / "out",
        make_args=make_args,
        make_trainer=lambda model, processor, args: pytest.fail("no trainer before the model"),
        params={},
    )
    try:
        with pytest.raises(_Stop):
            runner.run_trainer(job, runner.RunOptions(tracking=False))
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()
    assert seen == [True]


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.accelerator = SimpleNamespace(wait_for_everyone=lambda: self.calls.append("barrier"))

    def save_model(self, output_dir: str) -> None:
        self.calls.append("save_model")
        Path(output_dir).mkdir(parents=True, exist_ok=True)


class _Processor:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def save_pretrained(self, out: Path) -> None:
        self.calls.append("processor")


@pytest.mark.parametrize("main", [True, False])
def test_a_full_model_is_saved_through_the_trainer_on_every_process(tmp_path, main):
    trainer = _Recorder()
    model = SimpleNamespace()  # no merge_and_unload: not a PEFT model
    runner.save_final_model(trainer, model, _Processor(trainer.calls), tmp_path / "model", {"steps": 3}, main)
    if main:
        assert trainer.calls == ["save_model", "processor", "barrier"]
        assert (tmp_path / "model" / "ecg_r1_model.json").is_file()
    else:  # gathers with the others, writes nothing of its own
        assert trainer.calls == ["save_model", "barrier"]
        assert not (tmp_path / "model" / "ecg_r1_model.json").exists()
