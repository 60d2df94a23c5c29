"""The package layout the README describes: one package per stage, no import of a later stage,
no import circle anywhere in the package, no Dagster or research code in the library."""

from __future__ import annotations

import ast
import graphlib
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


def test_no_package_imports_a_later_stage_and_none_imports_dagster_or_research() -> None:
    wrong = []
    for index, stage in enumerate(STAGES):
        for path in (PACKAGE / stage).rglob("*.py"):
            for name in _imports(path):
                parts = name.split(".")
                if parts[0] in ("dagster", "dagster_project", "research"):
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


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _typing_only(tree: ast.Module) -> set[int]:
    """The nodes under ``if TYPE_CHECKING:``: imports for annotations, never run."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for statement in node.body for inner in ast.walk(statement))
    return skipped


def import_graph() -> dict[str, set[str]]:
    """Module -> the ``ecg_r1`` modules it imports, at the top or inside a function, absolute or
    relative (``from ecg_r1.x import y`` counts as ``ecg_r1.x.y`` where ``y`` is a module)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skipped = _typing_only(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # a name inside a module: the module
                    target = target.rpartition(".")[0]
                if target.startswith("ecg_r1") and target != name:
                    imported.add(target)
        graph[name] = imported
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle of imports, one at a time: each found is reported and one of its edges taken
    out until the graph sorts (graphlib names one circle per CycleError)."""
    remaining = {name: set(deps) for name, deps in graph.items()}
    circles = []
    while True:
        try:
            graphlib.TopologicalSorter(remaining).prepare()
            return circles
        except graphlib.CycleError as error:
            circle = error.args[1]
            circles.append(circle)
            # graphlib lists each node before one that imports it: drop that first import
            remaining[circle[1]].discard(circle[0])


def test_no_import_circle_anywhere_in_the_package() -> None:
    circles = import_circles(import_graph())
    assert circles == [], "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_the_circle_check_sees_imports_inside_functions() -> None:
    """The check itself: a circle closed by an import inside a function is found."""
    graph = import_graph()
    assert "ecg_r1.modeling.pretrained" in graph["ecg_r1.modeling.build"]  # imported in a function
    graph["ecg_r1.modeling.pretrained"].add("ecg_r1.modeling.build")
    assert import_circles(graph)


def test_no_module_imports_another_modules_private_names() -> None:
    """The Dagster modules share helpers through public names only."""
    private = []
    for path in [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "dagster_project").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dagster_project"):
                private += [
                    f"{path.name}: {alias.name}" for alias in node.names if alias.name.startswith("_")
                ]
    assert private == []
