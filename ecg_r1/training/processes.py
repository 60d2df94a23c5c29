"""How many processes train, and the one-GPU batch of a profile spread over them.

A profile's trainer section is written for one GPU, and its learning rate was chosen for that
batch. Every stage keeps it as the **global batch** (``per_device_train_batch_size x
gradient_accumulation_steps x num_processes``) over the processes actually running
(``WORLD_SIZE``): fewer accumulation steps first, then a smaller per-device batch.
:mod:`ecg_r1.training.launch` checks a launch configuration with the same rule.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

# TRL's GRPOConfig / SFTConfig defaults where a profile section sets nothing.
TRL_DEFAULTS = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "num_generations": 8}


class LaunchError(ValueError):
    """A launch configuration is malformed, or does not fit a profile's batch sizes."""


def split_batch(per_device: int, accumulation: int, num_processes: int, what: str) -> tuple[int, int]:
    """The per-device batch and accumulation steps that keep ``per_device x accumulation`` as the
    global batch over ``num_processes``: fewer accumulation steps first, then a smaller per-device
    batch (the largest divisor of the per-process share).

    Raises:
        LaunchError: when the global batch does not split evenly over the processes.
    """
    intended = per_device * accumulation
    if intended % num_processes:
        raise LaunchError(
            f"{what}: its global batch per_device_train_batch_size x gradient_accumulation_steps = "
            f"{per_device} x {accumulation} = {intended} does not split over {num_processes} processes; "
            f"use a process count dividing {intended} ({_divisors(intended)}) or change the batch"
        )
    share = intended // num_processes
    new_per_device = max(d for d in _divisors(share) if d <= per_device)
    return new_per_device, share // new_per_device


def keep_global_batch(trainer_kwargs: Mapping[str, Any], num_processes: int, what: str) -> dict[str, int]:
    """The per-device batch and accumulation steps of a stage's trainer arguments on
    ``num_processes`` processes, so the global batch stays the one written for one GPU.

    Every stage calls it with the running process count, with or without ``--launch-config``:
    ``torchrun --nproc_per_node 4`` alone must not make the batch four times larger.

    Raises:
        LaunchError: when the batch does not split evenly over the processes.
    """
    new_per_device, new_accumulation = split_batch(*batch_of(trainer_kwargs), num_processes, what)
    return {"per_device_train_batch_size": new_per_device, "gradient_accumulation_steps": new_accumulation}


def batch_of(trainer_kwargs: Mapping[str, Any]) -> tuple[int, int]:
    """Per-device batch and accumulation steps of trainer arguments (TRL's defaults where unset)."""
    return (
        int(trainer_kwargs.get("per_device_train_batch_size", TRL_DEFAULTS["per_device_train_batch_size"])),
        int(trainer_kwargs.get("gradient_accumulation_steps", TRL_DEFAULTS["gradient_accumulation_steps"])),
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def world_size_from_env() -> int | None:
    """The process count of a running ``accelerate launch`` / ``torchrun`` (``WORLD_SIZE``), if any."""
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value else None


def world_rank() -> int:
    """This process's rank under ``torchrun`` / ``accelerate launch`` (``RANK``); 0 alone."""
    return int(os.environ.get("RANK") or 0)
