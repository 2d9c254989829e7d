"""Stage 1 fusion: the combined denoiser built from frozen view models (docs/METHOD.md §3).

``D_comb(x_σ; σ) = Σ_j w_j(σ) · comp_j(x_σ, σ)``, the components built from the view estimates
``ŷ_k = D_k(A_k x_σ; σ_k)`` with ``σ_k = σ·√c_k`` (METHOD §1). One implementation of each piece:

- ``average_components`` / ``average``: the coverage-weighted average
  ``Σ_k A_k⁺ ŷ_k / Σ_k cov_k`` and its per-view terms ``A_k⁺ ŷ_k / Σ_j cov_j`` (0 where nothing
  covers an element).
- ``mosaic`` (``clip_average`` for clips): the overlap average ``A⁺ y / cov`` of one view — the
  coverage-weighted average of a single view.
- ``split_components`` / ``frequency_split``: ``A_low⁺ ŷ_low + (I − A_low⁺ A_low) · detail`` —
  block means from the low-resolution estimate, within-block detail from the local views.
- ``CombinedDenoiser``: the fusion named ``split`` / ``average`` / ``auto`` of ``ViewModel`` s,
  built from the functions above, optionally with ``FusionWeights``.
- ``FusionWeights`` / ``fit_fusion_weights`` / ``fusion_sigma_grid``: per-σ scalar weights
  ``w_j(σ)``, least squares on full-resolution data at log-spaced σ, piecewise linear in log σ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from bootdiff.util import broadcast_sigma, randn
from bootdiff.views import DownsampleView

FUSIONS = ("auto", "split", "average")


# ----------------------------------------------------------------------------- fusion functions


def _lift_all(views: Sequence[Any], estimates: Sequence[torch.Tensor]):
    """``([A_k⁺ ŷ_k], Σ_k cov_k)``: the lifted estimates (full-size) and their summed coverage."""
    lifted = [view.lift(y) for view, y in zip(views, estimates)]
    return lifted, sum(view.coverage(lifted[0]) for view in views)


def average_components(views: Sequence[Any], estimates: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """``A_k⁺ ŷ_k / Σ_j cov_j`` for each view k (0 where no view covers an element): the terms of
    the coverage-weighted average (METHOD §3); their sum is `average` up to rounding."""
    lifted, cov = _lift_all(views, estimates)
    inv = torch.where(cov > 0, 1.0 / cov.clamp_min(1e-12), torch.zeros_like(cov))
    return [x * inv for x in lifted]


def average(views: Sequence[Any], estimates: Sequence[torch.Tensor]) -> torch.Tensor:
    """The coverage-weighted average ``Σ_k A_k⁺ ŷ_k / Σ_k cov_k`` (METHOD §3); 0 where no view
    covers an element."""
    lifted, cov = _lift_all(views, estimates)
    total = sum(lifted)
    return torch.where(cov > 0, total / cov.clamp_min(1e-12), torch.zeros_like(total))


def mosaic(view, y: torch.Tensor) -> torch.Tensor:
    """Overlap-averaged lift ``A⁺ y / cov`` of one view (patch mosaics); uncovered elements are 0."""
    return average([view], [y])


def clip_average(clip_view, clips: torch.Tensor) -> torch.Tensor:
    """Sliding-window averaging of overlapping clips back into a video (= ``mosaic`` on a ClipView)."""
    return mosaic(clip_view, clips)


def split_components(low_view, low_est: torch.Tensor, detail: torch.Tensor) -> List[torch.Tensor]:
    """``[A⁺ low_est, (I − A⁺A) detail]``: the two components of the frequency split (METHOD §3)."""
    return [low_view.lift(low_est), detail - low_view.lift(low_view.project(detail))]


def frequency_split(low_view, low_est: torch.Tensor, detail: torch.Tensor) -> torch.Tensor:
    """``A⁺ low_est + (I − A⁺A) detail``: the block means of the result are exactly ``low_est``."""
    return sum(split_components(low_view, low_est, detail))


# ----------------------------------------------------------------------------- per-σ weights


def fusion_sigma_grid(sigma_min: float, sigma_max: float, num: int) -> List[float]:
    """``num`` σ values evenly spaced in log σ from ``sigma_min`` to ``sigma_max``: the grid the
    fusion weights are fitted on (METHOD §3)."""
    if not (0 < sigma_min < sigma_max) or int(num) != num or num < 1:
        raise ValueError(f"fusion σ grid: need 0 < sigma_min < sigma_max and num >= 1, got "
                         f"sigma_min={sigma_min}, sigma_max={sigma_max}, num={num}")
    return np.exp(np.linspace(math.log(sigma_min), math.log(sigma_max), int(num))).tolist()


class FusionWeights(nn.Module):
    """Per-σ scalar weights of ``K`` fusion components, piecewise-linear in log σ (METHOD §3).

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
    """Least-squares per-σ fusion weights (METHOD §3): for each σ of the grid,
    ``w(σ) = argmin_w Σ_x ‖Σ_k w_k comp_k(x + σn, σ) − x‖²``.

    ``components_fn(x_sigma, sigma[N]) -> [comp_1, …, comp_K]`` (each shaped like ``x``;
    `CombinedDenoiser.components`). The ``K×K`` normal equations are accumulated in float64 over
    one pass of ``batches`` (each batch noised ``repeats`` times per σ, noise from ``generator``)
    and solved with a ridge of ``ridge·mean(diag)``.
    """
    grid = [float(s) for s in sigma_grid]
    G = b = None
    for x in batches:
        for j, s in enumerate(grid):
            for _ in range(repeats):
                n = randn(x.shape, generator, x.device, x.dtype)
                comps = components_fn(x + s * n, broadcast_sigma(s, x))
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


# ----------------------------------------------------------------------------- combined denoiser


def resolve_fusion(fusion, is_downsample: Sequence[bool]) -> str:
    """The fusion (METHOD §3) that ``fusion`` (``auto`` | ``split`` | ``average``, a str or a config
    Enum member) names for views of which ``is_downsample[k]`` says whether view k is a downsample
    view: ``auto`` is ``split`` with exactly one downsample view and at least one other, else
    ``average``. Raises ValueError when ``split`` cannot apply."""
    fusion = str(getattr(fusion, "value", fusion))
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got '{fusion}'")
    splittable = sum(map(bool, is_downsample)) == 1 and len(is_downsample) >= 2
    if fusion == "auto":
        return "split" if splittable else "average"
    if fusion == "split" and not splittable:
        raise ValueError("fusion 'split' needs exactly one downsample view and at least one local view")
    return fusion


@dataclass
class ViewModel:
    """A view (``bootdiff.views``) and the denoiser ``D_k(y, σ_k)`` trained on its outputs."""

    name: str
    view: Any
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CombinedDenoiser(nn.Module):
    """Fixed linear fusion of frozen view denoisers (stage 1, METHOD §3).

    ``fusion``: ``split`` (exactly one downsample view and at least one other: components
    `split_components` of the low view's estimate and the `average` of the others), ``average``
    (components `average_components` of all views), ``auto`` (``split`` when it applies, else
    ``average``). With ``weights`` (`FusionWeights`) the components are summed with per-σ
    weights, without with weight 1 (the plain split / average).

    ``forward(x, sigma)`` makes exactly one call per view model, on all patches / clips of the
    batch at once, under ``torch.no_grad`` (the result carries no graph: the view models are
    frozen and the combined estimate is a constant input to the residual).
    """

    def __init__(self, views: Sequence[ViewModel], fusion: str = "auto", weights: Optional[nn.Module] = None):
        super().__init__()
        views = list(views)
        if not views:
            raise ValueError("CombinedDenoiser: needs at least one ViewModel")
        names = [v.name for v in views]
        if len(set(names)) != len(names):
            raise ValueError(f"CombinedDenoiser: view names must be unique, got {names}")
        is_low = [isinstance(v.view, DownsampleView) for v in views]
        try:
            fusion = resolve_fusion(fusion, is_low)
        except ValueError as exc:
            raise ValueError(f"CombinedDenoiser: {exc}, got views {names}") from None
        self.fusion = fusion
        self.view_models = views
        self._low = is_low.index(True) if fusion == "split" else None
        # Register module denoisers so .to(device) and state_dict reach them; freeze them.
        self.denoisers = nn.ModuleDict({v.name: v.denoiser for v in views if isinstance(v.denoiser, nn.Module)})
        for p in self.denoisers.parameters():
            p.requires_grad_(False)
        self.denoisers.eval()
        if weights is not None and weights.num_components != self.num_components:
            raise ValueError(f"CombinedDenoiser: weights have {weights.num_components} components, "
                             f"fusion '{fusion}' with {len(views)} views has {self.num_components}")
        self.weights = weights

    @property
    def num_components(self) -> int:
        return 2 if self.fusion == "split" else len(self.view_models)

    def train(self, mode: bool = True) -> "CombinedDenoiser":
        """Frozen view models stay in eval mode (no dropout) whatever the mode of the parent."""
        super().train(mode)
        self.denoisers.eval()
        return self

    def denoiser(self, vm: ViewModel):
        """The view model's denoiser ``D_k`` (the registered module when it is one)."""
        return self.denoisers[vm.name] if vm.name in self.denoisers else vm.denoiser

    @torch.no_grad()
    def view_estimates(self, x: torch.Tensor, sigma) -> List[torch.Tensor]:
        """``ŷ_k = D_k(A_k x, σ_k)`` for every view, one call per view model (view-shaped outputs);
        a position-aware patch model (``takes_position``) is told each patch's grid location."""
        sigma = broadcast_sigma(sigma, x)
        out = []
        for vm in self.view_models:
            y = vm.view.project(x)
            D, s = self.denoiser(vm), vm.view.sigma_map(sigma).to(y.dtype)
            if getattr(D, "takes_position", False):  # position-aware (views.<v>.coords): each patch's location
                d = D(y, s, vm.view.locations.to(y.device).repeat(x.shape[0], 1))
            else:
                d = D(y, s)
            if d.shape != y.shape:
                raise ValueError(f"CombinedDenoiser: view model '{vm.name}' returned shape "
                                 f"{tuple(d.shape)} for input {tuple(y.shape)}")
            out.append(d.to(x.dtype))
        return out

    @torch.no_grad()
    def components(self, x: torch.Tensor, sigma) -> List[torch.Tensor]:
        """The fusion components (see the class docstring); their plain sum is the unweighted
        fusion. `fit_fusion_weights` fits the weights of exactly these."""
        ests = self.view_estimates(x, sigma)
        views = [vm.view for vm in self.view_models]
        if self.fusion == "split":
            local = [i for i in range(len(views)) if i != self._low]
            detail = average([views[i] for i in local], [ests[i] for i in local])
            return split_components(views[self._low], ests[self._low], detail)
        return average_components(views, ests)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        comps = self.components(x, sigma)
        if self.weights is None:
            return sum(comps)
        w = self.weights(broadcast_sigma(sigma, x)).to(device=x.device, dtype=x.dtype)  # [N, K]
        return sum(broadcast_sigma(w[:, k], x, column=True) * c for k, c in enumerate(comps))
