"""Small shared helpers: σ broadcasting, reproducible noise, and URL-based (fsspec) storage with
atomic writes."""

from __future__ import annotations

import contextlib
import itertools
import os
import uuid
from typing import Iterator, Optional, Tuple

import fsspec
import torch


def broadcast_sigma(sigma, like: Optional[torch.Tensor] = None, *, dtype: Optional[torch.dtype] = None,
                    repeat: int = 1, column: bool = False) -> torch.Tensor:
    """σ (or any per-sample scalar: c_in(σ), r(σ), w_k(σ)) as a tensor for a batch — the one
    σ-broadcast helper (docs/METHOD.md §1, §2).

    With ``like`` (a batch ``[N, ...]``): a float, 0-d or 1-element σ is broadcast to ``[N]``,
    otherwise σ must have ``N`` entries; dtype ``dtype``, else ``like``'s floating dtype, else
    float32; on ``like``'s device. ``column=True`` shapes it ``[N, 1, ..., 1]`` to broadcast
    against ``like``. Without ``like``: σ as a tensor (``dtype``, else its own floating dtype, else
    the default dtype); a 0-d σ stays 0-d (it broadcasts against any batch).

    ``repeat=L`` repeats each sample's σ ``L`` times, sample-major (``[N·L]``): the noise levels of
    the ``L`` view outputs cut from each sample; a 0-d σ stays 0-d. The σ of a view with
    variance ratio ``c`` (σ_k = σ·√c, METHOD §1) is ``broadcast_sigma(sigma, repeat=L) * math.sqrt(c)``.
    """
    if like is not None:
        dtype = dtype or (like.dtype if like.is_floating_point() else torch.float32)
        sigma = torch.as_tensor(sigma, dtype=dtype, device=like.device).reshape(-1)
        n = like.shape[0]
        if sigma.numel() == 1 and n != 1:
            sigma = sigma.expand(n).contiguous()
        elif sigma.numel() != n:
            raise ValueError(f"sigma has {sigma.numel()} entries but the batch has {n} samples")
    else:
        sigma = torch.as_tensor(sigma, dtype=dtype)
        if not sigma.is_floating_point():
            sigma = sigma.to(torch.get_default_dtype())
        if sigma.ndim == 0:
            return sigma
        sigma = sigma.reshape(-1)
    if repeat != 1:
        sigma = sigma.repeat_interleave(int(repeat))
    if column:
        if like is None:
            raise ValueError("broadcast_sigma: column=True needs the batch `like` to broadcast against")
        sigma = sigma.reshape([-1] + [1] * (like.ndim - 1))
    return sigma


def randn(shape, generator: Optional[torch.Generator] = None, device=None,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``N(0, I)`` of ``shape`` drawn on the generator's device, then moved to ``device`` — the one
    reproducible-noise helper: a CPU generator drives the same noise for CUDA tensors (and vice
    versa), so results do not depend on where the model runs."""
    gen_device = generator.device if generator is not None else device
    out = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype)
    return out.to(device) if device is not None else out


def compute_device() -> torch.device:
    """Where models train and evaluate in this process: the current CUDA device when there is one
    (a Ray worker sees only the GPU it was given), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def module_device(module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for one that has neither, or for
    a plain callable)."""
    if isinstance(module, torch.nn.Module):
        for t in itertools.chain(module.parameters(), module.buffers()):
            return t.device
    return torch.device("cpu")


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
    directory is renamed into place, so a crash never leaves a partial directory at ``url``;
    elsewhere (``s3://``) what was at ``url`` is removed first and every file of the staging
    tree, subfolders included (a diffusers folder's ``unet/``), is uploaded before the marker.
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
            path = path.rstrip("/")
            if fs.exists(path):
                fs.rm(path, recursive=True)
            for root, _, files in os.walk(stage):
                for name in sorted(files):
                    local = os.path.join(root, name)
                    rel = os.path.relpath(local, stage).replace(os.sep, "/")
                    fs.put_file(local, f"{path}/{rel}")
            with fs.open(f"{path}/COMPLETE", "wb") as f:
                f.write(b"ok\n")
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def is_complete(url: str) -> bool:
    """Whether a directory written by `atomic_dir` is complete."""
    fs, path = url_fs(url)
    return fs.exists(f"{path.rstrip('/')}/COMPLETE")
