"""Rendering speed: ecg_r1.imaging against a plain matplotlib reference, side by side.

Usage:
    .venv/bin/python benchmarks/bench_render.py [--records 40] [--mpl-pages 6] [--cohort 120]

Both renderers draw the same real LUDB records (read with wfdb, canonicalised) as the same
3x4 + rhythm page at the same size (2200 x 1700 px, 200 dpi: grid paper with 1 mm and 5 mm
lines, calibration pulses, lead labels, header) and write a PNG file; the timings include
encoding and writing. Printed: images/s of each on one core and their ratio, the renderer at
448 and 896 px, the split between drawing and PNG encoding, Pillow's PNG encoder (the one used)
against the hand-written 2-bit encoder the project used to hold (time and bytes a page, at each
preset), a cohort rendered with 1 and 2 worker processes (scaling), and the re-run that finds
everything cached. Also writes the README's example page (``docs/img/ludb_example.png``).

The machine may be shared: the load average is printed; compare figures from one run only.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ecg_r1.data.canonical import FS, LEADS, canonicalize  # noqa: E402
from ecg_r1.data.store import COHORT_FILE, COHORT_SCHEMA, SignalWriter  # noqa: E402
from ecg_r1.imaging import draw, page, png, render  # noqa: E402

EXAMPLE_RECORD = "16"  # sinus rhythm; LUDB notes anterior ischaemia


def load_ludb(folder: Path, which: int | list[str]) -> tuple[list[str], list[np.ndarray]]:
    """LUDB records in canonical form: the first ``which`` of RECORDS, or the named ones."""
    import wfdb

    names = (folder / "RECORDS").read_text().split()[:which] if isinstance(which, int) else which
    ids, signals = [], []
    for name in names:
        record = wfdb.rdrecord(str(folder / name))
        signals.append(canonicalize(record.p_signal, record.fs, record.sig_name).signal)
        ids.append(f"ludb/{Path(name).name}")
    return ids, signals


def matplotlib_page(signal: np.ndarray, path: Path) -> None:
    """The reference: the same page drawn with plain matplotlib (Agg), as ECG plotting tools do,
    with the grid as two line collections rather than hundreds of separate lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    config = page.CLINICAL
    plan = page.plan_page(config)
    width_mm, height_mm = config.paper_mm[0], config.height_px / config.px_per_mm
    fig = plt.figure(figsize=(width_mm / 25.4, height_mm / 25.4), dpi=config.dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width_mm)
    ax.set_ylim(height_mm, 0)
    ax.set_axis_off()
    # The grid as two line collections (one artist each), the fastest plain way to draw it.
    for step, colour, width in ((1, (0.96, 0.77, 0.77), 0.3), (5, (0.89, 0.46, 0.46), 0.6)):
        xs, ys = np.arange(0, width_mm, step), np.arange(0, height_mm, step)
        lines = [[(x, 0), (x, height_mm)] for x in xs] + [[(0, y), (width_mm, y)] for y in ys]
        ax.add_collection(LineCollection(lines, colors=[colour], linewidths=width))
    speed, gain = config.speed_mm_per_s, config.gain_mm_per_mv
    rows = page.layout_rows(config.layout)
    for row, baseline in zip(rows, plan.baselines_mm, strict=True):
        cal = plan.x0_mm - 0.2 * speed - 4
        ax.plot(
            [cal, cal + 2, cal + 2, cal + 2 + 0.2 * speed, cal + 2 + 0.2 * speed, cal + 3 + 0.2 * speed],
            [baseline, baseline, baseline - gain, baseline - gain, baseline, baseline],
            color="black",
            linewidth=0.8,
        )
        for lead, start, end in row:
            first, last = round(start * FS), min(round(end * FS), signal.shape[1] - 1)
            t = np.arange(first, last + 1) / FS
            ax.plot(
                plan.x0_mm + t * speed,
                baseline - signal[LEADS.index(lead), first : last + 1] * gain,
                color="black",
                linewidth=0.8,
            )
            ax.text(plan.x0_mm + start * speed + 1, baseline - 7, lead, fontsize=9)
    ax.text(plan.x0_mm, 4, f"{speed:g} mm/s   {gain:g} mm/mV   {FS} Hz", fontsize=10, va="top")
    fig.savefig(path, dpi=config.dpi)
    plt.close(fig)


def time_pages(
    signals: list[np.ndarray], make_page, out: Path, minimum_s: float, minimum_pages: int
) -> tuple[float, float]:
    """Draw pages (cycling through the signals) for at least ``minimum_s`` and ``minimum_pages``
    after one warm-up page (imports, font cache, the cached background).

    Returns:
        (images per wall-clock second, images per CPU second of this process).
    """
    make_page(signals[0], out / "warmup.png")
    pages, started, cpu = 0, time.perf_counter(), time.process_time()
    while True:
        make_page(signals[pages % len(signals)], out / f"{pages % len(signals)}.png")
        pages += 1
        elapsed = time.perf_counter() - started
        if elapsed >= minimum_s and pages >= minimum_pages:
            return pages / elapsed, pages / (time.process_time() - cpu)


# The 4 pixels of a little-endian uint32 (a0 + a1<<8 + a2<<16 + a3<<24, each 0..3) times this
# constant puts a0<<6 | a1<<4 | a2<<2 | a3 in bits 24-31; the other products stay below bit 24
# or overflow past bit 31, so one multiply and one shift pack 4 pixels into a PNG byte.
_PACK_2BIT = np.uint32((1 << 30) | (1 << 20) | (1 << 10) | 1)


def handwritten_png_2bit(indices: np.ndarray, palette: list[int], dpi: float) -> bytes:
    """The reference: the hand-written 2-bit palette PNG encoder ecg_r1 held before it used
    Pillow's (IHDR, PLTE, pHYs, IDAT, IEND; filter type 0 on every row; zlib level 1)."""
    height, width = indices.shape
    padded_width = -(-width // 4) * 4
    if padded_width != width or not indices.flags.c_contiguous:
        padded = np.zeros((height, padded_width), dtype=np.uint8)
        padded[:, :width] = indices
        indices = padded
    raw = np.empty((height, padded_width // 4 + 1), dtype=np.uint8)
    raw[:, 0] = 0  # filter type None
    raw[:, 1:] = (indices.view("<u4") * _PACK_2BIT) >> np.uint32(24)
    per_metre = round(dpi / 0.0254)
    chunks = [
        b"IHDR" + struct.pack(">IIBBBBB", width, height, 2, 3, 0, 0, 0),
        b"PLTE" + bytes(palette[:12]),
        b"pHYs" + struct.pack(">IIB", per_metre, per_metre, 1),
        b"IDAT" + zlib.compress(raw, 1),
        b"IEND",
    ]
    body = b"".join(struct.pack(">I", len(c) - 4) + c + struct.pack(">I", zlib.crc32(c)) for c in chunks)
    return b"\x89PNG\r\n\x1a\n" + body


def compare_encoders(signals: list[np.ndarray], out: Path, repeats: int) -> None:
    """Pillow's PNG encoder (what ecg_r1.imaging.png uses) against the hand-written reference on
    the same pages at each preset: CPU ms a page for encoding alone and for the whole page (draw,
    encode, atomic write), bytes a page, and whether both files decode to the same pixels. The
    two alternate ``repeats`` times and each keeps its best pass (the machine may be shared)."""
    print("\n== PNG encoder, one core: Pillow (used) | hand-written 2-bit reference, CPU ms a page ==")
    for name, config in page.PRESETS.items():
        print(
            f"{name:10s} {config.width_px} x {config.height_px}: {_compare_at(config, signals, out, repeats)}"
        )


def _compare_at(config: page.RenderConfig, signals: list[np.ndarray], out: Path, repeats: int) -> str:
    palette = draw._palette(config)
    indices = [draw._draw(signal, config) for signal in signals]
    images = [draw.render_page(signal, config) for signal in signals]

    def whole_pillow(i: int) -> bytes:
        return png.save_png(draw.render_page(signals[i], config), out / "pillow.png").read_bytes()

    def whole_reference(i: int) -> bytes:
        data = handwritten_png_2bit(draw._draw(signals[i], config), palette, config.dpi)
        return png._write_atomic(out / "reference.png", data).read_bytes()

    jobs = {
        "encode pillow": lambda i: png.encode_png(images[i]),
        "encode reference": lambda i: handwritten_png_2bit(indices[i], palette, config.dpi),
        "page pillow": whole_pillow,
        "page reference": whole_reference,
    }
    best = dict.fromkeys(jobs, float("inf"))
    for job in jobs.values():
        job(0)  # warm-up
    for _ in range(repeats):
        for label, job in jobs.items():
            started = time.process_time()
            for i in range(len(signals)):
                job(i)
            best[label] = min(best[label], (time.process_time() - started) / len(signals) * 1000)
    ours = [png.encode_png(image) for image in images]
    reference = [jobs["encode reference"](i) for i in range(len(images))]
    same = all(
        np.array_equal(np.asarray(Image.open(io.BytesIO(a))), np.asarray(Image.open(io.BytesIO(b))))
        for a, b in zip(ours, reference, strict=True)
    )
    two_bit = all(data[24:26] == bytes((2, 3)) for data in ours)  # IHDR: bit depth 2, palette colour
    return (
        f"encode {best['encode pillow']:.2f} | {best['encode reference']:.2f} ms "
        f"({best['encode pillow'] / best['encode reference']:.2f}x), "
        f"whole page {best['page pillow']:.2f} | {best['page reference']:.2f} ms "
        f"({best['page pillow'] / best['page reference']:.2f}x), "
        f"{np.mean([len(d) for d in ours]) / 1024:.1f} | {np.mean([len(d) for d in reference]) / 1024:.1f} KB; "
        f"same pixels: {same}; Pillow's files 2-bit palette: {two_bit}"
    )


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def ours(config: page.RenderConfig):
    return lambda signal, path: draw.render_png(signal, config, path)


def write_cohort(folder: Path, ids: list[str], signals: list[np.ndarray]) -> None:
    with SignalWriter(folder) as writer:
        for signal in signals:
            writer.append(signal)
    table = pl.DataFrame({"record_id": ids, "row": list(range(len(ids)))})
    table = table.with_columns(
        [
            pl.lit(None, dtype=dtype).alias(name)
            for name, dtype in COHORT_SCHEMA.items()
            if name not in table.columns
        ]
    ).select(list(COHORT_SCHEMA))
    table.write_parquet(folder / COHORT_FILE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=40, help="LUDB records timed on one core")
    parser.add_argument("--mpl-pages", type=int, default=6, help="pages drawn by the matplotlib reference")
    parser.add_argument("--cohort", type=int, default=120, help="records in the 1 vs 2 worker cohort run")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timing per measurement")
    parser.add_argument("--encoder-pages", type=int, default=20, help="pages in the PNG encoder comparison")
    parser.add_argument("--encoder-repeats", type=int, default=3, help="alternating passes of each encoder")
    parser.add_argument("--example", type=Path, default=ROOT / "docs" / "img" / "ludb_example.png")
    parser.add_argument(
        "--ludb",
        type=Path,
        default=os.environ.get("ECG_R1_LUDB"),
        help="a PhysioNet LUDB folder (default: $ECG_R1_LUDB)",
    )
    args = parser.parse_args()

    if args.ludb is None or not (args.ludb / "RECORDS").is_file():
        # Skipped, not failed: `make bench` runs the other benchmarks on a machine without LUDB.
        print(f"skipped: LUDB not found at {args.ludb}; pass --ludb PATH (a PhysioNet LUDB download)")
        return 0
    ids, signals = load_ludb(args.ludb, max(args.records, args.cohort))
    print(
        f"{len(signals)} LUDB records; cores: {os.cpu_count()}; load average before: {os.getloadavg()[0]:.2f}"
    )

    _, (example_signal,) = load_ludb(args.ludb, [f"data/{EXAMPLE_RECORD}"])
    example = draw.render_page(example_signal, page.CLINICAL, header=f"LUDB record {EXAMPLE_RECORD}")
    png.save_png(example, args.example)
    print(f"example page: {args.example}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "mpl").mkdir()
        (tmp / "ours").mkdir()
        subset = signals[: args.records]
        mpl_wall, mpl_cpu = time_pages(subset, matplotlib_page, tmp / "mpl", 0.0, args.mpl_pages)
        our_wall, our_cpu = time_pages(subset, ours(page.CLINICAL), tmp / "ours", args.seconds, len(subset))
        print("\n== one core, 2200 x 1700 px, 3x4 + rhythm, PNG written (wall clock | per CPU second) ==")
        print(f"matplotlib reference : {mpl_wall:7.2f} | {mpl_cpu:7.2f} images/s")
        print(f"ecg_r1.imaging.draw  : {our_wall:7.2f} | {our_cpu:7.2f} images/s")
        print(f"ratio                : {our_wall / mpl_wall:7.1f} | {our_cpu / mpl_cpu:7.1f} x")
        mpl_size = np.mean([p.stat().st_size for p in (tmp / "mpl").glob("*.png")]) / 1024
        our_size = np.mean([p.stat().st_size for p in (tmp / "ours").glob("*.png")]) / 1024
        print(f"PNG size             : matplotlib {mpl_size:.0f} KB, ecg_r1 {our_size:.0f} KB")

        # Where the time goes: drawing versus encoding (CPU time).
        count = max(len(subset), 20)
        started = time.process_time()
        images = [draw.render_page(subset[i % len(subset)], page.CLINICAL) for i in range(count)]
        draw_ms = (time.process_time() - started) / count * 1000
        started = time.process_time()
        for image in images:
            png.encode_png(image)
        encode_ms = (time.process_time() - started) / count * 1000
        print(f"per page (CPU)       : draw {draw_ms:.1f} ms, 2-bit PNG encode {encode_ms:.1f} ms")
        compare_encoders(subset[: args.encoder_pages], tmp, args.encoder_repeats)

        print("\n== one core, model sizes ==")
        for width in (448, 896):
            config = page.with_size(page.CLINICAL, width)
            wall, cpu = time_pages(subset, ours(config), tmp / "ours", args.seconds / 2, len(subset))
            print(f"{width} x {config.height_px} px      : {wall:7.1f} | {cpu:7.1f} images/s")

        print(f"\n== render_cohort, {min(args.cohort, len(ids))} records, 2200 x 1700 px ==")
        cohort = tmp / "cohort"
        write_cohort(cohort, ids[: args.cohort], signals[: args.cohort])
        rates = {}
        for workers in (1, 2):
            before_child, before_self = children_cpu(), time.process_time()
            summary = render.render_cohort(cohort, tmp / f"images{workers}", page.CLINICAL, workers=workers)
            cpu = children_cpu() - before_child + time.process_time() - before_self
            rates[workers] = summary.images_per_s
            print(
                f"{workers} worker(s)          : {summary.images_per_s:7.1f} images/s wall "
                f"({summary.rendered} in {summary.seconds:.1f} s, {summary.rendered / cpu:.1f} per CPU second)"
            )
        print(f"scaling 2 vs 1       : {rates[2] / rates[1]:7.2f} x (wall clock; needs 2 idle cores)")
        again = render.render_cohort(cohort, tmp / "images2", page.CLINICAL, workers=2)
        print(
            f"re-run (cached)      : {again.rendered} rendered, {again.cached} cached in {again.seconds:.2f} s"
        )
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
