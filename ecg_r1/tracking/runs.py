"""MLflow tracking and model registry for ECG-R1 runs.

The store lives in the repository: ``mlflow/mlflow.db`` (SQLite: a database-backed store, which
the model registry needs) with artifacts under ``mlflow/artifacts``. One experiment per profile
(``ecg-r1-<profile>``). A training run logs its parameters with :func:`log_params_flat`, its
per-step metrics through a trainer callback of the training stage (which writes into the active
run), and its model with :func:`register_model_version`.

How models are stored: a registered version is an MLflow pyfunc logged "from code" (no pickle;
:mod:`ecg_r1.tracking.serving`), a LoggedModel of the training run whose artifact ``model`` is the
model folder (weights, tokenizer, processor, ``ecg_r1_model.json``); the version is registered from
``models:/<model id>``, so the run, the logged model and the version link to each other in the
MLflow UI, and ``mlflow models serve -m models:/ecg-r1-grpo@champion`` serves it. The
``mlflow.transformers`` flavour was tried and does not work here: ``log_model`` with
``task="image-text-to-text"`` refuses the components ("cannot be created as a Pipeline") and its
dict form has no ``processor`` key, while our processor is a subclass (``ECGProcessor``, no video
slot) that AutoProcessor cannot rebuild. :func:`load_registered` fetches a version by number or
alias and returns the model folder inside it (or the folder itself for versions registered before
the pyfunc, as plain ``runs:/<run_id>/model`` artifacts), which loads with
:func:`ecg_r1.modeling.models.load_model_and_processor`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# The project's own store lives in the repository holding this package (``<root>/mlflow``).
PROJECT_ROOT = Path(__file__).resolve().parents[2]
MLFLOW_DIR = "mlflow"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
MODEL_ARTIFACT_PATH = "model"
RUN_ID_FILE = "mlflow_run_id.txt"
MODEL_NAMES = {"sft": "ecg-r1-sft", "grpo": "ecg-r1-grpo"}
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


def _client() -> Any:
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

    client = _client()
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
        existing = _client().get_run(run_id)
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
    client = _client()
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
    """The provenance every run logs: git commit (with a ``-dirty`` mark) and DVC data version.

    The data version is the md5 DVC recorded for ``data_path`` (from ``<data_path>.dvc`` or
    ``dvc.lock``), or ``"untracked"`` when DVC does not track it.
    """
    return {"git_commit": git_commit(repo_root), "data_version": dvc_data_version(repo_root, data_path)}


def git_commit(repo_root: str | Path) -> str:
    """The repository's HEAD commit, ``-dirty`` when the tree has changes; ``"unknown"`` outside git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo_root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=20,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo_root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


def dvc_data_version(repo_root: str | Path, data_path: str = "data") -> str:
    """The md5 DVC recorded for ``data_path``: from ``<data_path>.dvc``, else from ``dvc.lock``."""
    import yaml

    root = Path(repo_root)
    dvc_file = root / f"{data_path}.dvc"
    if dvc_file.is_file():
        outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
        for out in outs:
            if out.get("md5"):
                return str(out["md5"])
    lock = root / "dvc.lock"
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
        digests = sorted(
            f"{out['path']}:{out['md5']}"
            for stage in stages.values()
            for out in stage.get("outs") or []
            if str(out.get("path", "")).startswith(data_path) and out.get("md5")
        )
        if digests:
            return hashlib.md5("\n".join(digests).encode()).hexdigest()
    return "untracked"


def register_model_version(
    run_id: str, model_dir: str | Path, name: str, tags: Mapping[str, Any] | None = None
) -> int:
    """Log a model folder as the run's served model (an MLflow pyfunc, see
    :mod:`ecg_r1.tracking.serving`) and register it as a new version.

    The logged model is linked to the run (the runs table's *Models* column) and the version to
    the logged model (``models:/<model id>``), so the model pages show which run made it.

    Args:
        run_id: the training run.
        model_dir: the saved model folder (config, weights, tokenizer, processor).
        name: registered model name, ``ecg-r1-sft`` or ``ecg-r1-grpo`` (:data:`MODEL_NAMES`).
        tags: version tags, e.g. ``data_version``, ``profile``, ``config``, ``git_commit``; also
            set on the logged model.

    Returns:
        The new version number.

    Raises:
        ValueError: when ``model_dir`` is not a model folder.
    """
    from mlflow.exceptions import MlflowException

    from ecg_r1.tracking.serving import log_served_model

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{folder} has no config.json: not a model folder; save the model before registering it"
        )
    version_tags = {k: str(v) for k, v in (tags or {}).items()}
    model_id = log_served_model(run_id, folder, tags=version_tags, name=MODEL_ARTIFACT_PATH)
    client = _client()
    try:
        client.create_registered_model(name, description="ECG-R1: ischemic vs non-ischemic T-wave inversion")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    version = client.create_model_version(
        name, source=f"models:/{model_id}", run_id=run_id, tags=version_tags, model_id=model_id
    )
    _wait_ready(client, name, version.version)
    logger.info(
        "registered %s version %s from run %s (logged model %s)", name, version.version, run_id, model_id
    )
    return int(version.version)


def _wait_ready(client: Any, name: str, version: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_model_version(name, version).status
        if status == "READY":
            return
        if status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise RuntimeError(f"model version {name}/{version} did not become READY (status {status})")
        time.sleep(0.2)


def set_alias(name: str, alias: str, version: int | str) -> None:
    """Point an alias (``champion``, ``challenger``) of a registered model at a version."""
    _client().set_registered_model_alias(name, alias, str(version))


def alias_version(name: str, alias: str) -> int | None:
    """The version an alias points at, or None when the model or the alias does not exist yet
    (the first evaluation has no champion to compare with)."""
    from mlflow.exceptions import MlflowException

    try:
        return int(_client().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def version_run_id(name: str, version: int | str) -> str:
    """The id of the run that produced a registered model version.

    Raises:
        ValueError: when the version does not exist or has no run.
    """
    from mlflow.exceptions import MlflowException

    try:
        found = _client().get_model_version(name, str(version))
    except MlflowException as exc:
        raise ValueError(f"{name} version {version} is not in the registry at {_tracking_uri()}") from exc
    if not found.run_id:
        raise ValueError(f"{name} version {version} was registered without a run")
    return found.run_id


def log_version_metrics(
    name: str, version: int | str, metrics: Mapping[str, float], tags: Mapping[str, Any] | None = None
) -> str:
    """Log evaluation metrics on the run of a model version (so the MLflow UI compares versions
    side by side) and copy them, with ``tags``, onto the version as tags.

    Args:
        name: registered model name.
        version: its version.
        metrics: e.g. ``{"test_external/accuracy": 0.71}``; non-finite values are skipped with a
            warning (MLflow cannot chart them).
        tags: extra version tags (e.g. the evaluation's data version).

    Returns:
        The run id the metrics went to.
    """
    import math

    from mlflow.entities import Metric

    run_id = version_run_id(name, version)
    client = _client()
    now = int(time.time() * 1000)
    finite = {}
    for key, value in metrics.items():
        if value is None or not math.isfinite(float(value)):
            logger.warning("metric %s=%r of %s/%s is not finite: not logged", key, value, name, version)
            continue
        finite[key] = float(value)
    items = [Metric(key, value, now, 0) for key, value in finite.items()]
    for start in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[start : start + 1000])
    for key, value in {**{f"metric.{k}": f"{v:.6g}" for k, v in finite.items()}, **(tags or {})}.items():
        client.set_model_version_tag(name, str(version), key, str(value))
    return run_id


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """Split ``models:/name/N``, ``models:/name@alias`` (``models:/`` optional) into parts.

    Raises:
        ValueError: for anything else (checked before any store is opened).
    """
    body = uri[len("models:/") :] if uri.startswith("models:/") else uri
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        if name and alias:
            return name, None, alias
    elif "/" in body:
        name, version = body.rsplit("/", 1)
        if name and version.isdigit():
            return name, version, None
    raise ValueError(
        f"cannot read model URI {uri!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS "
        "(e.g. models:/ecg-r1-grpo/3 or models:/ecg-r1-grpo@champion)"
    )


def resolve_version(uri: str) -> tuple[str, int]:
    """The registered model name and version number a URI points at.

    Raises:
        ValueError: for a malformed URI, an unknown model, version or alias.
    """
    from mlflow.exceptions import MlflowException

    name, version, alias = parse_model_uri(uri)
    client = _client()
    try:
        found = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, version)
        )
    except MlflowException as exc:
        raise ValueError(
            f"{uri!r} is not in the registry at {_tracking_uri()}: {exc.message}. "
            "List versions in the MLflow UI (make mlflow-ui) or check the tracking URI."
        ) from exc
    return name, int(found.version)


def _tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def load_registered(uri: str, dst: str | Path | None = None) -> Path:
    """Fetch a registered model version's folder to local disk.

    Args:
        uri: ``models:/ecg-r1-grpo/3`` or ``models:/ecg-r1-grpo@champion`` (the ``models:/``
            prefix may be left out).
        dst: where to put it; default a cache keyed by name and version (a version never
            changes, so the cache is reused): ``mlflow/cache/`` beside a SQLite store, else under
            the system temp dir keyed by the store's URI.

    Returns:
        The local model folder, ready for :func:`ecg_r1.modeling.models.load_model_and_processor`.

    Raises:
        ValueError: for a malformed URI, a version that does not exist, or one whose files lie
            outside this store's artifact folder.
    """
    import mlflow
    from ecg_r1.tracking.serving import model_folder

    name, version = resolve_version(uri)
    check_in_store(name, version)
    if dst is None:
        dst = _cache_dir() / name / str(version)
        with contextlib.suppress(ValueError):
            return model_folder(dst)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    local = Path(
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dst))
    )
    try:
        return model_folder(local)
    except ValueError as exc:
        raise ValueError(f"{uri!r} (version {version}) holds no model folder: {exc}") from exc


def check_in_store(name: str, version: int) -> None:
    """Refuse a version whose files are not in the store's own artifact folder: a registry entry
    may point anywhere (another path, another server), and models are loaded only from here.

    Raises:
        ValueError: when the version's files lie outside the store's artifacts.
    """
    client = _client()
    found = client.get_model_version(name, str(version))
    uri = _tracking_uri()
    artifacts = artifact_root_for(uri)
    if getattr(found, "model_id", None):  # a logged model (MLflow 3): its files are its own
        location = client.get_logged_model(found.model_id).artifact_location
    elif found.run_id:  # registered as run artifacts (runs:/<id>/model)
        location = client.get_run(found.run_id).info.artifact_uri
    else:
        location = found.source
    if uri.startswith(("http://", "https://")) and location.startswith("mlflow-artifacts:"):
        return  # files the tracking server itself stores and serves (`mlflow server --serve-artifacts`)
    local = location[len("file://") :] if location.startswith("file://") else location
    if artifacts is None or not Path(local).resolve().is_relative_to(artifacts.resolve()):
        raise ValueError(
            f"{name} version {version} points at {location}, outside this store's artifacts ({artifacts}); "
            "models are loaded only from the project's own MLflow store: register it there"
        )


def _cache_dir() -> Path:
    uri = _tracking_uri()
    artifacts = artifact_root_for(uri)
    if artifacts is not None:
        return artifacts.parent / "cache"
    return Path(tempfile.gettempdir()) / "ecg_r1_models" / hashlib.sha1(uri.encode()).hexdigest()[:10]


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
