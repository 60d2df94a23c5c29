"""Ingest: read every record of the given inputs into one cohort folder (see :mod:`ecg_r1.data.store`).

Takes: input folders or manifest CSVs, the label rules, the cohort folder to write. Gives: that
cohort folder, replaced as a whole under a lock, and an :class:`IngestSummary`.

Steps:

1. **Discover** each input's layout and records (tables and file names only).
2. **Screen** the metadata (:func:`ecg_r1.data.screening.screen`): a repeated record id keeps its
   first occurrence; a patient id found in two hospitals is refused in all of them (a patient
   must belong to one hospital, or held-out hospitals leak into training).
3. **Load** records in chunks, in ``workers`` processes (:mod:`ecg_r1.data.record_loader`):
   header, signal, canonical form, signal checks, source metadata and label. Each worker writes
   its signals straight into its slots of the signal file, so memory holds one chunk, not the
   cohort.
4. **Screen** the signals: a record whose signal file has the content (sha256) of an earlier
   loaded record is refused (see :func:`ecg_r1.data.screening.screen_duplicate_signals`).
5. **Write** ``cohort.parquet``, ``quarantine.parquet``, ``signals.f32``/``.json`` and
   ``summary.json``.

No record vanishes: each input record is either loaded or in the quarantine table with its
source path, a reason and a message saying what to do, and
``records_in == loaded + sum(quarantined.values())``. An input that yields no records (an empty
folder, an unknown layout, an unreadable manifest) counts as one quarantined input.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ecg_r1.data.folders import check_out_folder, staged_folder
from ecg_r1.data.labels import LABELS, LabelRules, load_rules
from ecg_r1.data.readers import discover
from ecg_r1.data.readers.records import UNRECOGNISED_CODES, Quarantine, RecordRef
from ecg_r1.data.record_loader import load_records
from ecg_r1.data.screening import screen, screen_duplicate_signals
from ecg_r1.data.store import (
    COHORT_FILE,
    COHORT_SCHEMA,
    QUARANTINE_FILE,
    QUARANTINE_SCHEMA,
    SUMMARY_FILE,
    SlotFile,
)

logger = logging.getLogger(__name__)

# Longest one record may take to read (seconds of wall-clock time), after which it is quarantined
# as ``timeout`` and the batch goes on. A 10 s record reads in about a millisecond and the size
# limits of :mod:`ecg_r1.data.readers.confined_read` and
# :mod:`ecg_r1.data.readers.wfdb_header` bound the slowest valid file measured at 0.9 s, so only a
# file that hangs (a stalled disk, a pathological parse) reaches it. ``ecg-r1 ingest
# --record-timeout`` and the ``raw_cohort`` asset's config default to this.
RECORD_TIMEOUT_S = 10.0


@dataclass
class IngestSummary:
    """What an ingest did. ``records_in == loaded + sum(quarantined.values())`` always."""

    records_in: int
    loaded: int
    quarantined: dict[str, int]
    twi_cases: int
    by_hospital: dict[str, int]
    by_label: dict[str, int]
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)
    twi_by_label: dict[str, int] = field(default_factory=dict)
    extra_columns: dict[str, int] = field(default_factory=dict)
    # Diagnosis codes the label rules do not understand -> records carrying them (loaded records).
    unrecognised_codes: dict[str, int] = field(default_factory=dict)
    inputs: dict[str, str | None] = field(default_factory=dict)
    seconds: float = 0.0
    records_per_s: float = 0.0
    out_dir: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class IngestRefused(RuntimeError):
    """The ingest would lose or corrupt what is already there; the message says what to do."""


def ingest(
    paths: list[Path],
    out_dir: Path,
    rules: LabelRules | None = None,
    workers: int = 1,
    progress: bool = False,
    force: bool = False,
    record_timeout_s: float = RECORD_TIMEOUT_S,
) -> IngestSummary:
    """Ingest records from PTB-XL, CinC, LUDB folders and manifest CSVs into a cohort folder.

    The cohort is written into a folder beside ``out_dir`` and renamed into place only when
    complete (:func:`ecg_r1.data.folders.staged_folder`; the cohort folder follows the umask), under a
    lock: an interrupted ingest (Ctrl-C, SIGTERM, a crash) leaves the old cohort as it was, and a
    second ingest into the same folder is refused while one runs.

    Args:
        paths: inputs; each a folder (layout detected) or a manifest CSV.
        out_dir: the cohort folder to write (replaced as a whole when the ingest succeeds).
        rules: label rules; the packaged ``labels.yaml`` when None.
        workers: processes reading records (1 reads in this process).
        progress: show a tqdm progress bar.
        force: replace an existing cohort even when this ingest loaded no record.
        record_timeout_s: longest one record may take to read (wall-clock seconds); a record
            that takes longer is quarantined as ``timeout`` and the rest of the batch loads.

    Returns:
        The summary (also written to ``summary.json``).

    Raises:
        IngestRefused: another ingest is writing ``out_dir``; ``out_dir`` is a non-empty folder
            that is no cohort (it would be replaced); or nothing loaded and a cohort exists there
            (a mistyped input path must not wipe it) without ``force``.
        OutFolderError: ``out_dir`` is an existing file or lies inside one (nothing is touched).
        ValueError: ``record_timeout_s`` is not a positive number.
    """
    if not record_timeout_s > 0 or not np.isfinite(record_timeout_s):
        raise ValueError(
            f"the per-record time limit must be a positive number of seconds, got {record_timeout_s}"
        )
    out_dir = check_out_folder(out_dir)  # before anything is made beside it (the lock, the folders)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    existing = out_dir.is_dir() and any(out_dir.iterdir())
    if existing and not (out_dir / SUMMARY_FILE).is_file():
        raise IngestRefused(
            f"{out_dir} exists, is not empty and holds no cohort (no {SUMMARY_FILE}); it would be replaced "
            "as a whole: give a new or an empty folder as --out"
        )
    with _exclusive(out_dir), staged_folder(out_dir) as work:
        summary = _ingest_into(
            paths, work, out_dir, rules or load_rules(), workers, progress, record_timeout_s
        )
        if summary.loaded == 0 and existing and not force:
            raise IngestRefused(
                f"no record was loaded from {[str(p) for p in paths]}; the cohort in {out_dir} is kept "
                "(check the input paths, or pass --force to replace it with an empty one)"
            )
    return summary


@contextlib.contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    """Hold a lock beside ``out_dir`` (``.<name>.lock``, kept: deleting a lock file races)."""
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise IngestRefused(
                f"another ingest is writing {out_dir}; wait for it to finish or choose another --out"
            ) from exc
        yield  # the lock goes with the file's closing, also when the process dies


def _ingest_into(
    paths: list[Path],
    work: Path,
    out_dir: Path,
    rules: LabelRules,
    workers: int,
    progress: bool,
    record_timeout_s: float = RECORD_TIMEOUT_S,
) -> IngestSummary:
    """Discover, load and write the cohort files into ``work`` (the summary names ``out_dir``)."""
    start = time.perf_counter()
    refs: list[RecordRef] = []
    refused: list[Quarantine] = []
    extra_columns: Counter[str] = Counter()
    inputs: dict[str, str | None] = {}
    for path in paths:
        found, bad, extra, layout = discover(Path(path), rules)
        logger.info("%s: layout %s, %d records, %d refused", path, layout, len(found), len(bad))
        inputs[str(path)] = layout
        refs.extend(found)
        refused.extend(bad)
        extra_columns.update(extra)
    records_in = len(refs) + len(refused)
    refs, screened = screen(refs)
    refused.extend(screened)

    slots = SlotFile(work, len(refs))
    rows: list[dict[str, Any]] = []
    unrecognised: Counter[str] = Counter()
    bar = _progress(len(refs), progress)
    for chunk_rows, chunk_refused in load_records(refs, rules, str(slots.path), workers, record_timeout_s):
        for row in chunk_rows:
            unrecognised.update(row.pop(UNRECOGNISED_CODES, ()))
        rows.extend(chunk_rows)
        refused.extend(chunk_refused)
        if bar is not None:
            bar.update(len(chunk_rows) + len(chunk_refused))
    if bar is not None:
        bar.close()
    rows.sort(key=lambda r: r["slot"])  # input order, whatever order the workers finished in
    rows, duplicates = screen_duplicate_signals(rows)
    refused.extend(duplicates)
    slots.compact([r["slot"] for r in rows])
    for index, row in enumerate(rows):
        row["row"] = index
        del row["slot"]

    # Built column by column: a list of row dicts costs polars several times more per record.
    cohort = pl.DataFrame({k: [row.get(k) for row in rows] for k in COHORT_SCHEMA}, schema=COHORT_SCHEMA)
    cohort.write_parquet(work / COHORT_FILE)
    # Column by column from the attributes: Quarantine.to_row (dataclasses.asdict deep-copies) once
    # per column and record cost 10 % of an ingest that refuses most of its records.
    quarantine = pl.DataFrame(
        {k: [getattr(q, k) for q in refused] for k in QUARANTINE_SCHEMA}, schema=QUARANTINE_SCHEMA
    )
    quarantine.write_parquet(work / QUARANTINE_FILE)

    seconds = time.perf_counter() - start
    summary = _summarise(cohort, refused, records_in, extra_columns)
    if summary.records_in != summary.loaded + sum(summary.quarantined.values()):
        # Every discovered record must end in exactly one table; anything else is a bug here.
        raise RuntimeError(f"ingest lost track of records: {summary.to_dict()}")
    summary.inputs = inputs
    summary.unrecognised_codes = dict(unrecognised.most_common())
    summary.seconds = round(seconds, 3)
    summary.records_per_s = round(summary.records_in / seconds, 1) if seconds > 0 else 0.0
    summary.out_dir = str(out_dir)
    (work / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=2))
    if unrecognised:
        logger.warning(
            "diagnosis codes the label rules do not understand (records labelled without them): %s",
            summary.unrecognised_codes,
        )
    for reason, count in summary.quarantined.items():
        logger.warning("quarantined %d record(s): %s (see %s)", count, reason, out_dir / QUARANTINE_FILE)
    return summary


def _summarise(
    cohort: pl.DataFrame, refused: list[Quarantine], records_in: int, extra_columns: Counter[str]
) -> IngestSummary:
    quarantined = dict(sorted(Counter(q.reason for q in refused).items()))
    by_source: dict[str, dict[str, int]] = {}
    for source in sorted(set(cohort["source_format"].to_list())):
        part = cohort.filter(pl.col("source_format") == source)
        counts = {"records": part.height, "twi": int(part["twi"].sum())}
        counts.update(_counts(part["label"]))
        counts.update({f"twi_{k}": v for k, v in _counts(part.filter(pl.col("twi"))["label"]).items()})
        by_source[source] = counts
    return IngestSummary(
        records_in=records_in,
        loaded=cohort.height,
        quarantined=quarantined,
        twi_cases=int(cohort["twi"].sum()) if cohort.height else 0,
        by_hospital=dict(sorted(Counter(cohort["hospital"].to_list()).items())),
        by_label=_counts(cohort["label"]),
        by_source=by_source,
        twi_by_label=_counts(cohort.filter(pl.col("twi"))["label"]) if cohort.height else {},
        extra_columns=dict(extra_columns),
    )


def _counts(labels: pl.Series) -> dict[str, int]:
    counts = Counter(labels.to_list())
    return {label: counts.get(label, 0) for label in LABELS}


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="rec", desc="ingest")
