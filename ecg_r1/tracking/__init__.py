"""Provenance and experiment tracking: which data and code made a result.

:mod:`.versioning` reads the git commit and the DVC data version; :mod:`.runs` logs runs, models
and their registered versions to MLflow.
"""
