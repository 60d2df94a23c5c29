"""Vectorised signal-quality checks on canonical signals (n, 12, 5000) in mV.

Ingest runs them on each chunk of records and quarantines failures with the reason from
:func:`signal_issue`; the validation suite reuses :func:`signal_quality` on the stored cohort.
All thresholds are the named constants below.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
from numpy.typing import DTypeLike
from scipy.ndimage import uniform_filter1d

from ecg_r1.data.canonical import FS, LEADS, N_SAMPLES
from ecg_r1.data.features import beats_from_energy

# A lead whose peak-to-peak range is below this is flat: an unplugged electrode or a zeroed
# channel. Real leads show at least the QRS (well over 0.1 mV); 10 µV is below any ECG.
FLAT_PTP_MV = 0.01
# A lead is saturated when this fraction of its samples sits exactly at its own minimum or
# maximum: a clipped amplifier plateaus there. A real QRS peak touches its maximum for a sample
# or two per beat (well under 1 %); 2 % is 100 samples (0.2 s) of plateau.
SATURATION_FRACTION = 0.02
# Largest plausible peak-to-peak range of a lead (mV). The tallest real QRS complexes reach
# about 5-6 mV and baseline wander adds a few mV (the shared LUDB and CinC records peak at
# 15.3 mV); far larger ranges mean a wrong gain or units (e.g. µV read as mV).
MAX_PTP_MV = 40.0
# All 12 leads below this peak-to-peak range: a gain 1000 times too large (mV read as µV).
MIN_RECORD_PTP_MV = 0.05
# A record none of whose leads has a lag-1 autocorrelation (at 500 Hz) of at least this has no ECG
# structure. An ECG's power lies mostly below 40 Hz, so neighbouring samples are nearly equal: the
# smoothest lead of every shared LUDB and CinC record and of the simulated cohort is above 0.97.
# Random bytes read as samples are white noise (about 0; 0.05 when resampled from 1000 Hz, 0.67
# from 250 Hz, 0.78 from 200 Hz), and so is a file whose header names the wrong format; 50/60 Hz
# mains hum drowning every lead gives 0.81/0.73. Noise sampled below about 170 Hz (or smoothed)
# is as smooth as an ECG and passes this test; :data:`MIN_QRS_PEAKINESS` catches it.
MIN_LAG1_CORRELATION = 0.85
# A record whose QRS energy (:func:`ecg_r1.data.features.qrs_energy`'s recipe: 20 ms slopes of the 8
# independent leads, squared, summed, smoothed over 40 ms) peaks at less than this multiple of
# its median (99th over 50th percentile) has no QRS complexes: noise has no such structure. An
# ECG's energy sits in its QRS complexes, a tenth of the time, so the ratio is large whatever the
# rhythm (atrial fibrillation too): at least 40.8 on the 249 shared LUDB/CinC records that pass the
# other checks and 6.3 on 4,000 simulated ones (the noisiest hospital). Noise of any colour (3,000
# records: white noise sampled at 50-250 Hz, uniform bytes at 60-120 Hz, low-passed at 10-40 Hz,
# moving averages, pink, brown, Laplace, a sine in noise) stays below it; see
# ``benchmarks/plausibility.py``.
MIN_QRS_PEAKINESS = 3.0
# Difference span of that QRS energy: 20 ms cancels 50 Hz mains and its harmonics and most muscle
# noise (with 10 ms, a simulated noisy low-voltage LBBB record fell to 2.8).
QRS_ENERGY_SPAN_MS = 20.0
# Fewest QRS complexes and lowest heart rate (from their median interval) a 10 s record may have.
# Below, the header's sampling rate is too low (a 500 Hz recording declared as 50 Hz is 1 s of
# ECG stretched over 10 s: one or two beats, about 7 bpm). The shared real records start at
# 40 bpm and 5 beats, the simulated at 44 bpm and 7 beats; sustained rates below 25 bpm are
# not compatible with a recorded, conscious patient's escape rhythms.
MIN_BEATS = 3
MIN_HR_BPM = 25.0

# Samples a group when screening for saturation (5000 = 250 groups of 20). A lead is counted
# exactly only when at least 5 groups (2 % of 5000 samples over 20) reach its extreme. With groups
# of 50, two samples at a lead's maximum (common in integer ADC data) made a lead a candidate:
# 5.3 leads a record on 80 shared LUDB/CinC records, against 0.95 with 20 (0.42 with 10, whose
# larger group arrays cost more to compare than the counts they save).
_BLOCK = 20


def signal_quality(signals: np.ndarray) -> pl.DataFrame:
    """Measure each record's signal quality.

    Args:
        signals: float array (n, 12, n_samples) in mV (a memmap works; it is read once).

    Returns:
        One row a record: ``nan_samples`` (count of NaN or infinite samples), ``flat_leads`` and ``saturated_leads``
        (comma-joined lead names, "" when none), ``max_abs_mv`` (largest absolute value) and
        ``max_ptp_mv`` (largest peak-to-peak range over the leads), NaN ignored, and
        ``max_lag1_corr`` (lag-1 autocorrelation of the smoothest lead; a lead with no variation or
        missing samples counts as 1), ``qrs_peakiness`` (99th over 50th percentile of the QRS
        energy), ``n_beats`` (QRS complexes found) and ``hr_bpm`` (from their median interval;
        NaN with fewer than 2).
    """
    measures = _measure(np.asarray(signals))
    return pl.DataFrame(
        {
            "nan_samples": measures["nan_samples"],
            "flat_leads": [_lead_names(row) for row in measures["flat"]],
            "saturated_leads": [_lead_names(row) for row in measures["saturated"]],
            "max_abs_mv": measures["max_abs"],
            "max_ptp_mv": measures["max_ptp"],
            "max_lag1_corr": measures["max_lag1"],
            "qrs_peakiness": measures["peakiness"],
            "n_beats": measures["n_beats"],
            "hr_bpm": measures["hr"],
        },
        schema={
            "nan_samples": pl.Int64,
            "flat_leads": pl.String,
            "saturated_leads": pl.String,
            "max_abs_mv": pl.Float64,
            "max_ptp_mv": pl.Float64,
            "max_lag1_corr": pl.Float64,
            "qrs_peakiness": pl.Float64,
            "n_beats": pl.Int64,
            "hr_bpm": pl.Float64,
        },
    )


def signal_issues(signals: np.ndarray, scratch: np.ndarray | None = None) -> list[tuple[str, str] | None]:
    """Quarantine reason and message for each record, or None when it passes.

    Args:
        signals: float array (n, 12, n_samples) in mV.
        scratch: working memory for the checks, from :func:`check_scratch` (for signals of this
            many samples); a caller that checks batch after batch passes the same one each time,
            since a fresh 2 MB array a batch costs its page faults (about 10 % of an ingest's
            time). None: allocated here.

    Returns:
        One entry a record: ``(reason, message)`` or None.
    """
    measures = _measure(np.asarray(signals), exact=False, scratch=scratch)
    # Python scalars in one call each, and lead names only where a lead failed: the per-record
    # loop runs for every record ingested.
    nan_samples = measures["nan_samples"].tolist()
    flat, saturated = measures["flat"], measures["saturated"]
    any_flat = flat.any(axis=1).tolist()
    any_saturated = saturated.any(axis=1).tolist()
    max_abs = measures["max_abs"].tolist()
    max_ptp = measures["max_ptp"].tolist()
    max_lag1 = measures["max_lag1"].tolist()
    peakiness = measures["peakiness"].tolist()
    n_beats = measures["n_beats"].tolist()
    hr = measures["hr"].tolist()
    return [
        signal_issue(
            nan_samples[i],
            _lead_names(flat[i]) if any_flat[i] else "",
            _lead_names(saturated[i]) if any_saturated[i] else "",
            max_abs[i],
            max_ptp[i],
            max_lag1[i],
            peakiness[i],
            n_beats[i],
            hr[i],
        )
        for i in range(len(nan_samples))
    ]


def signal_issue(
    nan_samples: int,
    flat_leads: str,
    saturated_leads: str,
    max_abs_mv: float,
    max_ptp_mv: float,
    max_lag1_corr: float,
    qrs_peakiness: float = math.inf,
    n_beats: int = MIN_BEATS,
    hr_bpm: float = math.nan,
) -> tuple[str, str] | None:
    """The first failed check of one record (the columns of :func:`signal_quality`).

    Nine parameters, one per measured column: :func:`signal_issues` calls it for every record
    ingested with the plain Python scalars it converted column by column, so that loop builds no
    object per record.

    Returns:
        ``(reason, message)`` with reason ``nan_samples``, ``implausible_amplitude``,
        ``flat_lead``, ``saturated_lead``, ``no_ecg_structure`` or ``implausible_rate``; None when
        the record passes.
    """
    if nan_samples:
        return (
            "nan_samples",
            f"{nan_samples} samples are missing or not finite (NaN, infinite, or the value WFDB's storage "
            "format marks a missing sample with, e.g. -32768 in format 16, -2048 in 212, -128 in 80); "
            "re-export the record without gaps or leave it out",
        )
    if max_ptp_mv > MAX_PTP_MV or max_ptp_mv < MIN_RECORD_PTP_MV:
        return (
            "implausible_amplitude",
            f"largest peak-to-peak range over the leads is {max_ptp_mv:.3g} mV (plausible: "
            f"{MIN_RECORD_PTP_MV:g} to {MAX_PTP_MV:g} mV): the header's gain or units are wrong; check the "
            "ADC gain (units per mV) and the units (mV/uV) in the header",
        )
    if flat_leads:
        return (
            "flat_lead",
            f"lead(s) {flat_leads} are flat (peak-to-peak below {FLAT_PTP_MV * 1000:g} µV): an electrode "
            "was off or the channel is empty; re-record or leave the record out",
        )
    if saturated_leads:
        return (
            "saturated_lead",
            f"lead(s) {saturated_leads} are clipped (at least {SATURATION_FRACTION:.0%} of samples at the "
            "lead's limit): the amplifier saturated; re-record or leave the record out",
        )
    if max_lag1_corr < MIN_LAG1_CORRELATION:
        return (
            "no_ecg_structure",
            f"no lead looks like an ECG: the smoothest lead's sample-to-sample correlation is "
            f"{max_lag1_corr:.2f} (an ECG's is above {MIN_LAG1_CORRELATION:g}), as in noise or random "
            "data; check the signal format in the header and that the file holds this record",
        )
    if qrs_peakiness < MIN_QRS_PEAKINESS:
        return (
            "no_ecg_structure",
            f"no QRS complexes: the signal's slope energy peaks at {qrs_peakiness:.1f} times its median "
            f"(an ECG's QRS complexes reach at least {MIN_QRS_PEAKINESS:g} times), as in noise; check the "
            "signal format and sampling rate in the header and that the file holds this record",
        )
    if n_beats < MIN_BEATS or hr_bpm < MIN_HR_BPM:
        rate = f", {hr_bpm:.0f} bpm" if math.isfinite(hr_bpm) else ""
        return (
            "implausible_rate",
            f"{n_beats} QRS complexes in 10 s{rate} at the header's sampling rate (an ECG has at least "
            f"{MIN_BEATS}, {MIN_HR_BPM:g} bpm): the header's sampling rate is most likely too low (a "
            "500 Hz recording declared as 50 Hz shows 1 s of ECG stretched over 10 s): check the rate "
            "in the record line",
        )
    return None


def check_scratch(n_records: int, n_samples: int = N_SAMPLES, dtype: DTypeLike = np.float32) -> np.ndarray:
    """Working memory for checking up to ``n_records`` signals of ``n_samples`` (see
    :func:`signal_issues`): it holds one batch's centred signals, then its QRS slopes."""
    return np.empty((min(n_records, _BATCH), len(LEADS), n_samples), dtype=dtype)


def _measure(
    signals: np.ndarray, exact: bool = True, scratch: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    if signals.ndim != 3 or signals.shape[1] != len(LEADS):
        raise ValueError(f"expected signals of shape (n, {len(LEADS)}, n_samples), got {signals.shape}")
    dtype = np.result_type(signals.dtype, np.float32)  # of the centred signals
    if scratch is None:
        scratch = check_scratch(len(signals), signals.shape[2], dtype)
    elif (
        scratch.shape[1:] != signals.shape[1:]
        or len(scratch) < min(len(signals), _BATCH)
        or scratch.dtype != dtype
    ):
        raise ValueError(
            f"scratch of {scratch.dtype} {scratch.shape} does not fit signals of {signals.dtype} "
            f"{signals.shape} (see check_scratch)"
        )
    if len(signals) > _BATCH:
        # Several passes run over each batch: batches that fit the CPU cache make them about twice
        # as fast as passes over the whole array (and keep a memmap's pages in memory once).
        parts = [
            _measure_batch(signals[i : i + _BATCH], scratch, exact) for i in range(0, len(signals), _BATCH)
        ]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    return _measure_batch(signals, scratch, exact)


# Records a batch: 8 x 12 x 5000 float32 is 1.9 MB.
_BATCH = 8


def _measure_batch(signals: np.ndarray, scratch: np.ndarray, exact: bool = True) -> dict[str, np.ndarray]:
    """Two passes (block maxima and minima) for everything; exact counts only where needed.

    NaN propagates through max, so the block maxima also find records with missing samples.
    Saturation needs the number of samples at a lead's extreme: a lead can only reach
    ``SATURATION_FRACTION`` if enough groups of :data:`_BLOCK` samples reach that extreme, so the
    exact count is taken only for those few leads (under one a record on the shared records), not
    for every sample of every lead. ``scratch`` holds the centred signals, then the QRS slopes.
    """
    signals = np.asarray(signals)
    n_records, n_leads, n_samples = signals.shape
    block = _BLOCK if n_samples and n_samples % _BLOCK == 0 else max(n_samples, 1)
    # Groups of `block` samples taken with a stride (sample i in group i % n_groups): reducing
    # over the middle axis runs over contiguous rows, about 3 times faster than contiguous blocks,
    # and the screening argument holds for any partition of the samples.
    groups = signals.reshape(n_records, n_leads, block, -1)
    block_max = groups.max(axis=2) if n_samples else np.zeros((n_records, n_leads, 1), signals.dtype)
    block_min = groups.min(axis=2) if n_samples else np.zeros((n_records, n_leads, 1), signals.dtype)
    lead_max = block_max.max(axis=2)
    lead_min = block_min.min(axis=2)
    nan_samples = np.zeros(n_records, dtype=np.int64)
    # Infinite samples count as missing too: a lead of +inf has max == min, and would otherwise
    # pass for a flat line or an amplifier stuck at its limit.
    has_bad = ~(np.isfinite(lead_max).all(axis=1) & np.isfinite(lead_min).all(axis=1))
    for record in np.flatnonzero(has_bad):
        finite = np.isfinite(signals[record])
        nan_samples[record] = int(finite.size - np.count_nonzero(finite))
        lead_max[record] = np.max(signals[record], axis=1, where=finite, initial=-np.inf)
        lead_min[record] = np.min(signals[record], axis=1, where=finite, initial=np.inf)
        lead_max[record] = np.where(np.isfinite(lead_max[record]), lead_max[record], 0.0)
        lead_min[record] = np.where(np.isfinite(lead_min[record]), lead_min[record], 0.0)
    ptp = lead_max - lead_min
    flat = ptp < FLAT_PTP_MV
    # Lag-1 autocorrelation of each lead: two products over the centred samples, no spectrum and
    # no difference array (np.diff made this check 3 times slower). A lead with no variation
    # counts as smooth (the flat check names it). np.vecdot: faster than einsum here, and its
    # sums are closer to float64 ones.
    centred = np.subtract(signals, signals.mean(axis=2, keepdims=True), out=scratch[:n_records])
    power = np.vecdot(centred, centred)
    lagged = np.vecdot(centred[:, :, 1:], centred[:, :, :-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        lag1 = np.where(power > 0, lagged / power, 1.0)
    needed = SATURATION_FRACTION * n_samples
    candidates = (
        ((block_max == lead_max[:, :, None]).sum(axis=2) * block >= needed)
        | ((block_min == lead_min[:, :, None]).sum(axis=2) * block >= needed)
    ) & ~flat
    saturated = np.zeros_like(flat)
    records, leads = np.nonzero(candidates)
    if len(records):
        # The candidate leads of the batch counted together: one gather, two comparisons.
        values = signals[records, leads]
        at_extreme = np.maximum(
            np.count_nonzero(values == lead_max[records, leads, None], axis=1),
            np.count_nonzero(values == lead_min[records, leads, None], axis=1),
        )
        saturated[records, leads] = at_extreme >= needed
    peakiness, n_beats, hr = _qrs_structure(signals, ~has_bad & ~flat.all(axis=1), scratch, exact)
    return {
        "peakiness": peakiness,
        "n_beats": n_beats,
        "hr": hr,
        "nan_samples": nan_samples,
        "flat": flat,
        "saturated": saturated,
        "max_abs": np.maximum(np.abs(lead_max), np.abs(lead_min)).max(axis=1).astype(np.float64),
        "max_ptp": ptp.max(axis=1).astype(np.float64),
        "max_lag1": lag1.max(axis=1).astype(np.float64),
    }


def _qrs_structure(
    signals: np.ndarray, usable: np.ndarray, scratch: np.ndarray, exact: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """QRS peakiness, QRS complexes found and heart rate of each record (the project's beat
    detector, :mod:`ecg_r1.data.features`); records not ``usable`` (non-finite or all flat: other checks
    name them) get values that pass.

    The energy is smoothed over 40 ms, so every 4th sample (125 Hz) keeps its peaks and
    percentiles; it is computed from every other sample (250 Hz, where a 20 ms slope still sees
    the QRS). With ``exact`` False (ingest) the beats are counted only
    where the rate check could fail: a record whose energy crosses the beat threshold in every
    :data:`_BEAT_WINDOW_S` window has beats at most 2.4 s apart (25 bpm, a window each side plus the
    250 ms a detected peak may move), so its beat count and rate are left at values that pass.
    ``scratch`` (free once the lag-1 products are taken) holds the slopes.
    """
    n = len(signals)
    peakiness = np.full(n, np.inf)
    n_beats = np.full(n, MIN_BEATS, dtype=np.int64)
    hr = np.full(n, np.nan)
    index = np.flatnonzero(usable)
    if not len(index) or signals.shape[-1] < FS:
        return peakiness, n_beats, hr
    part = signals if len(index) == n else signals[index]
    # The QRS energy of ecg_r1.data.features at 250 Hz (every other sample: half the work; the 20 ms
    # difference and 40 ms smoothing keep their lengths), then every other sample of it.
    # I, II and V1-V6 only: III, aVR, aVL and aVF are combinations of I and II and add no QRS.
    # The slopes are taken straight from the two blocks of those rows into the scratch memory:
    # no gathered copy of the leads, no fresh array.
    span = round(QRS_ENERGY_SPAN_MS * FS / 2000)
    n_slopes = (part.shape[-1] + 1) // 2 - span
    slopes = scratch.reshape(-1)[: len(part) * _N_INDEPENDENT * n_slopes].reshape(
        len(part), _N_INDEPENDENT, n_slopes
    )
    row = 0
    for rows in _INDEPENDENT_ROWS:
        block = part[:, rows]
        np.subtract(
            block[..., 2 * span : 2 * (span + n_slopes) : 2],
            block[..., : 2 * n_slopes : 2],
            out=slopes[:, row : row + block.shape[1]],
        )
        row += block.shape[1]
    energy = uniform_filter1d(np.einsum("cln,cln->cn", slopes, slopes), size=round(0.04 * FS / 2), axis=-1)
    energy = energy[:, :: _DECIMATE // 2]
    # Order statistics by one partition (np.quantile's interpolation is not needed here).
    k50, k99 = energy.shape[1] // 2, int(0.99 * (energy.shape[1] - 1))
    ordered = np.partition(energy, (k50, k99), axis=-1)
    median, q99 = ordered[:, k50], ordered[:, k99]
    with np.errstate(divide="ignore", invalid="ignore"):
        # A median of 0 (piecewise constant samples) with slopes elsewhere is all structure.
        peakiness[index] = np.where(median > 0, q99 / median, np.where(q99 > 0, np.inf, 1.0))
    todo = np.arange(len(index))
    if not exact:
        window = int(_BEAT_WINDOW_S * FS / _DECIMATE)
        n_windows = energy.shape[1] // window
        maxima = energy[:, : n_windows * window].reshape(len(index), n_windows, window).max(axis=2)
        todo = np.flatnonzero(~(maxima >= 0.3 * q99[:, None]).all(axis=1))
    if len(todo):
        beats_all = beats_from_energy(energy[todo], q99[todo], QRS_ENERGY_SPAN_MS, _DECIMATE)
        for k, beats in zip(index[todo], beats_all, strict=True):
            n_beats[k] = len(beats)
            if len(beats) >= 2:
                hr[k] = 60.0 * FS / float(np.median(np.diff(beats)))
    return peakiness, n_beats, hr


# Rows of I and II, and of V1-V6, in LEADS (the leads the QRS energy sums).
_INDEPENDENT_ROWS = (
    slice(LEADS.index("I"), LEADS.index("II") + 1),
    slice(LEADS.index("V1"), LEADS.index("V6") + 1),
)
_N_INDEPENDENT = sum(rows.stop - rows.start for rows in _INDEPENDENT_ROWS)
# Decimation of the QRS energy (smoothed over 40 ms = 20 samples) in the structure checks.
_DECIMATE = 4
# Windows in which a record must show a QRS-sized energy peak to skip counting its beats.
_BEAT_WINDOW_S = 0.95


def _lead_names(mask: np.ndarray) -> str:
    return ",".join(lead for lead, bad in zip(LEADS, mask, strict=True) if bad)
