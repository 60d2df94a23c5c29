"""Asset checks of the data, image and base-model layers: one invariant a check, observed and expected values in metadata.

Blocking checks stop every downstream asset of the run when they fail: a fatal validation, an
ingest that lost records, a patient in two splits, a held-out hospital inside training.
"""

import json

import dagster as dg
import polars as pl

from dagster_project.defs.assets.data_assets import (
    cohort_splits,
    raw_cohort,
    read_split_config,
    validated_cohort,
)
from dagster_project.defs.assets.image_assets import ecg_images
from dagster_project.defs.assets.model_assets import base_model
from dagster_project.defs.resources import DataLayout
from ecg_r1.data import split as split_lib
from ecg_r1.data import validate as validate_lib
from ecg_r1.data.labels import KNOWN_LABELS
from ecg_r1.data.store import SUMMARY_FILE, read_cohort
from ecg_r1.imaging.render import INDEX_FILE as IMAGE_INDEX_FILE
from ecg_r1.imaging.render import page_mismatch
from ecg_r1.modeling.profiles import load_profile


@dg.asset_check(asset=raw_cohort, blocking=True)
def check_ingest_accounts_for_every_record(layout: DataLayout) -> dg.AssetCheckResult:
    """records_in == loaded + quarantined: no record vanished in ingest."""
    summary = json.loads((layout.cohort / SUMMARY_FILE).read_text())
    quarantined = sum(summary["quarantined"].values())
    loaded_rows = read_cohort(layout.cohort).height
    passed = summary["records_in"] == summary["loaded"] + quarantined and loaded_rows == summary["loaded"]
    return dg.AssetCheckResult(
        passed=passed,
        metadata={
            "records_in": summary["records_in"],
            "loaded": summary["loaded"],
            "quarantined": quarantined,
            "rows_in_cohort_table": loaded_rows,
        },
    )


@dg.asset_check(asset=validated_cohort, blocking=True)
def check_validation_not_fatal(layout: DataLayout) -> dg.AssetCheckResult:
    """The cohort has no fatal validation failure (schema, ids, signal index, too many bad records)."""
    result = validate_lib.read_validation(layout.cohort)
    failed = [o for o in result.expectations if o.fatal and not o.success]
    return dg.AssetCheckResult(
        passed=not result.fatal,
        metadata={
            "fatal_reasons": ", ".join(result.fatal_reasons) or "none",
            "failed_fatal_expectations": dg.MetadataValue.md(
                "\n".join(
                    f"- {o.reason}: {o.expectation} {o.column or ''} observed {o.observed}" for o in failed
                )
                or "(none)"
            ),
            "records": result.n_records,
            "quarantined": result.n_quarantined,
        },
    )


@dg.asset_check(asset=validated_cohort, blocking=True)
def check_validated_records_accounted(layout: DataLayout) -> dg.AssetCheckResult:
    """Every cohort record is either in the validated table or in the validation quarantine."""
    result = validate_lib.read_validation(layout.cohort)
    if result.fatal:
        return dg.AssetCheckResult(
            passed=False, metadata={"reason": "validation was fatal: nothing validated"}
        )
    cohort = read_cohort(layout.cohort).get_column("record_id")
    validated = pl.read_parquet(layout.cohort / validate_lib.VALIDATED_FILE).get_column("record_id")
    quarantined = pl.read_parquet(layout.cohort / validate_lib.VALIDATION_QUARANTINE_FILE).get_column(
        "record_id"
    )
    both = set(validated) & set(quarantined)
    lost = set(cohort) - set(validated) - set(quarantined)
    return dg.AssetCheckResult(
        passed=not both and not lost,
        metadata={
            "cohort": len(cohort),
            "validated": len(validated),
            "quarantined": len(quarantined),
            "in_both": len(both),
            "lost": len(lost),
        },
    )


@dg.asset_check(asset=cohort_splits, blocking=True)
def check_no_patient_in_two_splits(layout: DataLayout) -> dg.AssetCheckResult:
    """No patient has records in two splits (patient-level leakage)."""
    splits = split_lib.read_splits(layout.splits)
    leaking = split_lib.patients_in_several_splits(splits)
    return dg.AssetCheckResult(
        passed=not leaking,
        metadata={
            "patients": splits.get_column("patient_id").n_unique(),
            "patients_in_several_splits": len(leaking),
            "examples": ", ".join(leaking[:10]) or "none",
            "expected": 0,
        },
    )


@dg.asset_check(asset=cohort_splits, blocking=True)
def check_held_out_hospital_not_in_training(layout: DataLayout) -> dg.AssetCheckResult:
    """Records of the held-out hospitals are only in test_external (no cross-hospital leakage)."""
    splits = split_lib.read_splits(layout.splits)
    held_out = read_split_config(layout.splits).get("held_out_hospitals", [])
    leaks = split_lib.held_out_leaks(splits, held_out)
    outsiders = splits.filter(
        (pl.col("split") == split_lib.TEST_EXTERNAL) & ~pl.col("hospital").is_in(held_out)
    ).height
    return dg.AssetCheckResult(
        passed=leaks.height == 0 and outsiders == 0,
        metadata={
            "held_out_hospitals": ", ".join(held_out) or "none",
            "held_out_records_outside_test_external": leaks.height,
            "other_hospitals_in_test_external": outsiders,
            "examples": ", ".join(leaks.get_column("record_id").head(10).to_list()) or "none",
            "expected": 0,
        },
    )


@dg.asset_check(asset=cohort_splits)
def check_every_split_has_both_labels(layout: DataLayout) -> dg.AssetCheckResult:
    """Each non-empty split holds both ischemic and non-ischemic records (metrics need both)."""
    splits = split_lib.read_splits(layout.splits)
    present = splits.group_by("split").agg(
        pl.col("label").filter(pl.col("label").is_in(KNOWN_LABELS)).n_unique().alias("labels")
    )
    lacking = present.filter(pl.col("labels") < 2).get_column("split").to_list()
    return dg.AssetCheckResult(
        passed=not lacking,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"splits_with_one_label": ", ".join(lacking) or "none"},
    )


@dg.asset_check(
    asset=ecg_images, blocking=True, description="Every record of the split manifest has an image."
)
def check_every_split_record_has_an_image(layout: DataLayout) -> dg.AssetCheckResult:
    wanted = set(pl.read_parquet(layout.splits / split_lib.SPLITS_FILE)["record_id"].to_list())
    index = pl.read_parquet(layout.images / IMAGE_INDEX_FILE)
    present = {
        rid
        for rid, path in zip(index["record_id"], index["image_path"], strict=True)
        if (layout.images / path).is_file()
    }
    missing = sorted(wanted - present)
    return dg.AssetCheckResult(
        passed=not missing,
        metadata={
            "split_records": len(wanted),
            "images": len(present & wanted),
            "missing": len(missing),
            "missing_examples": ", ".join(missing[:5]) or "none",
        },
    )


@dg.asset_check(
    asset=base_model,
    blocking=True,
    description="The rendered pages have the size and layout of the profile the models train with.",
)
def check_pages_match_the_training_profile(
    context: dg.AssetCheckExecutionContext, layout: DataLayout
) -> dg.AssetCheckResult:
    # The profile the base model was materialized with is the one every training stage reads.
    event = context.instance.get_latest_materialization_event(base_model.key)
    profile = load_profile(str(event.asset_materialization.metadata["profile"].value))
    page = profile.render_config()
    problem = page_mismatch(layout.images, page)
    return dg.AssetCheckResult(
        passed=problem is None,
        metadata={
            "profile": profile.name,
            "expected_page": f"{page.width_px}x{page.height_px} px, {page.layout}",
            "problem": problem or "none",
        },
    )
