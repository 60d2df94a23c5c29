"""A registered model behind an HTTP endpoint: the MLflow pyfunc that ``mlflow models serve`` runs.

Every registered version is logged as an MLflow pyfunc "from code" (no pickle: the served class is
the file :data:`CODE_FILE`, which MLflow executes; the model folder and the profile YAML it was
trained with travel as the pyfunc's artifacts ``model`` and ``profile``), so::

    PATH=$PWD/.venv/bin:$PATH MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow/mlflow.db \\
        mlflow models serve -m models:/ecg-r1-grpo@champion --env-manager local -h 127.0.0.1 -p 5001

answers ``POST /invocations`` with one row per case: the page as a base64 PNG or JPEG (``image``),
the clinical ``note``, ``age``, ``sex`` and the client's ``id``; it returns the reasoning, the answer
and P(Yes), computed by :func:`ecg_r1.modeling.inference.predict`, the function behind
``ecg-r1 predict``. A row or request beyond a limit (``MAX_*`` below; docs/serving.md) is answered
``valid: false`` with a ``problem`` naming the field, before anything is decoded that the limit
bounds; nothing raised reaches MLflow's scoring server, which would answer with a stack trace or
with the request's data.

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
import struct
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import AnyType

import mlflow

logger = logging.getLogger(__name__)

# The file MLflow executes to build the served model (it calls mlflow.models.set_model).
CODE_FILE = Path(__file__).with_name("served_model.py")
# The pyfunc's artifact holding the model folder (weights, tokenizer, processor, ecg_r1_model.json).
MODEL_ARTIFACT = "model"
# The pyfunc's artifact holding the profile YAML the model was trained with (loading and the
# default completion cap follow it, whatever the shipped profile of that name says later).
PROFILE_ARTIFACT = "profile"
INPUT_COLUMNS = ("id", "image", "note", "age", "sex")
OUTPUT_COLUMNS = ("id", "reasoning", "answer", "p_yes", "valid", "problem", "completion")
SEXES = ("M", "F")
# The served model runs in the environment it is served from (--env-manager local), where
# ecg_r1 is installed; these record the versions it was logged with.
_REQUIREMENTS = ("mlflow", "torch", "transformers", "pillow", "numpy", "pandas")

# Limits of one request (docs/serving.md lists them). A rendered clinical page is 2200 x 1700 px
# (3.7 MP) and a 300 dpi scan of a letter page 8.4 MP; 25 MP leaves room for both and keeps a
# decoded page under 75 MB (RGB) before the processor shrinks it to the profile's size.
MAX_IMAGE_PIXELS = 25_000_000
MAX_IMAGE_BYTES = 10 * 2**20  # one page's PNG or JPEG file (base64 text is 4/3 of it)
MAX_NOTE_CHARS = 2_000  # an 8 MB note made the processor ask for 430 GB
MAX_ID_CHARS = 100
MAX_ROWS = 16  # one request is decoded and answered at a time: 16 pages bound its memory
MAX_REQUEST_CHARS = 64 * 2**20  # the text of every image, note and id in one request
# The HTTP body `ecg-r1 serve` reads (ecg_r1/tracking/serving_app.py): above MAX_REQUEST_CHARS by
# room for JSON quoting, the other fields and params, so no request the model would answer is cut.
MAX_BODY_BYTES = 72 * 2**20
MAX_AGE = 130.0
# The image formats opened, by their magic bytes: nothing else reaches PIL (an EPS page would be
# rendered by Ghostscript, a PostScript interpreter, when that is installed).
IMAGE_MAGIC = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff"}
_IMAGE_TEXT_CHARS = 4 * -(-MAX_IMAGE_BYTES // 3)


def signature(max_new_tokens: int) -> ModelSignature:
    """The request and response schema of the served model.

    Every input column is optional and ``age`` of any type, and ``max_new_tokens`` a double:
    what MLflow's own schema check refuses it refuses for the whole request, with a message that
    starts with the request's data; the served model checks each row itself and answers a bad
    one with ``valid: false`` (:func:`read_row`).

    Args:
        max_new_tokens: the default completion cap, also the most a request may ask for.
    """
    inputs = Schema(
        [
            ColSpec("string", "id", required=False),
            ColSpec("string", "image", required=False),
            ColSpec("string", "note", required=False),
            ColSpec(AnyType(), "age", required=False),
            ColSpec("string", "sex", required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec("string", "id", required=False),
            ColSpec("string", "reasoning", required=False),
            ColSpec("string", "answer", required=False),
            ColSpec("double", "p_yes", required=False),
            ColSpec("boolean", "valid"),
            ColSpec("string", "problem", required=False),
            ColSpec("string", "completion", required=False),
        ]
    )
    params = ParamSchema([ParamSpec("max_new_tokens", "double", float(max_new_tokens))])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


class RowProblem(ValueError):
    """A request's row (or the whole request) that cannot be answered; the message starts with
    the field (``image: ...``) and never repeats the request's data."""


def encode_image(image: Any, format: str = "PNG") -> str:
    """A PIL image as the base64 PNG (or JPEG) text a request carries."""
    buffer = io.BytesIO()
    (image.convert("RGB") if format == "JPEG" else image).save(buffer, format=format)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(text: Any) -> Any:
    """The PIL image (RGB) of a request's base64 PNG or JPEG.

    Only PNG and JPEG are opened, told by their magic bytes; the pixel count is read from the
    header and checked (:data:`MAX_IMAGE_PIXELS`) before the pixels are decoded.

    Raises:
        RowProblem: when the text is not base64 of a PNG or JPEG within the limits.
    """
    from PIL import Image

    if not isinstance(text, str) or not text:
        raise RowProblem("image: must be a base64-encoded PNG or JPEG")
    if len(text) > _IMAGE_TEXT_CHARS:
        raise RowProblem(f"image: more than {MAX_IMAGE_BYTES // 2**20} MiB")
    try:
        data = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise RowProblem("image: not base64") from None
    formats = [name for name, magic in IMAGE_MAGIC.items() if data.startswith(magic)]
    if not formats:
        raise RowProblem("image: not a PNG or JPEG")
    try:
        image = Image.open(io.BytesIO(data), formats=formats)
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise RowProblem(
                f"image: {image.width} x {image.height} px, more than {MAX_IMAGE_PIXELS:,} pixels"
            )
        image.load()
        return image.convert("RGB")
    except RowProblem:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL's own check, at twice its MAX_IMAGE_PIXELS, fires inside open before the size is seen.
        raise RowProblem(f"image: more than {MAX_IMAGE_PIXELS:,} pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error):
        # What PIL's PNG and JPEG readers raise for a truncated or corrupt file.
        raise RowProblem(f"image: not a readable {formats[0]}") from None


def read_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """The inference example (:mod:`ecg_r1.modeling.inference`) of one request row.

    Raises:
        RowProblem: naming the first field that is missing, of the wrong type or out of bounds.
    """
    age, sex, note = (_missing_as_none(record.get(key)) for key in ("age", "sex", "note"))
    if note is not None:
        if not isinstance(note, str):
            raise RowProblem("note: must be text")
        if len(note) > MAX_NOTE_CHARS:
            raise RowProblem(f"note: more than {MAX_NOTE_CHARS:,} characters")
    if age is not None:
        if isinstance(age, bool) or not isinstance(age, int | float):
            raise RowProblem("age: must be a number of years")
        if not 0 <= age <= MAX_AGE:  # also refuses inf (NaN reads as missing)
            raise RowProblem(f"age: must be within 0-{MAX_AGE:g} years")
        age = float(age)
    if sex is not None and sex not in SEXES:
        raise RowProblem(f"sex: must be one of {', '.join(SEXES)} or absent")
    image = _missing_as_none(record.get("image"))
    if image is None:
        raise RowProblem("image: missing")
    return {"image": decode_image(image), "age": age, "sex": sex, "note": note}


def check_request(frame: pd.DataFrame) -> None:
    """Check the limits of a whole request: its rows, and its text in all.

    Raises:
        RowProblem: naming the limit (every row of the request is answered with it).
    """
    if len(frame) > MAX_ROWS:
        raise RowProblem(f"request: {len(frame)} rows, at most {MAX_ROWS} a request")
    text = sum(
        len(value)
        for column in ("id", "image", "note")
        if column in frame.columns
        for value in frame[column]
        if isinstance(value, str)
    )
    if text > MAX_REQUEST_CHARS:
        raise RowProblem(f"request: more than {MAX_REQUEST_CHARS // 2**20} MiB of images, notes and ids")


def completion_cap(params: Mapping[str, Any] | None, cap: int) -> int:
    """The request's ``max_new_tokens``: a whole number from 1 to ``cap`` (the profile's), default
    ``cap``.

    Raises:
        RowProblem: for any other value.
    """
    value = (params or {}).get("max_new_tokens", cap)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value != int(value)
        or not 1 <= value <= cap
    ):
        raise RowProblem(f"max_new_tokens: must be a whole number from 1 to {cap} (this model's cap)")
    return int(value)


def _missing_as_none(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _row_id(value: Any) -> str | None:
    """A row's ``id`` (the client's, answered back with the row), None when absent.

    Raises:
        RowProblem: when it is not text of at most :data:`MAX_ID_CHARS` characters.
    """
    value = _missing_as_none(value)
    if value is not None and (not isinstance(value, str) or len(value) > MAX_ID_CHARS):
        raise RowProblem(f"id: must be text of at most {MAX_ID_CHARS} characters")
    return value


def _refused(row_id: Any, problem: str) -> dict[str, Any]:
    return {
        "id": row_id,
        "reasoning": None,
        "answer": None,
        "p_yes": None,
        "valid": False,
        "problem": problem,
        "completion": None,
    }


class ECGR1Model(PythonModel):
    """The served model: loads the model folder once, answers a frame of cases per request."""

    def __init__(self) -> None:
        self.model: Any = None
        self.processor: Any = None
        self.max_new_tokens = 128
        # The scoring server runs each request's predict in a thread of its own: one at a time,
        # since generation switches the shared tokenizer's padding side, and so that one
        # request's decoded pages (MAX_ROWS x MAX_IMAGE_PIXELS) bound the server's image memory.
        self._lock = threading.Lock()

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
        """Answer each row of ``model_input`` (columns :data:`INPUT_COLUMNS`, all optional but
        ``image``).

        A row that breaks a limit is answered with ``valid`` false and a ``problem`` naming its
        field, and the other rows as usual; a request that breaks one (too many rows, too much
        text, a bad ``max_new_tokens``) has every row answered so. Nothing is raised for the
        request's data: MLflow's scoring server would put the request's data, or a stack trace,
        in the HTTP answer.

        Returns:
            One row per case, in order, columns :data:`OUTPUT_COLUMNS`.
        """
        from ecg_r1.modeling import inference

        if self.model is None:
            raise RuntimeError("the model is not loaded: MLflow calls load_context before predict")
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        records = frame.to_dict(orient="records")
        answers: list[dict[str, Any] | None] = [None] * len(records)
        examples, rows = [], []
        with self._lock:
            max_new_tokens, problem = self.max_new_tokens, None
            try:
                check_request(frame)
                max_new_tokens = completion_cap(params, self.max_new_tokens)
            except RowProblem as exc:
                problem = str(exc)
            for row, record in enumerate(records):
                row_id = None
                try:
                    row_id = _row_id(record.get("id"))
                    if problem is not None:
                        raise RowProblem(problem)
                    examples.append(read_row(record))
                    rows.append((row, row_id))
                except RowProblem as exc:
                    answers[row] = _refused(row_id, str(exc))
            if examples:
                predicted = inference.predict(
                    self.model, self.processor, examples, max_new_tokens=max_new_tokens
                )
                for (row, row_id), answer in zip(rows, predicted, strict=True):
                    answers[row] = {"id": row_id, **answer}
        # object columns: a refused row's p_yes and completion stay null in the JSON, not NaN
        return pd.DataFrame(answers, columns=list(OUTPUT_COLUMNS), dtype=object)


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
            pip_requirements=_pip_requirements(),
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


def _pip_requirements() -> list[str]:
    """The pyfunc's pip requirements: each package it needs pinned to the version installed here
    (a package not installed here is left out)."""
    from importlib.metadata import PackageNotFoundError, version

    requirements = []
    for package in _REQUIREMENTS:
        try:
            requirements.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return requirements


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
