"""Evaluation: reference baselines, the model comparison, and the promotion of new model versions.

* ``reference_baselines``: majority class and the feature baseline, fitted on the training split.
* ``real_record_cohort``: real records a user names (``source_paths`` or ``$ECG_R1_REAL_RECORDS``),
  ingested and rendered by :func:`ecg_r1.evaluation.real_records.prepare_real_records` for a sim-to-real
  section of the comparison; with nothing named, no such section.
* ``model_comparison``: :func:`ecg_r1.evaluation.comparison.run_comparison` on the model assets' stage
  folders (``data/models/<asset>/``); the metrics go onto each model version's LoggedModel by
  evaluation dataset and onto its run (docs/mlflow.md), its model card becomes the version's
  description, the table and plots go into an ``evaluation`` run.
* ``model_promotion``: per registered model, the new version (challenger) against the current
  ``champion`` on the cross-hospital split, by :func:`ecg_r1.evaluation.promotion.decide_promotion`; the
  decision and its figures are written on the version (:func:`ecg_r1.evaluation.promotion.record_decision`).
"""

import json
import os
import shutil
from pathlib import Path

import dagster as dg
import polars as pl
from pydantic import Field

from dagster_project.defs.executors import DEFAULT_QUEUE, GPU_QUEUE, TRANSIENT_RETRY
from dagster_project.defs.metadata import inline_png, markdown_table
from dagster_project.defs.resources import DataLayout, DvcResource, MlflowResource
from ecg_r1.constants import DEFAULT_SEED, N_BOOT, PREDICTION_BATCH_SIZE, PROMOTION_TESTS
from ecg_r1.data.split import SPLITS_FILE, TEST_EXTERNAL, TRAIN, VAL
from ecg_r1.evaluation import real_records as real_records_lib
from ecg_r1.evaluation import registry
from ecg_r1.evaluation.baselines import BOOST_LEARNING_RATE, BOOST_MAX_ITER
from ecg_r1.evaluation.cases import add_features, evaluation_cases
from ecg_r1.evaluation.comparison import (
    ComparisonInputs,
    ComparisonSettings,
    covering_truth,
    possible_ablations,
    run_comparison,
)
from ecg_r1.evaluation.outputs import read_metrics, slug
from ecg_r1.evaluation.predictions import ABLATIONS, RESULT_FILE
from ecg_r1.evaluation.promotion import CHAMPION, PromotionRule
from ecg_r1.evaluation.references import ReferenceBaselines
from ecg_r1.modeling.device import device_setting
from ecg_r1.modeling.profiles import DEFAULT_PROFILE, load_profile
from ecg_r1.tracking import model_registry

GROUP = "evaluation"
EVALUATION_DIR = "evaluation"  # under the data folder: the reports are versioned with the data
REAL_RECORDS_DIR = "real_records"  # under the data folder, like the cohort it is checked against
BASELINES_ASSET = "reference_baselines"
# The default comparison: row name -> model asset, in table order. The paper's RL-only recipe
# (grpo_after_warmup_model) is not in it: it costs a third of a CPU run and is added by config
# (models: {"GRPO after warm-up": "grpo_after_warmup_model", ...}) when wanted.
DEFAULT_MODELS = {"GRPO": "grpo_model", "SFT": "sft_model"}


class BaselineConfig(dg.Config):
    """The feature baseline's hyperparameters."""

    seed: int = Field(default=DEFAULT_SEED, description="Random state of the gradient boosting.")
    max_iter: int = Field(default=BOOST_MAX_ITER, description="Boosting rounds.")
    learning_rate: float = Field(default=BOOST_LEARNING_RATE, description="Boosting learning rate.")
    use_note: bool = Field(default=True, description="Use the note's word flags.")


class RealRecordsConfig(dg.Config):
    """Which real records the trained models are checked on (sim-to-real)."""

    source_paths: list[str] = Field(
        default_factory=list,
        description="LUDB, CinC, PTB-XL folders or manifest CSVs, relative to the project root or absolute; "
        f"empty: the {real_records_lib.ENV_VAR} environment variable (paths separated by "
        f"{os.pathsep!r}); neither: no real-record section.",
    )
    profile: str = Field(
        default=DEFAULT_PROFILE, description="Model profile whose page size the pages follow."
    )
    workers: int = Field(default=2, description="Processes for the ingest and the rendering.")


class ComparisonConfig(dg.Config):
    """Which models are compared, and how."""

    models: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_MODELS),
        description="Row name -> model asset (its stage folder data/models/<asset>/), in table order.",
    )
    pairs: list[list[str]] = Field(
        default_factory=lambda: [["GRPO", "SFT"]],
        description="Paired comparisons [A, B] on the same cases.",
    )
    profile: str = Field(default=DEFAULT_PROFILE, description="Model profile of the compared models.")
    n_boot: int = Field(default=N_BOOT, description="Bootstrap resamples per interval.")
    batch_size: int = Field(default=PREDICTION_BATCH_SIZE, description="Examples per forward pass.")
    max_cases_per_split: int = Field(
        default=0, description="Evaluate a seeded sample of at most this many cases per split; 0: all."
    )
    max_new_tokens: int = Field(default=0, description="Completion cap; 0: the profile's.")
    seed: int = Field(default=DEFAULT_SEED, description="Seed of the bootstrap and of the cases shown.")
    n_case_figures: int = Field(
        default=ComparisonSettings.n_case_figures, description="Cases shown with the first model's reasoning."
    )
    device: str = Field(
        default="",
        description="ECG_R1_DEVICE for this asset (cpu: a GPU profile on the CPU on purpose); empty: the environment's.",
    )
    ablations: list[str] = Field(
        default_factory=lambda: list(ABLATIONS),
        description="Inputs taken away for extra rows per model: image (a flat-line page), note; "
        "english_note (the notes of a hospital writing in another language in English) where the "
        "simulator truth is there.",
    )


class PromotionConfig(dg.Config):
    """The promotion rule (see ``ecg_r1.evaluation.promotion``) and the rows whose new versions are judged."""

    candidates: list[str] = Field(
        default_factory=lambda: ["SFT", "GRPO"],
        description="Comparison rows whose registered versions are challengers, in this order.",
    )
    test: str = Field(default=PromotionRule.test, description=" | ".join(PROMOTION_TESTS) + ".")
    alpha: float = Field(
        default=PromotionRule.alpha, description="Significance level of the two-sided paired test."
    )
    margin: float = Field(
        default=PromotionRule.margin, description="Non-inferiority margin (paired_bootstrap only)."
    )
    n_boot: int = Field(default=PromotionRule.n_boot, description="Paired bootstrap resamples.")
    seed: int = Field(default=PromotionRule.seed, description="Resampling seed.")


def evaluation_dir(layout: DataLayout) -> Path:
    return layout.data / EVALUATION_DIR


def real_records_dir(layout: DataLayout) -> Path:
    return layout.data / REAL_RECORDS_DIR


@dg.asset(
    group_name=GROUP,
    deps=[dg.AssetKey("ecg_images")],
    kinds={"python", "scikitlearn"},
    op_tags=DEFAULT_QUEUE,
)
def reference_baselines(
    context: dg.AssetExecutionContext, config: BaselineConfig, layout: DataLayout, dvc: DvcResource
) -> dg.MaterializeResult:
    """The majority class and the feature baseline (gradient boosting on measured ECG features and
    the clinical fields), fitted on the training split; validation accuracy in metadata."""
    from ecg_r1.evaluation.baselines import FeatureBaseline, MajorityBaseline
    from ecg_r1.evaluation.evaluate import evaluate_predictions

    train, val = (
        add_features(
            evaluation_cases(layout.cohort, layout.splits / SPLITS_FILE, layout.images, s),
            layout.cohort,
        )
        for s in (TRAIN, VAL)
    )
    baselines = ReferenceBaselines(
        MajorityBaseline().fit(train),
        FeatureBaseline(
            seed=config.seed,
            max_iter=config.max_iter,
            learning_rate=config.learning_rate,
            use_note=config.use_note,
        ).fit(train),
    )
    out = layout.models / BASELINES_ASSET
    files = baselines.save(out)
    feature_val = evaluate_predictions(baselines.feature.predict(val), val, n_boot=0)
    majority_val = evaluate_predictions(baselines.majority.predict(val), val, n_boot=0)
    context.log.info(f"feature baseline validation accuracy {feature_val.accuracy.value:.3f}")
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "files": ", ".join(p.name for p in files.values()),
            "train_cases": train.height,
            "train_prevalence": baselines.majority.prevalence,
            "val_cases": val.height,
            "feature_baseline_val_accuracy": feature_val.accuracy.value,
            "feature_baseline_val_auroc": feature_val.auroc.value,
            "majority_val_accuracy": majority_val.accuracy.value,
            **dvc.record(),
        }
    )


@dg.asset(group_name=GROUP, kinds={"python", "png"}, op_tags=DEFAULT_QUEUE)
def real_record_cohort(
    context: dg.AssetExecutionContext, config: RealRecordsConfig, layout: DataLayout, dvc: DvcResource
) -> dg.MaterializeResult:
    """Real records for a sim-to-real check: the labelled TWI records of the named inputs, ingested
    and rendered at the profile's page size; nothing named: no real-record section."""
    from ecg_r1.modeling.profiles import load_profile

    out = real_records_dir(layout)
    paths = [layout.path(p) for p in config.source_paths or real_records_lib.paths_from_env()]
    if not paths:
        # Pages of earlier inputs must not be evaluated as if they were still wanted.
        shutil.rmtree(out, ignore_errors=True)
        note = (
            f"no real records configured (real_record_cohort.source_paths or ${real_records_lib.ENV_VAR}): "
            "the comparison has no real-record section"
        )
        context.log.info(note)
        return dg.MaterializeResult(metadata={"configured": False, "note": note})
    try:
        real = real_records_lib.prepare_real_records(
            paths, out, load_profile(config.profile).render_config(), workers=config.workers
        )
    except (OSError, ValueError) as error:
        raise dg.Failure(f"real records: {error}") from error
    return dg.MaterializeResult(
        metadata={
            "configured": True,
            "path": dg.MetadataValue.path(str(out)),
            "inputs": ", ".join(real.inputs),
            "records": real.records,
            "quarantined": real.quarantined,
            "cases": real.cases,
            **{f"cases_{slug(k)}": v for k, v in real.by_label.items()},
            **{f"cases_from_{slug(k)}": v for k, v in real.by_source.items()},
            "not_rendered": len(real.not_rendered),
            **dvc.record(),
        }
    )


@dg.asset(
    group_name=GROUP,
    deps=[reference_baselines, real_record_cohort, *(dg.AssetKey(name) for name in DEFAULT_MODELS.values())],
    kinds={"python", "mlflow"},
    # Every model answers every test case (generation + P(Yes)): accelerator work.
    op_tags=GPU_QUEUE,
    retry_policy=TRANSIENT_RETRY,
)
def model_comparison(
    context: dg.AssetExecutionContext,
    config: ComparisonConfig,
    layout: DataLayout,
    dvc: DvcResource,
    mlflow: MlflowResource,
) -> dg.MaterializeResult:
    """Every model and reference row on the internal and cross-hospital test splits (n, 95 % CIs,
    per hospital, paired comparisons) and, when real_record_cohort holds records, on those (a
    sim-to-real section); metrics logged on each model version's LoggedModel (by dataset) and run,
    and its model card as the version's description."""
    folders = {}
    for name, asset in config.models.items():
        folder = layout.models / asset
        if not (folder / RESULT_FILE).is_file():
            raise dg.Failure(
                f"{folder} holds no finished training stage (result.json): materialize {asset} first"
            )
        folders[name] = folder
    out = evaluation_dir(layout)
    splits_path = layout.splits / SPLITS_FILE
    truth_path = covering_truth(layout.simulated / "truth.parquet", splits_path)
    real_dir = real_records_dir(layout)
    real_records = real_dir if (real_dir / real_records_lib.SUMMARY_FILE).is_file() else None
    with device_setting(config.device):
        inputs = ComparisonInputs(
            layout.cohort,
            splits_path,
            layout.images,
            truth_path=truth_path,
            baselines_dir=layout.models / BASELINES_ASSET,
            real_records=real_records,
        )
        settings = ComparisonSettings(
            seed=config.seed,
            pairs=[(a, b) for a, b in config.pairs if a in folders and b in folders],
            n_boot=config.n_boot,
            batch_size=config.batch_size,
            max_new_tokens=config.max_new_tokens or None,
            n_case_figures=config.n_case_figures,
            max_cases_per_split=config.max_cases_per_split or None,
            ablations=possible_ablations(config.ablations, truth_path),
        )
        result = run_comparison(folders, config.profile, inputs, out, settings)
    provenance = dvc.record()
    uri = mlflow.configure()
    versions = {name: registry.stage_version(result.stages[name]) for name in folders}
    logged = registry.log_comparison(
        result,
        versions,
        # The profile's experiment (a profile given as a YAML path is named by its `name`).
        experiment=load_profile(config.profile).name,
        provenance=provenance,
        params={"n_boot": config.n_boot, "seed": config.seed},
    )
    registered, evaluation_run = logged.registered, logged.evaluation_run_id

    metadata = {
        "path": dg.MetadataValue.path(str(out)),
        "comparison": dg.MetadataValue.md(result.table),
        "tracking_uri": uri,
        "evaluation_run_id": evaluation_run,
        "evaluation_run": dg.MetadataValue.url(mlflow.run_url(evaluation_run)),
        "registered_versions": ", ".join(f"{n}: {v}" for n, v in registered.items()) or "none",
        "real_records": str(real_records) if real_records else "none configured",
        **{f"run_id_{slug(n)}": r for n, r in logged.version_runs.items()},
        **provenance,
    }
    for name in folders:
        for split, m in result.results[name].items():
            key = f"{slug(name)}_{split}"
            metadata[f"{key}_accuracy"] = m.accuracy.value
            metadata[f"{key}_valid_rate"] = m.valid_rate.value
            metadata[f"{key}_n"] = m.n
    for split, shift in result.note_shift.items():
        metadata[f"note_words_unseen_{split}"] = dg.MetadataValue.float(shift.unseen_words)
        metadata[f"notes_unreadable_{split}"] = dg.MetadataValue.float(shift.unreadable_notes)
    for key, path in result.plots.items():
        metadata[f"plot_{key}"] = dg.MetadataValue.md(inline_png(path))
    return dg.MaterializeResult(metadata=metadata)


@dg.asset_check(
    asset=model_comparison,
    blocking=True,
    description="Every model's accuracy and valid rate are finite on both test splits, with n > 0.",
)
def check_evaluation_metrics_finite(layout: DataLayout) -> dg.AssetCheckResult:
    metrics = read_metrics(evaluation_dir(layout))
    bad = [
        f"{r['name']} {r['split']}"
        for r in metrics["rows"]
        if r["kind"] == "measured" and (r["accuracy"] is None or r["valid_rate"] is None or not r["n"])
    ]
    measured = [r for r in metrics["rows"] if r["kind"] == "measured"]
    return dg.AssetCheckResult(
        passed=bool(measured) and not bad,
        metadata={
            "measured_rows": len(measured),
            "rows_not_finite": ", ".join(bad) or "none",
            "test_internal_n": metrics["splits"]["test_internal"]["n"],
            "test_external_n": metrics["splits"]["test_external"]["n"],
        },
    )


@dg.asset(
    group_name=GROUP,
    deps=[model_comparison],
    kinds={"python", "mlflow"},
    op_tags=GPU_QUEUE,
    retry_policy=TRANSIENT_RETRY,
)
def model_promotion(
    context: dg.AssetExecutionContext, config: PromotionConfig, layout: DataLayout, mlflow: MlflowResource
) -> dg.MaterializeResult:
    """Per registered model, the new version (challenger) becomes champion unless its cross-hospital
    accuracy is significantly worse than the champion's on the same cases (paired test)."""
    mlflow.configure()
    try:
        rule = PromotionRule(
            split=TEST_EXTERNAL,
            test=config.test,
            alpha=config.alpha,
            margin=config.margin,
            n_boot=config.n_boot,
            seed=config.seed,
        )
    except ValueError as error:
        raise dg.Failure(f"invalid promotion rule: {error}") from error
    promotion = registry.promote_challengers(evaluation_dir(layout), config.candidates, rule, DEFAULT_PROFILE)
    metadata: dict = {}
    for row in promotion.rows:
        prefix = slug(row["model"])
        metadata[f"{prefix}_decision"] = row["decision"]
        metadata[f"{prefix}_reason"] = row["reason"]
        metadata[f"{prefix}_champion"] = row["champion_after"]
        metadata |= {f"{prefix}_{k}": v for k, v in row["figures"].items()}
        context.log.info(f"{row['model']} v{row['challenger']}: {row['reason']}")
    shown = [{k: v for k, v in row.items() if k not in ("reason", "figures")} for row in promotion.rows]
    table = markdown_table(pl.DataFrame(shown)) if shown else "(no registered versions to judge)"
    return dg.MaterializeResult(
        metadata={
            "decisions": dg.MetadataValue.md(table),
            "rule": f"{rule.test}, alpha {rule.alpha}, margin {rule.margin}, split {rule.split}",
            "cases": promotion.cases,
            **metadata,
        }
    )


@dg.asset_check(asset=model_promotion, description="Every judged model has a champion after promotion.")
def check_every_judged_model_has_a_champion(
    layout: DataLayout, mlflow: MlflowResource
) -> dg.AssetCheckResult:
    mlflow.configure()
    path = evaluation_dir(layout) / registry.PROMOTION_FILE
    rows = json.loads(path.read_text()) if path.is_file() else []
    missing = sorted({r["model"] for r in rows if model_registry.alias_version(r["model"], CHAMPION) is None})
    return dg.AssetCheckResult(
        passed=not missing,
        metadata={"judged": len(rows), "without_champion": ", ".join(missing) or "none"},
    )
