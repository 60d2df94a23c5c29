"""Real records for a sim-to-real check of models trained on the simulated cohort.

:func:`prepare_real_records` reads the records a user names (LUDB, CinC, PTB-XL folders or
manifest CSVs, layouts detected by :func:`ecg_r1.data.ingest.ingest`), keeps the labelled TWI records
(the selection training uses: TWI and an ischemic / non-ischemic label) and renders them at the
models' page size. It writes one folder::

    cohort/              the ingested records (cohort.parquet, signals, quarantine, summary.json)
    images/              the labelled TWI records' pages (index.parquet)
    splits.parquet       those records, every one in split :data:`REAL_SPLIT`
    real_records.json    what was read: inputs, records, labelled TWI cases by label and source

:func:`ecg_r1.evaluation.comparison.run_comparison` evaluates the models and the reference rows on such a
folder as a third table section, ``real records (sim-to-real)``. None of these records is ever
trained on: training reads only the main cohort's splits, and the comparison leaves out any real
record that is also in the main cohort (same record id or same signal file checksum).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from ecg_r1.data.labels import LabelRules
from ecg_r1.data.split import SPLITS_FILE
from ecg_r1.imaging.page import RenderConfig

logger = logging.getLogger(__name__)

REAL_SPLIT = "real_records"
REAL_TITLE = "real records (sim-to-real)"
ENV_VAR = "ECG_R1_REAL_RECORDS"  # os.pathsep-separated inputs, read by the Dagster asset
COHORT_DIR = "cohort"
IMAGES_DIR = "images"
SUMMARY_FILE = "real_records.json"


def paths_from_env(value: str | None = None) -> list[str]:
    """The inputs named in ``$ECG_R1_REAL_RECORDS`` (or in ``value``), split on ``os.pathsep``.

    Returns:
        The non-empty entries, in order; ``[]`` when the variable is unset or empty.
    """
    raw = os.environ.get(ENV_VAR, "") if value is None else value
    return [part for part in raw.split(os.pathsep) if part.strip()]


@dataclass
class RealRecords:
    """A prepared real-record folder (see the module docstring).

    Attributes:
        folder: the folder.
        inputs: the input paths that were ingested.
        records: records loaded by the ingest (any label, with or without TWI).
        quarantined: records the ingest refused.
        cases: labelled TWI records rendered for evaluation.
        by_label: cases per label.
        by_source: cases per source format (``ludb``, ``cinc``, ...).
        not_rendered: ``(record_id, reason)`` of labelled TWI records whose page failed.
    """

    folder: Path
    inputs: list[str]
    records: int
    quarantined: int
    cases: int
    by_label: dict[str, int]
    by_source: dict[str, int]
    not_rendered: list[tuple[str, str]] = field(default_factory=list)

    @property
    def cohort(self) -> Path:
        return self.folder / COHORT_DIR

    @property
    def images(self) -> Path:
        return self.folder / IMAGES_DIR

    @property
    def splits(self) -> Path:
        return self.folder / SPLITS_FILE

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "folder": str(self.folder)}


def prepare_real_records(
    paths: Sequence[str | Path],
    out_dir: str | Path,
    render_config: RenderConfig,
    rules: LabelRules | None = None,
    workers: int = 1,
) -> RealRecords:
    """Ingest real records, keep the labelled TWI ones and render them for evaluation.

    Args:
        paths: input folders (LUDB, CinC, PTB-XL; layout detected) or manifest CSVs.
        out_dir: the real-record folder to write; its previous contents are replaced.
        render_config: the page the models read (``profile.render_config()``).
        rules: label rules; the packaged ``labels.yaml`` when None (as for the main cohort).
        workers: processes for the ingest and the rendering.

    Returns:
        The prepared folder's :class:`RealRecords` (also written to ``real_records.json``).

    Raises:
        FileNotFoundError: when an input does not exist.
        ValueError: with no input, or when no labelled TWI record is among the records read.
    """
    from ecg_r1.data.ingest import ingest
    from ecg_r1.data.labels import KNOWN_LABELS
    from ecg_r1.data.store import read_cohort
    from ecg_r1.imaging.render import render_cohort

    if not paths:
        raise ValueError(f"no real-record inputs given (set {ENV_VAR} or pass folders)")
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"real-record input(s) not found: {missing}")
    out = Path(out_dir)
    # A folder left from other inputs must not leave its pages or cases behind.
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    summary = ingest([Path(p) for p in paths], out / COHORT_DIR, rules=rules, workers=workers)
    cohort = read_cohort(out / COHORT_DIR)
    # The selection of ecg_r1.training.data.load_cases: the cases a model is trained to answer.
    cases = cohort.filter(pl.col("twi").fill_null(False) & pl.col("label").is_in(KNOWN_LABELS))
    if cases.height == 0:
        raise ValueError(
            f"none of the {summary.loaded} records read from {[str(p) for p in paths]} is a labelled TWI "
            f"case (TWI in at least two leads and an ischemic / non-ischemic label; see {out / COHORT_DIR})"
        )
    rendered = render_cohort(
        out / COHORT_DIR,
        out / IMAGES_DIR,
        render_config,
        record_ids=cases["record_id"].to_list(),
        workers=workers,
    )
    if rendered.failed:
        # A page that cannot be drawn is a fault of that record, not of the check: leave it out, say so.
        logger.warning("%d real records could not be rendered: %s", len(rendered.failed), rendered.failed[:5])
        cases = cases.filter(~pl.col("record_id").is_in([rid for rid, _ in rendered.failed]))
    cases.select(
        "record_id", "patient_id", "hospital", "label", pl.lit(REAL_SPLIT).alias("split")
    ).write_parquet(out / SPLITS_FILE)
    result = RealRecords(
        folder=out,
        inputs=[str(p) for p in paths],
        records=summary.loaded,
        quarantined=sum(summary.quarantined.values()),
        cases=cases.height,
        by_label=_counts(cases, "label"),
        by_source=_counts(cases, "source_format"),
        not_rendered=[(rid, reason) for rid, reason in rendered.failed],
    )
    (out / SUMMARY_FILE).write_text(json.dumps(result.to_dict(), indent=2))
    logger.info(
        "real records: %d labelled TWI cases of %d records (%s)",
        result.cases,
        result.records,
        result.by_label,
    )
    return result


def read_real_records(folder: str | Path) -> RealRecords:
    """The :class:`RealRecords` of a folder :func:`prepare_real_records` wrote.

    Raises:
        FileNotFoundError: when the folder holds no ``real_records.json``.
    """
    path = Path(folder) / SUMMARY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: prepare the real records first (prepare_real_records)")
    raw = json.loads(path.read_text())
    raw["not_rendered"] = [tuple(x) for x in raw.get("not_rendered", [])]
    return RealRecords(**{**raw, "folder": Path(folder)})


def _counts(cases: pl.DataFrame, column: str) -> dict[str, int]:
    return {str(k): int(v) for k, v in cases[column].value_counts(sort=True).iter_rows()}
