"""Measured ECG features: heart rate, QRS and QT, and per-lead T, ST and QRS measurements.

:func:`measure_features` turns canonical signals (``(n, 12, 5000)`` float32 mV at 500 Hz, rows in
:data:`ecg_r1.data.canonical.LEADS` order) into one table row per record. It is what the feature
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
   R + min(460 ms, 0.62 RR)); ``t_sym_L`` is the ascending over the descending half-amplitude
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

Checked against LUDB's cardiologist annotations (all 200 records): the T polarity agrees with
the annotated T peak on 98 % of the leads where it is larger than 0.1 mV; QRS duration bias
-2 ms, mean absolute error 15 ms; QT bias -14 ms, mean absolute error 23 ms (the tangent method
is known to end the T wave early). About 680 records/s of CPU time on one core
(``benchmarks/bench_features.py``).

A record that cannot be measured (non-finite samples, a flat line, fewer than
:data:`MIN_BEATS` beats) gets nulls in every measured column, never an exception; a lead that is
flat (lead off) gets nulls in its own columns and is never called inverted.

(About 450 lines, a third of them this method's description: the measurement is one pipeline whose
steps share the beat windows; split, each step would have to pass them on.)
"""

from __future__ import annotations

import logging

import numpy as np
import polars as pl
from scipy.ndimage import uniform_filter1d
from scipy.signal import find_peaks

from ecg_r1.data.canonical import FS, LEADS, N_SAMPLES, normalize_lead_name

log = logging.getLogger(__name__)

UPRIGHT_T_LEADS: tuple[str, ...] = ("I", "II", "aVL", "aVF", "V2", "V3", "V4", "V5", "V6")
TWI_THRESHOLD_MV: float = -0.1
T_SYM_MIN_MV: float = 0.05  # below this a T wave is too flat for its limbs to be timed
QRS_VELOCITY_FRACTION: float = 0.12  # tuned against LUDB's cardiologist QRS onsets and offsets
MIN_BEATS: int = 3
VELOCITY_SMOOTH: int = 15  # samples (30 ms); tuned with the fraction on LUDB (see module doc)
MAX_MEDIAN_BEATS: int = 9
FLAT_LEAD_MV: float = 0.02  # peak-to-peak over the whole record below this: lead off

MEDIAN_BEAT_PRE_S: float = 0.30  # a beat window starts this long before the QRS fiducial
MEDIAN_BEAT_POST_S: float = 0.55  # and ends this long after it
_PRE = int(MEDIAN_BEAT_PRE_S * FS)  # samples before the fiducial in a beat window
_POST = int(MEDIAN_BEAT_POST_S * FS)  # samples after it
_WIN = _PRE + _POST
MEDIAN_BEAT_SAMPLES: int = _WIN
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
            cohort's memmap from :func:`ecg_r1.data.store.open_signals` works; it is read chunk by
            chunk).
        chunk_size: records measured together; larger chunks use more memory.

    Returns:
        One row per record, in input order: the :data:`FEATURE_COLUMNS` (Float64; ``n_beats``,
        the beats in the median beat, at most :data:`MAX_MEDIAN_BEATS`, Int64), ``twi_leads``
        (String, comma-joined in :data:`LEADS` order, ``""`` when none) and ``n_twi_leads``
        (Int64). Unmeasurable records and leads have nulls.

    Raises:
        ValueError: when ``signals`` does not have the canonical shape.
    """
    if signals.ndim != 3 or signals.shape[1:] != (len(LEADS), N_SAMPLES):
        raise ValueError(
            f"signals must have shape (n, {len(LEADS)}, {N_SAMPLES}) (canonical form, see "
            f"ecg_r1.data.canonical), got {signals.shape}; canonicalize the records first"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    n = signals.shape[0]
    parts = [
        _measure_chunk(np.asarray(signals[start : start + chunk_size], dtype=np.float32))
        for start in range(0, n, chunk_size)
    ]
    cols: dict[str, np.ndarray] = {}
    for name in FEATURE_COLUMNS:
        cols[name] = np.concatenate([p[name] for p in parts]) if parts else np.zeros(0)
    t_amp = np.stack([cols[f"t_amp_{lead}"] for lead in LEADS], axis=1) if n else np.zeros((0, 12))
    twi_leads, n_twi = _twi_from_t_amp(t_amp)
    frame = {
        name: pl.Series(name, values, dtype=pl.Float64, nan_to_null=True) for name, values in cols.items()
    }
    frame["n_beats"] = pl.Series("n_beats", cols["n_beats"], dtype=pl.Float64, nan_to_null=True).cast(
        pl.Int64
    )
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


def _twi_from_t_amp(t_amp: np.ndarray) -> tuple[list[str | None], list[int | None]]:
    upright = np.array([lead in UPRIGHT_T_LEADS for lead in LEADS])
    inverted = (t_amp < TWI_THRESHOLD_MV) & upright[None, :]  # NaN compares False: never inverted
    measured = ~np.all(np.isnan(t_amp), axis=1)
    names: list[str | None] = []
    counts: list[int | None] = []
    for i in range(len(t_amp)):
        if not measured[i]:
            names.append(None)
            counts.append(None)
            continue
        leads = [LEADS[j] for j in np.flatnonzero(inverted[i])]
        names.append(",".join(leads))
        counts.append(len(leads))
    return names, counts


def _nan_cols(c: int) -> dict[str, np.ndarray]:
    return {name: np.full(c, np.nan) for name in FEATURE_COLUMNS}


def qrs_energy(x: np.ndarray, span_ms: float = 10.0) -> np.ndarray:
    """QRS energy of each record of ``(c, 12, N)`` at 500 Hz: ``(c, N - span)``, peaks on QRS complexes.

    The ``span_ms`` difference of every lead (it suppresses baseline wander and the slow P and T
    waves), squared, summed over the leads and smoothed over 40 ms (step 1 of the module doc).
    A 20 ms span cancels 50 Hz mains and its harmonics and most muscle noise, at some cost in
    timing precision.
    """
    # A 10 ms difference is a first difference smoothed over 10 ms, at the cost of one subtraction.
    span = _ms(span_ms)
    d = x[..., span:] - x[..., :-span]
    energy = np.einsum("cln,cln->cn", d, d)
    return uniform_filter1d(energy, size=_ms(40), axis=-1)


def beats_from_energy(
    energy: np.ndarray, q99: np.ndarray, span_ms: float = 10.0, step: int = 1
) -> list[np.ndarray]:
    """Fiducial sample (at 500 Hz) of every QRS complex per record, from :func:`qrs_energy` (same
    ``span_ms``; every ``step``-th sample of it) and its 99th percentile."""
    span = _ms(span_ms)
    beats = []
    for i in range(len(energy)):
        if not np.isfinite(q99[i]) or q99[i] <= 0:
            beats.append(np.zeros(0, dtype=np.int64))
            continue
        peaks, _ = find_peaks(energy[i], height=0.3 * q99[i], distance=max(1, _ms(250) // step))
        # The difference x[t + span] - x[t] is centred half a span after t.
        beats.append(peaks.astype(np.int64) * step + span // 2)
    return beats


def _detect_beats(x: np.ndarray) -> list[np.ndarray]:
    """Fiducial sample of every QRS complex, per record of a chunk ``(c, 12, N)``."""
    energy = qrs_energy(x)
    return beats_from_energy(energy, np.quantile(energy, 0.99, axis=-1))


def _median_beats(x: np.ndarray, beats: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Baseline-corrected median beat ``(c, 12, WIN)``, median RR (samples) and beats used."""
    c = len(x)
    med = np.full((c, len(LEADS), _WIN), np.nan, dtype=np.float32)
    rr = np.full(c, np.nan)
    used = np.zeros(c, dtype=np.int64)
    offsets = np.arange(-_PRE, _POST)
    qrs_offsets = np.arange(-_ms(60), _ms(60))
    pr_offsets = np.arange(-_ms(100), -_ms(70))
    t_rel = (offsets - pr_offsets.mean()).astype(np.float32)[None, None, :]  # from the PR centre
    for i in range(c):
        r_all = beats[i]
        if len(r_all) >= 2:
            rr[i] = float(np.median(np.diff(r_all)))
        sel = np.flatnonzero((r_all >= _PRE) & (r_all + _POST <= N_SAMPLES))
        if len(sel) < MIN_BEATS:
            continue
        xi = x[i]
        # Keep the beats whose QRS matches the record's typical QRS (drops ectopics and
        # artefacts), then the best-matching odd number of them, at most MAX_MEDIAN_BEATS:
        # a median over 9 beats is robust enough and its sorting network stays cheap.
        qrs = xi[:, r_all[sel][:, None] + qrs_offsets[None, :]].transpose(1, 0, 2)
        corr = _correlation(qrs, _median_network(qrs))
        good = corr >= 0.8
        if good.sum() >= MIN_BEATS:
            sel, corr = sel[good], corr[good]
        n_use = min(MAX_MEDIAN_BEATS, len(sel) - (1 - len(sel) % 2))
        sel = np.sort(sel[np.argsort(-corr, kind="stable")[:n_use]])
        r = r_all[sel]
        # PR level (mean of -100..-70 ms) of every detected beat, clipped at the record's start.
        pr_idx = np.clip(r_all[:, None] + pr_offsets[None, :], 0, N_SAMPLES - 1)
        pr_all = xi[:, pr_idx].mean(axis=-1).T  # (K, 12)
        nxt = np.minimum(sel + 1, len(r_all) - 1)
        has_next = (sel + 1) < len(r_all)
        pr = pr_all[sel]
        # Linear baseline through this beat's PR level and the next one's (wander removal);
        # the last beat has no next one and gets a flat baseline.
        gap = np.maximum(r_all[nxt] - r, 1).astype(np.float32)
        slope = np.where(has_next[:, None], pr_all[nxt] - pr, 0.0).astype(np.float32) / gap[:, None]
        seg = xi[:, r[:, None] + offsets[None, :]].transpose(1, 0, 2)  # (k, 12, WIN)
        seg = seg - (pr[:, :, None] + slope[:, :, None] * t_rel)
        med[i] = _median_network(seg)
        used[i] = len(seg)
    return med, rr, used


def _median_network(a: np.ndarray) -> np.ndarray:
    """Median over axis 0 of a few beats by an odd-even transposition sorting network.

    Element-wise minimum/maximum over whole beats is about three times faster than ``np.sort``
    or ``np.median`` along a short axis (measured in ``benchmarks/bench_features.py``).
    """
    v = list(a)
    k = len(v)
    for rnd in range(k):
        for j in range(rnd % 2, k - 1, 2):
            v[j], v[j + 1] = np.minimum(v[j], v[j + 1]), np.maximum(v[j], v[j + 1])
    return v[k // 2] if k % 2 else 0.5 * (v[k // 2 - 1] + v[k // 2])


def _correlation(seg: np.ndarray, template: np.ndarray) -> np.ndarray:
    a = seg.reshape(len(seg), -1)
    a = a - a.mean(axis=1, keepdims=True)
    b = template.reshape(-1) - template.mean()
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (a @ b) / denom
    return np.nan_to_num(corr)


def _chunk_medians(x: np.ndarray) -> tuple[np.ndarray, ...]:
    """Steps 1-2 for a chunk ``(c, 12, N)``: (finite records, live leads, median beats, RR, beats used)."""
    finite = np.isfinite(x).all(axis=(1, 2))
    if not finite.all():  # zero the bad records so they cannot poison the chunk; nulled by the callers
        x = np.where(finite[:, None, None], x, np.float32(0.0))
    lead_ok = np.ptp(x, axis=-1) >= FLAT_LEAD_MV  # (c, 12)
    beats = _detect_beats(x if lead_ok.all() else x * lead_ok[:, :, None])
    med, rr, used = _median_beats(x, beats)
    return finite, lead_ok, med, rr, used


def median_beats(signals: np.ndarray) -> np.ndarray:
    """Each record's representative beat per lead (steps 1-2 of the module doc).

    Args:
        signals: ``(n, 12, 5000)`` canonical signals in mV at 500 Hz.

    Returns:
        ``(n, 12, MEDIAN_BEAT_SAMPLES)`` float32 mV at 500 Hz, from :data:`MEDIAN_BEAT_PRE_S`
        before the QRS fiducial to :data:`MEDIAN_BEAT_POST_S` after it, baseline-corrected; NaN
        for a record that cannot be measured (non-finite samples, fewer than :data:`MIN_BEATS`
        beats) and for its flat leads.
    """
    x = np.asarray(signals, dtype=np.float32)
    finite, lead_ok, med, _, used = _chunk_medians(x)
    usable = finite[:, None] & lead_ok & (used >= MIN_BEATS)[:, None]
    return np.where(usable[:, :, None], med, np.float32(np.nan))


def _measure_chunk(x: np.ndarray) -> dict[str, np.ndarray]:
    c = len(x)
    out = _nan_cols(c)
    finite, lead_ok, med, rr, used = _chunk_medians(x)
    ok = finite & (used >= MIN_BEATS) & lead_ok.any(axis=1)
    if not ok.any():
        return out
    idx = np.flatnonzero(ok)
    m = med[idx]  # (k, 12, WIN) float32
    k = len(idx)
    lead_good = lead_ok[idx]
    rr_k = rr[idx]
    t = np.arange(_WIN)

    # QRS onset / offset from the spatial velocity around the fiducial.
    vel = np.abs(np.diff(m, axis=-1)) * lead_good[:, :, None]
    # 30 ms smoothing: a pacemaker spike (1-2 samples) must not pass for the QRS complex.
    vel = uniform_filter1d(vel.sum(axis=1), size=VELOCITY_SMOOTH, axis=-1)  # (k, WIN-1)
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
    st = st.astype(np.float64)

    in_qrs = (t[None, :] >= onset[:, None]) & (t[None, :] <= offset[:, None])
    inq = in_qrs[:, None, :]
    qrs_amp = (np.where(inq, m, -np.inf).max(-1) - np.where(inq, m, np.inf).min(-1)).astype(np.float64)

    # The T wave lies after the fiducial: work on that part only (about half the window).
    rr_safe = np.where(np.isfinite(rr_k), rr_k, FS)  # 60 bpm when only one RR was usable
    t_end = np.minimum(_ms(460), 0.62 * rr_safe).astype(np.int64)  # ends before the next P wave
    t_start = np.minimum(offset - _PRE + _ms(80), t_end - _ms(40))
    # Smoothed over 20 ms: the T wave is slow, and on its flat top the sample noise would
    # otherwise move the peak by 10 ms and skew the limb ratio.
    dv = uniform_filter1d(dev[..., _PRE:], size=_ms(20), axis=-1)
    n_t = dv.shape[-1]
    tr = np.arange(n_t)
    in_t = (tr[None, :] >= t_start[:, None]) & (tr[None, :] <= t_end[:, None])  # (k, n_t)
    absdev = np.where(in_t[:, None, :], np.abs(dv), np.float32(-1.0))
    peak = absdev.argmax(-1)  # (k, 12), relative to the fiducial
    t_amp = np.take_along_axis(dv, peak[..., None], axis=-1)[..., 0].astype(np.float64)

    # Half-amplitude limbs of the T wave around its peak, in the wave's own polarity.
    half = (dv * np.sign(t_amp).astype(np.float32)[..., None]) >= (0.5 * np.abs(t_amp)).astype(np.float32)[
        ..., None
    ]
    tt = tr[None, None, :]
    pk = peak[..., None]
    left = np.where(~half & (tt < pk), tt, -1).max(-1) + 1
    right = np.where(~half & (tt > pk), tt, n_t).min(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_sym = (peak - left) / np.maximum(right - peak, 1)
    sym_ok = (np.abs(t_amp) >= T_SYM_MIN_MV) & (left > 0) & (right < n_t)
    t_sym = np.where(sym_ok, t_sym, np.nan)

    qt = _qt_tangent(dv, t_amp, peak, onset - _PRE, lead_good)

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


def with_features(cohort: pl.DataFrame, signals: np.ndarray) -> pl.DataFrame:
    """The cohort table with the measured features of each record's signal beside it.

    Args:
        cohort: cohort rows (their ``row`` column indexes ``signals``).
        signals: the cohort's ``(n, 12, 5000)`` signal array (:func:`ecg_r1.data.store.open_signals`).

    Returns:
        ``cohort`` with the :func:`measure_features` columns appended; the measured lead list is
        named ``measured_twi_leads`` so it never overwrites the source's ``twi_leads``.
    """
    if "row" not in cohort.columns:
        raise ValueError("the cohort table needs its 'row' column (index into the signal array)")
    rows = cohort["row"].to_numpy()
    if len(rows) and (rows.min() < 0 or rows.max() >= len(signals)):
        raise ValueError(f"cohort rows reach {rows.max()} but the signal array holds {len(signals)} records")
    if len(rows) == len(signals) and np.array_equal(rows, np.arange(len(rows))):
        feats = measure_features(signals)  # the whole array in order: read chunk by chunk
    else:
        # Gather at most `block` records at a time, so a large memmap never lands in memory whole.
        order = np.argsort(rows, kind="stable")  # and read it in file order
        block = 4096
        parts = [
            measure_features(np.asarray(signals[rows[order[i : i + block]]]))
            for i in range(0, len(rows), block)
        ]
        feats = pl.concat(parts) if parts else measure_features(np.asarray(signals[:0]))
        feats = feats[np.argsort(order, kind="stable")]
    feats = feats.rename({"twi_leads": "measured_twi_leads"})
    clash = [c for c in feats.columns if c in cohort.columns]
    if clash:
        cohort = cohort.drop(clash)  # features measured earlier: replace them with this measurement
    return pl.concat([cohort, feats], how="horizontal")
