"""The package layout the README describes: one package per stage, no import of a later stage,
no Dagster in the library."""

from __future__ import annotations

import ast
from pathlib import Path

import ecg_r1

# Pipeline order; a package may import the ones before it (and itself).
STAGES = ("data", "simulate", "imaging", "modeling", "tracking", "training", "evaluation", "cli")
PACKAGE = Path(ecg_r1.__file__).parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "ecg_r1":  # from ecg_r1 import data
                names.update(f"ecg_r1.{alias.name}" for alias in node.names)
    return names


def test_every_module_sits_in_a_stage_package() -> None:
    """Besides the stage packages only ``constants.py``: the shared defaults, a leaf every stage
    may import (it imports no ``ecg_r1`` module)."""
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert loose == ["constants.py"]
    assert not [name for name in _imports(PACKAGE / "constants.py") if name.split(".")[0] == "ecg_r1"]
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(STAGES)
    for name in STAGES:
        assert ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text())), name


def test_no_package_imports_a_later_stage_and_none_imports_dagster() -> None:
    wrong = []
    for index, stage in enumerate(STAGES):
        for path in (PACKAGE / stage).rglob("*.py"):
            for name in _imports(path):
                parts = name.split(".")
                if parts[0] in ("dagster", "dagster_project"):
                    wrong.append(f"{path.relative_to(PACKAGE)} imports {name}")
                if parts[0] == "ecg_r1" and len(parts) > 1 and parts[1] in STAGES[index + 1 :]:
                    wrong.append(f"{path.relative_to(PACKAGE)} imports {name} (a later stage)")
    assert wrong == []


def test_label_words_are_spelled_only_in_the_label_vocabulary() -> None:
    """``ecg_r1.data.labels`` is the one module that spells the cohort labels; the rest import them."""
    vocabulary = PACKAGE / "data" / "labels.py"
    spelled = []
    for path in [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "dagster_project").rglob("*.py")]:
        if path == vocabulary:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Constant) and node.value in ("ischemic", "non-ischemic"):
                spelled.append(f"{path.name}:{node.lineno}")
    assert spelled == []
