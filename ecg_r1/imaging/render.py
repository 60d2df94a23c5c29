"""Render canonical 12-lead signals as standard ECG printouts (PNG), fast enough for any cohort.

A page is ECG grid paper (1 mm minor and 5 mm major lines) with the traces drawn at
``speed_mm_per_s`` and ``gain_mm_per_mv`` (25 mm/s and 10 mm/mV by default), a 1 mV calibration
pulse at the start of every row, lead labels, small ticks where the lead changes, and a header
line with speed, gain and sampling rate. Layouts:

* ``"3x4+rhythm"``: three rows of four 2.5 s segments (I, aVR, V1, V4 / II, aVL, V2, V5 /
  III, aVF, V3, V6), each segment showing the time it sits under, plus a 10 s lead II strip;
* ``"6x2"``: six rows of two 5 s segments (limb leads 0-5 s, chest leads 5-10 s);
* ``"12x1"``: twelve 10 s rows.

Why it is fast: everything that does not depend on the signal (grid, labels, calibration
pulses, ticks, the fixed header) is drawn once per configuration and cached; a page is a copy of
that array plus the traces, which are rasterised with numpy as one vertical span per pixel
column (the way a thermal ECG printer draws them). The page is a 4-colour palette image written
as a 2-bit PNG by a small encoder of this module (see :func:`_png_2bit`), so encoding costs a
few milliseconds instead of dominating (an RGB PNG of this size costs over 100 ms).

Geometry: 1 mm of paper is ``width_px / paper_mm[0]`` pixels in both directions, the grid's
origin is the page's top-left corner, and the first sample of every row and every row's baseline
lie on a major (5 mm) line. Sample ``i`` is drawn at ``x0 + i / FS * speed`` mm.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
import multiprocessing
import os
import struct
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from ecg_r1.data.canonical import FS, LEADS, N_SAMPLES
from ecg_r1.data.store import open_signals, read_cohort
from ecg_r1.imaging.augment import Augment, augment_image

logger = logging.getLogger(__name__)

# Bump whenever a change to this module changes the pixels of a page: it is part of the content
# hash, so every cached image is re-rendered once.
RENDERER_VERSION = "1"

LAYOUTS: tuple[str, ...] = ("3x4+rhythm", "6x2", "12x1")
LETTER_LANDSCAPE_MM: tuple[float, float] = (279.4, 215.9)  # 11 x 8.5 in, the usual ECG printout
INDEX_FILE = "index.parquet"

# Palette indices of a page; PNG stores 4 indices in 2 bits a pixel.
BACKGROUND, MINOR, MAJOR, INK = 0, 1, 2, 3
_COLOUR_PALETTE = ((255, 253, 251), (246, 196, 196), (226, 118, 118), (0, 0, 0))
_GREY_PALETTE = ((255, 255, 255), (222, 222, 222), (168, 168, 168), (0, 0, 0))

# Below this many pixels per mm the 1 mm lines would fill the page with grid colour (at 448 px
# wide a millimetre is 1.6 px), so only the 5 mm lines are drawn.
MIN_MINOR_GRID_PX = 3.0
_HEADER_TOP_MM = 4.0
_HEADER_BAND_MM = 14.0
_CAL_PULSE_S = 0.2
_TICK_HALF_MM = 2.5
_LABEL_ABOVE_MM = 7.0
_LABEL_SIZE_MM = 3.2
_HEADER_SIZE_MM = 3.5

_ROWS_3X4 = (("I", "aVR", "V1", "V4"), ("II", "aVL", "V2", "V5"), ("III", "aVF", "V3", "V6"))
_ROWS_6X2 = (("I", "V1"), ("II", "V2"), ("III", "V3"), ("aVR", "V4"), ("aVL", "V5"), ("aVF", "V6"))


@dataclass(frozen=True)
class RenderConfig:
    """What a page looks like. Frozen and hashable: it keys the background cache.

    Attributes:
        width_px: page width in pixels; 1 mm of paper is ``width_px / paper_mm[0]`` pixels.
        height_px: page height in pixels; None derives it from the paper's aspect ratio
            (2200 px wide letter paper gives 1700 px).
        layout: one of :data:`LAYOUTS`.
        gain_mm_per_mv: vertical scale (10 mm/mV is the clinical standard).
        speed_mm_per_s: horizontal scale (25 mm/s is the clinical standard).
        color: red grid on white; False gives a grey grid.
        line_width: trace thickness in mm of paper (at least one pixel).
        paper_mm: paper width and height in mm.
        augment: seeded scan/photo augmentations, off by default.
    """

    width_px: int = 2200
    height_px: int | None = None
    layout: str = "3x4+rhythm"
    gain_mm_per_mv: float = 10.0
    speed_mm_per_s: float = 25.0
    color: bool = True
    line_width: float = 0.3
    paper_mm: tuple[float, float] = LETTER_LANDSCAPE_MM
    augment: Augment = field(default_factory=Augment)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; choose one of {', '.join(LAYOUTS)}")
        if int(self.width_px) != self.width_px or self.width_px < 64:
            raise ValueError(f"width_px={self.width_px!r} must be a whole number of pixels >= 64")
        if self.height_px is None:
            object.__setattr__(self, "height_px", round(self.width_px * self.paper_mm[1] / self.paper_mm[0]))
        elif int(self.height_px) != self.height_px or self.height_px < 48:
            raise ValueError(f"height_px={self.height_px!r} must be a whole number of pixels >= 48 (or None)")
        for name in ("gain_mm_per_mv", "speed_mm_per_s", "line_width"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} must be a positive number")
        if len(self.paper_mm) != 2 or min(self.paper_mm) <= 0:
            raise ValueError(f"paper_mm={self.paper_mm!r} must be (width, height) in mm, both positive")
        object.__setattr__(self, "paper_mm", (float(self.paper_mm[0]), float(self.paper_mm[1])))
        object.__setattr__(self, "width_px", int(self.width_px))
        object.__setattr__(self, "height_px", int(self.height_px))
        _plan(self)  # refuse now a layout that does not fit the page, not at the first record

    @property
    def px_per_mm(self) -> float:
        """Pixels per millimetre of paper, in both directions."""
        return self.width_px / self.paper_mm[0]

    @property
    def dpi(self) -> float:
        """Resolution in dots per inch (written into the PNG so a print comes out at true scale)."""
        return self.px_per_mm * 25.4

    @classmethod
    def from_dpi(cls, dpi: float, **kwargs: object) -> RenderConfig:
        """A page of the given resolution on ``paper_mm`` (letter landscape unless given)."""
        paper = kwargs.get("paper_mm", LETTER_LANDSCAPE_MM)
        return cls(width_px=round(paper[0] / 25.4 * dpi), **kwargs)  # type: ignore[arg-type]

    def key(self) -> str:
        """A short stable string of everything that changes the pixels (for cache keys and names).

        Example: ``"3x4+rhythm-2200x1700-rgb-9f2c41d0"``: layout, size, colour, then a digest of
        all the settings.
        """
        settings = (
            f"{self.layout}|{self.width_px}x{self.height_px}|{self.paper_mm[0]!r}x{self.paper_mm[1]!r}|"
            f"g{self.gain_mm_per_mv!r}|s{self.speed_mm_per_s!r}|c{int(self.color)}|lw{self.line_width!r}|"
            f"{self.augment.key()}"
        )
        digest = hashlib.blake2b(settings.encode(), digest_size=4).hexdigest()
        return f"{self.layout}-{self.width_px}x{self.height_px}-{'rgb' if self.color else 'grey'}-{digest}"

    def describe(self) -> dict[str, object]:
        """Flat settings for metadata (Dagster, MLflow)."""
        return {
            "layout": self.layout,
            "width_px": self.width_px,
            "height_px": self.height_px,
            "dpi": round(self.dpi, 2),
            "gain_mm_per_mv": self.gain_mm_per_mv,
            "speed_mm_per_s": self.speed_mm_per_s,
            "color": self.color,
            "line_width_mm": self.line_width,
            "augment": self.augment.key() or "off",
            "renderer_version": RENDERER_VERSION,
            "key": self.key(),
        }


@dataclass(frozen=True)
class _Segment:
    lead: int  # row of the signal
    first: int  # first sample shown
    last: int  # last sample shown (inclusive)
    baseline_px: float


@dataclass(frozen=True)
class _Plan:
    segments: tuple[_Segment, ...]
    x0_mm: float
    baselines_mm: tuple[float, ...]
    sample_x_px: np.ndarray  # x of every sample index, in pixels
    header_xy_px: tuple[float, float]  # where a record's own header text starts


@dataclass
class RenderSummary:
    """What :func:`render_cohort` did.

    Attributes:
        rendered: images drawn and written in this run.
        cached: images already present for the same signal, settings and renderer version.
        seconds: wall time of the run.
        images_per_s: rendered images per second of wall time (0 when everything was cached).
        index: one row per record: ``record_id``, ``image_path`` (relative to the output
            folder) and ``content_hash``.
        examples: a few image paths (absolute) to show.
        failed: ``(record_id, reason)`` of records that could not be rendered (also logged).
    """

    rendered: int
    cached: int
    seconds: float
    images_per_s: float
    index: pl.DataFrame
    examples: list[Path]
    failed: list[tuple[str, str]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


def _rows(layout: str) -> list[list[tuple[str, float, float]]]:
    """Each row's segments as (lead, start s, end s)."""
    if layout == "3x4+rhythm":
        rows = [[(lead, 2.5 * col, 2.5 * (col + 1)) for col, lead in enumerate(row)] for row in _ROWS_3X4]
        return [*rows, [("II", 0.0, 10.0)]]
    if layout == "6x2":
        return [[(limb, 0.0, 5.0), (chest, 5.0, 10.0)] for limb, chest in _ROWS_6X2]
    return [[(lead, 0.0, 10.0)] for lead in LEADS]


def _snap(value: float, step: float, low: float, high: float) -> float | None:
    """The multiple of ``step`` nearest ``value`` within [low, high], or None."""
    candidates = [step * math.floor(value / step), step * math.ceil(value / step)]
    candidates = [
        c for c in sorted(candidates, key=lambda c: abs(c - value)) if low - 1e-9 <= c <= high + 1e-9
    ]
    return candidates[0] if candidates else None


@functools.lru_cache(maxsize=32)
def _plan(config: RenderConfig) -> _Plan:
    ppm = config.px_per_mm
    page_w, page_h = config.paper_mm[0], config.height_px / ppm
    rows = _rows(config.layout)
    trace_mm = 10.0 * config.speed_mm_per_s
    cal_mm = _CAL_PULSE_S * config.speed_mm_per_s + 4.0  # 2 mm lead-in, pulse, 1 mm tail, 1 mm gap
    free = page_w - trace_mm - cal_mm
    if free < 0:
        raise ValueError(
            f"a 10 s row at {config.speed_mm_per_s:g} mm/s needs {trace_mm + cal_mm:.0f} mm but the page is "
            f"{page_w:.0f} mm wide; lower speed_mm_per_s or use wider paper_mm"
        )
    x0 = _snap(cal_mm + free / 2, 5.0, cal_mm, page_w - trace_mm)
    if x0 is None:  # no 5 mm line fits: settle for a 1 mm line
        x0 = _snap(cal_mm + free / 2, 1.0, cal_mm, page_w - trace_mm) or cal_mm
    usable = page_h - _HEADER_BAND_MM - 3.0
    step = 5.0 if usable / len(rows) >= 10 else 1.0
    pitch = step * math.floor(usable / len(rows) / step)
    if pitch < 5:
        raise ValueError(
            f"the page is {page_h:.0f} mm tall, too short for {len(rows)} rows of layout {config.layout!r}; "
            "increase height_px or choose a layout with fewer rows"
        )
    top = _HEADER_BAND_MM + (usable - pitch * len(rows)) / 2
    baselines = tuple(step * round((top + pitch * (i + 0.6)) / step) for i in range(len(rows)))
    segments = []
    for row, baseline in zip(rows, baselines, strict=True):
        for lead, start, end in row:
            first = round(start * FS)
            last = min(round(end * FS), N_SAMPLES - 1)
            segments.append(_Segment(LEADS.index(lead), first, last, baseline * ppm))
    sample_x = (x0 + np.arange(N_SAMPLES, dtype=np.float64) / FS * config.speed_mm_per_s) * ppm
    sample_x.setflags(write=False)
    header_x = (x0 + 0.45 * trace_mm) * ppm
    return _Plan(tuple(segments), x0, baselines, sample_x, (header_x, _HEADER_TOP_MM * ppm))


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
    plan = _plan(config)
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
    gain_mm, cal_w = config.gain_mm_per_mv, _CAL_PULSE_S * config.speed_mm_per_s
    label_font = _font(max(8, round(_LABEL_SIZE_MM * ppm)))
    rows = _rows(config.layout)
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
    header_font = _font(max(8, round(_HEADER_SIZE_MM * ppm)))
    draw.text((plan.x0_mm * ppm, _HEADER_TOP_MM * ppm), header, fill=INK, font=header_font, anchor="lt")
    # Text drawn into a palette image is not anti-aliased, so the page keeps its 4 indices.
    out = np.array(image, dtype=np.uint8)
    out.setflags(write=False)
    return out


def _grid_lines(page: np.ndarray, axis: int, idx: np.ndarray, value: int) -> None:
    if axis == 1:
        page[:, idx] = np.maximum(page[:, idx], value)
    else:
        page[idx, :] = np.maximum(page[idx, :], value)


# Presets (after the layout code: a config checks its layout fits when it is made).
CLINICAL = RenderConfig()  # 2200 x 1700 px, 200 dpi letter page
MODEL_448 = RenderConfig(width_px=448)  # 448 x 346 px, what a vision-language model reads
MODEL_896 = RenderConfig(width_px=896)  # 896 x 692 px
PRESETS: dict[str, RenderConfig] = {"clinical": CLINICAL, "model-448": MODEL_448, "model-896": MODEL_896}


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
    plan = _plan(config)
    page = _background(config).copy()
    gain_px = config.gain_mm_per_mv * config.px_per_mm
    values = signal.astype(np.float64)
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
            _plan(config).header_xy_px,
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
    """Render a page straight to a PNG file: the same pixels as ``save_png(render_page(...))``,
    without building a PIL image when there is no header text and no augmentation."""
    if header or config.augment.enabled:
        return save_png(render_page(signal, config, header), path)
    return _write_atomic(Path(path), _png_2bit(_draw(signal, config), _palette(config), config.dpi))


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a page as PNG, atomically (a killed run never leaves a truncated file behind).

    A 4-colour palette page is stored at 2 bits a pixel by :func:`_png_2bit`; other images
    by PIL with fast zlib settings.
    """
    path = Path(path)
    dpi = image.info.get("dpi")
    palette = image.getpalette() if image.mode == "P" else None
    if palette is not None and len(palette) <= 12:
        page = np.asarray(image)
        if int(page.max(initial=0)) < 4:
            return _write_atomic(path, _png_2bit(page, palette, dpi[0] if dpi else None))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1, **({"dpi": dpi} if dpi else {}))
    return _write_atomic(path, buffer.getvalue())


# The 4 pixels of a little-endian uint32 (a0 + a1<<8 + a2<<16 + a3<<24, each 0..3) times this
# constant puts a0<<6 | a1<<4 | a2<<2 | a3 in bits 24-31; the other products stay below bit 24
# or overflow past bit 31, so one multiply and one shift pack 4 pixels into a PNG byte.
_PACK_2BIT = np.uint32((1 << 30) | (1 << 20) | (1 << 10) | 1)


def _png_2bit(page: np.ndarray, palette: list[int], dpi: float | None) -> bytes:
    """Encode palette indices 0..3 as a 2-bit palette PNG.

    Why not PIL: measured on a 2200 x 1700 page, PIL's PNG encoder takes about 10 ms of CPU,
    this about 5 ms (packing 1 ms, zlib level 1 about 4 ms); encoding was half of the cost of
    a page. The container is the PNG specification's IHDR, PLTE, pHYs, IDAT and IEND chunks,
    filter type 0 on every row; tests read the files back with PIL.
    """
    height, width = page.shape
    padded_width = -(-width // 4) * 4
    if padded_width != width or page.dtype != np.uint8 or not page.flags.c_contiguous:
        padded = np.zeros((height, padded_width), dtype=np.uint8)
        padded[:, :width] = page
        page = padded
    words = page.view("<u4")  # (height, padded_width / 4)
    raw = np.empty((height, padded_width // 4 + 1), dtype=np.uint8)
    raw[:, 0] = 0  # filter type None
    raw[:, 1:] = (words * _PACK_2BIT) >> np.uint32(24)
    colours = bytes(int(c) for c in (list(palette) + [0] * 12)[:12])
    chunks = [
        b"IHDR" + struct.pack(">IIBBBBB", width, height, 2, 3, 0, 0, 0),
        b"PLTE" + colours,
    ]
    if dpi:
        per_metre = round(dpi / 0.0254)
        chunks.append(b"pHYs" + struct.pack(">IIB", per_metre, per_metre, 1))
    chunks += [b"IDAT" + zlib.compress(raw, 1), b"IEND"]
    body = b"".join(struct.pack(">I", len(c) - 4) + c + struct.pack(">I", zlib.crc32(c)) for c in chunks)
    return b"\x89PNG\r\n\x1a\n" + body


def _write_atomic(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def content_hash(signal: np.ndarray, config: RenderConfig, header: str = "") -> str:
    """The cache key of a page: a digest of the signal bytes, the settings and the renderer version."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{RENDERER_VERSION}|{config.key()}|{header}|".encode())
    digest.update(np.ascontiguousarray(signal, dtype=np.float32).tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Cohorts
# ---------------------------------------------------------------------------------------------


class _Renderer:
    """A worker's state: the cohort's signals (opened by the worker itself) and the settings."""

    def __init__(self, cohort_dir: str, out_dir: str, config: RenderConfig) -> None:
        self.signals = open_signals(cohort_dir)
        self.out_dir = Path(out_dir)
        self.config = config

    def run(self, jobs: list[tuple[str, int]]) -> list[tuple[str, str, str, str]]:
        """Render each (record_id, row); returns (record_id, image_path, hash, "rendered"|"cached"|error)."""
        results = []
        for record_id, row in jobs:
            try:
                signal = np.asarray(self.signals[row])
                digest = content_hash(signal, self.config)
                relative = f"{digest[:2]}/{digest}.png"
                target = self.out_dir / relative
                if target.exists():
                    results.append((record_id, relative, digest, "cached"))
                    continue
                render_png(signal, self.config, target)
                results.append((record_id, relative, digest, "rendered"))
            except Exception as error:  # one bad record must not stop the cohort; it is reported
                results.append((record_id, "", "", f"error: {type(error).__name__}: {error}"))
        return results


_WORKER: _Renderer | None = None


def _init_worker(cohort_dir: str, out_dir: str, config: RenderConfig) -> None:
    global _WORKER
    _WORKER = _Renderer(cohort_dir, out_dir, config)


def _run_chunk(jobs: list[tuple[str, int]]) -> list[tuple[str, str, str, str]]:
    assert _WORKER is not None, "worker not initialised"
    return _WORKER.run(jobs)


def _start_method() -> str:
    """fork on Linux: a worker starts in milliseconds, where spawn re-imports numpy, PIL and
    scipy (seconds). It is safe here although the parent may have threads (polars, Dagster):
    a worker only runs numpy, PIL and hashlib, takes no lock the parent could hold (it does not
    log or use polars) and opens its own memmap. Elsewhere (macOS, Windows) fork is unsafe or
    absent: spawn."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


def render_cohort(
    cohort_dir: Path,
    out_dir: Path,
    config: RenderConfig = CLINICAL,
    record_ids: list[str] | None = None,
    workers: int = 2,
    progress: bool = False,
    prune: bool = False,
) -> RenderSummary:
    """Render a cohort's records to PNG, skipping those already rendered.

    Images are named by :func:`content_hash` (signal bytes, settings, renderer version) under
    ``out_dir/<2 hex>/<hash>.png``, so a re-run renders only records whose signal or settings
    changed, and identical signals share one file. ``out_dir/index.parquet`` maps each record to
    its image.

    Args:
        cohort_dir: a cohort folder (``cohort.parquet`` + signals).
        out_dir: where images and the index go.
        config: page settings.
        record_ids: records to render (default all); unknown ids are an error.
        workers: processes; each opens the signal memmap itself. 1 renders in this process.
        progress: show a progress bar.
        prune: delete images under ``out_dir`` that the new index does not name (left by
            signals or settings that changed). Refused with ``record_ids``, which renders only
            part of the cohort.

    Returns:
        A :class:`RenderSummary`; records that failed are in ``failed`` and left out of the index.
    """
    started = time.perf_counter()
    if prune and record_ids is not None:
        raise ValueError(
            "prune=True with record_ids would delete the other records' images; render all or do not prune"
        )
    cohort_dir, out_dir = Path(cohort_dir), Path(out_dir)
    table = read_cohort(cohort_dir)
    missing_cols = {"record_id", "row"} - set(table.columns)
    if missing_cols:
        raise ValueError(f"{cohort_dir} cohort table lacks columns {sorted(missing_cols)}; re-run the ingest")
    if record_ids is not None:
        wanted = list(dict.fromkeys(record_ids))
        unknown = sorted(set(wanted) - set(table["record_id"].to_list()))
        if unknown:
            raise ValueError(
                f"{len(unknown)} record ids are not in {cohort_dir}: {unknown[:5]}; "
                "check the ids against the cohort's record_id column"
            )
        table = pl.DataFrame({"record_id": wanted}).join(
            table, on="record_id", how="left", maintain_order="left"
        )
    jobs = list(zip(table["record_id"].to_list(), table["row"].to_list(), strict=True))
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = max(1, min(int(workers), len(jobs) or 1))
    chunk = max(1, min(64, math.ceil(len(jobs) / (workers * 8))))
    chunks = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
    results: dict[str, tuple[str, str, str, str]] = {}
    with tqdm(total=len(jobs), disable=not progress, unit="img", desc="render") as bar:
        if workers == 1:
            renderer = _Renderer(str(cohort_dir), str(out_dir), config)
            for part in chunks:
                results.update((r[0], r) for r in renderer.run(part))
                bar.update(len(part))
        else:
            context = multiprocessing.get_context(_start_method())
            with ProcessPoolExecutor(
                workers,
                mp_context=context,
                initializer=_init_worker,
                initargs=(str(cohort_dir), str(out_dir), config),
            ) as pool:
                futures = [pool.submit(_run_chunk, part) for part in chunks]
                for future in as_completed(futures):
                    part = future.result()
                    results.update((r[0], r) for r in part)
                    bar.update(len(part))
    rows, failed = [], []
    rendered = cached = 0
    for record_id, _ in jobs:
        _, relative, digest, status = results[record_id]
        if status.startswith("error"):
            failed.append((record_id, status.removeprefix("error: ")))
            continue
        rendered += status == "rendered"
        cached += status == "cached"
        rows.append((record_id, relative, digest))
    for record_id, reason in failed:
        logger.warning("could not render %s: %s", record_id, reason)
    index = pl.DataFrame(
        rows,
        schema={"record_id": pl.String, "image_path": pl.String, "content_hash": pl.String},
        orient="row",
    )
    tmp = out_dir / f".{INDEX_FILE}.{os.getpid()}.tmp"
    index.write_parquet(tmp)
    os.replace(tmp, out_dir / INDEX_FILE)
    pruned = _prune(out_dir, set(index["image_path"].to_list())) if prune else 0
    seconds = time.perf_counter() - started
    summary = RenderSummary(
        rendered=rendered,
        cached=cached,
        seconds=seconds,
        images_per_s=rendered / seconds if rendered else 0.0,
        index=index,
        examples=[out_dir / p for p in index["image_path"].head(4).to_list()],
        failed=failed,
    )
    logger.info(
        "rendered %d, cached %d, failed %d, pruned %d in %.1f s (%.1f images/s) -> %s",
        rendered,
        cached,
        len(failed),
        pruned,
        seconds,
        summary.images_per_s,
        out_dir,
    )
    return summary


def _prune(out_dir: Path, keep: set[str]) -> int:
    """Delete ``<2 hex>/<hash>.png`` images not in ``keep``; only files this module names."""
    removed = 0
    for path in out_dir.glob("??/*.png"):
        if path.relative_to(out_dir).as_posix() not in keep:
            path.unlink()
            removed += 1
    return removed


def with_size(config: RenderConfig, width_px: int) -> RenderConfig:
    """The same page at another width (height follows the paper's aspect ratio)."""
    return replace(config, width_px=width_px, height_px=None)
