"""Pre-train and fine-tune, the practitioner's default use of low-resolution data: one
full-resolution denoiser pre-trained on the low-res view's samples lifted to full resolution
(``A⁺y = Aᵀy/c``, the view's own `lift`: the blurred copies, at every σ), then fine-tuned on the
scarce full-res images — the plain EDM loss (docs/METHOD.md §2) throughout, one optimizer, one
EMA, one run.

The first ``round(pretrain_share · S)`` of the run's S optimizer steps (or ``pretrain_kimg``,
`bootdiff.config.grid.fix_finetune_schedule`) see lifted low-res batches, the rest the full-res images. Both streams are `bootdiff.experiment.train_data`
streams positioned by step, so a resumed run continues exactly (the switch is a function of the
step alone). The network and its training are ``full_res``'s; its preconditioning uses the
full-res σ_data, as the fine-tuned model must.
"""

from __future__ import annotations

from typing import Optional

import torch


def pretrain_steps(fcfg, tcfg, world_size: int = 1) -> int:
    """Optimizer steps of the pre-training phase: ``peers.finetune.pretrain_kimg`` when set (> 0),
    else ``round(pretrain_share · S)`` of the run's S steps (`bootdiff.train.total_steps`)."""
    share = fcfg.pretrain_share
    if not 0 <= share < 1:
        raise ValueError(f"peers.finetune.pretrain_share={share}: must be in [0, 1) (some fine-tuning)")
    from bootdiff.train import total_steps

    if fcfg.pretrain_kimg > 0:
        return total_steps(fcfg.pretrain_kimg, tcfg.batch_size, tcfg.accum_steps, world_size)
    return int(round(share * total_steps(tcfg.total_kimg, tcfg.batch_size, tcfg.accum_steps, world_size)))


def finetune_data(cfg, manifest: dict, tcfg, low_view: str, lift, rank: int = 0, world_size: int = 1):
    """``data(start_step) -> iterator`` of micro-batches: the low view's batches lifted to full
    resolution for the first `pretrain_steps` steps, then the ``full`` split's."""
    from bootdiff import experiment

    switch = pretrain_steps(cfg.peers.finetune, tcfg, world_size)
    low = experiment.train_data(cfg, manifest, low_view, tcfg, rank, world_size)
    full = experiment.train_data(cfg, manifest, "full", tcfg, rank, world_size)

    def data(start_step: int):
        if start_step < switch:
            stream = iter(low(start_step))
            for _ in range((switch - start_step) * tcfg.accum_steps):
                with torch.no_grad():  # (not around the yield: grad mode is global while suspended)
                    lifted = lift(next(stream))
                yield lifted
        yield from full(max(0, start_step - switch))

    return data


def finetune_training(cfg, manifest: dict, rank: int = 0, world_size: int = 1, low_view: Optional[str] = None):
    """(model, loss_fn, data) of the pre-train-and-fine-tune peer, as
    `bootdiff.experiment.view_training` gives a view's: the full-res baseline's network and
    training (``full_res.net``, ``full_res.train``) on `finetune_data`."""
    from bootdiff import experiment
    from bootdiff.losses import EDMLoss
    from bootdiff.config.peer_views import pick_view
    from bootdiff.views import make_view

    fcfg = cfg.peers.finetune
    low = low_view or pick_view(cfg, "downsample", fcfg.low_view, key="peers.finetune.low_view")
    info = experiment.view_info(manifest, "full")
    sigma_data = float(info["sigma_data"])
    model = experiment.build_view_denoiser(cfg.full_res, info["shape"], sigma_data)
    view = make_view(cfg.views[low], info["shape"], name=low)
    loss = EDMLoss(cfg.full_res.train.loss, sigma_data, augment=cfg.full_res.train.augment)  # pre-training rows too
    return model, loss, finetune_data(cfg, manifest, cfg.full_res.train, low, view.lift, rank, world_size)
