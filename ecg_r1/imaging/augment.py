"""Seeded image augmentations that make a rendered page look scanned or photographed.

All are off by default. Each one is drawn from a random generator seeded by the augmentation
seed and a key of the image (the renderer passes a digest of the signal), so the same record
always gets the same augmentation and different records get different ones: a re-run
reproduces every training image bit for bit.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from ecg_r1.constants import DEFAULT_SEED


@dataclass(frozen=True)
class Augment:
    """Ranges of the augmentations; each value drawn uniformly in ``[-max, max]`` (or ``[0, max]``).

    Attributes:
        seed: base seed; combined with the image key.
        rotation_deg: largest rotation of the page, in degrees (a skewed scan).
        blur_px: largest Gaussian blur radius, in output pixels (a soft focus).
        noise_std: largest standard deviation of additive pixel noise, in grey levels of 255.
        contrast: largest relative contrast change (0.2 gives a factor in [0.8, 1.2]).
        brightness: largest relative brightness change.
        colour_shift: largest relative per-channel gain change (a colour cast; colour pages only).
    """

    seed: int = DEFAULT_SEED
    rotation_deg: float = 0.0
    blur_px: float = 0.0
    noise_std: float = 0.0
    contrast: float = 0.0
    brightness: float = 0.0
    colour_shift: float = 0.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name != "seed" and not (np.isfinite(value) and value >= 0):
                raise ValueError(
                    f"augmentation {name}={value!r} must be a finite number >= 0 (0 turns it off)"
                )
        if self.rotation_deg > 45:
            raise ValueError(
                f"rotation_deg={self.rotation_deg} is not a small rotation; use at most 45 degrees"
            )

    @property
    def enabled(self) -> bool:
        """True when any augmentation is switched on."""
        return any(value > 0 for name, value in asdict(self).items() if name != "seed")

    def key(self) -> str:
        """A short string of every setting (empty when off, so it leaves cache keys unchanged)."""
        if not self.enabled:
            return ""
        fields = ",".join(f"{name}={value!r}" for name, value in asdict(self).items())
        return f"aug({fields})"

    @classmethod
    def scan(cls, seed: int = DEFAULT_SEED) -> Augment:
        """A moderate preset resembling a scanned or photographed printout."""
        return cls(
            seed=seed,
            rotation_deg=2.0,
            blur_px=0.8,
            noise_std=8.0,
            contrast=0.2,
            brightness=0.1,
            colour_shift=0.08,
        )


def augment_image(image: Image.Image, augment: Augment, key: bytes, background: int | tuple) -> Image.Image:
    """Apply the augmentations to a page.

    Args:
        image: the rendered page (palette or greyscale).
        augment: the ranges; when ``augment.enabled`` is False the image is returned unchanged.
        key: bytes identifying the image (e.g. a digest of the signal); seeds the draws with
            ``augment.seed``.
        background: the paper colour, to fill the corners a rotation uncovers.

    Returns:
        An ``"L"`` image for greyscale pages, ``"RGB"`` for colour pages (augmented pixels take
        many values, so a palette no longer fits).
    """
    if not augment.enabled:
        return image
    key_int = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    rng = np.random.default_rng([augment.seed, key_int])
    colour = _is_colour(image)
    out = image.convert("RGB" if colour else "L")
    if colour and isinstance(background, int):
        background = (background,) * 3
    if not colour and isinstance(background, tuple):
        background = int(round(sum(background) / len(background)))
    # Draw every value even when its range is 0 so that switching one augmentation on does not
    # change the draws of the others.
    angle, blur, noise, contrast, brightness = (
        rng.uniform(-augment.rotation_deg, augment.rotation_deg),
        rng.uniform(0, augment.blur_px),
        rng.uniform(0, augment.noise_std),
        1 + rng.uniform(-augment.contrast, augment.contrast),
        1 + rng.uniform(-augment.brightness, augment.brightness),
    )
    gains = 1 + rng.uniform(-augment.colour_shift, augment.colour_shift, size=3)
    noise_seed = int(rng.integers(0, 2**63 - 1))
    if angle:
        out = out.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=background)
    if blur > 0:
        out = out.filter(ImageFilter.GaussianBlur(blur))
    if contrast != 1:
        out = ImageEnhance.Contrast(out).enhance(contrast)
    if brightness != 1:
        out = ImageEnhance.Brightness(out).enhance(brightness)
    if (colour and augment.colour_shift > 0) or noise > 0:
        pixels = np.asarray(out, dtype=np.float32)
        if colour and augment.colour_shift > 0:
            pixels = pixels * gains.astype(np.float32)
        if noise > 0:
            pixels = pixels + np.random.default_rng(noise_seed).normal(0, noise, pixels.shape).astype(
                np.float32
            )
        out = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), out.mode)
    return out


def _is_colour(image: Image.Image) -> bool:
    if image.mode == "P":
        palette = np.asarray(image.getpalette() or [0, 0, 0], dtype=np.int16).reshape(-1, 3)
        return bool(np.any(palette != palette[:, :1]))
    return image.mode not in ("L", "1", "LA", "I", "F")
