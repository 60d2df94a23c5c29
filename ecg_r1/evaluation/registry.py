"""A comparison's results on the registered model versions, and the promotion of new versions.

What the ``model_comparison`` / ``model_promotion`` assets and ``ecg-r1 evaluate --log`` /
``ecg-r1 promote`` share, so the UI and the command line leave the same records:

* :func:`log_comparison`: each registered version's metrics on its LoggedModel, by evaluation
  dataset (one per split, :func:`evaluation_datasets`), and on its run (the experiment's model view
  sorts versions by them, the registry compares them side by side); its model card
  (:func:`ecg_r1.evaluation.model_card.model_card`) as its description and ``MODEL_CARD.md``; its
  answers (:data:`VERSION_PREDICTIONS`, so a later promotion reads the champion's answers instead
  of predicting again); ``registered.json`` in the evaluation folder; and the table, plots and
  figures in an ``evaluation`` run;
* :func:`promote_challengers`: per registered model of the comparison, the new version
  (challenger) against the current ``champion`` on the same cases
  (:func:`ecg_r1.evaluation.promotion.decide_promotion`), the decision written on the version
  and into ``promotion.json``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from ecg_r1.evaluation.evaluate import Predictions, align
from ecg_r1.evaluation.model_card import model_card
from ecg_r1.evaluation.outputs import CASES_FILE, predictions_key, read_metrics, read_predictions
from ecg_r1.evaluation.predictions import predict_cases
from ecg_r1.evaluation.promotion import CHAMPION, PromotionRule, decide_promotion, record_decision
from ecg_r1.evaluation.results import Comparison
from ecg_r1.tracking import model_registry
from ecg_r1.tracking import runs as tracking

logger = logging.getLogger(__name__)

REGISTRY_FILE = "registered.json"  # row name -> "model-name/version" of this comparison
PROMOTION_FILE = "promotion.json"  # the decisions of the last promotion
VERSION_PREDICTIONS = "evaluation/predictions.parquet"  # on each version's run, for later champions


@dataclass(frozen=True)
class ComparisonLog:
    """Where a comparison was logged.

    Attributes:
        registered: row name -> ``"model-name/version"`` of the rows that are registered versions.
        version_runs: row name -> the version's MLflow run id.
        evaluation_run_id: the ``evaluation`` run holding the table, plots and figures.
    """

    registered: dict[str, str]
    version_runs: dict[str, str]
    evaluation_run_id: str


def stage_version(stage_dir: Path | None) -> tuple[str, int] | None:
    """(model name, version) a training stage folder registered, or None."""
    if stage_dir is None:
        return None
    from ecg_r1.training.stage_folder import read_result

    result = read_result(stage_dir)
    if result is None or not result.registered:
        return None
    name, version = result.registered.rsplit("/", 1)
    return name, int(version)


def _log_file_as(run_id: str, path: Path, artifact_file: str) -> None:
    from mlflow import MlflowClient

    parent, name = artifact_file.rsplit("/", 1)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / name
        copy.write_bytes(path.read_bytes())
        MlflowClient().log_artifact(run_id, str(copy), parent)


def log_comparison(
    result: Comparison,
    versions: Mapping[str, tuple[str, int] | None],
    experiment: str,
    provenance: Mapping[str, str],
    params: Mapping[str, Any],
) -> ComparisonLog:
    """Log a comparison on its registered versions and in an ``evaluation`` run.

    Args:
        result: from :func:`ecg_r1.evaluation.comparison.run_comparison`.
        versions: row name -> (registered model name, version), None for a row that is no
            registered version (its metrics stay in the evaluation run only).
        experiment: the MLflow experiment of the evaluation run (the profile's).
        provenance: git commit and data version (:func:`ecg_r1.tracking.runs.run_context`).
        params: further parameters of the evaluation run (bootstrap, seed); the models are added
            (their registered version, else their folder).

    Returns:
        A :class:`ComparisonLog`; ``registered.json`` is written in the result's folder.
    """
    import mlflow

    registered: dict[str, str] = {}
    version_runs: dict[str, str] = {}
    datasets = evaluation_datasets(result)
    client = tracking.mlflow_client()
    data_version = provenance.get("data_version", "")
    for name, found in versions.items():
        if found is None:
            logger.warning("%s: no registered model version; its metrics are not logged on a version", name)
            continue
        model_name, version = found
        registered[name] = f"{model_name}/{version}"
        run_id = model_registry.version_run_id(model_name, version)
        for split, metrics in result.model_metrics(name).items():
            model_registry.log_version_metrics(model_name, version, metrics, datasets[split])
        training_tags = client.get_model_version(model_name, str(version)).tags
        card = model_card(result, name, model_name, version, training_tags, data_version)
        model_registry.set_model_card(model_name, version, card)
        for key, value in {"evaluation.data_version": data_version, "evaluation.row": name}.items():
            client.set_model_version_tag(model_name, str(version), key, value)
        # The fixed name lets a later promotion read this version's answers as the champion's.
        _log_file_as(run_id, result.files[predictions_key(name)], VERSION_PREDICTIONS)
        version_runs[name] = run_id
    (result.out_dir / REGISTRY_FILE).write_text(json.dumps(registered, indent=2))
    with tracking.start_or_resume_run(experiment, "evaluation", tags={"stage": "evaluation"}) as run:
        models = {n: registered.get(n, str(folder)) for n, folder in result.models.items()}
        tracking.log_params_flat({"models": models, **params, **provenance}, prefix="evaluation.")
        figures = {k: v for k, v in result.figures().items() if v == v}  # NaN: not chartable
        mlflow.log_metrics({k.replace(" ", "_"): v for k, v in figures.items()})
        mlflow.log_artifacts(str(result.out_dir), "evaluation")
        evaluation_run_id = run.info.run_id
    return ComparisonLog(registered, version_runs, evaluation_run_id)


def evaluation_datasets(result: Comparison) -> dict[str, Any]:
    """One MLflow dataset per evaluated split: its cases (record, hospital, label), named by the
    split, with MLflow's digest of their content (another sample of cases is another dataset)."""
    import mlflow

    cases = result.cases
    return {
        split: mlflow.data.from_pandas(
            cases.filter(pl.col("split") == split).drop("split").to_pandas(),
            source=str(result.files["cases"]),
            name=split,
            targets="label",
        )
        for split in cases["split"].unique(maintain_order=True)
    }


def _champion_predictions(model_name: str, version: int, cases: pl.DataFrame, profile: str) -> Predictions:
    """The champion's answers on the cases: from its run's evaluation, else predicted anew."""
    import mlflow

    run_id = model_registry.version_run_id(model_name, version)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=VERSION_PREDICTIONS, dst_path=tmp
            )
            saved = Predictions.from_frame(f"{model_name} v{version}", pl.read_parquet(local))
            align(saved, cases)  # raises when the saved answers miss some of these cases
            return saved
        except (OSError, ValueError, mlflow.exceptions.MlflowException):
            pass  # evaluated on other cases (new data) or never: predict below
    folder = model_registry.load_registered(f"models:/{model_name}/{version}")
    predictions, _ = predict_cases(folder, profile, cases, name=f"{model_name} v{version}")
    return predictions


@dataclass(frozen=True)
class Promotion:
    """What :func:`promote_challengers` decided.

    Attributes:
        rows: one row a judged version (model, challenger, champion before and after, decision,
            accuracies, p-value, reason, figures), as in ``promotion.json``.
        cases: the number of cases of the rule's split the decisions rest on.
    """

    rows: list[dict[str, Any]]
    cases: int


def promote_challengers(
    evaluation_dir: Path, candidates: Sequence[str], rule: PromotionRule, default_profile: str
) -> Promotion:
    """Judge each candidate row's registered version against its model's champion.

    Args:
        evaluation_dir: a comparison folder logged by :func:`log_comparison` (``registered.json``,
            the cases and each row's predictions).
        candidates: comparison rows whose registered versions are challengers, in this order.
        rule: the promotion rule (its ``split`` selects the cases).
        default_profile: the profile to predict a champion with when the comparison names none.

    Returns:
        A :class:`Promotion`; its rows are also written to ``promotion.json``.
    """
    registry_file = evaluation_dir / REGISTRY_FILE
    registered = json.loads(registry_file.read_text()) if registry_file.is_file() else {}
    all_cases = pl.read_parquet(evaluation_dir / CASES_FILE)
    cases = all_cases.filter(pl.col("split") == rule.split)
    metrics = read_metrics(evaluation_dir)
    profile = metrics.get("profile", default_profile)
    rows: list[dict[str, Any]] = []
    for name in candidates:
        if name not in registered:
            logger.warning("%s: no registered version in this comparison; nothing to promote", name)
            continue
        model_name, version = registered[name].rsplit("/", 1)
        challenger = read_predictions(evaluation_dir, name)
        y, challenger_pred, _ = align(challenger, cases)
        champion = model_registry.alias_version(model_name, CHAMPION)
        champion_pred = None
        if champion is not None and champion != int(version):
            saved = _champion_predictions(model_name, champion, cases, profile)
            champion_pred = align(saved, cases)[1]
        elif champion == int(version):
            logger.info("%s v%s is already champion", model_name, version)
        decision = decide_promotion(y, champion_pred, challenger_pred, rule)
        record_decision(model_name, version, decision)
        logger.info("%s v%s: %s", model_name, version, decision.reason)
        rows.append(
            {
                "model": model_name,
                "challenger": int(version),
                "champion_before": champion,
                "decision": "promoted" if decision.promote else "refused",
                "champion_after": model_registry.alias_version(model_name, CHAMPION),
                "challenger_accuracy": decision.figures.get("challenger_accuracy"),
                "champion_accuracy": decision.figures.get("champion_accuracy"),
                "p_mid": decision.figures.get("mcnemar_p_mid"),
                "reason": decision.reason,
                "figures": {
                    k: v
                    for k, v in decision.figures.items()
                    if isinstance(v, int | float) and not isinstance(v, bool)
                },
            }
        )
    (evaluation_dir / PROMOTION_FILE).write_text(json.dumps(rows, indent=2, default=str))
    return Promotion(rows, cases.height)
