"""Training stages of ECG-R1: signal-grounded vision pre-training, label-free format warm-up,
SFT (TRL ``SFTTrainer``) and GRPO (TRL ``GRPOTrainer``), each tracked in MLflow.

Library entry points (the CLI ``ecg-r1 train`` and the Dagster assets call these)::

    run_vision_stage(profile, start_model, cohort_dir, splits_path, images_dir, out_dir, ...)
    run_format_warmup(profile, start_model, cohort_dir, splits_path, images_dir, out_dir, ...)
    run_sft(profile, start_model, cohort_dir, splits_path, images_dir, out_dir, ...)
    run_grpo(profile, start_model, cohort_dir, splits_path, images_dir, out_dir, ...)

Each returns a :class:`StageResult` and leaves ``out_dir/model`` (a model folder); the trainer
stages take how they run as one :class:`~ecg_r1.training.runner.RunOptions`. Modules:
:mod:`.data` (cases and datasets), :mod:`.vision` (the vision tower's pre-training) and
:mod:`.vision_readout` (its signal-measured targets, readout heads and image tokens),
:mod:`.stage_folder` (a stage's folder, resume point and result), :mod:`.run_log` (its MLflow
run), :mod:`.runner` (the generic trainer run), :mod:`.processes` (the batch over the running
processes), :mod:`.launch` (launch-config checks), :mod:`.sft` (SFT and the format warm-up),
:mod:`.rewards` and :mod:`.grpo`, :mod:`.stages` (the stage registry, the vision stage and the
base model), :mod:`.callbacks` (trainer callbacks).
"""

from ecg_r1.training.data import TrainingDataError, grpo_dataset, load_cases, sft_dataset, sft_targets
from ecg_r1.training.grpo import run_grpo
from ecg_r1.training.sft import run_format_warmup, run_sft
from ecg_r1.training.stage_folder import StageResult, read_result
from ecg_r1.training.stages import STAGES, run_vision_stage, stage_function

__all__ = [
    "STAGES",
    "StageResult",
    "TrainingDataError",
    "grpo_dataset",
    "load_cases",
    "read_result",
    "run_format_warmup",
    "run_grpo",
    "run_sft",
    "run_vision_stage",
    "sft_dataset",
    "sft_targets",
    "stage_function",
]
