"""Tolerant parsing of WFDB headers (``.hea``): the record line, the signal lines and the comments.

Takes a header path (and the real path of the folder the record must stay in); gives a
:class:`Header` whose :class:`SignalSpec` per signal carries the storage format, gain, baseline and
the millivolts per ADC unit, or raises :class:`~ecg_r1.data.readers.records.RecordError` with a
short quarantine ``reason`` and a message that says what to do. :func:`parse_comments` reads the
``Key: value`` comments the source layouts (CinC, LUDB) take their metadata from.

Real exports vary in ways the ``wfdb`` package refuses (a record line naming ``E00666.mat``
instead of ``E00666``, ``#Dx:`` without a space, units written ``mv``, a clinical comment in
Windows-1252); this module reads them anyway. The limits a record must keep to (rate, number of
values, known storage formats) live here, where the header states them; ``wfdb_signal`` checks
the signal file against the same limits.
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass, field
from typing import NamedTuple

from ecg_r1.data.canonical import normalize_lead_name
from ecg_r1.data.readers.confined_read import read_text
from ecg_r1.data.readers.records import PATH_ESCAPES_FOLDER, RecordError

# WFDB's default ADC gain when a header gives none or 0 (``DEFGAIN`` in the WFDB library).
WFDB_DEFAULT_GAIN = 200.0
# Extensions a record line sometimes carries although it should not (seen in CinC 2021 files).
_SIGNAL_EXTENSIONS = (".mat", ".dat", ".hea")
# Unit spellings (lower case) converted to millivolts. A lead in any other units is refused as
# ``unknown_units``: its scale would be a guess, and a guess of mV for a file in, say, mmHg or
# counts loads a record with confident but wrong voltages (channels that are no ECG lead, e.g. a
# pressure or respiration signal beside the 12 leads, may have any units: they are not read).
# "NU" (normalised units), written by some exporters for ECG channels in mV, stays mV.
_UNIT_TO_MV = {
    "mv": 1.0, "millivolt": 1.0, "millivolts": 1.0,
    "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "microvolt": 1e-3, "microvolts": 1e-3,
    "v": 1e3, "volt": 1e3, "volts": 1e3,
    "nv": 1e-6, "nanovolt": 1e-6, "nanovolts": 1e-6,
    "nu": 1.0,
}  # fmt: skip
UNKNOWN_UNITS = "unknown_units"
_FORMAT_RE = re.compile(r"^(\d+)(?:x(\d+))?(?::(\d+))?(?:\+(\d+))?$")
_FS_RE = re.compile(r"^([\d.]+(?:[eE][-+]?\d+)?)(?:/[\d.]+)?(?:\(-?[\d.]+\))?$")
# Sampling rates a 12-lead ECG can have: below 50 Hz the QRS is lost; above 20 kHz no ECG device
# records (a rate outside is a broken header, and a tiny rate asks for huge resampling buffers).
MIN_FS, MAX_FS = 50.0, 20_000.0
# Most samples (all leads together) a record may hold: 16.8 M values is 64 MB as float32, about 23
# minutes of 12 leads at 1 kHz; checked before anything is allocated.
MAX_RECORD_VALUES = 1 << 24
# Bits a sample of each WFDB storage format takes (None: FLAC, compressed, size known only from the
# header). Any other format is refused with a message instead of a KeyError deep in wfdb.
FORMAT_BITS: dict[int, int | None] = {
    8: 8, 16: 16, 24: 24, 32: 32, 61: 16, 80: 8, 160: 16, 212: 12, 310: 10, 311: 10,
    508: None, 516: None, 524: None,
}  # fmt: skip
# The digital value each storage format reserves for a missing sample (WFDB's table, as in the
# ``wfdb`` package's ``INVALID_SAMPLE_VALUE``; a test keeps the two equal): the lowest value the
# format can hold. Format 8 (first differences) has none. Readers turn it into NaN, so a record
# with gaps is refused as ``nan_samples`` instead of loading the marker as a voltage (-1.28 mV in
# format 80 at gain 100, -10.24 mV in 212 at 200, -32.77 mV in 16, 160 and 516 at 1000).
INVALID_SAMPLE: dict[int, int | None] = {
    8: None, 16: -(1 << 15), 24: -(1 << 23), 32: -(1 << 31), 61: -(1 << 15), 80: -(1 << 7),
    160: -(1 << 15), 212: -(1 << 11), 310: -(1 << 9), 311: -(1 << 9),
    508: -(1 << 7), 516: -(1 << 15), 524: -(1 << 23),
}  # fmt: skip


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
    """A parsed WFDB header. ``path`` is a string, as given (a ``Path`` made and taken apart for
    each record cost more than parsing half its signal lines)."""

    path: str
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


def parse_header(path: str | os.PathLike[str], root: str | None = None) -> Header:
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
    path = os.fspath(path)
    root = root or os.path.realpath(os.path.dirname(path) or ".")
    try:
        text, encoding = read_text(path, root)
    except FileNotFoundError as exc:
        raise RecordError(
            "missing_header", f"header {path} does not exist; give the path of a .hea file"
        ) from exc
    warnings: list[str] = []
    if encoding != "utf-8":
        warnings.append(f"header is not UTF-8; decoded as {encoding}")
    comments, body = _split_lines(text, path)
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
    file_names: set[str] = set()
    signals = tuple(
        _parse_signal_line(line, path, warnings, number, file_names)
        for number, line in enumerate(signal_lines, start=1)
    )
    _check_units(signals, path)
    _check_formats(signals, path)
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


def _split_lines(text: str, path: str) -> tuple[tuple[str, ...], list[str]]:
    """The header's comments (``#`` and any space after it stripped) and its record and signal
    lines (trailing comments cut off), blank lines skipped.

    Raises:
        RecordError: ``bad_header`` without a record line or with a non-ASCII record or signal line.
    """
    comments = []
    body = []
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line:
            continue
        if line[0] == "#":
            comments.append(line[1:].strip())
        else:
            if "#" in line:
                line = line.split("#", 1)[0].strip()
            if line:
                body.append(line)
    if not body:
        raise RecordError("bad_header", f"header {path} has no record line; it is empty or not a WFDB header")
    for number, line in enumerate(body):
        if not line.isascii():
            raise RecordError(
                "bad_header",
                f"header {path} has non-ASCII characters in {_line_name(number)}; "
                "the record and signal lines must be plain ASCII: re-export the header",
            )
    return tuple(comments), body


def _check_formats(signals: tuple[SignalSpec, ...], path: str) -> None:
    """Refuse a header with a signal in a storage format this reader does not know (see
    :data:`FORMAT_BITS`)."""
    for number, spec in enumerate(signals, start=1):
        if spec.fmt not in FORMAT_BITS:
            what = "means the signal was not stored (a null signal)" if spec.fmt == 0 else "is no WFDB format"
            raise RecordError(
                "unsupported_format",
                f"header {path}: signal line {number} has storage format {spec.fmt}, which {what}; "
                f"re-export the record in format 16 (known formats: {sorted(FORMAT_BITS)})",
            )


def _check_units(signals: tuple[SignalSpec, ...], path: str) -> None:
    """Refuse a header whose ECG leads are in units that are not understood (see ``_UNIT_TO_MV``)."""
    for number, spec in enumerate(signals, start=1):
        if (
            math.isnan(spec.mv_per_unit)
            and spec.gain > 0
            and normalize_lead_name(spec.description) is not None
        ):
            raise RecordError(
                UNKNOWN_UNITS,
                f"header {path}: signal line {number} (an ECG lead) gives units that are not a voltage this "
                "reader knows, so its scale would be a guess; write the units the device recorded in "
                "(mV, uV/µV, V or nV) after the gain, e.g. 1000/mV",
            )


def _line_name(number: int) -> str:
    """How messages name a header line. They never quote it: a message must not repeat what a
    file holds (a header may be any file someone put in the folder)."""
    return "the record line" if number == 0 else f"signal line {number}"


def _check_signal_file_name(name: str, path: str, number: int) -> None:
    """Refuse a signal-file name that points away from the header's folder."""
    if os.path.isabs(name) or ".." in name.split("/"):
        raise RecordError(
            PATH_ESCAPES_FOLDER,
            f"header {path}: signal line {number} names its signal file by an absolute path or with '..'; "
            "a signal file must sit beside its header (or below it): write its plain file name",
        )


def _parse_record_line(line: str, path: str) -> tuple[str, int, float, int | None]:
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
        check_values(n_samples * n_sig, path)
    return name, n_sig, fs, n_samples


def check_values(n_values: int, path: str) -> None:
    """Refuse a record of more than :data:`MAX_RECORD_VALUES` samples before it is allocated.

    Used on the record line's sample count here and on each signal file's size in ``wfdb_signal``.
    """
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


def _parse_signal_line(
    line: str, path: str, warnings: list[str], number: int, file_names: set[str]
) -> SignalSpec:
    """One signal line; ``file_names`` holds the file names already checked (a record's signals
    mostly share one file), and this line's name once it passes."""
    parts = line.split(maxsplit=8)
    if parts[0] not in file_names:
        _check_signal_file_name(parts[0], path, number)
        file_names.add(parts[0])
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
    scale = _UNIT_TO_MV.get(units.lower(), math.nan)  # NaN: not understood (see _check_units)
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
