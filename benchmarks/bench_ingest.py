"""Ingest speed and memory, side by side with a plain ``wfdb.rdrecord`` loop over the same files.

Usage:
    .venv/bin/python benchmarks/bench_ingest.py [--records 3000] [--skip-memory]

What it measures, in one run:

1. A synthetic CinC-layout folder of ``--records`` 12-lead, 10 s, 500 Hz format-16 records
   (written once into a temporary folder from a few distinct signals):
   * records/s of a plain ``wfdb.rdrecord`` loop (physical signals, nothing else);
   * records/s of the read path alone (``load_ref``: header, signal, checksum, canonical form,
     labels; the same work as the loop plus more, nothing written) and its ratio to the loop;
   * records/s of ``ingest`` on one core (the read path plus signal checks, the signal store
     and the Parquet tables) and its ratio to the loop (target: 10x);
   * records/s of ``ingest --workers 2`` and the time the whole of PTB-XL (21,799 records)
     would take at that rate (target: under a minute on 2 cores): at the measured wall-clock
     rate, and on two free cores at the measured CPU rate (what a saturated shared machine
     hides: two workers cannot go faster than the one core left to them).
   Figures are given per CPU second (user + system time of this process and its reaped worker
   processes, ``os.times``), which other work on a shared machine changes less, and per
   wall-clock second; each is the best of ``--rounds`` interleaved rounds.
2. The real shared records (LUDB + CinC 2021; LUDB includes reading 12 annotation files a
   record to measure TWI): the same two figures.
3. Peak memory (max RSS) of an ingest of N/4 and N records in fresh processes: it must not grow
   with the number of records beyond the metadata table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import wfdb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ecg_r1.data.canonical import LEADS  # noqa: E402
from ecg_r1.data.ingest import ingest  # noqa: E402
from ecg_r1.data.labels import load_rules  # noqa: E402
from ecg_r1.data.readers import discover, load_ref  # noqa: E402
from ecg_r1.data.readers.wfdb_write import write_record  # noqa: E402

SHARED = ROOT / ".." / "shared" / "data"
PTBXL_RECORDS = 21_799
DX = ["59931005,164861001", "59931005,164873001", "426783006", "164934002,429622005"]


def synthetic_ecg(seed: int, n: int = 5000, fs: int = 500) -> np.ndarray:
    """A plausible 12-lead ECG in mV (n, 12): P, QRS, T at a random rate, noise and wander."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / fs
    rr = rng.uniform(0.6, 1.1)
    beat = np.zeros(n)
    for onset in np.arange(rng.uniform(0.1, 0.5), n / fs, rr):
        beat += 0.15 * np.exp(-(((t - onset + 0.16) / 0.02) ** 2))
        beat += 1.2 * np.exp(-(((t - onset) / 0.012) ** 2))
        beat += rng.choice([-0.3, 0.3]) * np.exp(-(((t - onset - 0.28) / 0.05) ** 2))
    scale = rng.uniform(0.3, 1.4, 12) * np.array([1, 1, 1, -1, 1, 1, -1, 1, 1, 1, 1, 1])
    wander = 0.1 * np.sin(2 * np.pi * rng.uniform(0.1, 0.4) * t)[:, None]
    return beat[:, None] * scale + wander + rng.normal(0, 0.01, (n, 12))


def make_folder(folder: Path, n_records: int, n_distinct: int = 16) -> list[Path]:
    """Write ``n_records`` records (copies of ``n_distinct`` signals under new names, each with one
    sample changed)."""
    templates = []
    for i in range(n_distinct):
        header = write_record(
            folder / "templates" / f"T{i}",
            synthetic_ecg(i),
            500,
            LEADS,
            comments=[f"Age: {40 + i}", "Sex: Male"],
        )
        templates.append((header.read_text(), header.with_suffix(".dat").read_bytes()))
    headers = []
    for n in range(n_records):
        name = f"E{90000 + n:05d}"
        text, data = templates[n % n_distinct]
        stem = f"T{n % n_distinct}"
        text = text.replace(stem, name) + f"# Dx: {DX[n % len(DX)]}\n"
        (folder / "records" / f"{name}.hea").parent.mkdir(parents=True, exist_ok=True)
        (folder / "records" / f"{name}.hea").write_text(text)
        # The last sample of the last lead carries the record's number: every signal file differs, as
        # in real data (ingest refuses a signal file it has already read as duplicate_signal).
        (folder / "records" / f"{name}.dat").write_bytes(
            data[:-2] + (n % 30000).to_bytes(2, "little", signed=True)
        )
        headers.append(folder / "records" / f"{name}.hea")
    shutil.rmtree(folder / "templates")
    return headers


def readable_by_wfdb(headers: list[Path]) -> list[Path]:
    readable = []
    for header in headers:
        try:
            wfdb.rdheader(str(header.with_suffix("")))
            readable.append(header)
        except Exception:  # the real CinC sample has one header wfdb refuses
            continue
    return readable


def _cpu_seconds() -> float:
    """User + system time of this process and of its reaped children (ingest's worker pool is
    joined before ``ingest`` returns, so its workers' time is included)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(work) -> tuple[float, float]:
    """(records per CPU second of this process and its workers, records per wall-clock second)
    of ``work()``, which returns the number of records it handled."""
    cpu, wall = _cpu_seconds(), time.perf_counter()
    n = work()
    return n / (_cpu_seconds() - cpu), n / (time.perf_counter() - wall)


def rdrecord_loop(headers: list[Path]) -> int:
    """A plain wfdb.rdrecord loop."""
    for header in headers:
        wfdb.rdrecord(str(header.with_suffix("")))
    return len(headers)


def read_path_loop(paths: list[Path]) -> int:
    """Ingest's read path alone (discovery + load_ref), writing nothing."""
    rules = load_rules()
    refs = [ref for path in paths for ref in discover(path, rules)[0]]
    for ref in refs:
        load_ref(ref, rules)
    return len(refs)


def ingest_records(paths: list[Path], out: Path, workers: int) -> int:
    summary = ingest(paths, out, workers=workers)
    shutil.rmtree(out)
    return summary.records_in


def best_of(rounds: int, methods: dict) -> dict[str, tuple[float, float]]:
    """Best (CPU, wall) rates of each method over interleaved rounds."""
    best: dict[str, tuple[float, float]] = {}
    for _ in range(rounds):
        for name, method in methods.items():
            cpu, wall = timed(method)
            old = best.get(name, (0.0, 0.0))
            best[name] = (max(old[0], cpu), max(old[1], wall))
    return best


def peak_rss_mb(folder: Path, out: Path) -> float:
    """Max RSS (MB) of a fresh process that ingests ``folder`` on one core."""
    code = (
        "import resource, sys; from pathlib import Path; sys.path.insert(0, sys.argv[3]);"
        "from ecg_r1.data.ingest import ingest; ingest([Path(sys.argv[1])], Path(sys.argv[2]));"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(folder), str(out), str(ROOT)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(result.stdout.strip().splitlines()[-1])


def _line(name: str, rate: tuple[float, float], reference: tuple[float, float], note: str = "") -> None:
    print(
        f"  {name:26s} {rate[0]:9.0f}  {rate[0] / reference[0]:5.1f}x   {rate[1]:9.0f}  "
        f"{rate[1] / reference[1]:5.1f}x  {note}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=3000, help="synthetic records (default 3000)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; best of each (default 2)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the peak-memory comparison")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        tmp_path = Path(tmp)
        start = time.perf_counter()
        headers = make_folder(tmp_path / "synthetic", args.records)
        print(f"wrote {len(headers)} synthetic records in {time.perf_counter() - start:.1f} s")

        # Warm the page cache so neither side pays for the first read from disk.
        for header in headers:
            header.with_suffix(".dat").read_bytes()
        folder = tmp_path / "synthetic" / "records"
        rates = best_of(
            args.rounds,
            {
                "loop": lambda: rdrecord_loop(headers),
                "read": lambda: read_path_loop([folder]),
                "one": lambda: ingest_records([folder], tmp_path / "out1", workers=1),
                "two": lambda: ingest_records([folder], tmp_path / "out2", workers=2),
            },
        )
        print(
            f"\nsynthetic folder, {args.records} records (12 leads, 10 s, 500 Hz, format 16), best of {args.rounds}:"
        )
        print("                              rec/CPU-s  ratio    rec/wall-s  ratio")
        _line("wfdb.rdrecord loop", rates["loop"], rates["loop"])
        _line("read path (no writing)", rates["read"], rates["loop"])
        _line("ingest, 1 worker", rates["one"], rates["loop"], "(target 10x)")
        _line("ingest, 2 workers", rates["two"], rates["loop"], "(CPU: both workers + parent)")
        two_cpu, two = rates["two"]
        print(
            f"  PTB-XL's {PTBXL_RECORDS} records (target < 60 s on 2 cores): {PTBXL_RECORDS / two:.0f} s at the "
            f"2-worker wall rate of this run; {PTBXL_RECORDS / (2 * two_cpu):.0f} s on 2 free cores at its "
            "CPU rate"
        )

        shared = [SHARED / "ludb", SHARED / "cinc2021"]
        if all(p.is_dir() for p in shared):
            real_headers = readable_by_wfdb(
                sorted((SHARED / "ludb" / "data").glob("*.hea")) + sorted((SHARED / "cinc2021").glob("*.hea"))
            )
            real = best_of(
                args.rounds,
                {
                    "loop": lambda: rdrecord_loop(real_headers),
                    "one": lambda: ingest_records(shared, tmp_path / "out_real", workers=1),
                },
            )
            summary = ingest(shared, tmp_path / "out_real")
            print(
                f"\nshared records (LUDB + CinC 2021, {summary.records_in} records), best of {args.rounds}:"
            )
            _line("wfdb.rdrecord loop", real["loop"], real["loop"], "(signals only)")
            _line("ingest, 1 worker", real["one"], real["loop"], "(LUDB: + 12 annotation files a record)")
            print("  label counts: " + json.dumps(summary.by_source))

        if not args.skip_memory:
            quarter = max(args.records // 4, 1)
            small = tmp_path / "small"
            small.mkdir()
            for header in headers[:quarter]:
                for suffix in (".hea", ".dat"):
                    (small / header.with_suffix(suffix).name).symlink_to(header.with_suffix(suffix))
            rss_small = peak_rss_mb(small, tmp_path / "mem_small")
            rss_full = peak_rss_mb(tmp_path / "synthetic" / "records", tmp_path / "mem_full")
            store_mb = args.records * 12 * 5000 * 4 / 2**20
            print(f"\npeak memory (max RSS), 1 worker; signal store of the full run: {store_mb:.0f} MB")
            print(f"  {quarter:6d} records: {rss_small:7.0f} MB")
            print(f"  {args.records:6d} records: {rss_full:7.0f} MB   (+{rss_full - rss_small:.0f} MB)")


if __name__ == "__main__":
    main()
