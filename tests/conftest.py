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
