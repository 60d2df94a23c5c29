"""Reading a WFDB record's signal in millivolts, given its parsed header.

Takes a :class:`~ecg_r1.data.readers.wfdb_header.Header`; gives a :class:`RawSignal` (float32
mV, shape (n_samples, n_sig), plus the signal file's sha256, the median gain and which reader
was used), or raises :class:`~ecg_r1.data.readers.records.RecordError` with a quarantine reason.
Every signal file is read through :func:`~ecg_r1.data.readers.confined_read.read_bytes`.

Speed: a plain ``wfdb.rdrecord`` loop reads about 210 records per CPU-second here, most of it Python
overhead. The common formats are read directly with numpy instead: WFDB format 16 / 61 / 80
``.dat`` files and MATLAB v4 ``.mat`` files (PhysioNet/CinC; v5 files go through scipy, their
compressed elements expanded within the record size limit first). Anything else (format 212,
FLAC, skewed or multi-frequency signals, records spread over several signal files) falls back
to ``wfdb.rdrecord``, which stays the reference the tests and ``benchmarks/bench_ingest.py``
compare against.

Missing samples: whichever reader decoded the samples, :func:`_to_physical` turns each signal's
storage-format marker (:data:`~ecg_r1.data.readers.wfdb_header.INVALID_SAMPLE`, also what wfdb
fills a skewed signal's tail with) into NaN, so a record with gaps is refused as
``nan_samples`` by the signal checks instead of loading the marker as a voltage.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import statistics
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ecg_r1.data.readers.confined_read import read_bytes
from ecg_r1.data.readers.records import RecordError
from ecg_r1.data.readers.wfdb_header import (
    FORMAT_BITS,
    INVALID_SAMPLE,
    MAX_RECORD_VALUES,
    Header,
    check_values,
)

# Formats read with numpy: dtype of one sample.
_NUMPY_FORMATS = {16: "<i2", 61: ">i2", 80: "u1"}


@dataclass(frozen=True)
class RawSignal:
    """A record's signal in physical units (mV), shape (n_samples, n_sig), plus provenance."""

    signal: np.ndarray  # float32, (n_samples, n_sig)
    checksum: str  # sha256 of the signal file's bytes
    gain: float  # median ADC gain over the signals
    reader: str  # "numpy" or "wfdb"
    signal_path: str


def read_signal(header: Header, out: np.ndarray | None = None) -> RawSignal:
    """Read a record's signal in millivolts, shape (n_samples, n_sig), float32.

    Args:
        header: the parsed header (its folder holds the signal file).
        out: optional float32 buffer of shape (n_sig, n_samples) to convert into (ingest passes
            a row of its chunk buffer, saving a copy); ignored when the shape differs.

    Returns:
        The physical signal and its provenance.

    Raises:
        RecordError: ``missing_signal_file``, ``truncated_signal``, ``length_mismatch``,
            ``unsupported_format`` or ``bad_signal_file``.
    """
    files = {spec.file_name for spec in header.signals}
    layouts = {(spec.fmt, spec.samples_per_frame, spec.skew, spec.byte_offset) for spec in header.signals}
    fmt, spf, skew, _ = next(iter(layouts))
    simple = len(files) == 1 and len(layouts) == 1 and spf == 1 and skew == 0
    folder = os.path.dirname(header.path)
    signal_path = os.path.join(folder, min(files))
    try:
        if simple and signal_path[-4:].lower() == ".mat":
            data = read_bytes(signal_path, header.root)
            digital = _digital_from_mat(data, header, signal_path)
            reader = "numpy"
        elif simple and fmt in _NUMPY_FORMATS:
            data = read_bytes(signal_path, header.root)
            digital = _digital_from_dat(data, header, signal_path, fmt)
            reader = "numpy"
        else:
            # Read (confined) before wfdb opens the same files itself: a file outside the folder,
            # a pipe or a device is refused here, never handed to wfdb.
            data = b"".join(read_bytes(os.path.join(folder, name), header.root) for name in sorted(files))
            bits = min((FORMAT_BITS[spec.fmt] or 0) for spec in header.signals)
            if bits == 0 and header.n_samples is None:
                raise RecordError(
                    "unsupported_format",
                    f"{header.path}: a FLAC-compressed record must give its number of samples in the record "
                    "line (its size cannot be bounded otherwise): add it or re-export in format 16",
                )
            check_values(header.n_samples * header.n_sig if bits == 0 else len(data) * 8 // bits, header.path)
            digital = _digital_from_wfdb(header)
            reader = "wfdb"
    except FileNotFoundError as exc:
        raise RecordError(
            "missing_signal_file",
            f"signal file {exc.filename} named by {header.path} does not exist; copy it beside the header",
        ) from exc
    checksum = hashlib.sha256(data).hexdigest()
    physical = _to_physical(digital, header, out)
    return RawSignal(
        signal=physical,
        checksum=checksum,
        gain=_median_gain(tuple(spec.gain for spec in header.signals)),
        reader=reader,
        signal_path=signal_path,
    )


@functools.lru_cache(maxsize=1024)
def _median_gain(gains: tuple[float, ...]) -> float:
    return float(statistics.median(gains))


def _check_length(n_frames: int, header: Header, signal_path: str) -> None:
    if header.n_samples and n_frames != header.n_samples:
        raise RecordError(
            "length_mismatch",
            f"{signal_path} holds {n_frames} samples per lead but {header.path} says {header.n_samples}; "
            "the header and signal file do not belong together or one was cut: re-export the record",
        )


def _digital_from_dat(data: bytes, header: Header, signal_path: str, fmt: int) -> np.ndarray:
    offset = header.signals[0].byte_offset
    itemsize = np.dtype(_NUMPY_FORMATS[fmt]).itemsize
    payload = len(data) - offset
    frame_bytes = itemsize * header.n_sig
    if payload < 0 or payload % frame_bytes:
        raise RecordError(
            "truncated_signal",
            f"{signal_path} has {len(data)} bytes, which is not a whole number of {frame_bytes}-byte "
            f"frames after its {offset}-byte offset: the file is truncated; copy it again from the source",
        )
    n_frames = payload // frame_bytes
    check_values(n_frames * header.n_sig, signal_path)
    _check_length(n_frames, header, signal_path)
    digital = np.frombuffer(data, dtype=_NUMPY_FORMATS[fmt], offset=offset).reshape(n_frames, header.n_sig)
    if fmt == 80:
        # Format 80 stores 8-bit samples offset by 128.
        return digital.astype(np.int16) - 128
    return digital


def _digital_from_mat(data: bytes, header: Header, signal_path: str) -> np.ndarray:
    """Read the first matrix of a MATLAB v4 file (PhysioNet/CinC: ``val``, leads x samples)."""
    if data[:6] == b"MATLAB":
        return _digital_from_mat5(data, header, signal_path)
    if len(data) < 20:
        raise RecordError(
            "truncated_signal",
            f"{signal_path} has {len(data)} bytes, less than a MATLAB v4 header: copy it again",
        )
    mopt, mrows, ncols, imagf, namlen = struct.unpack("<5i", data[:20])
    endian = "<"
    if not 0 <= mopt < 5000:
        mopt, mrows, ncols, imagf, namlen = struct.unpack(">5i", data[:20])
        endian = ">"
    precision = (mopt // 10) % 10
    dtypes = {0: "f8", 1: "f4", 2: "i4", 3: "i2", 4: "u2", 5: "u1"}
    if mopt % 10 != 0 or imagf or precision not in dtypes or (mopt // 100) % 10 != 0:
        raise RecordError(
            "bad_signal_file",
            f"{signal_path} is not a real numeric MATLAB v4 matrix (type {mopt}); "
            "save the signal as a numeric matrix 'val' (leads x samples)",
        )
    dtype = np.dtype(endian + dtypes[precision])
    check_values(mrows * ncols, signal_path)
    start = 20 + namlen
    expected = start + mrows * ncols * dtype.itemsize
    if len(data) < expected:
        raise RecordError(
            "truncated_signal",
            f"{signal_path} has {len(data)} bytes but its MATLAB header announces a {mrows}x{ncols} "
            f"matrix ({expected} bytes): the file is truncated; copy it again from the source",
        )
    if mrows != header.n_sig:
        raise RecordError(
            "shape_mismatch",
            f"{signal_path} holds {mrows} signals but {header.path} describes {header.n_sig}; "
            "the header and signal file do not belong together",
        )
    _check_length(ncols, header, signal_path)
    # Column-major (mrows x ncols) is, in memory, ncols frames of mrows samples: the .dat layout.
    return np.frombuffer(data, dtype=dtype, count=mrows * ncols, offset=start).reshape(ncols, mrows)


def _digital_from_mat5(data: bytes, header: Header, signal_path: str) -> np.ndarray:
    from scipy.io import loadmat

    expanded = _expand_mat5(data, signal_path)
    try:
        matrices = {k: v for k, v in loadmat(io.BytesIO(expanded)).items() if not k.startswith("__")}
    except Exception as exc:  # scipy raises several types for a bad file
        raise RecordError(
            "bad_signal_file", f"{signal_path}: cannot read MATLAB file ({type(exc).__name__}); re-export it"
        ) from exc
    val = matrices.get("val", next(iter(matrices.values()), None))
    if isinstance(val, np.ndarray) and val.dtype.kind == "c":
        raise RecordError(
            "complex_signal",
            f"{signal_path} holds complex numbers; an ECG is real-valued (dropping the imaginary part would "
            "hide the problem): save the real signal as 'val'",
        )
    if (
        not isinstance(val, np.ndarray)
        or val.dtype.kind not in "iuf"
        or val.ndim != 2
        or val.shape[0] != header.n_sig
    ):
        raise RecordError(
            "shape_mismatch",
            f"{signal_path}: expected a numeric matrix 'val' of {header.n_sig} rows (leads x samples)",
        )
    check_values(val.size, signal_path)
    _check_length(val.shape[1], header, signal_path)
    return np.ascontiguousarray(val.T)


# MATLAB v5 element types: a matrix, and a zlib-compressed element (which expands to one).
_MI_MATRIX, _MI_COMPRESSED = 14, 15


def _expand_mat5(data: bytes, signal_path: str) -> bytes:
    """The MATLAB v5 file with its compressed elements expanded, at most :data:`MAX_RECORD_VALUES`
    float64 values in all: a few MB of zeros compress to a file that would expand to gigabytes,
    so the expansion is bounded here, before scipy sees the file."""
    budget = MAX_RECORD_VALUES * 8 + (1 << 20)  # the values plus room for names and tags
    endian = "<" if data[126:128] == b"IM" else ">"
    parts = [data[:128]]
    size = 0
    position = 128
    while position + 8 <= len(data):
        mdtype, nbytes = struct.unpack(endian + "II", data[position : position + 8])
        body = data[position + 8 : position + 8 + nbytes]
        if mdtype == _MI_COMPRESSED:
            element = zlib.decompressobj().decompress(body, budget - size + 1)
            position += 8 + nbytes
        else:
            element = data[position : position + 8 + nbytes]
            position += 8 + nbytes + (-nbytes % 8)  # uncompressed elements are padded to 8 bytes
        size += len(element)
        if size > budget:
            raise RecordError(
                "record_too_large",
                f"{signal_path} expands to more than {budget} bytes; only a short record is used here: "
                "cut the record before ingesting it",
            )
        parts.append(element)
    return b"".join(parts)


def _digital_from_wfdb(header: Header) -> np.ndarray:
    import wfdb

    several = any(spec.samples_per_frame > 1 for spec in header.signals)
    try:
        record = wfdb.rdrecord(os.path.splitext(header.path)[0], physical=False, smooth_frames=not several)
        digital = _smoothed(record, header) if several else record.d_signal
    except Exception as exc:  # wfdb raises many types; the message is what helps
        raise RecordError(
            "bad_signal_file",
            f"wfdb could not read {header.path} ({type(exc).__name__}: {exc}); check the header and signal file",
        ) from exc
    _check_length(digital.shape[0], header, header.path)
    return digital


def _smoothed(record: Any, header: Header) -> np.ndarray:
    """A multi-frequency record's digital signal at one sample a frame (wfdb's own averaging of
    each frame's samples), with a frame that holds a missing sample kept missing: averaged, the
    marker would become a plausible value."""
    digital = record.smooth_frames("digital").astype(np.int64)  # record: a wfdb.Record
    for column, (spec, expanded) in enumerate(zip(header.signals, record.e_d_signal, strict=True)):
        marker = INVALID_SAMPLE[spec.fmt]
        if spec.samples_per_frame > 1 and marker is not None:
            gaps = (expanded.reshape(-1, spec.samples_per_frame) == marker).any(axis=1)
            digital[gaps, column] = marker
    return digital


def _to_physical(digital: np.ndarray, header: Header, out: np.ndarray | None = None) -> np.ndarray:
    """ADC units (n_samples, n_sig) to mV, returned as a (n_samples, n_sig) view of lead-major memory.

    The one strided pass (frame-interleaved to lead-major) happens in the int-to-float copy, so
    the canonical form later needs no further copy for records already in standard lead order.
    """
    offsets, factors = _conversion(
        tuple([spec.baseline for spec in header.signals]),
        tuple([spec.mv_per_unit for spec in header.signals]),
    )
    if out is not None and out.shape == digital.T.shape and out.dtype == np.float32:
        np.copyto(out, digital.T, casting="unsafe")
        physical = out
    else:
        physical = digital.T.astype(np.float32, order="C")
    if offsets is not None:
        physical -= offsets
    physical *= factors
    invalid = _invalid_values(tuple([spec.fmt for spec in header.signals]))
    # Each format's marker is the lowest value it holds, so min() (one cheap pass) finds every
    # record that may have a gap; the mask is built only for those.
    if invalid is not None and digital.size and digital.min() <= invalid[0]:
        physical[(digital == invalid[1]).T] = np.nan
    return physical.T


@functools.lru_cache(maxsize=256)
def _invalid_values(formats: tuple[int, ...]) -> tuple[int, np.ndarray] | None:
    """The highest missing-sample marker of a record's signals and each signal's marker (a row
    to compare frames with), from their storage formats (:data:`INVALID_SAMPLE`); None when no
    format has one. A signal whose format has none (format 8) gets a value no sample takes."""
    markers = [INVALID_SAMPLE[fmt] for fmt in formats]
    if all(marker is None for marker in markers):
        return None
    never = np.iinfo(np.int64).min
    row = np.array([never if marker is None else marker for marker in markers], dtype=np.int64)
    row.flags.writeable = False  # shared between records through the cache
    return max(marker for marker in markers if marker is not None), row


@functools.lru_cache(maxsize=1024)
def _conversion(
    baselines: tuple[int, ...], factors: tuple[float, ...]
) -> tuple[np.ndarray | None, np.ndarray]:
    """Column vectors of baselines (None when all 0) and mV-per-unit factors, cached per header layout."""
    offsets = np.array(baselines, dtype=np.float32)[:, None] if any(baselines) else None
    scale = np.array(factors, dtype=np.float32)[:, None]
    for array in (offsets, scale):
        if array is not None:
            array.flags.writeable = False  # shared between records through the cache
    return offsets, scale
