"""Manifest CSV for hospital exports (and the simulator's output).

Format: a UTF-8 CSV file with a header row, one row a record. ``ecg-r1 ingest`` takes the CSV
file itself or a folder holding ``manifest.csv``.

Required columns:

* ``signal_path``: the record's WFDB header (``.hea``; a ``.dat``/``.mat`` path is read through
  the ``.hea`` beside it), **relative to the manifest's folder**. Absolute paths and paths that
  leave the folder (``../``, or a link pointing outside) are refused (reason
  ``path_escapes_folder``), so a manifest cannot pull in files from elsewhere on the machine.
* ``record_id``: unique over everything ingested together; used verbatim (not prefixed).
* ``patient_id``: the hospital's patient id, used verbatim; a patient must belong to one hospital.
* ``hospital``: the hospital (or site) the record comes from.

Optional columns:

* ``label``: ``ischemic`` | ``non-ischemic`` | ``unknown`` (also ``yes``/``no``, ``true``/``false``,
  ``1``/``0``; empty = ``unknown``).
* ``twi``: ``true``/``false`` (also ``yes``/``no``, ``1``/``0``). Absent or empty: a TWI case when
  ``twi_leads`` is filled, otherwise ``manifest.twi_default`` of ``labels.yaml`` (default true:
  a manifest is normally an export of the TWI cohort).
* ``twi_leads``: comma-joined lead names (``V4,V5,V6``); normalised to the standard spelling.
* ``age`` (years), ``sex`` (``M``/``F``, also ``male``/``female``), ``note`` (free clinical text
  shown to the model: complaint, history, troponin...), ``report`` (the ECG report, never shown).

Any other column is kept, not dropped: its values go into the cohort's ``extra`` column as a
JSON object per record, a warning names the columns, and the ingest summary counts them
under ``extra_columns``.

A row that cannot be read (bad label or twi value, empty required cell) is quarantined with
reason ``bad_manifest_row`` and the row number.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from ecg_r1.canonical import normalize_lead_name
from ecg_r1.labels import LabelRules, parse_manifest_label, parse_manifest_twi
from ecg_r1.readers.cinc import parse_age, parse_sex
from ecg_r1.readers.records import (
    BAD_MANIFEST_ROW,
    MISSING_SIGNAL_FILE,
    PATH_ESCAPES_FOLDER,
    Quarantine,
    RecordRef,
)

MANIFEST_FILE = "manifest.csv"
REQUIRED_COLUMNS = ("signal_path", "record_id", "patient_id", "hospital")
OPTIONAL_COLUMNS = ("label", "twi", "twi_leads", "age", "sex", "note", "report")

logger = logging.getLogger(__name__)


class ManifestError(ValueError):
    """The manifest as a whole cannot be read (missing required columns, not a CSV)."""


def discover(manifest: Path, rules: LabelRules) -> tuple[list[RecordRef], list[Quarantine], dict[str, int]]:
    """Read a manifest into record references.

    Args:
        manifest: the CSV file.
        rules: label rules (the ``twi`` default).

    Returns:
        (records, quarantined rows, extra column name -> number of non-empty values kept).

    Raises:
        ManifestError: when a required column is missing (the message names it).
    """
    folder = manifest.parent.resolve()
    with manifest.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise ManifestError(
                f"manifest {manifest} lacks the required column(s) {missing}; it has {columns}. "
                f"Required: {list(REQUIRED_COLUMNS)}; optional: {list(OPTIONAL_COLUMNS)}"
            )
        extra_columns = [c for c in columns if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
        if extra_columns:
            logger.warning(
                "manifest %s: columns %s are not manifest fields; their values are kept in the cohort's "
                "'extra' column",
                manifest,
                extra_columns,
            )
        extra_counts = dict.fromkeys(extra_columns, 0)
        refs: list[RecordRef] = []
        quarantined: list[Quarantine] = []
        for line, raw_row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in raw_row.items() if k is not None}
            where = f"{manifest}:{line}"
            try:
                ref = _ref(folder, row, rules, extra_columns)
            except _RowError as exc:
                quarantined.append(
                    Quarantine(
                        source_path=exc.path or where,
                        reason=exc.reason,
                        message=f"{where}: {exc}",
                        record_id=row.get("record_id") or None,
                        patient_id=row.get("patient_id") or None,
                        hospital=row.get("hospital") or None,
                        source_format="manifest",
                    )
                )
                continue
            for column in extra_columns:
                extra_counts[column] += bool(row.get(column))
            refs.append(ref)
    return refs, quarantined, extra_counts


class _RowError(ValueError):
    def __init__(self, reason: str, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.path = path


def resolve_inside(folder: Path, relative: str) -> Path:
    """Resolve a manifest path, refusing absolute paths and paths that leave ``folder``.

    Raises:
        ValueError: naming the path and the folder.
    """
    candidate = Path(relative)
    if candidate.is_absolute():
        raise ValueError(f"signal_path {relative!r} is absolute; write it relative to the manifest's folder")
    resolved = (folder / candidate).resolve()
    if not resolved.is_relative_to(folder):
        raise ValueError(
            f"signal_path {relative!r} leaves the manifest's folder {folder}; move the record into that "
            "folder and write its path relative to it"
        )
    return resolved


def _ref(folder: Path, row: dict[str, str], rules: LabelRules, extra_columns: list[str]) -> RecordRef:
    empty = [c for c in REQUIRED_COLUMNS if not row.get(c)]
    if empty:
        raise _RowError(BAD_MANIFEST_ROW, f"required cell(s) {empty} are empty; fill them")
    try:
        path = resolve_inside(folder, row["signal_path"])
    except ValueError as exc:
        raise _RowError(PATH_ESCAPES_FOLDER, str(exc), path=row["signal_path"]) from exc
    header = path if path.suffix.lower() == ".hea" else path.with_suffix(".hea")
    if not header.is_file():
        raise _RowError(
            MISSING_SIGNAL_FILE,
            f"signal_path {row['signal_path']!r}: header {header} does not exist; copy the record (.hea and "
            "its signal file) into the manifest's folder or fix the path",
            path=str(header),
        )
    leads = []
    for name in (row.get("twi_leads") or "").replace(";", ",").split(","):
        if not name.strip():
            continue
        lead = normalize_lead_name(name)
        if lead is None:
            raise _RowError(
                BAD_MANIFEST_ROW, f"twi_leads names {name.strip()!r}, not one of the 12 leads; fix it"
            )
        leads.append(lead)
    try:
        label = parse_manifest_label(row.get("label"))
        twi = parse_manifest_twi(row.get("twi"), leads, rules)
        age = None if not row.get("age") else float(row["age"])
    except ValueError as exc:
        raise _RowError(BAD_MANIFEST_ROW, f"{exc}; fix the cell") from exc
    extra = {c: row[c] for c in extra_columns if row.get(c)}
    raw = [f"label={row.get('label', '')}", f"twi={row.get('twi', '')}"]
    if leads:
        raw.append(f"twi_leads={','.join(leads)}")
    return RecordRef(
        record_id=row["record_id"],
        patient_id=row["patient_id"],
        hospital=row["hospital"],
        source_format="manifest",
        header_path=str(header),
        root=str(folder),
        fields={
            "age": age if age is None else parse_age(str(age)),
            "sex": parse_sex(row.get("sex")),
            "note": row.get("note") or None,
            "report": row.get("report") or None,
            "raw_codes": ";".join(raw),
            "twi": twi,
            "twi_leads": ",".join(leads) or None,
            "label": label,
            "device": None,
            "extra": json.dumps(extra, ensure_ascii=False) if extra else None,
        },
    )


def describe(ref: RecordRef) -> dict[str, Any]:
    """Metadata and label of a manifest record (from its row)."""
    return dict(ref.fields)
