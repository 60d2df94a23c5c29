"""The on-disk cohort: a Parquet metadata table beside one memory-mapped signal array.

A cohort folder holds

* ``cohort.parquet``: one row a loaded record (see :data:`COHORT_SCHEMA`); its ``row`` column
  indexes the signal array;
* ``signals.f32`` + ``signals.json``: all signals as one float32 array of shape
  (n_records, 12, 5000) in millivolts, opened with :func:`open_signals` as a read-only
  ``numpy.memmap`` so 100,000 records never become 100,000 Python objects;
* ``quarantine.parquet``: one row a refused record, with its source path and reason;
* ``summary.json``: the ingest summary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl

from ecg_r1.data.canonical import LEADS, N_SAMPLES

SIGNALS_FILE = "signals.f32"
SIGNALS_META = "signals.json"
COHORT_FILE = "cohort.parquet"
QUARANTINE_FILE = "quarantine.parquet"
SUMMARY_FILE = "summary.json"

# The cohort table every reader fills and every later stage reads.
COHORT_SCHEMA: dict[str, pl.DataType] = {
    "record_id": pl.String,  # unique in the cohort, prefixed by its source ("cinc2021/E00666")
    "patient_id": pl.String,  # the record id where the source has no patient ids
    "hospital": pl.String,
    "source_format": pl.String,  # ptbxl | cinc | ludb | manifest
    "source_path": pl.String,
    "checksum": pl.String,  # sha256 of the signal file
    "source_fs": pl.Float64,
    "source_gain": pl.Float64,  # median ADC gain (units per mV) over the leads
    "derived_leads": pl.String,  # comma-joined leads derived from I and II
    "cropped_samples": pl.Int64,
    "padded_samples": pl.Int64,
    "age": pl.Float64,
    "sex": pl.String,  # "M" | "F" | null
    "note": pl.String,  # clinical text as the source has it (complaint, history, troponin...)
    "report": pl.String,  # the ECG report where the source has one (never shown to the model)
    "raw_codes": pl.String,  # the codes / statements the label was derived from
    "twi": pl.Boolean,  # in the T-wave-inversion cohort
    "twi_leads": pl.String,  # comma-joined leads with TWI where the source says or it is measured
    "label": pl.String,  # one of ecg_r1.data.labels.LABELS
    "device": pl.String,  # recording device where the source names it
    "extra": pl.String,  # JSON object of manifest columns that are not cohort fields (kept, not dropped)
    "row": pl.Int64,  # index into the signal array
}

# One row a refused record (or input: an empty folder, an unreadable manifest).
QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    "record_id": pl.String,
    "patient_id": pl.String,
    "hospital": pl.String,
    "source_format": pl.String,
    "source_path": pl.String,
    "reason": pl.String,  # short key, counted in the summary
    "message": pl.String,  # what was wrong and what to do
}


def signal_nbytes() -> int:
    return len(LEADS) * N_SAMPLES * 4


def open_signals(cohort_dir: str | Path) -> np.ndarray:
    """Open a cohort's signals read-only as a memmap of shape (n_records, 12, 5000)."""
    meta = json.loads((Path(cohort_dir) / SIGNALS_META).read_text())
    shape = tuple(meta["shape"])
    if shape[0] == 0:
        return np.zeros(shape, dtype=np.float32)
    return np.memmap(Path(cohort_dir) / SIGNALS_FILE, dtype=np.float32, mode="r", shape=shape)


class SignalWriter:
    """Appends canonical signals to a cohort folder's signal file; returns each one's row."""

    def __init__(self, cohort_dir: str | Path) -> None:
        self.dir = Path(cohort_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.dir / SIGNALS_FILE, "wb")  # noqa: SIM115 - closed in close()
        self.rows = 0

    def append(self, signal: np.ndarray) -> int:
        if signal.shape != (len(LEADS), N_SAMPLES) or signal.dtype != np.float32:
            raise ValueError(f"expected float32 {(len(LEADS), N_SAMPLES)}, got {signal.dtype} {signal.shape}")
        self._file.write(signal.tobytes())
        self.rows += 1
        return self.rows - 1

    def close(self) -> None:
        self._file.close()
        meta = {"dtype": "float32", "shape": [self.rows, len(LEADS), N_SAMPLES], "leads": list(LEADS)}
        (self.dir / SIGNALS_META).write_text(json.dumps(meta))

    def __enter__(self) -> SignalWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SlotFile:
    """A signal file written out of order: each record goes to a pre-assigned slot.

    Parallel ingest workers write their records straight into the file with ``os.pwrite`` at
    ``slot * signal_nbytes()`` (no signal crosses a process boundary); afterwards
    :meth:`compact` closes the gaps left by refused records, keeping the slots' order, and
    writes ``signals.json``. Memory stays one record whatever the cohort size.
    """

    def __init__(self, cohort_dir: str | Path, n_slots: int) -> None:
        self.dir = Path(cohort_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / SIGNALS_FILE
        with open(self.path, "wb") as handle:
            size = n_slots * signal_nbytes()
            try:
                # Reserving the blocks up front makes each later write about 20 % cheaper (the
                # file system no longer allocates blocks page by page); slots of refused records
                # are given back by compact()'s truncate.
                if size:
                    os.posix_fallocate(handle.fileno(), 0, size)
            except OSError:
                # A file system that refuses it (glibc emulates it on ones without fallocate, by
                # writing a byte a block: slower, still correct) or a full disk, which the writes
                # then report: a sparse file works the same.
                handle.truncate(size)
        self.n_slots = n_slots

    @staticmethod
    def write(path: str | Path, slot: int, signal: np.ndarray, fd: int | None = None) -> None:
        """Write one canonical signal into its slot (``fd`` an open descriptor of ``path``, for speed)."""
        if signal.shape != (len(LEADS), N_SAMPLES) or signal.dtype != np.float32:
            raise ValueError(f"expected float32 {(len(LEADS), N_SAMPLES)}, got {signal.dtype} {signal.shape}")
        data = memoryview(np.ascontiguousarray(signal)).cast("B")
        if fd is None:
            with open(path, "r+b") as handle:
                os.pwrite(handle.fileno(), data, slot * signal_nbytes())
        else:
            os.pwrite(fd, data, slot * signal_nbytes())

    @staticmethod
    def write_run(fd: int, first_slot: int, signals: np.ndarray) -> None:
        """Write consecutive canonical signals (k, 12, 5000) into slots ``first_slot..first_slot+k-1``
        with one system call (``fd`` an open, writable descriptor of the signal file)."""
        if signals.ndim != 3 or signals.shape[1:] != (len(LEADS), N_SAMPLES) or signals.dtype != np.float32:
            raise ValueError(
                f"expected float32 (k, {len(LEADS)}, {N_SAMPLES}), got {signals.dtype} {signals.shape}"
            )
        data = memoryview(np.ascontiguousarray(signals)).cast("B")
        offset = first_slot * signal_nbytes()
        while data:
            # pwrite may write less than asked (signals, some file systems): finish the rest.
            written = os.pwrite(fd, data, offset)
            data, offset = data[written:], offset + written

    def compact(self, kept_slots: list[int]) -> None:
        """Move the kept slots (ascending) to rows 0..k-1, truncate the file, write ``signals.json``."""
        nbytes = signal_nbytes()
        fd = os.open(self.path, os.O_RDWR)
        try:
            for row, slot in enumerate(kept_slots):
                if slot != row:
                    os.pwrite(fd, os.pread(fd, nbytes, slot * nbytes), row * nbytes)
            os.ftruncate(fd, len(kept_slots) * nbytes)
        finally:
            os.close(fd)
        meta = {"dtype": "float32", "shape": [len(kept_slots), len(LEADS), N_SAMPLES], "leads": list(LEADS)}
        (self.dir / SIGNALS_META).write_text(json.dumps(meta))


def read_cohort(cohort_dir: str | Path) -> pl.DataFrame:
    return pl.read_parquet(Path(cohort_dir) / COHORT_FILE)


def read_quarantine(cohort_dir: str | Path) -> pl.DataFrame:
    return pl.read_parquet(Path(cohort_dir) / QUARANTINE_FILE)
