"""Load records into the signal file, in this process or a pool of worker processes, each record
within a time limit.

Takes: the record references to load (after :func:`ecg_r1.data.screening.screen`), the label
rules, the path of the signal file (:class:`ecg_r1.data.store.SlotFile`, one slot a reference in
order), a worker count and the per-record time limit. Gives, chunk by chunk
(:func:`load_records`): the cohort rows of the records that loaded and passed the signal checks
(each with its ``slot``; its signal already written there) and a :class:`Quarantine` for each
record that did not (unreadable, failing a signal check, or over the time limit).

A worker reads header, signal, canonical form, signal checks, source metadata and label, and
writes the signals straight into its slots of the signal file, so memory holds one chunk, not
the cohort. The time limit is a SIGALRM timer around each read (:func:`_read_one`); a worker
stuck where no signal reaches it is ended by the pool (:func:`_load_in_pool`). The worker's state
(rules, signal file descriptor, limit, the caller's alarm to put back, the signal buffer and the
checks' scratch) is this module's ``_WORKER``, set up by :func:`_init_worker` and
:func:`_load_chunk_gc_off` and undone by :func:`_close_worker`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import multiprocessing.pool
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from ecg_r1.data.canonical import LEADS, N_SAMPLES
from ecg_r1.data.labels import LabelRules
from ecg_r1.data.readers import RECORD_ERRORS, load_ref
from ecg_r1.data.readers.records import READ_ERROR, RECORD_TIMEOUT, Quarantine, RecordRef
from ecg_r1.data.signal_checks import check_scratch, signal_issues
from ecg_r1.data.store import SlotFile

logger = logging.getLogger(__name__)

# Records a worker handles per task: large enough to vectorise the signal checks and amortise
# inter-process overhead, small enough to keep memory at a few MB per worker.
CHUNK_SIZE = 64
# Records checked together: 8 x 12 x 5000 float32 (1.9 MB) stays in the CPU cache.
CHECK_BATCH = 8
# A worker that does not answer within its chunk's time (the per-record limit for each record
# plus one more, plus this grace for process scheduling on a busy machine) is stuck where the
# limit's signal cannot reach it (in C code that blocks signals); see :func:`_load_in_pool`.
STUCK_GRACE_S = 5.0
# Longest a pool's worker may take to start a chunk it is due to take (fork and set-up; seconds on
# a loaded machine). A chunk's own limit counts from when it started, not from when it was awaited.
START_LIMIT_S = 60.0
# How often the wait for a chunk not yet started looks again whether it started.
START_POLL_S = 0.05


def load_records(
    refs: list[RecordRef], rules: LabelRules, signals_path: str, workers: int, timeout_s: float
) -> Iterator[tuple[list[dict[str, Any]], list[Quarantine]]]:
    """Load every record in chunks, in this process or in ``workers`` processes.

    Yields, a chunk at a time and not necessarily in input order: the rows loaded, each with its
    ``slot`` (its index in ``refs``, where its signal was written), and the records refused.
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
    hangs is quarantined. A chunk's deadline counts from when a worker started it (the worker
    notes the time in shared memory): a wait that began earlier (workers still starting, on a
    loaded machine) must not give up on a chunk that has barely begun.
    """
    # fork: workers inherit the imported modules (a spawned interpreter needs ~1 s to import them).
    context = multiprocessing.get_context("fork")
    queue = list(tasks)
    while queue:
        batch, queue = queue, []
        # Start times (time.monotonic: one clock for every process of the machine), 0 until started.
        started = context.RawArray("d", len(batch))
        pool = context.Pool(
            min(workers, len(batch)),
            initializer=_init_pool_worker,
            initargs=(rules, signals_path, timeout_s, started),
        )
        try:
            submitted = [
                (task, pool.apply_async(_load_chunk_noted, (index, task))) for index, task in enumerate(batch)
            ]
            for index, (task, result) in enumerate(submitted):
                deadline = timeout_s * (len(task[1]) + 1) + STUCK_GRACE_S
                try:
                    loaded = _wait(result, started, index, deadline)
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


def _wait(result: multiprocessing.pool.AsyncResult, started: Any, index: int, seconds: float) -> Any:
    """The chunk's result, waiting at most ``seconds`` from its start (and :data:`START_LIMIT_S`
    for it to start).

    Raises:
        multiprocessing.TimeoutError: it did not start in time, or did not end in time.
    """
    waiting_since = time.monotonic()
    while not started[index]:
        if time.monotonic() - waiting_since > START_LIMIT_S:
            raise multiprocessing.TimeoutError
        with contextlib.suppress(multiprocessing.TimeoutError):
            return result.get(timeout=START_POLL_S)
    return result.get(timeout=max(started[index] + seconds - time.monotonic(), 0.0))


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


def _init_pool_worker(rules: LabelRules, signals_path: str, timeout_s: float, started: Any) -> None:
    # A forked worker inherits its parent's signal handlers (an orchestrator's, say); the pool
    # ends its workers with SIGTERM, which must just end them. Ctrl-C reaches the whole process
    # group: the parent handles it (and ends the pool), so a worker ignores it. Never done in the
    # parent itself, or a 1-worker ingest could not be interrupted.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER["started"] = started
    _init_worker(rules, signals_path, timeout_s)


def _load_chunk_noted(
    index: int, task: tuple[int, list[RecordRef]]
) -> tuple[list[dict[str, Any]], list[Quarantine]]:
    """:func:`_load_chunk` in a pool's worker, noting first when it started (see :func:`_wait`)."""
    _WORKER["started"][index] = time.monotonic()
    return _load_chunk(task)


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
    _WORKER.pop("scratch", None)
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
        _WORKER["scratch"] = check_scratch(CHECK_BATCH)
    scratch: np.ndarray = _WORKER["scratch"]
    pending: list[tuple[int, dict[str, Any]]] = []  # (slot, row) whose signal is buffer[index]

    def flush() -> None:
        issues = signal_issues(buffer[: len(pending)], scratch)
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
            refused.append(Quarantine.of_row(row, *issue))
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
