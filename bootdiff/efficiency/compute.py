"""Equal compute for the data-efficiency benchmark's peers: training FLOPs per optimizer step of
each model, counted by `torch.utils.flop_counter.FlopCounterMode` on one real step (forward and
backward of its loss on a micro-batch of its own shapes), so that a peer is given the training
compute the bootstrap used — every view model plus the residual — and not the same kimg.

The residual's step is its real loss on the bootstrapped denoiser: its own network's forward and
backward and the frozen combined denoiser's forward (every view network on its view of the
batch: `bootdiff.fusion`), which the residual pays at every step. Weights do not change FLOPs, so freshly built networks of each
configured size are counted (no trained model is needed before the benchmark starts).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.utils.flop_counter import FlopCounterMode


def step_flops(model, loss_fn, batch, extra=None) -> float:
    """FLOPs of one training micro-batch: ``loss_fn(model, batch, gen).mean().backward()``, plus
    ``extra()`` (a forward that the step also runs, without gradients) when given."""
    gen = torch.Generator().manual_seed(0)
    with FlopCounterMode(display=False) as counter:
        loss_fn(model, batch, gen).mean().backward()
        if extra is not None:
            with torch.no_grad():
                extra()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _rand(shape, n):
    return torch.rand((n, *shape)) * 2 - 1


def view_step_flops(cfg, manifest: dict, view: str, vcfg) -> float:
    """A view model's (or, with ``view="full"``, the full-res baseline's) FLOPs per optimizer step."""
    from bootdiff import experiment
    from bootdiff.losses import CoordLoss, EDMLoss

    info = experiment.view_info(manifest, view)
    model = experiment.view_denoiser(manifest, view, vcfg)
    x = _rand(info["shape"], vcfg.train.batch_size)
    if getattr(vcfg, "coords", False):  # a position-aware patch view: (x, pos) batches
        loss, batch = CoordLoss(vcfg.train.loss, float(info["sigma_data"])), (x, torch.zeros((x.shape[0], 2), dtype=torch.long))
    else:
        loss, batch = EDMLoss(vcfg.train.loss, float(info["sigma_data"])), x
    return step_flops(model, loss, batch) * vcfg.train.accum_steps


def residual_step_flops(cfg, manifest: dict) -> float:
    """The residual's FLOPs per optimizer step: `bootdiff.residual.ResidualLoss` on the
    bootstrapped denoiser (`bootdiff.experiment.build_bootstrap`), whose frozen D_comb runs every
    view network on its view of the micro-batch, forward only."""
    from bootdiff import experiment
    from bootdiff.fusion import CombinedDenoiser, ViewModel
    from bootdiff.views import make_view

    shape = experiment.full_shape(manifest)
    rcfg = cfg.residual
    views = []
    for name, vcfg in cfg.views.items():
        denoiser = experiment.view_denoiser(manifest, name, vcfg)
        views.append(ViewModel(name, make_view(vcfg, shape, name=name), denoiser.eval().requires_grad_(False)))
    combined = CombinedDenoiser(views, fusion=rcfg.fusion).eval()
    model = experiment.build_bootstrap(cfg, manifest, rcfg, combined=combined)
    # the sweep's costliest setting, so a peer is never given less than the bootstrap used
    costliest = dataclasses.replace(rcfg, mu_var=max(cfg.sweep.mu_var, default=rcfg.mu_var),
                                    mu_l1=max(cfg.sweep.mu_l1, default=rcfg.mu_l1))
    loss, groups = experiment.residual_loss(cfg, manifest, costliest)  # with residual.low_ratio's lifted rows
    batch = tuple(_rand(experiment.view_sample_shape(manifest, split), n) for split, n in groups)
    return step_flops(model, loss, batch[0] if len(batch) == 1 else batch) * rcfg.train.accum_steps


def peer_step_flops(cfg, manifest: dict, name: str) -> float:
    """A peer's FLOPs per optimizer step (`bootdiff.peers`), on a micro-batch of its own shapes:
    ``ambient``'s three groups; ``patchdiff``'s in expectation over its micro-batch kinds (whole
    images, patches, crops, by their shares); ``finetune``'s full-size batch (pre-training and fine-tuning steps
    cost alike; the lift of its low-res batches is data loading, a few FLOPs per pixel, not counted)."""
    from bootdiff import experiment
    from bootdiff.peers import peer_training

    model, loss, _ = peer_training(cfg, manifest, name)
    tcfg = cfg.full_res.train
    if name == "ambient":
        from bootdiff.config.peer_views import pick_view
        from bootdiff.peers.ambient import group_sizes

        acfg = cfg.peers.ambient
        low, crop = pick_view(cfg, "downsample", acfg.low_view), pick_view(cfg, "patch", acfg.crop_view)
        n_full, n_low, n_crop = group_sizes(acfg, tcfg.batch_size)
        batch = (_rand(experiment.full_shape(manifest), n_full), _rand(experiment.view_sample_shape(manifest, low), n_low),
                 _rand(experiment.view_sample_shape(manifest, crop), n_crop))
    elif name == "patchdiff":  # in expectation over its micro-batch kinds
        import torch

        from bootdiff.peers.patchdiff import crop_sizes, expected_step_flops
        from bootdiff.config.peer_views import pick_view

        p = cfg.peers.patchdiff
        shape = experiment.full_shape(manifest)
        view = pick_view(cfg, "patch", p.patch_view, key="peers.patchdiff.patch_view")
        n, zeros = tcfg.batch_size, torch.zeros((tcfg.batch_size, 2), dtype=torch.long)
        kind = {"full": step_flops(model, loss, (_rand(shape, n), zeros)),
                "patch": step_flops(model, loss, (_rand(experiment.view_sample_shape(manifest, view), n), zeros))}
        sizes = crop_sizes(p, tuple(shape[-2:]))
        kind["crop"] = sum(step_flops(model, loss, (_rand((shape[0], s, s), n), zeros)) for s in sizes) / len(sizes)
        return expected_step_flops(kind, p) * tcfg.accum_steps
    else:
        batch = _rand(experiment.full_shape(manifest), tcfg.batch_size)
    return step_flops(model, loss, batch) * tcfg.accum_steps


def steps(kimg: float, batch_size: int, accum_steps: int = 1) -> int:
    """Optimizer steps of a run of ``kimg`` (`bootdiff.train.total_steps`, one rank)."""
    from bootdiff.train import total_steps

    return total_steps(kimg, batch_size, accum_steps)


def bootstrap_flops(cfg, manifest: dict, b: dict) -> dict:
    """Training FLOPs of the bootstrap at the benchmark's budgets ``b``: each view model's
    (``view_kimg``) and the residual's (``residual_kimg``), and their total."""
    out = {}
    for name, vcfg in cfg.views.items():
        out[f"view-{name}"] = steps(b["view_kimg"], vcfg.train.batch_size, vcfg.train.accum_steps) * \
            view_step_flops(cfg, manifest, name, vcfg)
    rt = cfg.residual.train
    out["residual"] = steps(b["residual_kimg"], rt.batch_size, rt.accum_steps) * residual_step_flops(cfg, manifest)
    out["total"] = sum(out.values())
    return out


def equal_compute_kimg(total_flops: float, flops_per_step: float, batch_size: int, accum_steps: int = 1) -> float:
    """The kimg of a run whose optimizer steps (``flops_per_step`` each) add up to ``total_flops``
    (rounded down to whole steps: a peer never gets more compute than the bootstrap)."""
    n = math.floor(total_flops / flops_per_step)
    return n * batch_size * accum_steps / 1000
