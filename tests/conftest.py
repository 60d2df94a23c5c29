"""Shared test fixtures: where the real records live."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def _shared(name: str) -> Path:
    path = (SHARED_DATA / name).resolve()
    if not path.is_dir():
        pytest.skip(f"real records not found at {path}: put the shared data folder beside the repository")
    return path


@pytest.fixture(scope="session")
def ludb_dir() -> Path:
    return _shared("ludb")


@pytest.fixture(scope="session")
def cinc_dir() -> Path:
    return _shared("cinc2021")


@pytest.fixture(scope="session")
def ptbxl_meta_dir() -> Path:
    return _shared("ptbxl")


@pytest.fixture(scope="session")
def seed_mlflow_db(tmp_path_factory):
    """Put an empty, already-migrated MLflow database at a path (``<root>/mlflow/mlflow.db`` for
    ``ecg_r1.tracking.runs``). Creating MLflow's schema takes seconds a store; copying one takes none,
    and every test still gets a store of its own."""
    from mlflow import MlflowClient

    template = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{template}").search_experiments()

    def seed(db_path: Path) -> Path:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, db_path)
        return db_path

    return seed


@pytest.fixture(scope="module")
def store(tmp_path_factory, seed_mlflow_db):
    """One project MLflow store for a test module (``ecg_r1.tracking.runs.configure``), the
    process's tracking URI restored afterwards: ``(project root, tracking URI)``."""
    import mlflow
    from ecg_r1.tracking import runs as tracking

    root = tmp_path_factory.mktemp("repo")
    seed_mlflow_db(root / "mlflow" / "mlflow.db")
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        uri = tracking.configure(root)
        yield root, uri
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def small_profile_path(tmp_path_factory) -> Path:
    """The tiny profile (still named ``tiny``) with a smaller model: built in a second."""
    import yaml

    from ecg_r1.modeling.profiles import load_profile

    raw = yaml.safe_load(load_profile("tiny").path.read_text())
    raw["name"] = "tiny"
    raw["model"]["tiny"]["text"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    raw["model"]["tiny"]["vision"].update(embed_dim=32, depth=1, num_heads=2)
    raw["model"]["tiny"]["tokenizer"]["vocab_size"] = 300
    path = tmp_path_factory.mktemp("profile") / "small.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# Cases whose prompts and answers train the small models' tokenizers.
SMALL_MODEL_CASES = [
    {"age": 50 + i, "sex": "F", "note": f"Troponin {i}.", "twi_leads": "V2,V3"} for i in range(20)
]


@pytest.fixture(scope="module")
def small_model_dir(small_profile_path, tmp_path_factory) -> Path:
    """A base model folder of the small profile (``Yes`` and ``No`` several tokens each)."""
    from ecg_r1.modeling.build import build_base_model, corpus_from_cases
    from ecg_r1.modeling.profiles import load_profile

    profile = load_profile(small_profile_path)
    return build_base_model(
        profile, corpus_from_cases(SMALL_MODEL_CASES), tmp_path_factory.mktemp("model") / "base"
    )


def _single_token_model(small_profile_path: Path, folder: Path, tie_word_embeddings: bool):
    """The small model with the tiny profile's vocabulary size, where ``Yes`` and ``No`` are one
    token each (with the small vocabulary they are several): its folder and profile."""
    import yaml

    from ecg_r1.modeling.build import build_base_model, corpus_from_cases
    from ecg_r1.modeling.profiles import load_profile

    raw = yaml.safe_load(small_profile_path.read_text())
    tiny = yaml.safe_load(load_profile("tiny").path.read_text())
    raw["model"]["tiny"]["tokenizer"] = tiny["model"]["tiny"]["tokenizer"]
    raw["model"]["tiny"]["text"]["tie_word_embeddings"] = tie_word_embeddings
    (folder / "profile.yaml").write_text(yaml.safe_dump(raw))
    profile = load_profile(folder / "profile.yaml")
    return build_base_model(profile, corpus_from_cases(SMALL_MODEL_CASES), folder / "base"), profile


@pytest.fixture(scope="module")
def single_token_model(small_profile_path, tmp_path_factory):
    return _single_token_model(small_profile_path, tmp_path_factory.mktemp("single_token"), False)


@pytest.fixture(scope="module")
def tied_single_token_model(small_profile_path, tmp_path_factory):
    """The same with the output layer tied to the input embeddings, as SmolLM2's is."""
    return _single_token_model(small_profile_path, tmp_path_factory.mktemp("tied"), True)


def noise_page(seed: int):
    """A page of the tiny profile drawn from seeded noise (not an ECG: shapes only)."""
    import numpy as np

    from ecg_r1.imaging.draw import render_page
    from ecg_r1.modeling.profiles import load_profile

    signal = np.random.default_rng(seed).normal(0, 0.3, (12, 5000)).astype(np.float32)
    return render_page(signal, load_profile("tiny").render_config())


@pytest.fixture(scope="module")
def examples():
    """Three inference examples (noise pages, ages, sexes, notes of growing length)."""
    return [
        {"image": noise_page(i), "age": 40 + 9 * i, "sex": "MF"[i % 2], "note": "chest pain " * i}
        for i in range(3)
    ]
