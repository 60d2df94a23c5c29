"""A small pipeline's MLflow store, built through the library as ``make run`` builds it: two
registered versions (SFT, GRPO) compared on a tiny cohort and logged by
:func:`ecg_r1.evaluation.registry.log_comparison`.

The two versions answer differently, so their figures tell them apart: ``SFT`` is the untrained
tiny model (never a valid answer: accuracy 0), ``GRPO`` the tiny model taught to answer ``Yes``
whatever it is shown (right on every ischemic case).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl
from test_dagster_evaluation import always_yes_model, register, stage
from test_train import make_cohort, tiny_test_profile

from ecg_r1.evaluation import registry
from ecg_r1.evaluation.cases import evaluation_cases
from ecg_r1.evaluation.comparison import ComparisonInputs, ComparisonSettings, run_comparison
from ecg_r1.evaluation.results import Comparison
from ecg_r1.modeling.build import build_base_model, corpus_from_cases
from ecg_r1.modeling.profiles import load_profile
from ecg_r1.tracking import runs as tracking

ROWS = {"GRPO": ("grpo_model", "ecg-r1-grpo"), "SFT": ("sft_model", "ecg-r1-sft")}
PROVENANCE = {"git_commit": "0123abc", "data_version": "feedbeef.dir"}


@dataclass(frozen=True)
class LoggedStore:
    """The store and what was logged in it."""

    root: Path
    uri: str
    experiment: str
    comparison: Comparison
    log: registry.ComparisonLog


def build_logged_store(root: Path, seed_db) -> LoggedStore:
    """Register the two versions in a store under ``root``, compare them and log the comparison.

    Args:
        root: the project root (``mlflow/`` and ``data/`` are made under it).
        seed_db: the ``seed_mlflow_db`` fixture (a migrated database, copied).
    """
    seed_db(root / "mlflow" / "mlflow.db")
    uri = tracking.configure(root)
    data = make_cohort(root / "data", n=32)
    profile_path = tiny_test_profile(root / "profile.yaml", grpo={"max_completion_length": 8})
    profile = load_profile(profile_path)
    cohort = pl.read_parquet(data["cohort"] / "cohort.parquet")
    untrained = build_base_model(profile, corpus_from_cases(cohort.to_dicts()), root / "untrained")
    train = evaluation_cases(data["cohort"], data["splits"], data["images"], "train")
    yes = always_yes_model(untrained, profile, train.head(2), root / "always_yes")
    truth = root / "truth.parquet"
    cohort.select(
        "record_id",
        pl.when(pl.col("label") == "ischemic").then(0.8).otherwise(0.3).alias("posterior_ischemic"),
    ).write_parquet(truth)
    models = root / "models"
    for row, model_dir in (("GRPO", yes), ("SFT", untrained)):
        asset, name = ROWS[row]
        stage(models, asset, model_dir, register(profile_path, model_dir, name))
    result = run_comparison(
        {row: models / asset for row, (asset, _) in ROWS.items()},
        profile_path,
        ComparisonInputs(data["cohort"], data["splits"], data["images"], truth_path=truth),
        root / "evaluation",
        ComparisonSettings(n_boot=100, max_new_tokens=16, n_case_figures=0, ablations=["image"]),
    )
    versions = {row: registry.stage_version(result.stages[row]) for row in ROWS}
    log = registry.log_comparison(result, versions, profile.name, PROVENANCE, {"n_boot": 100})
    return LoggedStore(root, uri, tracking.experiment_name(profile.name), result, log)
