"""Render a cohort: every record's page as a PNG named by its content hash, in parallel.

Takes: a cohort folder (:mod:`ecg_r1.data.store`: ``cohort.parquet`` + signals), an output
folder and a :class:`~.page.RenderConfig`. Gives: ``<out>/<2 hex>/<hash>.png`` for each record
(drawn by :func:`~.draw.render_png`), ``<out>/index.parquet`` mapping records to images, and a
:class:`RenderSummary`. A page's :func:`content_hash` (signal bytes, settings, renderer
version) names its file, so a re-run draws only the records whose signal or settings changed.

Records are drawn by a pool of worker processes, each opening the signal memmap itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from ecg_r1.data.store import open_signals, read_cohort
from ecg_r1.imaging.draw import render_png
from ecg_r1.imaging.page import CLINICAL, RENDERER_VERSION, RenderConfig

logger = logging.getLogger(__name__)

INDEX_FILE = "index.parquet"
PAGE_FILE = "page.json"  # the settings of the pages in the folder (RenderConfig.describe)


@dataclass
class RenderSummary:
    """What :func:`render_cohort` did.

    Attributes:
        rendered: images drawn and written in this run.
        cached: images already present for the same signal, settings and renderer version.
        seconds: wall time of the run.
        images_per_s: rendered images per second of wall time (0 when everything was cached).
        index: one row per record: ``record_id``, ``image_path`` (relative to the output
            folder) and ``content_hash``.
        examples: a few image paths (absolute) to show.
        failed: ``(record_id, reason)`` of records that could not be rendered (also logged).
    """

    rendered: int
    cached: int
    seconds: float
    images_per_s: float
    index: pl.DataFrame
    examples: list[Path]
    failed: list[tuple[str, str]] = field(default_factory=list)


def content_hash(signal: np.ndarray, config: RenderConfig, header: str = "") -> str:
    """The cache key of a page: a digest of the signal bytes, the settings and the renderer version."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{RENDERER_VERSION}|{config.key()}|{header}|".encode())
    digest.update(np.ascontiguousarray(signal, dtype=np.float32).tobytes())
    return digest.hexdigest()


class _Renderer:
    """A worker's state: the cohort's signals (opened by the worker itself) and the settings."""

    def __init__(self, cohort_dir: str, out_dir: str, config: RenderConfig) -> None:
        self.signals = open_signals(cohort_dir)
        self.out_dir = Path(out_dir)
        self.config = config

    def run(self, jobs: list[tuple[str, int]]) -> list[tuple[str, str, str, str]]:
        """Render each (record_id, row); returns (record_id, image_path, hash, "rendered"|"cached"|error)."""
        results = []
        for record_id, row in jobs:
            try:
                signal = np.asarray(self.signals[row])
                digest = content_hash(signal, self.config)
                relative = f"{digest[:2]}/{digest}.png"
                target = self.out_dir / relative
                if target.exists():
                    results.append((record_id, relative, digest, "cached"))
                    continue
                render_png(signal, self.config, target)
                results.append((record_id, relative, digest, "rendered"))
            except Exception as error:  # one bad record must not stop the cohort; it is reported
                results.append((record_id, "", "", f"error: {type(error).__name__}: {error}"))
        return results


_WORKER: _Renderer | None = None


def _init_worker(cohort_dir: str, out_dir: str, config: RenderConfig) -> None:
    global _WORKER
    _WORKER = _Renderer(cohort_dir, out_dir, config)


def _run_chunk(jobs: list[tuple[str, int]]) -> list[tuple[str, str, str, str]]:
    assert _WORKER is not None, "worker not initialised"
    return _WORKER.run(jobs)


def _start_method() -> str:
    """fork on Linux: a worker starts in milliseconds, where spawn re-imports numpy, PIL and
    scipy (seconds). It is safe here although the parent may have threads (polars, Dagster):
    a worker only runs numpy, PIL and hashlib, takes no lock the parent could hold (it does not
    log or use polars) and opens its own memmap. Elsewhere (macOS, Windows) fork is unsafe or
    absent: spawn."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


def render_cohort(
    cohort_dir: Path,
    out_dir: Path,
    config: RenderConfig = CLINICAL,
    record_ids: list[str] | None = None,
    workers: int = 2,
    progress: bool = False,
    prune: bool = False,
) -> RenderSummary:
    """Render a cohort's records to PNG, skipping those already rendered.

    Images are named by :func:`content_hash` (signal bytes, settings, renderer version) under
    ``out_dir/<2 hex>/<hash>.png``, so a re-run renders only records whose signal or settings
    changed, and identical signals share one file. ``out_dir/index.parquet`` maps each record to
    its image.

    Args:
        cohort_dir: a cohort folder (``cohort.parquet`` + signals).
        out_dir: where images and the index go.
        config: page settings.
        record_ids: records to render (default all); unknown ids are an error.
        workers: processes; each opens the signal memmap itself. 1 renders in this process.
        progress: show a progress bar.
        prune: delete images under ``out_dir`` that the new index does not name (left by
            signals or settings that changed). Refused with ``record_ids``, which renders only
            part of the cohort.

    Returns:
        A :class:`RenderSummary`; records that failed are in ``failed`` and left out of the index.
    """
    started = time.perf_counter()
    if prune and record_ids is not None:
        raise ValueError(
            "prune=True with record_ids would delete the other records' images; render all or do not prune"
        )
    cohort_dir, out_dir = Path(cohort_dir), Path(out_dir)
    jobs = _jobs(cohort_dir, record_ids)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = _render_jobs(jobs, cohort_dir, out_dir, config, workers, progress)
    rows, failed = [], []
    rendered = cached = 0
    for record_id, _ in jobs:
        _, relative, digest, status = results[record_id]
        if status.startswith("error"):
            failed.append((record_id, status.removeprefix("error: ")))
            continue
        rendered += status == "rendered"
        cached += status == "cached"
        rows.append((record_id, relative, digest))
    for record_id, reason in failed:
        logger.warning("could not render %s: %s", record_id, reason)
    index = _write_index(out_dir, rows, config)
    pruned = _prune(out_dir, set(index["image_path"].to_list())) if prune else 0
    seconds = time.perf_counter() - started
    summary = RenderSummary(
        rendered=rendered,
        cached=cached,
        seconds=seconds,
        images_per_s=rendered / seconds if rendered else 0.0,
        index=index,
        examples=[out_dir / p for p in index["image_path"].head(4).to_list()],
        failed=failed,
    )
    logger.info(
        "rendered %d, cached %d, failed %d, pruned %d in %.1f s (%.1f images/s) -> %s",
        rendered,
        cached,
        len(failed),
        pruned,
        seconds,
        summary.images_per_s,
        out_dir,
    )
    return summary


def _jobs(cohort_dir: Path, record_ids: list[str] | None) -> list[tuple[str, int]]:
    """``(record_id, signal row)`` of every record to render: all of the cohort's, or the given
    ids in their order (repeats dropped)."""
    table = read_cohort(cohort_dir)
    missing_cols = {"record_id", "row"} - set(table.columns)
    if missing_cols:
        raise ValueError(f"{cohort_dir} cohort table lacks columns {sorted(missing_cols)}; re-run the ingest")
    if record_ids is not None:
        wanted = list(dict.fromkeys(record_ids))
        unknown = sorted(set(wanted) - set(table["record_id"].to_list()))
        if unknown:
            raise ValueError(
                f"{len(unknown)} record ids are not in {cohort_dir}: {unknown[:5]}; "
                "check the ids against the cohort's record_id column"
            )
        table = pl.DataFrame({"record_id": wanted}).join(
            table, on="record_id", how="left", maintain_order="left"
        )
    return list(zip(table["record_id"].to_list(), table["row"].to_list(), strict=True))


def _render_jobs(
    jobs: list[tuple[str, int]],
    cohort_dir: Path,
    out_dir: Path,
    config: RenderConfig,
    workers: int,
    progress: bool,
) -> dict[str, tuple[str, str, str, str]]:
    """Render the jobs in chunks, in this process (``workers`` 1) or a pool: record id ->
    ``(record_id, image_path, hash, "rendered"|"cached"|error)``."""
    workers = max(1, min(int(workers), len(jobs) or 1))
    chunk = max(1, min(64, math.ceil(len(jobs) / (workers * 8))))
    chunks = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
    results: dict[str, tuple[str, str, str, str]] = {}
    with tqdm(total=len(jobs), disable=not progress, unit="img", desc="render") as bar:
        if workers == 1:
            renderer = _Renderer(str(cohort_dir), str(out_dir), config)
            for part in chunks:
                results.update((r[0], r) for r in renderer.run(part))
                bar.update(len(part))
        else:
            context = multiprocessing.get_context(_start_method())
            with ProcessPoolExecutor(
                workers,
                mp_context=context,
                initializer=_init_worker,
                initargs=(str(cohort_dir), str(out_dir), config),
            ) as pool:
                futures = [pool.submit(_run_chunk, part) for part in chunks]
                for future in as_completed(futures):
                    part = future.result()
                    results.update((r[0], r) for r in part)
                    bar.update(len(part))
    return results


def _write_index(out_dir: Path, rows: list[tuple[str, str, str]], config: RenderConfig) -> pl.DataFrame:
    """Write ``index.parquet`` (replaced in one step) and ``page.json``; returns the index."""
    index = pl.DataFrame(
        rows,
        schema={"record_id": pl.String, "image_path": pl.String, "content_hash": pl.String},
        orient="row",
    )
    tmp = out_dir / f".{INDEX_FILE}.{os.getpid()}.tmp"
    index.write_parquet(tmp)
    os.replace(tmp, out_dir / INDEX_FILE)
    (out_dir / PAGE_FILE).write_text(json.dumps(config.describe(), indent=2))
    return index


def _prune(out_dir: Path, keep: set[str]) -> int:
    """Delete ``<2 hex>/<hash>.png`` images not in ``keep``; only files this module names."""
    removed = 0
    for path in out_dir.glob("??/*.png"):
        if path.relative_to(out_dir).as_posix() not in keep:
            path.unlink()
            removed += 1
    return removed


def page_mismatch(images_dir: str | Path, expected: RenderConfig) -> str | None:
    """Why the pages in ``images_dir`` are not the pages ``expected`` describes (their size or
    layout), or None when they are (or the folder holds none yet). A folder rendered before
    ``page.json`` existed is judged by its first page's size.

    A model trained on pages of another size reads other image tokens than its profile says
    (224 px pages: 48 tokens, where the 896 px profile plans 800), with no error anywhere.
    """
    folder = Path(images_dir)
    page_file = folder / PAGE_FILE
    if page_file.is_file():
        found = json.loads(page_file.read_text())
        size, layout = (int(found["width_px"]), int(found["height_px"])), str(found["layout"])
    else:
        index = folder / INDEX_FILE
        if not index.is_file() or not (paths := pl.read_parquet(index)["image_path"].head(1).to_list()):
            return None
        from PIL import Image

        with Image.open(folder / paths[0]) as image:
            size, layout = image.size, expected.layout
    want = (expected.width_px, expected.height_px)
    if size == want and layout == expected.layout:
        return None
    return (
        f"the pages in {folder} are {size[0]}x{size[1]} px ({layout}), the profile's model reads "
        f"{want[0]}x{want[1]} px ({expected.layout}): render them with the training profile first"
    )
