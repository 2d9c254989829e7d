"""An experiment's pieces, built from its config and data manifest.

This is the one place that turns an ``ExperimentConfig`` into models, losses and data streams, so
the single-process quickstart (`bootdiff.quickstart`) and the Ray jobs (`ray_jobs/`) run the
same code. Storage layout under ``{storage}/{name}/``::

    data/                 WebDataset shards per view + manifest.json      (ingest)
    views/view-<v>/       Ray Train runs of stage 1 (checkpoints)         (train_views)
    models/<v>/           exported view models, diffusers format         (train_views)
    models/full_res/      exported full-resolution baseline               (sweep baseline)
    sweep/                Ray Tune experiment of stage 2 + sweep.json     (sweep_residual)
    sweep/report/         report.html, report.md, trials.csv              (evaluate)
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Sequence, Tuple

import torch

from bootdiff import util
from bootdiff.config import ResidualConfig, ViewConfig, to_yaml

# ----------------------------------------------------------------------------- storage layout


def root(cfg) -> str:
    return util.join(cfg.storage, cfg.name)


def data_root(cfg) -> str:
    return util.join(root(cfg), "data")


def model_url(cfg, view: str) -> str:
    return util.join(root(cfg), "models", view)


def sweep_root(cfg) -> str:
    return util.join(root(cfg), "sweep")


def report_root(cfg) -> str:
    return util.join(sweep_root(cfg), "report")


# ----------------------------------------------------------------------------- data


def read_manifest(cfg) -> dict:
    from bootdiff.data.shards import read_manifest as _read

    return _read(data_root(cfg))


def view_info(manifest: dict, view: str) -> dict:
    """Manifest entry of a view or split (``shape``, ``sigma_data``, ``count``, ``shards``)."""
    splits = manifest["splits"]
    if view not in splits:
        raise KeyError(f"data manifest at {manifest.get('root')} has no view/split '{view}' "
                       f"(it has: {sorted(splits)})")
    return splits[view]


def full_shape(manifest: dict) -> Tuple[int, ...]:
    """Shape of one full-resolution sample: (C, H, W) or (C, T, H, W)."""
    return tuple(view_info(manifest, "full")["shape"])


def stream(cfg, manifest: dict, view: str, batch_size: int, mode: str = "train", seed: int = 0,
           rank: int = 0, world_size: int = 1, num_workers: int = 0,
           max_samples: Optional[int] = None) -> Iterator[torch.Tensor]:
    """Batches of a view's (or split's) shards: infinite in "train" mode, exactly once in "eval"."""
    from bootdiff.data.loader import make_loader, view_urls

    loader = make_loader(view_urls(manifest, view), batch_size, mode=mode,
                         seed=seed, rank=rank, world_size=world_size, num_workers=num_workers)
    seen = 0
    for batch in loader:
        if max_samples is not None:
            if seen >= max_samples:
                return
            batch = batch[: max_samples - seen]
        seen += batch.shape[0]
        yield batch


def train_data(cfg, manifest: dict, view: str, tcfg, rank: int, world_size: int) -> Callable[[int], Iterator[torch.Tensor]]:
    """``data(start_step) -> iterator`` for `bootdiff.train.train`: a resampled stream whose seed
    depends on the step it starts from, so a resumed run sees fresh (and reproducible) batches."""

    def data(start_step: int) -> Iterator[torch.Tensor]:
        seed = tcfg.seed * 1_000_003 + start_step
        return stream(cfg, manifest, view, tcfg.batch_size, mode="train", seed=seed, rank=rank,
                      world_size=world_size, num_workers=tcfg.num_workers)

    return data


def load_all(cfg, manifest: dict, split: str, max_samples: int) -> torch.Tensor:
    """Up to ``max_samples`` samples of a split as one tensor (for evaluation and references)."""
    parts = list(stream(cfg, manifest, split, batch_size=min(256, max_samples), mode="eval",
                        max_samples=max_samples))
    if not parts:
        raise ValueError(f"split '{split}' of {data_root(cfg)} is empty")
    return torch.cat(parts)


# ----------------------------------------------------------------------------- models


def _is_video(shape: Sequence[int]) -> bool:
    return len(shape) == 4


def view_sample_shape(manifest: dict, view: str) -> Tuple[int, ...]:
    return tuple(view_info(manifest, view)["shape"])


def build_view_denoiser(vcfg: ViewConfig, shape: Sequence[int], sigma_data: float):
    """EDM-preconditioned backbone for samples of ``shape`` ((C,H,W) or (C,T,H,W))."""
    from bootdiff.nets import make_net
    from bootdiff.precond import EDMPrecond

    net = make_net(vcfg.net, in_channels=shape[0], out_channels=shape[0], resolution=shape[-1],
                   video=_is_video(shape))
    return EDMPrecond(net, sigma_data=sigma_data)


def view_training(cfg, manifest: dict, view: str, vcfg: ViewConfig, rank: int = 0, world_size: int = 1):
    """(model, loss_fn, data) of a view model's training run (stage 1), or of the full-res
    baseline when ``view == "full"``."""
    from bootdiff.losses import EDMLoss

    info = view_info(manifest, view)
    sigma_data = float(info["sigma_data"])
    model = build_view_denoiser(vcfg, info["shape"], sigma_data)
    loss = EDMLoss(vcfg.train.loss, sigma_data)
    return model, loss, train_data(cfg, manifest, view, vcfg.train, rank, world_size)


def load_view_models(cfg, manifest: dict, names: Optional[Sequence[str]] = None):
    """The exported stage-1 view models as `ViewModel`s, with views set up for full samples."""
    from bootdiff.bootstrap import ViewModel
    from bootdiff.export import load_view_model
    from bootdiff.views import make_view

    shape = full_shape(manifest)
    out = []
    for name in names if names is not None else list(cfg.views):
        vcfg = cfg.views[name]
        denoiser, _ = load_view_model(model_url(cfg, name))
        out.append(ViewModel(name, make_view(vcfg, shape), denoiser))
    return out


def build_combined(cfg, manifest: dict, names: Optional[Sequence[str]] = None, fusion: Optional[str] = None):
    """Stage-1 output: the fixed linear fusion of the frozen view models (DESIGN.md §1)."""
    from bootdiff.bootstrap import CombinedDenoiser

    combined = CombinedDenoiser(load_view_models(cfg, manifest, names), fusion=fusion or cfg.residual.fusion)
    return combined.eval()


def build_bootstrap(cfg, manifest: dict, rcfg: ResidualConfig, combined=None):
    """Stage 2: ``D_boot = D_comb + r(σ)·R_θ(x_σ, D_comb, σ)`` and its residual loss.

    The range adapter r(σ) is measured on the scarce full-resolution training set (RMS of
    x − D_comb) when ``rcfg.range_adapter`` is on, else fixed to 1.
    """
    from bootdiff.bootstrap import BootstrapDenoiser
    from bootdiff.fusion import fit_fusion_weights
    from bootdiff.losses import ResidualLoss
    from bootdiff.nets import make_net
    from bootdiff.precond import RangeAdapter, ResidualPrecond, estimate_range_adapter

    combined = combined if combined is not None else build_combined(cfg, manifest)
    shape = full_shape(manifest)
    info = view_info(manifest, "full")
    sigma_data = float(info["sigma_data"])
    lcfg = rcfg.train.loss
    full = load_all(cfg, manifest, "full", max_samples=max(1, info["count"]))
    gen = torch.Generator().manual_seed(rcfg.train.seed)
    batches = lambda: iter(full.split(64))  # noqa: E731
    if rcfg.fit_fusion_weights:
        import numpy as np

        grid = np.exp(np.linspace(math.log(lcfg.sigma_min), math.log(lcfg.sigma_max), 16)).tolist()
        combined.weights = fit_fusion_weights(combined.components, batches(), grid, generator=gen)
    if rcfg.range_adapter:
        adapter = estimate_range_adapter(combined, batches(), lcfg.sigma_min, lcfg.sigma_max, generator=gen)
    else:
        adapter = RangeAdapter.ones(math.log(lcfg.sigma_min), math.log(lcfg.sigma_max))
    net = make_net(rcfg.net, in_channels=2 * shape[0], out_channels=shape[0], resolution=shape[-1],
                   video=_is_video(shape))
    model = BootstrapDenoiser(combined, ResidualPrecond(net, sigma_data=sigma_data), adapter)
    loss = ResidualLoss(lcfg, sigma_data, mu_var=rcfg.mu_var, mu_l1=rcfg.mu_l1, l1_decay=rcfg.l1_decay)
    return model, loss


def residual_training(cfg, manifest: dict, rcfg: ResidualConfig, rank: int = 0, world_size: int = 1):
    """(model, loss_fn, data) of one residual run (a sweep trial)."""
    model, loss = build_bootstrap(cfg, manifest, rcfg)
    return model, loss, train_data(cfg, manifest, "full", rcfg.train, rank, world_size)


def trial_residual_config(cfg, trial: dict) -> ResidualConfig:
    """The residual config of a sweep trial: cfg.residual with the trial's μ_var, μ_L1, r(σ)."""
    from omegaconf import OmegaConf

    rcfg = OmegaConf.to_object(OmegaConf.structured(cfg.residual)) if not isinstance(cfg.residual, ResidualConfig) else cfg.residual
    import copy

    rcfg = copy.deepcopy(rcfg)
    rcfg.mu_var = float(trial.get("mu_var", rcfg.mu_var))
    rcfg.mu_l1 = float(trial.get("mu_l1", rcfg.mu_l1))
    rcfg.range_adapter = bool(trial.get("range_adapter", rcfg.range_adapter))
    return rcfg


# ----------------------------------------------------------------------------- evaluation


def generalization(cfg, manifest: dict, D, split: str = "test", max_samples: Optional[int] = None) -> dict:
    """G per σ and in total (DESIGN.md §1) of denoiser ``D`` on a full-resolution split."""
    from bootdiff.evaluate import generalization_error, sigma_grid

    ecfg = cfg.eval
    n = max_samples or ecfg.max_samples
    sigma_data = float(view_info(manifest, "full")["sigma_data"])
    batches = stream(cfg, manifest, split, batch_size=ecfg.batch_size, mode="eval", max_samples=n)
    with torch.no_grad():
        return generalization_error(D, batches, sigma_grid(ecfg), sigma_data, seed=ecfg.seed, delta=ecfg.delta)


def ema_model(model, state: dict):
    """Load the EMA weights of a `bootdiff.train` checkpoint state into ``model`` (eval mode)."""
    weights = state.get("ema") or state["model"]
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise KeyError(f"checkpoint has weights the model lacks: {unexpected[:5]}")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if trainable & set(missing):
        raise KeyError(f"checkpoint lacks trainable weights: {sorted(trainable & set(missing))[:5]}")
    return model.eval()


def config_yaml(cfg) -> str:
    return to_yaml(cfg)

