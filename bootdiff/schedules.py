"""Noise levels: the training σ distribution, loss weightings, and sampling schedules.

Training (EDM, Karras et al. 2022, Table 1 / eq. 8):
  * ``lognormal``:  ln σ ~ N(P_mean, P_std²)                       (EDM default)
  * ``loguniform``: ln σ ~ U(ln σ_min, ln σ_max)                   (VE / NCSN++ style)

Loss weightings λ(σ) (the factor in front of ‖D(x+σn; σ) − x‖²):
  * ``edm``:     λ = (σ² + σ_data²) / (σ·σ_data)²  — unit effective weight at every σ (EDM eq. 8);
                 together with the log-normal density it gives the "bell-shaped" *total*
                 weighting λ(σ)·p(σ) recommended in "How well does diffusion model generate?".
  * ``snr``:     λ = 1 / σ²  — ε-prediction-like (‖ε̂ − ε‖², Ho et al. 2020 / Song et al. 2021).
  * ``uniform``: λ = 1.

Sampling schedules (σ_0 = σ_max > σ_1 > … > σ_{n−1} = σ_min, then σ_n = 0 appended):
  * ``edm_sigmas``:    σ_i = (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ  (Karras eq. 5)
  * ``ve_sigmas``:     σ_i = σ_max·(σ_min/σ_max)^{i/(n−1)}  — exponential / geometric
                       (the VE SDE of Song et al. 2021, σ(t) = σ_min(σ_max/σ_min)^t)
  * ``linear_sigmas``: σ_i = σ_max + i/(n−1)·(σ_min − σ_max)
Schedules are computed in float64 and returned as float32 tensors of length ``n + 1``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from bootdiff.util import randn

SIGMA_DISTS = ("lognormal", "loguniform")
WEIGHTINGS = ("edm", "snr", "uniform")
SCHEDULES = ("edm", "ve", "linear")


def _rand(n: int, generator: Optional[torch.Generator], device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64).to(device)


def sample_training_sigma(n: int, loss_cfg, generator: Optional[torch.Generator] = None,
                          device=None, lo: float = 0.0, hi: float = math.inf) -> torch.Tensor:
    """``n`` training noise levels ``[n]`` (float32) from ``loss_cfg.sigma_dist``.

    ``lognormal``: σ = exp(P_mean + P_std·ξ), ξ ~ N(0,1) (EDM, Table 1).
    ``loguniform``: σ = exp(U(ln sigma_min, ln sigma_max)).

    With ``lo > 0`` or ``hi < ∞`` the same distribution truncated to ``lo ≤ σ ≤ hi`` (inverse
    CDF of the truncated law: one uniform draw per σ), the σ gate of Ambient Diffusion Omni
    (`bootdiff.peers.ambient`); without bounds the draws are exactly the untruncated ones.
    """
    kind = loss_cfg.sigma_dist
    if not (0 <= lo < hi):
        raise ValueError(f"σ gate: need 0 <= lo < hi, got lo={lo}, hi={hi}")
    gated = lo > 0 or math.isfinite(hi)
    if kind == "lognormal":
        if not loss_cfg.P_std > 0:
            raise ValueError(f"loss.P_std must be > 0, got {loss_cfg.P_std}")
        if gated:
            def cdf(s):
                if s <= 0:
                    return 0.0
                if math.isinf(s):
                    return 1.0
                return 0.5 * math.erfc(-(math.log(s) - loss_cfg.P_mean) / (loss_cfg.P_std * math.sqrt(2)))
            a, b = cdf(lo), cdf(hi)
            u = (a + (b - a) * _rand(n, generator, device)).clamp(1e-12, 1 - 1e-12)
            xi = torch.special.ndtri(u)
        else:
            xi = randn((n,), generator, device, torch.float64)
        sigma = torch.exp(loss_cfg.P_mean + loss_cfg.P_std * xi)
    elif kind == "loguniform":
        _check_range("loss", loss_cfg.sigma_min, loss_cfg.sigma_max)
        lo_, hi_ = max(loss_cfg.sigma_min, lo), min(loss_cfg.sigma_max, hi)
        if not lo_ < hi_:
            raise ValueError(f"σ gate [{lo}, {hi}] lies outside loss.sigma_min..sigma_max "
                             f"[{loss_cfg.sigma_min}, {loss_cfg.sigma_max}]")
        a, b = math.log(lo_), math.log(hi_)
        sigma = torch.exp(a + (b - a) * _rand(n, generator, device))
    else:
        raise ValueError(f"loss.sigma_dist must be one of {SIGMA_DISTS}, got {kind!r}")
    if gated:  # float rounding at the edges: the gate is a hard rule
        sigma = sigma.clamp(min=lo, max=hi)
    return sigma.to(torch.float32)


def weighting(sigma, sigma_data: float, kind: str = "edm"):
    """Loss weight λ(σ) (same shape as ``sigma``): ``edm`` (EDM eq. 8), ``snr`` (1/σ²), ``uniform``."""
    if not sigma_data > 0:
        raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
    sigma = torch.as_tensor(sigma)
    if not sigma.is_floating_point():
        sigma = sigma.to(torch.float32)
    if kind == "edm":
        return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    if kind == "snr":
        return 1.0 / sigma ** 2
    if kind == "uniform":
        return torch.ones_like(sigma)
    raise ValueError(f"loss weighting must be one of {WEIGHTINGS}, got {kind!r}")


def _check_range(where: str, sigma_min: float, sigma_max: float) -> None:
    if not (0 < sigma_min < sigma_max):
        raise ValueError(f"{where}: need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, "
                         f"sigma_max={sigma_max}")


def _finish(sigmas: torch.Tensor, device) -> torch.Tensor:
    out = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]).to(torch.float32)
    return out.to(device) if device is not None else out


def _steps(n: int, where: str) -> torch.Tensor:
    if int(n) != n or n < 1:
        raise ValueError(f"{where}: number of steps must be a positive integer, got {n}")
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    return torch.arange(n, dtype=torch.float64) / (n - 1)


def edm_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
               device=None) -> torch.Tensor:
    """EDM polynomial time discretisation (Karras et al. 2022, eq. 5), ``[n + 1]`` with σ_n = 0."""
    _check_range("edm_sigmas", sigma_min, sigma_max)
    if not rho > 0:
        raise ValueError(f"edm_sigmas: rho must be > 0, got {rho}")
    t = _steps(n, "edm_sigmas")
    a, b = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return _finish((a + t * (b - a)) ** rho, device)


def ve_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
              device=None) -> torch.Tensor:
    """Exponential (geometric) schedule of the VE SDE (Song et al. 2021), ``[n + 1]`` with σ_n = 0."""
    _check_range("ve_sigmas", sigma_min, sigma_max)
    t = _steps(n, "ve_sigmas")
    return _finish(sigma_max * (sigma_min / sigma_max) ** t, device)


def linear_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                  device=None) -> torch.Tensor:
    """Uniformly spaced σ from σ_max to σ_min, ``[n + 1]`` with σ_n = 0."""
    _check_range("linear_sigmas", sigma_min, sigma_max)
    t = _steps(n, "linear_sigmas")
    return _finish(sigma_max + t * (sigma_min - sigma_max), device)


def make_schedule(sampler_cfg, device=None) -> torch.Tensor:
    """The sampling schedule ``[steps + 1]`` named by ``sampler_cfg.schedule``."""
    kind, n = sampler_cfg.schedule, sampler_cfg.steps
    lo, hi = sampler_cfg.sigma_min, sampler_cfg.sigma_max
    if kind == "edm":
        return edm_sigmas(n, lo, hi, sampler_cfg.rho, device=device)
    if kind == "ve":
        return ve_sigmas(n, lo, hi, device=device)
    if kind == "linear":
        return linear_sigmas(n, lo, hi, device=device)
    raise ValueError(f"sampler.schedule must be one of {SCHEDULES}, got {kind!r}")
