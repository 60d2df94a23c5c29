"""Screen an ingest's records for what makes them unusable together (as opposed to each on its
own): repeated record ids, patients in two hospitals, and the same signal under two records.

Takes: discovered record references (before loading), or loaded cohort rows with their signal
checksums (after). Gives: the records kept, in input order, and a :class:`Quarantine` for each
refused one, its message saying what to do. :func:`ecg_r1.data.ingest.ingest` runs
:func:`screen` before loading and :func:`screen_duplicate_signals` after.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ecg_r1.data.readers.records import (
    DUPLICATE_RECORD_ID,
    DUPLICATE_SIGNAL,
    PATIENT_IN_TWO_HOSPITALS,
    Quarantine,
    RecordRef,
)


def screen(refs: list[RecordRef]) -> tuple[list[RecordRef], list[Quarantine]]:
    """Refuse repeated record ids (after the first) and patients found in more than one hospital.

    Returns:
        (records kept, in input order; refused records).
    """
    kept: list[RecordRef] = []
    refused: list[Quarantine] = []
    first_source: dict[str, str] = {}
    for ref in refs:
        if ref.record_id in first_source:
            refused.append(
                Quarantine.of(
                    ref,
                    DUPLICATE_RECORD_ID,
                    f"record id {ref.record_id!r} was already read from {first_source[ref.record_id]}; "
                    "record ids must be unique: rename one of them, or drop the copy if it is the same record",
                )
            )
            continue
        first_source[ref.record_id] = ref.header_path
        kept.append(ref)
    hospitals: dict[str, set[str]] = defaultdict(set)
    for ref in kept:
        hospitals[ref.patient_id].add(ref.hospital)
    conflicted = {patient for patient, where in hospitals.items() if len(where) > 1}
    if not conflicted:
        return kept, refused
    out = []
    for ref in kept:
        if ref.patient_id in conflicted:
            refused.append(
                Quarantine.of(
                    ref,
                    PATIENT_IN_TWO_HOSPITALS,
                    f"patient id {ref.patient_id!r} appears in hospitals {sorted(hospitals[ref.patient_id])}; "
                    "a patient must belong to one hospital (or held-out hospitals leak into training): if "
                    "these are different people make the ids unique per hospital (e.g. prefix the hospital), "
                    "if it is one person give all their records one hospital",
                )
            )
        else:
            out.append(ref)
    return out, refused


def screen_duplicate_signals(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Quarantine]]:
    """Refuse each loaded record whose signal checksum an earlier row (in input order) has.

    One recording under two patients or hospitals is a mix-up (and, across hospitals, a leak of a
    test record into training); the same patient's record exported twice would count one
    recording twice in training and evaluation. Either way the first record is kept and the
    repeat refused with a message naming it: which of the two is right only the user can tell.

    Args:
        rows: cohort rows (with ``checksum``), in input order.

    Returns:
        (rows kept, in order; refused records).
    """
    kept: list[dict[str, Any]] = []
    refused: list[Quarantine] = []
    first: dict[str, dict[str, Any]] = {}
    for row in rows:
        checksum = row["checksum"]
        original = first.get(checksum) if checksum else None
        if original is None:
            if checksum:
                first[checksum] = row
            kept.append(row)
            continue
        same_patient = (row["patient_id"], row["hospital"]) == (original["patient_id"], original["hospital"])
        where = (
            "a re-export of the same patient's record: the first is kept; drop the copy"
            if same_patient
            else f"which belongs to another patient ({original['patient_id']!r}, hospital "
            f"{original['hospital']!r}): one recording cannot belong to two patients; keep it only "
            "under the right one"
        )
        refused.append(
            Quarantine.of_row(
                row,
                DUPLICATE_SIGNAL,
                f"same signal (sha256 {checksum[:12]}) as record {original['record_id']!r} read from "
                f"{original['source_path']}, {where}",
            )
        )
    return kept, refused
