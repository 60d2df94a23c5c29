"""``ecg-r1 where``: where to look after ``make run``: the comparison table, the MLflow
experiments and registered versions, and the commands that open the two UIs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

EVALUATION_DIR = Path("data") / "evaluation"
CROSS_HOSPITAL_ACCURACY = "test_external/accuracy"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "where",
        help="print where the results are: comparison table, MLflow experiments and versions, UIs",
        description="Print the comparison table the pipeline wrote, the MLflow tracking URI, its "
        "experiments, the registered model versions with their aliases (champion, challenger) and "
        "evaluation figures, and the commands that open the Dagster and MLflow UIs.",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="project root (default: $ECG_R1_HOME or the current folder)",
    )
    parser.add_argument(
        "--evaluation",
        type=Path,
        default=None,
        help=f"comparison folder (default: <root>/{EVALUATION_DIR})",
    )
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: <root>/mlflow/mlflow.db)"
    )
    parser.set_defaults(func=run)


def _versions(client: Any, name: str) -> list[Any]:
    return sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def _logged_metric(client: Any, version: Any, key: str) -> float | None:
    """A metric of the version's LoggedModel (:func:`ecg_r1.evaluation.registry.log_comparison`)."""
    from ecg_r1.tracking.model_registry import logged_model_id

    model_id = logged_model_id(version)
    if model_id is None:
        return None
    return next((m.value for m in client.get_logged_model(model_id).metrics or [] if m.key == key), None)


def registry_lines(client: Any) -> list[str]:
    """One line per registered model version: aliases, promotion decision, cross-hospital accuracy."""
    lines = []
    for model in sorted(client.search_registered_models(), key=lambda m: m.name):
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        lines.append(f"  {model.name}")
        for version in _versions(client, model.name):
            tags = version.tags or {}
            parts = [f"    v{version.version}"]
            if aliases.get(str(version.version)):
                parts.append("@" + ",@".join(sorted(aliases[str(version.version)])))
            accuracy = _logged_metric(client, version, CROSS_HOSPITAL_ACCURACY)
            if accuracy is not None:
                parts.append(f"cross-hospital accuracy {accuracy:.3f}")
            if tags.get("promotion.decision"):
                parts.append(f"promotion: {tags['promotion.decision']}")
            parts.append(f"run {version.run_id}")
            lines.append("  ".join(parts))
    return lines or ["  (none yet: run `make run`)"]


def run(args: argparse.Namespace) -> int:
    from ecg_r1.evaluation.outputs import METRICS_FILE, PLOTS_DIR, TABLE_FILE
    from ecg_r1.tracking import runs as tracking

    root = (args.root or Path(os.environ.get("ECG_R1_HOME") or ".")).resolve()
    evaluation = args.evaluation or root / EVALUATION_DIR
    table = evaluation / TABLE_FILE
    print("== Comparison table")
    if table.is_file():
        print(table.read_text())
        print(
            f"(from {table}; plots in {evaluation / PLOTS_DIR}, all figures in {evaluation / METRICS_FILE})"
        )
    else:
        print(f"no comparison yet at {table}: run `make run` (or `ecg-r1 evaluate ... --out {evaluation}`)")

    import mlflow
    from mlflow import MlflowClient

    uri = args.tracking_uri or tracking.tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    print("\n== MLflow")
    print(f"tracking URI: {uri}")
    experiments = [e for e in client.search_experiments() if e.name != "Default" or e.experiment_id != "0"]
    if experiments:
        for experiment in sorted(experiments, key=lambda e: e.name):
            runs = client.search_runs([experiment.experiment_id], max_results=1000)
            print(f"  experiment {experiment.name} (id {experiment.experiment_id}): {len(runs)} runs")
    else:
        print("  no experiments yet")
    print("registered models:")
    print("\n".join(registry_lines(client)))

    ui_port = os.environ.get("UI_PORT", "3000")
    mlflow_port = os.environ.get("MLFLOW_PORT", "5000")
    print("\n== Open the UIs")
    print(f"  make ui         Dagster: assets, runs, metadata   http://127.0.0.1:{ui_port}")
    print(f"  make mlflow-ui  MLflow: runs, metrics, models     http://127.0.0.1:{mlflow_port}")
    return 0
