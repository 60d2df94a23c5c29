"""Shared test fixtures: where the real records live."""

from __future__ import annotations

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
