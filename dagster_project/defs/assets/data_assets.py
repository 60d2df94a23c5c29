"""The data layer: simulated export -> ingested cohort -> validated cohort -> hospital-aware splits.

Each asset is a thin wrapper over ``ecg_r1``; data passes through the folders of the
:class:`~dagster_project.defs.resources.DataLayout` (memory-mapped signals are never pickled),
so the assets return :class:`dagster.MaterializeResult` with flat metadata.

Bringing your own data: ``raw_cohort`` ingests the simulated export unless ``source_paths`` is
set. To ingest PTB-XL (or CinC, LUDB, a manifest CSV) run the ``ingest_job`` (``raw_cohort`` and
everything after it, without the simulator) with run config::

    ops:
      raw_cohort:
        config:
          source_paths: ["/data/ptb-xl-1.0.3"]
      cohort_splits:
        config:
          held_out_hospitals: ["<a site of your data>"]
"""

import json
import shutil
from pathlib import Path

import dagster as dg
import polars as pl
from pydantic import Field

from dagster_project.defs.executors import DEFAULT_QUEUE
from dagster_project.defs.metadata import counts_by, dict_table, markdown_table
from dagster_project.defs.resources import DataLayout, DvcResource
from ecg_r1.constants import DEFAULT_SEED
from ecg_r1.data import split as split_lib
from ecg_r1.data import validate as validate_lib
from ecg_r1.data.expectations import ValidationConfig
from ecg_r1.data.ingest import RECORD_TIMEOUT_S, ingest
from ecg_r1.data.labels import load_rules
from ecg_r1.data.store import read_cohort
from ecg_r1.simulate import DEFAULT_N, simulate_cohort

GROUP = "data"
SPLIT_CONFIG_FILE = "split_config.json"

_VALIDATION_DEFAULTS = ValidationConfig()


class SimulationConfig(dg.Config):
    """The simulated multi-hospital cohort (the embedded default data)."""

    n: int = Field(default=DEFAULT_N, description="Number of cases.")
    hospitals: int = Field(
        default=4, description="Number of hospitals; the last one is meant to be held out."
    )
    seed: int = Field(default=DEFAULT_SEED, description="Random seed.")
    workers: int = Field(default=1, description="Processes generating cases.")


class IngestConfig(dg.Config):
    """What to ingest."""

    source_paths: list[str] = Field(
        default_factory=list,
        description="Folders (PTB-XL, CinC, LUDB) or manifest CSVs, relative to the project root or absolute; "
        "empty: the simulated_raw export.",
    )
    label_rules: str = Field(default="", description="A label-rules YAML; empty: the packaged labels.yaml.")
    workers: int = Field(default=2, description="Processes reading records.")
    record_timeout_s: float = Field(
        default=RECORD_TIMEOUT_S,
        gt=0,
        description="Longest one record may take to read (s); slower records are quarantined as 'timeout'.",
    )


class ValidationSettings(dg.Config):
    """Thresholds of the validation suite (see ``ecg_r1.data.expectations``)."""

    min_age: float = _VALIDATION_DEFAULTS.min_age
    max_age: float = _VALIDATION_DEFAULTS.max_age
    min_source_fs: float = _VALIDATION_DEFAULTS.min_source_fs
    max_source_fs: float = _VALIDATION_DEFAULTS.max_source_fs
    max_ptp_mv: float = _VALIDATION_DEFAULTS.max_ptp_mv
    min_record_ptp_mv: float = _VALIDATION_DEFAULTS.min_record_ptp_mv
    max_quarantine_fraction: float = Field(
        default=_VALIDATION_DEFAULTS.max_quarantine_fraction,
        description="Above this share of failing records the validation is fatal instead of quarantining.",
    )


class SplitConfig(dg.Config):
    """The hospital-aware split."""

    held_out_hospitals: list[str] = Field(
        default_factory=lambda: ["hospital_d"],
        description="Hospitals forming the cross-hospital test set (the simulator's last hospital by default).",
    )
    val_fraction: float = Field(
        default=0.15, description="Share of the other hospitals' records for validation."
    )
    test_fraction: float = Field(
        default=0.15, description="Share of the other hospitals' records for the internal test."
    )
    seed: int = Field(default=DEFAULT_SEED, description="Seed of the patient shuffle.")
    twi_only: bool = Field(default=True, description="Keep only the T-wave-inversion cohort.")
    labelled_only: bool = Field(default=True, description="Drop records labelled unknown.")


@dg.asset(group_name=GROUP, kinds={"python", "parquet"}, op_tags=DEFAULT_QUEUE)
def simulated_raw(
    context: dg.AssetExecutionContext, config: SimulationConfig, layout: DataLayout, dvc: DvcResource
) -> dg.MaterializeResult:
    """A simulated multi-hospital TWI cohort written as a hospital export (WFDB + manifest.csv)."""
    out_dir = layout.simulated
    # A smaller cohort must not leave the records of a larger earlier one beside it.
    shutil.rmtree(out_dir, ignore_errors=True)
    summary = simulate_cohort(
        out_dir, n=config.n, hospitals=config.hospitals, seed=config.seed, workers=config.workers
    )
    mechanisms = pl.DataFrame(
        [{"hospital": h} | counts for h, counts in summary.cases_per_hospital_and_mechanism.items()]
    ).fill_null(0)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out_dir)),
            "n": summary.n,
            "seed": summary.seed,
            "held_out_hospital": summary.held_out_hospital,
            "prevalence": summary.prevalence,
            "bayes_accuracy": summary.bayes_accuracy,
            "bayes_auroc": summary.bayes_auroc,
            "naive_rule_accuracy": summary.naive_rule_accuracy,
            "cases_per_hospital": dg.MetadataValue.md(
                dict_table(summary.cases_per_hospital, "hospital", "cases")
            ),
            "cases_per_hospital_and_mechanism": dg.MetadataValue.md(markdown_table(mechanisms)),
            **dvc.record(),
        }
    )


@dg.asset(group_name=GROUP, deps=[simulated_raw], kinds={"python", "parquet"}, op_tags=DEFAULT_QUEUE)
def raw_cohort(
    context: dg.AssetExecutionContext, config: IngestConfig, layout: DataLayout, dvc: DvcResource
) -> dg.MaterializeResult:
    """The ingested cohort: canonical signals (memmap) + cohort table + quarantine of refused records."""
    paths = [layout.path(p) for p in config.source_paths] or [layout.simulated]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise dg.Failure(
            f"ingest input(s) not found: {missing}; materialize simulated_raw or fix raw_cohort.source_paths"
        )
    out_dir = layout.cohort
    validate_lib.clear_validation(out_dir)  # a new cohort invalidates the last validation
    rules = load_rules(layout.path(config.label_rules)) if config.label_rules else None
    summary = ingest(
        paths, out_dir, rules=rules, workers=config.workers, record_timeout_s=config.record_timeout_s
    )
    cohort = read_cohort(out_dir)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out_dir)),
            "sources": ", ".join(str(p) for p in paths),
            "records_in": summary.records_in,
            "loaded": summary.loaded,
            "quarantined": sum(summary.quarantined.values()),
            "quarantined_by_reason": dg.MetadataValue.md(
                dict_table(summary.quarantined, "reason", "records") if summary.quarantined else "(none)"
            ),
            "twi_cases": summary.twi_cases,
            "records_per_s": summary.records_per_s,
            "counts_by_hospital_and_label": dg.MetadataValue.md(counts_by(cohort, "hospital", "label")),
            **dvc.record(),
        }
    )


@dg.asset(group_name=GROUP, deps=[raw_cohort], kinds={"python", "parquet"}, op_tags=DEFAULT_QUEUE)
def validated_cohort(
    context: dg.AssetExecutionContext, config: ValidationSettings, layout: DataLayout, dvc: DvcResource
) -> dg.MaterializeResult:
    """The cohort records that pass the Great Expectations suite; failures in validation_quarantine.parquet.

    A fatal result still materializes (so the report shows in the UI); the blocking check
    ``check_validation_not_fatal`` then stops everything downstream.
    """
    settings = ValidationConfig(**config.model_dump())
    result = validate_lib.validate_cohort_dir(layout.cohort, settings)
    if result.fatal:
        context.log.error(f"validation is fatal: {result.fatal_reasons}; downstream assets will not run")
    by_reason = result.quarantined_by_reason()
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(layout.cohort / validate_lib.VALIDATED_FILE)),
            "success": result.success,
            "fatal": result.fatal,
            "fatal_reasons": ", ".join(result.fatal_reasons) or "none",
            "records": result.n_records,
            "passed": result.n_passed,
            "quarantined": result.n_quarantined,
            "quarantined_by_reason": dg.MetadataValue.md(
                dict_table(by_reason, "reason", "records") if by_reason else "(none)"
            ),
            "validation": dg.MetadataValue.md(result.to_markdown()),
            **dvc.record(),
        }
    )


@dg.asset(group_name=GROUP, deps=[validated_cohort], kinds={"python", "parquet"}, op_tags=DEFAULT_QUEUE)
def cohort_splits(
    context: dg.AssetExecutionContext, config: SplitConfig, layout: DataLayout, dvc: DvcResource
) -> dg.MaterializeResult:
    """The split manifest: train / val / test_internal by patient, test_external = held-out hospitals."""
    cohort = validate_lib.read_validated_cohort(layout.cohort)
    try:
        splits = split_lib.split_cohort(
            cohort,
            held_out_hospitals=config.held_out_hospitals,
            val_fraction=config.val_fraction,
            test_fraction=config.test_fraction,
            seed=config.seed,
            twi_only=config.twi_only,
            labelled_only=config.labelled_only,
        )
    except split_lib.SplitError as error:
        raise dg.Failure(str(error)) from error
    path = split_lib.write_splits(splits, layout.splits)
    # The checks read the configuration the manifest was made with from here.
    (path.parent / SPLIT_CONFIG_FILE).write_text(json.dumps(config.model_dump(), indent=2))
    per_split = splits.group_by("split").agg(
        pl.len().alias("records"), pl.col("patient_id").n_unique().alias("patients")
    )
    counts = {row["split"]: row for row in per_split.iter_rows(named=True)}
    metadata: dict = {
        "path": dg.MetadataValue.path(str(path)),
        "held_out_hospitals": ", ".join(config.held_out_hospitals) or "none",
        "records": splits.height,
    }
    for name in split_lib.SPLITS:
        metadata[f"{name}_records"] = counts.get(name, {}).get("records", 0)
        metadata[f"{name}_patients"] = counts.get(name, {}).get("patients", 0)
    metadata["counts_by_split_hospital_label"] = dg.MetadataValue.md(
        markdown_table(split_lib.split_summary(splits))
    )
    metadata["counts_by_split_and_label"] = dg.MetadataValue.md(counts_by(splits, "split", "label"))
    return dg.MaterializeResult(metadata=metadata | dvc.record())


def read_split_config(splits_dir: Path) -> dict:
    """The configuration ``cohort_splits`` wrote its manifest with."""
    path = splits_dir / SPLIT_CONFIG_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
