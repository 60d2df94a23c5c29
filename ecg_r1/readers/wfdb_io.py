"""Tolerant, fast reading of WFDB records: headers, signals and annotation files.

Real exports vary in ways the ``wfdb`` package refuses (a record line naming ``E00666.mat``
instead of ``E00666``, ``#Dx:`` without a space, units written ``mv``, a clinical comment in
Windows-1252). This module reads them anyway and raises :class:`RecordError` with a short
quarantine ``reason`` and a message that says what to do when it cannot.

Speed: a plain ``wfdb.rdrecord`` loop reads about 150 records/s here, most of it Python
overhead. The common formats are read directly with numpy instead: WFDB format 16 / 61 / 80
``.dat`` files and MATLAB v4 ``.mat`` files (PhysioNet/CinC). Anything else (format 212,
multi-segment records, skewed or multi-frequency signals) falls back to ``wfdb.rdsamp``, which
stays the reference the tests and ``benchmarks/bench_ingest.py`` compare against.
"""

from __future__ import annotations

import hashlib
import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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
_GAIN_RE = re.compile(r"^([-+]?[\d.]+(?:[eE][-+]?\d+)?)(?:\((-?\d+)\))?(?:/(\S+))?$")
_FS_RE = re.compile(r"^([\d.]+(?:[eE][-+]?\d+)?)(?:/[\d.]+)?(?:\(-?[\d.]+\))?$")
# Formats read with numpy: dtype of one sample.
_NUMPY_FORMATS = {16: "<i2", 61: ">i2", 80: "u1"}


class RecordError(ValueError):
    """A record cannot be read; ``reason`` is a short quarantine key, the message says what to do."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SignalSpec:
    """One signal line of a WFDB header."""

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


@dataclass(frozen=True)
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


def read_text(path: Path) -> tuple[str, str]:
    """Read a text file as UTF-8, falling back to Windows-1252/Latin-1 for legacy exports.

    Returns:
        (text, encoding used).
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        # cp1252 first: hospital systems on Windows write it; latin-1 decodes any byte.
        try:
            return data.decode("cp1252"), "cp1252"
        except UnicodeDecodeError:
            return data.decode("latin-1"), "latin-1"


def parse_header(path: str | Path) -> Header:
    """Parse a WFDB header file tolerantly.

    Accepted deviations: a record name written with a file extension, comments without a space
    after ``#``, units in any case, gain 0 (WFDB's "uncalibrated", read as 200 units/mV), a
    header that is not UTF-8 in its comments (decoded as cp1252).

    Args:
        path: the ``.hea`` file.

    Returns:
        The parsed header.

    Raises:
        RecordError: ``missing_header`` or ``bad_header`` with what is wrong in the message.
    """
    path = Path(path)
    if not path.is_file():
        raise RecordError("missing_header", f"header {path} does not exist; give the path of a .hea file")
    text, encoding = read_text(path)
    warnings: list[str] = []
    if encoding != "utf-8":
        warnings.append(f"header is not UTF-8; decoded as {encoding}")
    lines = [line.strip() for line in text.splitlines()]
    comments = tuple(line[1:].strip() for line in lines if line.startswith("#"))
    body = [line.split("#", 1)[0].strip() for line in lines if line and not line.startswith("#")]
    body = [line for line in body if line]
    if not body:
        raise RecordError("bad_header", f"header {path} has no record line; it is empty or not a WFDB header")
    for line in body:
        if not line.isascii():
            raise RecordError(
                "bad_header",
                f"header {path} has non-ASCII characters outside comments ({line[:60]!r}); "
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
    signals = tuple(_parse_signal_line(line, path, warnings) for line in signal_lines)
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
    )


def _parse_record_line(line: str, path: Path) -> tuple[str, int, float, int | None]:
    parts = line.split()
    try:
        name = parts[0].split("/")[0]
        for ext in _SIGNAL_EXTENSIONS:
            if name.lower().endswith(ext):
                name = name[: -len(ext)]
        n_sig = int(parts[1])
        fs = 250.0  # WFDB's default when a header gives no rate
        if len(parts) > 2:
            match = _FS_RE.match(parts[2])
            if match is None:
                raise ValueError(f"sampling frequency {parts[2]!r}")
            fs = float(match.group(1))
        n_samples = int(parts[3]) if len(parts) > 3 else None
    except (IndexError, ValueError) as exc:
        raise RecordError(
            "bad_header",
            f"header {path}: cannot read the record line {line!r} ({exc}); it must read "
            "'NAME N_SIGNALS FS N_SAMPLES'",
        ) from exc
    if n_sig <= 0 or fs <= 0:
        raise RecordError("bad_header", f"header {path}: record line {line!r} gives {n_sig} signals at {fs} Hz")
    return name, n_sig, fs, n_samples


def _parse_signal_line(line: str, path: Path, warnings: list[str]) -> SignalSpec:
    parts = line.split(maxsplit=8)
    try:
        fmt_match = _FORMAT_RE.match(parts[1])
        if fmt_match is None:
            raise ValueError(f"format {parts[1]!r}")
        fmt = int(fmt_match.group(1))
        spf = int(fmt_match.group(2) or 1)
        skew = int(fmt_match.group(3) or 0)
        offset = int(fmt_match.group(4) or 0)
        gain, baseline, units = WFDB_DEFAULT_GAIN, None, "mV"
        if len(parts) > 2:
            gain_match = _GAIN_RE.match(parts[2])
            if gain_match is None:
                raise ValueError(f"gain {parts[2]!r}")
            gain = float(gain_match.group(1))
            baseline = int(gain_match.group(2)) if gain_match.group(2) is not None else None
            units = gain_match.group(3) or "mV"
        adc_res = int(parts[3]) if len(parts) > 3 else 0
        adc_zero = int(parts[4]) if len(parts) > 4 else 0
        init_value = int(parts[5]) if len(parts) > 5 else None
        checksum = int(parts[6]) if len(parts) > 6 else None
        description = parts[8].strip() if len(parts) > 8 else ""
    except (IndexError, ValueError) as exc:
        raise RecordError(
            "bad_header",
            f"header {path}: cannot read the signal line {line!r} ({exc}); see the WFDB header "
            "format (FILE FORMAT GAIN(BASELINE)/UNITS ADCRES ADCZERO INIT CHECKSUM BLOCK LEAD)",
        ) from exc
    if gain == 0:
        warnings.append(f"signal {description or parts[0]} has gain 0 (uncalibrated); read as {WFDB_DEFAULT_GAIN:g}/mV")
        gain = WFDB_DEFAULT_GAIN
    if gain < 0 or not np.isfinite(gain):
        raise RecordError(
            "implausible_gain",
            f"header {path}: lead {description!r} has gain {gain}; a gain must be a positive number of "
            "ADC units per mV: fix the header",
        )
    return SignalSpec(
        file_name=parts[0],
        fmt=fmt,
        samples_per_frame=spf,
        skew=skew,
        byte_offset=offset,
        gain=gain,
        baseline=adc_zero if baseline is None else baseline,
        units=units,
        adc_res=adc_res,
        adc_zero=adc_zero,
        init_value=init_value,
        checksum=checksum,
        description=description,
    )


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


def read_signal(header: Header) -> RawSignal:
    """Read a record's signal in millivolts, shape (n_samples, n_sig), float32.

    Args:
        header: the parsed header (its folder holds the signal file).

    Returns:
        The physical signal and its provenance.

    Raises:
        RecordError: ``missing_signal_file``, ``truncated_signal``, ``length_mismatch``,
            ``unsupported_format`` or ``bad_signal_file``.
    """
    files = {spec.file_name for spec in header.signals}
    fmts = {spec.fmt for spec in header.signals}
    simple = (
        len(files) == 1
        and len(fmts) == 1
        and all(spec.samples_per_frame == 1 and spec.skew == 0 for spec in header.signals)
        and len({spec.byte_offset for spec in header.signals}) == 1
    )
    signal_path = header.path.parent / next(iter(sorted(files)))
    if not signal_path.is_file():
        raise RecordError(
            "missing_signal_file",
            f"signal file {signal_path} named by {header.path} does not exist; copy it beside the header",
        )
    fmt = next(iter(fmts))
    if simple and signal_path.suffix.lower() == ".mat":
        data = signal_path.read_bytes()
        digital = _digital_from_mat(data, header, signal_path)
        reader = "numpy"
    elif simple and fmt in _NUMPY_FORMATS:
        data = signal_path.read_bytes()
        digital = _digital_from_dat(data, header, signal_path, fmt)
        reader = "numpy"
    else:
        data = b"".join(sorted((header.path.parent / name).read_bytes() for name in files))
        digital = _digital_from_wfdb(header)
        reader = "wfdb"
    checksum = hashlib.sha256(data).hexdigest()
    physical = _to_physical(digital, header)
    gains = [spec.gain for spec in header.signals]
    return RawSignal(
        signal=physical,
        checksum=checksum,
        gain=float(np.median(gains)),
        reader=reader,
        signal_path=signal_path,
    )


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
    _check_length(n_frames, header, signal_path)
    digital = np.frombuffer(data, dtype=_NUMPY_FORMATS[fmt], offset=offset).reshape(n_frames, header.n_sig)
    if fmt == 80:
        # Format 80 stores 8-bit samples offset by 128.
        return digital.astype(np.int16) - 128
    return digital


def _digital_from_mat(data: bytes, header: Header, signal_path: Path) -> np.ndarray:
    """Read the first matrix of a MATLAB v4 file (PhysioNet/CinC: ``val``, leads x samples)."""
    if data[:6] == b"MATLAB":
        return _digital_from_mat5(signal_path, header)
    if len(data) < 20:
        raise RecordError(
            "truncated_signal", f"{signal_path} has {len(data)} bytes, less than a MATLAB v4 header: copy it again"
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


def _digital_from_mat5(signal_path: Path, header: Header) -> np.ndarray:
    from scipy.io import loadmat

    try:
        matrices = {k: v for k, v in loadmat(signal_path).items() if not k.startswith("__")}
    except Exception as exc:  # scipy raises several types for a bad file
        raise RecordError("bad_signal_file", f"{signal_path}: cannot read MATLAB file ({exc}); re-export it") from exc
    val = matrices.get("val", next(iter(matrices.values()), None))
    if val is None or val.ndim != 2 or val.shape[0] != header.n_sig:
        raise RecordError(
            "shape_mismatch", f"{signal_path}: expected a matrix 'val' of {header.n_sig} rows (leads x samples)"
        )
    _check_length(val.shape[1], header, signal_path)
    return np.ascontiguousarray(val.T)


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


def _to_physical(digital: np.ndarray, header: Header) -> np.ndarray:
    gains = np.array([spec.gain for spec in header.signals], dtype=np.float32)
    baselines = np.array([spec.baseline for spec in header.signals], dtype=np.float32)
    scale = np.array([_unit_scale(spec.units, header) for spec in header.signals], dtype=np.float32)
    physical = digital.astype(np.float32)
    physical -= baselines
    physical *= scale / gains
    if digital.dtype == np.int16 or digital.dtype == np.dtype(">i2"):
        invalid = digital == WFDB_INVALID_16
        if invalid.any():
            physical[invalid] = np.nan
    return physical


def _unit_scale(units: str, header: Header) -> float:
    scale = _UNIT_TO_MV.get(units.lower())
    if scale is None:
        logger.warning("%s: unknown units %r, taken as mV", header.path, units)
        return 1.0
    return scale


# --------------------------------------------------------------------------- annotations

# MIT annotation codes used for ECG delineation (wfdb's ann_label_table).
_ANN_SYMBOLS = {1: "N", 24: "p", 27: "t", 39: "(", 40: ")"}
_SKIP, _NUM, _SUB, _CHN, _AUX = 59, 60, 61, 62, 63


def read_annotations(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """Read an MIT-format annotation file (such as LUDB's ``1.v1``).

    About 100 times faster than ``wfdb.rdann`` for the small delineation files of LUDB (which
    only use a few codes); the tests check it against ``wfdb.rdann``.

    Args:
        path: the annotation file.

    Returns:
        (sample indices as int64, symbols) in file order.
    """
    data = Path(path).read_bytes()
    words = np.frombuffer(data[: len(data) // 2 * 2], dtype="<u2")
    samples: list[int] = []
    symbols: list[str] = []
    time = 0
    i = 0
    n = len(words)
    while i < n:
        word = int(words[i])
        code, value = word >> 10, word & 0x3FF
        i += 1
        if code == 0 and value == 0:
            break
        if code == _SKIP:
            # 32-bit interval in PDP-11 order: high word first.
            if i + 1 < n:
                interval = (int(words[i]) << 16) | int(words[i + 1])
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
            symbols.append(_ANN_SYMBOLS.get(code, f"<{code}>"))
    return np.asarray(samples, dtype=np.int64), symbols
