"""The low-resolution view: area downsampling by an integer factor (`DownsampleView`);
docs/METHOD.md §1."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from bootdiff.views.base import View, bad_value, check_at_least_1, config_value


# ----------------------------------------------------------------------------- low resolution


class DownsampleView(View):
    """Area (block-mean) downsampling by ``factor``: ``c = 1/f²``, ``σ_k = σ/f``.

    ``A`` averages each ``f×f`` block, so ``A Aᵀ = I/f²``; the lift ``Aᵀ/c`` is block-replicate
    (nearest) upsampling. Works on the last two axes of any ``[..., H, W]`` tensor (images or
    videos). Bilinear downsampling would break ``A Aᵀ ∝ I`` (docs/METHOD.md §1), hence area.
    Ingest stores the block means of each sample, rounded back to uint8 for pixels.
    """

    kind = "downsample"

    def __init__(self, factor: int):
        if int(factor) != factor or factor < 1:
            raise ValueError(f"DownsampleView: factor must be a positive int, got {factor!r}")
        self.factor = int(factor)
        self.c = 1.0 / self.factor**2

    def project(self, x: torch.Tensor) -> torch.Tensor:
        f = self.factor
        H, W = x.shape[-2:]
        if x.ndim < 3 or H % f or W % f:
            raise ValueError(f"DownsampleView(factor={f}): spatial size {H}x{W} of input shape "
                             f"{tuple(x.shape)} is not divisible by the factor")
        return x.reshape(*x.shape[:-2], H // f, f, W // f, f).mean(dim=(-3, -1))

    def lift(self, y: torch.Tensor) -> torch.Tensor:
        f = self.factor
        h, w = y.shape[-2:]
        up = y[..., :, None, :, None].expand(*y.shape[:-2], h, f, w, f)
        return up.reshape(*y.shape[:-2], h * f, w * f)

    def coverage(self, like: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(like)

    @classmethod
    def check_config(cls, name: str, vcfg, sample_shape: Tuple[int, ...]) -> None:
        """``factor ≥ 1`` dividing both spatial sizes (images or videos). Not checked: whether it
        divides a patch view's size — the split fusion does not need it (docs/METHOD.md §3)."""
        check_at_least_1(name, vcfg, "factor")
        f, (H, W) = int(config_value(vcfg, "factor")), sample_shape[-2:]
        if H % f or W % f:
            raise bad_value(name, "factor", f, f"does not divide the data's sample size {H}x{W}")

    @classmethod
    def from_config(cls, vcfg, sample_shape: Tuple[int, ...], mask=None) -> "DownsampleView":
        return cls(int(vcfg.factor))

    def config(self) -> Dict[str, Any]:
        return {"kind": self.kind, "factor": self.factor}

    @classmethod
    def cut(cls, x: np.ndarray, spec: Dict[str, Any], rng: np.random.Generator,
            mask: Optional[np.ndarray] = None) -> List[tuple]:
        """The block means of ``x`` (float64 mean; uint8 input rounded back to uint8)."""
        f = spec["factor"]
        *lead, h, w = x.shape
        y = x.astype(np.float64).reshape(*lead, h // f, f, w // f, f).mean(axis=(-3, -1))
        y = np.clip(np.rint(y), 0, 255).astype(np.uint8) if x.dtype == np.uint8 else y.astype(x.dtype)
        return [(y, {"factor": f})]

    def to_json(self) -> Dict[str, Any]:
        return {"class": "DownsampleView", "factor": self.factor}

    @classmethod
    def from_json(cls, d: Dict[str, Any], where: str) -> "DownsampleView":
        return cls(d["factor"])

    def __repr__(self) -> str:
        return f"DownsampleView(factor={self.factor})"
