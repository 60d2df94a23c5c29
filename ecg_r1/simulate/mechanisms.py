"""From a case's ECG findings to the waves of its heart vector.

The mechanisms of T-wave inversion (:data:`ecg_r1.simulate.truth.MECHANISMS`) act on the signal
only through the discrete ECG findings they make likely (truth.ECG_FINDINGS): the TWI territory,
T symmetry and depth, QRS voltage and conduction, ST depression, pathological Q waves, U waves,
QT and rate. This module turns findings into waves; the nuisance parameters drawn here (heart
position, habitus, exact amplitudes and intervals) depend on the findings, age and sex only,
never on the mechanism itself, which is what makes the posterior in :mod:`truth` exact.

How each finding shows:

* **TWI territory**: the T vector is the dipole whose projections best match "inverted in the
  territory's leads, upright elsewhere" (weighted least squares on the patient's own lead
  vectors), scaled so the deepest territory lead reaches the drawn depth (shallow 0.15-0.35 mV,
  deep 0.45-0.95 mV, giant 1.1-1.8 mV). Territories: anterior V1-V4, septal V1-V3, inferior
  II-III-aVF, lateral I-aVL-V5-V6, anterolateral I-aVL-V3-V6, inferoanterior II-III-aVF-V2-V4,
  diffuse (most leads, aVR upright).
* **Symmetry**: an ischemic-looking symmetric T (equal limbs) or the asymmetric T of strain and
  secondary changes (slow descent, fast return).
* **High voltage**: the main and terminal QRS forces 1.7-2.3 times larger (LVH criteria met).
* **LBBB**: no septal q, slow broad leftward-posterior forces (QRS 130-170 ms); **RBBB**: a slow
  terminal rightward-anterior force (R' in V1, broad S in I and V6; QRS 120-150 ms).
* **ST depression** along the T vector (0.08-0.2 mV in the most affected lead): horizontal with a
  symmetric T, down-sloping with an asymmetric one.
* **Q waves** of an old infarct: a broad initial force pointing away from the territory.
* **U waves** 0.1-0.2 mV after the T; **long QT**: QTc 475-540 ms instead of 390-440 ms.
* **Rate**: brady 45-58, normal 60-95, tachy 100-125 bpm (skewed to the slow end of each band).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from ecg_r1.data.canonical import LEADS
from ecg_r1.simulate import heart
from ecg_r1.simulate.truth import ECG_FINDINGS, PATTERNS

_CAT = {f.name: f.categories for f in ECG_FINDINGS}
UPRIGHT_T_LEADS = ("I", "II", "aVL", "aVF", "V2", "V3", "V4", "V5", "V6")  # T normally upright (adults)
TWI_THRESHOLD_MV = -0.1
_UPRIGHT = np.array([lead in UPRIGHT_T_LEADS for lead in LEADS])

PATTERN_LEADS: dict[str, tuple[str, ...]] = {
    "anterior": ("V1", "V2", "V3", "V4"),
    "septal": ("V1", "V2", "V3"),
    "inferior": ("II", "III", "aVF"),
    "lateral": ("I", "aVL", "V5", "V6"),
    "anterolateral": ("I", "aVL", "V3", "V4", "V5", "V6"),
    "inferoanterior": ("II", "III", "aVF", "V2", "V3", "V4"),
    "diffuse": ("I", "II", "aVF", "aVL", "V3", "V4", "V5", "V6"),
}
# Where a pathological Q wave's initial force points away from (unit vectors, Frank axes).
_Q_AWAY = {
    "anterior": (0.25, 0.0, -1.0),
    "septal": (0.0, 0.0, -1.0),
    "inferior": (0.0, 1.0, 0.0),
    "lateral": (1.0, 0.0, 0.0),
    "anterolateral": (0.7, 0.0, -0.7),
    "inferoanterior": (0.0, 0.7, -0.7),
    "diffuse": (0.0, 1.0, 0.0),
}
DEPTH_RANGES_MV = {"shallow": (0.15, 0.35), "deep": (0.45, 0.95), "giant": (1.1, 1.8)}
RATE_RANGES_BPM = {"brady": (45.0, 58.0), "normal": (60.0, 95.0), "tachy": (100.0, 125.0)}
_NORMAL_T = np.array(
    [0.34, 0.14, -0.19]
)  # Frank-axis T vector of a normal heart, mV (fitted to LUDB T/QRS ratios)
_NORMAL_P = np.array([0.07, 0.10, -0.01])


@dataclass
class EcgParams:
    """Everything the renderer needs for a batch, plus the values written to truth.parquet."""

    mu: np.ndarray  # (B, n_waves) s
    sl: np.ndarray
    sr: np.ndarray
    vec: np.ndarray  # (B, n_waves, 3) mV, heart frame
    rotation: np.ndarray  # (B, 3, 3)
    lead_matrix: np.ndarray  # (B, 12, 3)
    heart_rate: np.ndarray  # bpm
    rsa: np.ndarray
    rr_jitter: np.ndarray
    qtc_ms: np.ndarray
    pr_ms: np.ndarray
    qrs_on: np.ndarray  # s relative to R
    qrs_off: np.ndarray
    t_end: np.ndarray
    qrs_scale: np.ndarray
    axis_deg: np.ndarray  # frontal rotation of the heart
    t_depth_mv: np.ndarray  # drawn depth of the deepest territory lead (0 for a normal T)
    t_amp: np.ndarray  # (B, 12) signed T extremum per lead of the clean beat
    twi_leads: list[str]


def _uniform(rng: np.random.Generator, lo_hi: np.ndarray) -> np.ndarray:
    return lo_hi[:, 0] + rng.random(len(lo_hi)) * (lo_hi[:, 1] - lo_hi[:, 0])


def _lookup(ranges: dict[str, tuple[float, float]], names: tuple[str, ...], idx: np.ndarray) -> np.ndarray:
    return np.array([ranges[n] for n in names])[idx]


def _pattern_t_vectors(lead_matrix: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Unit-depth T vectors (B, 3): deepest territory lead projects to -1 (weighted least squares)."""
    b = len(pattern)
    target = np.full((b, len(LEADS)), 0.4)
    weight = np.where(_UPRIGHT, 0.5, 0.15)[None, :].repeat(b, 0)
    weight[:, LEADS.index("aVR")] = 0.0  # aVR mirrors the others: leave it free
    in_pat = np.zeros((b, len(LEADS)), dtype=bool)
    for p, name in enumerate(PATTERNS):
        sel = pattern == p
        cols = [LEADS.index(lead) for lead in PATTERN_LEADS[name]]
        for c in cols:
            in_pat[sel, c] = True
    target[in_pat] = -1.0
    weight[in_pat] = 1.0
    aw = lead_matrix * weight[:, :, None]
    lhs = np.einsum("blk,blj->bkj", aw, lead_matrix)
    rhs = np.einsum("blk,bl->bk", aw, target)
    t = np.linalg.solve(lhs, rhs[..., None])[..., 0]
    proj = np.einsum("blk,bk->bl", lead_matrix, t)
    deepest = np.where(in_pat, proj, np.inf).min(axis=1)
    # the territory leads always come out negative; the floor only guards a degenerate solve
    return t / np.maximum(-deepest, 0.2)[:, None]


# Normal conduction's QRS: wave -> (centre s, width s, peak vector mV of an average heart); centre
# and width scale with the patient's QRS width, the vector with the habitus.
_NORMAL_QRS = {
    "Q": (-0.030, 0.008, (-0.10, 0.04, -0.15)),  # septal q
    "R1": (-0.012, 0.009, (0.45, 0.30, -0.35)),  # early R
    "R2": (0.003, 0.010, (0.95, 0.50, 0.55)),  # main R
    "S": (0.022, 0.009, (-0.25, -0.30, 0.40)),  # terminal S
}
# LBBB: no septal q; slow, broad leftward-posterior forces.
_LBBB_QRS = {
    "R1": (-0.030, 0.020, (0.55, 0.10, 0.30)),
    "R2": (0.022, 0.022, (0.85, 0.15, 0.95)),
    "S": (0.060, 0.012, (-0.10, -0.05, 0.15)),
}
_RBBB_FORCE = np.array([-0.35, 0.05, -0.55])  # RBBB's slow terminal rightward-anterior force
_QRS_WAVES = ("Q", "R1", "R2", "S", "RT")


@dataclass
class _Waves:
    """A batch's waves as they are built: centres and left/right widths (B, n_waves) in s, and
    peak vectors (B, n_waves, 3) in mV (heart frame); a wave with a zero vector is absent."""

    mu: np.ndarray
    sl: np.ndarray
    sr: np.ndarray
    vec: np.ndarray

    @classmethod
    def empty(cls, b: int) -> _Waves:
        n_w = len(heart.WAVES)
        return cls(
            np.zeros((b, n_w)), np.full((b, n_w), 0.01), np.full((b, n_w), 0.01), np.zeros((b, n_w, 3))
        )


def ecg_parameters(
    rng: np.random.Generator, ecg: dict[str, np.ndarray], age: np.ndarray, male: np.ndarray, _depth: int = 0
) -> EcgParams:
    """Draw the waves and nuisance parameters of a batch of cases from their ECG findings.

    The draws happen in a fixed order (heart position, QRS, rate and P, repolarisation, rhythm),
    so a seed gives the same cohort whatever the helpers below do with the values.

    Args:
        rng: random generator.
        ecg: finding name -> category index (truth.ECG_FINDINGS); ``pattern`` may be -1 for a
            normal ECG (used by the realism check, never in the cohort).
        age: years. male: bool.

    Returns:
        The batch's :class:`EcgParams`.
    """
    b = len(age)
    age = age.astype(float)
    is_twi = ecg["pattern"] >= 0
    waves = _Waves.empty(b)
    rotation, az, qrs_scale = _heart_position(rng, age, male)
    hv_gain = _qrs(rng, waves, ecg, qrs_scale)
    qrs_on, qrs_off = _qrs_bounds(waves)
    hr, rr, pr = _rate_and_p(rng, waves, ecg["rate"], qrs_on)
    lead_matrix = heart.lead_matrix_12(rotation)
    qtc, t_end, depth = _repolarisation(rng, waves, ecg, lead_matrix, qrs_on, qrs_off, rr, qrs_scale)
    t_amp = _two_twi_leads(waves, depth, lead_matrix, qrs_off, t_end, is_twi)
    twi = (t_amp <= TWI_THRESHOLD_MV) & _UPRIGHT[None, :]
    names = np.array(LEADS)
    rsa = rng.uniform(0.01, 0.03, b) + np.where(age < 35, rng.uniform(0.0, 0.04, b), 0.0)
    params = EcgParams(
        mu=waves.mu,
        sl=waves.sl,
        sr=waves.sr,
        vec=waves.vec,
        rotation=rotation,
        lead_matrix=lead_matrix,
        heart_rate=hr,
        rsa=rsa,
        rr_jitter=rng.uniform(0.005, 0.02, b),
        qtc_ms=qtc,
        pr_ms=pr * 1000,
        qrs_on=qrs_on,
        qrs_off=qrs_off,
        t_end=t_end,
        qrs_scale=qrs_scale * hv_gain,
        axis_deg=np.rad2deg(az),
        t_depth_mv=depth,
        t_amp=t_amp,
        twi_leads=[",".join(names[row]) for row in twi],
    )
    # The rare rest without two TWI leads get a new heart position: the nuisance is re-drawn given
    # the same findings, so the stated model is unchanged.
    redraw = np.flatnonzero(is_twi & (twi.sum(axis=1) < 2))
    if len(redraw) and _depth < 20:
        sub = ecg_parameters(
            rng, {k: v[redraw] for k, v in ecg.items()}, age[redraw], male[redraw], _depth + 1
        )
        _splice(params, sub, redraw)
    return params


def _heart_position(
    rng: np.random.Generator, age: np.ndarray, male: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heart position (the axis turns left with age) and habitus (smaller voltages in women and
    the old): ``(rotation (B, 3, 3), frontal angle az (B,) in rad, QRS scale (B,))``."""
    b = len(age)
    az = np.deg2rad(rng.normal(-(age - 40) * 0.35, 14))
    ay = np.deg2rad(rng.normal(0, 12, b))
    ax = np.deg2rad(rng.normal(0, 8, b))
    rotation = heart.rotation_matrices(ax, ay, az)
    qrs_scale = (
        np.exp(rng.normal(0, 0.2, b)) * np.where(male, 1.0, 0.85) * (1 + 0.006 * np.clip(40 - age, -30, 25))
    )
    return rotation, az, qrs_scale


def _qrs(
    rng: np.random.Generator,
    waves: _Waves,
    ecg: dict[str, np.ndarray],
    qrs_scale: np.ndarray,
) -> np.ndarray:
    """Write the QRS waves (normal conduction, high voltage, LBBB, RBBB, pathological Q) into
    ``waves``; returns the high-voltage gain (B,), 1 without high voltage."""
    b = len(qrs_scale)
    w, mu, sl, sr, vec = heart.W, waves.mu, waves.sl, waves.sr, waves.vec
    cond = np.array(_CAT["conduction"])[ecg["conduction"]]
    hv_gain = np.where(ecg["high_voltage"] == 1, rng.uniform(1.7, 2.3, b), 1.0)
    width = rng.uniform(0.78, 1.05, b)
    for name, (m, s, v) in _NORMAL_QRS.items():
        mu[:, w[name]], sl[:, w[name]], sr[:, w[name]] = m * width, s * width, s * width
        vec[:, w[name]] = np.asarray(v) * qrs_scale[:, None]
    for name in ("R2", "S"):
        vec[:, w[name]] *= hv_gain[:, None]
    vec[:, w["R1"]] *= (1 + 0.3 * (hv_gain - 1))[:, None]
    if (cond == "lbbb").any():
        k = np.flatnonzero(cond == "lbbb")
        wide = rng.uniform(1.0, 1.3, len(k))
        vec[k, w["Q"]] = 0.0
        for name, (m, s, v) in _LBBB_QRS.items():
            mu[k, w[name]], sl[k, w[name]], sr[k, w[name]] = m * wide, s * wide, s * wide
            vec[k, w[name]] = np.asarray(v) * (qrs_scale[k] * hv_gain[k])[:, None]
    if (cond == "rbbb").any():
        k = np.flatnonzero(cond == "rbbb")
        mu[k, w["RT"]] = rng.uniform(0.050, 0.065, len(k))
        sl[k, w["RT"]] = sr[k, w["RT"]] = rng.uniform(0.015, 0.020, len(k))
        vec[k, w["RT"]] = _RBBB_FORCE * qrs_scale[k, None]
    # Pathological Q waves: a broad initial force away from the territory (old infarct).
    q = np.flatnonzero((ecg["q_waves"] == 1) & (ecg["pattern"] >= 0))
    if len(q):
        away = np.array([_Q_AWAY[PATTERNS[p]] for p in ecg["pattern"][q]], dtype=float)
        away /= np.linalg.norm(away, axis=1, keepdims=True)
        mu[q, w["Q"]] = mu[q, w["R1"]] - rng.uniform(0.022, 0.028, len(q))
        sl[q, w["Q"]] = sr[q, w["Q"]] = rng.uniform(0.011, 0.014, len(q))
        vec[q, w["Q"]] = -away * (rng.uniform(0.35, 0.6, len(q)) * qrs_scale[q])[:, None]
    return hv_gain


def _qrs_bounds(waves: _Waves) -> tuple[np.ndarray, np.ndarray]:
    """QRS onset and offset (B,) in s relative to R: 2.5 widths beyond the outermost present waves."""
    present = np.abs(waves.vec).sum(-1) > 0
    qrs = [heart.W[n] for n in _QRS_WAVES]
    on = np.where(present[:, qrs], waves.mu[:, qrs] - 2.5 * waves.sl[:, qrs], np.inf).min(1)
    off = np.where(present[:, qrs], waves.mu[:, qrs] + 2.5 * waves.sr[:, qrs], -np.inf).max(1)
    return on, off


def _rate_and_p(
    rng: np.random.Generator, waves: _Waves, rate_idx: np.ndarray, qrs_on: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heart rate in its band, PR interval and the P wave: ``(rate bpm, RR s, PR s)``."""
    b = len(rate_idx)
    w = heart.W
    rate_range = _lookup(RATE_RANGES_BPM, _CAT["rate"], rate_idx)
    # skewed towards the slow end of each band, as resting rates are
    hr = rate_range[:, 0] + rng.beta(1.5, 2.5, b) * (rate_range[:, 1] - rate_range[:, 0])
    pr = rng.uniform(0.13, 0.19, b)
    waves.mu[:, w["P"]] = qrs_on - pr + 0.05
    waves.sl[:, w["P"]] = waves.sr[:, w["P"]] = rng.uniform(0.018, 0.024, b)
    waves.vec[:, w["P"]] = _NORMAL_P * rng.uniform(0.7, 1.3, b)[:, None]
    return hr, 60.0 / hr, pr


def _repolarisation(
    rng: np.random.Generator,
    waves: _Waves,
    ecg: dict[str, np.ndarray],
    lead_matrix: np.ndarray,
    qrs_on: np.ndarray,
    qrs_off: np.ndarray,
    rr: np.ndarray,
    qrs_scale: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Write the T, ST and U waves into ``waves``: QT from QTc (Bazett), the T's shape and vector
    (the territory's TWI at the drawn depth), ST depression and U waves.

    Returns:
        ``(QTc ms, T end s, drawn TWI depth mV)``, each (B,).
    """
    b = len(rr)
    w, mu, sl, sr, vec = heart.W, waves.mu, waves.sl, waves.sr, waves.vec
    is_twi = ecg["pattern"] >= 0
    qtc = np.where(ecg["long_qt"] == 1, rng.uniform(475, 540, b), rng.uniform(390, 440, b))
    t_end = qrs_on + qtc / 1000 * np.sqrt(rr)
    sym = ecg["t_symmetric"] == 1
    t_sr = np.where(sym, rng.uniform(0.040, 0.050, b), rng.uniform(0.030, 0.038, b))
    t_sl = np.where(sym, t_sr * rng.uniform(0.95, 1.05, b), rng.uniform(0.062, 0.078, b))
    mu[:, w["T"]] = t_end - 2.4 * t_sr
    sl[:, w["T"]], sr[:, w["T"]] = t_sl, t_sr
    depth = np.zeros(b)
    t_vec = np.tile(_NORMAL_T, (b, 1)) * (rng.uniform(0.75, 1.35, b) * np.sqrt(qrs_scale))[:, None]
    t_vec += rng.normal(0, 0.025, (b, 3))  # the T axis varies a little on its own (QRS-T angle)
    if is_twi.any():
        k = np.flatnonzero(is_twi)
        depth[k] = _uniform(rng, _lookup(DEPTH_RANGES_MV, _CAT["t_depth"], ecg["t_depth"][k]))
        t_vec[k] = _pattern_t_vectors(lead_matrix[k], ecg["pattern"][k]) * depth[k, None]
    vec[:, w["T"]] = t_vec
    # ST depression along the T vector: horizontal (symmetric T) or down-sloping (asymmetric).
    st = np.flatnonzero((ecg["st_depression"] == 1) & is_twi)
    if len(st):
        st_mv = rng.uniform(0.08, 0.2, len(st))
        vec[st, w["ST"]] = t_vec[st] / depth[st, None] * st_mv[:, None]
        mu[st, w["ST"]] = qrs_off[st] + np.where(sym[st], 0.05, 0.03)
        sl[st, w["ST"]] = np.where(sym[st], 0.03, 0.012)
        sr[st, w["ST"]] = np.where(sym[st], 0.045, 0.08)
    # U wave: upright where the normal T is, after the T.
    u_amp = np.where(ecg["u_waves"] == 1, rng.uniform(0.10, 0.20, b), rng.uniform(0.0, 0.03, b))
    vec[:, w["U"]] = _NORMAL_T / np.linalg.norm(_NORMAL_T) * u_amp[:, None]
    mu[:, w["U"]] = t_end + 0.09
    sl[:, w["U"]] = sr[:, w["U"]] = 0.035
    return qtc, t_end, depth


def _two_twi_leads(
    waves: _Waves,
    depth: np.ndarray,
    lead_matrix: np.ndarray,
    qrs_off: np.ndarray,
    t_end: np.ndarray,
    is_twi: np.ndarray,
) -> np.ndarray:
    """The measured T per lead on the clean beat (B, 12), the ground truth of twi_leads.

    Every case of the cohort has TWI in at least two leads where T is normally upright. Where the
    patient's heart position leaves the second lead just short of -0.1 mV (about 1 case in 200),
    the repolarisation (``waves`` and ``depth``, in place) is deepened by at most a factor 2;
    :func:`ecg_parameters` re-draws the rare rest.
    """
    w, mu, sl, sr, vec = heart.W, waves.mu, waves.sl, waves.sr, waves.vec
    t_amp = _clean_t_amplitudes(mu, sl, sr, vec, lead_matrix, qrs_off, t_end)
    second = np.sort(np.where(_UPRIGHT, t_amp, np.inf), axis=1)[:, 1]
    short = is_twi & (second > TWI_THRESHOLD_MV) & (second < 0)
    if short.any():
        k = np.minimum(1.2 * TWI_THRESHOLD_MV / second[short], 2.0)
        vec[short, w["T"]] *= k[:, None]
        vec[short, w["ST"]] *= k[:, None]
        depth[short] *= k
        t_amp[short] = _clean_t_amplitudes(
            mu[short], sl[short], sr[short], vec[short], lead_matrix[short], qrs_off[short], t_end[short]
        )
    return t_amp


def _splice(params: EcgParams, sub: EcgParams, rows: np.ndarray) -> None:
    """Replace the given rows of a batch by a re-drawn sub-batch."""
    for f in fields(EcgParams):
        value = getattr(params, f.name)
        if isinstance(value, list):
            for j, r in enumerate(rows):
                value[r] = getattr(sub, f.name)[j]
        else:
            value[rows] = getattr(sub, f.name)


def _clean_t_amplitudes(
    mu: np.ndarray,
    sl: np.ndarray,
    sr: np.ndarray,
    vec: np.ndarray,
    lead_matrix: np.ndarray,
    qrs_off: np.ndarray,
    t_end: np.ndarray,
) -> np.ndarray:
    """Signed T extremum per lead (B, 12) of the noise-free repolarisation, J + 80 ms to T end."""
    steps = np.linspace(0.0, 1.0, 48)
    t = (qrs_off + 0.08)[:, None] + steps[None, :] * (t_end - qrs_off - 0.08)[:, None]  # (B, S)
    rep = [heart.W["ST"], heart.W["T"], heart.W["U"]]
    d = t[:, None, :] - mu[:, rep, None]
    s = np.where(d < 0, sl[:, rep, None], sr[:, rep, None])
    hv = np.einsum("bws,bwc->bcs", np.exp(-0.5 * (d / s) ** 2), vec[:, rep])
    leads = np.einsum("blc,bcs->bls", lead_matrix, hv)
    idx = np.abs(leads).argmax(axis=2)
    return np.take_along_axis(leads, idx[..., None], axis=2)[..., 0]
