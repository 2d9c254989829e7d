"""An experiment's pieces, built from its config and data manifest.

This is the one place that turns an ``ExperimentConfig`` into models, losses and data streams, and
a finished run's checkpoint back into its trained model, so the Ray jobs (`ray_jobs/`), the
data-efficiency benchmark (`bootdiff.efficiency`) and the tests run the same code. Where a run's
files live (data, models, sweep, report) is `bootdiff.run.layout.RunLayout`.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Iterator, Optional, Sequence, Tuple

import torch

from bootdiff import util
from bootdiff.config import ResidualConfig, ViewConfig
from bootdiff.run.layout import RunLayout

# ----------------------------------------------------------------------------- data


def read_manifest(cfg) -> dict:
    from bootdiff.data.shards import read_manifest as _read

    return _read(RunLayout.of(cfg).data)


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


def run_split(cfg, run: str) -> Tuple[ViewConfig, str]:
    """(view config, data split) of a view-model run: a view's name, or ``"full_res"`` — the
    full-resolution baseline, trained with ``cfg.full_res`` on the scarce ``full`` split — or
    ``"distill"``: the student (`bootdiff.distill`; ``cfg.distill`` has the run's ``train`` and
    ``scaling``), at the ``full`` split's shape — or a peer's name (``"ambient"``,
    ``"finetune"``, ``"patchdiff"``, `bootdiff.peers`): a full-res network trained with ``cfg.full_res``."""
    if run in ("full_res", "ambient", "finetune", "patchdiff"):
        return cfg.full_res, "full"
    if run == "distill":
        return cfg.distill, "full"
    if run not in cfg.views:
        raise KeyError(f"views.{run}: no such view (views: {sorted(cfg.views)})")
    return cfg.views[run], run


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


# Micro-batches per rank in one epoch of a training stream: bounds the fast-forward on resume.
EPOCH_BATCHES = 1000


def train_data(cfg, manifest: dict, view: str, tcfg, rank: int, world_size: int,
               epoch_batches: int = EPOCH_BATCHES, with_meta: bool = False) -> Callable[[int], Iterator[torch.Tensor]]:
    """``data(start_step) -> iterator`` for `bootdiff.train.train`, positioned exactly: it yields
    what ``data(0)`` yields from micro-batch ``start_step · tcfg.accum_steps`` on.

    This rank's stream is a sequence of epochs of ``epoch_batches`` micro-batches; epoch ``e`` is
    the shard loader's resampled stream (`bootdiff.data.loader`, train mode) with seed
    ``tcfg.seed · 1000003`` at epoch ``e``, so its order depends on (seed, e, rank, loader worker)
    alone. ``data(k)`` opens epoch ``k·accum // epoch_batches`` and skips the micro-batches of it
    already consumed — reading at most one epoch, never the run so far. The DataLoader of
    ``tcfg.num_workers > 0`` draws its workers' base seed from torch's global RNG; that draw is
    kept off the training's RNG (`bootdiff.train` restores that RNG from the checkpoint).
    ``with_meta`` yields ``(x, metas)``, each sample's JSON metadata beside it (e.g. a patch's
    recorded ``location``)."""
    from bootdiff.data.loader import make_loader, view_urls

    if epoch_batches < 1:
        raise ValueError(f"train_data: epoch_batches must be positive, got {epoch_batches}")

    def data(start_step: int) -> Iterator[torch.Tensor]:
        loader = make_loader(view_urls(manifest, view), tcfg.batch_size, mode="train",
                             seed=tcfg.seed * 1_000_003, rank=rank, world_size=world_size,
                             num_workers=tcfg.num_workers,
                             epoch_samples=epoch_batches * world_size * tcfg.batch_size, with_meta=with_meta)
        loader.epoch, skip = divmod(start_step * tcfg.accum_steps, epoch_batches)
        while True:
            batches = iter(loader)  # the next epoch
            with torch.random.fork_rng(devices=[]):
                first = next(batches)  # starts the DataLoader, if any
            yield from itertools.islice(itertools.chain([first], batches), skip, None)
            skip = 0

    return data


def mixed_train_data(cfg, manifest: dict, tcfg, groups: Sequence[Tuple[str, int]], rank: int = 0,
                     world_size: int = 1) -> Callable[[int], Iterator[tuple]]:
    """``data(start_step) -> iterator`` of micro-batches that are tuples, one tensor per
    ``(split, rows)`` of ``groups`` (a mixed batch: `bootdiff.peers.ambient`, the residual's σ-gated
    low-res rows): each group its own `train_data` stream of ``rows`` per micro-batch, positioned
    exactly, so a resumed run continues the same streams. A group of zero rows yields an empty
    tensor of its split's sample shape."""
    import dataclasses

    parts = [train_data(cfg, manifest, split, dataclasses.replace(tcfg, batch_size=n), rank, world_size)
             if n > 0 else view_sample_shape(manifest, split) for split, n in groups]

    def data(start_step: int):
        streams = [iter(p(start_step)) if callable(p) else None for p in parts]
        while True:
            yield tuple(next(s) if s is not None else torch.zeros((0, *p)) for s, p in zip(streams, parts))

    return data


def load_all(cfg, manifest: dict, split: str, max_samples: int) -> torch.Tensor:
    """Up to ``max_samples`` samples of a split as one tensor (for evaluation and references)."""
    parts = list(stream(cfg, manifest, split, batch_size=min(256, max_samples), mode="eval",
                        max_samples=max_samples))
    if not parts:
        raise ValueError(f"split '{split}' of {RunLayout.of(cfg).data} is empty")
    return torch.cat(parts)


# ----------------------------------------------------------------------------- models


def _is_video(shape: Sequence[int]) -> bool:
    return len(shape) == 4


def view_sample_shape(manifest: dict, view: str) -> Tuple[int, ...]:
    return tuple(view_info(manifest, view)["shape"])


def build_view_denoiser(vcfg: ViewConfig, shape: Sequence[int], sigma_data: float,
                        image_size: Optional[Sequence[int]] = None):
    """EDM-preconditioned backbone for samples of ``shape`` ((C,H,W) or (C,T,H,W)); with
    ``vcfg.coords`` a position-aware one (`bootdiff.precond.CoordPrecond`: two more input
    channels, where the patch lies in an image of ``image_size``, the full-res (H, W))."""
    from bootdiff.augment import net_augment_dim
    from bootdiff.nets import make_net
    from bootdiff.precond import CoordPrecond, EDMPrecond

    coords = bool(getattr(vcfg, "coords", False))
    net = make_net(vcfg.net, in_channels=shape[0] + (2 if coords else 0), out_channels=shape[0],
                   resolution=shape[-1], video=_is_video(shape), seed=vcfg.train.seed,
                   augment_dim=net_augment_dim(vcfg.train.augment))
    if not coords:
        return EDMPrecond(net, sigma_data=sigma_data)
    if image_size is None:
        raise ValueError("build_view_denoiser: a position-aware view (coords: true) needs the full image's size")
    return CoordPrecond(net, sigma_data, image_size)


def view_denoiser(manifest: dict, view: str, vcfg: ViewConfig):
    """`build_view_denoiser` for split ``view`` of a run: its shape and σ_data from the manifest,
    the full-res image size for a position-aware view."""
    info = view_info(manifest, view)
    return build_view_denoiser(vcfg, info["shape"], float(info["sigma_data"]), full_shape(manifest)[-2:])


def positioned(data: Callable[[int], Iterator[tuple]]) -> Callable[[int], Iterator[tuple]]:
    """``(x, metas)`` micro-batches (`train_data(..., with_meta=True)`) as ``(x, pos)``: each
    sample's recorded ``location`` (row, col), what a position-aware denoiser trains on."""
    def out(start_step: int):
        for x, metas in data(start_step):
            try:
                pos = torch.tensor([[int(v) for v in m["location"]] for m in metas], dtype=torch.long)
            except (KeyError, TypeError):
                raise ValueError("a position-aware view (coords: true) needs each sample's recorded "
                                 "'location' in its shards; ingest again with this bootdiff") from None
            yield x, pos

    return out


def view_training(cfg, manifest: dict, view: str, vcfg: ViewConfig, rank: int = 0, world_size: int = 1):
    """(model, loss_fn, data) of a view model's training run (stage 1), or of the full-res
    baseline when ``view == "full"``. A position-aware patch view (``coords``) trains on
    ``(x, pos)`` batches, each patch at the location ingest recorded (`bootdiff.losses.CoordLoss`)."""
    from bootdiff.losses import CoordLoss, EDMLoss

    model = view_denoiser(manifest, view, vcfg)
    sigma_data = float(model.sigma_data)
    if getattr(vcfg, "coords", False):
        data = train_data(cfg, manifest, view, vcfg.train, rank, world_size, with_meta=True)
        return model, CoordLoss(vcfg.train.loss, sigma_data), positioned(data)
    return model, EDMLoss(vcfg.train.loss, sigma_data, augment=vcfg.train.augment), \
        train_data(cfg, manifest, view, vcfg.train, rank, world_size)


def load_view_models(cfg, manifest: dict, names: Optional[Sequence[str]] = None):
    """The exported stage-1 view models as `ViewModel`s, with views set up for full samples."""
    from bootdiff.export import load_view_model
    from bootdiff.fusion import ViewModel
    from bootdiff.views import make_view

    shape = full_shape(manifest)
    out = []
    for name in names if names is not None else list(cfg.views):
        vcfg = cfg.views[name]
        denoiser, _ = load_view_model(RunLayout.of(cfg).model(name))
        out.append(ViewModel(name, make_view(vcfg, shape), denoiser))
    return out


def build_combined(cfg, manifest: dict, names: Optional[Sequence[str]] = None, fusion: Optional[str] = None):
    """Stage-1 output: the fixed linear fusion of the frozen view models (docs/METHOD.md §3)."""
    from bootdiff.fusion import CombinedDenoiser

    combined = CombinedDenoiser(load_view_models(cfg, manifest, names), fusion=fusion or cfg.residual.fusion)
    return combined.eval()


def _fusion_grid(rcfg: ResidualConfig) -> list:
    """The σ grid of the fitted fusion weights: ``residual.fusion_sigmas`` log-spaced levels over
    the residual's training σ range (docs/METHOD.md §3)."""
    from bootdiff.fusion import fusion_sigma_grid

    lcfg = rcfg.train.loss
    return fusion_sigma_grid(lcfg.sigma_min, lcfg.sigma_max, rcfg.fusion_sigmas)


def build_bootstrap(cfg, manifest: dict, rcfg: ResidualConfig, combined=None):
    """Stage 2, ``D_boot = D_comb + r(σ)·R_θ(x_σ, D_comb, σ)`` (docs/METHOD.md §4), built from the
    config and the exported view models alone — no training data is read.

    Its fitted constants are placeholders of the right shape: `FusionWeights` of all ones on the
    ``residual.fusion_sigmas``-point grid when ``residual.fit_fusion_weights`` (else none), and a
    `RangeAdapter` ≡ 1 on its 100 bins over the training σ range (METHOD §5). `fit_bootstrap`
    fills them when a run starts fresh; a checkpoint (`ema_model`, a resumed `train`) or an
    export (`bootdiff.export.load_bootstrap_model`) restores them otherwise.
    """
    from bootdiff.augment import net_augment_dim
    from bootdiff.fusion import FusionWeights
    from bootdiff.nets import make_net, zero_output
    from bootdiff.residual import BootstrapDenoiser, RangeAdapter, ResidualPrecond

    combined = combined if combined is not None else build_combined(cfg, manifest, fusion=rcfg.fusion)
    if rcfg.fit_fusion_weights:
        combined.weights = FusionWeights(_fusion_grid(rcfg), combined.num_components)
    lcfg = rcfg.train.loss
    adapter = RangeAdapter.ones(math.log(lcfg.sigma_min), math.log(lcfg.sigma_max))
    shape = full_shape(manifest)
    net = make_net(rcfg.net, in_channels=2 * shape[0], out_channels=shape[0], resolution=shape[-1],
                   video=_is_video(shape), seed=rcfg.train.seed,
                   augment_dim=net_augment_dim(rcfg.train.augment))
    if rcfg.zero_init:  # R_θ ≡ 0 at the start: D_boot starts as D_comb (a loaded model's weights replace it)
        zero_output(net)
    sigma_data = float(view_info(manifest, "full")["sigma_data"])
    return BootstrapDenoiser(combined, ResidualPrecond(net, sigma_data=sigma_data), adapter)


def fit_bootstrap(cfg, manifest: dict, model, rcfg: ResidualConfig):
    """Fit the stage-2 constants of a model from `build_bootstrap` (same ``rcfg``), in place, on
    the scarce full-resolution training set: the fusion weights when ``residual.fit_fusion_weights``
    (METHOD §3), then r(σ) — the RMS of x − D_comb per bin — when ``residual.range_adapter``
    (METHOD §5); noise from a generator seeded with ``residual.train.seed``
    (`bootdiff.residual.fit_constants`). Reads no data when there is nothing to fit.

    r(σ) is a deterministic function of D_comb (after step 1), the training split, the seed and the
    bins, and costs 100 bins × 64 samples of D_comb: it is fitted once per run and kept in the
    run's ``eval_cache`` (``range-<key>.pt``) under a key of exactly those, so the other trials of
    a sweep read the same values instead of fitting them again."""
    import hashlib
    import io
    import json

    from bootdiff.memo import fingerprint
    from bootdiff.residual import check_placeholders, fit_constants

    if not (rcfg.fit_fusion_weights or rcfg.range_adapter):
        return model
    grid = _fusion_grid(rcfg) if rcfg.fit_fusion_weights else None
    check_placeholders(model, grid, rcfg.range_adapter)  # before reading any data
    info = view_info(manifest, "full")
    full = load_all(cfg, manifest, "full", max_samples=max(1, info["count"])).to(util.module_device(model))
    gen = torch.Generator().manual_seed(rcfg.train.seed)
    if grid is not None:  # step 1 changes D_comb, so it comes first
        fit_constants(model, lambda: iter(full.split(64)), gen, fusion_grid=grid, range_adapter=False)
    if not rcfg.range_adapter:
        return model
    a = model.range_adapter
    key = hashlib.sha1(json.dumps([fingerprint(model.combined), info.get("shards"), info["count"], rcfg.train.seed,
                                   hashlib.sha1(gen.get_state().numpy().tobytes()).hexdigest(), float(a.log_sigma_min), float(a.log_sigma_max),
                                   a.num_bins], default=str).encode()).hexdigest()[:20]
    url = util.join(RunLayout.of(cfg).eval_cache, f"range-{key}.pt")
    if util.exists(url):
        a.values.copy_(torch.load(io.BytesIO(util.read_bytes(url))))
        return model
    fit_constants(model, lambda: iter(full.split(64)), gen, range_adapter=True)
    buf = io.BytesIO()
    torch.save(a.values.detach().cpu().clone(), buf)
    util.atomic_write_bytes(url, buf.getvalue())
    return model


def residual_training(cfg, manifest: dict, rcfg: ResidualConfig, rank: int = 0, world_size: int = 1,
                      run_dir: Optional[str] = None, resume_from: Optional[str] = None, device=None):
    """(model, loss_fn, data) of one residual run (a sweep trial; docs/METHOD.md §4).

    ``device``: where the run trains; the model is moved there before the stage-2 constants are
    fitted, so that fit (100 bins of D_comb over the scarce set) runs on the run's GPU.

    ``run_dir`` / ``resume_from``: what the run's `bootdiff.train.train` call gets. The stage-2
    constants are fitted (`fit_bootstrap`) only when that run starts fresh; when it resumes (from
    ``resume_from`` or the latest checkpoint in ``run_dir``) they come from the checkpoint, which
    `train` loads into the model, buffers included.
    """
    from bootdiff.checkpoint import latest_checkpoint

    model = build_bootstrap(cfg, manifest, rcfg)
    if device is not None:
        model.to(device)
    if not (resume_from or latest_checkpoint(run_dir)):
        fit_bootstrap(cfg, manifest, model, rcfg)
    loss, groups = residual_loss(cfg, manifest, rcfg)
    if len(groups) == 1:
        return model, loss, train_data(cfg, manifest, "full", rcfg.train, rank, world_size)
    return model, loss, mixed_train_data(cfg, manifest, rcfg.train, groups, rank, world_size)


def residual_loss(cfg, manifest: dict, rcfg: ResidualConfig):
    """(`bootdiff.residual.ResidualLoss` of ``rcfg``, the ``(split, rows)`` groups of its
    micro-batch): ``[("full", batch_size)]``, plus ``(low view, round(low_ratio · batch_size))``
    when ``residual.low_ratio`` > 0 — the low-res view's samples lifted by the view's own Aᵀ/c
    and trained only at σ ≥ ``residual.sigma_tn`` (σ-gated partial data in stage 2)."""
    from bootdiff.residual import ResidualLoss

    info = view_info(manifest, "full")
    sigma_data = float(info["sigma_data"])
    groups = [("full", rcfg.train.batch_size)]
    lift = None
    n_low = int(round(rcfg.low_ratio * rcfg.train.batch_size))
    if n_low > 0:
        from bootdiff.config.peer_views import pick_view
        from bootdiff.views import make_view

        low = pick_view(cfg, "downsample", rcfg.low_view, key="residual.low_view")
        lift = make_view(cfg.views[low], info["shape"], name=low).lift
        groups.append((low, n_low))
    loss = ResidualLoss(rcfg.train.loss, sigma_data, mu_var=rcfg.mu_var, mu_l1=rcfg.mu_l1,
                        l1_decay=rcfg.l1_decay, lift=lift, sigma_tn=rcfg.sigma_tn, augment=rcfg.train.augment)
    return loss, groups


# ----------------------------------------------------------------------------- trained runs and trials


def g_sigma_data(manifest: dict) -> float:
    """σ_data of G's weighting λ(σ) (docs/METHOD.md §6): the manifest's ``g_sigma_data`` when it
    states one (a benchmark fixes it for all its datasets), else its ``full`` split's σ_data."""
    fixed = manifest.get("g_sigma_data")
    if fixed is not None:
        if not float(fixed) > 0:
            raise ValueError(f"manifest at {manifest.get('root')}: g_sigma_data must be positive, got {fixed!r}")
        return float(fixed)
    return float(view_info(manifest, "full")["sigma_data"])


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


def load_run(cfg, manifest: dict, run: str, checkpoint: str):
    """(EMA model, checkpoint state) of a view-model run (a view, or ``"full_res"``) from one of
    its checkpoints (a URL, or a path as Ray reports it)."""
    from bootdiff.checkpoint import load_checkpoint

    vcfg, split = run_split(cfg, run)
    model = view_denoiser(manifest, split, vcfg)
    state = load_checkpoint(RunLayout.of(cfg).url(checkpoint))
    return ema_model(model, state), state


def load_trial(cfg, manifest: dict, row: dict):
    """The trained model of a sweep trial (a ``sweep.json`` row with a checkpoint), EMA weights.

    A residual trial's model is built without fitting anything and takes its fitted constants
    (fusion weights, r(σ)) from the checkpoint, so loading never re-estimates them. A peer
    trial's model: `bootdiff.peers.load_peer`."""
    if row["kind"] == "full_res":
        return load_run(cfg, manifest, "full_res", row["checkpoint"])[0]
    from bootdiff.checkpoint import load_checkpoint
    from bootdiff.sweep import trial_residual_config

    state = load_checkpoint(RunLayout.of(cfg).url(row["checkpoint"]))
    model = build_bootstrap(cfg, manifest, trial_residual_config(cfg, row))
    return ema_model(model, state)


def export_result(cfg, view: str, checkpoint_path: str) -> str:
    """Export a view run's checkpoint (EMA weights) to ``models/<view>`` in diffusers format."""
    from bootdiff.export import save_view_model

    manifest = read_manifest(cfg)
    vcfg, split = run_split(cfg, view)
    model, state = load_run(cfg, manifest, view, checkpoint_path)
    url = RunLayout.of(cfg).model(view)
    save_view_model(model, url, vcfg, extra={"shape": list(view_sample_shape(manifest, split)),
                                             "step": state.get("step"), "kimg": state.get("kimg"),
                                             "checkpoint": checkpoint_path})
    return url
