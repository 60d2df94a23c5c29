"""The inbox sensor: a hospital drops an export into the inbox, the pipeline ingests it and retrains.

The inbox is ``data/inbox/`` (``$ECG_R1_INBOX`` overrides it; relative paths resolve against the
project root of the :class:`~dagster_project.defs.resources.DataLayout`). Each export is one
folder in it, in a layout ``ecg-r1 ingest`` reads: a folder with ``manifest.csv`` (a hospital
export), a PhysioNet/CinC folder of ``.hea`` headers, a PTB-XL folder or LUDB.

On each tick the sensor lists the inbox and requests one run of ``retrain_job`` for the exports it
has not seen yet, with ``raw_cohort`` pointed at every source: the base sources (the simulated
export, or ``$ECG_R1_SOURCES``), every export already in the inbox, and the new ones, so the
retrained model learns from all data received so far. The sensor's cursor records the exports it
has requested runs for, so each export triggers once; the run key does the same on Dagster's side.

Exports still being copied must not trigger a run on half their files: a folder whose newest file
changed less than ``$ECG_R1_INBOX_SETTLE_S`` seconds ago (default 60) waits for a later tick, and
names starting with ``.`` or ``_`` are ignored (copy to ``.name``, then rename, for an atomic drop).

The sensor is off until a user turns it on in the UI (Automation) or with
``dagster sensor start inbox_sensor``: retraining is the most expensive thing the pipeline does.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from dagster_project.defs.resources import DataLayout
from ecg_r1.data.readers import detect_layout

INBOX_ENV = "ECG_R1_INBOX"
SETTLE_ENV = "ECG_R1_INBOX_SETTLE_S"
SOURCES_ENV = "ECG_R1_SOURCES"
DEFAULT_INBOX = "data/inbox"
DEFAULT_SETTLE_S = 60.0
RETRAIN_JOB = "retrain_job"
INGEST_ASSET = "raw_cohort"


@dataclass(frozen=True)
class InboxExport:
    """One export folder in the inbox.

    Attributes:
        name: the folder's name (unique in the inbox; the cursor's key).
        path: the folder.
        layout: ``manifest`` | ``cinc`` | ``ptbxl`` | ``ludb`` (from :func:`ecg_r1.data.readers.detect_layout`).
        fingerprint: file count, bytes and newest modification time, to notice a changed export.
        age_s: seconds since its newest file changed.
    """

    name: str
    path: Path
    layout: str
    fingerprint: str
    age_s: float


def inbox_dir(layout: DataLayout) -> Path:
    """The inbox folder: ``$ECG_R1_INBOX`` or ``data/inbox``, resolved against the project root."""
    return layout.path(os.environ.get(INBOX_ENV) or DEFAULT_INBOX)


def settle_seconds() -> float:
    """How long an export must stay unchanged before it triggers (``$ECG_R1_INBOX_SETTLE_S``)."""
    raw = os.environ.get(SETTLE_ENV, "")
    if not raw:
        return DEFAULT_SETTLE_S
    try:
        value = float(raw)
    except ValueError as exc:
        raise ValueError(f"{SETTLE_ENV}={raw!r} is not a number of seconds (e.g. 60)") from exc
    if value < 0:
        raise ValueError(f"{SETTLE_ENV}={raw!r} must be 0 or more seconds")
    return value


def _fingerprint(folder: Path, now: float) -> tuple[str, float]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    stats = [p.stat() for p in files]
    newest = max((s.st_mtime for s in stats), default=folder.stat().st_mtime)
    size = sum(s.st_size for s in stats)
    return f"{len(files)}-{size}-{int(newest)}", now - newest


def scan_inbox(inbox: Path, now: float | None = None) -> tuple[list[InboxExport], dict[str, str]]:
    """List the export folders of the inbox.

    Args:
        inbox: the inbox folder (a missing folder is an empty inbox).
        now: the current time (seconds since the epoch); default ``time.time()``.

    Returns:
        (exports in a known layout sorted by name, ``{name: reason}`` for folders that are not).
    """
    now = time.time() if now is None else now
    if not inbox.is_dir():
        return [], {}
    exports: list[InboxExport] = []
    refused: dict[str, str] = {}
    for path in sorted(inbox.iterdir()):
        if path.name.startswith((".", "_")):
            continue  # a copy in progress, by convention
        if not path.is_dir():
            refused[path.name] = "not a folder: put each export in its own folder"
            continue
        layout = detect_layout(path)
        if layout is None:
            refused[path.name] = "no manifest.csv, ptbxl_database.csv, ludb.csv or .hea headers in it"
            continue
        fingerprint, age_s = _fingerprint(path, now)
        exports.append(InboxExport(path.name, path, layout, fingerprint, age_s))
    return exports, refused


def base_sources(layout: DataLayout) -> list[Path]:
    """The sources every retraining ingests besides the inbox.

    ``$ECG_R1_SOURCES`` (paths separated by ``os.pathsep``) when set, else the simulated export
    when it has been generated.
    """
    raw = os.environ.get(SOURCES_ENV, "")
    if raw:
        return [layout.path(p) for p in raw.split(os.pathsep) if p.strip()]
    return [layout.simulated] if layout.simulated.exists() else []


def _config_path(layout: DataLayout, path: Path) -> str:
    """A path for the run config: relative to the project root when inside it (portable)."""
    try:
        return str(path.resolve().relative_to(layout.root))
    except ValueError:
        return str(path.resolve())


def ingest_run_config(layout: DataLayout, exports: list[InboxExport]) -> dict:
    """Run config of ``retrain_job`` pointing ``raw_cohort`` at the base sources plus ``exports``.

    Only ``source_paths`` is set: the ingestion's other settings keep their defaults.
    """
    paths = [*base_sources(layout), *(e.path for e in exports)]
    return {"ops": {INGEST_ASSET: {"config": {"source_paths": [_config_path(layout, p) for p in paths]}}}}


def _read_cursor(cursor: str | None) -> dict[str, str]:
    if not cursor:
        return {}
    try:
        seen = json.loads(cursor).get("seen", {})
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(
            f"inbox_sensor cursor {cursor!r} is not this sensor's JSON; reset it in the UI "
            "(Automation > inbox_sensor > Cursor) to re-scan the inbox"
        ) from exc
    return {str(k): str(v) for k, v in seen.items()}


@dg.sensor(
    job_name=RETRAIN_JOB,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Requests ingestion and retraining (retrain_job) when a new hospital export lands in "
    "the inbox (data/inbox or $ECG_R1_INBOX); each export once.",
)
def inbox_sensor(context: dg.SensorEvaluationContext, layout: DataLayout) -> dg.SensorResult:
    """One run of ``retrain_job`` for the exports that appeared since the last request."""
    inbox = inbox_dir(layout)
    seen = _read_cursor(context.cursor)
    exports, refused = scan_inbox(inbox)
    settle_s = settle_seconds()
    new = [e for e in exports if e.name not in seen and e.age_s >= settle_s]
    settling = [e.name for e in exports if e.name not in seen and e.age_s < settle_s]
    changed = [e.name for e in exports if e.name in seen and seen[e.name] != e.fingerprint]
    # A changed export is not re-triggered: the next retraining ingests the folder as it is then.
    # New data belongs in a new folder.
    changed_note = f"changed after their run was requested (send new data as a new folder): {changed}"
    if not new:
        parts = [f"no new export in {inbox}"]
        if settling:
            parts.append(f"waiting for {settling} to stay unchanged for {settle_s:g} s")
        if refused:
            parts.append(f"ignored (not an export): {sorted(refused)}")
        if changed:
            parts.append(changed_note)
        return dg.SensorResult(skip_reason=dg.SkipReason("; ".join(parts)))

    for export in new:
        seen[export.name] = export.fingerprint
    names = [e.name for e in new]
    # Known exports are ingested again beside the new ones: the cohort holds all data received so far.
    known = [e for e in exports if e.name in seen and e.name not in names]
    key = hashlib.sha256(
        json.dumps({e.name: e.fingerprint for e in new}, sort_keys=True).encode()
    ).hexdigest()
    context.log.info(f"new inbox export(s) {names}: requesting {RETRAIN_JOB}")
    for name, reason in refused.items():
        context.log.warning(f"inbox entry {inbox / name} ignored: {reason}")
    if changed:
        context.log.warning(f"inbox exports {changed_note}")
    request = dg.RunRequest(
        run_key=f"inbox-{key[:16]}",
        run_config=ingest_run_config(layout, known + new),
        tags={
            "ecg_r1/trigger": "inbox_sensor",
            "ecg_r1/inbox_exports": ",".join(names),
            "ecg_r1/inbox_layouts": ",".join(e.layout for e in new),
        },
    )
    return dg.SensorResult(run_requests=[request], cursor=json.dumps({"seen": seen}, sort_keys=True))
