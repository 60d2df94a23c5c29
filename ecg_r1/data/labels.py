"""Label rules as data: TWI cohort membership and ischemic / non-ischemic / unknown labels.

The rules live in ``ecg_r1/configs/labels.yaml`` (documented there and in docs/data.md); this
module loads them and applies them to each source's codes. Every function returns the raw
codes it decided from, which the cohort keeps in ``raw_codes``. It is also the label vocabulary
(:data:`ISCHEMIC`, :data:`NON_ISCHEMIC`, :data:`UNKNOWN`, :data:`LABEL_WORDS`): no other module
spells a label.

(About 450 lines: the rules of every source share :class:`LabelRules` and the vocabulary, and a
reader of one source's rules should see the others beside it.)
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ecg_r1.data.canonical import LEADS, normalize_lead_name
from ecg_r1.data.yaml_config import load_yaml_mapping

logger = logging.getLogger(__name__)

DEFAULT_RULES = Path(__file__).resolve().parents[1] / "configs" / "labels.yaml"
# The label vocabulary: every module that writes or reads a cohort label uses these names.
ISCHEMIC, NON_ISCHEMIC, UNKNOWN = "ischemic", "non-ischemic", "unknown"
LABELS: tuple[str, ...] = (ISCHEMIC, NON_ISCHEMIC, UNKNOWN)
KNOWN_LABELS: tuple[str, ...] = (ISCHEMIC, NON_ISCHEMIC)  # the cases a model is trained and scored on


@dataclass(frozen=True)
class Decision:
    """The outcome of the rules for one record."""

    twi: bool
    label: str
    raw_codes: str  # what the decision was made from, as the source writes it
    twi_leads: tuple[str, ...] = ()
    unrecognised: tuple[str, ...] = ()  # codes the rules do not understand (not used for the label)


@dataclass(frozen=True)
class TwiMeasurement:
    """Thresholds for measuring TWI from annotated T peaks (LUDB)."""

    upright_leads: tuple[str, ...]
    min_depth_mv: float
    min_fraction: float
    min_leads: int
    baseline_window_ms: float


@dataclass(frozen=True)
class LabelRules:
    """The parsed ``labels.yaml``; build it with :func:`load_rules`."""

    cinc_twi: frozenset[str]
    cinc_ischemic: frozenset[str]
    cinc_unknown: frozenset[str]
    cinc_abbreviations: Mapping[str, str]  # upper-cased abbreviation -> SNOMED CT code
    ptbxl_twi: frozenset[str]
    ptbxl_ischemic: frozenset[str]
    ptbxl_ischemic_classes: frozenset[str]
    ptbxl_min_likelihood: float
    ptbxl_unknown: frozenset[str]
    ludb_ischemic_prefixes: tuple[str, ...]
    ludb_unknown_prefixes: tuple[str, ...]
    ludb_twi: TwiMeasurement
    manifest_twi_default: bool
    source: str = "<defaults>"
    ptbxl_resolved: frozenset[str] = field(default=frozenset())
    # Every statement of scp_statements.csv: a code outside it is not understood (empty: no table).
    ptbxl_known: frozenset[str] = field(default=frozenset())

    def with_ptbxl_statements(self, statements_csv: Path | None) -> LabelRules:
        """Resolve ``diagnostic_classes`` (e.g. MI) to statements with PTB-XL's statement table.

        Args:
            statements_csv: ``scp_statements.csv``; None keeps only the listed statements.

        Returns:
            Rules whose ischemic PTB-XL set includes every statement of those classes.
        """
        resolved = set(self.ptbxl_ischemic)
        known: set[str] = set()
        if statements_csv is not None and statements_csv.is_file():
            with statements_csv.open(newline="", encoding="utf-8") as handle:
                reader = csv.reader(handle)
                header = next(reader)
                # The first header cell is empty in PhysioNet's release (the statement code column).
                klass = header.index("diagnostic_class")
                for row in reader:
                    if row:
                        known.add(row[0])
                    if row and row[klass] in self.ptbxl_ischemic_classes:
                        resolved.add(row[0])
        elif self.ptbxl_ischemic_classes:
            logger.warning(
                "no scp_statements.csv: PTB-XL ischemic statements of classes %s are not resolved",
                sorted(self.ptbxl_ischemic_classes),
            )
        return LabelRules(
            **{**self.__dict__, "ptbxl_resolved": frozenset(resolved), "ptbxl_known": frozenset(known)}
        )


def load_rules(path: Path | None = None) -> LabelRules:
    """Load label rules from YAML (the packaged ``labels.yaml`` when ``path`` is None).

    Args:
        path: a rules file of the same shape as ``ecg_r1/configs/labels.yaml``.

    Returns:
        The rules.

    Raises:
        ConfigFileError: the file cannot be read or is not a YAML mapping (one line, naming it).
        ValueError: a required key is missing or a value is of the wrong kind, naming the file.
    """
    path = Path(path) if path is not None else DEFAULT_RULES
    config = load_yaml_mapping(path)
    try:
        cinc, ptbxl, ludb = config["cinc"], config["ptbxl"], config["ludb"]
        cinc_twi = set(map(str, cinc["twi"]["codes"]))
        if cinc["twi"].get("include_t_wave_abnormal", False):
            cinc_twi |= set(map(str, cinc["twi"].get("t_wave_abnormal_codes", [])))
        ptbxl_twi = set(ptbxl["twi"]["statements"])
        if ptbxl["twi"].get("include_t_wave_abnormal", False):
            ptbxl_twi |= set(ptbxl["twi"].get("t_wave_abnormal_statements", []))
        measure = ludb["twi_measurement"]
        upright = tuple(_standard_lead(name) for name in measure["upright_leads"])
        rules = LabelRules(
            cinc_twi=frozenset(cinc_twi),
            cinc_ischemic=frozenset(map(str, cinc["ischemic"])),
            cinc_unknown=frozenset(map(str, cinc.get("unknown") or [])),
            cinc_abbreviations={str(k).upper(): str(v) for k, v in (cinc.get("abbreviations") or {}).items()},
            ptbxl_twi=frozenset(ptbxl_twi),
            ptbxl_ischemic=frozenset(ptbxl["ischemic"]["statements"]),
            ptbxl_ischemic_classes=frozenset(ptbxl["ischemic"].get("diagnostic_classes") or []),
            ptbxl_min_likelihood=float(ptbxl["ischemic"].get("min_likelihood", 0)),
            ptbxl_unknown=frozenset((ptbxl.get("unknown") or {}).get("statements") or []),
            ludb_ischemic_prefixes=tuple(p.lower() for p in ludb["ischemic_prefixes"]),
            ludb_unknown_prefixes=tuple(p.lower() for p in ludb.get("unknown_prefixes") or []),
            ludb_twi=TwiMeasurement(
                upright_leads=upright,
                min_depth_mv=float(measure["min_depth_mv"]),
                min_fraction=float(measure["min_fraction"]),
                min_leads=int(measure["min_leads"]),
                baseline_window_ms=float(measure.get("baseline_window_ms", 20)),
            ),
            manifest_twi_default=bool((config.get("manifest") or {}).get("twi_default", True)),
            source=str(path),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"label rules {path}: missing or malformed key {exc}; start from ecg_r1/configs/labels.yaml"
        ) from exc
    except ValueError as exc:  # a value of the wrong kind (a word where a number belongs)
        raise ValueError(f"label rules {path}: {exc}; start from ecg_r1/configs/labels.yaml") from exc
    return rules


def _standard_lead(name: str) -> str:
    standard = normalize_lead_name(str(name))
    if standard is None:
        raise ValueError(f"{name!r} is not one of the 12 leads {LEADS}")
    return standard


# --------------------------------------------------------------------------- CinC


def parse_dx(value: str | None) -> list[str]:
    """Split a CinC ``Dx`` comment (``"164934002,426783006"``; also ``;`` or spaces) into codes."""
    if not value:
        return []
    return value.replace(";", ",").replace(",", " ").split()


# Verhoeff's dihedral-group tables: the check digit every SNOMED CT identifier ends with.
_VERHOEFF_D = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 2, 3, 4, 0, 6, 7, 8, 9, 5),
    (2, 3, 4, 0, 1, 7, 8, 9, 5, 6),
    (3, 4, 0, 1, 2, 8, 9, 5, 6, 7),
    (4, 0, 1, 2, 3, 9, 5, 6, 7, 8),
    (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
    (6, 5, 9, 8, 7, 1, 0, 4, 3, 2),
    (7, 6, 5, 9, 8, 2, 1, 0, 4, 3),
    (8, 7, 6, 5, 9, 3, 2, 1, 0, 4),
    (9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
)
_VERHOEFF_P = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 5, 7, 6, 2, 8, 3, 0, 9, 4),
    (5, 8, 0, 3, 7, 9, 6, 1, 4, 2),
    (8, 9, 1, 6, 0, 4, 3, 5, 2, 7),
    (9, 4, 5, 3, 1, 2, 6, 8, 7, 0),
    (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
    (2, 7, 9, 3, 8, 0, 6, 4, 1, 5),
    (7, 0, 4, 6, 9, 1, 3, 2, 5, 8),
)


def is_snomed_id(code: str) -> bool:
    """True for a well-formed SNOMED CT identifier: 6-18 digits ending in a valid Verhoeff check
    digit. A mistyped or made-up number fails the check, so it is not taken for a diagnosis."""
    if not (6 <= len(code) <= 18 and code.isascii() and code.isdigit()):
        return False
    check = 0
    for position, digit in enumerate(reversed(code)):
        check = _VERHOEFF_D[check][_VERHOEFF_P[position % 8][int(digit)]]
    return check == 0


def label_cinc(codes: Sequence[str], rules: LabelRules) -> Decision:
    """Apply the CinC rules to a record's ``Dx`` codes (SNOMED CT, or the abbreviations of older
    headers mapped by ``cinc.abbreviations``).

    Only understood codes decide: anything else is returned in ``unrecognised``, and a record
    with no understood code is ``unknown`` (never non-ischemic: nobody said it was).

    Args:
        codes: the record's codes as written.
        rules: the label rules.

    Returns:
        The decision; ``raw_codes`` is the comma-joined codes as written.
    """
    present: set[str] = set()
    unrecognised: list[str] = []
    for code in codes:
        snomed = code if is_snomed_id(code) else rules.cinc_abbreviations.get(code.upper())
        if snomed is None:
            unrecognised.append(code)
        else:
            present.add(snomed)
    return Decision(
        twi=bool(present & rules.cinc_twi),
        label=_decide(bool(present & rules.cinc_ischemic), bool(present & rules.cinc_unknown), bool(present)),
        raw_codes=",".join(codes),
        unrecognised=tuple(unrecognised),
    )


def _decide(ischemic: bool, unknown: bool, understood: bool) -> str:
    """The decision order every source follows (see ``labels.yaml``)."""
    if ischemic:
        return ISCHEMIC
    if unknown or not understood:
        return UNKNOWN
    return NON_ISCHEMIC


# --------------------------------------------------------------------------- PTB-XL


def label_ptbxl(scp_codes: Mapping[str, float], rules: LabelRules) -> Decision:
    """Apply the PTB-XL rules to a record's ``scp_codes`` (statement -> likelihood 0-100).

    A likelihood of 0 means "not given" in PTB-XL and counts as present.

    Args:
        scp_codes: statement to likelihood.
        rules: the label rules (resolve classes first with :meth:`LabelRules.with_ptbxl_statements`).

    Returns:
        The decision; ``raw_codes`` is ``STATEMENT:likelihood`` comma-joined.
    """
    ischemic_set = rules.ptbxl_resolved or rules.ptbxl_ischemic
    unrecognised = tuple(c for c in scp_codes if rules.ptbxl_known and c not in rules.ptbxl_known)
    understood = {code: lk for code, lk in scp_codes.items() if code not in unrecognised}
    twi = any(code in rules.ptbxl_twi for code in understood)
    ischemic = {code: lk for code, lk in understood.items() if code in ischemic_set}
    confident = [lk for lk in ischemic.values() if lk == 0 or lk >= rules.ptbxl_min_likelihood]
    # An ischemic statement below the likelihood threshold makes the record unknown.
    unknown = bool(ischemic) or any(code in rules.ptbxl_unknown for code in understood)
    raw = ",".join(f"{code}:{lk:g}" for code, lk in scp_codes.items())
    return Decision(
        twi=twi,
        label=_decide(bool(confident), unknown, bool(understood)),
        raw_codes=raw,
        unrecognised=unrecognised,
    )


# --------------------------------------------------------------------------- LUDB


def label_ludb_diagnoses(diagnoses: Sequence[str], rules: LabelRules) -> str:
    """Ischemic / non-ischemic / unknown from LUDB diagnosis lines (``"Ischemia: inferior wall"``)."""
    lowered = [d.strip().lower() for d in diagnoses if d.strip()]
    return _decide(
        any(d.startswith(rules.ludb_ischemic_prefixes) for d in lowered),
        any(d.startswith(rules.ludb_unknown_prefixes) for d in lowered),
        bool(lowered),
    )


def t_wave_amplitudes(
    signal: np.ndarray, samples: np.ndarray, symbols: Sequence[str], fs: float, baseline_window_ms: float
) -> np.ndarray:
    """Amplitude (mV) of each annotated T peak relative to the PR baseline of its beat.

    The baseline is the mean of the ``baseline_window_ms`` before the QRS onset (the ``(``
    just before the ``N`` peak) of the beat the T wave follows; T waves without such an onset,
    or whose onset lies within the first window, are skipped.

    Args:
        signal: one lead in mV, 1-D.
        samples: annotation sample indices (LUDB delineation: ``(``, ``p``/``N``/``t``, ``)``).
        symbols: annotation symbols, same length.
        fs: sampling rate of ``signal`` and ``samples``.
        baseline_window_ms: length of the window before the QRS onset averaged as the baseline.

    Returns:
        One amplitude per T peak that has a preceding QRS onset.
    """
    return t_wave_amplitudes_by_lead(signal[:, None], [(0, samples, symbols)], fs, baseline_window_ms)[0]


def t_wave_amplitudes_by_lead(
    signal: np.ndarray,
    annotations: Sequence[tuple[int, np.ndarray, Sequence[str]]],
    fs: float,
    baseline_window_ms: float,
) -> list[np.ndarray]:
    """:func:`t_wave_amplitudes` for several leads at once (one vectorised pass for a record).

    Args:
        signal: (n_samples, n_leads) in mV.
        annotations: per lead, (column of ``signal``, sample indices, symbols).
        fs: sampling rate.
        baseline_window_ms: baseline window before the QRS onset.

    Returns:
        The amplitudes of each entry of ``annotations``, in order.
    """
    if not annotations:
        return []
    window = max(1, round(baseline_window_ms * fs / 1000))
    lengths = [len(a[1]) for a in annotations]
    samples = np.concatenate([np.asarray(a[1], dtype=np.int64) for a in annotations])
    symbols = np.concatenate([np.asarray(a[2], dtype="<U3") for a in annotations])
    lead_of = np.repeat(np.arange(len(annotations)), lengths)
    qrs = np.flatnonzero(symbols == "N")
    t_peaks = np.flatnonzero(symbols == "t")
    empty = [np.zeros(0) for _ in annotations]
    if len(qrs) == 0 or len(t_peaks) == 0:
        return empty
    # The QRS onset is the "(" just before the QRS peak, in the same lead; -1 where none was marked.
    before = np.maximum(qrs - 1, 0)
    has_onset = (qrs > 0) & (symbols[before] == "(") & (lead_of[before] == lead_of[qrs])
    onsets = np.where(has_onset, samples[before], -1)
    # Each T belongs to the last QRS annotated before it in the same lead.
    beat = np.searchsorted(qrs, t_peaks) - 1
    valid = beat >= 0
    valid[valid] &= lead_of[qrs[beat[valid]]] == lead_of[t_peaks[valid]]
    t_peaks, beat = t_peaks[valid], beat[valid]
    onset, peak, lead = onsets[beat], samples[t_peaks], lead_of[t_peaks]
    n = signal.shape[0]
    keep = (onset >= window) & (onset < n) & (peak >= 0) & (peak < n)
    onset, peak, lead = onset[keep], peak[keep], lead[keep]
    column = np.array([a[0] for a in annotations])[lead]
    baseline = signal[onset[:, None] - window + np.arange(window), column[:, None]].mean(
        axis=1, dtype=np.float64
    )
    amplitudes = signal[peak, column].astype(np.float64) - baseline
    return [amplitudes[lead == index] for index in range(len(annotations))]


def measure_twi(
    lead_amplitudes: Mapping[str, np.ndarray], rules: LabelRules
) -> tuple[bool, tuple[str, ...], str]:
    """Decide TWI from per-lead T amplitudes (mV) with the LUDB measurement rules.

    Args:
        lead_amplitudes: standard lead name to the amplitudes of its annotated T waves.
        rules: the label rules.

    Returns:
        (in the TWI cohort, inverted upright leads in LEADS order, a raw-codes text such as
        ``"T-:V4=-0.21,V5=-0.18"`` giving each inverted lead's median amplitude).
    """
    measure = rules.ludb_twi
    inverted = []
    for lead in LEADS:
        amps = lead_amplitudes.get(lead)
        if lead not in measure.upright_leads or amps is None or len(amps) == 0:
            continue
        if np.mean(amps <= -measure.min_depth_mv) >= measure.min_fraction:
            inverted.append(lead)
    detail = ",".join(f"{lead}={np.median(lead_amplitudes[lead]):.2f}" for lead in inverted)
    return len(inverted) >= measure.min_leads, tuple(inverted), f"T-:{detail}" if inverted else "T-:none"


# --------------------------------------------------------------------------- manifest

# How people write a label (manifests, reward inputs) -> the cohort label.
LABEL_WORDS: dict[str, str] = {
    "ischemic": ISCHEMIC,
    "ischaemic": ISCHEMIC,
    "yes": ISCHEMIC,
    "y": ISCHEMIC,
    "true": ISCHEMIC,
    "1": ISCHEMIC,
    "non-ischemic": NON_ISCHEMIC,
    "non-ischaemic": NON_ISCHEMIC,
    "nonischemic": NON_ISCHEMIC,
    "non_ischemic": NON_ISCHEMIC,
    "no": NON_ISCHEMIC,
    "n": NON_ISCHEMIC,
    "false": NON_ISCHEMIC,
    "0": NON_ISCHEMIC,
    "unknown": UNKNOWN,
    "": UNKNOWN,
    "na": UNKNOWN,
    "nan": UNKNOWN,
    "none": UNKNOWN,
}
_BOOL_WORDS = {
    "true": True,
    "yes": True,
    "y": True,
    "1": True,
    "false": False,
    "no": False,
    "n": False,
    "0": False,
}


def parse_manifest_label(value: str | None) -> str:
    """Normalise a manifest ``label`` cell; raises ValueError naming the accepted values."""
    key = (value or "").strip().lower()
    if key not in LABEL_WORDS:
        raise ValueError(f"label {value!r} is not one of ischemic, non-ischemic, unknown (or yes/no, 1/0)")
    return LABEL_WORDS[key]


def parse_manifest_twi(value: str | None, twi_leads: Iterable[str], rules: LabelRules) -> bool:
    """Normalise a manifest ``twi`` cell; empty means: TWI if leads are given, else the rules' default."""
    key = (value or "").strip().lower()
    if key == "":
        return bool(list(twi_leads)) or rules.manifest_twi_default
    if key not in _BOOL_WORDS:
        raise ValueError(f"twi {value!r} is not true/false (or yes/no, 1/0)")
    return _BOOL_WORDS[key]
