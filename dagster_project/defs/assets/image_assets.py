"""Rendered ECG pages: every record of the split manifest as the printout the model reads."""

import dagster as dg
import polars as pl
from pydantic import Field

from dagster_project.defs.assets.data_assets import cohort_splits
from dagster_project.defs.executors import DEFAULT_QUEUE
from dagster_project.defs.metadata import inline_png
from dagster_project.defs.resources import DataLayout, DvcResource
from ecg_r1.data.split import SPLITS_FILE
from ecg_r1.imaging.render import render_cohort
from ecg_r1.modeling.profiles import DEFAULT_PROFILE, load_profile

GROUP = "images"
PREVIEWS = 3


class ImageConfig(dg.Config):
    """Which page to draw: the model profile's page, optionally at another width."""

    profile: str = Field(
        default=DEFAULT_PROFILE, description="Model profile whose page size the images follow."
    )
    width_px: int = Field(default=0, description="Page width in pixels; 0: the profile's width.")
    color: bool = Field(default=True, description="Red grid on white; false gives a grey grid.")
    workers: int = Field(default=2, description="Rendering processes.")


def image_config(config: ImageConfig):
    """The RenderConfig of this asset's run (one definition for the asset and the checks)."""
    page = load_profile(config.profile).render_config()
    width = config.width_px or page.width_px
    height = None if config.width_px else page.height_px
    return type(page)(width_px=width, height_px=height, layout=page.layout, color=config.color)


@dg.asset(group_name=GROUP, deps=[cohort_splits], kinds={"python", "png"}, op_tags=DEFAULT_QUEUE)
def ecg_images(
    context: dg.AssetExecutionContext, config: ImageConfig, layout: DataLayout, dvc: DvcResource
) -> dg.MaterializeResult:
    """One PNG page per record of the split manifest; unchanged records are not re-rendered."""
    page = image_config(config)
    record_ids = pl.read_parquet(layout.splits / SPLITS_FILE)["record_id"].to_list()
    summary = render_cohort(layout.cohort, layout.images, page, record_ids=record_ids, workers=config.workers)
    if summary.failed:
        raise dg.Failure(
            f"{len(summary.failed)} records could not be rendered: {summary.failed[:5]}; "
            "check their signals in the validated cohort",
            metadata={"failed": len(summary.failed)},
        )
    context.log.info(f"rendered {summary.rendered}, cached {summary.cached} in {summary.seconds:.1f} s")
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(layout.images)),
            "images": summary.index.height,
            "rendered": summary.rendered,
            "cached": summary.cached,
            "images_per_s": round(summary.images_per_s, 1),
            "seconds": round(summary.seconds, 2),
            "examples": dg.MetadataValue.md("\n\n".join(inline_png(p) for p in summary.examples[:PREVIEWS])),
            "example_paths": ", ".join(str(p) for p in summary.examples[:PREVIEWS]),
            **{f"page_{k}": v for k, v in page.describe().items()},
            **dvc.record(),
        }
    )
