"""Where a model runs and in which precision it learns: one rule for every stage and inference path.

* **Device**: the GPU when torch sees one (CUDA). A GPU profile (weights in bfloat16 or float16,
  as ``qwen2-vl-2b`` and ``qwen2-vl-7b``) on a machine without one stops with one line naming
  ``ECG_R1_DEVICE=cpu``, the switch that runs it on the CPU on purpose (the CPU stand-in of the
  GPU path); a float32 profile (``tiny``, ``smol``) runs on the CPU there. ``ECG_R1_DEVICE=cuda``
  insists on the GPU. The Dagster run config sets the same switch (the ``compute`` resource).
* **Training precision**: full fine-tuning loads float32 weights (the master copy AdamW updates)
  and computes in the profile's half precision under autocast (the trainers' ``bf16``). Pure
  bfloat16 weights lose the small updates: 10 AdamW steps at lr 1e-6 changed 19 of 1,000
  weights of size 0.02 in bfloat16, all 1,000 in float32. Under LoRA the frozen base stays in the
  profile's dtype and PEFT keeps the adapters in float32; a module trained in full beside them
  (``modules_to_save``) needs float32 too, so such a profile loads float32 throughout.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ecg_r1.modeling.profiles import Profile

DEVICE_ENV = "ECG_R1_DEVICE"
DEVICES = ("cpu", "cuda")


class DeviceError(ValueError):
    """The profile cannot run where it was asked to (the message says what to set)."""


def is_gpu_profile(profile: Profile) -> bool:
    """True when the profile's weights are half precision: made for a GPU."""
    return profile.dtype != "float32"


def requested_device() -> str | None:
    """``$ECG_R1_DEVICE`` (``cpu`` | ``cuda``), or None when unset.

    Raises:
        DeviceError: for another value.
    """
    value = os.environ.get(DEVICE_ENV, "").strip().lower()
    if not value:
        return None
    if value not in DEVICES:
        raise DeviceError(f"{DEVICE_ENV}={value!r}: choose one of {', '.join(DEVICES)}")
    return value


def resolve_device(profile: Profile) -> str:
    """The device the profile's model trains and answers on: ``cuda`` or ``cpu``.

    Raises:
        DeviceError: for a GPU profile on a machine without CUDA unless ``ECG_R1_DEVICE=cpu``, or
            ``ECG_R1_DEVICE=cuda`` where torch sees no GPU.
    """
    import torch

    requested = requested_device()
    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        raise DeviceError(f"{DEVICE_ENV}=cuda but torch sees no CUDA device (torch {torch.__version__})")
    if is_gpu_profile(profile):
        raise DeviceError(
            f"profile {profile.name!r} ({profile.dtype} weights) is made for a GPU and torch sees no CUDA "
            f"device: set {DEVICE_ENV}=cpu to run it on the CPU on purpose"
        )
    return "cpu"


def training_dtype(profile: Profile) -> torch.dtype:
    """The dtype the trained model's weights load in: float32 master weights wherever weights are
    trained in full; the profile's dtype for a LoRA base, which stays frozen."""
    import torch

    if profile.lora.enabled and not profile.lora.modules_to_save:
        return profile.torch_dtype()
    return torch.float32


def autocast(profile: Profile, device: str) -> torch.autocast:
    """The autocast context of the profile's training precision on ``device`` (disabled for float32)."""
    import torch

    precision = profile.training_precision
    return torch.autocast(device, dtype=getattr(torch, precision), enabled=precision != "float32")


@contextlib.contextmanager
def device_setting(value: str) -> Iterator[None]:
    """``$ECG_R1_DEVICE`` set to ``value`` inside the block, restored after; an empty value leaves
    the environment's (how a Dagster run config sets the switch for one asset, and for the
    processes the asset starts).

    Raises:
        DeviceError: for a value other than ``cpu``, ``cuda`` or empty.
    """
    value = value.strip().lower()
    if value and value not in DEVICES:
        raise DeviceError(f"device {value!r}: choose one of {', '.join(DEVICES)}, or leave it empty")
    previous = os.environ.get(DEVICE_ENV)
    if value:
        os.environ[DEVICE_ENV] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(DEVICE_ENV, None)
        else:
            os.environ[DEVICE_ENV] = previous


def float32_vision_tower(model: Any) -> None:
    """Keep a Qwen2-VL's vision tower out of autocast, for training on a CPU (the language model
    keeps the profile's bfloat16 matrix products).

    On a CPU the tower's bfloat16 backward is pathological: for one 896 px page of the stand-in
    model (torch.profiler) the patch embedding's Conv3d backward took 19.7 s against 0.3 s in
    float32, and with that fixed the 3,200-patch attention backward still made a step 3x slower
    than float32 (2.0 s against 0.66 s). On a GPU autocast is left whole.
    """
    import torch

    visual = model.model.visual
    forward = visual.forward

    def float32_forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cpu", enabled=False):
            return forward(*args, **kwargs)

    visual.forward = float32_forward
