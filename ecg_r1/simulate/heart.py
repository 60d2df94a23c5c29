"""A time-varying heart vector projected on the standard leads.

The heart is one dipole ``H(t)`` in Frank coordinates (x to the patient's left, y to the feet,
z to the back), built beat by beat as a sum of waves (P, septal Q, two R components, S, a
terminal right-bundle component, ST, T, U), each a 3-D vector times an asymmetric Gaussian in
time. The 12 leads are the projections of ``H`` on Dower's lead vectors (Dower et al., J
Electrocardiol 1988), rotated per patient for the heart's position: lead I and II and V1-V6 come
from the electrode potentials, and III, aVR, aVL and aVF are computed from I and II the way an
electrocardiograph does, so Einthoven's and Goldberger's relations hold exactly, noise included.

Beats are placed at R-peak times with respiratory sinus arrhythmia and random RR jitter; each beat
scales and slightly rotates its QRS and repolarisation (respiration moves the heart), so no two
beats are identical.
"""

from __future__ import annotations

import numpy as np

from ecg_r1.data.canonical import LEADS

# Dower's inverse transform rows for I, II, V1..V6 (mV per unit of Frank x, y, z).
DOWER = np.array(
    [
        [0.632, -0.235, 0.059],  # I
        [0.235, 1.066, -0.132],  # II
        [-0.515, 0.157, -0.917],  # V1
        [0.044, 0.164, -1.387],  # V2
        [0.882, 0.098, -1.277],  # V3
        [1.213, 0.127, -0.601],  # V4
        [1.125, 0.127, -0.086],  # V5
        [0.831, 0.076, 0.230],  # V6
    ]
)
# Independent leads in the order they are recorded; the other four follow from I and II.
RECORDED = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")

# Wave indices and the group (P, QRS, repolarisation) each belongs to.
WAVES = ("P", "Q", "R1", "R2", "S", "RT", "ST", "T", "U")
W = {name: i for i, name in enumerate(WAVES)}
GROUPS = ((W["P"],), (W["Q"], W["R1"], W["R2"], W["S"], W["RT"]), (W["ST"], W["T"], W["U"]))
TEMPLATE_START_S = -0.40  # template window relative to the R peak (fiducial)
TEMPLATE_END_S = 0.80


def twelve_from_recorded(recorded: np.ndarray) -> np.ndarray:
    """(..., 8, n) in RECORDED order to (..., 12, n) in LEADS order, with III = II - I,
    aVR = -(I + II)/2, aVL = I - II/2 and aVF = II - I/2 (Einthoven's and Goldberger's relations)."""
    out = np.empty(recorded.shape[:-2] + (len(LEADS), recorded.shape[-1]), dtype=recorded.dtype)
    for i, name in enumerate(RECORDED):
        out[..., LEADS.index(name), :] = recorded[..., i, :]
    lead_i, lead_ii = recorded[..., 0, :], recorded[..., 1, :]
    # written in place: no temporaries of the batch's size
    np.subtract(lead_ii, lead_i, out=out[..., LEADS.index("III"), :])
    avr = out[..., LEADS.index("aVR"), :]
    np.add(lead_i, lead_ii, out=avr)
    avr *= -0.5
    avl = out[..., LEADS.index("aVL"), :]
    np.multiply(lead_ii, -0.5, out=avl)
    avl += lead_i
    avf = out[..., LEADS.index("aVF"), :]
    np.multiply(lead_i, -0.5, out=avf)
    avf += lead_ii
    return out


def lead_matrix_12(rotation: np.ndarray) -> np.ndarray:
    """Per-patient (B, 12, 3) lead vectors: Dower's rows turned by the heart's rotation (B, 3, 3)."""
    rec = np.einsum("lk,bkj->blj", DOWER, rotation)  # (B, 8, 3)
    return twelve_from_recorded(rec)


def rotation_matrices(ax: np.ndarray, ay: np.ndarray, az: np.ndarray) -> np.ndarray:
    """(B, 3, 3) rotations by angles (radians) about x, then y, then z."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    one, zero = np.ones_like(ax), np.zeros_like(ax)
    rx = np.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).reshape(-1, 3, 3)
    ry = np.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(-1, 3, 3)
    rz = np.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).reshape(-1, 3, 3)
    return rz @ ry @ rx


def wave_templates(
    mu: np.ndarray, sl: np.ndarray, sr: np.ndarray, vec: np.ndarray, fs: float
) -> tuple[np.ndarray, int]:
    """One beat's heart vector per group.

    Args:
        mu, sl, sr: (B, n_waves) centre and left/right widths of each wave in seconds (R peak = 0).
        vec: (B, n_waves, 3) each wave's peak vector in mV.
        fs: sampling rate.

    Returns:
        ((B, n_groups, 3, L) float32 templates, index of the R peak within the template).
    """
    start = int(round(TEMPLATE_START_S * fs))
    t = (np.arange(start, int(round(TEMPLATE_END_S * fs))) / fs).astype(np.float32)  # (L,)
    d = t[None, None, :] - mu[..., None].astype(np.float32)  # (B, n_waves, L)
    s = np.where(d < 0, sl[..., None], sr[..., None]).astype(np.float32)
    shape = np.exp(-0.5 * (d / s) ** 2)
    out = np.stack(
        [np.einsum("bwl,bwc->bcl", shape[:, g], vec[:, g].astype(np.float32)) for g in GROUPS], axis=1
    )
    return out, -start


def beat_times(
    rng: np.random.Generator, rr_mean: np.ndarray, rsa: np.ndarray, jitter: np.ndarray, duration: float
) -> np.ndarray:
    """R-peak times (B, K) in seconds covering [-1 s, duration + 1 s]; NaN past the end.

    RR intervals follow respiration (respiratory sinus arrhythmia of relative amplitude ``rsa`` at
    0.2-0.33 Hz) plus independent relative jitter ``jitter``.
    """
    b = len(rr_mean)
    k_max = int(np.ceil((duration + 2.0) / rr_mean.min() / (1 - rsa.max() - 3 * jitter.max()))) + 2
    f_resp = rng.uniform(0.2, 0.33, b)
    phase = rng.uniform(0, 2 * np.pi, b)
    eps = rng.standard_normal((b, k_max))
    times = np.empty((b, k_max))
    t = -1.0 - rng.uniform(0, 1, b) * rr_mean
    for k in range(k_max):  # a short recurrence: each RR depends on the time of the previous beat
        times[:, k] = t
        rr = rr_mean * (1 + rsa * np.sin(2 * np.pi * f_resp * t + phase) + jitter * eps[:, k])
        t = t + np.maximum(rr, 0.25)
    times[times > duration + 1.0] = np.nan
    return times


def beat_vectors(
    templates: np.ndarray, delta: np.ndarray, beat_gain: np.ndarray, beat_turn: np.ndarray
) -> np.ndarray:
    """Every beat's heart vector (B, K, 3, L) float32: its group templates scaled, plus its turn.

    Args:
        templates: (B, G, 3, L) one beat per group.
        delta: (B, 3, L) change of the summed templates for a unit respiratory turn of the heart.
        beat_gain: (B, K, G) each beat's amplitude factor per group.
        beat_turn: (B, K) each beat's respiratory turn (multiplies ``delta``).
    """
    beats = beat_gain[:, :, 0, None, None] * templates[:, None, 0]
    for g in range(1, templates.shape[1]):
        beats += beat_gain[:, :, g, None, None] * templates[:, None, g]
    beats += beat_turn[:, :, None, None] * delta[:, None]
    return beats


def render(
    beats: np.ndarray, r_index: int, times: np.ndarray, fs: float, n_samples: int, pad: int
) -> np.ndarray:
    """Place every beat on the time axis.

    Args:
        beats: (B, K, 3, L) each beat's heart vector (:func:`beat_vectors`).
        r_index: R-peak sample within a beat.
        times: (B, K) R-peak times (NaN = no beat).
        fs: sampling rate.
        n_samples: samples of the record.
        pad: extra samples kept on both sides (filters need them; the caller crops).

    Returns:
        (B, 3, n_samples + 2 * pad) float32 heart vector.
    """
    b, length = beats.shape[0], beats.shape[-1]
    total = n_samples + 2 * pad
    # An overlap-add: a plain loop of slice additions is several times faster than one
    # fancy-indexed scatter of the same size.
    out = np.zeros((b, 3, total + 2 * length), dtype=np.float32)  # margins absorb partial beats
    starts = np.rint(np.nan_to_num(times, nan=-1e6) * fs).astype(np.int64) - r_index + pad + length
    ok = (starts >= 0) & (starts <= total + length)
    for i in range(b):
        row = out[i]
        for k in np.flatnonzero(ok[i]):
            s = starts[i, k]
            row[:, s : s + length] += beats[i, k]
    return out[:, :, length : length + total]
