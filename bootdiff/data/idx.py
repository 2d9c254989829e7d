"""IDX files (the MNIST / Fashion-MNIST format), gzipped or not, parsed with numpy.

IDX layout (LeCun et al., http://yann.lecun.com/exdb/mnist/): a 4-byte magic ``00 00 TT NN``
(TT = element type: 08 uint8, 09 int8, 0B int16, 0C int32, 0D float32, 0E float64; NN = number of
dimensions), then NN big-endian uint32 sizes, then the data in C order, big-endian.

A source is one images file (``[N, H, W]`` or ``[N, H, W, C]`` uint8) with an optional labels
file, or a folder holding the standard pair of splits ``train-images-idx3-ubyte[.gz]`` and
``t10k-images-idx3-ubyte[.gz]`` (+ ``*-labels-idx1-ubyte[.gz]``); the ``t10k`` images are the
``fixed_test`` split. Fashion-MNIST's default folder is Debian's ``dataset-fashion-mnist``
install, `FASHION_MNIST_DIR`. Digit images are conformed with `conform_digit` (28 -> 32 pads).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import struct
from typing import List, Optional, Tuple

import numpy as np

from bootdiff.data.source import DataError, PixelSpec, Source, conform_digit, source_kind, source_path
from bootdiff.util import atomic_write_bytes, url_fs

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CODES = {np.dtype(v).newbyteorder("="): k for k, v in IDX_DTYPES.items()}


@contextlib.contextmanager
def _open_stream(url: str):
    fs, path = url_fs(url)
    if not fs.isfile(path):
        raise DataError(f"IDX file not found: {url}")
    with fs.open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        if head == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=f, mode="rb") as g:
                yield g
        else:
            yield f


def _parse_header(stream, url: str) -> Tuple[np.dtype, Tuple[int, ...]]:
    try:
        magic = stream.read(4)
    except (OSError, EOFError) as exc:  # e.g. a corrupt gzip stream
        raise DataError(f"{url}: cannot read IDX header ({exc})") from None
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in IDX_DTYPES or magic[3] == 0:
        raise DataError(f"{url}: bad IDX magic {magic.hex() or '(empty file)'} "
                        f"(expected 0000TTNN with type TT in {sorted(hex(k) for k in IDX_DTYPES)})")
    ndim = magic[3]
    raw = stream.read(4 * ndim)
    if len(raw) != 4 * ndim:
        raise DataError(f"{url}: truncated IDX header ({ndim} dimensions announced)")
    return np.dtype(IDX_DTYPES[magic[2]]), struct.unpack(f">{ndim}I", raw)


def read_idx_header(url: str) -> Tuple[np.dtype, Tuple[int, ...]]:
    """(element dtype, shape) of an IDX file, reading only its header."""
    with _open_stream(url) as stream:
        return _parse_header(stream, url)


def read_idx(url: str) -> np.ndarray:
    """The whole array of an IDX file (native byte order)."""
    with _open_stream(url) as stream:
        dtype, shape = _parse_header(stream, url)
        try:
            data = stream.read()
        except (OSError, EOFError) as exc:
            raise DataError(f"{url}: corrupt IDX data ({exc})") from None
    need = int(np.prod(shape)) * dtype.itemsize
    if len(data) < need:
        raise DataError(f"{url}: truncated IDX data: {len(data)} bytes, shape {shape} needs {need}")
    arr = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape))).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


def write_idx(url: str, array: np.ndarray, compress: Optional[bool] = None) -> None:
    """Write ``array`` as an IDX file (gzipped when ``compress`` or the URL ends in .gz)."""
    array = np.asarray(array)
    code = _CODES.get(array.dtype.newbyteorder("="))
    if code is None or array.ndim == 0:
        raise DataError(f"{url}: cannot write dtype {array.dtype} / shape {array.shape} as IDX")
    body = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    body += np.ascontiguousarray(array, dtype=np.dtype(IDX_DTYPES[code])).tobytes()
    if compress if compress is not None else str(url).endswith(".gz"):
        body = gzip.compress(body, mtime=0)
    atomic_write_bytes(url, body)


class IdxSource(Source):
    """Images from IDX files: a train file (+ optional test file = ``fixed_test``), labels optional.
    Arrays are loaded on first access (and not pickled: a Ray task re-reads them)."""

    kind = "image"

    def __init__(self, images_url: str, data_cfg, labels_url: str = "", test_images_url: str = "",
                 test_labels_url: str = "", name: str = ""):
        self.spec = PixelSpec.of(data_cfg)
        self.files = [(images_url, labels_url)]
        if test_images_url:
            self.files.append((test_images_url, test_labels_url))
        name = name or os.path.basename(str(images_url)).split(".")[0]
        self.ids, self.counts = [], []
        for split, (img_url, lab_url) in zip(("train", "test"), self.files):
            dtype, shape = read_idx_header(img_url)
            if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
                raise DataError(f"{img_url}: IDX images must be [N, H, W] or [N, H, W, C], got {shape}")
            if lab_url:
                _, lshape = read_idx_header(lab_url)
                if lshape[0] != shape[0]:
                    raise DataError(f"{lab_url}: {lshape[0]} labels for {shape[0]} images in {img_url}")
            prefix = f"{name}-{split}" if test_images_url else name
            self.ids += [f"{prefix}-{i:05d}" for i in range(shape[0])]
            self.counts.append(shape[0])
        self.fixed_test = list(range(self.counts[0], len(self.ids))) if test_images_url else None
        self.description = "IDX images " + " + ".join(u for u, _ in self.files)
        self._images: Optional[np.ndarray] = None
        self._labels: Optional[np.ndarray] = None

    def _load(self) -> None:
        arrays, labels = [], []
        for img_url, lab_url in self.files:
            arr = read_idx(img_url)
            if arr.dtype != np.uint8:
                if not (np.issubdtype(arr.dtype, np.integer) and arr.min() >= 0 and arr.max() <= 255):
                    raise DataError(f"{img_url}: IDX images of type {arr.dtype} are not 0..255 pixels")
                arr = arr.astype(np.uint8)
            arrays.append(arr.reshape(arr.shape[:3] + (-1,)))
            labels.append(read_idx(lab_url).astype(np.int64) if lab_url else None)
        if len({a.shape[1:] for a in arrays}) > 1:
            raise DataError(f"IDX splits have different image shapes: "
                            f"{[(u, a.shape[1:]) for (u, _), a in zip(self.files, arrays)]}")
        self._images = np.concatenate(arrays)
        if all(lab is not None for lab in labels):
            self._labels = np.concatenate(labels)

    @property
    def labels(self) -> Optional[np.ndarray]:
        """Integer labels per sample (None without labels files)."""
        if self._images is None:
            self._load()
        return self._labels

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_images"] = state["_labels"] = None
        return state

    def __getitem__(self, i: int) -> np.ndarray:
        i = self._check_index(i)
        if self._images is None:
            self._load()
        return conform_digit(self._images[i], self.spec, f"{self.description} [{self.ids[i]}]")


def _find(names: List[str], stem: str) -> str:
    for ext in ("", ".gz"):
        for n in names:
            if os.path.basename(n) == stem + ext:
                return n
    return ""


def open_idx(url: str, data_cfg, labels_url: str = "", name: str = "") -> IdxSource:
    """An `IdxSource` for one IDX images file, or for a folder with the standard MNIST file names
    (``train-images-idx3-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]`` and the labels)."""
    fs, path = url_fs(url)
    if not fs.exists(path):
        hint = " (install the Debian package dataset-fashion-mnist)" if url == FASHION_MNIST_DIR else ""
        raise DataError(f"IDX path not found: {url}{hint}")
    if not fs.isdir(path):
        return IdxSource(url, data_cfg, labels_url=labels_url, name=name)
    names = fs.ls(path, detail=False)
    train = _find(names, "train-images-idx3-ubyte")
    if not train:
        raise DataError(f"{url}: no train-images-idx3-ubyte[.gz] in the folder (found {names})")
    proto = url.split("://")[0] + "://" if "://" in url else ""
    full = lambda n: proto + n if n else ""  # noqa: E731
    return IdxSource(full(train), data_cfg, labels_url=full(_find(names, "train-labels-idx1-ubyte")),
                     test_images_url=full(_find(names, "t10k-images-idx3-ubyte")),
                     test_labels_url=full(_find(names, "t10k-labels-idx1-ubyte")),
                     name=name or os.path.basename(path.rstrip("/")))


def from_config(data_cfg, min_frames: int = 0) -> IdxSource:
    """``data.source.kind`` idx (``path`` required) | fashion_mnist (``path`` defaults to
    `FASHION_MNIST_DIR`); ``labels_path`` optional."""
    labels_url = str(data_cfg.source.labels_path or "")
    if source_kind(data_cfg) == "fashion_mnist":
        return open_idx(source_path(data_cfg, required=False) or FASHION_MNIST_DIR, data_cfg,
                        labels_url=labels_url, name="fashion")
    return open_idx(source_path(data_cfg), data_cfg, labels_url=labels_url)
