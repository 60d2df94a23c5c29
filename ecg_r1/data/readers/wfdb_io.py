"""Tolerant, fast reading of WFDB records: headers, signals and annotation files.

Real exports vary in ways the ``wfdb`` package refuses (a record line naming ``E00666.mat``
instead of ``E00666``, ``#Dx:`` without a space, units written ``mv``, a clinical comment in
Windows-1252). This module reads them anyway and raises :class:`RecordError` with a short
quarantine ``reason`` and a message that says what to do when it cannot.

Speed: a plain ``wfdb.rdrecord`` loop reads about 210 records per CPU-second here, most of it Python
overhead. The common formats are read directly with numpy instead: WFDB format 16 / 61 / 80
``.dat`` files and MATLAB v4 ``.mat`` files (PhysioNet/CinC). Anything else (format 212,
multi-segment records, skewed or multi-frequency signals) falls back to ``wfdb.rdsamp``, which
stays the reference the tests and ``benchmarks/bench_ingest.py`` compare against.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import io
import logging
import math
import os
import re
import stat
import statistics
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ecg_r1.data.readers.records import FILE_TOO_LARGE, NOT_A_REGULAR_FILE, PATH_ESCAPES_FOLDER

logger = logging.getLogger(__name__)

# WFDB's default ADC gain when a header gives none or 0 (``DEFGAIN`` in the WFDB library).
WFDB_DEFAULT_GAIN = 200.0
# The sample value WFDB reserves for "no data" in 16-bit formats; read as NaN.
WFDB_INVALID_16 = -32768
# Extensions a record line sometimes carries although it should not (seen in CinC 2021 files).
_SIGNAL_EXTENSIONS = (".mat", ".dat", ".hea")
# Unit spellings converted to millivolts; anything else is taken as mV with a warning.
_UNIT_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "microvolt": 1e-3, "v": 1e3, "nu": 1.0}
_FORMAT_RE = re.compile(r"^(\d+)(?:x(\d+))?(?::(\d+))?(?:\+(\d+))?$")
_FS_RE = re.compile(r"^([\d.]+(?:[eE][-+]?\d+)?)(?:/[\d.]+)?(?:\(-?[\d.]+\))?$")
# Formats read with numpy: dtype of one sample.
_NUMPY_FORMATS = {16: "<i2", 61: ">i2", 80: "u1"}
# Sampling rates a 12-lead ECG can have: below 50 Hz the QRS is lost; above 20 kHz no ECG device
# records (a rate outside is a broken header, and a tiny rate asks for huge resampling buffers).
MIN_FS, MAX_FS = 50.0, 20_000.0
# Most samples (all leads together) a record may hold: 16.8 M values is 64 MB as float32, about 23
# minutes of 12 leads at 1 kHz; checked before anything is allocated.
MAX_RECORD_VALUES = 1 << 24
# Bits a sample of each WFDB storage format takes (None: FLAC, compressed, size known only from the
# header). Any other format is refused with a message instead of a KeyError deep in wfdb.
_FORMAT_BITS: dict[int, int | None] = {
    8: 8, 16: 16, 24: 24, 32: 32, 61: 16, 80: 8, 160: 16, 212: 12, 310: 10, 311: 10,
    508: None, 516: None, 524: None,
}  # fmt: skip
# Largest header and signal file read (a 10 s 12-lead record is about 120 kB; a header a few kB).
MAX_HEADER_BYTES = 1 << 20
MAX_SIGNAL_FILE_BYTES = 256 << 20


class RecordError(ValueError):
    """A record cannot be read; ``reason`` is a short quarantine key, the message says what to do."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class SignalSpec(NamedTuple):
    """One signal line of a WFDB header (a NamedTuple: built 12 times a record, it must be cheap)."""

    file_name: str
    fmt: int
    samples_per_frame: int
    skew: int
    byte_offset: int
    gain: float  # ADC units per physical unit
    baseline: int
    units: str
    adc_res: int
    adc_zero: int
    init_value: int | None
    checksum: int | None
    description: str
    mv_per_unit: float  # millivolts per ADC unit (units and gain folded together)


@dataclass(slots=True)
class Header:
    """A parsed WFDB header."""

    path: Path
    record_name: str
    n_sig: int
    fs: float
    n_samples: int | None
    signals: tuple[SignalSpec, ...]
    comments: tuple[str, ...]
    encoding: str = "utf-8"
    warnings: tuple[str, ...] = field(default=())
    root: str = ""  # real path of the folder the record's files must stay in

    @property
    def lead_names(self) -> list[str]:
        return [spec.description for spec in self.signals]


@dataclass(frozen=True)
class RawSignal:
    """A record's signal in physical units (mV), shape (n_samples, n_sig), plus provenance."""

    signal: np.ndarray  # float32, (n_samples, n_sig)
    checksum: str  # sha256 of the signal file's bytes
    gain: float  # median ADC gain over the signals
    reader: str  # "numpy" or "wfdb"
    signal_path: Path


def read_bytes(
    path: str | os.PathLike[str], root: str | None = None, max_bytes: int = MAX_SIGNAL_FILE_BYTES
) -> bytes:
    """A record file's whole bytes, read only when it is a regular file inside ``root``.

    Confinement: the path is resolved (symlinks included) and refused unread when it lands
    outside ``root``, so neither a link nor a name written in a header can pull in a file from
    elsewhere on the machine. Only regular files are opened (a FIFO would block the run for
    ever, a device such as ``/dev/zero`` never ends), and ``max_bytes`` bounds what one file
    may cost. Messages name the path, never the file's contents.

    Speed: one ``os.read`` of the file's size; measured here (``benchmarks/bench_ingest.py``
    folder) 36 µs for a 120 kB signal file and 15 µs for a header, against 65 µs and 42 µs for
    ``Path.read_bytes`` (its buffered file object costs more to set up than the read itself).

    Args:
        path: the file.
        root: real path (``os.path.realpath``) of the folder the file must stay in; None: the
            real path of the file's own folder.
        max_bytes: the largest file accepted.

    Raises:
        RecordError: ``path_escapes_folder``, ``not_a_regular_file`` or ``file_too_large``.
        FileNotFoundError: when the file does not exist.
    """
    real = os.path.realpath(path)
    if root is None:
        root = os.path.realpath(os.path.dirname(os.fspath(path)) or ".")
    if os.path.commonpath((real, root)) != root:
        raise RecordError(
            PATH_ESCAPES_FOLDER,
            f"{path} resolves to {real}, outside the folder {root} given to ingest; a record may only read "
            "files inside that folder: copy the file into it (links pointing outside are not followed)",
        )
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer; O_NOFOLLOW: a link
    # swapped in after the check above is refused instead of followed.
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise RecordError(
                NOT_A_REGULAR_FILE,
                f"{path} is not a regular file (a folder, pipe, socket or device); a record's files must be "
                "plain files: replace it with the file itself",
            )
        size = status.st_size
        if size > max_bytes:
            raise RecordError(
                FILE_TOO_LARGE,
                f"{path} has {size} bytes, more than the {max_bytes} a record file may have here; an ECG of "
                "a few minutes is far smaller: check that it is the right file, or cut the record",
            )
        data = os.read(fd, size + 1)  # +1 so that a file grown since fstat is still seen to grow
        if len(data) <= size:
            return data
        chunks = [data]
        total = len(data)
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise RecordError(FILE_TOO_LARGE, f"{path} grew past {max_bytes} bytes while it was read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(path: Path, root: str | None = None) -> tuple[str, str]:
    """Read a header as UTF-8, falling back to Windows-1252/Latin-1 for legacy exports.

    Confined to ``root`` as :func:`read_bytes` is, and at most :data:`MAX_HEADER_BYTES`.

    Returns:
        (text, encoding used).
    """
    data = read_bytes(path, root, MAX_HEADER_BYTES)
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]  # some Windows editors write one; it is not content
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        # cp1252 first: hospital systems on Windows write it; latin-1 decodes any byte.
        try:
            return data.decode("cp1252"), "cp1252"
        except UnicodeDecodeError:
            return data.decode("latin-1"), "latin-1"


def parse_header(path: str | Path, root: str | None = None) -> Header:
    """Parse a WFDB header file tolerantly.

    Accepted deviations: a record name written with a file extension, comments without a space
    after ``#``, units in any case, gain 0 (WFDB's "uncalibrated", read as 200 units/mV), a
    header that is not UTF-8 in its comments (decoded as cp1252).

    Args:
        path: the ``.hea`` file.
        root: real path of the folder the header and its signal files must stay in (the folder
            the user named); None: the header's own folder.

    Returns:
        The parsed header.

    Raises:
        RecordError: ``missing_header``, ``bad_header``, or a confinement reason of
            :func:`read_bytes`; signal-file names that are absolute or climb out with ``..``
            give ``path_escapes_folder``.
    """
    path = Path(path)
    root = root or os.path.realpath(path.parent)
    try:
        text, encoding = read_text(path, root)
    except FileNotFoundError as exc:
        raise RecordError(
            "missing_header", f"header {path} does not exist; give the path of a .hea file"
        ) from exc
    warnings: list[str] = []
    if encoding != "utf-8":
        warnings.append(f"header is not UTF-8; decoded as {encoding}")
    comments_list = []
    body = []
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line:
            continue
        if line[0] == "#":
            comments_list.append(line[1:].strip())
        else:
            if "#" in line:
                line = line.split("#", 1)[0].strip()
            if line:
                body.append(line)
    comments = tuple(comments_list)
    if not body:
        raise RecordError("bad_header", f"header {path} has no record line; it is empty or not a WFDB header")
    for number, line in enumerate(body):
        if not line.isascii():
            raise RecordError(
                "bad_header",
                f"header {path} has non-ASCII characters in {_line_name(number)}; "
                "the record and signal lines must be plain ASCII: re-export the header",
            )
    record_name, n_sig, fs, n_samples = _parse_record_line(body[0], path)
    if "/" in body[0].split()[0]:
        raise RecordError(
            "unsupported_format", f"{path} is a multi-segment record; export it as a single segment"
        )
    signal_lines = body[1 : 1 + n_sig]
    if len(signal_lines) != n_sig:
        raise RecordError(
            "bad_header",
            f"header {path} announces {n_sig} signals but has {len(signal_lines)} signal lines; "
            "the header is cut or its record line is wrong",
        )
    signals = tuple(
        _parse_signal_line(line, path, warnings, number) for number, line in enumerate(signal_lines, start=1)
    )
    for number, spec in enumerate(signals, start=1):
        if spec.fmt not in _FORMAT_BITS:
            what = "means the signal was not stored (a null signal)" if spec.fmt == 0 else "is no WFDB format"
            raise RecordError(
                "unsupported_format",
                f"header {path}: signal line {number} has storage format {spec.fmt}, which {what}; "
                f"re-export the record in format 16 (known formats: {sorted(_FORMAT_BITS)})",
            )
    return Header(
        path=path,
        record_name=record_name,
        n_sig=n_sig,
        fs=fs,
        n_samples=n_samples,
        signals=signals,
        comments=comments,
        encoding=encoding,
        warnings=tuple(warnings),
        root=root,
    )


def _line_name(number: int) -> str:
    """How messages name a header line. They never quote it: a message must not repeat what a
    file holds (a header may be any file someone put in the folder)."""
    return "the record line" if number == 0 else f"signal line {number}"


def _check_signal_file_name(name: str, path: Path, number: int) -> None:
    """Refuse a signal-file name that points away from the header's folder."""
    if os.path.isabs(name) or ".." in name.split("/"):
        raise RecordError(
            PATH_ESCAPES_FOLDER,
            f"header {path}: signal line {number} names its signal file by an absolute path or with '..'; "
            "a signal file must sit beside its header (or below it): write its plain file name",
        )


def _parse_record_line(line: str, path: Path) -> tuple[str, int, float, int | None]:
    parts = line.split()
    try:
        name = parts[0].split("/")[0]
        for ext in _SIGNAL_EXTENSIONS:
            if name.lower().endswith(ext):
                name = name[: -len(ext)]
        n_sig = int(parts[1])
        fs = _parse_fs(parts[2]) if len(parts) > 2 else 250.0  # WFDB's default when a header gives none
        n_samples = int(parts[3]) if len(parts) > 3 else None
    except (IndexError, ValueError) as exc:
        raise RecordError(
            "bad_header",
            f"header {path}: cannot read the record line (a field is missing or not a number); it must read "
            "'NAME N_SIGNALS FS N_SAMPLES'",
        ) from exc
    if n_sig <= 0 or fs <= 0:
        raise RecordError("bad_header", f"header {path}: the record line gives {n_sig} signals at {fs} Hz")
    if not MIN_FS <= fs <= MAX_FS:
        raise RecordError(
            "implausible_rate",
            f"header {path} gives a sampling rate of {fs:g} Hz; an ECG is sampled at {MIN_FS:g} to "
            f"{MAX_FS:g} Hz: fix the rate in the record line",
        )
    if n_samples is not None:
        _check_values(n_samples * n_sig, path)
    return name, n_sig, fs, n_samples


def _check_values(n_values: int, path: Path) -> None:
    """Refuse a record of more than :data:`MAX_RECORD_VALUES` samples before it is allocated."""
    if n_values > MAX_RECORD_VALUES:
        raise RecordError(
            "record_too_large",
            f"{path} holds {n_values} samples (all leads), more than the {MAX_RECORD_VALUES} a record may "
            "have here (only its first 10 s are used): cut the record before ingesting it",
        )


@functools.lru_cache(maxsize=256)
def _parse_fs(text: str) -> float:
    """A record line's sampling frequency field (cached: a few distinct rates recur)."""
    match = _FS_RE.match(text)
    if match is None:
        raise ValueError(f"sampling frequency {text!r}")
    return float(match.group(1))


def _parse_signal_line(line: str, path: Path, warnings: list[str], number: int) -> SignalSpec:
    parts = line.split(maxsplit=8)
    _check_signal_file_name(parts[0], path, number)
    try:
        if len(parts) > 6:
            # The usual full line: no padding list to build.
            core = _signal_fields(parts[1], parts[2], parts[3], parts[4])
            init_value: int | None = int(parts[5])
            checksum: int | None = int(parts[6])
        else:
            core = _signal_fields(*(parts[1:5] + [""] * (5 - len(parts))))
            init_value = int(parts[5]) if len(parts) > 5 else None
            checksum = None
    except (IndexError, ValueError) as exc:
        raise RecordError(
            "bad_header",
            f"header {path}: cannot read signal line {number} (a field is missing or not a number); see the WFDB header "
            "format (FILE FORMAT GAIN(BASELINE)/UNITS ADCRES ADCZERO INIT CHECKSUM BLOCK LEAD)",
        ) from exc
    description = parts[8].strip() if len(parts) > 8 else ""
    if core[9]:  # uncalibrated
        warnings.append(
            f"signal {description or parts[0]} has gain 0 (uncalibrated); read as {WFDB_DEFAULT_GAIN:g}/mV"
        )
    gain = core[4]
    if gain < 0 or not math.isfinite(gain):
        raise RecordError(
            "implausible_gain",
            f"header {path}: lead {description!r} has gain {gain}; a gain must be a positive number of "
            "ADC units per mV: fix the header",
        )
    # tuple.__new__ skips the NamedTuple's keyword-handling constructor (12 calls a record).
    return _new_tuple(SignalSpec, (parts[0], *core[:9], init_value, checksum, description, core[10]))


_new_tuple = tuple.__new__


@functools.lru_cache(maxsize=4096)
def _signal_fields(
    fmt_text: str, gain_text: str, adc_res_text: str, adc_zero_text: str
) -> tuple[int, int, int, int, float, int, str, int, int, bool, float]:
    """The fields of a signal line that repeat from record to record (cached: parsing them is a
    large part of reading a record, and one device writes the same few lines again and again)."""
    if fmt_text.isdigit():
        fmt, spf, skew, offset = int(fmt_text), 1, 0, 0
    else:
        fmt_match = _FORMAT_RE.match(fmt_text)
        if fmt_match is None:
            raise ValueError(f"format {fmt_text!r}")
        fmt = int(fmt_match.group(1))
        spf = int(fmt_match.group(2) or 1)
        skew = int(fmt_match.group(3) or 0)
        offset = int(fmt_match.group(4) or 0)
    gain, baseline, units = WFDB_DEFAULT_GAIN, None, "mV"
    if gain_text:
        value_text, _, units_text = gain_text.partition("/")
        units = units_text or "mV"
        value_text, paren, baseline_text = value_text.partition("(")
        gain = float(value_text)
        if paren:
            baseline = int(baseline_text.rstrip(")"))
    adc_res = int(adc_res_text) if adc_res_text else 0
    adc_zero = int(adc_zero_text) if adc_zero_text else 0
    uncalibrated = gain == 0
    if uncalibrated:
        gain = WFDB_DEFAULT_GAIN
    scale = _UNIT_TO_MV.get(units.lower())
    if scale is None:
        logger.warning("unknown units %r in a signal line, taken as mV", units)
        scale = 1.0
    mv_per_unit = scale / gain if gain > 0 else math.nan
    baseline = adc_zero if baseline is None else baseline
    return fmt, spf, skew, offset, gain, baseline, units, adc_res, adc_zero, uncalibrated, mv_per_unit


def parse_comments(comments: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Read ``Key: value`` header comments (``# Age: 77``, ``#Dx:...``, ``#<age>: 51``) into a dict.

    Keys are lower-cased with ``<>`` stripped; the first occurrence of a key wins.
    """
    out: dict[str, str] = {}
    for comment in comments:
        key, sep, value = comment.partition(":")
        if not sep:
            continue
        key = key.strip().strip("<>").strip().lower()
        if key and key not in out:
            out[key] = value.strip()
    return out


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
    signal_path = header.path.parent / min(files)
    try:
        if simple and signal_path.suffix.lower() == ".mat":
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
            data = b"".join(read_bytes(header.path.parent / name, header.root) for name in sorted(files))
            bits = min((_FORMAT_BITS[spec.fmt] or 0) for spec in header.signals)
            if bits == 0 and header.n_samples is None:
                raise RecordError(
                    "unsupported_format",
                    f"{header.path}: a FLAC-compressed record must give its number of samples in the record "
                    "line (its size cannot be bounded otherwise): add it or re-export in format 16",
                )
            _check_values(
                header.n_samples * header.n_sig if bits == 0 else len(data) * 8 // bits, header.path
            )
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


def _check_length(n_frames: int, header: Header, signal_path: Path) -> None:
    if header.n_samples and n_frames != header.n_samples:
        raise RecordError(
            "length_mismatch",
            f"{signal_path} holds {n_frames} samples per lead but {header.path} says {header.n_samples}; "
            "the header and signal file do not belong together or one was cut: re-export the record",
        )


def _digital_from_dat(data: bytes, header: Header, signal_path: Path, fmt: int) -> np.ndarray:
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
    _check_values(n_frames * header.n_sig, signal_path)
    _check_length(n_frames, header, signal_path)
    digital = np.frombuffer(data, dtype=_NUMPY_FORMATS[fmt], offset=offset).reshape(n_frames, header.n_sig)
    if fmt == 80:
        # Format 80 stores 8-bit samples offset by 128.
        return digital.astype(np.int16) - 128
    return digital


def _digital_from_mat(data: bytes, header: Header, signal_path: Path) -> np.ndarray:
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
    _check_values(mrows * ncols, signal_path)
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


def _digital_from_mat5(data: bytes, header: Header, signal_path: Path) -> np.ndarray:
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
    _check_values(val.size, signal_path)
    _check_length(val.shape[1], header, signal_path)
    return np.ascontiguousarray(val.T)


# MATLAB v5 element types: a matrix, and a zlib-compressed element (which expands to one).
_MI_MATRIX, _MI_COMPRESSED = 14, 15


def _expand_mat5(data: bytes, signal_path: Path) -> bytes:
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

    try:
        record = wfdb.rdrecord(str(header.path.with_suffix("")), physical=False)
    except Exception as exc:  # wfdb raises many types; the message is what helps
        raise RecordError(
            "bad_signal_file",
            f"wfdb could not read {header.path} ({type(exc).__name__}: {exc}); check the header and signal file",
        ) from exc
    digital = record.d_signal
    _check_length(digital.shape[0], header, header.path)
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
    # min() is one cheap pass; the mask is built only for the rare record with gaps.
    if digital.dtype.kind == "i" and digital.dtype.itemsize == 2 and digital.min() == WFDB_INVALID_16:
        physical[(digital == WFDB_INVALID_16).T] = np.nan
    return physical.T


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


# --------------------------------------------------------------------------- annotations

# MIT annotation codes used for ECG delineation (wfdb's ann_label_table).
_ANN_SYMBOLS = {1: "N", 24: "p", 27: "t", 39: "(", 40: ")"}
_SKIP, _NUM, _SUB, _CHN, _AUX = 59, 60, 61, 62, 63


def read_annotations(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Read an MIT-format annotation file (such as LUDB's ``1.v1``).

    Much faster than ``wfdb.rdann`` for LUDB's small delineation files (which use a few codes
    after a leading SKIP); the tests check it against ``wfdb.rdann``.

    Args:
        path: the annotation file.

    Returns:
        (sample indices as int64, symbols) in file order.
    """
    samples, symbols = read_annotation_arrays(path)
    return samples, symbols.tolist()


_SYMBOL_TABLE = np.array([_ANN_SYMBOLS.get(code, f"<{code}>") for code in range(64)])


def read_annotation_arrays(path: str | Path, root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_annotations` with the symbols as a numpy string array (for vectorised use).

    ``root`` confines the file as :func:`read_bytes` does (None: the file's own folder).
    """
    data = read_bytes(path, root)
    words = np.frombuffer(data[: len(data) // 2 * 2], dtype="<u2")
    # Leading SKIP words (LUDB files start with one) move the time origin.
    time = 0
    i = 0
    while i < len(words) and words[i] >> 10 == _SKIP:
        if i + 2 < len(words):
            interval = (int(words[i + 1]) << 16) | int(words[i + 2])
            time += interval - (1 << 32) if interval >= 1 << 31 else interval
        i += 3
    rest = words[i:]
    ends = np.flatnonzero(rest == 0)
    if len(ends):
        rest = rest[: ends[0]]
    codes = rest >> 10
    if not np.any(codes >= _SKIP):
        # Only plain annotations: each time is the running sum of the increments.
        samples = time + np.cumsum(rest & 0x3FF, dtype=np.int64)
        return samples, _SYMBOL_TABLE[codes]
    return _read_annotations_loop(words.tolist())


def _read_annotations_loop(word_list: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The general MIT annotation format (SKIP, AUX, NUM, SUB, CHN anywhere), word by word."""
    samples: list[int] = []
    codes: list[int] = []
    time = 0
    i = 0
    n = len(word_list)
    while i < n:
        word = word_list[i]
        code, value = word >> 10, word & 0x3FF
        i += 1
        if code == 0 and value == 0:
            break
        if code == _SKIP:
            # 32-bit interval in PDP-11 order: high word first.
            if i + 1 < n:
                interval = (word_list[i] << 16) | word_list[i + 1]
                if interval >= 1 << 31:
                    interval -= 1 << 32
                time += interval
            i += 2
        elif code == _AUX:
            i += (value + 1) // 2
        elif code in (_NUM, _SUB, _CHN):
            continue
        else:
            time += value
            samples.append(time)
            codes.append(code)
    return np.asarray(samples, dtype=np.int64), _SYMBOL_TABLE[np.asarray(codes, dtype=np.intp)]


# --------------------------------------------------------------------------- writing


def write_record(
    record_path: str | Path,
    signal: np.ndarray,
    fs: float,
    lead_names: list[str] | tuple[str, ...],
    gain: float = 1000.0,
    comments: list[str] | tuple[str, ...] = (),
) -> Path:
    """Write a WFDB record (format 16 ``.dat`` + ``.hea``) from a signal in mV.

    Args:
        record_path: the record path without extension (``folder/rec1``).
        signal: (n_samples, n_leads) in mV; NaN is written as WFDB's invalid value.
        fs: sampling rate.
        lead_names: one name a column.
        gain: ADC units per mV (values beyond 16 bits are clipped).
        comments: header comment lines without the ``#`` (``"Age: 61"``).

    Returns:
        The header path.
    """
    record_path = Path(record_path)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    digital = np.round(np.nan_to_num(signal, nan=0.0) * gain)
    digital = np.clip(digital, WFDB_INVALID_16 + 1, 32767).astype("<i2")
    digital[np.isnan(signal)] = WFDB_INVALID_16
    digital.tofile(record_path.with_suffix(".dat"))
    name = record_path.name
    lines = [f"{name} {signal.shape[1]} {fs:g} {signal.shape[0]}"]
    for column, lead in enumerate(lead_names):
        first = int(digital[0, column]) if len(digital) else 0
        checksum = int(digital[:, column].astype(np.int64).sum()) & 0xFFFF
        checksum = checksum - 0x10000 if checksum >= 0x8000 else checksum
        lines.append(f"{name}.dat 16 {gain:g}/mV 16 0 {first} {checksum} 0 {lead}")
    lines.extend(f"# {comment}" for comment in comments)
    header = record_path.with_suffix(".hea")
    header.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return header
