"""Videos as samples ``[T, H, W, C]`` uint8: video files decoded with PyAV, or frame arrays.

``url`` is one file or a folder (recursive, sorted). Accepted files:

* video files (``.mp4 .avi .webm .mkv .mov .m4v .mpg .mpeg .gif``), decoded with PyAV; one sample
  each, id = relative path;
* ``.npy`` / ``.npz`` arrays of uint8 frames. Each array (an ``.npy`` file or one ``.npz`` member)
  is read by its shape: ``[T, H, W]`` or ``[T, H, W, C]`` (last axis <= 4) is one video;
  ``[N, T, H, W]`` (last axis > 4) or ``[N, T, H, W, C]`` holds N videos. Ids:
  ``file.npy``, ``file.npy:00003``, ``file.npz:key``, ``file.npz:key:00003``.

``num_frames > 0`` keeps the first ``num_frames`` frames of every video (so all samples share T);
a video shorter than ``max(num_frames, min_frames)`` is a `DataError` naming the file and both
lengths (arrays are checked when the source is opened, video files when decoded). Frames are
conformed to the resolution / channels by the ``data.resize`` rule like images.
"""

from __future__ import annotations

import io
import os
import zipfile
from typing import List, Optional, Tuple

import numpy as np

from bootdiff.data.source import DataError, PixelSpec, Source, conform_image, source_path
from bootdiff.util import url_fs

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".gif")
ARRAY_EXTENSIONS = (".npy", ".npz")


def _layout(shape: Tuple[int, ...], where: str) -> Tuple[Optional[int], int]:
    """(number of stacked videos or None for a single video, frames per video) of an array."""
    if len(shape) == 3 or (len(shape) == 4 and shape[-1] <= 4):
        return None, shape[0]
    if len(shape) == 5 or len(shape) == 4:
        return shape[0], shape[1]
    raise DataError(f"{where}: frame array of shape {shape} is not [T,H,W], [T,H,W,C], "
                    f"[N,T,H,W] or [N,T,H,W,C]")


def _npy_header(fileobj, where: str) -> Tuple[Tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(fileobj)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, _, dtype = reader(fileobj)
    except ValueError as exc:
        raise DataError(f"{where}: not a valid .npy array ({exc})") from None
    return tuple(shape), dtype


class VideoSource(Source):
    """Video files and frame arrays below ``url`` (see module docstring)."""

    kind = "video"

    def __init__(self, url: str, data_cfg, num_frames: int = 0, min_frames: int = 0):
        self.url = url
        self.spec = PixelSpec.of(data_cfg)
        self.num_frames = max(int(num_frames), 0)
        self.need = max(self.num_frames, int(min_frames))
        self.fs, path = url_fs(url)
        path = path.rstrip("/")
        if not self.fs.exists(path):
            raise DataError(f"video source path not found: {url}")
        exts = VIDEO_EXTENSIONS + ARRAY_EXTENSIONS
        self.single = not self.fs.isdir(path)
        if not self.single:
            self.root = path
            files = sorted(f[len(path) + 1:] for f in self.fs.find(path)
                           if f.lower().endswith(exts) and not os.path.basename(f).startswith("."))
            if not files:
                raise DataError(f"{url}: no video files or frame arrays ({', '.join(exts)}) found")
        else:
            if not path.lower().endswith(exts):
                raise DataError(f"{url}: not a video file or frame array ({', '.join(exts)})")
            self.root, files = os.path.dirname(path), [os.path.basename(path)]
        # entries: (relative file, npz key or None, index into a stacked array or None)
        self.entries: List[Tuple[str, Optional[str], Optional[int]]] = []
        for rel in files:
            low = rel.lower()
            if low.endswith(".npy"):
                with self.fs.open(self._full(rel), "rb") as f:
                    shape, _ = _npy_header(f, self._name(rel))
                self._add_array(rel, None, shape)
            elif low.endswith(".npz"):
                with self.fs.open(self._full(rel), "rb") as f:
                    try:
                        with zipfile.ZipFile(f) as z:
                            members = [m for m in z.namelist() if m.endswith(".npy")]
                            if not members:
                                raise DataError(f"{self._name(rel)}: .npz holds no arrays")
                            for m in members:
                                with z.open(m) as mf:
                                    shape, _ = _npy_header(mf, f"{self._name(rel)}:{m[:-4]}")
                                self._add_array(rel, m[:-4], shape)
                    except zipfile.BadZipFile as exc:
                        raise DataError(f"{self._name(rel)}: not a valid .npz file ({exc})") from None
            else:
                self.entries.append((rel, None, None))
        self.ids = [rel + (f":{key}" if key else "") + (f":{j:05d}" if j is not None else "")
                    for rel, key, j in self.entries]
        self.fixed_test = None
        self.description = f"videos {url} ({len(self.ids)} videos" + \
            (f", first {self.num_frames} frames)" if self.num_frames else ")")
        self._cache: Tuple[Optional[Tuple[str, Optional[str]]], Optional[np.ndarray]] = (None, None)

    def _full(self, rel: str) -> str:
        return f"{self.root}/{rel}" if self.root else rel

    def _name(self, rel: str) -> str:
        return self.url if self.single else f"{self.url.rstrip('/')}/{rel}"

    def _add_array(self, rel: str, key: Optional[str], shape: Tuple[int, ...]) -> None:
        where = self._name(rel) + (f":{key}" if key else "")
        stacked, frames = _layout(shape, where)
        if frames < self.need:
            raise DataError(f"{where}: videos have {frames} frames, shorter than the {self.need} "
                            f"needed (data.source.num_frames={self.num_frames} / clip length)")
        if stacked is None:
            self.entries.append((rel, key, None))
        else:
            self.entries.extend((rel, key, j) for j in range(stacked))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = (None, None)
        return state

    def _array(self, rel: str, key: Optional[str]) -> np.ndarray:
        if self._cache[0] == (rel, key):
            return self._cache[1]
        with self.fs.open(self._full(rel), "rb") as f:
            data = io.BytesIO(f.read())
        try:
            arr = np.load(data, allow_pickle=False)
            if key is not None:
                arr = arr[key]
        except (ValueError, OSError, KeyError, zipfile.BadZipFile) as exc:
            raise DataError(f"{self._name(rel)}: cannot load frames ({exc})") from None
        self._cache = ((rel, key), arr)
        return arr

    def _decode(self, rel: str) -> List[np.ndarray]:
        import av

        name = self._name(rel)
        frames: List[np.ndarray] = []
        try:
            with self.fs.open(self._full(rel), "rb") as f, av.open(f, mode="r") as container:
                if not container.streams.video:
                    raise DataError(f"{name}: the file has no video stream")
                stream = container.streams.video[0]
                for frame in container.decode(stream):
                    frames.append(frame.to_ndarray(format="rgb24"))
                    if self.num_frames and len(frames) >= self.num_frames:
                        break
        except DataError:
            raise
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            raise DataError(f"{name}: cannot decode video ({type(exc).__name__}: {exc})") from None
        return frames

    def __getitem__(self, i: int) -> np.ndarray:
        i = self._check_index(i)
        rel, key, j = self.entries[i]
        name = self._name(rel) + (f":{key}" if key else "")
        if key is None and not rel.lower().endswith(ARRAY_EXTENSIONS):
            frames = self._decode(rel)
        else:
            arr = self._array(rel, key)
            frames = list(arr[j] if j is not None else arr)
        if len(frames) < max(self.need, 1):
            raise DataError(f"{name}: video has {len(frames)} frames, shorter than the "
                            f"{max(self.need, 1)} needed (data.source.num_frames={self.num_frames}"
                            f" / clip length)")
        if self.num_frames:
            frames = frames[:self.num_frames]
        return np.stack([conform_image(fr, self.spec, f"{name} frame {t}") for t, fr in enumerate(frames)])


def from_config(data_cfg, min_frames: int = 0) -> VideoSource:
    """``data.source.kind`` video | frames: ``path`` (required), ``num_frames``; videos shorter than
    ``min_frames`` are a `DataError`."""
    return VideoSource(source_path(data_cfg), data_cfg, num_frames=int(data_cfg.source.num_frames),
                       min_frames=min_frames)
