"""Realism report: the simulator's normal ECGs side by side with LUDB's normal-looking records.

Prints quartiles of heart rate, QRS duration and per-lead QRS and T amplitudes (as shares of
each lead's peak-to-peak, the only scale this LUDB copy allows: every lead spans exactly 1 mV),
the share of upright / inverted T waves per lead, the simulated absolute amplitudes in mV, and
the measures whose medians differ most.

Usage: .venv/bin/python benchmarks/realism_ludb.py [--n 300] --ludb LUDB_FOLDER  (a PhysioNet LUDB download)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import polars as pl

from ecg_r1.simulate.realism import compare, measure_ludb, simulate_normals


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=300, help="simulated normal records")
    parser.add_argument(
        "--ludb", type=Path, default=os.environ.get("ECG_R1_LUDB"), help="LUDB folder (default: $ECG_R1_LUDB)"
    )
    args = parser.parse_args()
    if args.ludb is None or not (args.ludb / "ludb.csv").is_file():
        raise SystemExit(f"LUDB not found at {args.ludb}: pass --ludb PATH")

    start = time.perf_counter()
    real = measure_ludb(args.ludb)
    sim = simulate_normals(args.n, seed=0)
    absolute = simulate_normals(args.n, seed=0, unit_ptp=False)
    table = compare(real, sim).with_columns(sim_mV_q50=compare(real, absolute)["sim_q50"])
    pl.Config.set_tbl_rows(100)
    pl.Config.set_tbl_cols(20)
    pl.Config.set_tbl_width_chars(220)
    pl.Config.set_tbl_hide_dataframe_shape(True)
    print(
        f"LUDB normal-looking records: {len(real)}; simulated normal records: {len(sim)} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    print(
        "amplitudes are shares of each lead's peak-to-peak (LUDB copy: every lead spans 1 mV); "
        "sim_mV_q50 is the simulated median in mV; pos/neg = share of T above +0.05 / below -0.05"
    )
    print(table.with_columns(pl.col(pl.Float64).round(2)))
    diff = table.with_columns(
        gap=(pl.col("sim_q50") - pl.col("real_q50"))
        / (pl.col("real_q75") - pl.col("real_q25")).clip(lower_bound=1e-6)
    ).sort(pl.col("gap").abs(), descending=True)
    print("largest differences (median gap in units of LUDB's interquartile range):")
    for row in diff.head(6).iter_rows(named=True):
        print(
            f"  {row['measure']:<12} real {row['real_q50']:.2f}  sim {row['sim_q50']:.2f}  gap {row['gap']:+.1f} IQR"
        )
    for lead in ("III", "aVL", "V1"):
        r = table.filter(pl.col("measure") == f"t_amp_{lead}").row(0, named=True)
        print(
            f"  T polarity {lead:<4} upright real {r['real_pos']:.0%} sim {r['sim_pos']:.0%}; "
            f"inverted real {r['real_neg']:.0%} sim {r['sim_neg']:.0%}"
        )


if __name__ == "__main__":
    main()
