"""Measured ECG features: heart rate, QRS and QT, and per-lead T, ST and QRS measurements.

:func:`measure_features` turns canonical signals (``(n, 12, 5000)`` float32 mV at 500 Hz, rows in
:data:`ecg_r1.canonical.LEADS` order) into one table row per record. It is what the feature
baseline learns from, what the grounding reward checks the model's reasoning against (the leads
where T-wave inversion is *measured*), and what the vision pre-training predicts.

Method (one pass, vectorised over records and leads; only the beat detection and the median over
each record's beats loop over records):

1. **Beats.** A QRS energy signal is summed over the 12 leads: the first difference (which
   suppresses baseline wander and the slow P and T waves), smoothed over 10 ms, squared, summed,
   smoothed over 40 ms. Its peaks at least 250 ms apart and above 30 % of its 99th percentile are
   the beats (``scipy.signal.find_peaks``).
2. **Median beat.** A window of -300..+550 ms around every beat is cut from each lead; each beat's
   baseline is the line through its own PR level (mean of -100..-70 ms) and the next beat's, so
   baseline wander between the PR segment and the T wave is removed beat by beat. Beats whose QRS
   correlates poorly (< 0.8) with the first median (ectopics, artefacts) are left out when at least
   three beats remain; the median over the kept beats is the record's representative beat.
3. **QRS onset and offset** come from the spatial velocity of the median beat (sum over leads of
   the absolute slope): the first and last samples around the fiducial where it exceeds
   :data:`QRS_VELOCITY_FRACTION` of its QRS maximum. The isoelectric reference is the mean of the
   median beat over the 20 ms before QRS onset (the end of the PR segment).
4. **Per lead**, relative to that reference: ``st_L`` is the level at J + 60 ms (J = QRS offset);
   ``t_amp_L`` is the signed deviation of largest magnitude in the T window (J + 80 ms to
   R + min(460 ms, 0.7 RR)); ``t_sym_L`` is the ascending over the descending half-amplitude
   duration of that T wave (a normal T rises slowly and falls fast, ratio > 1; ischemic T waves
   are symmetric, ratio near 1), null when the T wave is flatter than :data:`T_SYM_MIN_MV`;
   ``qrs_amp_L`` is the peak-to-peak voltage between QRS onset and offset.
5. **QT**: QRS onset to T end, where T end is where the tangent at the steepest point of the
   T wave's descending limb crosses the baseline (the tangent method), measured in the lead with
   the largest T wave. Null when that T wave is below 0.1 mV or the QT falls outside 200-650 ms
   (then the measurement is not reliable).
6. **TWI rule**: a lead shows T-wave inversion when it is one of :data:`UPRIGHT_T_LEADS` (leads
   where the T wave is normally upright in adults: I, II, aVL, aVF, V2-V6; III, aVR and V1 are
   left out because a negative T is normal there) and its ``t_amp`` is below
   :data:`TWI_THRESHOLD_MV` (-0.1 mV, i.e. at least 1 mm deep at standard gain). ``twi_leads`` is
   the comma-joined list in :data:`LEADS` order; ``n_twi_leads`` its length.

A record that cannot be measured (non-finite samples, a flat line, fewer than
:data:`MIN_BEATS` beats) gets nulls in every measured column, never an exception; a lead that is
flat (lead off) gets nulls in its own columns and is never called inverted.
"""

from __future__ import annotations

import logging

import numpy as np
import polars as pl
from scipy.ndimage import uniform_filter1d
from scipy.signal import find_peaks

from ecg_r1.canonical import FS, LEADS, N_SAMPLES, normalize_lead_name

log = logging.getLogger(__name__)

UPRIGHT_T_LEADS: tuple[str, ...] = ("I", "II", "aVL", "aVF", "V2", "V3", "V4", "V5", "V6")
TWI_THRESHOLD_MV: float = -0.1
T_SYM_MIN_MV: float = 0.05  # below this a T wave is too flat for its limbs to be timed
QRS_VELOCITY_FRACTION: float = 0.12  # tuned against LUDB's cardiologist QRS onsets and offsets
MIN_BEATS: int = 3
FLAT_LEAD_MV: float = 0.02  # peak-to-peak over the whole record below this: lead off

_PRE = int(0.30 * FS)  # samples before the fiducial in a beat window
_POST = int(0.55 * FS)  # samples after it
_WIN = _PRE + _POST
_CHUNK = 128  # records per vectorised chunk: bounds memory at about 60 MB of float32

FEATURE_COLUMNS: tuple[str, ...] = (
    "hr_bpm",
    "qrs_ms",
    "qt_ms",
    "n_beats",
    *(f"t_amp_{lead}" for lead in LEADS),
    *(f"t_sym_{lead}" for lead in LEADS),
    *(f"st_{lead}" for lead in LEADS),
    *(f"qrs_amp_{lead}" for lead in LEADS),
)
"""Numeric columns of :func:`measure_features` (``twi_leads`` and ``n_twi_leads`` follow them)."""


def _ms(ms: float) -> int:
    return int(round(ms * FS / 1000))


def measure_features(signals: np.ndarray, chunk_size: int = _CHUNK) -> pl.DataFrame:
    """Measure heart rate, QRS, QT and per-lead T, ST and QRS features of every record.

    Args:
        signals: ``(n, 12, 5000)`` array in mV at 500 Hz, leads in :data:`LEADS` order (a
            cohort's memmap from :func:`ecg_r1.store.open_signals` works; it is read chunk by
            chunk).
        chunk_size: records measured together; larger chunks use more memory.

    Returns:
        One row per record, in input order: the :data:`FEATURE_COLUMNS` (Float64; ``n_beats``
        Int64), ``twi_leads`` (String, comma-joined, ``""`` when none) and ``n_twi_leads``
        (Int64). Unmeasurable records and leads have nulls.

    Raises:
        ValueError: when ``signals`` does not have the canonical shape.
    """
    if signals.ndim != 3 or signals.shape[1:] != (len(LEADS), N_SAMPLES):
        raise ValueError(
            f"signals must have shape (n, {len(LEADS)}, {N_SAMPLES}) (canonical form, see "
            f"ecg_r1.canonical), got {signals.shape}; canonicalize the records first"
        )
    n = signals.shape[0]
    parts = [
        _measure_chunk(np.asarray(signals[start : start + chunk_size], dtype=np.float32))
        for start in range(0, n, max(1, chunk_size))
    ]
    cols: dict[str, np.ndarray] = {}
    for name in FEATURE_COLUMNS:
        cols[name] = np.concatenate([p[name] for p in parts]) if parts else np.zeros(0)
    t_amp = np.stack([cols[f"t_amp_{lead}"] for lead in LEADS], axis=1) if n else np.zeros((0, 12))
    twi_leads, n_twi = _twi_from_t_amp(t_amp)
    frame = {name: pl.Series(name, values, dtype=pl.Float64, nan_to_null=True) for name, values in cols.items()}
    frame["n_beats"] = pl.Series("n_beats", cols["n_beats"], dtype=pl.Float64, nan_to_null=True).cast(pl.Int64)
    frame["twi_leads"] = pl.Series("twi_leads", twi_leads, dtype=pl.String)
    frame["n_twi_leads"] = pl.Series("n_twi_leads", n_twi, dtype=pl.Int64)
    unmeasurable = int(np.isnan(cols["hr_bpm"]).sum()) if n else 0
    if unmeasurable:
        log.warning("%d of %d records could not be measured (nulls in their feature row)", unmeasurable, n)
    return pl.DataFrame(frame)


def twi_lead_set(text: str | None, strict: bool = True) -> set[str]:
    """Parse a comma-joined lead list (``"V2,V3, v4"``) into standard lead names.

    Args:
        text: the list; None or blank gives the empty set.
        strict: raise on a name that is not one of the 12 leads (else skip it).

    Returns:
        The set of standard lead names (spelled as in :data:`LEADS`).

    Raises:
        ValueError: on an unknown lead name when ``strict``.

    Example:
        >>> sorted(twi_lead_set("v3, V2,AVL"))
        ['V2', 'V3', 'aVL']
    """
    if text is None:
        return set()
    out: set[str] = set()
    for token in text.split(","):
        token = token.strip()
        if not token:
            continue
        lead = normalize_lead_name(token)
        if lead is None:
            if strict:
                raise ValueError(
                    f"{token!r} in {text!r} is not a lead name; expected comma-joined names from {list(LEADS)}"
                )
            continue
        out.add(lead)
    return out


def _twi_from_t_amp(t_amp: np.ndarray) -> tuple[list[str | None], np.ndarray]:
    upright = np.array([lead in UPRIGHT_T_LEADS for lead in LEADS])
    inverted = (t_amp < TWI_THRESHOLD_MV) & upright[None, :]  # NaN compares False: never inverted
    measured = ~np.all(np.isnan(t_amp), axis=1)
    names: list[str | None] = []
    counts = np.full(len(t_amp), -1, dtype=np.int64)
    for i in range(len(t_amp)):
        if not measured[i]:
            names.append(None)
            continue
        leads = [LEADS[j] for j in np.flatnonzero(inverted[i])]
        names.append(",".join(leads))
        counts[i] = len(leads)
    n_twi = pl.Series(counts).replace(-1, None).to_numpy() if len(counts) else counts
    return names, n_twi


def _nan_cols(c: int) -> dict[str, np.ndarray]:
    return {name: np.full(c, np.nan) for name in FEATURE_COLUMNS}


def _detect_beats(x: np.ndarray) -> list[np.ndarray]:
    """Fiducial sample of every QRS complex, per record of a chunk ``(c, 12, N)``."""
    # A 10 ms difference is a first difference smoothed over 10 ms, at the cost of one subtraction.
    span = _ms(10)
    d = x[..., span:] - x[..., :-span]
    energy = np.einsum("cln,cln->cn", d, d)
    energy = uniform_filter1d(energy, size=_ms(40), axis=-1)
    q99 = np.quantile(energy, 0.99, axis=-1)
    beats = []
    for i in range(len(x)):
        if not np.isfinite(q99[i]) or q99[i] <= 0:
            beats.append(np.zeros(0, dtype=np.int64))
            continue
        peaks, _ = find_peaks(energy[i], height=0.3 * q99[i], distance=_ms(250))
        # The difference x[t + span] - x[t] is centred half a span after t.
        beats.append(peaks.astype(np.int64) + span // 2)
    return beats


def _median_beats(x: np.ndarray, beats: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Baseline-corrected median beat ``(c, 12, WIN)``, median RR (samples) and beats used."""
    c = len(x)
    med = np.full((c, len(LEADS), _WIN), np.nan, dtype=np.float32)
    rr = np.full(c, np.nan)
    used = np.zeros(c, dtype=np.int64)
    offsets = np.arange(-_PRE, _POST)
    pr_lo, pr_hi = _PRE - _ms(100), _PRE - _ms(70)
    qrs_lo, qrs_hi = _PRE - _ms(60), _PRE + _ms(60)
    for i in range(c):
        r_all = beats[i]
        if len(r_all) >= 2:
            rr[i] = float(np.median(np.diff(r_all)))
        r = r_all[(r_all >= _PRE) & (r_all + _POST <= N_SAMPLES)]
        if len(r) < MIN_BEATS:
            continue
        seg = x[i][:, r[:, None] + offsets[None, :]].transpose(1, 0, 2)  # (k, 12, WIN)
        pr = seg[:, :, pr_lo:pr_hi].mean(axis=-1)  # (k, 12)
        # Linear baseline through this beat's PR level and the next one's (wander removal).
        nxt = np.searchsorted(r_all, r, side="right")
        has_next = nxt < len(r_all)
        rr_next = np.where(has_next, r_all[np.minimum(nxt, len(r_all) - 1)] - r, 1)
        pr_next = pr.copy()
        if has_next.any():
            nxt_r = r_all[nxt[has_next]]
            lo = np.clip(nxt_r - _PRE + pr_lo, 0, N_SAMPLES - 1)
            hi = np.clip(nxt_r - _PRE + pr_hi, 1, N_SAMPLES)
            for j, (a, b) in zip(np.flatnonzero(has_next), zip(lo, hi, strict=True), strict=True):
                pr_next[j] = x[i][:, a:b].mean(axis=-1) if b > a else pr[j]
        slope = (pr_next - pr) / rr_next[:, None]  # mV per sample
        t_rel = (offsets - (pr_lo + pr_hi) / 2 + _PRE)[None, None, :]
        seg = seg - (pr[:, :, None] + slope[:, :, None] * t_rel)
        qrs = seg[:, :, qrs_lo:qrs_hi]
        keep = _correlated(qrs, _median0(qrs))
        if keep.sum() >= MIN_BEATS:
            seg = seg[keep]
        med[i] = _median0(seg)
        used[i] = len(seg)
    return med, rr, used


def _median0(a: np.ndarray) -> np.ndarray:
    """Median over axis 0; a sort over the few beats is several times faster than ``np.median``."""
    s = np.sort(a, axis=0)
    k = len(a)
    return s[k // 2] if k % 2 else 0.5 * (s[k // 2 - 1] + s[k // 2])


def _correlated(seg: np.ndarray, template: np.ndarray, threshold: float = 0.8) -> np.ndarray:
    a = seg.reshape(len(seg), -1)
    a = a - a.mean(axis=1, keepdims=True)
    b = template.reshape(-1) - template.mean()
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (a @ b) / denom
    return np.nan_to_num(corr) >= threshold


def _measure_chunk(x: np.ndarray) -> dict[str, np.ndarray]:
    c = len(x)
    out = _nan_cols(c)
    finite = np.isfinite(x).all(axis=(1, 2))
    x = np.where(finite[:, None, None], x, 0.0).astype(np.float32)
    lead_ptp = np.ptp(x, axis=-1)  # (c, 12)
    lead_ok = lead_ptp >= FLAT_LEAD_MV
    beats = _detect_beats(x * lead_ok[:, :, None])
    med, rr, used = _median_beats(x, beats)
    ok = finite & (used >= MIN_BEATS) & lead_ok.any(axis=1)
    if not ok.any():
        return out
    idx = np.flatnonzero(ok)
    m = med[idx].astype(np.float64)  # (k, 12, WIN)
    k = len(idx)
    lead_good = lead_ok[idx]
    rr_k = rr[idx]
    t = np.arange(_WIN)

    # QRS onset / offset from the spatial velocity around the fiducial.
    vel = np.abs(np.diff(m, axis=-1)) * lead_good[:, :, None]
    vel = uniform_filter1d(vel.sum(axis=1), size=3, axis=-1)  # (k, WIN-1)
    qrs_lo, qrs_hi = _PRE - _ms(120), _PRE + _ms(150)
    vmax = vel[:, _PRE - _ms(60) : _PRE + _ms(60)].max(axis=1)
    below = vel < (QRS_VELOCITY_FRACTION * vmax)[:, None]
    tv = t[:-1][None, :]
    onset = np.where(below & (tv < _PRE) & (tv >= qrs_lo), tv, qrs_lo).max(axis=1) + 1
    offset = np.where(below & (tv > _PRE) & (tv <= qrs_hi), tv, qrs_hi).min(axis=1)

    # Isoelectric reference: the 20 ms before QRS onset.
    pre = (t[None, :] >= (onset - _ms(20))[:, None]) & (t[None, :] < onset[:, None])
    base = (m * pre[:, None, :]).sum(-1) / np.maximum(pre.sum(-1), 1)[:, None]
    dev = m - base[:, :, None]

    st_idx = np.minimum(offset + _ms(60), _WIN - 1)
    st = np.take_along_axis(dev, np.broadcast_to(st_idx[:, None, None], (k, 12, 1)), axis=-1)[..., 0]

    in_qrs = (t[None, :] >= onset[:, None]) & (t[None, :] <= offset[:, None])
    qrs_amp = np.where(in_qrs[:, None, :], m, -np.inf).max(-1) - np.where(in_qrs[:, None, :], m, np.inf).min(-1)

    rr_safe = np.where(np.isfinite(rr_k), rr_k, FS)  # 60 bpm when only one RR was usable
    t_end = _PRE + np.minimum(_ms(460), 0.7 * rr_safe).astype(np.int64)
    t_start = np.minimum(offset + _ms(80), t_end - _ms(40))
    in_t = (t[None, :] >= t_start[:, None]) & (t[None, :] <= t_end[:, None])  # (k, WIN)
    absdev = np.where(in_t[:, None, :], np.abs(dev), -1.0)
    peak = absdev.argmax(-1)  # (k, 12)
    t_amp = np.take_along_axis(dev, peak[..., None], axis=-1)[..., 0]

    # Half-amplitude limbs of the T wave around its peak, in the wave's own polarity.
    half = (dev * np.sign(t_amp)[..., None]) >= 0.5 * np.abs(t_amp)[..., None]
    tt = t[None, None, :]
    left = np.where(~half & (tt < peak[..., None]), tt, -1).max(-1) + 1
    right = np.where(~half & (tt > peak[..., None]), tt, _WIN).min(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_sym = (peak - left) / np.maximum(right - peak, 1)
    sym_ok = (np.abs(t_amp) >= T_SYM_MIN_MV) & (left > 0) & (right < _WIN)
    t_sym = np.where(sym_ok, t_sym, np.nan)

    qt = _qt_tangent(dev, t_amp, peak, onset, lead_good)

    nan_lead = ~lead_good
    for arr in (t_amp, t_sym, st, qrs_amp):
        arr[nan_lead] = np.nan
    out["hr_bpm"][idx] = np.where(np.isfinite(rr_k), 60.0 * FS / rr_k, np.nan)
    out["qrs_ms"][idx] = (offset - onset) * 1000.0 / FS
    out["qt_ms"][idx] = qt
    out["n_beats"][idx] = used[idx]
    for j, lead in enumerate(LEADS):
        out[f"t_amp_{lead}"][idx] = t_amp[:, j]
        out[f"t_sym_{lead}"][idx] = t_sym[:, j]
        out[f"st_{lead}"][idx] = st[:, j]
        out[f"qrs_amp_{lead}"][idx] = qrs_amp[:, j]
    return out


def _qt_tangent(
    dev: np.ndarray, t_amp: np.ndarray, peak: np.ndarray, onset: np.ndarray, lead_good: np.ndarray
) -> np.ndarray:
    """QT (ms) by the tangent method in each record's lead with the largest T wave."""
    k = len(dev)
    rows = np.arange(k)
    lead = np.where(lead_good, np.abs(np.nan_to_num(t_amp)), -1).argmax(axis=1)
    wave = dev[rows, lead] * np.sign(t_amp[rows, lead])[:, None]  # upright in its own polarity
    p = peak[rows, lead]
    slope = np.diff(wave, axis=-1)  # (k, WIN-1)
    tt = np.arange(slope.shape[1])[None, :]
    desc = (tt >= p[:, None]) & (tt < (p + _ms(150))[:, None])
    s_idx = np.where(desc, slope, np.inf).argmin(axis=1)  # steepest fall after the peak
    s = slope[rows, s_idx]
    with np.errstate(divide="ignore", invalid="ignore"):
        end = s_idx + 0.5 - wave[rows, s_idx] / s  # tangent crosses zero
    qt = (end - onset) * 1000.0 / FS
    ok = (np.abs(t_amp[rows, lead]) >= 0.1) & (s < 0) & np.isfinite(qt) & (qt >= 200) & (qt <= 650)
    return np.where(ok, qt, np.nan)
