"""ECG findings in words and numbers: lead names in text, the SFT rationale built from the measured
findings, and the clinical cut-offs behind the yes/no finding flags the vision pre-training also
learns (:data:`FINDING_FLAGS`)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ecg_r1.data.canonical import LEADS

# Lead names as they appear in reasoning. Word boundaries keep "V1" out of "V10" and "I" out of
# "II"; limb leads are matched case-insensitively (aVR, AVR), "I"/"II"/"III" only in capitals
# so that the pronoun-like "i" of free text is not a lead.
_LEAD_TOKEN_RE = re.compile(
    r"(?<![A-Za-z0-9])(III|II|I|[aA][vV][rRlLfF]|V[1-6])(?:\s*[-\u2013]\s*(V[1-6]))?(?![A-Za-z0-9])"
)
_LEAD_CASE = {name.lower(): name for name in LEADS}


def leads_in_text(text: str) -> set[str]:
    """The standard lead names mentioned in a text, ranges like ``V1-V4`` expanded.

    Limb leads aVR/aVL/aVF match in any case; ``I``, ``II``, ``III`` and ``V1``..``V6`` only as
    written (capitals), so ordinary words are not read as leads.

    Args:
        text: free text, e.g. a think block.

    Returns:
        A set of names from :data:`ecg_r1.data.canonical.LEADS`.

    Example:
        >>> sorted(leads_in_text("TWI in V2-V4 and aVL, not in II"))
        ['II', 'V2', 'V3', 'V4', 'aVL']
    """
    found: set[str] = set()
    for match in _LEAD_TOKEN_RE.finditer(text or ""):
        first, last = _LEAD_CASE[match.group(1).lower()], match.group(2)
        if last and first.startswith("V"):
            lo, hi = sorted((int(first[1:]), int(last[1:])))
            found.update(f"V{i}" for i in range(lo, hi + 1))
        else:
            found.add(first)
            if last:
                found.add(last)
    return found


def parse_leads(twi_leads: str | Iterable[str] | None) -> list[str]:
    """Normalise a ``twi_leads`` value (comma-joined string or list) to lead names in LEADS order.

    Args:
        twi_leads: e.g. ``"V1,V2,V3"``, ``["aVL", "I"]``, "" or None.

    Returns:
        Distinct standard lead names, ordered as in :data:`ecg_r1.data.canonical.LEADS`.

    Raises:
        ValueError: when a name is not one of the 12 standard leads.
    """
    if twi_leads is None:
        return []
    items = twi_leads.split(",") if isinstance(twi_leads, str) else list(twi_leads)
    names = set()
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        name = _LEAD_CASE.get(item.lower())
        if name is None:
            raise ValueError(f"unknown lead name {item!r} in twi_leads; expected names from {LEADS}")
        names.add(name)
    return [lead for lead in LEADS if lead in names]


def format_leads(leads: list[str]) -> str:
    """Write a list of leads compactly, contiguous precordial runs as ranges (``V1-V4``)."""
    limb = [lead for lead in leads if not lead.startswith("V")]
    chest = sorted(int(lead[1:]) for lead in leads if lead.startswith("V"))
    parts = list(limb)
    run: list[int] = []
    for number in [*chest, None]:
        if run and (number is None or number != run[-1] + 1):
            parts.append(f"V{run[0]}-V{run[-1]}" if len(run) >= 3 else ", ".join(f"V{n}" for n in run))
            run = []
        if number is not None:
            run.append(number)
    return ", ".join(parts)


# Territories a clinician names; the rationale says which one the TWI fits, a fact about the
# leads and not a verdict on ischemia.
_TERRITORIES = (
    ("anterior", {"V1", "V2", "V3", "V4"}),
    ("lateral", {"I", "aVL", "V5", "V6"}),
    ("inferior", {"II", "III", "aVF"}),
)


def rationale_from_findings(
    twi_leads: str | Iterable[str] | None, features_row: Mapping[str, Any] | None = None
) -> str:
    """Build a short reasoning text from known or measured findings, for SFT targets.

    The rationale states findings only (leads with TWI, their territory, measured values when
    given); it never states the label, so a model trained on it still has to decide. Only the
    TWI sentence names leads, so a model imitating it is not pushed to name other leads (which
    the grounding reward would count against it).

    Args:
        twi_leads: the leads with TWI (comma-joined string or list), known on simulated cases or
            measured from the signal (``twi_leads`` of :func:`ecg_r1.data.features.measure_features`).
        features_row: optional row of :func:`ecg_r1.data.features.measure_features`; read when present
            (None and NaN skipped): ``hr_bpm``, ``qrs_ms``, ``qt_ms``, ``t_amp_<lead>`` (deepest T
            over the TWI leads), ``t_sym_<lead>`` (mean over the TWI leads), ``st_<lead>`` and
            ``qrs_amp_<lead>`` (extremes over all leads).

    Returns:
        One or a few sentences, e.g. "T-wave inversion in V1-V4 (anterior). Normal rate. Deep
        inverted T waves, symmetric. Narrow QRS. Normal QRS voltage. Normal QT."
    """
    leads = parse_leads(twi_leads)
    if leads:
        lead_set = set(leads)
        territories = [name for name, members in _TERRITORIES if len(lead_set & members) >= 2]
        where = f" ({', '.join(territories)})" if territories else ""
        sentences = [f"T-wave inversion in {format_leads(leads)}{where}."]
    else:
        sentences = ["No lead-level T-wave inversion findings are available."]
    if features_row:
        sentences.extend(_feature_sentences(features_row, leads))
    return " ".join(sentences)


def _number(row: Mapping[str, Any], key: str) -> float | None:
    value = row.get(key)
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if number != number else number


def _over_leads(row: Mapping[str, Any], prefix: str, leads: Iterable[str]) -> list[float]:
    return [v for lead in leads if (v := _number(row, f"{prefix}{lead}")) is not None]


# Findings are stated as the categories a reader names, not as numbers: a small model reads and
# writes "deep" far more reliably than "-0.62 mV", and the categories are what the decision turns
# on. Cut-offs are the usual clinical ones; the T-depth and QTc cut-offs were checked against the
# simulator's own categories (medians of the measured values per category: shallow -0.24, deep
# -0.65, giant -1.37 mV; QTc 396 ms without long QT, 489 ms with it).
_SYMMETRY_RATIO = 1.3  # rise and fall within this ratio of each other: symmetric
_BRADY_BPM, _TACHY_BPM = 60.0, 100.0
_DEEP_T_MV, _GIANT_T_MV = -0.4, -1.0
_ST_DEPRESSION_MV, _ST_ELEVATION_MV = -0.1, 0.1
_WIDE_QRS_MS = 120.0
_HIGH_VOLTAGE_MV = 2.0  # largest QRS peak-to-peak of any lead
_LONG_QTC_MS = 450.0  # Bazett


FINDING_FLAGS: tuple[str, ...] = (
    "bradycardia",
    "tachycardia",
    "deep_t",
    "giant_t",
    "symmetric_t",
    "st_depression",
    "st_elevation",
    "wide_qrs",
    "high_voltage",
    "long_qt",
)
"""The categorical findings of :func:`finding_flags`: what the findings rationale states and what the
vision pre-training learns to see (``ecg_r1.training.vision``)."""


def finding_flags(row: Mapping[str, Any], twi: Iterable[str]) -> dict[str, bool | None]:
    """The categorical findings of a case from its measured features, None where unmeasured.

    Args:
        row: a :func:`ecg_r1.data.features.measure_features` row (missing or NaN values allowed).
        twi: the leads with TWI; T depth and symmetry are read over them (None without any).

    Returns:
        :data:`FINDING_FLAGS` -> True / False / None.
    """
    twi = list(twi)
    flags: dict[str, bool | None] = dict.fromkeys(FINDING_FLAGS)
    rate = _number(row, "hr_bpm")
    if rate is not None:
        flags["bradycardia"], flags["tachycardia"] = rate < _BRADY_BPM, rate > _TACHY_BPM
    if twi and (depths := _over_leads(row, "t_amp_", twi)):
        flags["deep_t"], flags["giant_t"] = min(depths) <= _DEEP_T_MV, min(depths) <= _GIANT_T_MV
    if twi and (ratios := [r for r in _over_leads(row, "t_sym_", twi) if r > 0]):
        ratio = float(np.exp(np.mean(np.log(ratios))))  # geometric mean: ratios are scale-free
        flags["symmetric_t"] = 1 / _SYMMETRY_RATIO <= ratio <= _SYMMETRY_RATIO
    if st := _over_leads(row, "st_", LEADS):
        flags["st_depression"], flags["st_elevation"] = (
            min(st) <= _ST_DEPRESSION_MV,
            max(st) >= _ST_ELEVATION_MV,
        )
    if (qrs := _number(row, "qrs_ms")) is not None:
        flags["wide_qrs"] = qrs >= _WIDE_QRS_MS
    if voltages := _over_leads(row, "qrs_amp_", LEADS):
        flags["high_voltage"] = max(voltages) >= _HIGH_VOLTAGE_MV
    if (qt := _number(row, "qt_ms")) is not None and rate:
        flags["long_qt"] = qt / float(np.sqrt(60.0 / rate)) >= _LONG_QTC_MS
    return flags


def _feature_sentences(row: Mapping[str, Any], twi: list[str]) -> list[str]:
    f = finding_flags(row, twi)
    out = []
    if f["bradycardia"] is not None:
        out.append(
            "Bradycardia." if f["bradycardia"] else "Tachycardia." if f["tachycardia"] else "Normal rate."
        )
    if f["deep_t"] is not None:
        depth = "Giant" if f["giant_t"] else "Deep" if f["deep_t"] else "Shallow"
        shape = "" if f["symmetric_t"] is None else ", symmetric" if f["symmetric_t"] else ", asymmetric"
        out.append(f"{depth} inverted T waves{shape}.")
    if f["st_depression"]:
        out.append("ST depression.")
    if f["st_elevation"]:
        out.append("ST elevation.")
    if f["wide_qrs"] is not None:
        out.append("Wide QRS." if f["wide_qrs"] else "Narrow QRS.")
    if f["high_voltage"] is not None:
        out.append("High QRS voltage." if f["high_voltage"] else "Normal QRS voltage.")
    if f["long_qt"] is not None:
        out.append("Long QT." if f["long_qt"] else "Normal QT.")
    return out
