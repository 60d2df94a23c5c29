"""Write a page as a PNG file, atomically.

Takes: a page image: :func:`~.draw.render_page`'s 4-colour ``"P"`` image, or the ``"RGB"`` /
``"L"`` image of an augmented page. Gives: its PNG bytes (:func:`encode_png`) or the PNG file
(:func:`save_png`), written beside the target and renamed over it so that a killed run never
leaves a truncated file behind.

The encoder is Pillow's, at zlib level 1 with the image's dpi. A palette of 4 colours makes it
write a 2-bit palette PNG (Pillow takes the bit depth from the palette's size). A hand-written
2-bit encoder used to stand here; ``benchmarks/bench_render.py`` keeps it as the reference and
prints both side by side. Measured on LUDB pages (2 shared cores, three runs), Pillow takes about
twice the CPU time to encode, as it filters every row adaptively and that cannot be turned off
(2200 x 1700: 5.7-6.0 against 3.1-3.4 ms; 896 x 692: 1.2-1.3 against 0.56-0.62 ms; 448 x 346:
0.33-0.35 against 0.17-0.18 ms), and 1.1-1.6x for a whole page (draw, encode, write); the
files decode to the same pixels (37 against 43 KB at 2200 x 1700, within 5% at model sizes).
Rendering is not the pipeline's bottleneck: the images asset draws each model-size page once
(under 1 ms more a page with Pillow) and keeps it under its content hash, which does not depend
on the PNG bytes. So the library's encoder is used.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image


def encode_png(image: Image.Image) -> bytes:
    """The PNG bytes of a page, with its dpi; a 4-colour palette page is stored at 2 bits a pixel."""
    dpi = image.info.get("dpi")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1, **({"dpi": dpi} if dpi else {}))
    return buffer.getvalue()


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a page as PNG (:func:`encode_png`), atomically."""
    return _write_atomic(Path(path), encode_png(image))


def _write_atomic(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
