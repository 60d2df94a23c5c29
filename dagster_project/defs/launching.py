"""How a training asset runs its stage: in the Dagster step's own process (the default: ``tiny``
and ``smol`` on a laptop), or as ``torchrun --nproc_per_node N`` processes launched through Dagster
Pipes (``dg.PipesSubprocessClient``), one per GPU, whose main process reports the stage's log and
result back to the asset (:mod:`dagster_project.pipes_train`).
"""

from __future__ import annotations

import contextlib
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg

from ecg_r1.constants import REPO_ROOT
from ecg_r1.tracking.runs import MLFLOW_URI_ENV_VAR

LAUNCHERS = ("in_process", "torchrun")
LOCK_FILE = "training.lock"


@contextlib.contextmanager
def one_run_per_folder(out_dir: Path) -> Iterator[None]:
    """Hold the stage folder's lock while a step trains into it.

    A step delivered twice (a Celery broker redelivering a task still running, two runs of one
    asset at once) must not train into the same folder twice: the second finds the lock taken and
    fails at once, the first goes on. The lock is the operating system's (``flock``): a killed
    step leaves none behind.

    Raises:
        dg.Failure: when another process holds the folder.
    """
    import fcntl

    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / LOCK_FILE).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise dg.Failure(
                f"{out_dir} is being trained into by another process (a step delivered twice?); "
                "this delivery stops, the running one goes on",
                allow_retries=False,
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def free_port() -> int:
    """A free TCP port on the loopback for the launch's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun_command(nproc_per_node: int, train_args: Sequence[str]) -> list[str]:
    """``torchrun`` (this interpreter's) running :mod:`dagster_project.pipes_train` with ``train_args``
    on one machine. On a GPU box each process takes one GPU; on a CPU they talk over gloo."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc_per_node),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "dagster_project.pipes_train",
        *train_args,
    ]


def launch_stage(
    context: dg.AssetExecutionContext,
    train_args: Sequence[str],
    out_dir: Path,
    nproc_per_node: int,
    tracking_uri: str,
) -> dict[str, Any]:
    """Run ``ecg-r1 train TRAIN_ARGS`` as ``nproc_per_node`` processes through Dagster Pipes.

    Args:
        context: the asset's context (the Pipes session reports to it).
        train_args: the ``ecg-r1`` arguments (:func:`train_arguments` and :func:`option_flags`).
        out_dir: the stage's ``--out`` folder (the main process reads its ``result.json``).
        nproc_per_node: processes (GPUs) to start.
        tracking_uri: the MLflow store the processes log to (``$ECG_R1_MLFLOW_URI`` in theirs).

    Returns:
        The metadata the main process reported, as plain values.

    Raises:
        dg.Failure: for a process count below 1.
    """
    if nproc_per_node < 1:
        raise dg.Failure(f"nproc_per_node must be at least 1, got {nproc_per_node}", allow_retries=False)
    command = torchrun_command(nproc_per_node, train_args)
    context.log.info("launching " + " ".join(command))
    client = dg.PipesSubprocessClient(cwd=str(REPO_ROOT))
    # A failed launch raises DagsterPipesExecutionError with the exit code; the processes' own
    # output (forwarded) says why.
    invocation = client.run(
        context=context,
        command=command,
        extras={"out_dir": str(out_dir)},
        env={MLFLOW_URI_ENV_VAR: tracking_uri},
    )
    reported = invocation.get_materialize_result().metadata or {}
    return {key: getattr(value, "value", value) for key, value in reported.items()}


def train_arguments(
    stage: str, profile: str, data: Mapping[str, Path], out_dir: Path, start: Path | None, run_name: str
) -> list[str]:
    """The ``ecg-r1 train ...`` arguments naming an asset's stage, data and folders (what the
    in-process call passes; :func:`option_flags` adds the overrides).

    Raises:
        dg.Failure: for the vision pre-training, which trains in one process (no trainer to share).
    """
    if stage not in ("warmup", "sft", "grpo"):
        raise dg.Failure(
            f"launcher torchrun is for the warmup, sft and grpo stages, not {stage}", allow_retries=False
        )
    args = ["train", stage, "--profile", profile, "--cohort", str(data["cohort_dir"])]
    args += ["--splits", str(data["splits_path"]), "--images", str(data["images_dir"])]
    args += ["--out", str(out_dir), "--run-name", run_name, "--no-progress"]
    if start is not None:
        args += ["--from", str(start)]
    return args


def option_flags(overrides: Mapping[str, int | None], launch_config: str, register: bool = True) -> list[str]:
    """The ``ecg-r1 train`` flags of an asset's overrides (steps, seed), launch config and
    registration."""
    args = []
    for flag, key in (("--max-steps", "max_steps"), ("--seed", "seed")):
        if overrides.get(key) is not None:
            args += [flag, str(overrides[key])]
    if launch_config:
        args += ["--launch-config", launch_config]
    if not register:
        args.append("--no-register")
    return args
