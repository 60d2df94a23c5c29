"""The MLflow model registry of ECG-R1: register a run's model folder, name versions with aliases,
attach evaluation metrics and model cards, and fetch a version back to local disk.

Takes: a run id and a saved model folder, a model URI (``models:/ecg-r1-grpo/3``,
``models:/ecg-r1-grpo@champion``). Gives: version numbers, alias targets, the run behind a
version, and the local model folder. The store these work in is the one
:mod:`ecg_r1.tracking.runs` points MLflow at. (Comparing and promoting versions is the
evaluation stage's, :mod:`ecg_r1.evaluation.registry` and :mod:`ecg_r1.evaluation.promotion`.)

How models are stored: a registered version is an MLflow pyfunc logged "from code" (no pickle;
:mod:`ecg_r1.tracking.serving`), a LoggedModel of the training run whose artifact ``model`` is the
model folder (weights, tokenizer, processor, ``ecg_r1_model.json``); the version is registered from
``models:/<model id>``, so the run, the logged model and the version link to each other in the
MLflow UI, and ``mlflow models serve -m models:/ecg-r1-grpo@champion`` serves it. The
``mlflow.transformers`` flavour was tried and does not work here: ``log_model`` with
``task="image-text-to-text"`` refuses the components ("cannot be created as a Pipeline") and its
dict form has no ``processor`` key, while our processor is a subclass (``ECGProcessor``, no video
slot) that AutoProcessor cannot rebuild. Registering never loads the model (no signature
inference, no input-example validation) nor reads the run's metric histories: for the tiny model
(8 MB) it takes 0.2-0.3 s, the copy of the folder and a few store writes. :func:`load_registered` fetches a version by number or
alias and returns the model folder inside it (or the folder itself for versions registered before
the pyfunc, as plain ``runs:/<run_id>/model`` artifacts), which loads with
:func:`ecg_r1.modeling.models.load_model_and_processor`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ecg_r1.tracking.runs import artifact_root_for, finite_metrics, mlflow_client

logger = logging.getLogger(__name__)

MODEL_ARTIFACT_PATH = "model"
MODEL_NAMES = {"sft": "ecg-r1-sft", "grpo": "ecg-r1-grpo"}
MODEL_CARD_FILE = "MODEL_CARD.md"  # a version's card among its logged model's artifacts
MAX_DESCRIPTION_CHARS = 5000  # the SQL registry's model_versions.description column


def register_model_version(
    run_id: str,
    model_dir: str | Path,
    name: str,
    tags: Mapping[str, Any] | None = None,
    profile: Any = None,
) -> int:
    """Log a model folder as the run's served model (an MLflow pyfunc, see
    :mod:`ecg_r1.tracking.serving`) and register it as a new version.

    The logged model is the run's output (the runs table's *Models* column) and the version is
    registered from it by :func:`mlflow.register_model` with ``models:/<model id>``: the version's
    source names the logged model, its run is the logged model's run, and the logged model's
    ``mlflow.modelVersions`` tag lists the version, so the run, logged model and version pages
    link to each other. (``MlflowClient.create_model_version(..., model_id=...)`` does neither
    last step against a local store, and the SQL registry has no column for a version's
    ``model_id``: read back, it is None.)

    Args:
        run_id: the training run.
        model_dir: the saved model folder (config, weights, tokenizer, processor).
        name: registered model name, ``ecg-r1-sft`` or ``ecg-r1-grpo`` (:data:`MODEL_NAMES`).
        tags: version tags, e.g. ``data_version``, ``profile``, ``config``, ``git_commit``; also
            set on the logged model.
        profile: the profile the model was trained with (a Profile, name or YAML path), carried
            by the served model; default the one the folder names (``ecg_r1_model.json``).

    Returns:
        The new version number.

    Raises:
        ValueError: when ``model_dir`` is not a model folder, or no profile is given and the one
            it names is not shipped.
    """
    from mlflow.exceptions import MlflowException

    import mlflow
    from ecg_r1.tracking.serving import log_served_model

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{folder} has no config.json: not a model folder; save the model before registering it"
        )
    version_tags = {k: str(v) for k, v in (tags or {}).items()}
    model_id = log_served_model(run_id, folder, profile, tags=version_tags, name=MODEL_ARTIFACT_PATH)
    try:
        mlflow_client().create_registered_model(
            name, description="ECG-R1: ischemic vs non-ischemic T-wave inversion"
        )
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    # Waits until the version is READY and raises when its registration failed.
    version = mlflow.register_model(f"models:/{model_id}", name, tags=version_tags)
    logger.info(
        "registered %s version %s from run %s (logged model %s)", name, version.version, run_id, model_id
    )
    return int(version.version)


def set_alias(name: str, alias: str, version: int | str) -> None:
    """Point an alias (``champion``, ``challenger``) of a registered model at a version."""
    mlflow_client().set_registered_model_alias(name, alias, str(version))


def alias_version(name: str, alias: str) -> int | None:
    """The version an alias points at, or None when the model or the alias does not exist yet
    (the first evaluation has no champion to compare with)."""
    from mlflow.exceptions import MlflowException

    try:
        return int(mlflow_client().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def version_run_id(name: str, version: int | str) -> str:
    """The id of the run that produced a registered model version.

    Raises:
        ValueError: when the version does not exist or has no run.
    """
    from mlflow.exceptions import MlflowException

    try:
        found = mlflow_client().get_model_version(name, str(version))
    except MlflowException as exc:
        raise ValueError(f"{name} version {version} is not in the registry at {_tracking_uri()}") from exc
    if not found.run_id:
        raise ValueError(f"{name} version {version} was registered without a run")
    return found.run_id


def logged_model_id(version: Any) -> str | None:
    """The id of the LoggedModel a registered ``ModelVersion`` was registered from (its source is
    ``models:/<model id>``, :func:`register_model_version`); None for a version registered from a
    run's artifacts (``runs:/...``). (The SQL registry stores no ``model_id`` column: the source is
    what links the two.)"""
    source = version.source or ""
    body = source.removeprefix("models:/")
    return body if source.startswith("models:/m-") and "/" not in body else None


def log_version_metrics(
    name: str,
    version: int | str,
    metrics: Mapping[str, float],
    dataset: Any = None,
) -> str:
    """Log evaluation metrics on a model version's LoggedModel, with the dataset they were measured
    on, and on the version's run (the registry's version comparison compares runs).

    Args:
        name: registered model name.
        version: its version.
        metrics: e.g. ``{"test_external/accuracy": 0.71}``; non-finite values are skipped with a
            warning (MLflow cannot chart them).
        dataset: the evaluation dataset (``mlflow.data.from_pandas(...)``, named and with a content
            digest): the run records it as an input, every metric names it.

    Returns:
        The run id the metrics went to.
    """
    import mlflow

    found = mlflow_client().get_model_version(name, str(version))
    run_id = version_run_id(name, version)
    finite = finite_metrics(metrics, run_id)
    # The fluent call is MLflow's one that ties metrics to a model and a dataset and logs both as
    # the run's inputs; for a version without a logged model (runs:/...) the metrics go to the run.
    mlflow.log_metrics(
        finite, run_id=run_id, model_id=logged_model_id(found), dataset=dataset, synchronous=True
    )
    return run_id


def set_model_card(name: str, version: int | str, card: str) -> None:
    """Make ``card`` (markdown) the version's description and ``MODEL_CARD.md`` among its logged
    model's artifacts (next to ``MLmodel``).

    A card longer than the SQL registry's description column (:data:`MAX_DESCRIPTION_CHARS`:
    PostgreSQL and MySQL refuse a longer value, SQLite would keep it, the same rule holds for all)
    is cut at its last section that fits, with a pointer to the whole card in the artifacts.
    """
    client = mlflow_client()
    client.update_model_version(name, str(version), description=_fit_description(card))
    model_id = logged_model_id(client.get_model_version(name, str(version)))
    if model_id is None:
        logger.warning("%s version %s has no logged model: its card is only its description", name, version)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_CARD_FILE
        path.write_text(card)
        client.log_model_artifact(model_id, str(path))


def _fit_description(card: str) -> str:
    if len(card) <= MAX_DESCRIPTION_CHARS:
        return card
    note = f"\n\n(The whole card, with the sections left out here: {MODEL_CARD_FILE} in the logged model's artifacts.)\n"
    room = MAX_DESCRIPTION_CHARS - len(note)
    cut = card.rfind("\n## ", 0, room)
    return card[: cut if cut > 0 else room] + note


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
    client = mlflow_client()
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
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    uri = _tracking_uri()
    artifacts = artifact_root_for(uri)
    # Where the registry reads the version's files: a logged model's own folder for a version
    # registered from models:/<model id>, the run's folder for one registered from runs:/...
    location = mlflow_client().get_model_version_download_uri(name, str(version))
    if RunsArtifactRepository.is_runs_uri(location):
        location = RunsArtifactRepository.get_underlying_uri(location)
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
