"""Jobs of the data layer."""

import dagster as dg

from dagster_project.defs.assets.data_assets import GROUP, raw_cohort

data_job = dg.define_asset_job(
    name="data_job",
    selection=dg.AssetSelection.groups(GROUP),
    description="Simulate the default cohort, ingest, validate and split it (the whole data group).",
)

ingest_job = dg.define_asset_job(
    name="ingest_job",
    selection=dg.AssetSelection.assets(raw_cohort).downstream() & dg.AssetSelection.groups(GROUP),
    description="Ingest the configured sources (raw_cohort.source_paths), validate and split, without the simulator.",
)

# The paper's RL-only recipe (label-free warm-up, then GRPO): a comparison to materialize on
# demand, kept out of the jobs so a CPU run fits its time budget.
WARMUP_RECIPE = dg.AssetSelection.assets("format_warmup_model", "grpo_after_warmup_model")

full_pipeline_job = dg.define_asset_job(
    name="full_pipeline_job",
    selection=dg.AssetSelection.all() - WARMUP_RECIPE,
    # One process, one step at a time: on a laptop's few cores two training stages side by side
    # only slow each other, and every subprocess would pay torch's import again.
    executor_def=dg.in_process_executor,
    description="Everything: simulate (the embedded default), ingest, validate, split, render, train "
    "(vision pre-training, SFT, GRPO), baselines, evaluation with ablations, promotion. The warm-up "
    "recipe (format_warmup_model, grpo_after_warmup_model) is materialized on demand.",
)

retrain_job = dg.define_asset_job(
    name="retrain_job",
    selection=dg.AssetSelection.assets(raw_cohort).downstream() - WARMUP_RECIPE,
    executor_def=dg.in_process_executor,
    description="Re-ingest the configured sources and retrain, evaluate and promote (what the schedule "
    "and the inbox sensor run).",
)
