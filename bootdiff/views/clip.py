"""The short-clip view of videos: ``clip_len`` consecutive frames (`ClipView`); docs/METHOD.md §1."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from bootdiff.views.base import (IndexCache, View, bad_value, check_at_least_1, check_ndim, config_value, kind_name,
                                 window_starts)


# ----------------------------------------------------------------------------- video clips


class ClipView(View):
    """Windows of ``clip_len`` frames on axis 2 of videos ``[N, C, T, H, W]`` (``c = 1``).

    Starts every ``stride`` frames (default ``clip_len // 2``: the sliding window used at
    evaluation), the last window snapped to the end, or explicit ``starts``. ``project`` returns
    ``[N*L, C, clip_len, H, W]`` sample-major; ``lift`` pastes clips into the frame axis and sums.
    Ingest cuts ``per_sample`` windows at uniform random starts and records ``frames`` [t0, t1).
    """

    kind = "clip"
    draws_per_sample = True

    def __init__(self, num_frames: int, clip_len: int, stride: Optional[int] = None,
                 starts: Optional[Sequence[int]] = None):
        if clip_len <= 0 or clip_len > num_frames:
            raise ValueError(f"ClipView: clip_len {clip_len} must be in [1, num_frames={num_frames}]")
        self.num_frames, self.clip_len = int(num_frames), int(clip_len)
        if starts is None:
            self.stride = int(stride) if stride is not None else max(1, clip_len // 2)
            starts = window_starts(num_frames, clip_len, self.stride)
        else:
            self.stride = stride
        starts = torch.as_tensor(starts, dtype=torch.long).reshape(-1)
        if starts.numel() == 0 or (starts < 0).any() or (starts > num_frames - clip_len).any():
            raise ValueError(f"ClipView: clip starts {starts.tolist()} invalid for {num_frames} "
                             f"frames and clip_len {clip_len}")
        self.starts = starts
        self._index = IndexCache((starts[:, None] + torch.arange(clip_len)[None, :]).reshape(-1))

    @property
    def num_locations(self) -> int:
        return int(self.starts.shape[0])

    def random_starts(self, L: int, generator: Optional[torch.Generator] = None) -> "ClipView":
        """A new ``ClipView`` with ``L`` clip starts drawn uniformly."""
        starts = torch.randint(0, self.num_frames - self.clip_len + 1, (L,), generator=generator)
        return ClipView(self.num_frames, self.clip_len, starts=starts)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[2] != self.num_frames:
            raise ValueError(f"ClipView: expected videos [N, C, {self.num_frames}, H, W], got "
                             f"shape {tuple(x.shape)}")
        N, C, _, H, W = x.shape
        L, Tc = self.num_locations, self.clip_len
        y = x[:, :, self._index.on(x.device)]  # [N, C, L*Tc, H, W]
        return y.reshape(N, C, L, Tc, H, W).transpose(1, 2).reshape(N * L, C, Tc, H, W)

    def lift(self, y: torch.Tensor) -> torch.Tensor:
        L, Tc = self.num_locations, self.clip_len
        if y.ndim != 5 or y.shape[2] != Tc or y.shape[0] % L:
            raise ValueError(f"ClipView.lift: expected clips [N*{L}, C, {Tc}, H, W], got shape "
                             f"{tuple(y.shape)}")
        N, C, H, W = y.shape[0] // L, y.shape[1], y.shape[3], y.shape[4]
        flat = y.reshape(N, L, C, Tc, H, W).transpose(1, 2).reshape(N, C, L * Tc, H, W)
        out = y.new_zeros(N, C, self.num_frames, H, W)
        out.index_add_(2, self._index.on(y.device), flat)
        return out

    @classmethod
    def check_config(cls, name: str, vcfg, sample_shape: Tuple[int, ...]) -> None:
        """Videos only; ``1 ≤ clip_len ≤ T``; ``per_sample ≥ 1``; ``clip_stride`` None or ≥ 1."""
        check_ndim(name, kind_name(config_value(vcfg, "kind")), sample_shape, 4)
        check_at_least_1(name, vcfg, "clip_len", "per_sample")
        check_at_least_1(name, vcfg, "clip_stride", optional=True)
        if int(config_value(vcfg, "clip_len")) > sample_shape[1]:
            raise bad_value(name, "clip_len", config_value(vcfg, "clip_len"),
                       f"longer than the data's videos ({sample_shape[1]} frames)")

    @classmethod
    def from_config(cls, vcfg, sample_shape: Tuple[int, ...], mask=None) -> "ClipView":
        return cls(sample_shape[1], int(vcfg.clip_len), stride=vcfg.clip_stride)

    def config(self) -> Dict[str, Any]:
        return {"kind": self.kind, "clip_len": self.clip_len}

    @classmethod
    def min_frames(cls, spec: Dict[str, Any]) -> int:
        return int(spec["clip_len"])

    @classmethod
    def cut(cls, x: np.ndarray, spec: Dict[str, Any], rng: np.random.Generator,
            mask: Optional[np.ndarray] = None) -> List[tuple]:
        L = spec["clip_len"]
        starts = rng.integers(0, x.shape[1] - L + 1, size=spec["per_sample"])
        return [(x[:, t:t + L], {"frames": [int(t), int(t) + L]}) for t in starts]

    def to_json(self) -> Dict[str, Any]:
        return {"class": "ClipView", "num_frames": self.num_frames, "clip_len": self.clip_len,
                "starts": self.starts.tolist()}

    @classmethod
    def from_json(cls, d: Dict[str, Any], where: str) -> "ClipView":
        return cls(d["num_frames"], d["clip_len"], starts=d["starts"])

    def __repr__(self) -> str:
        return f"ClipView(num_frames={self.num_frames}, clip_len={self.clip_len}, L={self.num_locations})"
