"""Training losses, written against the denoiser ``D(x, sigma)`` (as NVlabs/edm ``loss.py``).

* ``EDMLoss`` — denoising score matching in the EDM form (Karras et al. 2022, eq. 2 with the
  weighting and σ distribution of eq. 8 / Table 1):
      L(x) = λ(σ) · mean_elements (D(x + σn; σ) − x)²,   σ ~ p_train(σ),  n ~ N(0, I).
* ``ResidualLoss`` — stage 2 of bootstrapping diffusion: the residual denoiser on top of the frozen
  combined denoiser, D_boot = D_comb + r(σ)·R_θ, with the paper's variance penalty (its eq. 7,
  weight μ_var) and the ℓ1 sparsity penalty of "Regularization can make diffusion models more
  efficient" (weight μ_L1, optionally decreasing with the noise level):
      L = λ(σ)‖D_boot − x‖²/dim + μ_var·λ(σ)‖r(σ)R_θ‖²/dim + μ_L1·w(σ)‖R_θ‖₁/dim,
      w(σ) = 1 (``l1_decay="none"``) or min(1, σ_data/σ) (``"inverse_sigma"``).

Both are callables ``loss(model, x, generator) -> [N]`` (per-sample loss, mean over elements),
the signature `bootdiff.train.train` expects. Random draws per call: σ ``[N]`` first
(`bootdiff.schedules.sample_training_sigma`), then the noise ``n`` (shape of x), both from
``generator`` (on the generator's device, then moved to x's device). After each call the
sampled noise levels are exposed as ``loss.last_sigma`` (``[N]``, detached, on x's device), so the
training loop can report the loss per σ band.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from bootdiff.schedules import WEIGHTINGS, randn, sample_training_sigma, weighting
from bootdiff.util import expand_like

L1_DECAYS = ("none", "inverse_sigma")


def _noisy(x: torch.Tensor, loss_cfg, generator):
    """σ ``[N]`` and x_σ = x + σ·n for one batch (σ drawn first, then n)."""
    if not x.is_floating_point():
        raise ValueError(f"loss input must be a floating-point tensor, got {x.dtype}")
    sigma = sample_training_sigma(x.shape[0], loss_cfg, generator, x.device).to(x.dtype)
    noise = randn(x.shape, generator, x.device, x.dtype)
    return sigma, x + expand_like(sigma, x) * noise


def _check_weighting(kind: str) -> str:
    if kind not in WEIGHTINGS:
        raise ValueError(f"loss.weighting must be one of {WEIGHTINGS}, got {kind!r}")
    return kind


def _per_sample_mean(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).mean(dim=1)


def _parts_fn(model):
    """``(x, sigma) -> (d_comb, r, R)`` of a `BootstrapDenoiser`, also when DDP-wrapped.

    A wrapper (``.module``) must be called through its own ``forward`` or DDP never syncs the
    gradients, so a wrapped model is called as ``model(x, sigma, return_parts=True)``, which the
    inner module's ``forward`` has to accept."""
    if hasattr(model, "forward_parts"):
        return model.forward_parts
    inner = getattr(model, "module", None)
    if inner is not None and hasattr(inner, "forward_parts"):
        if "return_parts" not in inspect.signature(inner.forward).parameters:
            raise TypeError(f"ResidualLoss: wrapped model {type(inner).__name__} needs "
                            "forward(x, sigma, return_parts=False) to return (d_comb, r, R) through "
                            "the DDP wrapper")
        return lambda x, sigma: model(x, sigma, return_parts=True)
    raise TypeError(f"ResidualLoss needs a model with forward_parts(x, sigma) -> (d_comb, r, R), "
                    f"got {type(model).__name__}")


class EDMLoss:
    """EDM denoising loss (Karras et al. 2022, eq. 2 / eq. 8); ``__call__(D, x, generator) -> [N]``.

    ``loss_cfg`` is a `bootdiff.config.LossConfig` (σ distribution and weighting);
    ``weighting`` overrides ``loss_cfg.weighting`` when given. Sets ``self.last_sigma``.
    """

    def __init__(self, loss_cfg, sigma_data: float, weighting: Optional[str] = None):
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.loss_cfg = loss_cfg
        self.sigma_data = float(sigma_data)
        self.weighting = _check_weighting(weighting or loss_cfg.weighting)
        self.last_sigma: Optional[torch.Tensor] = None

    def __call__(self, D, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        sigma, x_noisy = _noisy(x, self.loss_cfg, generator)
        self.last_sigma = sigma.detach()
        lam = weighting(sigma, self.sigma_data, self.weighting)
        return lam * _per_sample_mean((D(x_noisy, sigma) - x) ** 2)


class ResidualLoss:
    """Residual-denoiser loss of bootstrapping diffusion (variance penalty: the paper's eq. 7).

    ``__call__(model, x, generator) -> [N]`` where ``model`` is a `BootstrapDenoiser` (or anything
    with ``forward_parts(x, sigma) -> (d_comb, r, R)``; a DDP-wrapped one is called as
    ``model(x, sigma, return_parts=True)``). ``d_comb`` and ``r`` are treated as constants (detached): gradients reach only
    the residual network R_θ. ``r`` may be ``[N]`` (one value per sample) or broadcastable to x.
    Sets ``self.last_sigma`` and ``self.last_terms`` (per-sample ``mse``, ``var``, ``l1``, detached).
    """

    def __init__(self, loss_cfg, sigma_data: float, mu_var: float = 0.0, mu_l1: float = 0.0,
                 l1_decay: str = "none", weighting: Optional[str] = None):
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        if mu_var < 0 or mu_l1 < 0:
            raise ValueError(f"residual.mu_var and residual.mu_l1 must be >= 0, got {mu_var}, {mu_l1}")
        if l1_decay not in L1_DECAYS:
            raise ValueError(f"residual.l1_decay must be one of {L1_DECAYS}, got {l1_decay!r}")
        self.loss_cfg = loss_cfg
        self.sigma_data = float(sigma_data)
        self.mu_var = float(mu_var)
        self.mu_l1 = float(mu_l1)
        self.l1_decay = l1_decay
        self.weighting = _check_weighting(weighting or loss_cfg.weighting)
        self.last_sigma: Optional[torch.Tensor] = None
        self.last_terms: dict = {}

    def l1_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """w(σ): 1, or min(1, σ_data/σ) — the ℓ1 penalty decreasing with the noise level."""
        if self.l1_decay == "inverse_sigma":
            return (self.sigma_data / sigma).clamp(max=1.0)
        return torch.ones_like(sigma)

    def __call__(self, model, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        parts = _parts_fn(model)
        sigma, x_noisy = _noisy(x, self.loss_cfg, generator)
        self.last_sigma = sigma.detach()
        d_comb, r, R = parts(x_noisy, sigma)
        d_comb = d_comb.detach()
        r = torch.as_tensor(r, dtype=x.dtype, device=x.device).detach()
        if r.ndim <= 1:
            r = expand_like(r, x)
        rR = r * R
        lam = weighting(sigma, self.sigma_data, self.weighting)
        mse = lam * _per_sample_mean((d_comb + rR - x) ** 2)
        var = lam * _per_sample_mean(rR ** 2)
        l1 = self.l1_weight(sigma) * _per_sample_mean(R.abs())
        self.last_terms = {"mse": mse.detach(), "var": var.detach(), "l1": l1.detach()}
        return mse + self.mu_var * var + self.mu_l1 * l1
