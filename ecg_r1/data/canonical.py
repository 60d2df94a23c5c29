"""The canonical signal form every reader produces and every later stage reads.

Rules (also in docs/data.md, "Canonical form"):

* **Leads**: the 12 standard leads in the fixed order of :data:`LEADS`. Lead names are matched
  case-insensitively (``AVR``, ``avr`` and ``aVR`` are the same lead). If lead III, aVR, aVL or aVF
  is missing but I and II are present, the missing limb leads are derived exactly from
  Einthoven's and Goldberger's relations (III = II - I, aVR = -(I + II)/2, aVL = I - II/2,
  aVF = II - I/2) and the record's provenance says so. Any other missing lead is an error.
* **Units**: millivolts (readers convert from ADC units with the header's gain and baseline, and
  from microvolts where the header says so).
* **Rate**: 500 Hz. Other rates are resampled with a polyphase anti-aliasing filter
  (``scipy.signal.resample_poly``) by the exact rational ratio.
* **Duration**: 10 s (5,000 samples). Longer records keep their first 10 s (annotations and
  reports refer to the start of a recording). Records of at least :data:`MIN_DURATION_S` but
  shorter than 10 s are padded at the end with each lead's median (its baseline), so no step
  is introduced; the number of padded samples is recorded. Shorter records are refused.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from scipy.signal import resample_poly

LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
FS: int = 500
DURATION_S: float = 10.0
N_SAMPLES: int = int(FS * DURATION_S)
MIN_DURATION_S: float = 8.0
LIMB_DERIVED = ("III", "aVR", "aVL", "aVF")

_LEAD_BY_KEY = {name.lower(): name for name in LEADS}


class CanonicalError(ValueError):
    """A record cannot be brought to the canonical form; ``reason`` is a short quarantine key."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class CanonicalSignal:
    """A record in canonical form with what was done to get there."""

    signal: np.ndarray  # float32, shape (12, N_SAMPLES), mV, rows in LEADS order
    source_fs: float
    derived_leads: tuple[str, ...]
    cropped_samples: int  # samples dropped after 10 s, at the canonical rate
    padded_samples: int  # samples added at the end, at the canonical rate


def normalize_lead_name(name: str) -> str | None:
    """Return the standard spelling of a lead name, or None when it is not one of the 12."""
    return _LEAD_BY_KEY.get(name.strip().lower())


def canonicalize(signal: np.ndarray, fs: float, lead_names: list[str]) -> CanonicalSignal:
    """Bring a physical-unit signal of shape (n_samples, n_leads) to the canonical form.

    Raises:
        CanonicalError: with reason ``duplicate_leads``, ``unknown_leads``, ``missing_leads`` or
            ``too_short``.
    """
    if signal.ndim != 2 or signal.shape[1] != len(lead_names):
        raise CanonicalError(
            "shape_mismatch",
            f"signal has shape {signal.shape} but the header names {len(lead_names)} leads; "
            "check that the header and the signal file belong together",
        )
    columns, unknown, repeated = _lead_columns(tuple(lead_names))
    if repeated:
        raise CanonicalError(
            "duplicate_leads",
            f"lead(s) {repeated} appear more than once in the header (names {lead_names}); which column is "
            "the real lead cannot be told: rename or drop the extra column",
        )
    duration = signal.shape[0] / fs
    if all(lead in columns for lead in LEADS):
        # Fast path (nearly every record): no float64 round trip; when the reader hands a view of
        # lead-major memory in standard order (the WFDB readers do) no copy at all.
        order = [columns[lead] for lead in LEADS]
        lead_major = signal.T
        stacked = (
            lead_major
            if order == list(range(len(LEADS))) and signal.shape[1] == len(LEADS)
            else np.take(lead_major, order, axis=0)
        )
        derived: tuple[str, ...] = ()
    else:
        by_lead = {lead: signal[:, column].astype(np.float64) for lead, column in columns.items()}
        derived = _derive_limb_leads(by_lead)
        missing = [lead for lead in LEADS if lead not in by_lead]
        if missing:
            reason = "unknown_leads" if unknown else "missing_leads"
            raise CanonicalError(
                reason,
                f"leads {missing} are missing (header names {lead_names}"
                + (f"; not standard lead names: {unknown}" if unknown else "")
                + "); a record needs the 12 standard leads, or I and II plus V1-V6 so the other "
                "limb leads can be derived: rename the leads in the header to I, II, III, aVR, aVL, aVF, V1-V6",
            )
        stacked = np.stack([by_lead[lead] for lead in LEADS])
    if duration < MIN_DURATION_S:
        raise CanonicalError(
            "too_short",
            f"record lasts {duration:.2f} s; at least {MIN_DURATION_S:g} s are needed for a 10 s page",
        )
    resampled = resample_to(stacked.astype(np.float64), fs, FS) if fs != FS else stacked
    cropped = max(0, resampled.shape[1] - N_SAMPLES)
    padded = max(0, N_SAMPLES - resampled.shape[1])
    out = resampled[:, :N_SAMPLES]
    if padded:
        baseline = np.median(out, axis=1, keepdims=True)
        out = np.concatenate([out, np.repeat(baseline, padded, axis=1)], axis=1)
    return CanonicalSignal(
        signal=np.ascontiguousarray(out, dtype=np.float32),
        source_fs=float(fs),
        derived_leads=derived,
        cropped_samples=cropped,
        padded_samples=padded,
    )


@functools.lru_cache(maxsize=1024)
def _lead_columns(lead_names: tuple[str, ...]) -> tuple[dict[str, int], list[str], list[str]]:
    """Standard lead -> its column, the names that are no standard lead, and the standard leads
    named twice (cached: records from one device repeat the same names; callers must not modify
    the result)."""
    columns: dict[str, int] = {}
    unknown = []
    repeated = []
    for column, name in enumerate(lead_names):
        standard = normalize_lead_name(name)
        if standard is None:
            unknown.append(name)
        elif standard in columns:
            repeated.append(standard)
        else:
            columns[standard] = column
    return columns, unknown, repeated


def resample_to(signal: np.ndarray, fs_in: float, fs_out: float) -> np.ndarray:
    """Resample along the last axis by the exact rational ratio fs_out / fs_in."""
    if fs_in == fs_out:
        return signal
    ratio = Fraction(fs_out / fs_in).limit_denominator(1000)
    return resample_poly(signal, ratio.numerator, ratio.denominator, axis=-1)


def _derive_limb_leads(by_lead: dict[str, np.ndarray]) -> tuple[str, ...]:
    if not any(lead not in by_lead for lead in LIMB_DERIVED) or "I" not in by_lead or "II" not in by_lead:
        return ()
    lead_i, lead_ii = by_lead["I"], by_lead["II"]
    formulas = {
        "III": lambda: lead_ii - lead_i,
        "aVR": lambda: -(lead_i + lead_ii) / 2,
        "aVL": lambda: lead_i - lead_ii / 2,
        "aVF": lambda: lead_ii - lead_i / 2,
    }
    derived = tuple(lead for lead in LIMB_DERIVED if lead not in by_lead)
    for lead in derived:
        by_lead[lead] = formulas[lead]()
    return derived
