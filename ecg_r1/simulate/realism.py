"""Comparing the generator's normal ECGs with the real normal-looking records of LUDB.

Both sides are measured the same way, beat by beat from fiducial points, then the median over a
record's beats: LUDB from its cardiologists' per-lead annotations (QRS and T onsets and offsets),
the simulated records from the fiducials the generator knows (R-peak times, QRS onset and offset,
T window). Per record:

* heart rate: 60 / median RR;
* QRS duration: QRS offset minus onset (lead II annotation for LUDB; the extent of the QRS
  waves, +-2.5 widths, for the generator);
* amplitudes are ratios: every lead of the LUDB copy this was checked against spans exactly 1 mV
  peak-to-peak (its header gains differ per lead), so the simulated leads are scaled the same way
  before measuring (``unit_ptp``); absolute voltages cannot be checked against this copy;
* per lead, QRS amplitude: peak-to-peak between QRS onset and offset;
* per lead, T amplitude: the signed largest deviation in the T window from the isoelectric level
  (mean over the 20 ms before QRS onset), and its polarity: positive above +0.05 mV, negative
  below -0.05 mV, flat otherwise.

"Normal-looking" LUDB records: sinus rhythm (or brady-, tachy-, arrhythmia), a normal, vertical or
horizontal axis, no conduction abnormality, extrasystole, ventricular hypertrophy, pacing,
ischemia or non-specific repolarisation abnormality (40 of 200 records).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import polars as pl

from ecg_r1.constants import DEFAULT_SEED
from ecg_r1.data.canonical import LEADS
from ecg_r1.simulate import truth
from ecg_r1.simulate.device import record
from ecg_r1.simulate.hospitals import PROFILES, HospitalProfile
from ecg_r1.simulate.mechanisms import ecg_parameters

POLARITY_MV = 0.05
_LUDB_SUFFIX = {lead: lead.lower() for lead in LEADS}
_SINUS = ("Sinus rhythm", "Sinus bradycardia", "Sinus tachycardia", "Sinus arrhythmia")
_CLEAN_FIELDS = (
    "Conduction abnormalities",
    "Extrasystolies",
    "Cardiac pacing",
    "Ischemia",
    "Non-specific repolarization abnormalities",
)


def ludb_normal_ids(ludb_dir: Path) -> list[str]:
    """Record ids of LUDB's normal-looking records (see the module docstring)."""
    out = []
    with open(Path(ludb_dir) / "ludb.csv", newline="") as f:
        for row in csv.DictReader(f):
            hyp = [h.strip() for h in row["Hypertrophies"].split("\n") if h.strip()]
            axis = row["Electric axis of the heart"]
            if (
                row["Rhythms"].strip() in _SINUS
                and any(a in axis for a in ("normal", "vertical", "horizontal"))
                and all("atri" in h.lower() for h in hyp)
                and not any(row[k].strip() for k in _CLEAN_FIELDS)
            ):
                out.append(row["ID"].strip())
    return out


def _triples(ann_sample: np.ndarray, ann_symbol: list[str], peak: str) -> np.ndarray:
    """(onset, peak, offset) sample triples of one wave type from a LUDB annotation."""
    out = []
    for i, s in enumerate(ann_symbol):
        if (
            s == peak
            and 0 < i < len(ann_symbol) - 1
            and ann_symbol[i - 1] == "("
            and ann_symbol[i + 1] == ")"
        ):
            out.append((ann_sample[i - 1], ann_sample[i], ann_sample[i + 1]))
    return np.array(out, dtype=np.int64).reshape(-1, 3)


def _amplitudes(x: np.ndarray, fs: float, qrs: np.ndarray, t_win: np.ndarray) -> tuple[float, float]:
    """Median QRS peak-to-peak and signed T amplitude of one lead over its beats.

    qrs: (k, 2) onset/offset samples; t_win: (k, 2) T window samples, same beats.
    """
    pre = max(1, int(round(0.02 * fs)))
    qrs_amp, t_amp = [], []
    for (on, off), (t0, t1) in zip(qrs, t_win, strict=True):
        if on - pre < 0 or t1 >= len(x) or t1 <= t0 or off <= on:
            continue
        base = x[on - pre : on].mean()
        qrs_amp.append(x[on : off + 1].max() - x[on : off + 1].min())
        seg = x[t0 : t1 + 1] - base
        t_amp.append(seg[np.abs(seg).argmax()])
    if not qrs_amp:
        return float("nan"), float("nan")
    return float(np.median(qrs_amp)), float(np.median(t_amp))


def measure_ludb(ludb_dir: Path, record_ids: list[str] | None = None) -> pl.DataFrame:
    """One row per LUDB record: heart_rate, qrs_ms, qrs_amp_<lead>, t_amp_<lead> (mV)."""
    import wfdb

    ludb_dir = Path(ludb_dir)
    ids = record_ids if record_ids is not None else ludb_normal_ids(ludb_dir)
    rows = []
    for rid in ids:
        path = ludb_dir / "data" / rid
        rec = wfdb.rdrecord(str(path))
        names = [n.lower() for n in rec.sig_name]
        row: dict[str, float | str] = {"record_id": rid}
        for lead in LEADS:
            ann = wfdb.rdann(str(path), _LUDB_SUFFIX[lead])
            qrs = _triples(ann.sample, ann.symbol, "N")
            tw = _triples(ann.sample, ann.symbol, "t")
            # pair each T with the QRS before it
            pairs_q, pairs_t = [], []
            for on, _, off in qrs:
                after = tw[tw[:, 0] > off]
                if len(after) and after[0, 0] - off < rec.fs * 0.6:
                    pairs_q.append((on, off))
                    pairs_t.append((after[0, 0], after[0, 2]))
            x = rec.p_signal[:, names.index(lead.lower())]
            qa, ta = _amplitudes(
                x, rec.fs, np.array(pairs_q).reshape(-1, 2), np.array(pairs_t).reshape(-1, 2)
            )
            row[f"qrs_amp_{lead}"], row[f"t_amp_{lead}"] = qa, ta
            if lead == "II":
                rr = np.diff(qrs[:, 1]) / rec.fs
                row["heart_rate"] = float(60 / np.median(rr)) if len(rr) else float("nan")
                row["qrs_ms"] = (
                    float(np.median(qrs[:, 2] - qrs[:, 0]) / rec.fs * 1000) if len(qrs) else float("nan")
                )
        rows.append(row)
    return pl.DataFrame(rows)


def simulate_normals(
    n: int, seed: int = DEFAULT_SEED, profile: HospitalProfile = PROFILES[0], unit_ptp: bool = True
) -> pl.DataFrame:
    """Simulate n normal ECGs (no TWI, normal conduction and voltage, LUDB-like ages) and measure them.

    Args:
        n: number of records.
        seed: random seed.
        profile: the recording device (hospital_a's 500 Hz diagnostic device by default).
        unit_ptp: scale every lead to 1 mV peak-to-peak over the record before measuring, as the
            LUDB copy this was checked against is scaled (its header gains differ per lead so that each
            lead spans exactly 1 mV); amplitudes are then comparable as ratios. False measures mV.

    Returns:
        One row per record with the columns of :func:`measure_ludb`.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(99,)))
    names = {f.name: f for f in truth.ECG_FINDINGS}
    ecg = {name: np.zeros(n, dtype=int) for name in names}
    ecg["pattern"] = np.full(n, -1)  # normal T
    ecg["conduction"] = np.zeros(n, dtype=int)
    ecg["rate"] = rng.choice(3, size=n, p=[0.2, 0.75, 0.05])  # LUDB normals: some sinus bradycardia
    age = np.clip(np.rint(rng.normal(30, 10, n)), 15, 70).astype(int)
    male = rng.random(n) < 0.5
    params = ecg_parameters(rng, ecg, age, male)
    signals, times = record(rng, params, profile)
    if unit_ptp:
        signals = signals / np.ptp(signals, axis=2, keepdims=True)
    fs = float(profile.fs)
    rows = []
    for i in range(n):
        t = times[i][~np.isnan(times[i])]
        t = t[(t + params.qrs_on[i] > 0.05) & (t + params.t_end[i] < 9.95)]
        qrs = np.rint(np.stack([t + params.qrs_on[i], t + params.qrs_off[i]], 1) * fs).astype(np.int64)
        tw = np.rint(np.stack([t + params.qrs_off[i] + 0.08, t + params.t_end[i]], 1) * fs).astype(np.int64)
        row: dict[str, float | str] = {"record_id": f"sim_{i}"}
        for j, lead in enumerate(LEADS):
            row[f"qrs_amp_{lead}"], row[f"t_amp_{lead}"] = _amplitudes(signals[i, j], fs, qrs, tw)
        row["heart_rate"] = float(60 / np.median(np.diff(t)))
        row["qrs_ms"] = float((params.qrs_off[i] - params.qrs_on[i]) * 1000)
        rows.append(row)
    return pl.DataFrame(rows)


def compare(real: pl.DataFrame, sim: pl.DataFrame) -> pl.DataFrame:
    """Side-by-side quartiles of every measure, with the share of positive/negative T per lead.

    Returns:
        One row per measure: real_q25/q50/q75, sim_q25/q50/q75, and for T amplitudes
        real_pos/sim_pos and real_neg/sim_neg (fraction of records with that polarity).
    """
    measures = (
        ["heart_rate", "qrs_ms"] + [f"qrs_amp_{lead}" for lead in LEADS] + [f"t_amp_{lead}" for lead in LEADS]
    )
    rows = []
    for m in measures:
        r = real[m].drop_nulls().drop_nans().to_numpy()
        s = sim[m].drop_nulls().drop_nans().to_numpy()
        row = {"measure": m}
        for tag, v in (("real", r), ("sim", s)):
            q = np.quantile(v, [0.25, 0.5, 0.75]) if len(v) else [np.nan] * 3
            row.update({f"{tag}_q25": float(q[0]), f"{tag}_q50": float(q[1]), f"{tag}_q75": float(q[2])})
            row[f"{tag}_pos"] = float(np.mean(v > POLARITY_MV)) if m.startswith("t_amp") and len(v) else None
            row[f"{tag}_neg"] = float(np.mean(v < -POLARITY_MV)) if m.startswith("t_amp") and len(v) else None
        rows.append(row)
    return pl.DataFrame(rows)
