"""WebDataset shards of view samples, written atomically to any fsspec URL, plus the manifest.

A shard is a plain tar (webdataset's ``TarWriter``) whose samples are ``{key}.npy`` (the array,
channel-first: ``[C, H, W]`` or ``[C, T, H, W]``; uint8 pixels or float16 latents) and
``{key}.json`` (metadata: source id and index, view, patch ``location`` (row, col), clip
``frames`` [t0, t1), low-res ``factor``). The tar is built in memory and committed in one go
(`bootdiff.util.atomic_write_bytes`: local temp file + ``os.replace``, or a single S3 PUT), so
a crash never leaves a partial shard visible. A ``{shard}.json`` sidecar written *after* the
shard records its sha256, size and count: a shard with a matching sidecar is complete.

``manifest.json`` (one per dataset root) lists every split/view: counts, sample shape, dtype,
σ_data (std of the view's samples mapped to [-1, 1]; latents as stored), and its shards with
checksums. `shard_urls` (what the loaders get a view's shards through) verifies each shard's
sha256 against the manifest once per process (`verify_shard`), so a shard whose bytes changed
after ingest raises `ChecksumError` (naming the shard and both hashes) before it is read;
`shard_problems` / `validate_manifest` check a whole manifest (``ingest --verify``).
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import webdataset as wds

from bootdiff.util import atomic_write_bytes, join, read_bytes, url_fs

MANIFEST_NAME = "manifest.json"
FORMAT = "bootdiff-shards/1"


class ManifestError(ValueError):
    """A manifest is malformed or does not match the shards it lists."""


@dataclass
class ShardInfo:
    """What one committed shard holds (also the content of its ``.json`` sidecar)."""

    split: str  # split or view name: "full", "test", "patch", ...
    index: int  # shard index within the split
    url: str
    name: str  # path relative to the dataset root: "{split}/{split}-{index:06d}.tar"
    count: int = 0  # samples in the shard
    num_source: int = 0  # source samples the shard was made from
    skipped: int = 0  # source samples that yielded nothing (e.g. no clean patch)
    sha256: str = ""
    bytes: int = 0
    shape: List[int] = field(default_factory=list)
    dtype: str = ""
    sum: float = 0.0  # Σ of the values in model units ([-1, 1] pixels, raw latents)
    sumsq: float = 0.0
    numel: int = 0
    fingerprint: str = ""  # hash of the task's inputs; a mismatch means the shard is stale
    meta: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ShardInfo":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def shard_name(split: str, index: int) -> str:
    return f"{split}/{split}-{index:06d}.tar"


def sidecar_url(url: str) -> str:
    return url + ".json"


def to_model_units(arr: np.ndarray, dtype=np.float64) -> np.ndarray:
    """The one uint8 → [-1, 1] conversion: uint8 pixels → ``x/127.5 − 1`` in ``dtype``; float
    latents are only cast (they are stored in model units). A new array, never a view of ``arr``."""
    arr = np.asarray(arr)
    out = arr.astype(dtype)
    if arr.dtype == np.uint8:
        out /= 127.5  # in place: the arithmetic stays in ``dtype``
        out -= 1.0
    return out


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


_HEADERS: Dict[bytes, tuple] = {}  # npy header bytes -> (dtype, shape, data offset); one per view


def read_npy(npy: bytes) -> np.ndarray:
    """The one ``.npy`` reader of shard samples: bytes → array (no copy; may be read-only). The
    header is parsed once per distinct header: all samples of a view share it, and numpy's header
    parser dominates the cost of small arrays. Bad magic or short data raises ValueError."""
    if npy[:6] != b"\x93NUMPY":
        raise ValueError("not an .npy array (bad magic)")
    hlen = int.from_bytes(npy[8:10], "little") if npy[6] == 1 else int.from_bytes(npy[8:12], "little")
    start = 10 if npy[6] == 1 else 12
    head = npy[:start + hlen]
    if head not in _HEADERS:
        arr = np.lib.format.read_array(io.BytesIO(npy), allow_pickle=False)
        if arr.dtype.hasobject or np.isfortran(arr) and arr.ndim > 1:
            return arr
        _HEADERS[head] = (arr.dtype, arr.shape, start + hlen)
    dtype, shape, offset = _HEADERS[head]
    if len(npy) - offset != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"truncated .npy data ({len(npy) - offset} bytes for {shape} {dtype})")
    return np.frombuffer(npy, dtype, offset=offset).reshape(shape)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_url(url: str, chunk: int = 1 << 22) -> str:
    fs, path = url_fs(url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Collect samples of one shard in memory; `commit` writes tar + sidecar atomically.

    Usage: ``w = ShardWriter(url, split, index); w.write(key, array, meta); info = w.commit()``.
    All samples of a shard must share shape and dtype. The tar is reproducible (fixed mtime), so
    the same samples give the same checksum.
    """

    def __init__(self, url: str, split: str, index: int, name: Optional[str] = None):
        self.info = ShardInfo(split=split, index=index, url=url, name=name or shard_name(split, index))
        self._buf = io.BytesIO()
        self._tar = wds.TarWriter(self._buf, encoder=False, mtime=0, compress=False)
        self._keys = set()

    def write(self, key: str, array: np.ndarray, meta: Dict[str, Any]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"shard {self.info.url}: sample key {key!r} must not contain '.' or '/'")
        if key in self._keys:
            raise ValueError(f"shard {self.info.url}: duplicate sample key {key!r}")
        if array.dtype not in (np.uint8, np.float16):
            raise ValueError(f"shard {self.info.url}: key {key!r} has dtype {array.dtype}, "
                             "expected uint8 (pixels) or float16 (latents)")
        info = self.info
        if info.count == 0:
            info.shape, info.dtype = list(array.shape), str(array.dtype)
        elif list(array.shape) != info.shape or str(array.dtype) != info.dtype:
            raise ValueError(f"shard {info.url}: key {key!r} has shape {list(array.shape)} "
                             f"{array.dtype}, the shard holds {info.shape} {info.dtype}")
        self._keys.add(key)
        self._tar.write({"__key__": key, "npy": encode_npy(array),
                         "json": json.dumps(meta, sort_keys=True).encode()})
        v = to_model_units(array)
        info.count += 1
        info.sum += float(v.sum())
        info.sumsq += float(np.square(v).sum())
        info.numel += int(v.size)

    def commit(self) -> ShardInfo:
        """Write the shard (atomic), then its sidecar; return the shard's `ShardInfo`."""
        self._tar.close()
        data = self._buf.getvalue()
        self.info.sha256, self.info.bytes = sha256_bytes(data), len(data)
        atomic_write_bytes(self.info.url, data)
        atomic_write_bytes(sidecar_url(self.info.url), json.dumps(self.info.to_dict(), indent=1).encode())
        return self.info


def read_sidecar(url: str) -> Optional[ShardInfo]:
    """The sidecar of a shard, or None when it is missing or unreadable."""
    fs, path = url_fs(sidecar_url(url))
    try:
        with fs.open(path, "rb") as f:
            return ShardInfo.from_dict(json.loads(f.read()))
    except (FileNotFoundError, ValueError, TypeError, KeyError):
        return None


def shard_is_complete(url: str, fingerprint: str = "", verify: bool = True) -> Optional[ShardInfo]:
    """The shard's `ShardInfo` if it was committed (sidecar present, size and — with ``verify`` —
    sha256 match, same fingerprint), else None."""
    info = read_sidecar(url)
    if info is None or (fingerprint and info.fingerprint != fingerprint):
        return None
    fs, path = url_fs(url)
    try:
        size = fs.size(path)
    except FileNotFoundError:
        return None
    if size != info.bytes or (verify and sha256_url(url) != info.sha256):
        return None
    info.url = url
    return info


# ----------------------------------------------------------------------------- manifest


def split_entry(infos: List[ShardInfo], extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The manifest entry of one split/view from its shards' infos (σ_data pooled exactly)."""
    infos = sorted(infos, key=lambda i: i.index)
    shapes = {tuple(i.shape) for i in infos if i.count}
    dtypes = {i.dtype for i in infos if i.count}
    if len(shapes) > 1 or len(dtypes) > 1:
        raise ManifestError(f"split {infos[0].split}: shards disagree on shape/dtype: {shapes} {dtypes}")
    n = sum(i.numel for i in infos)
    mean = sum(i.sum for i in infos) / max(n, 1)
    var = max(sum(i.sumsq for i in infos) / max(n, 1) - mean * mean, 0.0)
    entry = {
        "count": sum(i.count for i in infos),
        "num_source": sum(i.num_source for i in infos),
        "skipped": sum(i.skipped for i in infos),
        "shape": list(next(iter(shapes))) if shapes else [],
        "dtype": next(iter(dtypes)) if dtypes else "",
        "mean": mean,
        "sigma_data": float(np.sqrt(var)),
        "shards": [{"name": i.name, "count": i.count, "sha256": i.sha256, "bytes": i.bytes}
                   for i in infos],
    }
    entry.update(extra or {})
    return entry


def write_manifest(root: str, manifest: Dict[str, Any]) -> str:
    """Write ``{root}/manifest.json`` atomically; returns its URL."""
    url = join(root, MANIFEST_NAME)
    body = {k: v for k, v in manifest.items() if k != "root"}
    atomic_write_bytes(url, json.dumps(body, indent=1, sort_keys=True).encode())
    return url


def read_manifest(url: str) -> Dict[str, Any]:
    """Read a manifest (URL of ``manifest.json`` or of the dataset root). ``manifest["root"]``
    is set to where it was read from, so shard names resolve wherever the dataset lives."""
    if not url.rstrip("/").endswith(".json"):
        url = join(url, MANIFEST_NAME)
    try:
        manifest = json.loads(read_bytes(url))
    except FileNotFoundError:
        raise ManifestError(f"manifest not found: {url}") from None
    except ValueError as exc:
        raise ManifestError(f"{url}: not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "splits" not in manifest:
        raise ManifestError(f"{url}: not a bootdiff shard manifest (format {FORMAT!r} with 'splits')")
    manifest["root"] = posixpath.dirname(url.rstrip("/")) if "://" in url else \
        url.rstrip("/").rsplit("/", 1)[0]
    return manifest


def shard_urls(manifest: Dict[str, Any], split: str, verify: bool = True) -> List[str]:
    """URLs of the shards of one split/view, in order. With ``verify`` (what every stage gets) each
    shard's sha256 is checked against the manifest (`verify_shard`: once per shard per process)
    before the URLs are handed out, so changed bytes never reach training or evaluation."""
    splits = manifest["splits"]
    if split not in splits:
        raise ManifestError(f"manifest at {manifest.get('root')}: no split/view {split!r} "
                            f"(has {sorted(splits)})")
    entries = splits[split]["shards"]
    urls = [join(manifest["root"], s["name"]) for s in entries]
    if verify:
        for url, s in zip(urls, entries):
            verify_shard(url, s["sha256"])
    return urls


# ----------------------------------------------------------------------------- verification


class ChecksumError(ManifestError):
    """A shard's bytes differ from the sha256 its manifest records; names the shard and both hashes."""

    def __init__(self, url: str, expected: str, actual: str):
        self.url, self.expected, self.actual = url, expected, actual
        super().__init__(f"shard {url} checksum mismatch: its sha256 is {actual}, the manifest "
                         f"records {expected} (`python -m bootdiff.data.ingest CONFIG --verify "
                         "--repair` rewrites it)")

    def __reduce__(self):  # rebuilt from its own arguments when Ray ships it between processes
        return type(self), (self.url, self.expected, self.actual)


_VERIFIED = set()  # (url, sha256) of the shards whose bytes matched, in this process


def verify_shard(url: str, sha256: str, cached: bool = True) -> None:
    """Raise `ChecksumError` unless the bytes at ``url`` hash to ``sha256`` (`ManifestError` when the
    shard is missing). A success is remembered per (url, sha256): with ``cached`` a shard is read
    and hashed once per process."""
    if cached and (url, sha256) in _VERIFIED:
        return
    try:
        actual = sha256_url(url)
    except FileNotFoundError:
        raise ManifestError(f"shard {url} is listed in the manifest but missing") from None
    if actual != sha256:
        raise ChecksumError(url, sha256, actual)
    _VERIFIED.add((url, sha256))


def shard_problems(manifest: Dict[str, Any], verify_checksums: bool = True) -> List[Dict[str, str]]:
    """Every shard a manifest lists that is missing, has another size or (``verify_checksums``)
    sha256 than recorded, or another sample count than its sidecar, as ``{"split", "name",
    "url", "problem"}`` (the problem names the shard; checksums are always recomputed)."""
    out = []
    for split, entry in manifest["splits"].items():
        for s in entry["shards"]:
            url = join(manifest.get("root"), s["name"])
            fs, path = url_fs(url)
            problem = None
            size = fs.size(path) if fs.exists(path) else None
            if size is None:
                problem = f"shard {url} is listed in the manifest but missing"
            elif size != s["bytes"]:
                problem = f"shard {url} has {size} bytes, the manifest says {s['bytes']}"
            elif verify_checksums:
                try:
                    verify_shard(url, s["sha256"], cached=False)
                except ManifestError as exc:
                    problem = str(exc)
            if problem is None:
                side = read_sidecar(url)
                if side is not None and side.count != s["count"]:
                    problem = f"shard {url} holds {side.count} samples, the manifest says {s['count']}"
            if problem is not None:
                out.append({"split": split, "name": s["name"], "url": url, "problem": problem})
    return out


def validate_manifest(manifest: Dict[str, Any], verify_checksums: bool = True) -> None:
    """Check every shard a manifest lists (`shard_problems`) and each split's total count.
    Raises `ManifestError` naming the first shard or split at fault."""
    for p in shard_problems(manifest, verify_checksums):
        raise ManifestError(f"split {p['split']!r}: {p['problem']}")
    for split, entry in manifest["splits"].items():
        total = sum(s["count"] for s in entry["shards"])
        if total != entry["count"]:
            raise ManifestError(f"split {split!r}: shards hold {total} samples, the manifest "
                                f"says {entry['count']}")
