"""Ingest: read every record of the given inputs into one cohort folder (see :mod:`ecg_r1.data.store`).

Steps:

1. **Discover** each input's layout and records (tables and file names only).
2. **Screen** the metadata: a repeated record id keeps its first occurrence; a patient id found
   in two hospitals is refused in all of them (a patient must belong to one hospital, or
   held-out hospitals leak into training).
3. **Load** records in chunks, in ``workers`` processes: header, signal, canonical form, signal
   checks, source metadata and label. Each worker writes its signals straight into its slots
   of the signal file, so memory holds one chunk, not the cohort.
4. **Screen** the signals: a record whose signal file has the content (sha256) of an earlier
   loaded record is refused (see :func:`screen_duplicate_signals`).
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
import gc
import json
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ecg_r1.data.canonical import LEADS, N_SAMPLES
from ecg_r1.data.labels import LABELS, LabelRules, load_rules
from ecg_r1.data.readers import RECORD_ERRORS, discover, load_ref
from ecg_r1.data.readers.records import (
    DUPLICATE_RECORD_ID,
    DUPLICATE_SIGNAL,
    PATIENT_IN_TWO_HOSPITALS,
    READ_ERROR,
    RECORD_TIMEOUT,
    UNRECOGNISED_CODES,
    Quarantine,
    RecordRef,
)
from ecg_r1.data.signal_checks import signal_issues
from ecg_r1.data.store import (
    COHORT_FILE,
    COHORT_SCHEMA,
    QUARANTINE_FILE,
    QUARANTINE_SCHEMA,
    SUMMARY_FILE,
    SlotFile,
)

logger = logging.getLogger(__name__)

# Records a worker handles per task: large enough to vectorise the signal checks and amortise
# inter-process overhead, small enough to keep memory at a few MB per worker.
CHUNK_SIZE = 64
# Records checked together: 8 x 12 x 5000 float32 (1.9 MB) stays in the CPU cache.
CHECK_BATCH = 8
# Longest one record may take to read (seconds of wall-clock time), after which it is quarantined
# as ``timeout`` and the batch goes on. A 10 s record reads in about a millisecond and the size
# limits of :mod:`ecg_r1.data.readers.confined_read` and
# :mod:`ecg_r1.data.readers.wfdb_header` bound the slowest valid file measured at 0.9 s, so only a
# file that hangs (a stalled disk, a pathological parse) reaches it. ``ecg-r1 ingest
# --record-timeout`` and the ``raw_cohort`` asset's config default to this.
RECORD_TIMEOUT_S = 10.0
# A worker that does not answer within its chunk's time (the per-record limit for each record
# plus one more, plus this grace for process scheduling on a busy machine) is stuck where the
# limit's signal cannot reach it (in C code that blocks signals); see :func:`_load_in_pool`.
STUCK_GRACE_S = 5.0


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

    The cohort is written into a temporary folder beside ``out_dir`` and renamed into place only
    when complete, under a lock: an interrupted ingest (Ctrl-C, SIGTERM, a crash) leaves the old
    cohort as it was, and a second ingest into the same folder is refused while one runs.

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
        ValueError: ``record_timeout_s`` is not a positive number.
    """
    if not record_timeout_s > 0 or not np.isfinite(record_timeout_s):
        raise ValueError(
            f"the per-record time limit must be a positive number of seconds, got {record_timeout_s}"
        )
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    existing = out_dir.is_dir() and any(out_dir.iterdir())
    if existing and not (out_dir / SUMMARY_FILE).is_file():
        raise IngestRefused(
            f"{out_dir} exists, is not empty and holds no cohort (no {SUMMARY_FILE}); it would be replaced "
            "as a whole: give a new or an empty folder as --out"
        )
    with _exclusive(out_dir):
        work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
        try:
            summary = _ingest_into(
                paths, work, out_dir, rules or load_rules(), workers, progress, record_timeout_s
            )
            if summary.loaded == 0 and existing and not force:
                raise IngestRefused(
                    f"no record was loaded from {[str(p) for p in paths]}; the cohort in {out_dir} is kept "
                    "(check the input paths, or pass --force to replace it with an empty one)"
                )
            _replace(work, out_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)  # gone already when the rename succeeded
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


def _replace(work: Path, out_dir: Path) -> None:
    """Put the finished cohort in place: two renames, so ``out_dir`` is the old cohort or the new
    one at every moment (at worst a crash between them leaves the old one as ``.<name>.old-*``)."""
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
        os.replace(work, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(work, out_dir)


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
    for chunk_rows, chunk_refused in _load_all(refs, rules, str(slots.path), workers, record_timeout_s):
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


def screen(refs: list[RecordRef]) -> tuple[list[RecordRef], list[Quarantine]]:
    """Refuse repeated record ids (after the first) and patients found in more than one hospital.

    Returns:
        (records kept, in input order; refused records).
    """
    kept: list[RecordRef] = []
    refused: list[Quarantine] = []
    first_source: dict[str, str] = {}
    for ref in refs:
        if ref.record_id in first_source:
            refused.append(
                Quarantine.of(
                    ref,
                    DUPLICATE_RECORD_ID,
                    f"record id {ref.record_id!r} was already read from {first_source[ref.record_id]}; "
                    "record ids must be unique: rename one of them, or drop the copy if it is the same record",
                )
            )
            continue
        first_source[ref.record_id] = ref.header_path
        kept.append(ref)
    hospitals: dict[str, set[str]] = defaultdict(set)
    for ref in kept:
        hospitals[ref.patient_id].add(ref.hospital)
    conflicted = {patient for patient, where in hospitals.items() if len(where) > 1}
    if not conflicted:
        return kept, refused
    out = []
    for ref in kept:
        if ref.patient_id in conflicted:
            refused.append(
                Quarantine.of(
                    ref,
                    PATIENT_IN_TWO_HOSPITALS,
                    f"patient id {ref.patient_id!r} appears in hospitals {sorted(hospitals[ref.patient_id])}; "
                    "a patient must belong to one hospital (or held-out hospitals leak into training): if "
                    "these are different people make the ids unique per hospital (e.g. prefix the hospital), "
                    "if it is one person give all their records one hospital",
                )
            )
        else:
            out.append(ref)
    return out, refused


def screen_duplicate_signals(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Quarantine]]:
    """Refuse each loaded record whose signal checksum an earlier row (in input order) has.

    One recording under two patients or hospitals is a mix-up (and, across hospitals, a leak of a
    test record into training); the same patient's record exported twice would count one
    recording twice in training and evaluation. Either way the first record is kept and the
    repeat refused with a message naming it: which of the two is right only the user can tell.

    Args:
        rows: cohort rows (with ``checksum``), in input order.

    Returns:
        (rows kept, in order; refused records).
    """
    kept: list[dict[str, Any]] = []
    refused: list[Quarantine] = []
    first: dict[str, dict[str, Any]] = {}
    for row in rows:
        checksum = row["checksum"]
        original = first.get(checksum) if checksum else None
        if original is None:
            if checksum:
                first[checksum] = row
            kept.append(row)
            continue
        same_patient = (row["patient_id"], row["hospital"]) == (original["patient_id"], original["hospital"])
        where = (
            "a re-export of the same patient's record: the first is kept; drop the copy"
            if same_patient
            else f"which belongs to another patient ({original['patient_id']!r}, hospital "
            f"{original['hospital']!r}): one recording cannot belong to two patients; keep it only "
            "under the right one"
        )
        refused.append(
            _refused_row(
                row,
                DUPLICATE_SIGNAL,
                f"same signal (sha256 {checksum[:12]}) as record {original['record_id']!r} read from "
                f"{original['source_path']}, {where}",
            )
        )
    return kept, refused


def _refused_row(row: dict[str, Any], reason: str, message: str) -> Quarantine:
    """Quarantine a record that was read (its cohort row), the message prefixed with its file."""
    return Quarantine(
        source_path=row["source_path"],
        reason=reason,
        message=f"{row['source_path']}: {message}",
        record_id=row["record_id"],
        patient_id=row["patient_id"],
        hospital=row["hospital"],
        source_format=row["source_format"],
    )


def _load_all(
    refs: list[RecordRef], rules: LabelRules, signals_path: str, workers: int, timeout_s: float
) -> Iterator[tuple[list[dict[str, Any]], list[Quarantine]]]:
    """Load every record in chunks, in this process or in ``workers`` processes.

    Each record gets ``timeout_s`` seconds (see :func:`_read_one`). In this process the limit's
    SIGALRM needs the main thread (Python runs signal handlers only there); elsewhere (e.g. an
    orchestrator's thread) one worker process reads instead.
    """
    tasks = [(start, refs[start : start + CHUNK_SIZE]) for start in range(0, len(refs), CHUNK_SIZE)]
    in_main_thread = threading.current_thread() is threading.main_thread()
    if (workers <= 1 or len(tasks) <= 1) and in_main_thread:
        _init_worker(rules, signals_path, timeout_s)  # in this process: its own Ctrl-C handling stays
        try:
            yield from map(_load_chunk, tasks)
        finally:
            _close_worker()
        return
    yield from _load_in_pool(tasks, rules, signals_path, max(workers, 1), timeout_s)


def _load_in_pool(
    tasks: list[tuple[int, list[RecordRef]]],
    rules: LabelRules,
    signals_path: str,
    workers: int,
    timeout_s: float,
) -> Iterator[tuple[list[dict[str, Any]], list[Quarantine]]]:
    """Load chunks in a pool of forked workers, replacing the pool when a worker is stuck.

    Each worker limits each record itself (SIGALRM, :func:`_read_one`); that covers Python code
    and system calls, which a signal interrupts. A worker stuck where no signal handler can run
    (C code blocking signals) is caught here: a chunk whose result is later than its records'
    limits allow is given up, the pool ended (its processes with it) and a new one started for the
    chunks not done; the stuck chunk's records are retried one a task, so only the record that
    hangs is quarantined. Chunks are waited on in submission order and workers take them in that
    order, so each wait starts after its chunk started: the deadline is never too short.
    """
    # fork: workers inherit the imported modules (a spawned interpreter needs ~1 s to import them).
    context = multiprocessing.get_context("fork")
    queue = list(tasks)
    while queue:
        batch, queue = queue, []
        pool = context.Pool(
            min(workers, len(batch)), initializer=_init_pool_worker, initargs=(rules, signals_path, timeout_s)
        )
        try:
            submitted = [(task, pool.apply_async(_load_chunk, (task,))) for task in batch]
            for index, (task, result) in enumerate(submitted):
                deadline = timeout_s * (len(task[1]) + 1) + STUCK_GRACE_S
                try:
                    loaded = result.get(timeout=deadline)
                except multiprocessing.TimeoutError:
                    start, chunk = task
                    logger.warning(
                        "a worker reading %d record(s) from %s is stuck", len(chunk), chunk[0].header_path
                    )
                    if len(chunk) == 1:
                        yield [], [_timed_out(chunk[0], deadline, stuck=True)]
                    else:
                        queue.extend((start + offset, [ref]) for offset, ref in enumerate(chunk))
                    queue.extend(rest for rest, _ in submitted[index + 1 :])
                    break
                yield loaded
        finally:
            pool.terminate()  # SIGTERM: a worker's default action, whatever C code it is stuck in
            pool.join()


def _timed_out(ref: RecordRef, seconds: float, stuck: bool = False) -> Quarantine:
    what = (
        f"the process reading it stopped responding for {seconds:g} s and was ended"
        if stuck
        else f"reading it took longer than the {seconds:g} s a record may take"
    )
    return Quarantine.of(
        ref,
        RECORD_TIMEOUT,
        f"{ref.header_path}: {what}; a valid 10 s record reads in milliseconds, so its files are "
        "malformed or on a stalled disk: check them (or raise --record-timeout if the record is valid "
        "and the disk slow)",
    )


_WORKER: dict[str, Any] = {}


class _RecordTimeout(BaseException):
    """Raised by SIGALRM in the middle of a record that overran its time. A BaseException, like
    KeyboardInterrupt: a reader's (or a library's) ``except Exception`` must not turn it into
    another error or swallow it."""


def _on_alarm(signum: int, frame: Any) -> None:
    # Only while a record is being read: an alarm that arrives as the record finishes is late.
    if _WORKER.get("armed"):
        _WORKER["armed"] = False
        raise _RecordTimeout


def _init_pool_worker(rules: LabelRules, signals_path: str, timeout_s: float) -> None:
    # A forked worker inherits its parent's signal handlers (an orchestrator's, say); the pool
    # ends its workers with SIGTERM, which must just end them. Ctrl-C reaches the whole process
    # group: the parent handles it (and ends the pool), so a worker ignores it. Never done in the
    # parent itself, or a 1-worker ingest could not be interrupted.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_worker(rules, signals_path, timeout_s)


def _init_worker(rules: LabelRules, signals_path: str, timeout_s: float) -> None:
    """Set up this process for :func:`_load_chunk` (the main thread: it installs a SIGALRM handler)."""
    _WORKER["rules"] = rules
    _WORKER["fd"] = os.open(signals_path, os.O_WRONLY)
    _WORKER["timeout"] = timeout_s
    _WORKER["armed"] = False
    # Whatever alarm the caller had set (a test's, an orchestrator's) is put back by _close_worker,
    # less the time spent here.
    _WORKER["previous_alarm"] = (
        signal.signal(signal.SIGALRM, _on_alarm),
        signal.setitimer(signal.ITIMER_REAL, 0)[0],
        time.monotonic(),
    )


def _close_worker() -> None:
    _WORKER.pop("buffer", None)
    fd = _WORKER.pop("fd", None)
    if fd is not None:
        os.close(fd)
    previous = _WORKER.pop("previous_alarm", None)
    if previous is not None:
        handler, remaining, since = previous
        _WORKER["armed"] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, handler)
        if remaining > 0:
            signal.setitimer(signal.ITIMER_REAL, max(remaining - (time.monotonic() - since), 1e-3))


def _read_one(
    ref: RecordRef, rules: LabelRules, target: np.ndarray
) -> tuple[np.ndarray, dict[str, Any]] | Quarantine:
    """Read one record into ``target`` within the per-record time limit; a refusal as a Quarantine.

    The limit is a SIGALRM timer armed for the read (two system calls a record, a microsecond or
    two): its handler raises in the middle of whatever Python code runs, and interrupts a blocking
    system call (PEP 475 retries a call only when the handler returns).
    """
    timeout_s: float = _WORKER["timeout"]
    try:
        try:
            _WORKER["armed"] = True
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            return load_ref(ref, rules, out=target)
        finally:
            # Disarmed before any handler below runs; an alarm arriving in here still raises
            # _RecordTimeout, which the clause below catches.
            _WORKER["armed"] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _RecordTimeout:
        return _timed_out(ref, timeout_s)
    except RECORD_ERRORS as exc:
        return Quarantine.of(ref, exc.reason, f"{ref.header_path}: {exc}")
    except Exception as exc:  # one bad record must not end the batch; it is quarantined, not hidden
        logger.exception("unexpected error reading %s", ref.header_path)
        return Quarantine.of(
            ref,
            READ_ERROR,
            f"{ref.header_path}: unexpected {type(exc).__name__}: {exc}; check the record's files "
            "and report this if they look valid",
        )


def _load_chunk(task: tuple[int, list[RecordRef]]) -> tuple[list[dict[str, Any]], list[Quarantine]]:
    """Load a chunk of records (see :func:`_load_chunk_gc_off`) with the cyclic garbage collector paused.

    Reading a record allocates hundreds of small objects and none of them form cycles, yet each
    few hundred allocations start a collection that also walks every row kept so far (about 4 %
    of ingest's time); collection resumes between chunks, so memory is still reclaimed.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _load_chunk_gc_off(task)
    finally:
        if enabled:
            gc.enable()


def _load_chunk_gc_off(task: tuple[int, list[RecordRef]]) -> tuple[list[dict[str, Any]], list[Quarantine]]:
    """Load a chunk of records, check their signals in small batches, write the good ones to their slots.

    Signals are converted straight into a chunk buffer (no per-record copy) and checked a
    cache-sized batch at a time, which amortises numpy's per-call overhead over the batch.
    """
    start, refs = task
    rules: LabelRules = _WORKER["rules"]
    fd: int = _WORKER["fd"]
    rows: list[dict[str, Any]] = []
    refused: list[Quarantine] = []
    buffer = _WORKER.get("buffer")
    if buffer is None or len(buffer) < CHECK_BATCH:
        buffer = _WORKER["buffer"] = np.empty((CHECK_BATCH, len(LEADS), N_SAMPLES), dtype=np.float32)
    pending: list[tuple[int, dict[str, Any]]] = []  # (slot, row) whose signal is buffer[index]

    def flush() -> None:
        issues = signal_issues(buffer[: len(pending)])
        run_start = 0  # buffer index where the current run of passing records in consecutive slots began
        for index, ((slot, row), issue) in enumerate(zip(pending, issues, strict=True)):
            if issue is None:
                row["slot"] = slot
                rows.append(row)
                if (
                    index + 1 < len(pending)
                    and issues[index + 1] is None
                    and pending[index + 1][0] == slot + 1
                ):
                    continue
                # One write for the whole run: fewer system calls than one a record.
                SlotFile.write_run(fd, pending[run_start][0], buffer[run_start : index + 1])
                run_start = index + 1
                continue
            run_start = index + 1
            refused.append(_refused_row(row, *issue))
        pending.clear()

    for slot, ref in enumerate(refs, start=start):
        target = buffer[len(pending)]
        loaded = _read_one(ref, rules, target)
        if isinstance(loaded, Quarantine):
            refused.append(loaded)
            continue
        values, row = loaded
        if not np.shares_memory(values, target):
            target[...] = values  # resampled, reordered or padded: a new array
        pending.append((slot, row))
        if len(pending) == CHECK_BATCH:
            flush()
    if pending:
        flush()
    return rows, refused


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
