"""The imaging stage: draw each canonical signal as the 12-lead page the model reads.

Takes: a cohort (:mod:`ecg_r1.data.store`). Gives: one PNG a record and ``index.parquet``.
Modules, in the order they build on each other: :mod:`.augment` (optional scan-like image
augmentations), :mod:`.layouts` (the layouts' names), :mod:`.page` (settings, presets and the
page's geometry), :mod:`.png` (a page image written as a PNG file, atomically), :mod:`.medians`
(the median-complex layout's traces), :mod:`.draw` (a signal drawn as a page image or PNG file),
:mod:`.render` (a whole cohort, in worker processes, cached by content hash).
"""
