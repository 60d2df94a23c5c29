"""Recording a heart vector the way a hospital's electrocardiograph does.

Noise enters where it does in life, at the electrodes: muscle noise, baseline wander from
breathing and movement, and mains hum differ between the right arm, left arm, left leg and chest
electrodes. Lead I and II are the limb-electrode differences, V1-V6 are referred to Wilson's
central terminal, the device's band-pass filter (zero-phase Butterworth magnitude, applied in the
frequency domain) and its gain-calibration error act on these eight recorded leads, and III, aVR,
aVL and aVF are then computed from I and II, as electrocardiographs do. So the limb-lead
relations hold exactly in every record, noise and filtering included.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft

from ecg_r1.simulate import heart
from ecg_r1.simulate.hospitals import HospitalProfile
from ecg_r1.simulate.mechanisms import EcgParams

DURATION_S = 10.0
PAD_S = 1.0  # rendered on both sides and cropped, so the frequency-domain filter does not wrap
INTERNAL_MAX_FS = 500.0


def _butter_gain(freqs: np.ndarray, highpass: float, lowpass: float, order: int = 2) -> np.ndarray:
    """|H|^2 of a Butterworth band-pass (as filtfilt applies it: zero phase, squared magnitude)."""
    f = np.maximum(freqs, 1e-9)
    hp = 1.0 / (1.0 + (highpass / f) ** (2 * order))
    lp = 1.0 / (1.0 + (f / lowpass) ** (2 * order))
    out = hp * lp
    out[0] = 0.0
    return out


def record(
    rng: np.random.Generator, params: EcgParams, profile: HospitalProfile
) -> tuple[np.ndarray, np.ndarray]:
    """Render and record a batch of ECGs at the hospital's sampling rate.

    Args:
        rng: random generator.
        params: the batch's waves and nuisance parameters.
        profile: the hospital (sampling rate, filter band, noise, mains, calibration).

    Returns:
        (signals (B, 12, n) float32 mV in canonical lead order, R-peak times (B, K) in s).
    """
    fs_out = float(profile.fs)
    # The heart vector, noise and filter are computed at no more than 500 Hz, where all of the
    # ECG's and the noise's content lies after every profile's low-pass (<= 150 Hz); a faster
    # device's samples then come from the exact band-limited interpolation (a longer inverse
    # transform of the same spectrum), which halves the cost of a 1000 Hz hospital.
    fs = min(fs_out, INTERNAL_MAX_FS)
    n = int(round(DURATION_S * fs))
    pad = int(round(PAD_S * fs))
    hvec, times = _heart_vector(rng, params, fs, n, pad)  # (B, 3, n + 2 pad)
    # Everything after the heart vector is linear, so it is done in the frequency domain: the three
    # heart-vector components are transformed once, projected on the eight recorded leads, and the
    # electrode noise is drawn directly as spectra (white muscle noise; wander and mains on exact
    # bins of the 12 s window), which saves a transform per lead and per noise source.
    hf = sfft.rfft(hvec, axis=-1, workers=1)  # complex64 for float32 input
    rec_matrix = params.lead_matrix[:, [0, 1, 6, 7, 8, 9, 10, 11]].astype(np.float32)  # I, II, V1..V6
    spec = rec_matrix[:, :, 0, None] * hf[:, None, 0]  # three broadcast products beat a complex einsum
    spec += rec_matrix[:, :, 1, None] * hf[:, None, 1]
    spec += rec_matrix[:, :, 2, None] * hf[:, None, 2]
    _add_electrodes(spec, _electrode_noise(rng, profile, len(hvec), hvec.shape[-1], fs))
    filtered = _device_filter(rng, spec, profile, fs, n, pad)
    return heart.twelve_from_recorded(filtered), times


def _heart_vector(
    rng: np.random.Generator, params: EcgParams, fs: float, n: int, pad: int
) -> tuple[np.ndarray, np.ndarray]:
    """The batch's beats placed in time, each scaled and turned a little by respiration:
    ``(heart vector (B, 3, n + 2 pad) float32, R-peak times (B, K) in s)``."""
    b = len(params.heart_rate)
    templates, r_index = heart.wave_templates(params.mu, params.sl, params.sr, params.vec, fs)
    # A respiratory turn of the heart about its long axis (a unit turn = 1 rad, so small factors).
    axis = np.array([0.3, 0.2, 1.0]) / np.linalg.norm([0.3, 0.2, 1.0])
    summed = templates.sum(axis=1)  # (B, 3, L)
    delta = np.cross(axis[None, :, None], summed, axisa=1, axisb=1, axisc=1).astype(np.float32)
    times = heart.beat_times(rng, 60.0 / params.heart_rate, params.rsa, params.rr_jitter, DURATION_S)
    k = times.shape[1]
    resp = np.sin(
        2 * np.pi * rng.uniform(0.2, 0.33, (b, 1)) * np.nan_to_num(times) + rng.uniform(0, 6.3, (b, 1))
    )
    gain = np.empty((b, k, len(heart.GROUPS)), dtype=np.float32)
    gain[:, :, 0] = 1 + 0.05 * rng.standard_normal((b, k))
    gain[:, :, 1] = 1 + rng.uniform(0.02, 0.08, (b, 1)) * resp + 0.015 * rng.standard_normal((b, k))
    gain[:, :, 2] = 1 + rng.uniform(0.01, 0.05, (b, 1)) * resp + 0.02 * rng.standard_normal((b, k))
    turn = (rng.uniform(0.02, 0.06, (b, 1)) * resp).astype(np.float32)
    beats = heart.beat_vectors(templates, delta, gain, turn)
    return heart.render(beats, r_index, times, fs, n, pad), times


def _electrode_noise(
    rng: np.random.Generator, profile: HospitalProfile, b: int, total: int, fs: float
) -> np.ndarray:
    """Noise spectra (B, 9, total // 2 + 1) complex64 at the electrodes RA, LA, LL, V1..V6 of a
    ``total``-sample window: muscle noise, baseline wander and mains hum."""
    nf = total // 2 + 1
    # White noise of sd s has rfft coefficients of variance total * s^2 (half in the real, half in
    # the imaginary part). Uniform real and imaginary parts of that variance are used: each time
    # sample sums thousands of bins, so the noise in time is Gaussian all the same, and uniforms
    # cost a fraction of normal draws.
    sd = profile.emg_noise_mv * rng.uniform(0.5, 1.5, (b, 1, 1)) * np.sqrt(total / 2)
    parts = rng.random((b, 9, 2 * nf), dtype=np.float32)
    parts -= np.float32(0.5)
    parts *= (sd * np.sqrt(12.0)).astype(np.float32)
    electrode = parts.view(np.complex64)  # (B, 9, nf): interleaved real and imaginary parts
    # A sinusoid of amplitude a on bin j has coefficient a * total / 2 * exp(i phase).
    half = total / 2
    dur = total / fs
    w_bins = np.rint(rng.uniform(0.12, 0.45, (b, 9, 2)) * dur).astype(np.int64)
    w_amp = rng.uniform(0.2, 1.0, (b, 9, 2)) * profile.wander_mv * half
    w_coef = w_amp * np.exp(1j * rng.uniform(0, 2 * np.pi, (b, 9, 2)))
    bi, ei = np.meshgrid(np.arange(b), np.arange(9), indexing="ij")
    for j in range(2):
        np.add.at(electrode, (bi, ei, w_bins[..., j]), w_coef[..., j])
    mains_bin = int(round(profile.mains_hz * dur))
    if profile.mains_mv > 0 and mains_bin < nf:
        m_amp = rng.uniform(0.3, 1.0, (b, 9)) * profile.mains_mv * half
        electrode[:, :, mains_bin] += m_amp * np.exp(1j * rng.uniform(0, 2 * np.pi, (b, 9)))
    return electrode


def _add_electrodes(spec: np.ndarray, electrode: np.ndarray) -> None:
    """Add the electrodes' noise to the recorded leads' spectra (B, 8, nf), in place: I = LA - RA,
    II = LL - RA, V1..V6 against Wilson's central terminal (RA + LA + LL) / 3."""
    ra, la, ll, chest = electrode[:, 0], electrode[:, 1], electrode[:, 2], electrode[:, 3:]
    wct = ra + la
    wct += ll
    wct /= 3
    spec[:, 0] += la  # in place: these arrays are the largest of the run
    spec[:, 0] -= ra
    spec[:, 1] += ll
    spec[:, 1] -= ra
    spec[:, 2:] += chest
    spec[:, 2:] -= wct[:, None]


def _device_filter(
    rng: np.random.Generator, spec: np.ndarray, profile: HospitalProfile, fs: float, n: int, pad: int
) -> np.ndarray:
    """The device's band-pass and gain calibration (per record a little around the hospital's), in
    one product, then back to time at the hospital's rate with the padding cropped: (B, 8, n_out)."""
    up = float(profile.fs) / fs
    total = n + 2 * pad
    band = _butter_gain(np.fft.rfftfreq(total, 1 / fs), profile.highpass_hz, profile.lowpass_hz)
    cal = (
        profile.calibration * rng.uniform(0.99, 1.01, len(spec)) * up
    )  # irfft of a longer window divides by more
    spec *= (cal[:, None, None] * band[None, None, :]).astype(np.float32)
    n_out, pad_out = int(round(n * up)), int(round(pad * up))
    return sfft.irfft(spec, n=int(round(total * up)), axis=-1, workers=1)[..., pad_out : pad_out + n_out]
