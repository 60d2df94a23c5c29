"""Readers for the layouts users bring: PTB-XL, PhysioNet/CinC 2020/2021, LUDB, manifest CSV.

* :func:`detect_layout` names a path's layout; :func:`discover` lists its records as
  :class:`RecordRef` (cheap: tables and file names only) plus the inputs it refuses.
* :func:`load_ref` reads one record (header, signal, canonical form, source metadata, label).
* :func:`read_record` reads any one WFDB/CinC record by path, for display.

Each source module's docstring documents its ids, hospital and fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ecg_r1.data.canonical import CanonicalError, canonicalize
from ecg_r1.data.labels import LabelRules
from ecg_r1.data.readers import cinc, ludb, manifest, ptbxl
from ecg_r1.data.readers.records import (
    EMPTY_FOLDER,
    MISSING_PATH,
    UNRECOGNISED_LAYOUT,
    LoadedRecord,
    Quarantine,
    RecordError,
    RecordRef,
)
from ecg_r1.data.readers.wfdb_header import Header, parse_comments, parse_header
from ecg_r1.data.readers.wfdb_signal import read_signal

__all__ = [
    "LoadedRecord",
    "Quarantine",
    "RecordError",
    "RecordRef",
    "detect_layout",
    "discover",
    "load_ref",
    "read_record",
]

LAYOUTS = ("ptbxl", "ludb", "manifest", "cinc")


def detect_layout(path: Path) -> str | None:
    """The layout of an ingest input, or None when it is none of the known ones.

    A ``.csv`` file or a folder holding ``manifest.csv`` is a manifest; a folder holding
    ``ptbxl_database.csv`` is PTB-XL; ``ludb.csv`` or annotated headers make LUDB; any other
    folder with ``.hea`` files (searched recursively) is read as PhysioNet/CinC.
    """
    if path.is_file():
        return "manifest" if path.suffix.lower() == ".csv" else None
    if not path.is_dir():
        return None
    if (path / manifest.MANIFEST_FILE).is_file():
        return "manifest"
    if (path / ptbxl.DATABASE_FILE).is_file():
        return "ptbxl"
    if ludb.is_ludb(path):
        return "ludb"
    if next(path.rglob("*.hea"), None) is not None:
        return "cinc"
    return None


def discover(
    path: Path, rules: LabelRules
) -> tuple[list[RecordRef], list[Quarantine], dict[str, int], str | None]:
    """List the records of one ingest input.

    Args:
        path: a folder or a manifest CSV.
        rules: label rules (PTB-XL and manifest labels are decided from their tables here).

    Returns:
        (records, refused inputs, manifest extra columns kept, layout name or None).
    """
    path = Path(path)
    layout = detect_layout(path)
    if layout is None:
        return [], [_unusable(path)], {}, None
    if layout == "manifest":
        csv_path = path if path.is_file() else path / manifest.MANIFEST_FILE
        try:
            refs, refused, extra = manifest.discover(csv_path, rules)
        except (manifest.ManifestError, OSError) as exc:
            return (
                [],
                [Quarantine(str(csv_path), "bad_manifest", str(exc), source_format="manifest")],
                {},
                layout,
            )
        return refs, refused, extra, layout
    if layout == "ptbxl":
        refs, refused = ptbxl.discover(path, rules)
        return refs, refused, {}, layout
    if layout == "ludb":
        return ludb.discover(path), [], {}, layout
    refs, refused = cinc.discover(path)
    return refs, refused, {}, layout


def _unusable(path: Path) -> Quarantine:
    if not path.exists():
        return Quarantine(str(path), MISSING_PATH, f"{path} does not exist; check the path given to ingest")
    if path.is_dir() and next(path.iterdir(), None) is None:
        return Quarantine(
            str(path),
            EMPTY_FOLDER,
            f"folder {path} is empty; point ingest at a folder of records (PTB-XL, CinC .hea/.mat, "
            "LUDB) or a manifest.csv",
        )
    return Quarantine(
        str(path),
        UNRECOGNISED_LAYOUT,
        f"{path} is not a known layout: no ptbxl_database.csv, ludb.csv, manifest.csv or .hea headers "
        "found; give a PTB-XL, CinC or LUDB folder or a manifest CSV (see `ecg-r1 ingest --help`)",
    )


def read_record(path: str | Path) -> LoadedRecord:
    """Read one WFDB/CinC record in canonical form.

    Args:
        path: its header (``.hea``) or signal file (``.mat``/``.dat``) beside the header, or the
            record path without extension.

    Returns:
        The canonical signal (12, 5000) float32 in mV and a metadata dict (record name, source
        rate, gain, checksum, lead names, derived/cropped/padded, parsed header comments).

    Raises:
        RecordError: when the header or signal cannot be read (``reason`` says why).
        CanonicalError: when the record cannot be brought to the canonical form.
    """
    path = Path(path)
    header_path = path if path.suffix.lower() == ".hea" else path.with_suffix(".hea")
    if path.suffix.lower() not in (".hea", ".mat", ".dat"):
        header_path = path.with_name(path.name + ".hea")
    header = parse_header(header_path)
    signal, meta = _load_signal(header)
    del meta["_raw"]
    meta["comments"] = parse_comments(header.comments)
    return LoadedRecord(signal=signal, meta=meta)


def _load_signal(header: Header, out: Any = None) -> tuple[Any, dict[str, Any]]:
    raw = read_signal(header, out)
    canonical = canonicalize(raw.signal, header.fs, header.lead_names)
    meta = {
        "record_name": header.record_name,
        "source_path": raw.signal_path,
        "header_path": header.path,
        "checksum": raw.checksum,
        "source_fs": canonical.source_fs,
        "source_gain": raw.gain,
        "lead_names": header.lead_names,
        "derived_leads": ",".join(canonical.derived_leads) or None,
        "cropped_samples": canonical.cropped_samples,
        "padded_samples": canonical.padded_samples,
        "reader": raw.reader,
        "header_encoding": header.encoding,
        "header_warnings": list(header.warnings),
    }
    return canonical.signal, {**meta, "_raw": raw.signal}


def load_ref(ref: RecordRef, rules: LabelRules, out: Any = None) -> tuple[Any, dict[str, Any]]:
    """Read one discovered record: canonical signal and its cohort row (without ``row``).

    Args:
        ref: the record.
        rules: label rules.
        out: optional float32 (12, 5000) buffer the signal may be converted into (the returned
            signal is then a view of it); a record of another shape gets a new array.

    Raises:
        RecordError / CanonicalError: with a quarantine ``reason``.
    """
    header = parse_header(ref.header_path, ref.root or None)
    signal, meta = _load_signal(header, out)
    raw = meta.pop("_raw")
    if ref.source_format == "cinc":
        described = cinc.describe(header, rules)
    elif ref.source_format == "ludb":
        described = ludb.describe(header, raw, rules)
    elif ref.source_format == "ptbxl":
        described = ptbxl.describe(ref)
    else:
        described = manifest.describe(ref)
    row = {
        "record_id": ref.record_id,
        "patient_id": ref.patient_id,
        "hospital": ref.hospital,
        "source_format": ref.source_format,
        "source_path": meta["source_path"],
        "checksum": meta["checksum"],
        "source_fs": meta["source_fs"],
        "source_gain": meta["source_gain"],
        "derived_leads": meta["derived_leads"],
        "cropped_samples": meta["cropped_samples"],
        "padded_samples": meta["padded_samples"],
        "extra": None,
        **described,
    }
    return signal, row


# Re-exported for callers that catch both.
RECORD_ERRORS = (RecordError, CanonicalError)
