"""Draw a page: the cached background (grid, calibration pulses, labels, ticks) plus the traces.

Takes: a canonical signal (12 x 5000, mV at 500 Hz) and a :class:`~.page.RenderConfig`.
Gives: the page as a 4-colour ``"P"`` image (:func:`render_page`) or as a PNG file
(:func:`render_png`, through :mod:`.png`).

A page is ECG grid paper (1 mm minor and 5 mm major lines) with the traces drawn at
``speed_mm_per_s`` and ``gain_mm_per_mv`` (25 mm/s and 10 mm/mV by default), a 1 mV calibration
pulse at the start of every row, lead labels, small ticks where the lead changes, and a header
line with speed, gain and sampling rate; where each goes is :func:`~.page.plan_page`'s.

Why it is fast: everything that does not depend on the signal (grid, labels, calibration
pulses, ticks, the fixed header) is drawn once per configuration and cached; a page is a copy of
that array plus the traces, which are rasterised with numpy as one vertical span per pixel
column (the way a thermal ECG printer draws them). The page holds 4 palette indices, so its PNG
is a 2-bit palette one.
"""

from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ecg_r1.data.canonical import FS, LEADS, N_SAMPLES
from ecg_r1.imaging.augment import augment_image
from ecg_r1.imaging.layouts import MEDIANS_LAYOUT
from ecg_r1.imaging.medians import median_scale, median_traces
from ecg_r1.imaging.page import (
    CAL_PULSE_S,
    CLINICAL,
    HEADER_TOP_MM,
    RenderConfig,
    layout_rows,
    plan_page,
)
from ecg_r1.imaging.png import save_png

# Palette indices of a page; PNG stores 4 indices in 2 bits a pixel.
BACKGROUND, MINOR, MAJOR, INK = 0, 1, 2, 3
_COLOUR_PALETTE = ((255, 253, 251), (246, 196, 196), (226, 118, 118), (0, 0, 0))
_GREY_PALETTE = ((255, 255, 255), (222, 222, 222), (168, 168, 168), (0, 0, 0))

# Below this many pixels per mm the 1 mm lines would fill the page with grid colour (at 448 px
# wide a millimetre is 1.6 px), so only the 5 mm lines are drawn.
MIN_MINOR_GRID_PX = 3.0
_TICK_HALF_MM = 2.5
_LABEL_ABOVE_MM = 7.0
_LABEL_SIZE_MM = 3.2
_HEADER_SIZE_MM = 3.5


@functools.lru_cache(maxsize=16)
def _font(size_px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size_px)
    except ImportError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _line_px(config: RenderConfig) -> int:
    return max(1, round(config.line_width * config.px_per_mm))


def _palette(config: RenderConfig) -> list[int]:
    colours = _COLOUR_PALETTE if config.color else _GREY_PALETTE
    return [channel for colour in colours for channel in colour]


@functools.lru_cache(maxsize=8)
def _background(config: RenderConfig) -> np.ndarray:
    """Grid, calibration pulses, labels, ticks and the fixed header: everything but the traces."""
    ppm, width, height = config.px_per_mm, config.width_px, config.height_px
    plan = plan_page(config)
    page = np.full((height, width), BACKGROUND, dtype=np.uint8)
    major_px = 2 if ppm >= 6 else 1
    for axis, size in ((1, width), (0, height)):
        lines_mm = np.arange(0, int(size / ppm) + 1)
        if ppm >= MIN_MINOR_GRID_PX:
            minor = np.rint(lines_mm * ppm).astype(int)
            _grid_lines(page, axis, minor[minor < size], MINOR)
        major = lines_mm[lines_mm % 5 == 0] * ppm
        # A 2 px line covers the two pixels around the exact position, so its centre is on it.
        for offset in range(major_px):
            idx = np.rint(major - (major_px - 1) / 2).astype(int) + offset
            _grid_lines(page, axis, idx[(idx >= 0) & (idx < size)], MAJOR)
    image = Image.fromarray(page)
    draw = ImageDraw.Draw(image)
    line_px = _line_px(config)
    gain_mm, cal_w = config.gain_mm_per_mv, CAL_PULSE_S * config.speed_mm_per_s
    label_font = _font(max(8, round(_LABEL_SIZE_MM * ppm)))
    rows = layout_rows(config.layout)
    for row, baseline in zip(rows, plan.baselines_mm, strict=True):
        start = plan.x0_mm - cal_w - 4.0
        pulse = [
            (start, baseline),
            (start + 2, baseline),
            (start + 2, baseline - gain_mm),
            (start + 2 + cal_w, baseline - gain_mm),
            (start + 2 + cal_w, baseline),
            (start + 3 + cal_w, baseline),
        ]
        draw.line([(x * ppm, y * ppm) for x, y in pulse], fill=INK, width=line_px)
        for lead, seg_start, _ in row:
            x_mm = plan.x0_mm + seg_start * config.speed_mm_per_s
            if seg_start > 0:  # a lead change: a short tick across the baseline
                x = round(x_mm * ppm)
                top, bottom = round((baseline - _TICK_HALF_MM) * ppm), round((baseline + _TICK_HALF_MM) * ppm)
                left = x - (line_px - 1) // 2
                draw.rectangle((left, top, left + line_px - 1, bottom), fill=INK)
            draw.text(
                ((x_mm + 1.0) * ppm, (baseline - _LABEL_ABOVE_MM) * ppm),
                lead,
                fill=INK,
                font=label_font,
                anchor="ls",
            )
    header = f"{config.speed_mm_per_s:g} mm/s   {config.gain_mm_per_mv:g} mm/mV   {FS} Hz"
    if config.layout == MEDIANS_LAYOUT:
        speed, gain = median_scale(config)
        header += f"   medians {speed:.0f} mm/s {gain:g} mm/mV"
    header_font = _font(max(8, round(_HEADER_SIZE_MM * ppm)))
    draw.text((plan.x0_mm * ppm, HEADER_TOP_MM * ppm), header, fill=INK, font=header_font, anchor="lt")
    # Text drawn into a palette image is not anti-aliased, so the page keeps its 4 indices.
    out = np.array(image, dtype=np.uint8)
    out.setflags(write=False)
    return out


def _grid_lines(page: np.ndarray, axis: int, idx: np.ndarray, value: int) -> None:
    if axis == 1:
        page[:, idx] = np.maximum(page[:, idx], value)
    else:
        page[idx, :] = np.maximum(page[idx, :], value)


# ---------------------------------------------------------------------------------------------
# Traces
# ---------------------------------------------------------------------------------------------


def _column_spans(
    xs: list[np.ndarray], ys: list[np.ndarray], line_px: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rasterise polylines (each with increasing x) as one vertical span per pixel column.

    Column ``c`` covers x in [c - 0.5, c + 0.5); its span runs from the lowest to the highest y
    the polyline takes there (the samples inside it and the line's values at its edges, so
    consecutive columns touch and steep QRS slopes stay connected at any resolution). NaN
    samples leave a gap. Thickness: spans grow by the line width vertically and are merged
    with their neighbours horizontally.

    All polylines are done in one vectorised pass: polyline ``k`` is shifted right by
    ``k * stride`` pixels so that they never share a column, and shifted back at the end.

    Returns:
        (columns, top rows, bottom rows) as float arrays; NaN where nothing is drawn.
    """
    pad = line_px - 1  # empty columns each side, so thickening never mixes two polylines
    stride = int(max(x[-1] for x in xs)) + 2 * pad + 4
    offsets = np.arange(len(xs)) * stride
    first = np.array([math.floor(x[0] + 0.5) for x in xs]) - pad
    count = np.array([math.floor(x[-1] + 0.5) for x in xs]) + pad + 1 - first
    lo_x = np.repeat([x[0] for x in xs] + offsets, count)
    hi_x = np.repeat([x[-1] for x in xs] + offsets, count)
    cols = np.repeat(first + offsets, count) + (
        np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    )
    x_all = np.concatenate([x + off for x, off in zip(xs, offsets, strict=True)])
    y_all = np.concatenate(ys)
    edges_lo = np.interp(np.clip(cols - 0.5, lo_x, hi_x), x_all, y_all)
    edges_hi = np.interp(np.clip(cols + 0.5, lo_x, hi_x), x_all, y_all)
    outside = (cols + 0.5 < lo_x) | (cols - 0.5 > hi_x)
    low = np.where(outside, np.nan, np.fmin(edges_lo, edges_hi))
    high = np.where(outside, np.nan, np.fmax(edges_lo, edges_hi))
    sample_col = np.floor(x_all + 0.5).astype(np.int64)
    starts = np.searchsorted(sample_col, cols)
    has_samples = np.diff(np.append(starts, len(x_all))) > 0
    if has_samples.any():
        where = starts[has_samples]
        low[has_samples] = np.fmin(low[has_samples], np.fmin.reduceat(y_all, where))
        high[has_samples] = np.fmax(high[has_samples], np.fmax.reduceat(y_all, where))
    if line_px > 1:
        left = (line_px - 1) // 2
        grown_low, grown_high, n = low.copy(), high.copy(), len(low)
        for shift in range(-left, line_px - left):
            if shift > 0:
                grown_low[shift:] = np.fmin(grown_low[shift:], low[: n - shift])
                grown_high[shift:] = np.fmax(grown_high[shift:], high[: n - shift])
            elif shift < 0:
                grown_low[:shift] = np.fmin(grown_low[:shift], low[-shift:])
                grown_high[:shift] = np.fmax(grown_high[:shift], high[-shift:])
        low, high = grown_low, grown_high
    half = (line_px - 1) / 2
    return cols - np.repeat(offsets, count), low - half, high + half


def _paint_spans(
    page: np.ndarray, cols: np.ndarray, tops: np.ndarray, bottoms: np.ndarray, value: int
) -> None:
    """Set every pixel of the vertical spans to ``value`` in one vectorised write."""
    height, width = page.shape
    keep = np.isfinite(tops) & np.isfinite(bottoms) & (cols >= 0) & (cols < width)
    cols = cols[keep].astype(np.int64)
    tops = np.clip(np.rint(tops[keep]), 0, height - 1).astype(np.int64)
    bottoms = np.clip(np.rint(bottoms[keep]), 0, height - 1).astype(np.int64)
    lengths = bottoms - tops + 1
    total = int(lengths.sum())
    if total == 0:
        return
    row_in_span = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    flat = np.repeat(tops * width + cols, lengths) + row_in_span * width
    page.reshape(-1)[flat] = value


def _check_signal(signal: np.ndarray) -> np.ndarray:
    signal = np.asarray(signal)
    if signal.shape != (len(LEADS), N_SAMPLES):
        raise ValueError(
            f"expected a canonical signal of shape {(len(LEADS), N_SAMPLES)} (12 leads x 10 s at {FS} Hz, mV), "
            f"got {signal.shape}; bring it to the canonical form with ecg_r1.data.canonical.canonicalize()"
        )
    if not np.issubdtype(signal.dtype, np.number):
        raise ValueError(f"signal must be numeric (mV), got dtype {signal.dtype}")
    return signal


def _draw(signal: np.ndarray, config: RenderConfig) -> np.ndarray:
    """The page as palette indices: the cached background plus the traces."""
    signal = _check_signal(signal)
    plan = plan_page(config)
    page = _background(config).copy()
    gain_px = config.gain_mm_per_mv * config.px_per_mm
    traces = median_traces(signal, plan) if config.layout == MEDIANS_LAYOUT else signal
    values = traces.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        values[~finite] = np.nan  # a gap in the trace, not a line to infinity
    xs = [plan.sample_x_px[seg.first : seg.last + 1] for seg in plan.segments]
    ys = [seg.baseline_px - values[seg.lead, seg.first : seg.last + 1] * gain_px for seg in plan.segments]
    _paint_spans(page, *_column_spans(xs, ys, _line_px(config)), INK)
    return page


def render_page(signal: np.ndarray, config: RenderConfig = CLINICAL, header: str = "") -> Image.Image:
    """Draw one 12-lead page.

    Args:
        signal: canonical signal, shape (12, 5000), mV at 500 Hz, rows in ``LEADS`` order.
            Non-finite samples leave gaps in their trace; a lead of all NaN is left blank.
        config: page settings.
        header: extra text for the header line (e.g. a record id); the speed, gain and rate
            are always printed. Empty by default so a model sees no identifiers.

    Returns:
        A ``"P"`` (4-colour palette) image; with augmentations on, ``"RGB"`` (colour) or ``"L"``
        (greyscale). ``image.info["dpi"]`` holds the resolution.

    Raises:
        ValueError: the signal is not canonical.
    """
    image = Image.fromarray(_draw(signal, config))
    image.putpalette(_palette(config))
    if header:
        ImageDraw.Draw(image).text(
            plan_page(config).header_xy_px,
            header,
            fill=INK,
            font=_font(max(8, round(_HEADER_SIZE_MM * config.px_per_mm))),
            anchor="lt",
        )
    if config.augment.enabled:
        key = hashlib.blake2b(np.ascontiguousarray(signal).tobytes(), digest_size=16).digest()
        image = augment_image(image, config.augment, key, _COLOUR_PALETTE[0] if config.color else 255)
    image.info["dpi"] = (config.dpi, config.dpi)
    return image


def render_png(signal: np.ndarray, config: RenderConfig, path: str | Path, header: str = "") -> Path:
    """Render a page to a PNG file (:func:`render_page`, then :func:`~.png.save_png`)."""
    return save_png(render_page(signal, config, header), path)
