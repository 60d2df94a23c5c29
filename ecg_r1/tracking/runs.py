"""MLflow store and runs for ECG-R1: where the store is, which experiment, and what a run logs.

Takes: a repository root (or any tracking URI), a profile name, a run's parameters, metrics,
dataset splits and sample completions. Gives: the configured store, the profile's experiment,
an active (new or resumed) run and what it logged. The registered model versions a run produces
are :mod:`ecg_r1.tracking.model_registry`'s.

The store lives in the repository: ``mlflow/mlflow.db`` (SQLite: a database-backed store, which
the model registry needs) with artifacts under ``mlflow/artifacts``. One experiment per profile
(``ecg-r1-<profile>``). A training run logs its parameters with :func:`log_params_flat`, its
per-step metrics through a trainer callback of the training stage (which writes into the active
run), and its model with :func:`ecg_r1.tracking.model_registry.register_model_version`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The project's own store lives in the repository holding this package (``<root>/mlflow``).
MLFLOW_DIR = "mlflow"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
RUN_ID_FILE = "mlflow_run_id.txt"
# The tracking URI a deployment sets for every command and worker (the stack's server, .stack/env).
MLFLOW_URI_ENV_VAR = "ECG_R1_MLFLOW_URI"
_MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value
# The MLflow UI opens an experiment in its GenAI view (traces) unless told it holds model training:
# "custom_model_development" is the value its experiment-kind selector calls "Machine learning".
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
_MAX_DIGEST_CHARS = 36  # MLflow's datasets.digest column


def tracking_uri(repo_root: str | Path) -> str:
    """The SQLite tracking URI of a repository's store, creating ``mlflow/`` and its artifact folder.

    Args:
        repo_root: the repository root (the folder holding ``mlflow/``).

    Returns:
        ``sqlite:////abs/path/mlflow/mlflow.db``.
    """
    root = Path(repo_root).resolve() / MLFLOW_DIR
    (root / ARTIFACTS_DIR).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / DB_FILE}"


def artifact_root_for(uri: str) -> Path | None:
    """The artifact folder beside a SQLite store (``<db folder>/artifacts``); None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :]).parent / ARTIFACTS_DIR


def configure(repo_root: str | Path) -> str:
    """Point MLflow (tracking and registry) at the repository's store, in this process and in the
    environment, so the trainers' MLflow callback and child processes log to the same store.

    Returns:
        The tracking URI.
    """
    return _use(tracking_uri(repo_root))


def configure_store(repo_root: str | Path, uri: str = "") -> str:
    """Point MLflow at the store a deployment uses: ``uri``, else ``$ECG_R1_MLFLOW_URI`` (a tracking
    server), else the repository's own SQLite store (:func:`configure`).

    Returns:
        The tracking URI.
    """
    remote = uri or os.environ.get(MLFLOW_URI_ENV_VAR, "")
    return use_store(remote) if remote else configure(repo_root)


def open_store(repo_root: str | Path) -> str:
    """Point MLflow at an existing store to read from it, creating nothing.

    :func:`configure` creates the store it is pointed at; a command that only reads models
    (``ecg-r1 predict``) must not leave a new ``mlflow/mlflow.db`` wherever it was started.

    Returns:
        The tracking URI.

    Raises:
        ValueError: when ``repo_root`` holds no ``mlflow/mlflow.db``.
    """
    db = Path(repo_root).resolve() / MLFLOW_DIR / DB_FILE
    if not db.is_file():
        raise ValueError(
            f"no MLflow store at {db}; give the repository root holding mlflow/ with --mlflow-root "
            "(train a model first if there is none)"
        )
    return _use(f"sqlite:///{db}")


def use_store(uri: str) -> str:
    """Point MLflow (tracking and registry) at any store, e.g. a tracking server
    (``http://host:5000``), in this process and in the environment of its children.

    Returns:
        The tracking URI.
    """
    return _use(uri)


def _use(uri: str) -> str:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["MLFLOW_REGISTRY_URI"] = uri
    return uri


def mlflow_client() -> Any:
    """An ``MlflowClient`` of the store MLflow points at (:func:`configure`, :func:`use_store`)."""
    from mlflow import MlflowClient

    return MlflowClient()


def experiment_name(profile_name: str) -> str:
    """The experiment name of a profile: ``ecg-r1-<profile>``."""
    return f"ecg-r1-{profile_name}"


def experiment_for(profile_name: str) -> str:
    """The id of a profile's experiment in the current store, created on first use.

    With a SQLite store the experiment's artifacts go under the store's ``artifacts/`` folder
    (``mlflow/artifacts/<experiment id>``), so the whole store moves as one folder.

    Args:
        profile_name: e.g. ``"tiny"``.

    Returns:
        The experiment id.
    """
    import mlflow

    client = mlflow_client()
    name = experiment_name(profile_name)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:  # made before the tag existed
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        return experiment.experiment_id
    artifacts = artifact_root_for(mlflow.get_tracking_uri())
    location = None
    if artifacts is not None:
        # A unique sub-folder per experiment, as MLflow's default layout has.
        location = (artifacts / hashlib.sha1(name.encode()).hexdigest()[:12]).as_uri()
    return client.create_experiment(
        name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
    )


def log_split_inputs(
    splits_path: str | Path, data_version: str, splits: Sequence[str] | None = None
) -> list[str]:
    """Log the splits of a manifest as MLflow dataset inputs of the active run, so the runs table
    shows what each run trained and was tested on.

    Each split becomes a dataset named ``ecg-r1-<split>`` (its rows: record, patient, hospital,
    label), with the DVC data version as digest (the same split of another data version is another
    dataset), the split as context and its hospitals as a tag.

    Args:
        splits_path: the split manifest (``splits.parquet``).
        data_version: the DVC data version (:func:`dvc_data_version`); ``"untracked"`` gives a
            digest of the rows instead.
        splits: which splits to log; default all in the manifest.

    Returns:
        The names of the logged datasets.

    Raises:
        ValueError: when no run is active.
    """
    import polars as pl

    import mlflow

    if mlflow.active_run() is None:
        raise ValueError("no active MLflow run: log dataset inputs inside start_or_resume_run")
    manifest = pl.read_parquet(splits_path)
    names = []
    for split in splits or sorted(set(manifest.get_column("split"))):
        rows = manifest.filter(pl.col("split") == split).select(
            "record_id", "patient_id", "hospital", "label"
        )
        if rows.is_empty():
            continue
        digest = data_version.removesuffix(".dir") if data_version != "untracked" else None
        dataset = mlflow.data.from_pandas(
            rows.to_pandas(),
            source=str(Path(splits_path).resolve()),
            name=f"ecg-r1-{split}",
            targets="label",
            digest=digest[:_MAX_DIGEST_CHARS] if digest else None,
        )
        hospitals = ",".join(sorted(set(rows.get_column("hospital"))))
        mlflow.log_input(dataset, context=split, tags={"hospital": hospitals, "data_version": data_version})
        names.append(dataset.name)
    return names


@contextlib.contextmanager
def start_or_resume_run(
    profile_name: str,
    run_name: str,
    state_dir: str | Path | None = None,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[Any]:
    """Start a run in the profile's experiment, or resume the run of an interrupted training.

    The run id is written to ``state_dir/mlflow_run_id.txt`` (the trainer's output folder, where
    its checkpoints live). When that file exists (or ``run_id`` is given) the same run is
    reopened, so a training resumed from its last checkpoint keeps logging to the same run.

    Args:
        profile_name: selects the experiment (:func:`experiment_for`).
        run_name: the run's display name for a new run.
        state_dir: folder holding the run-id file; None to not persist it.
        run_id: resume this run explicitly.
        tags: tags set on the run (new or resumed).

    Yields:
        The active ``mlflow.ActiveRun``; it ends as FINISHED on normal exit and FAILED on an
        exception (a killed process leaves it RUNNING, and the resume reopens it).
    """
    import mlflow

    id_file = Path(state_dir) / RUN_ID_FILE if state_dir is not None else None
    if run_id is None and id_file is not None and id_file.is_file():
        run_id = id_file.read_text().strip() or None
    experiment_id = experiment_for(profile_name)
    if run_id is not None:
        existing = mlflow_client().get_run(run_id)
        if existing.info.experiment_id != experiment_id:
            raise ValueError(
                f"run {run_id} belongs to experiment {existing.info.experiment_id}, not to profile "
                f"{profile_name!r}'s ({experiment_id}); remove {id_file} to start a new run"
            )
        logger.info("resuming MLflow run %s", run_id)
        active = mlflow.start_run(run_id=run_id, tags=dict(tags or {}))
    else:
        active = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=dict(tags or {}))
        if id_file is not None:
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(active.info.run_id)
    status = "FAILED"
    try:
        yield active
        status = "FINISHED"
    finally:
        mlflow.end_run(status=status)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings / dataclasses / lists into ``a.b.c`` keys with string values.

    Values longer than MLflow's limit are cut and marked (``...[truncated]``).
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if is_dataclass(value) and not isinstance(value, type):
            value = asdict(value)
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
            continue
        text = json.dumps(list(value), default=str) if isinstance(value, list | tuple) else str(value)
        if len(text) > _MAX_PARAM_CHARS:
            text = text[: _MAX_PARAM_CHARS - 14] + "...[truncated]"
        flat[name] = text
    return flat


def finite_metrics(metrics: Mapping[str, Any], run_id: str) -> dict[str, float]:
    """The numeric, finite values of ``metrics`` as floats: booleans and non-numbers are left out,
    NaN/inf too with a warning (MLflow cannot chart them)."""
    import math

    finite: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not math.isfinite(value):
            logger.warning("metric %s=%r of run %s is not finite: not logged", key, value, run_id)
            continue
        finite[key] = float(value)
    return finite


def log_metrics(run_id: str, metrics: Mapping[str, Any], step: int = 0) -> dict[str, float]:
    """Log the :func:`finite_metrics` of ``metrics`` on a run at ``step``, in MLflow's batches.
    The call returns once MLflow has stored them.

    Returns:
        The metrics logged.
    """
    from mlflow.entities import Metric

    finite = finite_metrics(metrics, run_id)
    now = int(time.time() * 1000)
    items = [Metric(key, value, now, int(step)) for key, value in finite.items()]
    client = mlflow_client()
    for start in range(0, len(items), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=items[start : start + 1000], synchronous=True)
    return finite


def log_params_flat(params: Mapping[str, Any], prefix: str = "", run_id: str | None = None) -> dict[str, str]:
    """Log nested parameters (profile, hyperparameters, data version, git commit, seed) to a run.

    Keys already logged with the same value are skipped, so a resumed run can log its parameters
    again; a key logged with a *different* value is refused, because a run resumed with changed
    hyperparameters would mix two experiments in one record.

    Args:
        params: nested mapping (dataclasses allowed).
        prefix: prepended to every key (e.g. ``"ecg_r1."``, keeping clear of the trainer's own
            parameter names).
        run_id: the run; default the active run.

    Returns:
        The flat parameters as logged.

    Raises:
        ValueError: when a key exists with a different value, or no run is active.
    """
    from mlflow.entities import Param

    import mlflow

    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise ValueError("no active MLflow run: start one with start_or_resume_run or pass run_id")
        run_id = active.info.run_id
    flat = flatten_params(params, prefix)
    client = mlflow_client()
    logged = client.get_run(run_id).data.params
    conflicts = {k: (logged[k], v) for k, v in flat.items() if k in logged and logged[k] != v}
    if conflicts:
        raise ValueError(
            f"run {run_id} already has different values for {sorted(conflicts)} "
            f"(logged, new: {dict(list(conflicts.items())[:3])}); start a new run instead of resuming"
        )
    new = [Param(k, v) for k, v in flat.items() if k not in logged]
    for start in range(0, len(new), 100):  # MLflow takes at most 100 params a batch
        client.log_batch(run_id, params=new[start : start + 100])
    return flat


def run_context(repo_root: str | Path, data_path: str = "data") -> dict[str, str]:
    """The provenance every run logs: git commit (with a ``-dirty`` mark) and DVC data version
    (:func:`ecg_r1.tracking.versioning.provenance`)."""
    from ecg_r1.tracking.versioning import provenance

    return provenance(repo_root, data_path)


def log_completions_table(
    rows: list[Mapping[str, Any]], artifact_file: str, run_id: str | None = None
) -> None:
    """Log sample completions (prompt, completion, label, rewards...) as an MLflow table artifact.

    Args:
        rows: one mapping per sample, same keys in each.
        artifact_file: e.g. ``"samples/step_000100.json"`` (shown as a table in the MLflow UI).
        run_id: the run; default the active run.
    """
    import mlflow

    if not rows:
        return
    columns = {key: [row.get(key) for row in rows] for key in rows[0]}
    mlflow.log_table(data=columns, artifact_file=artifact_file, run_id=run_id)
