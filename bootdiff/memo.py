"""The frozen part of a bootstrapped denoiser, computed once for G at every checkpoint.

G (docs/METHOD.md §6) scores ``D_boot(x + σn; σ) = D_comb(x + σn; σ) + r(σ)·R(…)`` on fixed data,
a fixed σ grid and fixed noise (`bootdiff.evaluation.metrics.fixed_noise`). ``D_comb`` — every frozen view
model, and with patches every window of every image — is most of that cost, and it is the same
at every checkpoint of a sweep trial, and in every trial whose fusion weights are the same. So
`MemoDenoiser` keeps its outputs, keyed by the exact bytes of the input and σ, per fingerprint of
the frozen weights (buffers included: fitted fusion weights differ → a different store), and
`memoize_combined` puts it in place of ``model.combined`` for one evaluation. The outputs can be
kept in a file (``store_url``, any fsspec URL) so the trials of a sweep — separate processes —
share them. A hit returns the tensor computed before for the same bytes: the numbers are those of
the plain model (bit-identical where the first call ran with the same threads and kernels).
"""

from __future__ import annotations

import hashlib
import io
from typing import Optional

import torch
from torch import nn

from bootdiff import util


def _update(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous().reshape(-1)
    h.update(f"{t.dtype}|{t.numel()}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def fingerprint(module: nn.Module) -> str:
    """SHA-1 of a module's parameters and buffers (names, dtypes, shapes, bytes)."""
    h = hashlib.sha1()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}|{tuple(t.shape)}|".encode())
        _update(h, t)
    return h.hexdigest()[:20]


def _key(x: torch.Tensor, sigma: torch.Tensor) -> str:
    h = hashlib.sha1()
    for t in (x, torch.as_tensor(sigma, dtype=x.dtype)):
        h.update(f"{tuple(t.shape)}|".encode())
        _update(h, t)
    return h.hexdigest()


class MemoDenoiser(nn.Module):
    """``D(x, σ)`` of a frozen denoiser, remembered by input content (no autograd: evaluation only).

    ``store_url``: a file holding the outputs of earlier processes for the same weights
    (``{store_url}`` is per fingerprint, see `memoize_combined`); `save` merges new outputs in."""

    def __init__(self, denoiser: nn.Module, store_url: Optional[str] = None):
        super().__init__()
        self.denoiser = denoiser
        self.store_url = store_url
        self.outputs = {}
        self.new = 0
        self.hits = 0
        if store_url and util.exists(store_url):
            self.outputs = torch.load(io.BytesIO(util.read_bytes(store_url)), map_location="cpu")

    def forward(self, x: torch.Tensor, sigma):
        if torch.is_grad_enabled():
            return self.denoiser(x, sigma)
        key = _key(x, sigma)
        out = self.outputs.get(key)
        if out is None:
            out = self.denoiser(x, sigma).detach()
            self.outputs[key] = out.cpu()
            self.new += 1
        else:
            self.hits += 1
        return out.to(x.device)

    def save(self) -> None:
        """Merge this process's new outputs into ``store_url`` (atomic write; a concurrent writer
        may drop some entries, which only costs their recomputation)."""
        if not (self.store_url and self.new):
            return
        merged = dict(self.outputs)
        if util.exists(self.store_url):
            merged = {**torch.load(io.BytesIO(util.read_bytes(self.store_url)), map_location="cpu"), **merged}
        buf = io.BytesIO()
        torch.save(merged, buf)
        util.atomic_write_bytes(self.store_url, buf.getvalue())
        self.new = 0


def memoized(denoiser: nn.Module, store_dir: Optional[str]) -> MemoDenoiser:
    """A frozen ``denoiser`` behind a `MemoDenoiser` backed by ``{store_dir}/dcomb-<fingerprint>.pt``
    (no file when ``store_dir`` is None)."""
    url = util.join(store_dir, f"dcomb-{fingerprint(denoiser)}.pt") if store_dir else None
    return MemoDenoiser(denoiser, url)


def memoize_combined(model: nn.Module, store_dir: Optional[str]) -> Optional[MemoDenoiser]:
    """Replace ``model.combined`` (a `bootdiff.residual.BootstrapDenoiser`'s frozen D_comb) by
    `memoized` in place and return it; None when ``model`` has no frozen combined part. Put the
    plain one back with ``model.combined = memo.denoiser``."""
    combined = getattr(model, "combined", None)
    if combined is None or isinstance(combined, MemoDenoiser) or any(p.requires_grad for p in combined.parameters()):
        return None
    memo = memoized(combined, store_dir)
    model.combined = memo
    return memo
