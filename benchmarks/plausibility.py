"""False refusals and catches of the signal-plausibility checks (``no_ecg_structure``, ``implausible_rate``).

Usage:
    .venv/bin/python benchmarks/plausibility.py [--sim-n 2000] [--sim-seeds 0 1] [--noise-n 200]

What it measures, in one run, with :func:`ecg_r1.data.signal_checks.signal_issues` (what ingest runs):

1. **False refusals** (must be 0): the shared real records (LUDB + CinC 2021, read by the
   project's readers, every record of 8 s or more, before any check) and simulated cohorts
   (``ecg-r1 simulate`` with each seed, 4 hospitals: 250, 500 and 1000 Hz devices, filters,
   noise, mains), ingested by ``ingest``.
2. **Catches**: the real 500 Hz records with a wrong rate in their header (declared ``k`` times
   the true rate; tiled to last 8.5 s at the declared rate), and noise of many colours (white
   noise sampled at 50-250 Hz, uniform bytes, low-passed, moving averages, pink, brown, a sine
   in noise), each brought to the canonical form as ingest does.

Prints one line per set: n, refused by reason, and the smallest QRS peakiness and heart rate.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from scipy.signal import butter, lfilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ecg_r1.data.canonical import FS, LEADS, canonicalize  # noqa: E402
from ecg_r1.data.ingest import ingest  # noqa: E402
from ecg_r1.data.readers.wfdb_header import parse_header  # noqa: E402
from ecg_r1.data.readers.wfdb_signal import read_signal  # noqa: E402
from ecg_r1.data.signal_checks import signal_issues, signal_quality  # noqa: E402
from ecg_r1.data.store import open_signals  # noqa: E402
from ecg_r1.simulate import simulate_cohort  # noqa: E402

SHARED = ROOT / ".." / "shared" / "data"
RATE_FACTORS = (0.1, 0.2, 0.5, 2.0, 5.0, 10.0)
NOISE_KINDS = (
    "white@50", "white@100", "white@170", "white@250", "uniform@60", "uniform@120",
    "lowpass@10", "lowpass@20", "lowpass@40", "moving_average@5", "moving_average@20",
    "pink", "brown", "laplace_lowpass@20", "sine_in_noise",
)  # fmt: skip


def real_raw() -> list[tuple[np.ndarray, float, list[str]]]:
    """(signal in mV, rate, lead names) of every shared LUDB and CinC record the readers read."""
    headers = sorted((SHARED / "ludb").rglob("*.hea")) + sorted((SHARED / "cinc2021").rglob("*.hea"))
    out = []
    for header_path in headers:
        try:
            header = parse_header(header_path)
            out.append((read_signal(header).signal, header.fs, header.lead_names))
        except ValueError:
            continue
    return out


def canonical(raw: list[tuple[np.ndarray, float, list[str]]], factor: float = 1.0) -> np.ndarray:
    """Canonical signals of ``raw`` with each rate declared ``factor`` times too high (500 Hz only
    when ``factor`` != 1), the signal tiled to last 8.5 s at that rate."""
    out = []
    for signal, fs, leads in raw:
        if factor != 1.0 and fs != FS:
            continue
        declared = fs * factor
        if signal.shape[0] / declared < 8.0:
            if factor == 1.0:
                continue
            signal = np.tile(signal, (int(np.ceil(8.5 * declared / signal.shape[0])), 1))
        out.append(canonicalize(signal, declared, leads).signal)
    return np.stack(out)


def noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` canonical records of one kind of noise (mV-scale)."""
    name, _, value = kind.partition("@")
    records = []
    for _ in range(n):
        if name in ("white", "uniform"):
            fs = float(value)
            length = int(10 * fs) + 1
            raw = rng.normal(0, 0.3, (length, 12)) if name == "white" else rng.uniform(-1, 1, (length, 12))
            records.append(canonicalize(raw.astype(np.float32), fs, list(LEADS)).signal)
            continue
        if name in ("lowpass", "laplace_lowpass"):
            b, a = butter(4, float(value) / (FS / 2))
            source = rng.normal(0, 1, (12, 5000)) if name == "lowpass" else rng.laplace(0, 1, (12, 5000))
            x = lfilter(b, a, source, axis=-1)
        elif name == "moving_average":
            width = int(value)
            c = np.cumsum(rng.normal(0, 1, (12, 5000 + width)), axis=-1)
            x = (c[:, width:] - c[:, :-width]) / width
        elif name == "pink":
            f = np.fft.rfftfreq(5000)
            spectrum = (rng.normal(size=(12, len(f))) + 1j * rng.normal(size=(12, len(f)))) / np.maximum(
                f, 1e-3
            ) ** 0.5
            x = np.fft.irfft(spectrum, 5000)
        elif name == "brown":
            x = np.cumsum(rng.normal(0, 0.01, (12, 5000)), axis=-1)
        else:  # sine_in_noise
            t = np.arange(5000) / FS
            x = np.sin(2 * np.pi * rng.uniform(0.5, 3) * t)[None] + 0.05 * rng.normal(size=(12, 5000))
        records.append(x.astype(np.float32))
    return np.stack(records)


def report(name: str, signals: np.ndarray) -> Counter[str]:
    issues = signal_issues(signals)
    reasons = Counter(issue[0] if issue else "passed" for issue in issues)
    quality = signal_quality(signals)
    peak = quality["qrs_peakiness"].to_numpy()
    hr = quality["hr_bpm"].drop_nans().drop_nulls()
    print(
        f"{name:28s} n={len(signals):5d}  {dict(sorted(reasons.items()))}  "
        f"peakiness min {np.min(peak):.1f}  hr min {hr.min() if len(hr) else float('nan'):.0f}"
    )
    return reasons


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sim-n", type=int, default=2000)
    parser.add_argument("--sim-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--noise-n", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    print("false refusals (must be 0):")
    raw = real_raw() if SHARED.is_dir() else []
    if raw:
        report("real LUDB+CinC", canonical(raw))
    else:
        print(f"real records: not found at {SHARED}")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.sim_seeds:
            simulate_cohort(Path(tmp) / f"sim{seed}", n=args.sim_n, hospitals=4, seed=seed, workers=2)
            summary = ingest([Path(tmp) / f"sim{seed}"], Path(tmp) / f"cohort{seed}", workers=2)
            print(
                f"{'simulated seed ' + str(seed) + ' (ingest)':28s} n={summary.records_in:5d}  quarantined {summary.quarantined}"
            )
            report(f"simulated seed {seed} (checks)", np.asarray(open_signals(Path(tmp) / f"cohort{seed}")))
    print("catches:")
    if raw:
        for factor in RATE_FACTORS:
            report(f"real, rate declared x{factor:g}", canonical(raw, factor))
    for kind in NOISE_KINDS:
        report(f"noise {kind}", noise(kind, args.noise_n, rng))


if __name__ == "__main__":
    main()
