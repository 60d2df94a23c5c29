"""The data stage: read exports (PTB-XL, PhysioNet/CinC, WFDB folders with a manifest) into one
canonical cohort, label it from the diagnoses it understands, check it and split it by hospital
and patient.

Takes: a folder of raw records. Gives: ``cohort.parquet`` + ``signals.f32`` (:mod:`.store`),
quarantine and validation reports, ``splits.parquet``. In pipeline order: :mod:`.readers`,
:mod:`.canonical`, :mod:`.labels`, :mod:`.signal_checks`, :mod:`.ingest` (with
:mod:`.screening` and :mod:`.record_loader`), :mod:`.store`, :mod:`.validate` (running the
suite of :mod:`.expectations`), :mod:`.split`; :mod:`.features` measures the signal for the
baselines, the vision targets and the findings. Used by every stage after it: :mod:`.folders`
(checking an ``--out`` folder, writing an output folder whole) and :mod:`.yaml_config` (the one
safe loader of the YAML files a user hands the command line).
"""
