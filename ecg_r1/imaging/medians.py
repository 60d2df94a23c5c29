"""The median-beat page's traces: each lead's representative beat stretched over its panel.

Takes: a canonical signal and the page plan of layout ``"medians+rhythm"`` (:mod:`.page`).
Gives: :func:`median_traces`, the ``(13, 5000)`` traces :mod:`.draw` plots for that layout, and
:func:`median_scale`, the speed and gain the panels are drawn at (printed in the page header).

Why a median page: on the 224 px page the tiny model reads, 25 mm/s and 10 mm/mV put a 0.2 mV
T-wave inversion under 2 px tall and a T wave about 4 px wide, and a 14 px vision patch spans more
than half a beat. ECG machines print a median-complex report for the same reason a reader wants
it: the lead's representative beat (:func:`ecg_r1.data.features.median_beats`: muscle noise and
wander averaged out over up to nine beats) shown larger. Here each panel of the 3x4 grid holds its
lead's median beat (-0.30 to +0.55 s around the QRS) resampled to fill the panel's 2.5 s of paper
(about 3x the speed) at :data:`MEDIAN_GAIN_FACTOR` times the page's gain. The rhythm strip keeps
lead II in full at the page's speed and gain, so rate and rhythm stay on the page.

A record whose median beat cannot be measured (fewer than three clean beats, a flat lead) shows
that lead's raw 2.5 s segment in its panel instead, as the 3x4 layout would.
"""

from __future__ import annotations

import numpy as np

from ecg_r1.data.canonical import LEADS, N_SAMPLES
from ecg_r1.data.features import MEDIAN_BEAT_SAMPLES, median_beats
from ecg_r1.imaging.page import RHYTHM_TRACE, PagePlan, RenderConfig, plan_page

MEDIAN_GAIN_FACTOR: float = 2.0  # panels at twice the page gain: 20 mm/mV on a standard page


def median_traces(signal: np.ndarray, plan: PagePlan) -> np.ndarray:
    """Traces for the medians layout: rows 0-11 hold each lead's median beat within its panel's
    samples (NaN elsewhere), row 12 (:data:`~.page.RHYTHM_TRACE`) lead II in full.

    Args:
        signal: canonical ``(12, 5000)`` signal in mV.
        plan: ``plan_page`` of a ``"medians+rhythm"`` config.

    Returns:
        ``(13, 5000)`` float32 traces in mV (the panels already scaled by :data:`MEDIAN_GAIN_FACTOR`).
    """
    medians = median_beats(signal[None])[0]  # (12, MEDIAN_BEAT_SAMPLES)
    traces = np.full((len(LEADS) + 1, N_SAMPLES), np.nan, dtype=np.float32)
    traces[RHYTHM_TRACE] = signal[LEADS.index("II")]
    beat_t = np.arange(MEDIAN_BEAT_SAMPLES)
    for seg in plan.segments:
        if seg.lead == RHYTHM_TRACE:
            continue
        width = seg.last - seg.first + 1
        beat = medians[seg.lead]
        if np.isfinite(beat).all():
            panel = np.interp(np.linspace(0, MEDIAN_BEAT_SAMPLES - 1, width), beat_t, beat)
            traces[seg.lead, seg.first : seg.last + 1] = MEDIAN_GAIN_FACTOR * panel
        else:
            traces[seg.lead, seg.first : seg.last + 1] = signal[seg.lead, seg.first : seg.last + 1]
    return traces


def median_scale(config: RenderConfig) -> tuple[float, float]:
    """The panels' effective paper speed (mm/s) and gain (mm/mV) on a medians page."""
    first = next(s for s in plan_page(config).segments if s.lead != RHYTHM_TRACE)
    stretch = (first.last - first.first + 1) / MEDIAN_BEAT_SAMPLES  # panel samples per beat sample
    return config.speed_mm_per_s * stretch, config.gain_mm_per_mv * MEDIAN_GAIN_FACTOR
