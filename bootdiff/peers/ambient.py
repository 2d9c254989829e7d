"""Ambient Diffusion Omni (Daras et al. 2025, "Training Good Models with Bad Data"): one
full-resolution denoiser trained on the scarce full-res images and on the partial data, each
kind of sample only at the noise levels where what it lacks is drowned.

The EDM loss (docs/METHOD.md §2) on three groups of one micro-batch:

* the full-res images ``x``, σ ~ p_train (every σ);
* the low-res view's samples ``y`` lifted to full resolution, ``A⁺y = Aᵀy/c`` (the view's own
  `lift`), σ ~ p_train truncated to σ ≥ σ_tn: at high noise a blurred copy and a sharp image are
  indistinguishable after noising, so the lifted copy teaches the coarse structure without its
  blur;
* the patch view's crops, at their own size (the U-Net is convolutional), σ ~ p_train truncated
  to σ ≤ σ_crop: at low noise the optimal denoiser is local, so a crop is as good as a whole
  image there.

Truncation is `bootdiff.schedules.sample_training_sigma` with ``lo``/``hi``. Every group is
weighted per sample by λ(σ) with the full-res σ_data (one network, one preconditioning).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from bootdiff.augment import augment
from bootdiff.losses import check_weighting, per_sample_mean
from bootdiff.schedules import sample_training_sigma, weighting
from bootdiff.util import broadcast_sigma, randn


class AmbientLoss:
    """``loss(D, (x_full, y_low, x_crop), generator) -> [N_full + N_low + N_crop]``: the
    σ-gated EDM loss above. ``lift`` maps a low-res batch to full resolution (the low view's
    `lift`); an empty group (zero rows) is skipped. After each call ``last_sigma`` holds every
    row's σ and ``last_groups`` the group of each row (0 full, 1 lifted low-res, 2 crop).
    ``augment`` > 0 (``full_res.train.augment``): the full-res rows are augmented, non-leaking
    (`bootdiff.augment`), as the baseline's are; the partial rows are not."""

    def __init__(self, loss_cfg, sigma_data: float, lift, sigma_tn: float, sigma_crop: float, augment: float = 0.0):
        if not (sigma_data > 0 and sigma_tn > 0 and sigma_crop > 0):
            raise ValueError(f"AmbientLoss: sigma_data, sigma_tn and sigma_crop must be > 0, got "
                             f"{sigma_data}, {sigma_tn}, {sigma_crop}")
        self.loss_cfg, self.sigma_data, self.lift = loss_cfg, float(sigma_data), lift
        self.gates = ((0.0, math.inf), (float(sigma_tn), math.inf), (0.0, float(sigma_crop)))
        self.weighting = check_weighting(loss_cfg.weighting)
        self.augment = float(augment)
        self.last_sigma: Optional[torch.Tensor] = None
        self.last_groups: Optional[torch.Tensor] = None

    def __call__(self, D, batch, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        full, low, crops = batch
        groups = (full, self.lift(low) if low.shape[0] else low, crops)
        losses, sigmas, ids = [], [], []
        for g, (x, (lo, hi)) in enumerate(zip(groups, self.gates)):
            if x.shape[0] == 0:
                continue
            extra = {}
            if g == 0 and self.augment > 0:
                x, extra["augment_labels"] = augment(x, self.augment, generator)
            sigma = sample_training_sigma(x.shape[0], self.loss_cfg, generator, x.device, lo=lo, hi=hi).to(x.dtype)
            x_noisy = x + broadcast_sigma(sigma, x, column=True) * randn(x.shape, generator, x.device, x.dtype)
            lam = weighting(sigma, self.sigma_data, self.weighting)
            losses.append(lam * per_sample_mean((D(x_noisy, sigma, **extra) - x) ** 2))
            sigmas.append(sigma.detach())
            ids.append(torch.full((x.shape[0],), g, device=x.device))
        self.last_sigma, self.last_groups = torch.cat(sigmas), torch.cat(ids)
        return torch.cat(losses)


def group_sizes(acfg, batch_size: int):
    """(full-res rows, lifted low-res rows, crops) of one micro-batch: ``batch_size`` full-size
    rows of which ``low_share`` are lifted low-res samples, plus ``crop_ratio · batch_size`` crops."""
    if not 0 <= acfg.low_share < 1:
        raise ValueError(f"peers.ambient.low_share={acfg.low_share}: must be in [0, 1) (some full-res rows)")
    if acfg.crop_ratio < 0:
        raise ValueError(f"peers.ambient.crop_ratio={acfg.crop_ratio}: must be >= 0")
    n_low = int(round(acfg.low_share * batch_size))
    return batch_size - n_low, n_low, int(round(acfg.crop_ratio * batch_size))


def ambient_data(cfg, manifest: dict, tcfg, low_view: str, crop_view: str, rank: int = 0, world_size: int = 1):
    """``data(start_step) -> iterator`` of ``(full, low, crops)`` micro-batches for
    `bootdiff.train.train` (`bootdiff.experiment.mixed_train_data`: the ``full`` split, the low
    view's and the patch view's shards, each positioned exactly)."""
    from bootdiff import experiment

    sizes = group_sizes(cfg.peers.ambient, tcfg.batch_size)
    return experiment.mixed_train_data(cfg, manifest, tcfg, list(zip(("full", low_view, crop_view), sizes)),
                                       rank, world_size)


def ambient_training(cfg, manifest: dict, rank: int = 0, world_size: int = 1):
    """(model, loss_fn, data) of the Ambient-Omni peer, as `bootdiff.experiment.view_training`
    gives a view's: the full-res baseline's network (``full_res.net``, ``full_res.train``) on the
    σ-gated mix of the full-res images, the lifted low-res view and the patch view's crops."""
    from bootdiff import experiment
    from bootdiff.config.peer_views import pick_view
    from bootdiff.views import make_view

    acfg = cfg.peers.ambient
    low, crop = pick_view(cfg, "downsample", acfg.low_view), pick_view(cfg, "patch", acfg.crop_view)
    info = experiment.view_info(manifest, "full")
    sigma_data = float(info["sigma_data"])
    model = experiment.build_view_denoiser(cfg.full_res, info["shape"], sigma_data)
    view = make_view(cfg.views[low], info["shape"], name=low)
    loss = AmbientLoss(cfg.full_res.train.loss, sigma_data, view.lift, acfg.sigma_tn, acfg.sigma_crop,
                       augment=cfg.full_res.train.augment)
    return model, loss, ambient_data(cfg, manifest, cfg.full_res.train, low, crop, rank, world_size)
