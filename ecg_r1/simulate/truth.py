"""The stated probability model of the simulated cohort, its exact posterior and the Bayes-optimal metrics.

Generative story (one case; every table below is the whole model, nothing else decides a label):

1. The hospital ``h`` is given. A mechanism ``m`` of the T-wave inversion is drawn from the
   hospital's case mix ``P(m | h)`` (:mod:`ecg_r1.simulate.hospitals`).
2. The label is a function of the mechanism: ``ischemic`` for the three coronary-territory
   mechanisms, ``non-ischemic`` for the others (as angiography would settle it).
3. Given ``m`` only, independently: the age (a truncated normal, recorded in whole years), the
   sex, the discrete **ECG findings** (:data:`ECG_FINDINGS`: TWI territory, T symmetry, T depth,
   QRS voltage and conduction, ST depression, Q waves, U waves, QT, rate) and the discrete
   **clinical findings** (:data:`TEXT_FINDINGS`: complaint, troponin, risk factors, history).
4. The signal is rendered from the ECG findings plus nuisance parameters (heart position, body
   habitus, exact amplitudes and timings, noise) whose distributions do not depend on ``m`` given
   the findings, age, sex and hospital. The note states each clinical finding unless the
   hospital's note leaves that field out (missing completely at random, hospital-specific rate).

Hence the posterior ``P(ischemic | hospital, age, sex, ECG findings, stated clinical findings)``
is exact naive-Bayes arithmetic over the mechanisms (:func:`posterior_ischemic`). Thresholding it
at 0.5 is the Bayes-optimal decision for an observer who reads the ECG findings without error;
a model that reads them from a noisy signal can only do worse, so the stated Bayes-optimal
accuracy is a ceiling (tight where the findings are clearly visible, as they are by design).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

# --------------------------------------------------------------------------- mechanisms
MECHANISMS: tuple[str, ...] = (
    "ischemia_anterior",
    "ischemia_inferior",
    "ischemia_lateral",
    "lvh_strain",
    "lbbb",
    "rbbb",
    "juvenile_pattern",
    "apical_hcm",
    "memory_t",
    "electrolyte_drug",
    "athlete",
)
ISCHEMIC = np.array([m.startswith("ischemia_") for m in MECHANISMS])
TERRITORY = {"ischemia_anterior": "anterior", "ischemia_inferior": "inferior", "ischemia_lateral": "lateral"}
N_MECH = len(MECHANISMS)

AGE_MIN, AGE_MAX = 14.0, 95.0
# mean, sd of age (years) per mechanism; hospitals shift the mean (hospitals.py)
AGE_PARAMS = np.array(
    [
        [63, 11],
        [64, 11],
        [63, 12],
        [66, 12],
        [71, 10],
        [66, 13],
        [19, 4],
        [54, 14],
        [62, 14],
        [63, 15],
        [27, 8],
    ],
    dtype=float,
)
P_MALE = np.array([0.70, 0.72, 0.68, 0.58, 0.45, 0.62, 0.55, 0.62, 0.50, 0.45, 0.75])


@dataclass(frozen=True)
class Finding:
    """A discrete finding: its categories and P(category | mechanism), rows in MECHANISMS order."""

    name: str
    categories: tuple[str, ...]
    table: np.ndarray  # (N_MECH, n_categories), rows sum to 1


def _binary(name: str, p_true: list[float]) -> Finding:
    p = np.asarray(p_true, dtype=float)
    return Finding(name, ("no", "yes"), np.stack([1 - p, p], axis=1))


def _categorical(name: str, categories: tuple[str, ...], rows: list[list[float]]) -> Finding:
    table = np.asarray(rows, dtype=float)
    return Finding(name, categories, table / table.sum(axis=1, keepdims=True))


# Clinical overlap: each finding's table is mixed with its across-mechanism average row by these
# weights, so no single finding is close to pathognomonic. They set the difficulty: with them the
# Bayes-optimal accuracy is about 0.87, the ECG findings alone give about 0.80 and the note alone
# about 0.75 (summary.json reports the measured values of every cohort).
OVERLAP_ECG = 0.2
OVERLAP_TEXT = 0.2


def _overlap(f: Finding, weight: float) -> Finding:
    return Finding(
        f.name, f.categories, (1 - weight) * f.table + weight * f.table.mean(axis=0, keepdims=True)
    )


#                 isch_ant isch_inf isch_lat  lvh   lbbb  rbbb   juv   hcm   memT  elec  athl
PATTERNS = ("anterior", "septal", "inferior", "lateral", "anterolateral", "inferoanterior", "diffuse")
ECG_FINDINGS: tuple[Finding, ...] = (
    _categorical(
        "pattern",
        PATTERNS,
        [
            [0.55, 0.12, 0.00, 0.00, 0.25, 0.08, 0.00],  # ischemia anterior (Wellens-like V1-V4)
            [0.00, 0.00, 0.72, 0.10, 0.00, 0.12, 0.06],  # ischemia inferior
            [0.00, 0.00, 0.06, 0.64, 0.30, 0.00, 0.00],  # ischemia lateral
            [0.00, 0.00, 0.05, 0.62, 0.28, 0.00, 0.05],  # LVH strain
            [0.00, 0.00, 0.00, 0.80, 0.20, 0.00, 0.00],  # LBBB, secondary TWI opposite the QRS
            [0.45, 0.55, 0.00, 0.00, 0.00, 0.00, 0.00],  # RBBB, secondary TWI V1-V3
            [0.30, 0.70, 0.00, 0.00, 0.00, 0.00, 0.00],  # persistent juvenile pattern
            [0.20, 0.00, 0.00, 0.12, 0.68, 0.00, 0.00],  # apical HCM
            [0.25, 0.00, 0.25, 0.00, 0.00, 0.50, 0.00],  # memory T waves
            [0.00, 0.00, 0.10, 0.10, 0.08, 0.00, 0.72],  # electrolyte / drug
            [0.45, 0.30, 0.08, 0.17, 0.00, 0.00, 0.00],  # athlete
        ],
    ),
    _binary("t_symmetric", [0.72, 0.62, 0.62, 0.15, 0.10, 0.15, 0.20, 0.60, 0.55, 0.30, 0.30]),
    _categorical(
        "t_depth",
        ("shallow", "deep", "giant"),
        [
            [0.25, 0.62, 0.13],
            [0.50, 0.48, 0.02],
            [0.50, 0.48, 0.02],
            [0.40, 0.55, 0.05],
            [0.45, 0.55, 0.00],
            [0.60, 0.40, 0.00],
            [0.80, 0.20, 0.00],
            [0.05, 0.35, 0.60],
            [0.50, 0.50, 0.00],
            [0.90, 0.10, 0.00],
            [0.50, 0.48, 0.02],
        ],
    ),
    _binary("high_voltage", [0.15, 0.15, 0.15, 0.90, 0.25, 0.15, 0.25, 0.70, 0.10, 0.10, 0.60]),
    _categorical(
        "conduction",
        ("normal", "lbbb", "rbbb"),
        [
            [0.93, 0.02, 0.05],
            [0.93, 0.02, 0.05],
            [0.93, 0.02, 0.05],
            [0.97, 0.01, 0.02],
            [0.00, 1.00, 0.00],
            [0.00, 0.00, 1.00],
            [0.99, 0.00, 0.01],
            [0.97, 0.01, 0.02],
            [0.98, 0.00, 0.02],
            [0.97, 0.01, 0.02],
            [0.97, 0.00, 0.03],
        ],
    ),
    _binary("st_depression", [0.45, 0.40, 0.40, 0.60, 0.55, 0.20, 0.02, 0.30, 0.05, 0.30, 0.05]),
    _binary("q_waves", [0.30, 0.30, 0.25, 0.05, 0.03, 0.05, 0.00, 0.25, 0.02, 0.03, 0.03]),
    _binary("u_waves", [0.05, 0.05, 0.05, 0.10, 0.05, 0.05, 0.05, 0.05, 0.05, 0.75, 0.15]),
    _binary("long_qt", [0.35, 0.30, 0.30, 0.20, 0.30, 0.25, 0.03, 0.25, 0.10, 0.70, 0.05]),
    _categorical(
        "rate",
        ("brady", "normal", "tachy"),
        [
            [0.10, 0.70, 0.20],
            [0.15, 0.68, 0.17],
            [0.10, 0.70, 0.20],
            [0.10, 0.80, 0.10],
            [0.10, 0.80, 0.10],
            [0.10, 0.80, 0.10],
            [0.15, 0.70, 0.15],
            [0.10, 0.85, 0.05],
            [0.10, 0.80, 0.10],
            [0.10, 0.65, 0.25],
            [0.75, 0.25, 0.00],
        ],
    ),
)

COMPLAINTS = ("chest_pain", "dyspnea", "palpitations", "syncope", "none")
TEXT_FINDINGS: tuple[Finding, ...] = (
    _categorical(
        "complaint",
        COMPLAINTS,
        [
            [0.62, 0.15, 0.05, 0.04, 0.14],
            [0.62, 0.15, 0.05, 0.04, 0.14],
            [0.62, 0.15, 0.05, 0.04, 0.14],
            [0.45, 0.25, 0.10, 0.05, 0.15],
            [0.40, 0.35, 0.08, 0.07, 0.10],
            [0.40, 0.30, 0.10, 0.05, 0.15],
            [0.35, 0.05, 0.15, 0.05, 0.40],
            [0.45, 0.25, 0.10, 0.10, 0.10],
            [0.45, 0.15, 0.20, 0.05, 0.15],
            [0.40, 0.20, 0.20, 0.10, 0.10],
            [0.35, 0.05, 0.15, 0.05, 0.40],
        ],
    ),
    _categorical(
        "troponin",
        ("elevated", "normal", "not_done"),
        [
            [0.42, 0.38, 0.20],
            [0.42, 0.38, 0.20],
            [0.42, 0.38, 0.20],
            [0.13, 0.50, 0.37],
            [0.12, 0.50, 0.38],
            [0.10, 0.50, 0.40],
            [0.03, 0.30, 0.67],
            [0.18, 0.45, 0.37],
            [0.06, 0.45, 0.49],
            [0.18, 0.45, 0.37],
            [0.04, 0.26, 0.70],
        ],
    ),
    _binary("hypertension", [0.62, 0.62, 0.62, 0.85, 0.55, 0.45, 0.05, 0.35, 0.40, 0.50, 0.05]),
    _binary("diabetes", [0.33, 0.33, 0.33, 0.25, 0.22, 0.20, 0.02, 0.10, 0.20, 0.35, 0.02]),
    _binary("smoker", [0.42, 0.42, 0.42, 0.25, 0.25, 0.28, 0.15, 0.20, 0.25, 0.25, 0.05]),
    _binary("dyslipidemia", [0.52, 0.52, 0.52, 0.35, 0.32, 0.30, 0.05, 0.22, 0.30, 0.30, 0.06]),
    _binary("prior_mi_pci", [0.28, 0.28, 0.28, 0.08, 0.10, 0.08, 0.00, 0.05, 0.08, 0.08, 0.01]),
    _binary("cardiomyopathy", [0.05, 0.05, 0.05, 0.15, 0.12, 0.05, 0.01, 0.55, 0.05, 0.05, 0.02]),
    _binary("pacing_history", [0.03, 0.03, 0.03, 0.03, 0.05, 0.03, 0.01, 0.05, 0.75, 0.03, 0.02]),
    _binary("sport", [0.03, 0.03, 0.03, 0.04, 0.03, 0.05, 0.25, 0.05, 0.03, 0.03, 0.90]),
    _binary("qt_drug", [0.10, 0.10, 0.10, 0.10, 0.10, 0.10, 0.02, 0.12, 0.10, 0.55, 0.01]),
    _binary("hypokalemia", [0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.01, 0.05, 0.05, 0.50, 0.02]),
)
ECG_FINDINGS = tuple(_overlap(f, OVERLAP_ECG) for f in ECG_FINDINGS)
TEXT_FINDINGS = tuple(_overlap(f, OVERLAP_TEXT) for f in TEXT_FINDINGS)
FINDING_NAMES: tuple[str, ...] = tuple(f.name for f in ECG_FINDINGS + TEXT_FINDINGS)
MISSING = -1  # code of a clinical finding the note does not state


@dataclass
class Cases:
    """The discrete draw of a batch of cases (all arrays of length n)."""

    mechanism: np.ndarray  # int index into MECHANISMS
    age: np.ndarray  # int years
    male: np.ndarray  # bool
    ecg: dict[str, np.ndarray]  # finding name -> category index
    text: dict[str, np.ndarray]  # finding name -> category index (true value)
    stated: dict[str, np.ndarray]  # finding name -> category index or MISSING (as the note states it)

    @property
    def ischemic(self) -> np.ndarray:
        return ISCHEMIC[self.mechanism]


def _draw_categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row of a (n, k) probability array."""
    cum = np.cumsum(probs, axis=1)
    u = rng.random(len(probs))[:, None] * cum[:, -1:]
    return np.minimum((u >= cum).sum(axis=1), probs.shape[1] - 1)


def age_bounds(mechanism: np.ndarray, age_shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sd of the age distribution of each case (before truncation to [14, 95])."""
    return AGE_PARAMS[mechanism, 0] + age_shift, AGE_PARAMS[mechanism, 1]


def draw_cases(
    rng: np.random.Generator, n: int, case_mix: np.ndarray, age_shift: float, missing_rate: float
) -> Cases:
    """Draw n cases of one hospital from the stated model.

    Args:
        rng: the random generator (the caller seeds it per hospital and chunk).
        n: number of cases.
        case_mix: P(mechanism | hospital), length N_MECH.
        age_shift: years added to every mechanism's mean age at this hospital.
        missing_rate: probability that the note leaves out a given clinical finding.

    Returns:
        The cases' discrete generating variables.
    """
    mech = _draw_categorical(rng, np.broadcast_to(case_mix, (n, N_MECH)))
    mu, sd = age_bounds(mech, age_shift)
    lo, hi = norm.cdf((AGE_MIN - mu) / sd), norm.cdf((AGE_MAX - mu) / sd)
    age = mu + sd * norm.ppf(lo + rng.random(n) * (hi - lo))
    age = np.clip(np.rint(age), AGE_MIN, AGE_MAX).astype(int)
    male = rng.random(n) < P_MALE[mech]
    ecg = {f.name: _draw_categorical(rng, f.table[mech]) for f in ECG_FINDINGS}
    text = {f.name: _draw_categorical(rng, f.table[mech]) for f in TEXT_FINDINGS}
    stated = {name: np.where(rng.random(n) < missing_rate, MISSING, v) for name, v in text.items()}
    return Cases(mech, age, male, ecg, text, stated)


def _age_loglik(age: np.ndarray, age_shift: float) -> np.ndarray:
    """log P(age recorded in whole years | m), shape (n, N_MECH)."""
    mu = AGE_PARAMS[:, 0][None, :] + age_shift
    sd = AGE_PARAMS[:, 1][None, :]
    a = age[:, None].astype(float)
    z_lo, z_hi = (AGE_MIN - mu) / sd, (AGE_MAX - mu) / sd
    # a rounded age k covers [k - .5, k + .5) of the truncated normal (clip at the bounds)
    lo = np.maximum(a - 0.5, AGE_MIN)
    hi = np.minimum(a + 0.5, AGE_MAX)
    mass = norm.cdf((hi - mu) / sd) - norm.cdf((lo - mu) / sd)
    total = norm.cdf(z_hi) - norm.cdf(z_lo)
    return np.log(np.maximum(mass / total, 1e-300))


def log_joint(
    cases: Cases,
    case_mix: np.ndarray,
    age_shift: float,
    use_ecg: bool = True,
    use_text: bool = True,
) -> np.ndarray:
    """log P(m, observed) for every mechanism, shape (n, N_MECH).

    ``use_text=False`` conditions on the ECG findings only (hospital prior included),
    ``use_ecg=False`` on the note (age, sex, stated clinical findings) only.
    """
    n = len(cases.mechanism)
    out = np.broadcast_to(np.log(np.maximum(case_mix, 1e-300)), (n, N_MECH)).copy()
    if use_text:
        out += _age_loglik(cases.age, age_shift)
        out += np.log(np.where(cases.male[:, None], P_MALE[None, :], 1 - P_MALE[None, :]))
        for f in TEXT_FINDINGS:
            v = cases.stated[f.name]
            seen = v != MISSING
            out[seen] += np.log(np.maximum(f.table[:, v[seen]].T, 1e-300))
    if use_ecg:
        for f in ECG_FINDINGS:
            out += np.log(np.maximum(f.table[:, cases.ecg[f.name]].T, 1e-300))
    return out


def posterior_ischemic(cases: Cases, case_mix: np.ndarray, age_shift: float, **kwargs: bool) -> np.ndarray:
    """Exact P(ischemic | observed) of each case under the stated model (see the module docstring)."""
    lj = log_joint(cases, case_mix, age_shift, **kwargs)
    lj -= lj.max(axis=1, keepdims=True)
    p = np.exp(lj)
    return p[:, ISCHEMIC].sum(axis=1) / p.sum(axis=1)


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half); NaN when only one class is present."""
    y = np.asarray(y, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(score)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bayes_metrics(y: np.ndarray, posterior: np.ndarray) -> dict[str, float]:
    """Accuracy of the Bayes decision (posterior >= 0.5) on the drawn labels, its expected value
    under the model (mean of max(p, 1 - p), lower variance) and the AUROC of the posterior."""
    y = np.asarray(y, dtype=bool)
    return {
        "accuracy": float(np.mean((posterior >= 0.5) == y)) if len(y) else float("nan"),
        "expected_accuracy": float(np.mean(np.maximum(posterior, 1 - posterior))) if len(y) else float("nan"),
        "auroc": auroc(y, posterior),
    }


def naive_rule(cases: Cases) -> np.ndarray:
    """The clinically naive rule: TWI (every case) plus chest pain stated in the note means ischemia."""
    return cases.stated["complaint"] == COMPLAINTS.index("chest_pain")
