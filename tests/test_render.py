"""The renderer: page geometry measured from the pixels, layouts, caching, augmentations.

Geometry is measured, not read from the renderer's constants: the grid's major lines are
found from pixel colours (a column whose median pixel is the darkest grid colour is a vertical
line), which gives pixels per mm; traces are the black pixels; rows are found as long
horizontal runs of black. Expected layouts are written out here from the clinical convention.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from ecg_r1.data.store import COHORT_FILE, COHORT_SCHEMA, SignalWriter
from ecg_r1.imaging.augment import Augment
from ecg_r1.imaging.draw import render_page, render_png
from ecg_r1.imaging.page import CLINICAL, RenderConfig
from ecg_r1.imaging.png import save_png
from ecg_r1.imaging.render import INDEX_FILE, content_hash, render_cohort

FS = 500
t_s = np.arange(5000) / FS
ORDER = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
# What each row of a clinical printout shows, as (lead, start s, end s).
EXPECTED_ROWS = {
    "3x4+rhythm": [
        [(lead, 2.5 * c, 2.5 * c + 2.5) for c, lead in enumerate(row)]
        for row in (("I", "aVR", "V1", "V4"), ("II", "aVL", "V2", "V5"), ("III", "aVF", "V3", "V6"))
    ]
    + [[("II", 0.0, 10.0)]],
    "6x2": [[(limb, 0.0, 5.0), (chest, 5.0, 10.0)] for limb, chest in zip(ORDER[:6], ORDER[6:], strict=True)],
    "12x1": [[(lead, 0.0, 10.0)] for lead in ORDER],
}
SIZES = [2200, 896, 448]


# --- measuring pages ---------------------------------------------------------------------------


_MEASURED: list[tuple[Image.Image, np.ndarray, np.ndarray]] = []


def _measure(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Luminance and ink mask of a page, kept for the last few pages (helpers call it often)."""
    for seen, lum, mask in _MEASURED:
        if seen is image:
            return lum, mask
    lum = np.asarray(image.convert("RGB"), dtype=np.float32).mean(axis=2)
    _MEASURED.append((image, lum, lum < 80))
    del _MEASURED[:-3]
    return lum, lum < 80


def luminance(image: Image.Image) -> np.ndarray:
    return _measure(image)[0]


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) index of each run of True."""
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return [(int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def major_lines(image: Image.Image, axis: int) -> np.ndarray:
    """Centres of the major grid lines: columns (axis=1) or rows (axis=0) whose median pixel is
    the darkest grid colour."""
    lum = luminance(image)
    medians = np.median(lum, axis=0 if axis == 1 else 1)
    paper = medians.max()
    grid = (medians < paper - 10) & (medians >= 80)  # darker than paper, lighter than ink
    assert grid.any(), "no grid lines found"
    is_major = grid & (medians <= medians[grid].min() + 10)
    return np.array([(a + b) / 2 for a, b in runs(is_major)])


_LATTICES: list[tuple[Image.Image, int, tuple[float, float]]] = []


def lattice(image: Image.Image, axis: int) -> tuple[float, float]:
    """(position of the first major line, spacing) fitted to the major lines. A line hidden
    under a trace leaves a double gap, so each line is numbered by its distance from the first
    in units of the typical gap."""
    for seen, seen_axis, fitted in _LATTICES:
        if seen is image and seen_axis == axis:
            return fitted
    fitted = _fit_lattice(image, axis)
    _LATTICES.append((image, axis, fitted))
    del _LATTICES[:-6]
    return fitted


def _fit_lattice(image: Image.Image, axis: int) -> tuple[float, float]:
    centres = major_lines(image, axis)
    gaps = np.diff(centres)
    slope = gaps[gaps < 1.5 * np.median(gaps)].mean()
    for _ in range(2):  # number the lines, fit, renumber with the better spacing
        number = np.rint((centres - centres[0]) / slope)
        slope, intercept = np.polyfit(number, centres, 1)
    assert np.abs(number * slope + intercept - centres).max() < 1.0, "major lines are not evenly spaced"
    assert number[-1] > 20, "too few major lines"
    return float(intercept), float(slope)


def px_per_mm(image: Image.Image, axis: int) -> float:
    return lattice(image, axis)[1] / 5.0


def off_grid(image: Image.Image, axis: int, position: float) -> float:
    """Distance in pixels from a position to the nearest major line."""
    origin, spacing = lattice(image, axis)
    steps = (position - origin) / spacing
    return abs(steps - round(steps)) * spacing


def ink(image: Image.Image) -> np.ndarray:
    return _measure(image)[1]


def baselines(image: Image.Image) -> list[float]:
    """Rows of flat traces: pixel rows that are black over a third of the page width."""
    mask = ink(image)
    long_rows = mask.sum(axis=1) > mask.shape[1] / 3
    return [(a + b) / 2 for a, b in runs(long_rows)]


def trace_start(image: Image.Image, baseline: float, ppm: float) -> float:
    """First column of the trace on a row: the first baseline run longer than 20 mm (the
    calibration pulse's short flat parts come before it)."""
    row = ink(image)[round(baseline - 0.5) : round(baseline + 0.5) + 1].any(axis=0)
    for first, last in runs(row):
        if last - first > 20 * ppm:
            return float(first)
    raise AssertionError("no trace found on the row")


def pulses(
    image: Image.Image, baseline: float, ppm: float, low_mm: float, high_mm: float
) -> list[tuple[int, int]]:
    """Column runs with ink between low_mm and high_mm above the baseline (negative: below)."""
    top, bottom = sorted((round(baseline - high_mm * ppm), round(baseline - low_mm * ppm)))
    return runs(ink(image)[top : bottom + 1].any(axis=0))


def trace_centre(image: Image.Image, column: int, top: int, bottom: int) -> float:
    rows = np.flatnonzero(ink(image)[top:bottom, column])
    assert rows.size, f"no trace in column {column}"
    return float(top + rows.mean())


def signal_with(lead_ii: np.ndarray) -> np.ndarray:
    signal = np.zeros((12, 5000), dtype=np.float32)
    signal[1] = lead_ii
    return signal


def lead_marked_signal() -> np.ndarray:
    """Each lead k has a 0.5 mV, 0.1 s pulse at 0.1 + 0.2 k s into every 2.5 s window, so the
    time of a pulse inside a segment tells which lead is shown there."""
    signal = np.zeros((12, 5000), dtype=np.float32)
    for k in range(12):
        for window in range(4):
            start = 2.5 * window + 0.1 + 0.2 * k
            signal[k, (start <= t_s) & (t_s < start + 0.1)] = 0.5
    return signal


# --- geometry ----------------------------------------------------------------------------------


class TestGeometry:
    @pytest.mark.parametrize("width", SIZES)
    def test_grid_is_square_with_5mm_major_lines_and_page_matches_paper(self, width: int) -> None:
        image = render_page(np.zeros((12, 5000), np.float32), RenderConfig(width_px=width))
        ppm_x, ppm_y = px_per_mm(image, 1), px_per_mm(image, 0)
        assert ppm_x == pytest.approx(ppm_y, rel=0.01)
        # A letter page is 279.4 mm wide: the grid must say the same.
        assert image.width / ppm_x == pytest.approx(279.4, rel=0.01)

    @pytest.mark.parametrize("width", SIZES)
    def test_one_millivolt_is_ten_mm_and_one_second_is_25_mm(self, width: int) -> None:
        pulse = ((t_s >= 4.0) & (t_s < 6.0)).astype(np.float32)  # 1 mV for 2 s in lead II
        image = render_page(signal_with(pulse), RenderConfig(width_px=width))
        ppm = px_per_mm(image, 1)
        rhythm = baselines(image)[-1]
        x0 = trace_start(image, rhythm, ppm)
        plateau = [r for r in pulses(image, rhythm, ppm, 5, 12) if r[0] > x0 + 10 * ppm]  # past the label
        assert len(plateau) == 1, plateau
        first, last = plateau[0]
        band = (round(rhythm - 15 * ppm), round(rhythm + 3 * ppm))
        high = trace_centre(image, (first + last) // 2, *band)
        low = trace_centre(image, round(x0 + 50 * ppm), *band)  # 2 s in: flat 0 mV
        tol = 1.5 / ppm  # mm: one and a half pixels
        assert (low - high) / ppm == pytest.approx(10.0, abs=tol)
        # The vertical edges sit at 4 s and 6 s after the trace start: 100 mm and 150 mm.
        line = max(1, round(0.3 * ppm))
        assert (first + (line - 1) / 2 - x0) / ppm == pytest.approx(100.0, abs=tol + line / ppm)
        assert (last - first - (line - 1)) / ppm == pytest.approx(50.0, abs=tol + line / ppm)

    @pytest.mark.parametrize("width", SIZES)
    def test_sine_period_and_amplitude(self, width: int) -> None:
        image = render_page(
            signal_with(np.sin(2 * np.pi * 1.0 * t_s).astype(np.float32)), RenderConfig(width_px=width)
        )
        ppm = px_per_mm(image, 1)
        # The rhythm strip is the lowest row: the bottom quarter of the page. Its columns past
        # the calibration pulse and label (the first eighth of the page) hold only lead II.
        mask = ink(image)
        first_row = int(image.height * 0.75)
        band = mask[first_row:, int(image.width * 0.125) :]
        cols = np.flatnonzero(band.any(axis=0))
        top = np.array([np.flatnonzero(band[:, c])[0] for c in cols])
        bottom = np.array([np.flatnonzero(band[:, c])[-1] for c in cols])
        # Peak-to-trough: 2 mV = 20 mm (the trace thickness adds to both ends).
        line = max(1, round(0.3 * ppm))
        assert (bottom.max() - top.min() - (line - 1)) / ppm == pytest.approx(20.0, abs=2 / ppm)
        # Crests: columns where the trace touches its highest row; one run per period.
        crest_runs = runs(np.isin(np.arange(band.shape[1]), cols[top <= top.min()]))
        centres = np.array([(a + b) / 2 for a, b in crest_runs])
        assert len(centres) >= 8
        assert np.diff(centres).mean() / ppm == pytest.approx(25.0, abs=1.5 / ppm)

    @pytest.mark.parametrize("width", SIZES)
    def test_calibration_pulse_is_one_millivolt(self, width: int) -> None:
        image = render_page(np.zeros((12, 5000), np.float32), RenderConfig(width_px=width))
        ppm = px_per_mm(image, 1)
        base = baselines(image)[0]
        x0 = trace_start(image, base, ppm)
        cal = [r for r in pulses(image, base, ppm, 8, 12) if r[1] < x0]
        assert len(cal) == 1
        first, last = cal[0]
        band = (round(base - 15 * ppm), round(base + 3 * ppm))
        assert (base - trace_centre(image, (first + last) // 2, *band)) / ppm == pytest.approx(
            10.0, abs=1.5 / ppm
        )
        # 0.2 s at 25 mm/s
        line = max(1, round(0.3 * ppm))
        assert (last - first - (line - 1)) / ppm == pytest.approx(5.0, abs=1.5 / ppm + line / ppm)

    @pytest.mark.parametrize("width", SIZES)
    def test_rows_and_trace_start_sit_on_major_lines(self, width: int) -> None:
        image = render_page(np.zeros((12, 5000), np.float32), RenderConfig(width_px=width))
        ppm = px_per_mm(image, 1)
        found = baselines(image)
        assert len(found) == 4
        line = max(1, round(0.3 * ppm))
        for base in found:
            assert off_grid(image, 0, base) <= 1.0
            # The trace is one line width thick: its first column is its left edge.
            x0 = trace_start(image, base, ppm) + (line - 1) / 2
            assert off_grid(image, 1, x0) <= 1.0


class TestLayouts:
    @pytest.mark.parametrize("layout", list(EXPECTED_ROWS))
    @pytest.mark.parametrize("width", [2200, 896])
    def test_each_segment_shows_its_lead_at_its_time(self, layout: str, width: int) -> None:
        config = RenderConfig(width_px=width, layout=layout)
        image = render_page(lead_marked_signal(), config)
        # Where the traces start, from a flat page of the same layout (a pulse 0.1 s in would
        # cut the first flat run short).
        blank = render_page(np.zeros((12, 5000), np.float32), config)
        ppm = px_per_mm(image, 1)
        rows = baselines(image)
        assert len(rows) == len(EXPECTED_ROWS[layout])
        assert np.allclose(rows, baselines(blank))
        line = max(1, round(0.3 * ppm))
        for base, segments in zip(rows, EXPECTED_ROWS[layout], strict=True):
            x0 = trace_start(blank, base, ppm)
            seen = [
                (first - x0 + (line - 1) / 2) / ppm / 25.0
                for first, _ in pulses(image, base, ppm, 3.5, 6.0)
                if first > x0
            ]
            expected = sorted(
                2.5 * w + 0.1 + 0.2 * ORDER.index(lead)
                for lead, start, end in segments
                for w in range(4)
                if start <= 2.5 * w + 0.1 + 0.2 * ORDER.index(lead) < end
            )
            assert len(seen) == len(expected), (layout, segments, seen)
            np.testing.assert_allclose(seen, expected, atol=1.5 / ppm / 25 + 0.002)

    @pytest.mark.parametrize("layout", list(EXPECTED_ROWS))
    def test_lead_changes_are_marked_where_the_segments_meet(self, layout: str) -> None:
        image = render_page(np.zeros((12, 5000), np.float32), RenderConfig(layout=layout))
        ppm = px_per_mm(image, 1)
        for base, segments in zip(baselines(image), EXPECTED_ROWS[layout], strict=True):
            x0 = trace_start(image, base, ppm)
            ticks = [(a + b) / 2 for a, b in pulses(image, base, ppm, -2.2, -1.0)]
            expected = [x0 + start * 25 * ppm for _, start, _ in segments if start > 0]
            assert len(ticks) == len(expected)
            np.testing.assert_allclose(ticks, expected, atol=1.5)

    def test_header_and_labels_are_drawn(self) -> None:
        blank = render_page(np.zeros((12, 5000), np.float32), CLINICAL)
        with_header = render_page(np.zeros((12, 5000), np.float32), CLINICAL, header="ludb/1")
        assert ink(blank)[: blank.height // 12].sum() > 0  # speed and gain
        assert ink(with_header).sum() > ink(blank).sum()

    def test_row_that_does_not_fit_is_refused(self) -> None:
        with pytest.raises(ValueError, match="50 mm/s needs"):
            render_page(np.zeros((12, 5000), np.float32), RenderConfig(speed_mm_per_s=50))


class TestMediansLayout:
    """The median-complex page: each panel shows its lead's representative beat, larger."""

    @staticmethod
    def beating_signal() -> np.ndarray:
        """72 beats/min; every lead has a 1 mV QRS spike and a T wave of its own depth
        (-0.05 * (k + 1) mV in lead k), plus muscle-like noise that the median averages out."""
        rng = np.random.default_rng(0)
        signal = np.zeros((12, 5000), dtype=np.float32)
        for r in np.arange(0.4, 10.0, 60 / 72):
            qrs = np.exp(-0.5 * ((t_s - r) / 0.012) ** 2)
            t_wave = np.exp(-0.5 * ((t_s - r - 0.30) / 0.05) ** 2)
            for k in range(12):
                signal[k] += qrs - 0.05 * (k + 1) * t_wave
        return signal + 0.02 * rng.standard_normal(signal.shape).astype(np.float32)

    def test_each_panel_holds_its_leads_median_beat_at_twice_the_gain(self) -> None:
        from ecg_r1.imaging.medians import MEDIAN_GAIN_FACTOR, median_traces
        from ecg_r1.imaging.page import RHYTHM_TRACE, plan_page

        signal = self.beating_signal()
        plan = plan_page(RenderConfig(width_px=896, layout="medians+rhythm"))
        traces = median_traces(signal, plan)
        assert traces.shape == (13, 5000)
        np.testing.assert_array_equal(traces[RHYTHM_TRACE], signal[1])  # the strip: lead II in full
        for seg in plan.segments:
            if seg.lead == RHYTHM_TRACE:
                continue
            panel = traces[seg.lead, seg.first : seg.last + 1]
            assert np.isfinite(panel).all()
            # One beat per panel: one QRS peak, the T trough at its lead's depth (twice the gain),
            # and the noise (0.02 mV sd) mostly gone.
            assert panel.max() == pytest.approx(MEDIAN_GAIN_FACTOR * 1.0, abs=0.15)
            assert panel.min() == pytest.approx(-MEDIAN_GAIN_FACTOR * 0.05 * (seg.lead + 1), abs=0.06)
            peak_s = np.argmax(panel) / len(panel) * 0.85
            assert peak_s == pytest.approx(0.30, abs=0.02)
            outside = np.delete(traces[seg.lead], np.arange(seg.first, seg.last + 1))
            assert np.isnan(outside).all()

    def test_a_record_without_beats_shows_its_raw_segments(self) -> None:
        from ecg_r1.imaging.medians import median_traces
        from ecg_r1.imaging.page import plan_page

        plan = plan_page(RenderConfig(width_px=448, layout="medians+rhythm"))
        flat = np.full((12, 5000), 0.1, dtype=np.float32)
        traces = median_traces(flat, plan)
        assert np.isfinite(traces[:12]).sum() == sum(s.last - s.first + 1 for s in plan.segments[:12])
        assert np.nanmax(np.abs(traces - 0.1)) == 0.0

    def test_the_page_draws_the_median_beat_and_states_its_scale(self) -> None:
        from ecg_r1.imaging.medians import median_scale

        signal = self.beating_signal()
        medians = RenderConfig(width_px=896, layout="medians+rhythm")
        speed, gain = median_scale(medians)
        assert speed == pytest.approx(25.0 * 2.5 / 0.85, rel=0.01) and gain == 20.0
        page, standard = render_page(signal, medians), render_page(signal, RenderConfig(width_px=896))
        # Same grid, rows and rhythm strip; the panels differ (one large beat, not three small ones).
        np.testing.assert_allclose(baselines(page), baselines(standard), atol=1.0)
        assert not np.array_equal(ink(page), ink(standard))
        header = slice(0, page.height // 12)
        assert ink(page)[header].sum() > ink(standard)[header].sum()  # "medians 74 mm/s 20 mm/mV"


class TestAppearance:
    def test_colour_page_has_red_grid_and_greyscale_page_has_none(self) -> None:
        zeros = np.zeros((12, 5000), np.float32)
        colour = np.asarray(render_page(zeros, RenderConfig(width_px=896)).convert("RGB"), dtype=int)
        grey = np.asarray(
            render_page(zeros, RenderConfig(width_px=896, color=False)).convert("RGB"), dtype=int
        )
        assert ((colour[..., 0] - colour[..., 1]) > 40).mean() > 0.05
        assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
        assert ((grey[..., 0] > 80) & (grey[..., 0] < 240)).mean() > 0.05  # the grid is still there

    @pytest.mark.parametrize("line_width", [0.15, 0.3, 0.6])
    def test_line_width_is_in_mm_of_paper(self, line_width: float) -> None:
        image = render_page(np.zeros((12, 5000), np.float32), RenderConfig(line_width=line_width))
        ppm = px_per_mm(image, 1)
        column = round(image.width * 0.6)
        thickness = np.count_nonzero(ink(image)[:, column]) / len(baselines(image))
        assert thickness / ppm == pytest.approx(line_width, abs=0.5 / ppm + 0.01)

    def test_compact_png_round_trip(self, tmp_path: Path) -> None:
        image = render_page(lead_marked_signal(), CLINICAL)
        assert image.mode == "P"
        path = save_png(image, tmp_path / "page.png")
        back = Image.open(path)
        assert back.size == (2200, 1700)
        assert np.array_equal(np.asarray(back.convert("RGB")), np.asarray(image.convert("RGB")))
        assert back.info["dpi"][0] == pytest.approx(200, abs=0.5)
        assert path.stat().st_size < 200_000  # 2 bits a pixel, compressed
        assert not list(tmp_path.glob(".*tmp"))

    @pytest.mark.parametrize("width", [2200, 450, 449])  # 450 and 449: rows that do not fill whole bytes
    def test_png_file_is_2_bit_palette_with_the_pages_pixels(self, tmp_path: Path, width: int) -> None:
        config = RenderConfig(width_px=width, color=False)
        signal = lead_marked_signal()
        path = render_png(signal, config, tmp_path / "page.png")
        data = path.read_bytes()
        assert data[12:16] == b"IHDR" and (data[24], data[25]) == (2, 3)  # bit depth 2, palette colour
        back, image = Image.open(path), render_page(signal, config)
        assert back.mode == "P" and len(back.getpalette()) == 12
        assert back.size == (width, config.height_px)
        assert np.array_equal(np.asarray(back.convert("RGB")), np.asarray(image.convert("RGB")))
        assert back.info["dpi"][0] == pytest.approx(config.dpi, abs=0.5)

    def test_missing_samples_leave_a_gap_not_a_crash(self) -> None:
        signal = np.zeros((12, 5000), np.float32)
        signal[1, 2000:2500] = np.nan
        signal[3, :] = np.inf
        image = render_page(signal, CLINICAL)
        ppm = px_per_mm(image, 1)
        rhythm = baselines(image)[-1]
        row = ink(image)[round(rhythm)]
        x0 = trace_start(image, rhythm, ppm)
        gap = runs(~row[int(x0) :])
        assert any(abs((b - a) / ppm - 25.0) < 1.0 for a, b in gap)  # 1 s gap = 25 mm

    @pytest.mark.parametrize("bad", [np.zeros((5000, 12)), np.zeros((12, 4000)), np.zeros((12,))])
    def test_non_canonical_signal_is_refused_with_a_hint(self, bad: np.ndarray) -> None:
        with pytest.raises(ValueError, match="canonicalize"):
            render_page(bad, CLINICAL)


class TestConfig:
    def test_presets_and_derived_height(self) -> None:
        assert (CLINICAL.width_px, CLINICAL.height_px) == (2200, 1700)
        assert CLINICAL.dpi == pytest.approx(200, abs=0.01)
        assert RenderConfig(width_px=448).height_px == 346
        assert RenderConfig.from_dpi(100).width_px == 1100

    def test_key_is_stable_and_changes_with_every_pixel_setting(self) -> None:
        base = RenderConfig()
        assert base.key() == RenderConfig().key()
        variants = [
            RenderConfig(width_px=896),
            RenderConfig(height_px=1800),
            RenderConfig(layout="6x2"),
            RenderConfig(gain_mm_per_mv=5),
            RenderConfig(speed_mm_per_s=20),
            RenderConfig(color=False),
            RenderConfig(line_width=0.5),
            RenderConfig(augment=Augment(noise_std=3)),
        ]
        keys = {base.key(), *(v.key() for v in variants)}
        assert len(keys) == len(variants) + 1
        assert RenderConfig(augment=Augment(seed=5)).key() == base.key()  # off: seed changes nothing

    @pytest.mark.parametrize(
        "kwargs", [{"layout": "4x3"}, {"gain_mm_per_mv": 0}, {"width_px": 10}, {"line_width": float("nan")}]
    )
    def test_bad_settings_are_refused(self, kwargs: dict) -> None:
        with pytest.raises(ValueError):
            RenderConfig(**kwargs)


class TestAugment:
    CONFIG = RenderConfig(width_px=448, augment=Augment.scan(seed=1))

    def test_off_by_default(self) -> None:
        assert not RenderConfig().augment.enabled
        assert render_page(lead_marked_signal(), RenderConfig(width_px=448)).mode == "P"

    def test_deterministic_for_a_seed_and_record(self) -> None:
        a = np.asarray(render_page(lead_marked_signal(), self.CONFIG))
        b = np.asarray(render_page(lead_marked_signal(), self.CONFIG))
        assert np.array_equal(a, b)

    def test_changes_pixels_and_differs_by_seed_and_record(self) -> None:
        signal = lead_marked_signal()
        plain = np.asarray(render_page(signal, RenderConfig(width_px=448)).convert("RGB"), dtype=int)
        augmented = np.asarray(render_page(signal, self.CONFIG), dtype=int)
        other_seed = np.asarray(render_page(signal, RenderConfig(width_px=448, augment=Augment.scan(seed=2))))
        other_record = np.asarray(render_page(signal * 0.9, self.CONFIG))
        assert np.abs(plain - augmented).mean() > 2
        assert not np.array_equal(augmented, other_seed)
        assert not np.array_equal(augmented, other_record)

    @pytest.mark.parametrize(
        "augment",
        [
            Augment(rotation_deg=3),
            Augment(blur_px=1.5),
            Augment(noise_std=10),
            Augment(contrast=0.5),
            Augment(colour_shift=0.3),
        ],
    )
    def test_each_augmentation_changes_pixels(self, augment: Augment) -> None:
        signal = lead_marked_signal()
        plain = np.asarray(render_page(signal, RenderConfig(width_px=448)).convert("RGB"), dtype=int)
        changed = np.asarray(
            render_page(signal, RenderConfig(width_px=448, augment=augment)).convert("RGB"), dtype=int
        )
        assert (plain != changed).mean() > 0.01

    def test_greyscale_stays_greyscale(self) -> None:
        image = render_page(
            lead_marked_signal(), RenderConfig(width_px=448, color=False, augment=Augment.scan())
        )
        assert image.mode == "L"

    def test_negative_range_is_refused(self) -> None:
        with pytest.raises(ValueError, match="noise_std"):
            Augment(noise_std=-1)


# --- cohorts -----------------------------------------------------------------------------------


def write_cohort(folder: Path, signals: list[np.ndarray], rows: list[int] | None = None) -> list[str]:
    ids = [f"test/{i:03d}" for i in range(len(signals))]
    with SignalWriter(folder) as writer:
        for signal in signals:
            writer.append(signal.astype(np.float32))
    table = pl.DataFrame({"record_id": ids, "row": rows or list(range(len(signals)))})
    table = table.with_columns(
        [
            pl.lit(None, dtype=dtype).alias(name)
            for name, dtype in COHORT_SCHEMA.items()
            if name not in table.columns
        ]
    ).select(list(COHORT_SCHEMA))
    table.write_parquet(folder / COHORT_FILE)
    return ids


def sine_signals(n: int) -> list[np.ndarray]:
    return [np.tile(np.sin(2 * np.pi * (0.8 + 0.1 * i) * t_s), (12, 1)).astype(np.float32) for i in range(n)]


class TestRenderCohort:
    CONFIG = RenderConfig(width_px=448)

    def test_renders_indexes_and_skips_what_is_rendered(self, tmp_path: Path) -> None:
        cohort, out = tmp_path / "cohort", tmp_path / "images"
        signals = sine_signals(4)
        ids = write_cohort(cohort, signals)
        first = render_cohort(cohort, out, self.CONFIG, workers=1)
        assert (first.rendered, first.cached, first.failed) == (4, 0, [])
        index = pl.read_parquet(out / INDEX_FILE)
        assert index.columns == ["record_id", "image_path", "content_hash"]
        assert index["record_id"].to_list() == ids
        for rel, digest, signal in zip(index["image_path"], index["content_hash"], signals, strict=True):
            assert (out / rel).is_file() and digest in rel
            assert digest == content_hash(signal, self.CONFIG)
            assert np.array_equal(
                np.asarray(Image.open(out / rel).convert("RGB")),
                np.asarray(render_page(signal, self.CONFIG).convert("RGB")),
            )
        assert first.examples and all(p.is_file() for p in first.examples)

        second = render_cohort(cohort, out, self.CONFIG, workers=1)
        assert (second.rendered, second.cached) == (0, 4)
        assert second.index.equals(first.index)

        # A changed signal is re-rendered; the others are not.
        signals[2] = signals[2] * 0.5
        write_cohort(cohort, signals)
        third = render_cohort(cohort, out, self.CONFIG, workers=1)
        assert (third.rendered, third.cached) == (1, 3)
        assert len(list(out.glob("??/*.png"))) == 5  # the old image of record 2 is still there
        # A new setting renders everything again; pruning removes what the index no longer names.
        fourth = render_cohort(cohort, out, RenderConfig(width_px=448, color=False), workers=1, prune=True)
        assert fourth.rendered == 4
        kept = {p.relative_to(out).as_posix() for p in out.glob("??/*.png")}
        assert kept == set(fourth.index["image_path"])
        with pytest.raises(ValueError, match="prune"):
            render_cohort(cohort, out, self.CONFIG, record_ids=ids[:1], prune=True)

    def test_two_workers_give_the_same_images(self, tmp_path: Path) -> None:
        cohort = tmp_path / "cohort"
        write_cohort(cohort, sine_signals(6))
        one = render_cohort(cohort, tmp_path / "one", self.CONFIG, workers=1)
        two = render_cohort(cohort, tmp_path / "two", self.CONFIG, workers=2)
        assert two.rendered == 6
        assert one.index.equals(two.index)
        for rel in two.index["image_path"]:
            assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes()

    def test_subset_and_unknown_ids(self, tmp_path: Path) -> None:
        cohort = tmp_path / "cohort"
        ids = write_cohort(cohort, sine_signals(3))
        summary = render_cohort(cohort, tmp_path / "out", self.CONFIG, record_ids=[ids[2], ids[0]], workers=1)
        assert summary.index["record_id"].to_list() == [ids[2], ids[0]]
        with pytest.raises(ValueError, match="not in"):
            render_cohort(cohort, tmp_path / "out", self.CONFIG, record_ids=["nope"], workers=1)

    def test_a_bad_record_is_reported_and_the_rest_rendered(self, tmp_path: Path) -> None:
        cohort = tmp_path / "cohort"
        ids = write_cohort(cohort, sine_signals(3), rows=[0, 1, 7])  # row 7 does not exist
        summary = render_cohort(cohort, tmp_path / "out", self.CONFIG, workers=1)
        assert summary.rendered == 2
        assert [rid for rid, _ in summary.failed] == [ids[2]]
        assert "IndexError" in summary.failed[0][1]
        assert summary.index["record_id"].to_list() == ids[:2]


def test_real_ludb_record_looks_like_a_printout(ludb_dir: Path) -> None:
    wfdb = pytest.importorskip("wfdb")
    from ecg_r1.data.canonical import canonicalize

    record = wfdb.rdrecord(str(ludb_dir / "data" / "1"))
    signal = canonicalize(record.p_signal, record.fs, record.sig_name).signal
    image = render_page(signal, CLINICAL)
    ppm = px_per_mm(image, 1)
    assert ppm == pytest.approx(200 / 25.4, rel=0.01)
    mask = ink(image)
    # Every row of the 3x4 + rhythm page has a trace across its 250 mm.
    height_bands = np.array_split(mask[round(0.1 * image.height) :], 4)
    for band in height_bands:
        cols = np.flatnonzero(band.any(axis=0))
        assert (cols.max() - cols.min()) / ppm > 250
    assert math.isfinite(float(mask.mean())) and 0.005 < mask.mean() < 0.1


class TestCli:
    def test_renders_one_wfdb_record(
        self, ludb_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
    ) -> None:
        from ecg_r1.cli import main

        assert (
            main(["render", str(ludb_dir / "data" / "16.hea"), "--out", str(tmp_path), "--width", "448"]) == 0
        )
        written = Path(capsys.readouterr().out.strip())
        assert written == tmp_path / "16.png"
        assert Image.open(written).size == (448, 346)

    def test_renders_a_cohort_then_finds_it_cached(
        self, tmp_path: Path, capsys: pytest.CaptureFixture
    ) -> None:
        import json

        from ecg_r1.cli import main

        write_cohort(tmp_path / "cohort", sine_signals(3))
        argv = ["render", str(tmp_path / "cohort"), "--out", str(tmp_path / "img"), "--preset", "model-448"]
        argv += ["--greyscale", "--layout", "12x1", "--workers", "1", "--no-progress"]
        assert main(argv) == 0
        first = json.loads(capsys.readouterr().out)
        assert (first["rendered"], first["cached"], first["failed"]) == (3, 0, [])
        assert first["config"]["layout"] == "12x1" and first["config"]["color"] is False
        assert main(argv) == 0
        assert json.loads(capsys.readouterr().out)["cached"] == 3

    def test_refuses_a_folder_that_is_not_a_cohort(self, tmp_path: Path) -> None:
        from ecg_r1.cli import main

        with pytest.raises(SystemExit, match="without cohort.parquet"):
            main(["render", str(tmp_path), "--out", str(tmp_path / "img")])
        with pytest.raises(SystemExit, match="50 mm/s needs"):
            main(["render", str(tmp_path), "--out", str(tmp_path / "img"), "--speed", "50"])

    def test_choices_match_the_renderer(self) -> None:
        from ecg_r1.cli import render as cli
        from ecg_r1.imaging import page

        assert set(cli.PRESET_NAMES) == set(page.PRESETS)
