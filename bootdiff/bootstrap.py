"""Combined and bootstrapped denoisers (DESIGN.md §1, "Combined denoiser" / "Residual denoiser").

Stage 1:  ``D_comb(x_σ; σ) = Σ_k W_k(σ) · A_k⁺ D_k(A_k x_σ; σ_k)`` with ``σ_k = σ·√c_k``; the view
models ``D_k`` are frozen. Fusion:

- ``split``   (one downsample view + local views): ``A_low⁺ D_low + (I − A_low⁺A_low) · detail``,
              ``detail`` = the mosaic of all local views (lifts summed, divided by their summed
              coverage). Components: ``[A_low⁺ D_low, (I − A_low⁺A_low) · detail]``.
- ``average`` coverage-weighted average of all lifted views, ``Σ_k A_k⁺ D_k / Σ_k coverage_k``.
              Components: ``A_k⁺ D_k / Σ_j coverage_j`` per view.
- ``auto``    ``split`` when there is exactly one downsample view and at least one other view,
              else ``average``.

With ``weights`` (a ``bootdiff.fusion.FusionWeights``) the components are summed with per-σ
scalar weights; without, with weight 1 (which is the plain split / average).

Stage 2:  ``D_boot(x_σ; σ) = D_comb(x_σ; σ) + r(σ) · R_θ(x_σ, σ, D_comb)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import torch
from torch import nn

from bootdiff.util import expand_like
from bootdiff.views import DownsampleView

FUSIONS = ("auto", "split", "average")


@dataclass
class ViewModel:
    """A view (``bootdiff.views``) and the denoiser ``D_k(y, σ_k)`` trained on its outputs."""

    name: str
    view: Any
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _as_batch_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """σ as a ``[N]`` tensor of x's dtype/device (a float or 0-d tensor is broadcast)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        return sigma.expand(x.shape[0])
    sigma = sigma.reshape(-1)
    if sigma.shape[0] != x.shape[0]:
        raise ValueError(f"sigma has {sigma.shape[0]} entries for a batch of {x.shape[0]}")
    return sigma


class CombinedDenoiser(nn.Module):
    """Fixed linear fusion of frozen view denoisers (stage 1).

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
        if fusion not in FUSIONS:
            raise ValueError(f"CombinedDenoiser: fusion must be one of {FUSIONS}, got '{fusion}'")
        low = [i for i, v in enumerate(views) if isinstance(v.view, DownsampleView)]
        if fusion == "auto":
            fusion = "split" if len(low) == 1 and len(views) >= 2 else "average"
        if fusion == "split" and (len(low) != 1 or len(views) < 2):
            raise ValueError(f"CombinedDenoiser: fusion 'split' needs exactly one downsample view and "
                             f"at least one local view, got views {names}")
        self.fusion = fusion
        self.view_models = views
        self._low = low[0] if fusion == "split" else None
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

    def _denoiser(self, vm: ViewModel):
        return self.denoisers[vm.name] if vm.name in self.denoisers else vm.denoiser

    def view_estimates(self, x: torch.Tensor, sigma) -> List[torch.Tensor]:
        """``D_k(A_k x, σ_k)`` for every view, one call per view model (view-shaped outputs)."""
        sigma = _as_batch_sigma(sigma, x)
        out = []
        with torch.no_grad():
            for vm in self.view_models:
                y = vm.view.project(x)
                d = self._denoiser(vm)(y, vm.view.sigma_map(sigma).to(y.dtype))
                if d.shape != y.shape:
                    raise ValueError(f"CombinedDenoiser: view model '{vm.name}' returned shape "
                                     f"{tuple(d.shape)} for input {tuple(y.shape)}")
                out.append(d.to(x.dtype))
        return out

    def components(self, x: torch.Tensor, sigma) -> List[torch.Tensor]:
        """The fusion components (see module docstring); their plain sum is the unweighted fusion."""
        ests = self.view_estimates(x, sigma)
        with torch.no_grad():
            if self.fusion == "split":
                low_vm, low_est = self.view_models[self._low], ests[self._low]
                local = [(vm, d) for i, (vm, d) in enumerate(zip(self.view_models, ests)) if i != self._low]
                detail = self._average(x, local)
                low_view = low_vm.view
                coarse = low_view.lift(low_est)
                fine = detail - low_view.lift(low_view.project(detail))
                return [coarse, fine]
            lifted, cov = self._lift_all(x, list(zip(self.view_models, ests)))
            inv = torch.where(cov > 0, 1.0 / cov.clamp_min(1e-12), torch.zeros_like(cov))
            return [l * inv for l in lifted]

    @staticmethod
    def _lift_all(x, pairs):
        lifted = [vm.view.lift(d) for vm, d in pairs]
        cov = sum(vm.view.coverage(x) for vm, _ in pairs)
        return lifted, cov

    def _average(self, x, pairs) -> torch.Tensor:
        lifted, cov = self._lift_all(x, pairs)
        total = sum(lifted)
        return torch.where(cov > 0, total / cov.clamp_min(1e-12), torch.zeros_like(total))

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        comps = self.components(x, sigma)
        with torch.no_grad():
            if self.weights is None:
                return sum(comps)
            w = self.weights(_as_batch_sigma(sigma, x)).to(device=x.device, dtype=x.dtype)  # [N, K]
            return sum(expand_like(w[:, k], x) * c for k, c in enumerate(comps))


class BootstrapDenoiser(nn.Module):
    """``D_boot = D_comb + r(σ)·R(x, σ, D_comb)`` (stage 2).

    ``residual(x, sigma, d_comb) -> R`` (``bootdiff.precond.ResidualPrecond``); ``range_adapter
    (sigma) -> [N]`` (``bootdiff.precond.RangeAdapter``; None: ``r ≡ 1``). Only the residual's
    parameters are trainable.
    """

    def __init__(self, combined: CombinedDenoiser, residual: nn.Module, range_adapter: Optional[nn.Module] = None):
        super().__init__()
        self.combined = combined
        self.residual = residual
        self.range_adapter = range_adapter

    def forward_parts(self, x: torch.Tensor, sigma):
        """``(d_comb, r, R)`` with ``r`` shaped ``[N, 1, …]`` — what the residual loss needs."""
        sigma = _as_batch_sigma(sigma, x)
        d_comb = self.combined(x, sigma)
        if self.range_adapter is None:
            r = torch.ones_like(sigma)
        else:
            r = torch.as_tensor(self.range_adapter(sigma)).to(device=x.device, dtype=x.dtype).reshape(-1)
            r = r.expand(x.shape[0]) if r.numel() == 1 else r
        R = self.residual(x, sigma, d_comb)
        return d_comb, expand_like(r, x), R

    def forward(self, x: torch.Tensor, sigma, return_parts: bool = False):
        """``D_boot(x; σ)``; with ``return_parts`` the tuple of `forward_parts` (the residual
        loss calls it this way through a DDP wrapper, so gradients are synchronised)."""
        d_comb, r, R = self.forward_parts(x, sigma)
        if return_parts:
            return d_comb, r, R
        return d_comb + r * R
