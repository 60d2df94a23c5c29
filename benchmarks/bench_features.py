"""Benchmark ``measure_features``: records per second on one core, beside neurokit2 on the same records.

Run: ``.venv/bin/python benchmarks/bench_features.py [--records 2000] [--nk-records 10]``

Signals are the 200 real LUDB records (``--ludb``: a PhysioNet LUDB download), tiled to ``--records``; when
LUDB is absent, synthetic records stand in. One BLAS/OpenMP thread, so the figure is per core.
neurokit2 (``ecg_clean`` + ``ecg_peaks`` + ``ecg_delineate`` with the DWT method, the usual way to
get T peaks with it) is timed on lead II only of ``--nk-records`` records: it delineates one lead,
where ``measure_features`` measures all twelve, so the printed ratio flatters neurokit2 by up to 12x.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from ecg_r1.data.canonical import FS, LEADS, N_SAMPLES, canonicalize  # noqa: E402
from ecg_r1.data.features import measure_features  # noqa: E402


def load_signals(ludb: Path | None) -> tuple[np.ndarray, str]:
    if ludb is not None and (ludb / "data").is_dir():
        import wfdb

        out = []
        for rid in range(1, 201):
            rec = wfdb.rdrecord(str(ludb / "data" / str(rid)))
            out.append(canonicalize(rec.p_signal, rec.fs, rec.sig_name).signal)
        return np.stack(out), "LUDB (200 real records)"
    rng = np.random.default_rng(0)
    t = np.arange(N_SAMPLES) / FS
    out = []
    for _ in range(50):
        rr = 60 / rng.uniform(50, 110)
        beat = sum(
            np.exp(-0.5 * ((t - b) / 0.012) ** 2) + 0.3 * np.exp(-0.5 * ((t - b - 0.3) / 0.04) ** 2)
            for b in np.arange(0.4, 10, rr)
        )
        out.append(np.tile(beat, (12, 1)) + rng.normal(0, 0.02, (12, N_SAMPLES)))
    return np.stack(out).astype(np.float32), "synthetic (50 records; LUDB not found)"


def bench_ours(signals: np.ndarray, n: int) -> tuple[float, float]:
    reps = int(np.ceil(n / len(signals)))
    tiled = np.concatenate([signals] * reps)[:n]
    measure_features(tiled[:64])  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    table = measure_features(tiled)
    elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu
    assert table.height == n
    return n / elapsed, n / cpu_elapsed


def bench_neurokit(signals: np.ndarray, n: int) -> float | None:
    try:
        import neurokit2 as nk
    except ImportError:
        return None
    lead_ii = LEADS.index("II")
    start = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for rec in signals[:n]:
            clean = nk.ecg_clean(rec[lead_ii], sampling_rate=FS)
            _, info = nk.ecg_peaks(clean, sampling_rate=FS)
            nk.ecg_delineate(clean, info["ECG_R_Peaks"], sampling_rate=FS, method="dwt")
    return n / (time.process_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2000, help="records to measure (LUDB tiled)")
    parser.add_argument("--nk-records", type=int, default=10, help="records for the neurokit2 comparison")
    parser.add_argument(
        "--ludb",
        type=Path,
        default=os.environ.get("ECG_R1_LUDB"),
        help="a PhysioNet LUDB folder (default: $ECG_R1_LUDB; synthetic records when absent)",
    )
    args = parser.parse_args()
    signals, source = load_signals(args.ludb)
    print(f"signals: {source}; one thread")
    ours, ours_cpu = bench_ours(signals, args.records)
    print(
        f"measure_features (12 leads): {ours:8.1f} records/s wall ({1000 / ours:.2f} ms/record, n={args.records})"
    )
    # CPU time is the fairer per-core figure on a shared machine (wall time counts waiting).
    print(f"measure_features (12 leads): {ours_cpu:8.1f} records/s of CPU time on one core")
    nk_rate = bench_neurokit(signals, args.nk_records)
    if nk_rate is None:
        print("neurokit2 not installed: comparison skipped")
    else:
        print(
            f"neurokit2 DWT delineation (lead II only): {nk_rate:8.1f} records/s of CPU time (n={args.nk_records})"
        )
        print(f"ratio of CPU-time rates (ours, 12 leads / neurokit2, 1 lead): {ours_cpu / nk_rate:.0f}x")


if __name__ == "__main__":
    main()
