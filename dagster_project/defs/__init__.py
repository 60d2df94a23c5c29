"""Dagster definitions of ECG-R1, one module a concept, loaded by ``dagster_project.definitions``.

Any module added here (``assets/*.py``, ``asset_checks.py``, ``jobs.py``, ``schedules.py``,
``sensors.py``) is picked up without editing a list; resources are wired in ``resources.py`` only.
"""
