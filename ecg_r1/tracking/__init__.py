"""Provenance and experiment tracking: which data and code made a result.

:mod:`.versioning` reads the git commit and the DVC data version; :mod:`.runs` points MLflow at
the store and logs runs (parameters, metrics, dataset inputs); :mod:`.model_registry` registers
their models as versions, sets aliases and fetches versions back.
"""
