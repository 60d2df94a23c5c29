"""What a page is: its settings and its geometry, before any pixel is drawn.

Takes: the page settings (size, layout, speed, gain, colour, line width, paper, augmentations).
Gives: :class:`RenderConfig` (frozen, hashable, checked when made), the presets (:data:`CLINICAL`,
:data:`MODEL_448`, :data:`MODEL_896`, :data:`PRESETS`), :func:`with_size`, and
:func:`plan_page`: where each lead's segment, each row's baseline and the header go.
:mod:`.draw` turns a plan and a signal into pixels.

Layouts:

* ``"3x4+rhythm"``: three rows of four 2.5 s segments (I, aVR, V1, V4 / II, aVL, V2, V5 /
  III, aVF, V3, V6), each segment showing the time it sits under, plus a 10 s lead II strip;
* ``"6x2"``: six rows of two 5 s segments (limb leads 0-5 s, chest leads 5-10 s);
* ``"12x1"``: twelve 10 s rows;
* ``"medians+rhythm"``: the 3x4 grid with each panel showing its lead's median beat stretched over
  the panel at twice the gain (as an ECG machine's median-complex report does; :mod:`.medians`),
  plus the 10 s lead II strip at the page's speed and gain.

Geometry: 1 mm of paper is ``width_px / paper_mm[0]`` pixels in both directions, the grid's
origin is the page's top-left corner, and the first sample of every row and every row's baseline
lie on a major (5 mm) line. Sample ``i`` is drawn at ``x0 + i / FS * speed`` mm.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field, replace

import numpy as np

from ecg_r1.data.canonical import FS, LEADS, N_SAMPLES
from ecg_r1.imaging.augment import Augment
from ecg_r1.imaging.layouts import LAYOUTS, MEDIANS_LAYOUT

# Bump whenever a change to this module or to :mod:`.draw` changes the pixels of a page: it is
# part of the content hash, so every cached image is re-rendered once. A change of PNG encoding
# alone (:mod:`.png`) that keeps the pixels needs no bump.
RENDERER_VERSION = "1"

RHYTHM_TRACE = len(LEADS)  # the medians layout's traces: 12 median rows, then lead II in full
LETTER_LANDSCAPE_MM: tuple[float, float] = (279.4, 215.9)  # 11 x 8.5 in, the usual ECG printout

HEADER_TOP_MM = 4.0  # top of the header line
CAL_PULSE_S = 0.2  # width of the 1 mV calibration pulse, in seconds of paper
_HEADER_BAND_MM = 14.0

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
        plan_page(self)  # refuse now a layout that does not fit the page, not at the first record

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
class Segment:
    """One lead's stretch of one row."""

    lead: int  # row of the traces drawn (the signal's, or :mod:`.medians`' for the medians layout)
    first: int  # first sample shown
    last: int  # last sample shown (inclusive)
    baseline_px: float


@dataclass(frozen=True)
class PagePlan:
    """Where everything that depends on the layout goes (see :func:`plan_page`)."""

    segments: tuple[Segment, ...]
    x0_mm: float
    baselines_mm: tuple[float, ...]
    sample_x_px: np.ndarray  # x of every sample index, in pixels
    header_xy_px: tuple[float, float]  # where a record's own header text starts


def layout_rows(layout: str) -> list[list[tuple[str, float, float]]]:
    """Each row's segments as (lead, start s, end s)."""
    if layout in ("3x4+rhythm", MEDIANS_LAYOUT):
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
def plan_page(config: RenderConfig) -> PagePlan:
    """The page's geometry: the rows' baselines and first sample on 5 mm lines, centred on the paper.

    Raises:
        ValueError: a 10 s row or the layout's rows do not fit the page.
    """
    ppm = config.px_per_mm
    page_w, page_h = config.paper_mm[0], config.height_px / ppm
    rows = layout_rows(config.layout)
    trace_mm = 10.0 * config.speed_mm_per_s
    cal_mm = CAL_PULSE_S * config.speed_mm_per_s + 4.0  # 2 mm lead-in, pulse, 1 mm tail, 1 mm gap
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
    for i, (row, baseline) in enumerate(zip(rows, baselines, strict=True)):
        rhythm = config.layout == MEDIANS_LAYOUT and i == len(rows) - 1
        for lead, start, end in row:
            first = round(start * FS)
            last = min(round(end * FS), N_SAMPLES - 1)
            trace = RHYTHM_TRACE if rhythm else LEADS.index(lead)
            segments.append(Segment(trace, first, last, baseline * ppm))
    sample_x = (x0 + np.arange(N_SAMPLES, dtype=np.float64) / FS * config.speed_mm_per_s) * ppm
    sample_x.setflags(write=False)
    header_x = (x0 + 0.45 * trace_mm) * ppm
    return PagePlan(tuple(segments), x0, baselines, sample_x, (header_x, HEADER_TOP_MM * ppm))


def with_size(config: RenderConfig, width_px: int) -> RenderConfig:
    """The same page at another width (height follows the paper's aspect ratio)."""
    return replace(config, width_px=width_px, height_px=None)


# Presets (after plan_page: a config checks its layout fits when it is made).
CLINICAL = RenderConfig()  # 2200 x 1700 px, 200 dpi letter page
MODEL_448 = RenderConfig(width_px=448)  # 448 x 346 px, what a vision-language model reads
MODEL_896 = RenderConfig(width_px=896)  # 896 x 692 px
PRESETS: dict[str, RenderConfig] = {"clinical": CLINICAL, "model-448": MODEL_448, "model-896": MODEL_896}
