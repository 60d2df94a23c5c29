"""PhysioNet/CinC Challenge 2020/2021 layout: ``NAME.hea`` + ``NAME.mat`` (MATLAB v4 ``val``).

* record id: ``<folder name>/<record name>`` (``cinc2021/E00666``); records may sit in
  sub-folders (the Challenge ships one folder per source database).
* hospital: the source database, from the record name's prefix (:data:`CINC_SOURCES`), as
  ``cinc-<source>``.
* patient id: the record id. The Challenge publishes no patient ids, so two recordings of one
  patient cannot be linked; a patient-level split is a record-level split for CinC data.
* age/sex: ``# Age:``/``# Sex:`` comments (``NaN``/``Unknown`` give null).
* label and TWI: ``# Dx:`` SNOMED CT codes with the ``cinc`` rules of ``labels.yaml``.
* note: built from ``# Rx:``, ``# Hx:`` and ``# Sx:`` when they say something other than
  ``Unknown`` (never from ``Dx``, which is the label source).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ecg_r1.data.labels import LabelRules, label_cinc, parse_dx
from ecg_r1.data.readers.records import (
    MISSING_HEADER,
    NOT_A_REGULAR_FILE,
    UNRECOGNISED_CODES,
    Quarantine,
    RecordError,
    RecordRef,
)
from ecg_r1.data.readers.wfdb_header import Header, parse_comments, parse_header

# Record-name prefix -> source database (Challenge 2021 sources; longest prefix first).
CINC_SOURCES: tuple[tuple[str, str], ...] = (
    ("HR", "ptbxl"),
    ("JS", "chapman-ningbo"),  # split below by number
    ("A", "cpsc2018"),
    ("Q", "cpsc-extra"),
    ("I", "incart"),
    ("S", "ptb"),
    ("E", "georgia"),
)
# The Challenge's JS records up to this number are Chapman-Shaoxing (first release); the later
# ones are Ningbo First Hospital.
CHAPMAN_LAST_JS = 10646
_NAME_RE = re.compile(r"^([A-Za-z]+)(\d+)$")


def cinc_hospital(record_name: str) -> str:
    """The source database of a CinC record, from its name (``E00666`` -> ``cinc-georgia``)."""
    match = _NAME_RE.match(record_name)
    if match is None:
        return "cinc-unknown"
    prefix, number = match.group(1).upper(), int(match.group(2))
    for known, source in CINC_SOURCES:
        if prefix == known:
            if known == "JS":
                return "cinc-chapman-shaoxing" if number <= CHAPMAN_LAST_JS else "cinc-ningbo"
            return f"cinc-{source}"
    return f"cinc-unknown-{prefix.lower()}"


def discover(root: Path) -> tuple[list[RecordRef], list[Quarantine]]:
    """Find the CinC records under ``root`` (recursively).

    Returns:
        (records, quarantined inputs: signal files that no header names and that have no header
        of their name beside them, folders named ``*.hea``).
    """
    refs = []
    # os.walk and string paths: rglob and Path sorting cost more than reading a record's header.
    headers: list[str] = []
    signals: list[str] = []
    not_files: list[str] = []
    for folder, dirs, files in os.walk(root):
        for name in files:
            lower = name.lower()
            if lower.endswith(".hea"):
                headers.append(os.path.join(folder, name))
            elif lower.endswith((".mat", ".dat")):
                signals.append(os.path.join(folder, name))
        # A folder named like a header would otherwise vanish without a count.
        not_files.extend(os.path.join(folder, name) for name in dirs if name.lower().endswith(".hea"))
    headers.sort()
    real_root = os.path.realpath(root)
    for header in headers:
        stem = os.path.basename(header)[:-4]
        record_id = f"{root.name}/{stem}"
        refs.append(
            RecordRef(
                record_id=record_id,
                patient_id=record_id,
                hospital=cinc_hospital(stem),
                source_format="cinc",
                header_path=header,
                root=real_root,
            )
        )
    stems = {header[:-4] for header in headers}
    candidates = [p for p in sorted(signals) if p[:-4] not in stems]
    named = _named_signal_files(headers, {os.path.dirname(p) for p in candidates}, real_root)
    orphans = [Path(p) for p in candidates if os.path.normpath(p) not in named]
    quarantined = [
        Quarantine(
            source_path=path,
            reason=NOT_A_REGULAR_FILE,
            message=f"{path} is a folder, not a header file; move the records out of it or rename it",
            record_id=f"{root.name}/{os.path.basename(path)[:-4]}",
            source_format="cinc",
        )
        for path in sorted(not_files)
    ]
    quarantined += [
        Quarantine(
            source_path=str(path),
            reason=MISSING_HEADER,
            message=f"signal file {path} has no header {path.with_suffix('.hea').name} beside it; "
            "copy the header too",
            record_id=f"{root.name}/{path.stem}",
            source_format="cinc",
        )
        for path in orphans
    ]
    return refs, quarantined


def _named_signal_files(headers: list[str], folders: set[str], root: str) -> set[str]:
    """The signal files (normalised paths) that the headers in ``folders`` (or above them) name.

    A record may spread its signals over several files (``NAME_1.dat`` and ``NAME_2.dat`` of a
    FLAC record of more than 8 channels, or any names a header gives): they belong to its
    record, not to a missing header. Only the folders holding a signal file with no header of
    its own are read, so the usual folder costs nothing here; a header that cannot be read names
    nothing (it is refused as a record of its own when it is read).
    """
    named: set[str] = set()
    for header in headers:
        folder = os.path.dirname(header)
        if not any(other == folder or other.startswith(folder + os.sep) for other in folders):
            continue  # no unclaimed signal file in its folder or below it
        try:
            parsed = parse_header(header, root)
        except (RecordError, OSError):
            continue
        named.update(os.path.normpath(os.path.join(folder, spec.file_name)) for spec in parsed.signals)
    return named


def describe(header: Header, rules: LabelRules) -> dict[str, Any]:
    """Metadata and label of a CinC record from its header comments."""
    comments = parse_comments(header.comments)
    codes = parse_dx(comments.get("dx"))
    decision = label_cinc(codes, rules)
    notes = [
        f"{name}: {comments[key]}"
        for key, name in (("sx", "Symptoms"), ("hx", "History"), ("rx", "Medication"))
        if comments.get(key) and comments[key].strip().lower() not in ("unknown", "nan", "none", "")
    ]
    return {
        "age": parse_age(comments.get("age")),
        "sex": parse_sex(comments.get("sex")),
        "note": "; ".join(notes) or None,
        "report": None,
        "raw_codes": decision.raw_codes,
        "twi": decision.twi,
        "twi_leads": None,
        "label": decision.label,
        "device": None,
        UNRECOGNISED_CODES: decision.unrecognised,
    }


def parse_age(value: str | None) -> float | None:
    """An age in years, or None when missing or not a number (``NaN``, ``Unknown``)."""
    try:
        age = float(str(value).strip().lstrip("<>"))
    except (TypeError, ValueError):
        return None
    return age if age == age and age >= 0 else None


def parse_sex(value: str | None) -> str | None:
    """``M``/``F`` from ``Male``/``Female``/``M``/``F`` (any case); None otherwise."""
    key = (value or "").strip().lower()
    if key in ("m", "male"):
        return "M"
    if key in ("f", "female"):
        return "F"
    return None
