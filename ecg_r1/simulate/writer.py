"""Writing a simulated hospital export: WFDB records, ``manifest.csv``, ``truth.parquet``, ``summary.json``.

Records are WFDB format 16 (interleaved little-endian 16-bit samples, one ``.dat`` and one ``.hea``
per record), byte-for-byte what ``wfdb.wrsamp(..., fmt=['16'] * 12)`` writes (a test checks it).
The header is formatted here rather than by ``wrsamp`` because ``wrsamp`` validates every header
field through pandas and spends about 25 ms a record doing so, which would make a paper-sized
cohort take minutes; the samples are the same.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Each hospital's device spells lead names its own way (the readers normalise them).
LEAD_SPELLINGS: dict[str, tuple[str, ...]] = {
    "standard": ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"),
    "upper": ("I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6"),
    "lower": ("i", "ii", "iii", "avr", "avl", "avf", "v1", "v2", "v3", "v4", "v5", "v6"),
}
INT16_MAX = 32767


def to_adc(signal_mv: np.ndarray, gain: float) -> np.ndarray:
    """Physical (n_leads, n_samples) mV to (n_samples, n_leads) int16 ADC units, rounding like wfdb.

    Raises:
        ValueError: when a sample does not fit 16 bits at this gain (lower the gain).
    """
    adc = np.rint(signal_mv.T * gain)
    if np.abs(adc).max(initial=0) > INT16_MAX:
        raise ValueError(
            f"signal exceeds the 16-bit range at gain {gain} adu/mV (peak {np.abs(signal_mv).max():.1f} mV); "
            "use a lower adc_gain"
        )
    return adc.astype(np.int16)


def _fmt_gain(gain: float) -> str:
    # wfdb writes gains through repr of a float: 1000.0, 200.0
    return repr(float(gain))


def write_wfdb(
    record_path: Path, adc: np.ndarray, fs: float, gain: float, sig_names: tuple[str, ...]
) -> None:
    """Write one record as ``record_path.hea`` + ``record_path.dat`` (WFDB format 16, baseline 0, mV).

    Args:
        record_path: path without suffix; its name is the record name.
        adc: (n_samples, n_leads) int16 samples.
        fs: sampling rate (Hz).
        gain: ADC units per mV.
        sig_names: lead names as the device writes them.
    """
    name = record_path.name
    n_samples, n_sig = adc.shape
    checksum = (adc.astype(np.int64).sum(axis=0) % 65536).astype(int)
    lines = [f"{name} {n_sig} {fs:g} {n_samples}"]
    g = _fmt_gain(gain)
    for ch in range(n_sig):
        lines.append(f"{name}.dat 16 {g}(0)/mV 16 0 {int(adc[0, ch])} {checksum[ch]} 0 {sig_names[ch]}")
    record_path.with_suffix(".hea").write_text("\n".join(lines) + "\n")
    adc.astype("<i2").tofile(record_path.with_suffix(".dat"))
