"""Small records passed between discovery, the loading workers and the cohort writer.

Also the quarantine reasons they carry and :class:`RecordError`, the error the record readers
(``confined_read``, ``wfdb_header``, ``wfdb_signal``, ``wfdb_annotations``) raise for a record
they refuse, its ``reason`` one of those keys; they import both from here, and this module
imports none of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# Quarantine reasons found while discovering records (before any signal is read).
EMPTY_FOLDER = "empty_folder"
MISSING_PATH = "missing_path"
UNRECOGNISED_LAYOUT = "unrecognised_layout"
MISSING_HEADER = "missing_header"
MISSING_SIGNAL_FILE = "missing_signal_file"
BAD_TABLE_ROW = "bad_table_row"
BAD_MANIFEST_ROW = "bad_manifest_row"
PATH_ESCAPES_FOLDER = "path_escapes_folder"
# Quarantine reasons found while opening a record's files.
NOT_A_REGULAR_FILE = "not_a_regular_file"
FILE_TOO_LARGE = "file_too_large"
DUPLICATE_RECORD_ID = "duplicate_record_id"
PATIENT_IN_TWO_HOSPITALS = "patient_in_two_hospitals"
# Found after reading: a signal file whose content (sha256) an earlier record of the batch has.
DUPLICATE_SIGNAL = "duplicate_signal"
READ_ERROR = "read_error"
# Reading and checking one record took longer than ingest's per-record time limit.
RECORD_TIMEOUT = "timeout"

# Key of a reader's row holding the diagnosis codes its label rules did not understand (counted in
# the ingest summary, not stored in the cohort table).
UNRECOGNISED_CODES = "unrecognised_codes"


class RecordError(ValueError):
    """A record cannot be read; ``reason`` is a short quarantine key, the message says what to do."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RecordRef:
    """A record found by discovery: where it is and what its source table says about it.

    ``fields`` holds what is known before the signal is read (PTB-XL table row, manifest row,
    a precomputed label decision); workers add what the header and signal say.
    """

    record_id: str
    patient_id: str
    hospital: str
    source_format: str  # ptbxl | cinc | ludb | manifest
    header_path: str
    fields: dict[str, Any] = field(default_factory=dict)
    # Real path of the folder the user named: every file the record reads must resolve inside it
    # (a header or signal file that is, or links to, anything outside is refused unread).
    # "" confines the record to its header's own folder.
    root: str = ""


@dataclass(frozen=True)
class Quarantine:
    """A record (or input) that was refused, with what to do about it."""

    source_path: str
    reason: str
    message: str
    record_id: str | None = None
    patient_id: str | None = None
    hospital: str | None = None
    source_format: str | None = None

    def to_row(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, ref: RecordRef, reason: str, message: str) -> Quarantine:
        return cls(
            source_path=ref.header_path,
            reason=reason,
            message=message,
            record_id=ref.record_id,
            patient_id=ref.patient_id,
            hospital=ref.hospital,
            source_format=ref.source_format,
        )

    @classmethod
    def of_row(cls, row: dict[str, Any], reason: str, message: str) -> Quarantine:
        """Quarantine a record that was read (its cohort row), the message prefixed with its file."""
        return cls(
            source_path=row["source_path"],
            reason=reason,
            message=f"{row['source_path']}: {message}",
            record_id=row["record_id"],
            patient_id=row["patient_id"],
            hospital=row["hospital"],
            source_format=row["source_format"],
        )


@dataclass(frozen=True)
class LoadedRecord:
    """One record in canonical form: signal (12, 5000) float32 mV in LEADS order, plus metadata."""

    signal: np.ndarray
    meta: dict[str, Any]
