"""Benchmark of the cohort simulator on one core.

Prints, measured in the same run:
1. generation (cases, heart vectors, device, notes, posterior; no disk) in cases/s per hospital
   and for the default four-hospital mix;
2. writing: our format-16 writer vs ``wfdb.wrsamp`` (records/s, and the ratio);
3. end to end ``simulate_cohort`` (generation + writing + manifest/truth/summary) in cases/s,
   and the time that implies for the paper-sized cohort (12,917 cases).

Usage: .venv/bin/python benchmarks/bench_simulate.py [--n 2000] [--per-hospital 1024]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core: no threaded BLAS or FFT
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from ecg_r1.data.canonical import LEADS  # noqa: E402
from ecg_r1.simulate import simulate_cohort, truth  # noqa: E402
from ecg_r1.simulate.clinical import write_notes  # noqa: E402
from ecg_r1.simulate.cohort import CHUNK, _hospital_sizes  # noqa: E402
from ecg_r1.simulate.device import record  # noqa: E402
from ecg_r1.simulate.hospitals import hospital_profiles  # noqa: E402
from ecg_r1.simulate.mechanisms import ecg_parameters  # noqa: E402
from ecg_r1.simulate.writer import to_adc, write_wfdb  # noqa: E402


def generation(n_per_hospital: int) -> dict[str, tuple[float, float, int]]:
    """cases/s by wall clock and by this process's CPU time (the two differ when other work
    shares the cores), per hospital."""
    out = {}
    for p in hospital_profiles(4):
        rng = np.random.default_rng(0)
        mix = p.case_mix()
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(0, n_per_hospital, CHUNK):
            c = truth.draw_cases(rng, CHUNK, mix, p.age_shift, p.missing_rate)
            params = ecg_parameters(rng, c.ecg, c.age, c.male)
            record(rng, params, p)
            write_notes(rng, p.note_style, c.age, c.male, c.stated)
            truth.posterior_ischemic(c, mix, p.age_shift)
        seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu
        out[p.name] = (n_per_hospital / seconds, n_per_hospital / cpu_s, p.fs)
    return out


def writing(n: int) -> tuple[float, float]:
    import wfdb

    rng = np.random.default_rng(0)
    sig = (rng.standard_normal((12, 5000)) * 0.3).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        for i in range(n):
            write_wfdb(Path(tmp) / f"r{i}", to_adc(sig, 1000.0), 500, 1000.0, LEADS)
        ours = n / (time.perf_counter() - start)
        m = max(10, n // 20)
        start = time.perf_counter()
        for i in range(m):
            wfdb.wrsamp(
                f"w{i}", fs=500, units=["mV"] * 12, sig_name=list(LEADS), d_signal=to_adc(sig, 1000.0).astype(np.int64),
                fmt=["16"] * 12, adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=tmp,
            )  # fmt: skip
        theirs = m / (time.perf_counter() - start)
    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000, help="cases for the end-to-end run")
    parser.add_argument(
        "--per-hospital", type=int, default=1024, help="cases per hospital for the generation run"
    )
    args = parser.parse_args()

    print(
        f"cores visible: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f} (other work slows every figure)"
    )
    gen = generation(args.per_hospital)
    sizes = _hospital_sizes(10_000, hospital_profiles(4))
    mixed = sum(sizes) / sum(s / gen[name][0] for s, name in zip(sizes, gen, strict=True))
    mixed_cpu = sum(sizes) / sum(s / gen[name][1] for s, name in zip(sizes, gen, strict=True))
    print("1. generation only (no disk), one core: cases/s by wall clock | by CPU time")
    for name, (rate, rate_cpu, fs) in gen.items():
        print(f"   {name} ({fs:4d} Hz): {rate:7.0f} | {rate_cpu:7.0f}")
    print(f"   four-hospital mix:      {mixed:7.0f} | {mixed_cpu:7.0f}")

    ours, theirs = writing(400)
    print("2. writing WFDB format 16 (500 Hz, 12 leads):")
    print(
        f"   ecg_r1 writer: {ours:7.0f} records/s;  wfdb.wrsamp: {theirs:5.0f} records/s;  ratio {ours / theirs:.0f}x"
    )

    with tempfile.TemporaryDirectory() as tmp:
        start, cpu = time.perf_counter(), time.process_time()
        summary = simulate_cohort(Path(tmp), n=args.n, seed=0)
        seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu
        size_mb = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 1e6
    rate, rate_cpu = args.n / seconds, args.n / cpu_s
    print(
        f"3. simulate_cohort(n={args.n}) end to end, one worker: {seconds:.1f} s wall ({rate:.0f} cases/s), "
        f"{cpu_s:.1f} s CPU ({rate_cpu:.0f} cases/s), {size_mb:.0f} MB on disk"
    )
    print(
        f"   implied for n=12917: {12917 / rate:.0f} s wall at this load, {12917 / rate_cpu:.0f} s of one idle core"
    )
    print(
        f"   Bayes-optimal accuracy {summary.bayes_accuracy:.3f} (AUROC {summary.bayes_auroc:.3f}), "
        f"ECG-only {summary.ecg_only_bayes_accuracy:.3f}, text-only {summary.text_only_bayes_accuracy:.3f}, "
        f"naive rule {summary.naive_rule_accuracy:.3f}"
    )


if __name__ == "__main__":
    main()
