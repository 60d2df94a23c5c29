"""A training stage's MLflow run: started or resumed, its parameters, metrics and model folder.

Every function here does nothing when the stage is untracked (``run_id`` None).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ecg_r1.modeling.profiles import Profile


@contextlib.contextmanager
def tracked_run(
    enabled: bool, profile: Profile, stage: str, out_dir: Path, run_name: str | None, tags: Mapping[str, str]
) -> Iterator[str | None]:
    if not enabled:
        yield None
        return
    from ecg_r1.tracking.runs import start_or_resume_run

    name = run_name or f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"
    with start_or_resume_run(profile.name, name, state_dir=out_dir, tags={"stage": stage, **tags}) as run:
        yield run.info.run_id


def run_provenance(repo_root: Path) -> dict[str, str]:
    from ecg_r1.tracking.runs import run_context

    return run_context(repo_root)


def log_run_params(run_id: str | None, params: Mapping[str, Any]) -> None:
    if run_id is None:
        return
    from ecg_r1.tracking.runs import log_params_flat

    log_params_flat(params, run_id=run_id)


def log_run_metrics(run_id: str | None, metrics: Mapping[str, float], step: int) -> None:
    """Log a stage's metrics on its run (nothing when untracked)."""
    if run_id is not None:
        from ecg_r1.tracking.runs import log_metrics

        log_metrics(run_id, metrics, step)


def log_model_folder(run_id: str, model_dir: Path) -> None:
    """Log an intermediate stage's model folder as the run's ``model/`` artifacts (the registered
    stages log theirs as a servable pyfunc through
    :func:`ecg_r1.tracking.model_registry.register_model_version`)."""
    from ecg_r1.tracking.model_registry import MODEL_ARTIFACT_PATH
    from mlflow import MlflowClient

    MlflowClient().log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT_PATH)


def profile_params(profile: Profile) -> dict[str, Any]:
    return {
        "name": profile.name,
        "source": profile.source,
        "dtype": profile.dtype,
        "image": f"{profile.image_width}x{profile.image_height}",
        "image_max_pixels": profile.image_max_pixels,
        "lora": profile.lora.enabled,
        "sft_rationale": profile.sft_rationale,
        "tiny": asdict(profile.tiny) if profile.tiny is not None else None,
        "vision": dict(profile.vision) if profile.vision is not None else None,
        "path": str(profile.path),
    }


def config_digest(values: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]
