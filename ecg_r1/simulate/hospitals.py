"""Simulated hospitals: recording device, case mix, age distribution and note style.

The last hospital of a cohort is the natural held-out ("external") site: its device (60 Hz mains,
its own filter band and gain), case mix, prevalence and note language differ most from the
others. More than four hospitals cycle through the four profiles with a shifted prevalence, so
``--hospitals 6`` still gives six distinct sites.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ecg_r1.simulate.truth import ISCHEMIC, MECHANISMS, N_MECH

# Share of each ischemic territory among ischemic cases, and of each non-ischemic mechanism
# among the non-ischemic ones, at a general hospital (profiles reweight them).
_ISCHEMIC_SPLIT = {"ischemia_anterior": 0.45, "ischemia_inferior": 0.32, "ischemia_lateral": 0.23}
_NON_ISCHEMIC_SPLIT = {
    "lvh_strain": 0.27,
    "lbbb": 0.09,
    "rbbb": 0.08,
    "juvenile_pattern": 0.08,
    "apical_hcm": 0.07,
    "memory_t": 0.08,
    "electrolyte_drug": 0.18,
    "athlete": 0.15,
}


@dataclass(frozen=True)
class HospitalProfile:
    """One simulated site: its ECG device, its patients and how its notes are written."""

    name: str
    fs: int  # sampling rate, Hz
    adc_gain: float  # ADC units per mV written in the header
    calibration: float  # true amplitude scale of the device (gain calibration error)
    highpass_hz: float  # device filter band
    lowpass_hz: float
    emg_noise_mv: float  # sd of broadband muscle noise at the electrodes
    wander_mv: float  # amplitude of respiratory / motion baseline wander
    mains_hz: int  # 50 or 60
    mains_mv: float  # residual mains hum (0 = notch filter on)
    prevalence: float  # P(ischemic)
    non_ischemic_weights: dict[str, float]  # multiplies _NON_ISCHEMIC_SPLIT
    age_shift: float  # years added to every mechanism's mean age
    missing_rate: float  # P(a clinical finding is left out of the note)
    note_style: str  # key into clinical.NOTE_STYLES
    description: str

    def case_mix(self) -> np.ndarray:
        """P(mechanism | hospital), in MECHANISMS order."""
        mix = np.zeros(N_MECH)
        for i, m in enumerate(MECHANISMS):
            if ISCHEMIC[i]:
                mix[i] = self.prevalence * _ISCHEMIC_SPLIT[m]
            else:
                w = _NON_ISCHEMIC_SPLIT[m] * self.non_ischemic_weights.get(m, 1.0)
                mix[i] = w
        non = ~ISCHEMIC
        mix[non] *= (1 - self.prevalence) / mix[non].sum()
        return mix


PROFILES: tuple[HospitalProfile, ...] = (
    HospitalProfile(
        name="hospital_a",
        fs=500,
        adc_gain=1000.0,
        calibration=1.00,
        highpass_hz=0.05,
        lowpass_hz=150.0,
        emg_noise_mv=0.010,
        wander_mv=0.08,
        mains_hz=50,
        mains_mv=0.0,
        prevalence=0.45,
        non_ischemic_weights={},
        age_shift=0.0,
        missing_rate=0.12,
        note_style="en_prose",
        description="university hospital, emergency department; diagnostic-band 500 Hz device",
    ),
    HospitalProfile(
        name="hospital_b",
        fs=250,
        adc_gain=200.0,
        calibration=0.97,
        highpass_hz=0.5,
        lowpass_hz=40.0,
        emg_noise_mv=0.025,
        wander_mv=0.15,
        mains_hz=50,
        mains_mv=0.02,
        prevalence=0.32,
        non_ischemic_weights={"athlete": 2.5, "juvenile_pattern": 2.0, "apical_hcm": 0.5, "lbbb": 0.6},
        age_shift=-6.0,
        missing_rate=0.25,
        note_style="en_terse",
        description="community hospital with a sports-medicine clinic; monitoring-band 250 Hz device",
    ),
    HospitalProfile(
        name="hospital_c",
        fs=1000,
        adc_gain=400.0,
        calibration=1.03,
        highpass_hz=0.05,
        lowpass_hz=100.0,
        emg_noise_mv=0.008,
        wander_mv=0.06,
        mains_hz=50,
        mains_mv=0.01,
        prevalence=0.58,
        non_ischemic_weights={"apical_hcm": 2.5, "lvh_strain": 1.3, "athlete": 0.4, "juvenile_pattern": 0.4},
        age_shift=3.0,
        missing_rate=0.08,
        note_style="en_structured",
        description="tertiary cardiac centre (chest-pain unit, cardiomyopathy clinic); 1000 Hz device",
    ),
    HospitalProfile(
        name="hospital_d",
        fs=500,
        adc_gain=200.0,
        calibration=0.98,
        highpass_hz=0.67,
        lowpass_hz=100.0,
        emg_noise_mv=0.018,
        wander_mv=0.12,
        mains_hz=60,
        mains_mv=0.03,
        prevalence=0.40,
        non_ischemic_weights={"electrolyte_drug": 1.8, "memory_t": 1.5, "athlete": 0.6},
        age_shift=5.0,
        missing_rate=0.20,
        note_style="de",
        description="held-out site: German-language notes, 60 Hz mains, older patients, more drug effects",
    ),
)


def hospital_profiles(k: int) -> list[HospitalProfile]:
    """The first k hospitals (``hospital_a``, ``hospital_b``, ...). Beyond four, the profiles repeat
    with a shifted prevalence and age so every site stays distinct; the last one is held out."""
    if k < 1:
        raise ValueError(f"hospitals must be at least 1, got {k}")
    if k > 26:
        raise ValueError(f"at most 26 hospitals (hospital_a..hospital_z), got {k}")
    out = []
    for i in range(k):
        base = PROFILES[i % len(PROFILES)]
        if i < len(PROFILES):
            out.append(base)
            continue
        cycle = i // len(PROFILES)
        out.append(
            replace(
                base,
                name=f"hospital_{chr(ord('a') + i)}",
                prevalence=float(np.clip(base.prevalence + 0.07 * cycle * (-1) ** i, 0.25, 0.65)),
                age_shift=base.age_shift + 2.0 * cycle,
                description=f"{base.description} (variant {cycle})",
            )
        )
    return out
