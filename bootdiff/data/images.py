"""Image folders and tar files of images (JPEG/PNG), with optional corruption masks.

* Folder: every image below the folder (recursive), ids = relative paths, sorted.
* Tar: the members are indexed once (name -> byte offset, size); a sample is read by seeking to
  its member. Remote (``s3://``) or compressed tars are read into memory once per process.
* ``test_prefixes``: samples whose *basename* starts with one of them form ``fixed_test``
  (cats64: ``["0", "1"]`` -> 1,156 of 9,303).
* ``mask_path``: a folder of mask images with the same relative names (any image extension;
  nonzero = corrupted) or a JSON file ``{id: [[x0, y0, x1, y1], ...]}`` of boxes in source-pixel
  coordinates (x1, y1 exclusive). ``mask(i)`` is bool ``[res, res]`` through the same crop as the
  image, resized conservatively (`conform_mask`); a sample with no mask entry is all False.
"""

from __future__ import annotations

import abc
import bz2
import gzip
import io
import json
import lzma
import os
import tarfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from bootdiff.data.source import (IMAGE_EXTENSIONS, DataError, PixelSpec, Source, conform_image,
                                  conform_mask, decode_image, source_kind, source_path)
from bootdiff.util import url_fs

TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def _is_image(name: str) -> bool:
    base = os.path.basename(name)
    return name.lower().endswith(IMAGE_EXTENSIONS) and not base.startswith(".")


def _fixed_test(ids: Sequence[str], prefixes: Sequence[str], where: str) -> Optional[List[int]]:
    if not prefixes:
        return None
    prefixes = tuple(str(p) for p in prefixes)
    test = [i for i, name in enumerate(ids) if os.path.basename(name).startswith(prefixes)]
    if not test:
        raise DataError(f"{where}: no file name starts with any of test_prefixes {list(prefixes)}")
    return test


class MaskReader:
    """Corruption masks for image ids: a folder of mask images or a JSON file of boxes."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.path = url_fs(url)
        if not self.fs.exists(self.path):
            raise DataError(f"mask_path not found: {url}")
        self.boxes: Optional[Dict[str, list]] = None
        self.files: Dict[str, str] = {}
        if self.path.lower().endswith(".json"):
            try:
                boxes = json.loads(self.fs.cat_file(self.path))
            except ValueError as exc:
                raise DataError(f"{url}: not a valid JSON boxes file ({exc})") from None
            if not isinstance(boxes, dict):
                raise DataError(f"{url}: expected a JSON object {{id: [[x0,y0,x1,y1], ...]}}")
            for key, value in boxes.items():
                ok = isinstance(value, list) and all(isinstance(b, (list, tuple)) and len(b) == 4
                                                     for b in value)
                if not ok:
                    raise DataError(f"{url}: boxes of '{key}' must be a list of [x0, y0, x1, y1]")
            self.boxes = boxes
        else:
            root = self.path.rstrip("/")
            for full in sorted(self.fs.find(root)):
                if _is_image(full):
                    rel = full[len(root) + 1:]
                    self.files.setdefault(rel, full)
                    self.files.setdefault(os.path.splitext(rel)[0], full)  # same stem, other ext

    def read(self, sample_id: str, image_size: Tuple[int, int], spec: PixelSpec) -> np.ndarray:
        """The mask of ``sample_id`` (an image of ``image_size`` = (w, h)) at the resolution."""
        w, h = image_size
        name = f"{self.url} [{sample_id}]"
        if self.boxes is not None:
            full = np.zeros((h, w), dtype=bool)
            for x0, y0, x1, y1 in self.boxes.get(sample_id, []):
                full[max(int(y0), 0):max(int(y1), 0), max(int(x0), 0):max(int(x1), 0)] = True
        else:
            path = self.files.get(sample_id) or self.files.get(os.path.splitext(sample_id)[0])
            if path is None:
                full = np.zeros((h, w), dtype=bool)
            else:
                img = decode_image(self.fs.cat_file(path), f"{self.url}/{os.path.relpath(path, self.path)}")
                full = np.asarray(img.convert("L")) > 0
                name = path
        rule = "center_crop" if spec.resize == "center_crop" else "resize"
        return conform_mask(full, PixelSpec(spec.resolution, 1, rule), name)


class _ImageSource(Source):
    kind = "image"

    def _setup(self, url: str, data_cfg, ids: List[str], mask_path: str, test_prefixes):
        if not ids:
            raise DataError(f"{url}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        self.url = url
        self.spec = PixelSpec.of(data_cfg)
        self.ids = ids
        self.fixed_test = _fixed_test(ids, test_prefixes, url)
        self.masks = MaskReader(mask_path) if mask_path else None

    @abc.abstractmethod
    def _bytes(self, i: int) -> bytes:
        """The encoded bytes of image ``i``."""

    def _name(self, i: int) -> str:
        return f"{self.url}/{self.ids[i]}"

    def __getitem__(self, i: int) -> np.ndarray:
        i = self._check_index(i)
        return conform_image(decode_image(self._bytes(i), self._name(i)), self.spec, self._name(i))

    def mask(self, i: int) -> Optional[np.ndarray]:
        if self.masks is None:
            return None
        i = self._check_index(i)
        try:
            size = Image.open(io.BytesIO(self._bytes(i))).size  # header only
        except Exception as exc:
            raise DataError(f"{self._name(i)}: cannot read image header ({exc})") from None
        return self.masks.read(self.ids[i], size, self.spec)


class FolderSource(_ImageSource):
    """All images below a folder URL (recursive), ids = sorted relative paths."""

    def __init__(self, url: str, data_cfg, mask_path: str = "", test_prefixes: Sequence[str] = ()):
        self.fs, path = url_fs(url)
        self.root = path.rstrip("/")
        if not self.fs.isdir(self.root):
            raise DataError(f"image folder not found: {url}")
        ids = sorted(f[len(self.root) + 1:] for f in self.fs.find(self.root) if _is_image(f))
        self._setup(url.rstrip("/"), data_cfg, ids, mask_path, test_prefixes)
        self.description = f"image folder {url} ({len(ids)} images)"

    def _bytes(self, i: int) -> bytes:
        try:
            return self.fs.cat_file(f"{self.root}/{self.ids[i]}")
        except (OSError, FileNotFoundError) as exc:
            raise DataError(f"{self._name(i)}: cannot read ({exc})") from None


def _decompress(data: bytes, url: str) -> bytes:
    try:
        if data[:2] == b"\x1f\x8b":
            return gzip.decompress(data)
        if data[:3] == b"BZh":
            return bz2.decompress(data)
        if data[:6] == b"\xfd7zXZ\x00":
            return lzma.decompress(data)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        raise DataError(f"{url}: corrupt compressed tar ({exc})") from None
    return data


class TarSource(_ImageSource):
    """The image members of a tar file, indexed once; random access by member offset."""

    def __init__(self, url: str, data_cfg, mask_path: str = "", test_prefixes: Sequence[str] = ()):
        self.fs, self.path = url_fs(url)
        if not self.fs.isfile(self.path):
            raise DataError(f"tar file not found: {url}")
        self.url = url
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self._data: Optional[bytes] = None
        with self.fs.open(self.path, "rb") as f:
            head = f.read(6)
        compressed = head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00"
        self.in_memory = compressed or protocol not in ("file", "local")
        self.members: Dict[str, Tuple[int, int]] = {}
        try:
            if self.in_memory:
                fileobj = io.BytesIO(self._load())
                self._index(fileobj)
            else:
                with self.fs.open(self.path, "rb") as f:
                    self._index(f)
        except tarfile.TarError as exc:
            raise DataError(f"{url}: not a readable tar file ({exc})") from None
        self._setup(url, data_cfg, sorted(self.members), mask_path, test_prefixes)
        self.description = f"tar of images {url} ({len(self.ids)} images)"

    def _index(self, fileobj) -> None:
        with tarfile.open(fileobj=fileobj, mode="r:") as tf:
            for m in tf:
                name = m.name[2:] if m.name.startswith("./") else m.name
                if m.isfile() and _is_image(name):
                    self.members[name] = (m.offset_data, m.size)

    def _load(self) -> bytes:
        if self._data is None:
            with self.fs.open(self.path, "rb") as f:
                self._data = _decompress(f.read(), self.url)
        return self._data

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_data"] = None  # re-read lazily in the receiving process
        return state

    def _bytes(self, i: int) -> bytes:
        offset, size = self.members[self.ids[i]]
        if self.in_memory:
            return self._load()[offset:offset + size]
        with self.fs.open(self.path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise DataError(f"{self._name(i)}: truncated tar member ({len(data)} of {size} bytes)")
        return data


def open_images(url: str, data_cfg, mask_path: str = "", test_prefixes: Sequence[str] = (),
                force_tar: bool = False) -> Source:
    """A `FolderSource` for a folder URL, a `TarSource` for a tar file URL."""
    fs, path = url_fs(url)
    if not fs.exists(path):
        raise DataError(f"image source path not found: {url}")
    if fs.isdir(path):
        if force_tar:
            raise DataError(f"data.source.kind is 'tar' but {url} is a folder")
        return FolderSource(url, data_cfg, mask_path, test_prefixes)
    if force_tar or path.lower().endswith(TAR_EXTENSIONS):
        return TarSource(url, data_cfg, mask_path, test_prefixes)
    raise DataError(f"{url}: neither a folder nor a tar file ({', '.join(TAR_EXTENSIONS)})")


def from_config(data_cfg, min_frames: int = 0) -> Source:
    """``data.source.kind`` images | tar: ``path`` (required; tar forces a tar file), ``mask_path``,
    ``test_prefixes``."""
    src_cfg = data_cfg.source
    prefixes = [str(p) for p in (src_cfg.test_prefixes or [])]
    return open_images(source_path(data_cfg), data_cfg, mask_path=str(src_cfg.mask_path or ""),
                       test_prefixes=prefixes, force_tar=source_kind(data_cfg) == "tar")
