"""The imaging stage: draw each canonical signal as the 12-lead page the model reads.

Takes: a cohort (:mod:`ecg_r1.data.store`). Gives: one PNG a record and ``index.parquet``
(:mod:`.render`); :mod:`.augment` holds the optional scan-like image augmentations.
"""
