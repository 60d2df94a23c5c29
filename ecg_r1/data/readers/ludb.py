"""LUDB layout: ``ludb.csv`` + ``data/N.hea``/``N.dat`` + per-lead annotation files ``N.i`` ... ``N.v6``.

* record id: ``<folder name>/<N>``; patient id: the record id (one record a subject).
* hospital: ``ludb-nizhny-novgorod`` (one site); device: Schiller Cardiovit AT-101.
* age/sex: ``#<age>:``/``#<sex>:`` header comments; diagnoses: the other header comments
  (the same text as ``ludb.csv``), e.g. ``Ischemia: inferior wall``.
* label: ischemic from the ischemia diagnoses (``ludb`` rules of ``labels.yaml``).
* TWI: measured from the cardiologists' T-wave annotations (see ``labels.yaml``,
  ``ludb.twi_measurement``); ``twi_leads`` are the inverted leads where T is normally upright.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ecg_r1.data.canonical import normalize_lead_name
from ecg_r1.data.labels import LabelRules, label_ludb_diagnoses, measure_twi, t_wave_amplitudes_by_lead
from ecg_r1.data.readers.cinc import parse_age, parse_sex
from ecg_r1.data.readers.records import RecordRef
from ecg_r1.data.readers.wfdb_annotations import read_annotation_arrays
from ecg_r1.data.readers.wfdb_header import Header, parse_comments

logger = logging.getLogger(__name__)

HOSPITAL = "ludb-nizhny-novgorod"
DEVICE = "Schiller Cardiovit AT-101"
TABLE_FILE = "ludb.csv"


def is_ludb(root: Path) -> bool:
    """A folder is LUDB when it has ``ludb.csv`` or headers with per-lead annotation files."""
    if (root / TABLE_FILE).is_file():
        return True
    folder = root / "data" if (root / "data").is_dir() else root
    # min, not sorted()[0]: the same first header without sorting thousands of paths.
    first = min(folder.glob("*.hea"), default=None)
    return first is not None and first.with_suffix(".i").is_file() and first.with_suffix(".v6").is_file()


def discover(root: Path) -> list[RecordRef]:
    """The LUDB records of ``root`` (in ``data/`` or directly in it), in numeric order."""
    folder = root / "data" if (root / "data").is_dir() else root
    headers = sorted(folder.glob("*.hea"), key=lambda p: (len(p.stem), p.stem))
    real_root = os.path.realpath(root)
    return [
        RecordRef(
            record_id=f"{root.name}/{header.stem}",
            patient_id=f"{root.name}/{header.stem}",
            hospital=HOSPITAL,
            source_format="ludb",
            header_path=str(header),
            root=real_root,
        )
        for header in headers
    ]


def diagnoses(header: Header) -> list[str]:
    """The diagnosis lines of a LUDB header (comments other than ``<age>``, ``<sex>``, ``<diagnoses>``)."""
    return [c.strip().rstrip(".").strip() for c in header.comments if c.strip() and not c.startswith("<")]


def lead_t_amplitudes(header: Header, signal: np.ndarray, rules: LabelRules) -> dict[str, np.ndarray]:
    """T-peak amplitudes (mV) per standard lead from the annotation files beside the header.

    Args:
        header: the record's header (its lead names pick the annotation files).
        signal: the physical signal (n_samples, n_sig) at the header's rate.
        rules: the label rules (baseline window).

    Returns:
        Standard lead name to its T amplitudes; leads without an annotation file are absent.
    """
    stem = os.path.splitext(header.path)[0]
    leads: list[str] = []
    annotations = []
    for column, name in enumerate(header.lead_names):
        lead = normalize_lead_name(name)
        if lead is None:
            continue
        try:
            # The extension comes from the header's lead name: confined like the signal file.
            samples, symbols = read_annotation_arrays(f"{stem}.{name.strip().lower()}", header.root)
        except FileNotFoundError:
            continue
        leads.append(lead)
        annotations.append((column, samples, symbols))
    amplitudes = t_wave_amplitudes_by_lead(signal, annotations, header.fs, rules.ludb_twi.baseline_window_ms)
    out = dict(zip(leads, amplitudes, strict=True))
    if not out:
        logger.warning("%s: no T-wave annotation files; TWI cannot be measured", header.path)
    return out


def describe(header: Header, signal: np.ndarray, rules: LabelRules) -> dict[str, Any]:
    """Metadata, measured TWI and label of a LUDB record."""
    comments = parse_comments(header.comments)
    found = diagnoses(header)
    twi, twi_leads, detail = measure_twi(lead_t_amplitudes(header, signal, rules), rules)
    return {
        "age": parse_age(comments.get("age")),
        "sex": parse_sex(comments.get("sex")),
        "note": None,
        "report": "; ".join(found) or None,
        "raw_codes": "; ".join([*found, detail]),
        "twi": twi,
        "twi_leads": ",".join(twi_leads) or None,
        "label": label_ludb_diagnoses(found, rules),
        "device": DEVICE,
    }
