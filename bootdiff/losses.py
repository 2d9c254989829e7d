"""Training losses, written against the denoiser ``D(x, sigma)`` (as NVlabs/edm ``loss.py``).

* ``EDMLoss`` — denoising score matching in the EDM form (docs/METHOD.md §2; Karras et al. 2022,
  eq. 2 with the weighting and σ distribution of eq. 8 / Table 1):
      L(x) = λ(σ) · mean_elements (D(x + σn; σ) − x)²,   σ ~ p_train(σ),  n ~ N(0, I).
* With ``augment`` = p > 0 (``train.augment``) the clean batch is first augmented, non-leaking
  (`bootdiff.augment`; EDM Appendix F.2), and D gets the augmentation labels:
  ``D(aug(x) + σn; σ, labels)`` against ``aug(x)``.
* The pieces every loss shares: ``noisy_batch`` (draw σ, then noise), ``per_sample_mean``,
  ``check_weighting``. The residual loss of stage 2 is `bootdiff.residual.ResidualLoss`
  (METHOD §4); ``CoordLoss`` is EDMLoss for a position-aware denoiser ``D(x, σ, pos)``.

Losses are callables ``loss(model, x, generator) -> [N]`` (per-sample loss, mean over elements),
the signature `bootdiff.train.train` expects. Random draws per call: σ ``[N]`` first
(`bootdiff.schedules.sample_training_sigma`), then the noise ``n`` (shape of x), both from
``generator`` (`bootdiff.util.randn`: on the generator's device, then moved to x's device). After
each call the sampled noise levels are exposed as ``loss.last_sigma`` (``[N]``, detached, on x's
device), so the training loop can report the loss per σ band.
"""

from __future__ import annotations

from typing import Optional

import torch

from bootdiff.augment import augment as augment_batch
from bootdiff.schedules import WEIGHTINGS, sample_training_sigma, weighting
from bootdiff.util import broadcast_sigma, randn


def noisy_batch(x: torch.Tensor, loss_cfg, generator, lo: float = 0.0):
    """σ ``[N]`` and ``x_σ = x + σ·n`` for one batch (σ drawn first, then n; METHOD §2); ``lo`` > 0
    draws σ from p_train truncated to σ ≥ lo (`bootdiff.schedules.sample_training_sigma`)."""
    if not x.is_floating_point():
        raise ValueError(f"loss input must be a floating-point tensor, got {x.dtype}")
    sigma = sample_training_sigma(x.shape[0], loss_cfg, generator, x.device, lo=lo).to(x.dtype)
    noise = randn(x.shape, generator, x.device, x.dtype)
    return sigma, x + broadcast_sigma(sigma, x, column=True) * noise


def check_weighting(kind) -> str:
    """``kind`` (a str or an Enum member of the config) checked against the weightings λ(σ)."""
    kind = str(getattr(kind, "value", kind))
    if kind not in WEIGHTINGS:
        raise ValueError(f"loss.weighting must be one of {WEIGHTINGS}, got {kind!r}")
    return kind


def per_sample_mean(t: torch.Tensor) -> torch.Tensor:
    """``[N, ...] -> [N]``: the mean over a sample's elements (the losses' normalisation, METHOD §2)."""
    return t.flatten(1).mean(dim=1)


class EDMLoss:
    """EDM denoising loss (METHOD §2; Karras et al. 2022, eq. 2 / eq. 8): ``__call__(D, x,
    generator) -> [N]``.

    ``loss_cfg`` is a `bootdiff.config.LossConfig` (σ distribution and weighting);
    ``weighting`` overrides ``loss_cfg.weighting`` when given; ``augment`` > 0: non-leaking
    augmentation with that probability (module docstring; D must take ``augment_labels``).
    Sets ``self.last_sigma``.
    """

    def __init__(self, loss_cfg, sigma_data: float, weighting: Optional[str] = None, augment: float = 0.0):
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.loss_cfg = loss_cfg
        self.sigma_data = float(sigma_data)
        self.weighting = check_weighting(weighting or loss_cfg.weighting)
        self.augment = float(augment)
        self.last_sigma: Optional[torch.Tensor] = None

    def __call__(self, D, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        extra = {}
        if self.augment > 0:
            x, extra["augment_labels"] = augment_batch(x, self.augment, generator)
        sigma, x_noisy = noisy_batch(x, self.loss_cfg, generator)
        self.last_sigma = sigma.detach()
        lam = weighting(sigma, self.sigma_data, self.weighting)
        return lam * per_sample_mean((D(x_noisy, sigma, **extra) - x) ** 2)


class CoordLoss:
    """``loss(D, (x, pos), generator) -> [N]``: the EDM loss (eq. 2) of a micro-batch of crops at
    ``pos`` (or whole images, ``pos`` of zeros at full size), σ ~ p_train, for a position-aware
    denoiser ``D(x, σ, pos)`` (`bootdiff.precond.CoordPrecond`)."""

    def __init__(self, loss_cfg, sigma_data: float):
        self.loss_cfg, self.sigma_data = loss_cfg, float(sigma_data)
        self.weighting = check_weighting(loss_cfg.weighting)
        self.last_sigma: Optional[torch.Tensor] = None

    def __call__(self, D, batch, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        x, pos = batch
        sigma, x_noisy = noisy_batch(x, self.loss_cfg, generator)
        self.last_sigma = sigma.detach()
        lam = weighting(sigma, self.sigma_data, self.weighting)
        return lam * per_sample_mean((D(x_noisy, sigma, pos) - x) ** 2)
