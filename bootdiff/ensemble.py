"""An ensemble of denoisers: D(x; σ) = Σ_i w_i D_i(x; σ), the w_i ≥ 0 summing to one.

Each D_i estimates E[x | x + σn]; so does any convex combination of them, and its error is no
larger than the same combination of theirs: the squared error is convex in D (Jensen), so
G(Σ w_i D_i) ≤ Σ w_i G(D_i) at every σ, with a strict gain where the members' errors differ. Two
models trained on the same data in different ways — the bootstrap's D_comb from the partial views
and one full-resolution network trained the Ambient-Omni way (`bootdiff.peers.ambient`) — err
differently, so their average can be better than either (benchmarks/ensemble.py measures it, the
weight chosen on validation G). It is sampled like any denoiser (`bootdiff.samplers`), at the sum
of its members' cost per step."""

from __future__ import annotations

from typing import Sequence

import torch


class EnsembleDenoiser(torch.nn.Module):
    """D(x; σ) = Σ_i w_i D_i(x; σ) for denoisers ``members`` and convex ``weights`` (each ≥ 0, their
    sum 1 within 1e-6); a weight of 0 skips its member."""

    def __init__(self, members: Sequence[torch.nn.Module], weights: Sequence[float]):
        super().__init__()
        weights = [float(w) for w in weights]
        if len(members) != len(weights) or not members:
            raise ValueError(f"ensemble: {len(members)} members but {len(weights)} weights")
        if any(w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
            raise ValueError(f"ensemble: weights {weights} must be ≥ 0 and sum to 1")
        self.members = torch.nn.ModuleList(members)
        self.weights = weights

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = None
        for D, w in zip(self.members, self.weights):
            if w == 0:
                continue
            y = w * D(x, sigma)
            out = y if out is None else out + y
        return out
