"""A registered model behind an HTTP endpoint: the MLflow pyfunc that ``mlflow models serve`` runs.

Every registered version is logged as an MLflow pyfunc "from code" (no pickle: the served class is
the file :data:`CODE_FILE`, which MLflow executes; the model folder and the profile YAML it was
trained with travel as the pyfunc's artifacts ``model`` and ``profile``), so::

    PATH=$PWD/.venv/bin:$PATH MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow/mlflow.db \\
        mlflow models serve -m models:/ecg-r1-grpo@champion --env-manager local -h 127.0.0.1 -p 5001

answers ``POST /invocations`` with one row per case: the page as a base64 PNG (``image``), the
clinical ``note``, ``age`` and ``sex``; it returns the reasoning, the answer and P(Yes), computed by
:func:`ecg_r1.modeling.inference.predict`, the function behind ``ecg-r1 predict``.

(``ecg-r1 serve`` runs the same once it has checked the version lies in the project's store.)
The pyfunc is also the version's files for :func:`ecg_r1.tracking.model_registry.load_registered`,
which returns the model folder inside it (``artifacts/<folder>``, named in the ``MLmodel`` file).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

import mlflow

logger = logging.getLogger(__name__)

# The file MLflow executes to build the served model (it calls mlflow.models.set_model).
CODE_FILE = Path(__file__).with_name("served_model.py")
# The pyfunc's artifact holding the model folder (weights, tokenizer, processor, ecg_r1_model.json).
MODEL_ARTIFACT = "model"
# The pyfunc's artifact holding the profile YAML the model was trained with (loading and the
# default completion cap follow it, whatever the shipped profile of that name says later).
PROFILE_ARTIFACT = "profile"
INPUT_COLUMNS = ("image", "note", "age", "sex")
OUTPUT_COLUMNS = ("reasoning", "answer", "p_yes", "valid", "problem", "completion")
SEXES = ("M", "F")
# The served model runs in the environment it is served from (--env-manager local), where
# ecg_r1 is installed; these record the versions it was logged with.
_REQUIREMENTS = ("mlflow", "torch", "transformers", "pillow", "numpy", "pandas")


def signature(max_new_tokens: int) -> ModelSignature:
    """The request and response schema of the served model.

    Args:
        max_new_tokens: the default completion cap (a request may override it with the
            ``max_new_tokens`` parameter).
    """
    inputs = Schema(
        [
            ColSpec("string", "image"),
            ColSpec("string", "note", required=False),
            ColSpec("double", "age", required=False),
            ColSpec("string", "sex", required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec("string", "reasoning", required=False),
            ColSpec("string", "answer", required=False),
            ColSpec("double", "p_yes"),
            ColSpec("boolean", "valid"),
            ColSpec("string", "problem", required=False),
            ColSpec("string", "completion"),
        ]
    )
    params = ParamSchema([ParamSpec("max_new_tokens", "long", int(max_new_tokens))])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def encode_image(image: Any) -> str:
    """A PIL image as the base64 PNG text a request carries."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(text: str, row: int = 0) -> Any:
    """The PIL image (RGB) of a request's base64 PNG (or any format PIL reads).

    Raises:
        ValueError: when the text is not base64 or not an image.
    """
    from PIL import Image, UnidentifiedImageError

    if not isinstance(text, str) or not text:
        raise ValueError(f"row {row}: 'image' must be a base64-encoded PNG, got {type(text).__name__}")
    try:
        data = base64.b64decode(text, validate=True)
        image = Image.open(io.BytesIO(data))
        image.load()
    except (binascii.Error, UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"row {row}: 'image' is not a base64-encoded image ({exc})") from exc
    return image.convert("RGB")


def examples_from_frame(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The inference examples (:mod:`ecg_r1.modeling.inference`) of a request's rows.

    Raises:
        ValueError: when a row has no image, an unreadable one, a sex other than M/F or an age that
            is not a number.
    """
    if "image" not in frame.columns:
        raise ValueError(f"the request needs an 'image' column; got columns {list(frame.columns)}")
    examples = []
    for row, record in enumerate(frame.to_dict(orient="records")):
        age, sex, note = (_missing_as_none(record.get(key)) for key in ("age", "sex", "note"))
        if sex is not None and sex not in SEXES:
            raise ValueError(f"row {row}: 'sex' must be one of {SEXES} or absent, got {sex!r}")
        if age is not None:
            try:
                age = float(age)
            except (TypeError, ValueError):
                raise ValueError(f"row {row}: 'age' must be a number of years, got {age!r}") from None
        examples.append({"image": decode_image(record["image"], row), "age": age, "sex": sex, "note": note})
    return examples


def _missing_as_none(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


class ECGR1Model(PythonModel):
    """The served model: loads the model folder once, answers a frame of cases per request."""

    def __init__(self) -> None:
        self.model: Any = None
        self.processor: Any = None
        self.max_new_tokens = 128

    def load_context(self, context: Any) -> None:
        """Load the model folder the pyfunc carries, with the profile it carries (else the one the
        folder names)."""
        self.load_folder(context.artifacts[MODEL_ARTIFACT], context.artifacts.get(PROFILE_ARTIFACT))

    def load_folder(self, folder: str | Path, profile: Any = None) -> None:
        """Load a model folder (also used directly, without MLflow, in tests and scripts).

        Args:
            folder: the model folder.
            profile: a :class:`~ecg_r1.modeling.profiles.Profile`, a profile name or YAML path;
                default the one the folder names (:func:`folder_profile`).
        """
        from ecg_r1.modeling.device import resolve_device
        from ecg_r1.modeling.models import load_model_and_processor

        profile = resolve_profile(folder, profile)
        self.model, self.processor = load_model_and_processor(folder, profile, device=resolve_device(profile))
        self.max_new_tokens = profile.max_completion_length

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Answer each row of ``model_input`` (columns ``image``, ``note``, ``age``, ``sex``).

        Returns:
            One row per case, columns :data:`OUTPUT_COLUMNS`.
        """
        from ecg_r1.modeling import inference

        if self.model is None:
            raise RuntimeError("the model is not loaded: MLflow calls load_context before predict")
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        max_new_tokens = int((params or {}).get("max_new_tokens") or self.max_new_tokens)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        answers = inference.predict(
            self.model, self.processor, examples_from_frame(frame), max_new_tokens=max_new_tokens
        )
        return pd.DataFrame(answers, columns=list(OUTPUT_COLUMNS))


def folder_profile(folder: str | Path) -> Any:
    """The profile a model folder names (``ecg_r1_model.json``), else the default.

    Raises:
        ValueError: when the folder names a profile that is not shipped (one trained from a YAML
            path records only its name): pass the profile itself.
    """
    from ecg_r1.modeling.models import MODEL_INFO_FILE
    from ecg_r1.modeling.profiles import DEFAULT_PROFILE, ProfileError, load_profile

    info_file = Path(folder) / MODEL_INFO_FILE
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    name = info.get("profile") or DEFAULT_PROFILE
    try:
        return load_profile(name)
    except ProfileError as exc:
        raise ValueError(
            f"{folder} was trained with profile {name!r}, which is not a shipped profile: "
            f"give the profile (its YAML path) ({exc})"
        ) from exc


def resolve_profile(folder: str | Path, profile: Any = None) -> Any:
    """``profile`` as a :class:`~ecg_r1.modeling.profiles.Profile` (a name or YAML path is
    loaded), or the folder's (:func:`folder_profile`) when None."""
    from ecg_r1.modeling.profiles import Profile, load_profile

    if profile is None:
        return folder_profile(folder)
    return profile if isinstance(profile, Profile) else load_profile(profile)


def log_served_model(
    run_id: str,
    model_dir: str | Path,
    profile: Any = None,
    tags: Mapping[str, Any] | None = None,
    name: str = "model",
) -> str:
    """Log a model folder as the run's pyfunc model (an MLflow LoggedModel, output of the run).

    The LoggedModel is created in the run's experiment, so its files land in that experiment's
    artifact folder (in the project's store), whatever run or experiment is active in this process.

    Registration happens in every training stage, so this stays a copy of the folder: the model is
    never loaded. The signature is given (:func:`signature`), so MLflow infers none, and no input
    example is logged. ``mlflow.pyfunc.log_model`` (``Model.log``) is not used: with an input
    example it loads the pyfunc and runs a generation to validate it (a pyfunc cannot turn that
    off), and with a run it copies every metric history of the run to find its step-0 values
    (seconds on a long GRPO run). The same public steps remain: save the pyfunc
    (``mlflow.pyfunc.save_model``), upload it as the logged model's files, record the logged
    model as the run's output (the runs table's *Models* column), mark it READY.

    Args:
        run_id: the training run.
        model_dir: the saved model folder.
        profile: the profile it was trained with (a Profile, name or YAML path); its YAML travels
            with the pyfunc. Default: the one the folder names.
        tags: tags of the logged model (e.g. the profile and data version).
        name: the logged model's name.

    Returns:
        The logged model's id (``m-...``); register it from ``models:/<id>``.
    """
    import tempfile
    from importlib.metadata import PackageNotFoundError, version

    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    from ecg_r1.tracking.runs import mlflow_client

    folder = Path(model_dir).resolve()
    profile = resolve_profile(folder, profile)  # before anything is written to the store
    artifacts = {MODEL_ARTIFACT: str(folder)}
    if profile.path is not None:
        artifacts[PROFILE_ARTIFACT] = str(Path(profile.path).resolve())
    client = mlflow_client()
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(
        experiment_id=experiment_id,
        name=name,
        source_run_id=run_id,
        tags={k: str(v) for k, v in (tags or {}).items()},
    )
    requirements = []
    for package in _REQUIREMENTS:
        try:
            requirements.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    # The pyfunc is staged beside the model folder (the stage's output), not in /tmp: it holds a
    # copy of the weights, which for a 7B model is more than a small /tmp takes.
    with tempfile.TemporaryDirectory(prefix=".pyfunc-", dir=folder.parent) as tmp, warnings.catch_warnings():
        # MLflow asks for an input example when none is given; leaving it out is the point (above).
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        staged = Path(tmp) / name
        mlflow.pyfunc.save_model(
            path=str(staged),
            python_model=str(CODE_FILE),
            artifacts=artifacts,
            signature=signature(profile.max_completion_length),
            pip_requirements=requirements,
            mlflow_model=Model(
                artifact_path=logged.artifact_location,
                run_id=run_id,
                model_uuid=logged.model_id,
                model_id=logged.model_id,
            ),
        )
        client.log_model_artifacts(logged.model_id, str(staged))
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return logged.model_id


def model_folder(local: str | Path) -> Path:
    """The model folder inside a downloaded version: the pyfunc's ``model`` artifact, or the
    folder itself for a version registered as a plain folder (before the pyfunc).

    Raises:
        ValueError: when neither holds a ``config.json``.
    """
    import yaml

    local = Path(local)
    if (local / "config.json").is_file():
        return local
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():
        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
        entry = (flavor.get("artifacts") or {}).get(MODEL_ARTIFACT) or {}
        if entry.get("path") and (local / entry["path"] / "config.json").is_file():
            return local / entry["path"]
    raise ValueError(f"no model folder in {local} (no config.json, nor a pyfunc '{MODEL_ARTIFACT}' artifact)")
