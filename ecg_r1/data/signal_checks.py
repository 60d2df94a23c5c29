"""Vectorised signal-quality checks on canonical signals (n, 12, 5000) in mV.

Ingest runs them on each chunk of records and quarantines failures with the reason from
:func:`signal_issue`; the validation suite reuses :func:`signal_quality` on the stored cohort.
All thresholds are the named constants below.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from ecg_r1.data.canonical import LEADS

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
# is as smooth as an ECG and passes: a QRS-periodicity test would catch it, but its score
# overlapped between noise and real records (atrial fibrillation, noisy leads) on the shared data.
MIN_LAG1_CORRELATION = 0.85

QUALITY_COLUMNS = (
    "nan_samples",
    "flat_leads",
    "saturated_leads",
    "max_abs_mv",
    "max_ptp_mv",
    "max_lag1_corr",
)
# Samples a group when screening for saturation (5000 = 100 groups of 50).
_BLOCK = 50


def signal_quality(signals: np.ndarray) -> pl.DataFrame:
    """Measure each record's signal quality.

    Args:
        signals: float array (n, 12, n_samples) in mV (a memmap works; it is read once).

    Returns:
        One row a record: ``nan_samples`` (count of NaN or infinite samples), ``flat_leads`` and ``saturated_leads``
        (comma-joined lead names, "" when none), ``max_abs_mv`` (largest absolute value) and
        ``max_ptp_mv`` (largest peak-to-peak range over the leads), NaN ignored, and
        ``max_lag1_corr`` (lag-1 autocorrelation of the smoothest lead; a lead with no variation or
        missing samples counts as 1).
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
        },
        schema={
            "nan_samples": pl.Int64,
            "flat_leads": pl.String,
            "saturated_leads": pl.String,
            "max_abs_mv": pl.Float64,
            "max_ptp_mv": pl.Float64,
            "max_lag1_corr": pl.Float64,
        },
    )


def signal_issues(signals: np.ndarray) -> list[tuple[str, str] | None]:
    """Quarantine reason and message for each record, or None when it passes.

    Args:
        signals: float array (n, 12, n_samples) in mV.

    Returns:
        One entry a record: ``(reason, message)`` or None.
    """
    measures = _measure(np.asarray(signals))
    # Python scalars in one call each, and lead names only where a lead failed: the per-record
    # loop runs for every record ingested.
    nan_samples = measures["nan_samples"].tolist()
    flat, saturated = measures["flat"], measures["saturated"]
    any_flat = flat.any(axis=1).tolist()
    any_saturated = saturated.any(axis=1).tolist()
    max_abs = measures["max_abs"].tolist()
    max_ptp = measures["max_ptp"].tolist()
    max_lag1 = measures["max_lag1"].tolist()
    return [
        signal_issue(
            nan_samples[i],
            _lead_names(flat[i]) if any_flat[i] else "",
            _lead_names(saturated[i]) if any_saturated[i] else "",
            max_abs[i],
            max_ptp[i],
            max_lag1[i],
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
) -> tuple[str, str] | None:
    """The first failed check of one record (the columns of :func:`signal_quality`).

    Returns:
        ``(reason, message)`` with reason ``nan_samples``, ``implausible_amplitude``,
        ``flat_lead``, ``saturated_lead`` or ``no_ecg_structure``; None when the record passes.
    """
    if nan_samples:
        return (
            "nan_samples",
            f"{nan_samples} samples are missing or not finite (NaN, infinite, or the WFDB invalid value "
            "-32768); "
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
    return None


def _measure(signals: np.ndarray) -> dict[str, np.ndarray]:
    if signals.ndim != 3 or signals.shape[1] != len(LEADS):
        raise ValueError(f"expected signals of shape (n, {len(LEADS)}, n_samples), got {signals.shape}")
    if len(signals) > _BATCH:
        # Several passes run over each batch: batches that fit the CPU cache make them about twice
        # as fast as passes over the whole array (and keep a memmap's pages in memory once).
        parts = [_measure_batch(signals[i : i + _BATCH]) for i in range(0, len(signals), _BATCH)]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    return _measure_batch(signals)


# Records a batch: 8 x 12 x 5000 float32 is 1.9 MB.
_BATCH = 8


def _measure_batch(signals: np.ndarray) -> dict[str, np.ndarray]:
    """Two passes (block maxima and minima) for everything; exact counts only where needed.

    NaN propagates through max, so the block maxima also find records with missing samples.
    Saturation needs the number of samples at a lead's extreme: a lead can only reach
    ``SATURATION_FRACTION`` if enough 50-sample groups reach that extreme, so the exact count is
    taken only for those few leads (a few % of real leads), not for every sample of every lead.
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
    # counts as smooth (the flat check names it).
    centred = signals - signals.mean(axis=2, keepdims=True)
    power = np.einsum("ijk,ijk->ij", centred, centred)
    lagged = np.einsum("ijk,ijk->ij", centred[:, :, 1:], centred[:, :, :-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        lag1 = np.where(power > 0, lagged / power, 1.0)
    needed = SATURATION_FRACTION * n_samples
    candidates = (
        ((block_max == lead_max[:, :, None]).sum(axis=2) * block >= needed)
        | ((block_min == lead_min[:, :, None]).sum(axis=2) * block >= needed)
    ) & ~flat
    saturated = np.zeros_like(flat)
    for record, lead in zip(*np.nonzero(candidates), strict=True):
        values = signals[record, lead]
        at_extreme = max(
            np.count_nonzero(values == lead_max[record, lead]),
            np.count_nonzero(values == lead_min[record, lead]),
        )
        saturated[record, lead] = at_extreme >= needed
    return {
        "nan_samples": nan_samples,
        "flat": flat,
        "saturated": saturated,
        "max_abs": np.maximum(np.abs(lead_max), np.abs(lead_min)).max(axis=1).astype(np.float64),
        "max_ptp": ptp.max(axis=1).astype(np.float64),
        "max_lag1": lag1.max(axis=1).astype(np.float64),
    }


def _lead_names(mask: np.ndarray) -> str:
    return ",".join(lead for lead, bad in zip(LEADS, mask, strict=True) if bad)
