"""Validation throughput: the Great Expectations suite with and without the signal checks.

Writes a synthetic cohort folder (table + memory-mapped signals) to a temporary directory and
prints records/s for, side by side in the same run:

* the signal measures alone (``signal_quality`` over the memmap, in chunks);
* the table suite alone (GE, no signals) on the same records and on a table of ``--table-n`` rows;
* the whole validation (``validate_cohort_dir``: table suite + signal checks + writing outputs).

Usage: ``.venv/bin/python benchmarks/bench_validate.py [--n 2000] [--table-n 100000]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from ecg_r1.data.canonical import FS, LEADS, N_SAMPLES
from ecg_r1.data.expectations import ValidationConfig
from ecg_r1.data.signal_checks import signal_quality
from ecg_r1.data.store import COHORT_FILE, COHORT_SCHEMA, SignalWriter, open_signals
from ecg_r1.data.validate import validate_cohort, validate_cohort_dir


def table(n: int) -> pl.DataFrame:
    rng = np.random.default_rng(0)
    hospitals = np.array(["hospital_a", "hospital_b", "hospital_c", "hospital_d"])
    h = hospitals[np.arange(n) % 4]
    ids = np.char.add("r", np.arange(n).astype(str))
    frame = pl.DataFrame(
        {
            "record_id": ids,
            "patient_id": np.char.add(h, np.char.add("/", ids)),
            "hospital": h,
            "source_format": "manifest",
            "source_path": ids,
            "checksum": ids,
            "source_fs": 500.0,
            "source_gain": 1000.0,
            "derived_leads": "",
            "cropped_samples": 0,
            "padded_samples": 0,
            "age": rng.integers(18, 95, n).astype(float),
            "sex": np.where(rng.random(n) < 0.5, "M", "F"),
            "note": "chest pain, troponin negative",
            "report": None,
            "raw_codes": "59931005",
            "twi": True,
            "twi_leads": "V1,V2",
            "label": np.where(rng.random(n) < 0.4, "ischemic", "non-ischemic"),
            "row": np.arange(n),
        },
    )
    # Columns the schema has and this table does not fill stay empty, as a reader would leave them.
    missing = [
        pl.lit(None, dtype=dtype).alias(c) for c, dtype in COHORT_SCHEMA.items() if c not in frame.columns
    ]
    return frame.with_columns(missing).cast(COHORT_SCHEMA).select(list(COHORT_SCHEMA))


def write_signals(folder: Path, n: int) -> None:
    rng = np.random.default_rng(1)
    t = np.arange(N_SAMPLES) / FS
    phase = t % 1.0
    beat = 1.2 * np.exp(-(((phase - 0.3) / 0.012) ** 2)) - 0.3 * np.exp(-(((phase - 0.6) / 0.05) ** 2))
    with SignalWriter(folder) as writer:
        for _ in range(n):
            gains = rng.uniform(-1, 1, (len(LEADS), 1))
            writer.append((gains * beat + rng.normal(0, 0.01, (len(LEADS), N_SAMPLES))).astype(np.float32))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="records with signals (240 KB each on disk)")
    parser.add_argument("--table-n", type=int, default=100_000, help="rows of the table-only run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cohort = table(args.n)
        cohort.write_parquet(folder / COHORT_FILE)
        write_signals(folder, args.n)
        signals = open_signals(folder)
        config = ValidationConfig()

        validate_cohort(cohort.head(10), None)  # warm-up: GE's import and first context (seconds)

        def quality_only() -> None:
            for start in range(0, args.n, config.chunk_size):
                signal_quality(np.asarray(signals[start : start + config.chunk_size]))

        results = {
            "signal_quality only": (args.n, timed(quality_only)),
            "GE table suite only": (args.n, timed(lambda: validate_cohort(cohort, None))),
            "whole validation (dir)": (args.n, timed(lambda: validate_cohort_dir(folder))),
        }
        big = table(args.table_n)
        results[f"GE table suite, {args.table_n} rows"] = (
            args.table_n,
            timed(lambda: validate_cohort(big, None)),
        )

    print(f"validation benchmark ({args.n} records with signals)")
    base = results["whole validation (dir)"]
    for name, (n, seconds) in results.items():
        print(f"  {name:<34} {n / seconds:>10,.0f} records/s  ({seconds:.2f} s)")
    print(
        f"  signal checks share of the whole validation: "
        f"{results['signal_quality only'][1] / base[1]:.0%}; table suite share: "
        f"{results['GE table suite only'][1] / base[1]:.0%}"
    )


if __name__ == "__main__":
    main()
