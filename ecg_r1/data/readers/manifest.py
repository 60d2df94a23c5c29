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

A row that cannot be read (bad label or twi value, empty required cell, a cell over the csv
field limit, a quote never closed, more cells than the header) is quarantined with reason
``bad_manifest_row`` and its line number; the rows after it are still read. A file that is not
UTF-8 is refused as a whole, naming it (a UTF-8 byte-order mark is accepted).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ecg_r1.data.canonical import normalize_lead_name
from ecg_r1.data.labels import LabelRules, parse_manifest_label, parse_manifest_twi
from ecg_r1.data.readers.cinc import parse_age, parse_sex
from ecg_r1.data.readers.records import (
    BAD_MANIFEST_ROW,
    MISSING_SIGNAL_FILE,
    PATH_ESCAPES_FOLDER,
    Quarantine,
    RecordRef,
)

MANIFEST_FILE = "manifest.csv"
# Largest manifest read (about a million rows).
MAX_MANIFEST_BYTES = 512 << 20
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
    records = _csv_records(_manifest_lines(manifest))
    first = next(records, None)
    columns = [c.strip() for c in first[1]] if first is not None and isinstance(first[1], list) else []
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
    for line, cells in records:
        if not cells:
            continue  # a blank line
        if isinstance(cells, str) or len(cells) > len(columns):
            why = cells if isinstance(cells, str) else f"{len(cells)} cells, the header has {len(columns)}"
            quarantined.append(
                Quarantine(
                    source_path=f"{manifest}:{line}",
                    reason=BAD_MANIFEST_ROW,
                    message=f"{manifest}:{line}: the row cannot be read as CSV ({why}); check its quotes "
                    "(a quote opened and never closed, or a comma outside quotes) and its length",
                    source_format="manifest",
                )
            )
            continue
        row = {column: value.strip() for column, value in zip(columns, cells, strict=False)}
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


def _manifest_lines(manifest: Path) -> list[str]:
    """The manifest's physical lines (endings kept), decoded as UTF-8 (a BOM is dropped).

    Raises:
        ManifestError: naming the file when it is larger than :data:`MAX_MANIFEST_BYTES` or not UTF-8.
    """
    size = manifest.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"manifest {manifest} has {size} bytes, more than {MAX_MANIFEST_BYTES}; split it into several"
        )
    data = manifest.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(
            f"manifest {manifest} is not UTF-8 (byte {exc.start} cannot be decoded); save it as UTF-8 "
            "(in a spreadsheet: 'CSV UTF-8')"
        ) from exc
    return io.StringIO(text, newline="").readlines()


def _csv_records(lines: list[str]) -> Iterator[tuple[int, list[str] | str]]:
    """(first line number, cells) of each CSV record, or (line, what is wrong) for one the csv module
    refuses (a cell over its field limit, a quote never closed) or a quoted cell that swallowed
    later lines (a record over several lines whose cell count differs from the header's).

    Reading resumes on the line after the bad record's first line, so one bad quote costs one row,
    not the rows it swallowed and not the whole manifest.
    """
    start = 0
    width: int | None = None
    while start < len(lines):
        reader = csv.reader(lines[start:], strict=True)
        while True:
            first = start + reader.line_num + 1
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield first, str(exc)
                break
            last = start + reader.line_num
            if width is not None and last > first and len(cells) != width:
                yield first, f"a quoted cell runs over lines {first}-{last}"
                break
            width = len(cells) if width is None else width
            yield first, cells
        start = first


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
