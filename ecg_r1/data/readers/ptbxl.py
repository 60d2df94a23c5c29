"""PTB-XL layout: ``ptbxl_database.csv`` + ``scp_statements.csv`` + ``records500/`` (or ``records100/``).

* record id: ``<folder name>/<ecg_id>``; patient id: ``ptbxl/<patient_id>``.
* hospital: the recording ``site`` as ``ptbxl-site-<n>`` (``ptbxl-site-unknown`` when empty).
* signal: the 500 Hz file (``filename_hr``) when present, else the 100 Hz one (``filename_lr``),
  resampled to 500 Hz by the canonical rules.
* age: ``300`` means "over 89" in PTB-XL and is stored as 90. sex: 0 male, 1 female.
* ``report`` is the ECG report (kept, never shown to the model); ``device`` kept; no clinical
  note exists in PTB-XL.
* label and TWI: ``scp_codes`` with the ``ptbxl`` rules of ``labels.yaml``; statement classes
  (MI) are resolved with this folder's ``scp_statements.csv``.
"""

from __future__ import annotations

import ast
import csv
import os
from pathlib import Path
from typing import Any

from ecg_r1.data.labels import LabelRules, label_ptbxl
from ecg_r1.data.readers.records import (
    BAD_TABLE_ROW,
    MISSING_SIGNAL_FILE,
    UNRECOGNISED_CODES,
    Quarantine,
    RecordRef,
)

DATABASE_FILE = "ptbxl_database.csv"
STATEMENTS_FILE = "scp_statements.csv"
PTBXL_AGE_OVER_89 = 300
AGE_OVER_89_STORED = 90.0


def discover(root: Path, rules: LabelRules) -> tuple[list[RecordRef], list[Quarantine]]:
    """Read the PTB-XL table and label every row (labels need no signal).

    Returns:
        (records, quarantined rows whose table values cannot be read).
    """
    table = root / DATABASE_FILE
    resolved = rules.with_ptbxl_statements(root / STATEMENTS_FILE)
    refs: list[RecordRef] = []
    quarantined: list[Quarantine] = []
    real_root = os.path.realpath(root)
    with table.open(newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            try:
                ref = _ref(root, row, resolved, real_root)
            except (KeyError, ValueError, SyntaxError) as exc:
                quarantined.append(
                    Quarantine(
                        source_path=f"{table}:{line}",
                        reason=BAD_TABLE_ROW,
                        message=f"row {line} of {table} cannot be read ({type(exc).__name__}: {exc}); "
                        "fix the row (ecg_id, patient_id, filename_hr/filename_lr, scp_codes as a dict)",
                        record_id=f"{root.name}/{row.get('ecg_id')}",
                        source_format="ptbxl",
                    )
                )
                continue
            if not Path(ref.header_path).is_file():
                quarantined.append(
                    Quarantine.of(
                        ref,
                        MISSING_SIGNAL_FILE,
                        f"{table} row {line} (ecg_id {row.get('ecg_id')}) names {ref.header_path}, which does not "
                        "exist (nor its 100 Hz file); download the records500/ (or records100/) folder beside "
                        "the table",
                    )
                )
                continue
            refs.append(ref)
    return refs, quarantined


def _ref(root: Path, row: dict[str, str], rules: LabelRules, real_root: str) -> RecordRef:
    ecg_id = str(int(float(row["ecg_id"])))
    patient = row.get("patient_id") or ""
    patient_id = f"ptbxl/{int(float(patient))}" if patient else f"{root.name}/{ecg_id}"
    site = row.get("site") or ""
    hospital = f"ptbxl-site-{int(float(site))}" if site else "ptbxl-site-unknown"
    header = None
    for column in ("filename_hr", "filename_lr"):
        name = (row.get(column) or "").strip()
        if name and (root / f"{name}.hea").is_file():
            header = root / f"{name}.hea"
            break
    if header is None:
        # Keep the 500 Hz path so the quarantine message names the file that should be there.
        header = root / f"{(row.get('filename_hr') or row.get('filename_lr') or ecg_id).strip()}.hea"
    scp_codes = {str(k): float(v) for k, v in ast.literal_eval(row.get("scp_codes") or "{}").items()}
    decision = label_ptbxl(scp_codes, rules)
    return RecordRef(
        record_id=f"{root.name}/{ecg_id}",
        patient_id=patient_id,
        hospital=hospital,
        source_format="ptbxl",
        header_path=str(header),
        root=real_root,
        fields={
            "age": parse_age(row.get("age")),
            "sex": {"0": "M", "1": "F"}.get(str(row.get("sex", "")).split(".")[0]),
            "note": None,
            "report": (row.get("report") or "").strip() or None,
            "raw_codes": decision.raw_codes,
            "twi": decision.twi,
            "twi_leads": None,
            "label": decision.label,
            "device": (row.get("device") or "").strip() or None,
            UNRECOGNISED_CODES: decision.unrecognised,
        },
    )


def parse_age(value: str | None) -> float | None:
    """PTB-XL age in years; 300 ("over 89") becomes 90."""
    if value is None or str(value).strip() == "":
        return None
    age = float(value)
    return AGE_OVER_89_STORED if age >= PTBXL_AGE_OVER_89 else age


def describe(ref: RecordRef) -> dict[str, Any]:
    """Metadata and label of a PTB-XL record (already decided from its table row)."""
    return dict(ref.fields)
