"""Generating a whole simulated cohort: chunks of cases per hospital, written as a hospital export."""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from ecg_r1.constants import DEFAULT_SEED
from ecg_r1.data import labels
from ecg_r1.data.canonical import LEADS
from ecg_r1.simulate import truth
from ecg_r1.simulate.clinical import ENGLISH_STYLE, note_language, write_notes
from ecg_r1.simulate.device import record
from ecg_r1.simulate.hospitals import HospitalProfile, hospital_profiles
from ecg_r1.simulate.mechanisms import ecg_parameters
from ecg_r1.simulate.writer import LEAD_SPELLINGS, to_adc, write_wfdb

log = logging.getLogger(__name__)

# 2,000 cases keep the whole `make run` (ingest, render, tiny-model SFT and GRPO, evaluation)
# within about 15 minutes on two cores; generation itself takes seconds.
DEFAULT_N = 2000
CHUNK = 128  # cases per random stream; fixed so that results do not depend on the worker count
MANIFEST = "manifest.csv"
TRUTH = "truth.parquet"
SUMMARY = "summary.json"
# Share of the cohort at each of the four base hospitals (the held-out one is the smallest).
_SHARES = (0.30, 0.25, 0.25, 0.20)
_SPELLING = {"hospital_a": "standard", "hospital_b": "upper", "hospital_c": "standard", "hospital_d": "lower"}


@dataclass
class SimulationSummary:
    """What ``summary.json`` holds: sizes, prevalence and the ceilings every model is measured against."""

    n: int
    seed: int
    hospitals: list[str]
    held_out_hospital: str
    cases_per_hospital: dict[str, int]
    cases_per_mechanism: dict[str, int]
    cases_per_hospital_and_mechanism: dict[str, dict[str, int]]
    prevalence: float
    prevalence_per_hospital: dict[str, float]
    bayes_accuracy: float
    bayes_auroc: float
    bayes_expected_accuracy: float
    bayes_per_hospital: dict[str, dict[str, float]]
    ecg_only_bayes_accuracy: float
    text_only_bayes_accuracy: float
    naive_rule_accuracy: float
    naive_rule_per_hospital: dict[str, float]
    sampling_rate_per_hospital: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-safe dict: undefined values (the AUROC of a hospital with one class) are None."""
        return _nan_to_none(asdict(self))

    def metadata(self) -> dict[str, float | int | str]:
        """Flat scalars for an orchestrator's asset metadata (Dagster's ``add_output_metadata``):
        sizes, prevalence and the ceilings, overall and per hospital and mechanism."""
        out: dict[str, float | int | str] = {
            "n": self.n,
            "seed": self.seed,
            "held_out_hospital": self.held_out_hospital,
            "prevalence": round(self.prevalence, 4),
            "bayes_accuracy": round(self.bayes_accuracy, 4),
            "bayes_auroc": round(self.bayes_auroc, 4),
            "ecg_only_bayes_accuracy": round(self.ecg_only_bayes_accuracy, 4),
            "text_only_bayes_accuracy": round(self.text_only_bayes_accuracy, 4),
            "naive_rule_accuracy": round(self.naive_rule_accuracy, 4),
        }
        for h in self.hospitals:
            out[f"cases/{h}"] = self.cases_per_hospital[h]
            out[f"prevalence/{h}"] = round(self.prevalence_per_hospital[h], 4)
            out[f"bayes_accuracy/{h}"] = round(self.bayes_per_hospital[h]["accuracy"], 4)
        for m, count in sorted(self.cases_per_mechanism.items()):
            out[f"cases/{m}"] = count
        return out


def _nan_to_none(value: object) -> object:
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    return value


def _hospital_sizes(n: int, profiles: list[HospitalProfile]) -> list[int]:
    shares = np.array([_SHARES[i % len(_SHARES)] for i in range(len(profiles))])
    shares = shares / shares.sum()
    sizes = np.floor(shares * n).astype(int)
    sizes[: n - sizes.sum()] += 1  # hand out the remainder to the first hospitals
    return sizes.tolist()


def _chunk(args: tuple[Path, HospitalProfile, int, int, int, int]) -> tuple[list[dict], list[dict]]:
    """Generate and write one chunk of one hospital; returns its manifest and truth rows."""
    out_dir, profile, h_index, start, size, seed = args
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(h_index, start // CHUNK)))
    mix = profile.case_mix()
    cases = truth.draw_cases(rng, size, mix, profile.age_shift, profile.missing_rate)
    params = ecg_parameters(rng, cases.ecg, cases.age, cases.male)
    signals, _ = record(rng, params, profile)
    # The same note in the training hospitals' language: its own note where it is in English.
    english_style = profile.note_style if note_language(profile.note_style) == "en" else ENGLISH_STYLE
    written = write_notes(rng, (profile.note_style, english_style), cases.age, cases.male, cases.stated)
    notes, english = written[profile.note_style], written[english_style]
    post = truth.posterior_ischemic(cases, mix, profile.age_shift)
    post_ecg = truth.posterior_ischemic(cases, mix, profile.age_shift, use_text=False)
    post_text = truth.posterior_ischemic(cases, mix, profile.age_shift, use_ecg=False)
    naive = truth.naive_rule(cases)
    spelling = LEAD_SPELLINGS[_SPELLING.get(profile.name[:10], "standard")]
    folder = out_dir / profile.name
    folder.mkdir(parents=True, exist_ok=True)
    manifest, truth_rows = [], []
    for i in range(size):
        rid = f"{profile.name}_{start + i:06d}"
        write_wfdb(folder / rid, to_adc(signals[i], profile.adc_gain), profile.fs, profile.adc_gain, spelling)
        label = labels.ISCHEMIC if cases.ischemic[i] else labels.NON_ISCHEMIC
        mech = truth.MECHANISMS[cases.mechanism[i]]
        manifest.append(
            {
                "signal_path": f"{profile.name}/{rid}.hea",
                "record_id": rid,
                "patient_id": f"{profile.name}_p{start + i:06d}",
                "hospital": profile.name,
                "label": label,
                "twi": True,
                "twi_leads": params.twi_leads[i],
                "age": int(cases.age[i]),
                "sex": "M" if cases.male[i] else "F",
                "note": notes[i],
            }
        )
        row = {
            "record_id": rid,
            "hospital": profile.name,
            "mechanism": mech,
            "territory": truth.TERRITORY.get(mech),
            "label": label,
            "posterior_ischemic": float(post[i]),
            "posterior_ecg_only": float(post_ecg[i]),
            "posterior_text_only": float(post_text[i]),
            "naive_rule_ischemic": bool(naive[i]),
            "age": int(cases.age[i]),
            "sex": "M" if cases.male[i] else "F",
            "fs": profile.fs,
            "heart_rate": float(params.heart_rate[i]),
            "pr_ms": float(params.pr_ms[i]),
            "qrs_ms": float((params.qrs_off[i] - params.qrs_on[i]) * 1000),
            "qtc_ms": float(params.qtc_ms[i]),
            "axis_rotation_deg": float(params.axis_deg[i]),
            "qrs_scale": float(params.qrs_scale[i]),
            "t_depth_mv": float(params.t_depth_mv[i]),
            "twi_leads": params.twi_leads[i],
            "note_english": english[i],
        }
        for f in truth.ECG_FINDINGS + truth.TEXT_FINDINGS:
            value = cases.ecg.get(f.name, cases.text.get(f.name))
            row[f.name] = f.categories[int(value[i])]
        for f in truth.TEXT_FINDINGS:
            row[f"{f.name}_in_note"] = bool(cases.stated[f.name][i] != truth.MISSING)
        for j, lead in enumerate(LEADS):
            row[f"t_amp_{lead}"] = float(params.t_amp[i, j])
        truth_rows.append(row)
    return manifest, truth_rows


def _summarise(truth_df: pl.DataFrame, seed: int, profiles: list[HospitalProfile]) -> SimulationSummary:
    y = (truth_df["label"] == labels.ISCHEMIC).to_numpy()
    post = truth_df["posterior_ischemic"].to_numpy()
    naive = truth_df["naive_rule_ischemic"].to_numpy()
    overall = truth.bayes_metrics(y, post)
    hospitals = [p.name for p in profiles]
    per_h, naive_h, prev_h, cases_h, cross = {}, {}, {}, {}, {}
    for name in hospitals:
        sel = (truth_df["hospital"] == name).to_numpy()
        per_h[name] = truth.bayes_metrics(y[sel], post[sel])
        naive_h[name] = float(np.mean(naive[sel] == y[sel])) if sel.any() else float("nan")
        prev_h[name] = float(y[sel].mean()) if sel.any() else float("nan")
        cases_h[name] = int(sel.sum())
        mech = truth_df.filter(pl.col("hospital") == name)["mechanism"].value_counts()
        cross[name] = {m: int(c) for m, c in zip(mech["mechanism"], mech["count"], strict=True)}
    mech_all = truth_df["mechanism"].value_counts()
    return SimulationSummary(
        n=len(truth_df),
        seed=seed,
        hospitals=hospitals,
        held_out_hospital=hospitals[-1],
        cases_per_hospital=cases_h,
        cases_per_mechanism={
            m: int(c) for m, c in zip(mech_all["mechanism"], mech_all["count"], strict=True)
        },
        cases_per_hospital_and_mechanism=cross,
        prevalence=float(y.mean()),
        prevalence_per_hospital=prev_h,
        bayes_accuracy=overall["accuracy"],
        bayes_auroc=overall["auroc"],
        bayes_expected_accuracy=overall["expected_accuracy"],
        bayes_per_hospital=per_h,
        ecg_only_bayes_accuracy=float(np.mean((truth_df["posterior_ecg_only"].to_numpy() >= 0.5) == y)),
        text_only_bayes_accuracy=float(np.mean((truth_df["posterior_text_only"].to_numpy() >= 0.5) == y)),
        naive_rule_accuracy=float(np.mean(naive == y)),
        naive_rule_per_hospital=naive_h,
        sampling_rate_per_hospital={p.name: p.fs for p in profiles},
    )


def simulate_cohort(
    out_dir: Path,
    n: int = DEFAULT_N,
    hospitals: int = 4,
    seed: int = DEFAULT_SEED,
    workers: int = 1,
    progress: bool = False,
) -> SimulationSummary:
    """Generate a simulated multi-hospital TWI cohort and write it as a hospital export.

    Writes under ``out_dir``: one folder of WFDB records per hospital, ``manifest.csv`` (what
    ``ecg_r1.data.ingest`` reads), ``truth.parquet`` (mechanism, generating parameters and exact
    posterior of every case) and ``summary.json``. The same ``seed``, ``n`` and ``hospitals`` give
    the same files whatever ``workers`` is.

    Args:
        out_dir: folder to write (created; existing files of the same names are replaced).
        n: number of cases (split over the hospitals 30/25/25/20 %, cycling beyond four).
        hospitals: number of hospitals (``hospital_a`` ...); the last one is the held-out site.
        seed: random seed.
        workers: processes generating chunks in parallel.
        progress: show a progress bar.

    Returns:
        The :class:`SimulationSummary` also written to ``summary.json``.

    Raises:
        ValueError: for n < 1 or an unsupported number of hospitals.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    profiles = hospital_profiles(hospitals)
    sizes = _hospital_sizes(n, profiles)
    jobs = [
        (out_dir, p, h, start, min(CHUNK, size - start), seed)
        for h, (p, size) in enumerate(zip(profiles, sizes, strict=True))
        for start in range(0, size, CHUNK)
    ]
    manifest: list[dict] = []
    truth_rows: list[dict] = []
    bar = tqdm(total=n, desc="simulate", unit="case", disable=not progress)
    if workers == 1:
        results = map(_chunk, jobs)
        pool = None
    else:
        pool = ProcessPoolExecutor(max_workers=min(workers, os.cpu_count() or 1))
        results = pool.map(_chunk, jobs)
    try:
        for (m_rows, t_rows), job in zip(results, jobs, strict=True):
            manifest.extend(m_rows)
            truth_rows.extend(t_rows)
            bar.update(job[4])
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    pl.DataFrame(manifest).write_csv(out_dir / MANIFEST)
    truth_df = pl.DataFrame(truth_rows)
    truth_df.write_parquet(out_dir / TRUTH)
    summary = _summarise(truth_df, seed, profiles)
    (out_dir / SUMMARY).write_text(json.dumps(summary.to_dict(), indent=2))
    log.info(
        "simulated %d cases at %d hospitals in %s: Bayes-optimal accuracy %.3f, naive rule %.3f",
        n,
        hospitals,
        out_dir,
        summary.bayes_accuracy,
        summary.naive_rule_accuracy,
    )
    return summary
