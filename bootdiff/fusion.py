"""Fusion of lifted view estimates into one full-resolution estimate (DESIGN.md §1).

- ``mosaic``: overlap averaging ``A⁺ y / coverage`` (patch mosaics, sliding-window clips).
- ``frequency_split``: ``A_low⁺ D_low + (I − A_low⁺ A_low) · detail`` — block means from the
  low-resolution estimate, within-block detail from a local (patch) estimate.
- ``FusionWeights`` / ``fit_fusion_weights``: per-σ scalar weights ``w_k(σ)`` of the fusion
  components, fitted by least squares on full-resolution data and interpolated linearly in log σ:
  ``D_comb = Σ_k w_k(σ) · comp_k(x_σ, σ)``.
"""

from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence

import torch
from torch import nn


def mosaic(view, y: torch.Tensor) -> torch.Tensor:
    """Overlap-averaged lift ``lift(y) / coverage``; elements no view output covers are 0."""
    x = view.lift(y)
    cov = view.coverage(x)
    return torch.where(cov > 0, x / cov.clamp_min(1e-12), torch.zeros_like(x))


def clip_average(clip_view, clips: torch.Tensor) -> torch.Tensor:
    """Sliding-window averaging of overlapping clips back into a video (= ``mosaic`` on a ClipView)."""
    return mosaic(clip_view, clips)


def frequency_split(low_view, low_est: torch.Tensor, detail: torch.Tensor) -> torch.Tensor:
    """``A⁺ low_est + (I − A⁺A) detail``: the block means of the result are exactly ``low_est``."""
    return low_view.lift(low_est) + detail - low_view.lift(low_view.project(detail))


class FusionWeights(nn.Module):
    """Per-σ scalar weights of ``K`` fusion components, piecewise-linear in log σ.

    Buffers ``log_sigma`` ``[S]`` (increasing) and ``weights`` ``[S, K]`` (default all ones, i.e.
    the unweighted fusion). ``forward(sigma) -> [N, K]``; constant beyond the grid ends.
    """

    def __init__(self, sigma_grid: Sequence[float], num_components: int,
                 weights: Optional[torch.Tensor] = None):
        super().__init__()
        grid = torch.as_tensor(sigma_grid, dtype=torch.float64).reshape(-1)
        if grid.numel() == 0 or (grid <= 0).any():
            raise ValueError(f"FusionWeights: sigma_grid must be non-empty and positive, got {grid.tolist()}")
        if grid.numel() > 1 and (grid[1:] <= grid[:-1]).any():
            raise ValueError(f"FusionWeights: sigma_grid must be strictly increasing, got {grid.tolist()}")
        if weights is None:
            weights = torch.ones(grid.numel(), num_components, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if tuple(weights.shape) != (grid.numel(), num_components):
            raise ValueError(f"FusionWeights: weights shape {tuple(weights.shape)} != "
                             f"({grid.numel()}, {num_components})")
        self.register_buffer("log_sigma", grid.log())
        self.register_buffer("weights", weights.clone())

    @property
    def num_components(self) -> int:
        return int(self.weights.shape[1])

    def forward(self, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=self.weights.device).reshape(-1).to(torch.float64)
        ls, w = self.log_sigma, self.weights
        if ls.numel() == 1:
            return w.expand(sigma.numel(), -1).clone()
        t = sigma.log().clamp(ls[0], ls[-1])
        i = torch.searchsorted(ls, t, right=True).clamp(1, ls.numel() - 1)
        a = ((t - ls[i - 1]) / (ls[i] - ls[i - 1]))[:, None]
        return (1 - a) * w[i - 1] + a * w[i]


@torch.no_grad()
def fit_fusion_weights(components_fn: Callable[[torch.Tensor, torch.Tensor], List[torch.Tensor]],
                       batches: Iterable[torch.Tensor], sigma_grid: Sequence[float],
                       generator: Optional[torch.Generator] = None, ridge: float = 1e-6,
                       repeats: int = 1) -> FusionWeights:
    """Least-squares per-σ fusion weights: for each σ of the grid,
    ``w(σ) = argmin_w Σ_x ‖Σ_k w_k comp_k(x + σn, σ) − x‖²``.

    ``components_fn(x_sigma, sigma[N]) -> [comp_1, …, comp_K]`` (each shaped like ``x``). The
    ``K×K`` normal equations are accumulated in float64 over one pass of ``batches`` (each batch
    noised ``repeats`` times per σ) and solved with a ridge of ``ridge·mean(diag)``.
    """
    grid = [float(s) for s in sigma_grid]
    G = b = None
    for x in batches:
        for j, s in enumerate(grid):
            for _ in range(repeats):
                gen_device = generator.device if generator is not None else x.device
                n = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
                sigma = torch.full((x.shape[0],), s, device=x.device, dtype=x.dtype)
                comps = components_fn(x + s * n, sigma)
                F = torch.stack([c.reshape(-1) for c in comps], 1).to(torch.float64)  # [M, K]
                if G is None:
                    K = F.shape[1]
                    G = torch.zeros(len(grid), K, K, dtype=torch.float64, device=F.device)
                    b = torch.zeros(len(grid), K, dtype=torch.float64, device=F.device)
                G[j] += F.T @ F
                b[j] += F.T @ x.reshape(-1).to(torch.float64)
    if G is None:
        raise ValueError("fit_fusion_weights: no data batches")
    K = G.shape[1]
    eye = torch.eye(K, dtype=torch.float64, device=G.device)
    scale = G.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)[:, None, None]
    w = torch.linalg.solve(G + ridge * scale * eye, b[..., None])[..., 0]
    if not torch.isfinite(w).all():
        raise FloatingPointError("fit_fusion_weights: the normal equations are singular")
    return FusionWeights(grid, K, weights=w.cpu())
