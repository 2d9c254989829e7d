"""Raw data sources: random access to uint8 samples, read lazily through fsspec URLs.

Every source is a `Source`: ``len(src)``, ``src[i]`` (uint8 ``HWC`` image or ``THWC`` video at
``data.resolution`` with ``data.channels`` channels), ``src.ids`` (a stable id per sample),
``src.fixed_test`` (indices of a natural held-out split, or None) and ``src.mask(i)`` (bool ``HxW``
corruption mask, True = corrupted, or None when the source has no masks). This module holds the
base class and the pixel helpers every source module shares; each kind of source lives in its own
module with a ``from_config(data_cfg, min_frames)`` opener, and `bootdiff.data.registry` maps
``data.source.kind`` to them (`bootdiff.data.registry.open_source`).

Size rule for images (``data.resize``): ``error`` (a mismatch is a `DataError` naming the file and
both sizes), ``resize`` (area/box resample), ``center_crop`` (central square, then box resample).
Fixed-size digit sources (MNIST, Fashion-MNIST, IDX) ignore the rule: 28 -> 32 is a central zero
pad (the LeNet convention), any other size an area resize.

Any bad input -- missing path, empty folder, undecodable file, size mismatch, short video, bad IDX
magic, unknown kind -- raises `DataError` with the file / value at fault in the message.
"""

from __future__ import annotations

import abc
import io
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image

RESIZE_RULES = ("error", "resize", "center_crop")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DataError(ValueError):
    """Bad raw input: the message names the file, path, key or value at fault."""


class Source(abc.ABC):
    """Random-access raw samples (see module docstring). Subclasses set the attributes and
    implement ``__getitem__``; ``mask`` returns None unless the source has corruption masks."""

    kind: str = "image"  # "image" or "video"
    description: str = ""
    ids: List[str]
    fixed_test: Optional[List[int]] = None

    def __len__(self) -> int:
        return len(self.ids)

    @abc.abstractmethod
    def __getitem__(self, i: int) -> np.ndarray:
        """Sample ``i``: uint8 HWC image or THWC video."""

    def mask(self, i: int) -> Optional[np.ndarray]:
        return None

    def _check_index(self, i: int) -> int:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{type(self).__name__}: index {i} out of range for {n} samples")
        return i

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} n={len(self)}: {self.description}>"


class SubsetSource(Source):
    """The samples ``indices`` of another source (ids, masks, labels and the fixed test split follow)."""

    def __init__(self, base: Source, indices: Sequence[int], description: str = ""):
        self.base = base
        self.indices = [int(i) for i in indices]
        self.kind = base.kind
        self.description = description or base.description
        self.ids = [base.ids[i] for i in self.indices]
        if base.fixed_test is None:
            self.fixed_test = None
        else:
            test = set(base.fixed_test)
            self.fixed_test = [j for j, i in enumerate(self.indices) if i in test]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.base[self.indices[self._check_index(i)]]

    def mask(self, i: int) -> Optional[np.ndarray]:
        return self.base.mask(self.indices[self._check_index(i)])

    @property
    def labels(self) -> Optional[np.ndarray]:
        base = getattr(self.base, "labels", None)
        return None if base is None else np.asarray(base)[self.indices]


def limit_source(source: Source, limit: int) -> Source:
    """The first ``limit`` samples (``limit <= 0``: all). With a natural test split, the first
    samples of each split in proportion (rounded, at least one of each when possible), so that a
    limited MNIST or cats64 still has both a train pool and a test set."""
    n = len(source)
    if limit <= 0 or limit >= n:
        return source
    desc = f"{source.description} (first {limit})"
    if not source.fixed_test:
        return SubsetSource(source, range(limit), desc)
    test = sorted(set(source.fixed_test))
    test_set = set(test)
    train = [i for i in range(n) if i not in test_set]
    n_test = int(round(limit * len(test) / n))
    n_test = min(max(n_test, 1 if limit >= 2 else 0), len(test), limit)
    n_train = min(limit - n_test, len(train))
    n_test = limit - n_train
    keep = sorted(train[:n_train] + test[:n_test])
    return SubsetSource(source, keep, desc)


# ----------------------------------------------------------------------------- conforming pixels


@dataclass
class PixelSpec:
    """The part of `DataConfig` that shapes pixels (small and picklable, kept by sources)."""

    resolution: int = 32
    channels: int = 1
    resize: str = "error"

    @classmethod
    def of(cls, data_cfg) -> "PixelSpec":
        spec = cls(int(data_cfg.resolution), int(data_cfg.channels), str(data_cfg.resize))
        if spec.channels not in (1, 3):
            raise DataError(f"data.channels must be 1 or 3, got {spec.channels}")
        if spec.resize not in RESIZE_RULES:
            raise DataError(f"data.resize must be one of {RESIZE_RULES}, got '{spec.resize}'")
        if spec.resolution <= 0:
            raise DataError(f"data.resolution must be positive, got {spec.resolution}")
        return spec


def source_kind(data_cfg) -> str:
    """``data.source.kind`` as a plain string (a str-valued Enum member gives its value)."""
    kind = data_cfg.source.kind
    return str(getattr(kind, "value", kind))


def source_path(data_cfg, required: bool = True) -> str:
    """``data.source.path`` as a string; empty and ``required`` is a `DataError` naming the kind."""
    path = str(data_cfg.source.path or "")
    if required and not path:
        raise DataError(f"data.source.path is required for kind '{source_kind(data_cfg)}'")
    return path


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode image bytes fully (so a truncated file fails here), naming ``name`` on error."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exc:
        raise DataError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from None
    return img


def _to_mode(img: Image.Image, channels: int, name: str) -> Image.Image:
    if channels not in (1, 3):
        raise DataError(f"data.channels must be 1 or 3, got {channels}")
    mode = "L" if channels == 1 else "RGB"
    if img.mode == mode:
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: keep the high byte
        arr = np.asarray(img, dtype=np.int64) >> 8 if img.mode != "I" else np.asarray(img)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "P", "PA") and mode == "RGB":
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (0, 0, 0, 255))  # transparent -> black
        img = Image.alpha_composite(bg, img)
    return img.convert(mode)


def _fit_size(img: Image.Image, res: int, rule: str, name: str, resample) -> Image.Image:
    w, h = img.size
    if (w, h) == (res, res):
        return img
    if rule == "error":
        raise DataError(f"{name}: image is {w}x{h} but data.resolution is {res}x{res} "
                        f"(set data.resize=resize or center_crop to convert)")
    if rule == "center_crop" and w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    elif rule not in RESIZE_RULES:
        raise DataError(f"data.resize must be one of {RESIZE_RULES}, got '{rule}'")
    return img.resize((res, res), resample)


def conform_image(img, data_cfg, name: str) -> np.ndarray:
    """A PIL image or uint8 array (HW / HWC) as uint8 ``[res, res, channels]`` under the
    ``data.resize`` rule (box resample = area average when shrinking)."""
    if isinstance(img, np.ndarray):
        img = array_to_pil(img, name)
    img = _to_mode(img, int(data_cfg.channels), name)
    img = _fit_size(img, int(data_cfg.resolution), str(data_cfg.resize), name, Image.BOX)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def conform_mask(mask: np.ndarray, data_cfg, name: str) -> np.ndarray:
    """A bool ``HxW`` mask through the same geometry as its image. Conservative: an output pixel
    is corrupted if any source pixel under its box footprint is (= nearest for integer
    up-scaling, a max-pool for integer down-scaling), so a "clean" region never hides a stamp."""
    img = Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255, "L")
    img = _fit_size(img, int(data_cfg.resolution), str(data_cfg.resize), name, Image.BOX)
    return np.asarray(img) > 0


def array_to_pil(arr: np.ndarray, name: str) -> Image.Image:
    """A uint8 ``HW`` / ``HWC`` (C in 1, 3, 4) array as a PIL image; other dtypes are accepted only
    when their values are integers in 0..255."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        elif np.issubdtype(arr.dtype, np.integer) and arr.size and arr.min() >= 0 and arr.max() <= 255:
            arr = arr.astype(np.uint8)
        else:
            raise DataError(f"{name}: pixel array has dtype {arr.dtype}; expected uint8 (0..255)")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return Image.fromarray(arr, "L")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(arr), "RGB" if arr.shape[2] == 3 else "RGBA")
    raise DataError(f"{name}: pixel array of shape {tuple(arr.shape)} is not HW or HWC (C=1,3,4)")


def conform_digit(arr: np.ndarray, data_cfg, name: str) -> np.ndarray:
    """A fixed-size dataset image (MNIST-like) as uint8 ``[res, res, channels]``: a central zero
    pad when the resolution is 4 px larger (28 -> 32), else an area (box) resize; the
    ``data.resize`` rule does not apply (the dataset has one known size)."""
    res = int(data_cfg.resolution)
    channels = int(data_cfg.channels)
    arr = np.asarray(arr, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    h, w, c = arr.shape
    if c != channels:
        if c == 1 and channels == 3:
            arr = np.repeat(arr, 3, axis=2)
        else:
            arr = np.asarray(_to_mode(array_to_pil(arr, name), channels, name), dtype=np.uint8)
            arr = arr[:, :, None] if arr.ndim == 2 else arr
    if (h, w) == (res, res):
        return np.ascontiguousarray(arr)
    if h == w and res - h == 4:
        return np.pad(arr, ((2, 2), (2, 2), (0, 0)))
    img = array_to_pil(arr, name).resize((res, res), Image.BOX)
    out = np.asarray(img, dtype=np.uint8)
    return out[:, :, None] if out.ndim == 2 else out
