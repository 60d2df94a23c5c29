"""The ECG-R1 code location: every definition under ``dagster_project/defs`` (``dagster dev -m dagster_project.definitions``)."""

from __future__ import annotations

import dagster as dg

import dagster_project.defs


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_defs(defs_root=dagster_project.defs)
