"""``ecg-r1 simulate``: write the simulated multi-hospital TWI cohort (WFDB + manifest + truth)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ecg_r1.constants import DEFAULT_SEED
from ecg_r1.data.folders import check_out_folder
from ecg_r1.simulate import DEFAULT_N, simulate_cohort


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="generate the simulated TWI cohort (WFDB records, manifest.csv, truth.parquet)",
        description="Generate a simulated multi-hospital cohort of 12-lead ECGs with T-wave inversion "
        "and known ground truth, written as a hospital export that `ecg-r1 ingest` reads. "
        "Prints the summary (with the Bayes-optimal accuracy) as JSON.",
    )
    parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"number of cases (default {DEFAULT_N})")
    parser.add_argument(
        "--hospitals", type=int, default=4, help="number of hospitals; the last is held out (default 4)"
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed (default %(default)s)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("data/raw/simulated"),
        help="output folder (default data/raw/simulated)",
    )
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    check_out_folder(args.out)
    summary = simulate_cohort(
        args.out, n=args.n, hospitals=args.hospitals, seed=args.seed, workers=args.workers, progress=True
    )
    print(json.dumps(summary.to_dict(), indent=2))
    return 0
