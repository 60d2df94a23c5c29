"""Jobs. Each runs in-process (or with Dagster's default executor) unless ``$ECG_R1_EXECUTOR``
selects the Celery executor of the stack (:func:`dagster_project.defs.executors.job_executor`)."""

import dagster as dg

from dagster_project.defs.assets.data_assets import GROUP, raw_cohort
from dagster_project.defs.executors import job_executor

data_job = dg.define_asset_job(
    name="data_job",
    selection=dg.AssetSelection.groups(GROUP),
    executor_def=job_executor(None),
    description="Simulate the default cohort, ingest, validate and split it (the whole data group).",
)

ingest_job = dg.define_asset_job(
    name="ingest_job",
    selection=dg.AssetSelection.assets(raw_cohort).downstream() & dg.AssetSelection.groups(GROUP),
    executor_def=job_executor(None),
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
    executor_def=job_executor(dg.in_process_executor),
    description="Everything: simulate (the embedded default), ingest, validate, split, render, train "
    "(vision pre-training, SFT, GRPO), baselines, evaluation with ablations, promotion. The warm-up "
    "recipe (format_warmup_model, grpo_after_warmup_model) is materialized on demand.",
)

retrain_job = dg.define_asset_job(
    name="retrain_job",
    selection=dg.AssetSelection.assets(raw_cohort).downstream() - WARMUP_RECIPE,
    executor_def=job_executor(dg.in_process_executor),
    description="Re-ingest the configured sources and retrain, evaluate and promote (what the schedule "
    "and the inbox sensor run).",
)

sft_job = dg.define_asset_job(
    name="sft_job",
    selection=dg.AssetSelection.assets("ecg_images", "base_model", "vision_pretrained_model", "sft_model"),
    executor_def=job_executor(dg.in_process_executor),
    description="Render the split records and train the SFT baseline (base model, vision pre-training, "
    "SFT) on the data the data_job left: the shortest training run, e.g. to try a stack.",
)
