"""Writing WFDB records (format 16 ``.dat`` + ``.hea``): the inverse of ``wfdb_header`` + ``wfdb_signal``.

Takes a signal in mV with its rate, lead names and header comments; gives the header path of
the record written. Used by the tests and benchmarks to build records (clean ones, and ones they
then damage on purpose): NaN is written as WFDB's invalid sample and values past 16 bits are
clipped, so a test can write what a device would. The simulator writes its exports with its own
writer (:mod:`ecg_r1.simulate.writer`), which matches ``wfdb.wrsamp`` byte for byte and refuses a
sample that does not fit instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ecg_r1.data.readers.wfdb_header import INVALID_SAMPLE

# Format 16's missing-sample marker, what a NaN is written as.
_INVALID_16 = INVALID_SAMPLE[16]


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
    digital = np.clip(digital, _INVALID_16 + 1, 32767).astype("<i2")
    digital[np.isnan(signal)] = _INVALID_16
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
