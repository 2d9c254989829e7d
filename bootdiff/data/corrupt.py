"""Corrupted images with known masks: watermarks and subtitle bands (the "clean regions" view).

A stamp is an opacity map ``alpha`` ``[H, W]`` in [0, 1] and a grey level ``color`` ``[H, W]``;
the corrupted image is ``round((1 - alpha)·x + alpha·color)`` on every channel and the mask is
exactly ``alpha > 0`` (True = corrupted), so the clean-patch view can keep what the stamp missed.

* ``watermark``: a logo-like white pattern (a ring around a few letter strokes), 35-55 % of the
  image side, at a uniform random position, blended at 50 % opacity (semi-transparent).
* ``subtitle``: a dark band (75 % opaque) across most of the width near the bottom, with opaque
  light glyph-like strokes ("text") on it.

Everything is deterministic: sample ``i`` draws from ``numpy.random.default_rng([seed, i, ...])``.
`CorruptedSource` wraps an image source (a ``fraction`` of samples corrupted, ``mask(i)`` = the
stamp); `write_corrupted` writes PNG images + PNG masks and/or a JSON boxes file that
`bootdiff.data.images.FolderSource` (``mask_path``) reads back.
"""

from __future__ import annotations

import io
import json
import os
from typing import Dict, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

from bootdiff.data.source import IMAGE_EXTENSIONS, DataError, Source
from bootdiff.util import atomic_write_bytes, join, url_fs

KINDS = ("subtitle", "watermark")


def _glyphs(alpha, color, rng, y0, y1, x0, x1, value, opacity) -> None:
    """Letter-like strokes (bars of a 3x5 glyph box) between rows y0:y1 and columns x0:x1."""
    gh = y1 - y0
    if gh < 2 or x1 - x0 < 2:
        return
    gw = max(1, (gh * 3) // 5)
    lw = max(1, gh // 5)
    x = x0
    while x + gw <= x1:
        if rng.random() < 0.18:  # a space between words
            x += gw + 1
            continue
        strokes = rng.choice(7, size=rng.integers(2, 4), replace=False)
        for s in strokes:
            if s == 0:
                sl = (slice(y0, y1), slice(x, x + lw))  # left bar
            elif s == 1:
                sl = (slice(y0, y1), slice(x + gw - lw, x + gw))  # right bar
            elif s == 2:
                sl = (slice(y0, y1), slice(x + (gw - lw) // 2, x + (gw - lw) // 2 + lw))  # stem
            elif s == 3:
                sl = (slice(y0, y0 + lw), slice(x, x + gw))  # top
            elif s == 4:
                sl = (slice(y0 + (gh - lw) // 2, y0 + (gh - lw) // 2 + lw), slice(x, x + gw))  # middle
            elif s == 5:
                sl = (slice(y1 - lw, y1), slice(x, x + gw))  # bottom
            else:
                sl = (slice(y0 + gh // 2, y1), slice(x, x + lw))  # lower-left bar
            alpha[sl] = opacity
            color[sl] = value
        x += gw + 1


def make_stamp(height: int, width: int, kind: str, rng: np.random.Generator
               ) -> Tuple[np.ndarray, np.ndarray]:
    """(alpha ``[H, W]`` float32 in [0, 1], color ``[H, W]`` float32) of one stamp."""
    alpha = np.zeros((height, width), np.float32)
    color = np.zeros((height, width), np.float32)
    if kind == "subtitle":
        bh = max(3, int(round(0.2 * height)))
        margin = max(1, int(round(0.05 * height)))
        y1 = height - margin - int(rng.integers(0, margin + 1))
        y0 = max(0, y1 - bh)
        bw = max(3, int(round(width * rng.uniform(0.6, 0.95))))
        x0 = (width - bw) // 2 + int(rng.integers(-((width - bw) // 4), (width - bw) // 4 + 1))
        x1 = x0 + bw
        alpha[y0:y1, x0:x1] = 0.75
        color[y0:y1, x0:x1] = 16.0
        pad = max(1, (y1 - y0) // 5)
        _glyphs(alpha, color, rng, y0 + pad, y1 - pad, x0 + pad, x1 - pad, 235.0, 1.0)
    elif kind == "watermark":
        side = max(6, int(round(min(height, width) * rng.uniform(0.35, 0.55))))
        side = min(side, height, width)
        y0 = int(rng.integers(0, height - side + 1))
        x0 = int(rng.integers(0, width - side + 1))
        logo = Image.new("L", (side, side), 0)
        lw = max(1, side // 10)
        ImageDraw.Draw(logo).ellipse([0, 0, side - 1, side - 1], outline=255, width=lw)
        pattern = np.asarray(logo) > 0
        inner = np.zeros((side, side), np.float32)
        a = side // 4 + lw // 2
        _glyphs(inner, np.zeros_like(inner), rng, a, side - a, a, side - a, 255.0, 1.0)
        pattern = pattern | (inner > 0)
        alpha[y0:y0 + side, x0:x0 + side][pattern] = 0.5
        color[y0:y0 + side, x0:x0 + side][pattern] = 255.0
    else:
        raise DataError(f"unknown corruption kind '{kind}' (known: {', '.join(KINDS)})")
    return alpha, color


def apply_stamp(image: np.ndarray, alpha: np.ndarray, color: np.ndarray) -> np.ndarray:
    """``round((1 - alpha)·image + alpha·color)`` on every channel of a uint8 HWC image."""
    a = alpha[:, :, None]
    out = (1.0 - a) * image.astype(np.float32) + a * color[:, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def stamp_image(image: np.ndarray, kind: str, rng: np.random.Generator
                ) -> Tuple[np.ndarray, np.ndarray]:
    """(corrupted uint8 HWC image, bool mask ``[H, W]``) for one random stamp of ``kind``."""
    alpha, color = make_stamp(image.shape[0], image.shape[1], kind, rng)
    return apply_stamp(image, alpha, color), alpha > 0


class Corruptor:
    """Deterministic per-sample corruption: sample ``i`` is corrupted with probability
    ``fraction`` and then stamped, both drawn from generators seeded by ``(seed, i)``."""

    def __init__(self, kind: str = "subtitle", seed: int = 0, fraction: float = 1.0):
        if kind not in KINDS:
            raise DataError(f"unknown corruption kind '{kind}' (known: {', '.join(KINDS)})")
        if not 0.0 <= fraction <= 1.0:
            raise DataError(f"corruption fraction must be in [0, 1], got {fraction}")
        self.kind, self.seed, self.fraction = kind, int(seed), float(fraction)

    def is_corrupted(self, i: int) -> bool:
        return bool(np.random.default_rng([self.seed, int(i), 0]).random() < self.fraction)

    def stamp(self, i: int, height: int, width: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """(alpha, color) of sample ``i``, or None when it stays clean."""
        if not self.is_corrupted(i):
            return None
        return make_stamp(height, width, self.kind, np.random.default_rng([self.seed, int(i), 1]))

    def __call__(self, image: np.ndarray, i: int) -> Tuple[np.ndarray, np.ndarray]:
        st = self.stamp(i, image.shape[0], image.shape[1])
        if st is None:
            return image, np.zeros(image.shape[:2], bool)
        return apply_stamp(image, *st), st[0] > 0


class CorruptedSource(Source):
    """An image source with a ``fraction`` of its samples stamped; ``mask(i)`` is the stamp mask
    (all False for clean samples), or-ed with the base source's own mask if it has one."""

    def __init__(self, source: Source, corruption=None, kind: str = "subtitle", seed: int = 0,
                 fraction: float = 1.0):
        if source.kind != "image":
            raise DataError(f"corruption needs an image source, got a {source.kind} source "
                            f"({source.description})")
        if corruption is not None:  # a CorruptionConfig
            kind, seed, fraction = str(corruption.kind), int(corruption.seed), float(corruption.fraction)
        self.base = source
        self.corruptor = Corruptor(kind, seed, fraction)
        self.kind = "image"
        self.ids = source.ids
        self.fixed_test = source.fixed_test
        self.description = f"{source.description}, {fraction:g} {kind}-corrupted (seed {seed})"
        self._hw: Optional[Tuple[int, int]] = None

    def __getitem__(self, i: int) -> np.ndarray:
        i = self._check_index(i)
        image = self.base[i]
        self._hw = image.shape[:2]
        return self.corruptor(image, i)[0]

    def mask(self, i: int) -> np.ndarray:
        i = self._check_index(i)
        if self._hw is None:
            self._hw = self.base[i].shape[:2]
        st = self.corruptor.stamp(i, *self._hw)
        m = np.zeros(self._hw, bool) if st is None else st[0] > 0
        base = self.base.mask(i)
        return m if base is None else (m | base)


def _png(array: np.ndarray) -> bytes:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_corrupted(source: Source, out_url: str, kind: str = "subtitle", seed: int = 0,
                    fraction: float = 1.0, masks: str = "both") -> Dict[str, str]:
    """Write corrupted copies of ``source`` as ``{out}/images/<id>.png`` plus their masks:
    ``masks="png"`` -> ``{out}/masks/<id>.png`` (255 = corrupted), ``"json"`` ->
    ``{out}/boxes.json`` (``{name: [[x0, y0, x1, y1]]}``, the bounding box of each stamp,
    x1/y1 exclusive), ``"both"``. A `CorruptedSource` is written as is (kind/seed/fraction
    ignored). Returns the URLs: ``images``, and ``masks`` / ``boxes`` when written -- use
    either as ``data.source.mask_path`` with ``kind=images, path=<images>``."""
    if masks not in ("png", "json", "both"):
        raise DataError(f"write_corrupted: masks must be png, json or both, got '{masks}'")
    src = source if isinstance(source, CorruptedSource) else CorruptedSource(source, None, kind, seed, fraction)
    fs, _ = url_fs(out_url)
    urls = {"images": join(out_url, "images")}
    if masks in ("png", "both"):
        urls["masks"] = join(out_url, "masks")
    boxes: Dict[str, list] = {}
    seen = set()
    for i, sid in enumerate(src.ids):
        stem, ext = os.path.splitext(sid)
        name = (stem if ext.lower() in IMAGE_EXTENSIONS else sid) + ".png"
        if name in seen:
            raise DataError(f"write_corrupted: two samples map to the same file name '{name}'")
        seen.add(name)
        image, mask = src[i], src.mask(i)
        for key, data in (("images", _png(image)), ("masks", _png(mask.astype(np.uint8) * 255))):
            if key in urls:
                _, path = url_fs(join(urls[key], name))
                fs.makedirs(os.path.dirname(path), exist_ok=True)
                fs.pipe_file(path, data)
        ys, xs = np.nonzero(mask)
        boxes[name] = [[int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]] if len(ys) else []
    if masks in ("json", "both"):
        urls["boxes"] = join(out_url, "boxes.json")
        atomic_write_bytes(urls["boxes"], json.dumps(boxes, indent=0).encode())
    return urls
