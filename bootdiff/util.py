"""Small shared helpers: σ broadcasting and URL-based (fsspec) storage with atomic writes."""

from __future__ import annotations

import contextlib
import os
import uuid
from typing import Iterator, Tuple

import fsspec
import torch


def expand_like(sigma, x: torch.Tensor) -> torch.Tensor:
    """σ as a tensor of shape ``[N, 1, ..., 1]`` (or 0-d) broadcastable against ``x``."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype if x.is_floating_point() else torch.float32,
                            device=x.device)
    if sigma.ndim == 0:
        return sigma.reshape([1] * x.ndim)
    return sigma.reshape([-1] + [1] * (x.ndim - 1))


def url_fs(url: str, **storage_options) -> Tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path of a URL (plain paths are local files).

    For ``s3://`` the endpoint, keys and region come from the usual AWS environment variables
    (``AWS_ENDPOINT_URL`` for an S3-protocol server such as moto or MinIO).
    """
    url = str(url)
    if url.startswith("s3://") and "endpoint_url" not in storage_options:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            storage_options = {**storage_options, "endpoint_url": endpoint}
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    return fs, path


def join(url: str, *parts: str) -> str:
    """Join URL path parts with '/' (works for local paths and s3:// alike)."""
    out = str(url).rstrip("/")
    for p in parts:
        out = out + "/" + str(p).strip("/")
    return out


def exists(url: str) -> bool:
    fs, path = url_fs(url)
    return fs.exists(path)


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` so that readers see either nothing or the whole object.

    Local files: write a temporary sibling, fsync, ``os.replace``. Object stores (s3://): a
    single PUT is already atomic (the object appears only when the upload completes).
    """
    fs, path = url_fs(url)
    if _is_local(fs):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        parent = path.rsplit("/", 1)[0]
        with contextlib.suppress(Exception):
            fs.makedirs(parent, exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(data)


def read_bytes(url: str) -> bytes:
    fs, path = url_fs(url)
    with fs.open(path, "rb") as f:
        return f.read()


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


@contextlib.contextmanager
def atomic_dir(url: str) -> Iterator[str]:
    """Yield a local staging directory; on success its files appear at ``url`` as a whole.

    The directory is committed by writing every file, then a ``COMPLETE`` marker last: readers
    treat a directory without the marker as absent (`is_complete`). Locally the staging
    directory is renamed into place, so a crash never leaves a partial directory at ``url``.
    """
    import shutil
    import tempfile

    fs, path = url_fs(url)
    if _is_local(fs):
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        stage = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
        try:
            yield stage
            with open(os.path.join(stage, "COMPLETE"), "w") as f:
                f.write("ok\n")
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(stage, path)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    else:
        stage = tempfile.mkdtemp(prefix="bootdiff-stage-")
        try:
            yield stage
            for name in sorted(os.listdir(stage)):
                fs.put_file(os.path.join(stage, name), f"{path}/{name}")
            with fs.open(f"{path}/COMPLETE", "wb") as f:
                f.write(b"ok\n")
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def is_complete(url: str) -> bool:
    """Whether a directory written by `atomic_dir` is complete."""
    fs, path = url_fs(url)
    return fs.exists(f"{path.rstrip('/')}/COMPLETE")
