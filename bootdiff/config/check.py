"""The cross-field rules of an `ExperimentConfig`, checked at load (`bootdiff.config.load_config`
calls `check`), so a mistake fails before any work, naming the key, its value and the file or
"command line" it came from. The choice fields are already checked by their types (`Choice`).

What needs the data itself is checked where the data is opened: whether ``num_full + num_test``
(+ ``num_partial``) fit in the source (`bootdiff.data.ingest.split_indices`, when ingest plans its
shards, before it writes one), whether the VAE folder holds a VAE, whether images decode.
Here only what the config alone decides: ``source.limit`` / ``num_videos`` bound the split sizes.

View geometry (patch size ≤ resolution, factor divides it, clip length ≤ frames, …) is each view
class's own rule (`bootdiff.views.check_view_config`), applied to the sample shape the config
implies: ``(C, H, W)`` for images, ``(C, T, H, W)`` for video sources, latent sizes with a VAE.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, List, Optional, Sequence, Tuple

from bootdiff.config.choices import PEER_NAMES, VIDEO_SOURCES, Fusion, NetKind, SourceKind, ViewKind
from bootdiff.config.peer_views import PEER_NEEDS, peers_available
from bootdiff.config.schema import ConfigError, ExperimentConfig, to_object

NEEDS_PATH = (SourceKind.images, SourceKind.tar, SourceKind.idx, SourceKind.video, SourceKind.frames)
MASK_KINDS = (SourceKind.images, SourceKind.tar)
NAME = re.compile(r"^[^/\\\s]+$")  # view and experiment names become URL path parts
RAY_POLL_S = 2.0  # Ray Train's controller collects reports this often (docs/RAY.md §3)


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


class _Problems:
    """Collects ``(key, "key=value: why")``; `raise_if_any` names where each key was set."""

    def __init__(self):
        self.items: List[Tuple[str, str]] = []

    def bad(self, key: str, value: Any, why: str) -> None:
        self.items.append((key, f"{key}={_show(value)}: {why}"))

    def at_least(self, key: str, value: Any, low: float, why: str = "") -> None:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low):
            self.bad(key, value, why or f"must be a finite number >= {low:g}")

    def positive(self, key: str, value: Any, why: str = "") -> None:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            self.bad(key, value, why or "must be a finite number > 0")

    def raise_if_any(self, origin: str, overrides: Sequence[str]) -> None:
        if not self.items:
            return
        keys = [o.split("=", 1)[0].strip() for o in overrides]

        def where(key: str) -> str:
            return ("command line" if any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in keys)
                    else origin)

        lines = [f"{where(k)}: {msg}" for k, msg in self.items]
        more = f" (and {len(lines) - 1} more problem(s) below)" if len(lines) > 1 else ""
        raise ConfigError(lines[0] + more + "".join("\n  " + line for line in lines[1:]))


def _latent_shape(cfg: ExperimentConfig) -> Optional[Tuple[int, int]]:
    """(latent channels, downsampling factor) from the VAE folder's ``config.json``; None when it
    cannot be read here (ingest opens the VAE and fails there, naming the folder)."""
    from bootdiff.util import url_fs

    lat = cfg.data.latent
    try:
        fs, path = url_fs(str(lat.vae_path).rstrip("/") + "/config.json")
        with fs.open(path, "r") as f:
            vae = json.load(f)
        return int(vae["latent_channels"]), 2 ** (len(vae["block_out_channels"]) - 1)
    except Exception:
        return None


def _sample_shape(cfg: ExperimentConfig, p: _Problems) -> Optional[Tuple[int, ...]]:
    """The full-resolution sample shape views apply to: (C, H, W) or (C, T, H, W)."""
    d = cfg.data
    c, h = int(d.channels), int(d.resolution)
    if d.latent.enabled:
        lat = _latent_shape(cfg)
        if lat is None:
            return None
        c, f = lat
        if h % f:
            p.bad("data.resolution", h, f"not divisible by the VAE's downsampling factor {f}")
            return None
        h //= f
    if d.source.kind in VIDEO_SOURCES:
        return (c, int(d.source.num_frames), h, h)
    return (c, h, h)


def _check_train(p: _Problems, key: str, t) -> None:
    p.positive(f"{key}.total_kimg", t.total_kimg, "the training budget must be a finite number > 0")
    for k in ("batch_size", "accum_steps", "keep_checkpoints"):
        p.at_least(f"{key}.{k}", getattr(t, k), 1, "must be an integer >= 1")
    p.positive(f"{key}.lr", t.lr)
    for k, why in (("warmup_kimg", ""), ("weight_decay", ""), ("grad_clip", "(0 disables clipping)"),
                   ("ema_halflife_kimg", ""), ("ema_rampup_ratio", ""),
                   ("checkpoint_every_kimg", "(0: one checkpoint, at the end)"),
                   ("report_every", "(0: report at checkpoints only)"), ("num_workers", ""),
                   ("patience", "(checkpoints without a lower held-out G before stopping; 0: never)")):
        p.at_least(f"{key}.{k}", getattr(t, k), 0, f"must be a finite number >= 0 {why}".strip())
    p.at_least(f"{key}.report_every_s", t.report_every_s, RAY_POLL_S,
               f"must be >= {RAY_POLL_S:g} s, Ray Train's poll interval: a report sooner after the previous "
               "one blocks training (docs/RAY.md §3)")
    betas = list(t.betas)
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        p.bad(f"{key}.betas", betas, "must be two numbers in [0, 1)")
    loss = t.loss
    p.positive(f"{key}.loss.P_std", loss.P_std)
    p.positive(f"{key}.loss.sigma_min", loss.sigma_min)
    if not loss.sigma_max > loss.sigma_min:
        p.bad(f"{key}.loss.sigma_max", loss.sigma_max, f"must exceed loss.sigma_min={loss.sigma_min}")


def _check_scaling(p: _Problems, key: str, s) -> None:
    p.at_least(f"{key}.num_workers", s.num_workers, 1, "must be an integer >= 1")
    p.at_least(f"{key}.cpus_per_worker", s.cpus_per_worker, 0)
    p.at_least(f"{key}.gpus_per_worker", s.gpus_per_worker, 0)


def _check_data(p: _Problems, cfg: ExperimentConfig) -> None:
    d, src = cfg.data, cfg.data.source
    p.at_least("data.resolution", d.resolution, 1, "must be an integer >= 1")
    if d.channels not in (1, 3):
        p.bad("data.channels", d.channels, "must be 1 (grey) or 3 (RGB)")
    p.at_least("data.num_full", d.num_full, 1, "the scarce full-resolution set needs >= 1 sample")
    p.at_least("data.num_test", d.num_test, 1, "the held-out test set needs >= 1 sample")
    p.at_least("data.num_val", d.num_val, 0, "must be >= 0 (0: no validation split)")
    p.at_least("data.num_partial", d.num_partial, 0, "must be >= 0 (0: all the rest)")
    p.at_least("data.num_view_val", d.num_view_val, 0, "must be >= 0 (0: no held-out view samples)")
    p.at_least("data.shard_size", d.shard_size, 1, "must be an integer >= 1")
    p.at_least("data.source.limit", src.limit, 0, "must be >= 0 (0: the whole source)")
    p.at_least("data.source.num_videos", src.num_videos, 0, "must be >= 0 (0: the default)")
    if src.kind in VIDEO_SOURCES:
        p.at_least("data.source.num_frames", src.num_frames, 1, "videos need >= 1 frame")
    if src.kind in NEEDS_PATH and not str(src.path):
        p.bad("data.source.path", "''", f"required for data.source.kind={src.kind}")
    if str(src.mask_path) and src.kind not in MASK_KINDS:
        p.bad("data.source.mask_path", src.mask_path, f"only read for kind images/tar, not {src.kind}")
    need = (int(d.num_full) + int(d.num_test) + max(int(d.num_val), 0) + max(int(d.num_partial), 0)
            + max(int(d.num_view_val), 0))
    for key, n in (("data.source.limit", src.limit),
                   ("data.source.num_videos", src.num_videos if src.kind == SourceKind.moving_mnist else 0)):
        if n > 0 and need > n:
            p.bad("data.num_full", d.num_full, f"num_full + num_test + num_val + num_partial + num_view_val = {need} "
                  f"samples but {key}={n} keeps only {n}")
    c = d.corruption
    if not 0 <= c.fraction <= 1:
        p.bad("data.corruption.fraction", c.fraction, "must be in [0, 1]")
    if c.enabled and src.kind in VIDEO_SOURCES:
        p.bad("data.corruption.enabled", True, f"corruption stamps images; data.source.kind={src.kind} is video")
    lat = d.latent
    if lat.enabled and not str(lat.vae_path):
        p.bad("data.latent.vae_path", "''", "required with data.latent.enabled (a local AutoencoderKL folder)")
    p.at_least("data.latent.batch_size", lat.batch_size, 1, "must be an integer >= 1")
    if lat.scaling_factor is not None:
        p.positive("data.latent.scaling_factor", lat.scaling_factor)


def _check_views(p: _Problems, cfg: ExperimentConfig) -> None:
    from bootdiff.views import check_view_config

    if not cfg.views:
        p.bad("views", "{}", "no view is defined; the pipeline needs at least one partial view")
    shape = _sample_shape(cfg, p)
    video = cfg.data.source.kind in VIDEO_SOURCES
    for name, v in cfg.views.items():
        key = f"views.{name}"
        if not NAME.match(name):
            p.bad(key, name, "a view name must not hold '/', '\\' or spaces (it names folders)")
        if shape is not None:
            try:
                check_view_config(name, v, shape)
            except ValueError as exc:
                msg = str(exc)
                head = msg.split("=", 1)[0].split(":", 1)[0]
                p.items.append((head if head.startswith(key) else key, msg))
        if v.net.kind == NetKind.unet2d and video:
            p.bad(f"{key}.net.kind", v.net.kind, "unet2d cannot model videos; use video or auto")
        if v.coords and (v.kind != ViewKind.patch or video):
            p.bad(f"{key}.coords", True, f"position-aware denoisers are for patch views of images (this view: {v.kind}"
                  f"{', video data' if video else ''})")
        _check_train(p, f"{key}.train", v.train)
        _check_augment(p, f"{key}.train.augment", v.train.augment, VIDEO_NO if video else COORDS_NO if v.coords else "")
        _check_scaling(p, f"{key}.scaling", v.scaling)
        if int(v.train.patience) > 0 and int(cfg.data.num_view_val) < 1:
            p.bad(f"{key}.train.patience", v.train.patience, "a view is early-stopped on its held-out samples: "
                  "set data.num_view_val >= 1 (partial-pool samples kept out of the views' training)")
        if int(v.train.patience) > 0 and v.coords:
            p.bad(f"{key}.train.patience", v.train.patience, "early stopping of a position-aware view (coords) "
                  "is not supported yet: its held-out G would need each sample's location")
    if cfg.full_res.kind != ViewKind.full:
        p.bad("full_res.kind", cfg.full_res.kind, "the full-resolution baseline's kind must be full")
    if cfg.full_res.net.kind == NetKind.unet2d and video:
        p.bad("full_res.net.kind", cfg.full_res.net.kind, "unet2d cannot model videos; use video or auto")
    _check_train(p, "full_res.train", cfg.full_res.train)
    _check_augment(p, "full_res.train.augment", cfg.full_res.train.augment, VIDEO_NO if video else "")
    _check_scaling(p, "full_res.scaling", cfg.full_res.scaling)


VIDEO_NO = "augmentation is for images; this run's data is video"
COORDS_NO = "augmentation is for whole images: a position-aware view's patches must stay where their location says"


def _check_augment(p: _Problems, key: str, value, refused: str = "") -> None:
    """``train.augment`` (`bootdiff.augment`): a probability; ``refused``: why this model takes none."""
    if not (isinstance(value, (int, float)) and 0 <= value <= 1):
        p.bad(key, value, "the probability of each augmentation must be in [0, 1] (0: off)")
    elif value > 0 and refused:
        p.bad(key, value, refused)


def _check_residual(p: _Problems, cfg: ExperimentConfig) -> None:
    r = cfg.residual
    low = [n for n, v in cfg.views.items() if v.kind == ViewKind.downsample]
    if r.fusion == Fusion.split and (len(low) != 1 or len(cfg.views) < 2):
        p.bad("residual.fusion", r.fusion, f"split needs exactly one downsample view and at least one "
              f"other view; the views are {', '.join(f'{n} ({v.kind})' for n, v in cfg.views.items()) or 'none'}")
    p.at_least("residual.mu_var", r.mu_var, 0)
    p.at_least("residual.mu_l1", r.mu_l1, 0)
    if r.fit_fusion_weights:
        p.at_least("residual.fusion_sigmas", getattr(r, "fusion_sigmas", 1), 1, "must be an integer >= 1")
    if r.net.kind == NetKind.unet2d and cfg.data.source.kind in VIDEO_SOURCES:
        p.bad("residual.net.kind", r.net.kind, "unet2d cannot model videos; use video or auto")
    p.at_least("residual.low_ratio", r.low_ratio, 0)
    if r.low_ratio > 0:  # σ-gated lifted low-res rows in stage 2 (`bootdiff.experiment.residual_loss`)
        if not r.sigma_tn > 0:
            p.bad("residual.sigma_tn", r.sigma_tn, "must be > 0 (a noise level)")
        if r.low_view and (r.low_view not in cfg.views or cfg.views[r.low_view].kind != ViewKind.downsample):
            p.bad("residual.low_view", r.low_view, f"must name a downsample view (the downsample views: {', '.join(low) or 'none'})")
        elif not r.low_view and len(low) != 1:
            p.bad("residual.low_ratio", r.low_ratio, f"needs the low-res view to lift: the config has {len(low)} downsample "
                  f"views ({', '.join(low) or 'none'}); set residual.low_view")
    _check_train(p, "residual.train", r.train)
    _check_augment(p, "residual.train.augment", r.train.augment, VIDEO_NO if cfg.data.source.kind in VIDEO_SOURCES else "")


def _check_sweep(p: _Problems, cfg: ExperimentConfig) -> None:
    s = cfg.sweep
    for k in ("mu_var", "mu_l1", "range_adapter"):
        if not list(getattr(s, k)):
            p.bad(f"sweep.{k}", [], "the sweep needs at least one value")
    for k in ("mu_var", "mu_l1"):
        for i, v in enumerate(getattr(s, k)):
            p.at_least(f"sweep.{k}", v, 0, f"entry {i} = {v}: must be a finite number >= 0")
    p.at_least("sweep.num_samples", s.num_samples, 1, "must be an integer >= 1")
    p.at_least("sweep.asha.grace_period", s.asha.grace_period, 1, "must be an integer >= 1")
    p.at_least("sweep.asha.reduction_factor", s.asha.reduction_factor, 2, "must be an integer >= 2")
    p.at_least("sweep.trial_cpus", s.trial_cpus, 0)
    p.at_least("sweep.trial_gpus", s.trial_gpus, 0)
    p.at_least("sweep.max_concurrent", s.max_concurrent, 0, "must be >= 0 (0: as resources allow)")
    for k, v in s.trial_resources.items():
        p.at_least(f"sweep.trial_resources.{k}", v, 0)
    if any(not 0 < float(w) < 1 for w in s.ensemble):
        p.bad("sweep.ensemble", list(s.ensemble), "each weight of the bootstrapped model must be in (0, 1)")
    settings = {(str(a), str(b), bool(c)) for a in s.mu_var for b in s.mu_l1 for c in s.range_adapter}
    if len(settings) > 1 and int(cfg.data.num_val) < 1:
        p.bad("data.num_val", cfg.data.num_val, f"the sweep chooses among {len(settings)} residual settings on a "
              "held-out validation split, never on the test split: set data.num_val >= 1")


def _check_eval(p: _Problems, cfg: ExperimentConfig) -> None:
    e, s = cfg.eval, cfg.eval.sampler
    for key, lo, hi in (("eval", e.sigma_min, e.sigma_max), ("eval.sampler", s.sigma_min, s.sigma_max)):
        p.positive(f"{key}.sigma_min", lo)
        if not (isinstance(hi, (int, float)) and math.isfinite(hi) and hi > lo):
            p.bad(f"{key}.sigma_max", hi, f"must be finite and exceed {key}.sigma_min={lo}")
    p.at_least("eval.num_sigma", e.num_sigma, 1, "must be an integer >= 1")
    if not 0 < e.delta < 1:
        p.bad("eval.delta", e.delta, "the (1-δ) quantile needs 0 < delta < 1")
    p.at_least("eval.max_samples", e.max_samples, 1, "must be an integer >= 1")
    p.at_least("eval.batch_size", e.batch_size, 1, "must be an integer >= 1")
    p.at_least("eval.num_images", e.num_images, 0, "must be an integer >= 0")
    p.at_least("eval.num_cpus", e.num_cpus, 0)
    p.at_least("eval.sampler.steps", s.steps, 1, "must be an integer >= 1")
    p.positive("eval.sampler.rho", s.rho)
    p.at_least("eval.sampler.S_churn", s.S_churn, 0)
    p.at_least("eval.sampler.S_min", s.S_min, 0)
    if not s.S_max >= s.S_min:
        p.bad("eval.sampler.S_max", s.S_max, f"must be >= eval.sampler.S_min={s.S_min}")
    p.positive("eval.sampler.S_noise", s.S_noise)
    p.positive("eval.sampler.snr", s.snr)
    p.at_least("eval.sampler.n_corrector", s.n_corrector, 0, "must be an integer >= 0")
    _check_features(p, e.features)
    if e.benchmark:
        from bootdiff.evaluation.worth import check_benchmark

        try:
            check_benchmark(cfg, e.benchmark)
        except (OSError, ValueError) as exc:
            msg = str(exc)
            p.items.append(("eval.benchmark", msg if msg.startswith("eval.benchmark=") else
                            f"eval.benchmark={_show(e.benchmark)}: {msg}"))


def _check_features(p: _Problems, f) -> None:
    """``eval.features``: the feature network is loaded once on the CPU (`bootdiff.evaluation.fd`), so a
    missing or wrong weights file fails here, before any training."""
    from bootdiff.evaluation import fd

    if not (isinstance(f.batch_size, int) and f.batch_size >= 1):
        p.bad("eval.features.batch_size", f.batch_size, "must be an integer >= 1")
        return
    try:
        fd.check_features_config(f)
    except ImportError as exc:
        p.items.append(("eval.features.kind", str(exc)))
    except (OSError, ValueError) as exc:  # fd's messages start with "eval.features.path=..."
        msg = str(exc)
        p.items.append(("eval.features.path", msg if msg.startswith("eval.features.") else
                        f"eval.features.path={_show(f.path)}: {msg}"))


def _check_distill(p: _Problems, cfg: ExperimentConfig) -> None:
    """``distill`` (`bootdiff.distill`): checked only when enabled."""
    d = cfg.distill
    if not d.enabled:
        return
    if not 0 <= d.teacher_fraction <= 1:
        p.bad("distill.teacher_fraction", d.teacher_fraction, "must be in [0, 1] (share of each batch)")
    elif d.teacher_fraction > 0 and not d.num_teacher_samples > 0:
        p.bad("distill.num_teacher_samples", d.num_teacher_samples,
              f"must be > 0 when distill.teacher_fraction={d.teacher_fraction} draws teacher samples")
    p.at_least("distill.num_teacher_samples", d.num_teacher_samples, 0, "must be an integer >= 0")
    p.at_least("distill.real_weight", d.real_weight, 0)
    if d.real_weight > 0 and d.teacher_fraction >= 1:
        p.bad("distill.real_weight", d.real_weight, "has no real rows to act on with distill.teacher_fraction=1")
    p.at_least("distill.sampler_steps", d.sampler_steps, 1, "must be an integer >= 1")
    p.at_least("distill.shard_size", d.shard_size, 1, "must be an integer >= 1")
    if cfg.data.source.kind in VIDEO_SOURCES:
        p.bad("distill.enabled", True, f"the student is a diffusers UNet2DModel; data.source.kind="
              f"{cfg.data.source.kind} is video")
    elif d.net.kind == NetKind.video:
        p.bad("distill.net.kind", d.net.kind, "the student must be unet2d (or auto) to export as a diffusers pipeline")
    _check_train(p, "distill.train", d.train)
    _check_augment(p, "distill.train.augment", d.train.augment, "the distilled student is not augmented (0 only)")
    _check_scaling(p, "distill.scaling", d.scaling)


def _check_peers(p: _Problems, cfg: ExperimentConfig) -> None:
    """``peers.ambient`` (`bootdiff.peers.ambient`): gates, shares, and the views it names;
    ``peers.finetune`` (`bootdiff.peers.finetune`): its share and view."""
    a = cfg.peers.ambient
    for key in ("sigma_tn", "sigma_crop"):
        if not getattr(a, key) > 0:
            p.bad(f"peers.ambient.{key}", getattr(a, key), "must be > 0 (a noise level)")
    if not 0 <= a.low_share < 1:
        p.bad("peers.ambient.low_share", a.low_share, "must be in [0, 1) (the rest are full-res rows)")
    p.at_least("peers.ambient.crop_ratio", a.crop_ratio, 0)
    for key, kind in (("low_view", ViewKind.downsample), ("crop_view", ViewKind.patch)):
        name = getattr(a, key)
        if name and (name not in cfg.views or cfg.views[name].kind != kind):
            p.bad(f"peers.ambient.{key}", name, f"must name a {kind.value} view (views: {', '.join(cfg.views) or 'none'})")
    d = cfg.peers.patchdiff
    if not (d.full_share > 0 and d.patch_share >= 0 and d.full_share + d.patch_share <= 1):
        p.bad("peers.patchdiff.full_share", (d.full_share, d.patch_share),
              "with patch_share: need full_share > 0, patch_share >= 0 and full_share + patch_share <= 1")
    side = cfg.data.resolution
    for s in d.crop_sizes:
        if not 0 < int(s) <= side:
            p.bad("peers.patchdiff.crop_sizes", list(d.crop_sizes), f"each side must be in (0, data.resolution={side}]")
    if d.patch_view and (d.patch_view not in cfg.views or cfg.views[d.patch_view].kind != ViewKind.patch):
        p.bad("peers.patchdiff.patch_view", d.patch_view, f"must name a patch view (views: {', '.join(cfg.views) or 'none'})")
    for v in a.grid:
        if not v > 0:
            p.bad("peers.ambient.grid", list(a.grid), "sigma_tn values: each must be > 0 (a noise level)")
    for v in d.grid:
        if not 0 < v <= 1 - d.patch_share:
            p.bad("peers.patchdiff.grid", list(d.grid), f"full_share values: each in (0, 1 − patch_share = {1 - d.patch_share:g}]")
    usable = peers_available(cfg)
    for name in cfg.sweep.peers:
        if name not in PEER_NAMES:
            p.bad("sweep.peers", list(cfg.sweep.peers), f"{name!r} is not a peer method (the peers: {', '.join(PEER_NAMES)})")
        elif name not in usable:
            p.bad("sweep.peers", list(cfg.sweep.peers),
                  f"{name!r} needs {PEER_NEEDS[name]}; this config's views allow: {', '.join(usable) or 'none'}")
    if len(set(cfg.sweep.peers)) < len(cfg.sweep.peers):
        p.bad("sweep.peers", list(cfg.sweep.peers), "names a peer twice")
    f = cfg.peers.finetune
    for v in f.grid:
        if not 0 <= v < 1:
            p.bad("peers.finetune.grid", list(f.grid), "pretrain_share values: each in [0, 1)")
    if not 0 <= f.pretrain_share < 1:
        p.bad("peers.finetune.pretrain_share", f.pretrain_share, "must be in [0, 1) (the rest of the steps fine-tune)")
    if f.low_view and (f.low_view not in cfg.views or cfg.views[f.low_view].kind != ViewKind.downsample):
        p.bad("peers.finetune.low_view", f.low_view, f"must name a downsample view (views: {', '.join(cfg.views) or 'none'})")


def check(cfg, origin: str = "config", overrides: Sequence[str] = ()) -> None:
    """Check every cross-field rule of ``cfg`` (an `ExperimentConfig` or its DictConfig); raise one
    ``ConfigError`` listing each problem as ``<file or command line>: key=value: why``.
    ``overrides`` (the ``key=value`` list) tells which keys came from the command line."""
    cfg = to_object(cfg)
    p = _Problems()
    if not str(cfg.name) or not NAME.match(str(cfg.name)):
        p.bad("name", cfg.name, "must be non-empty without '/', '\\' or spaces (it names the run's folder)")
    if not str(cfg.storage):
        p.bad("storage", "''", "must be a folder or URL")
    _check_data(p, cfg)
    _check_views(p, cfg)
    _check_residual(p, cfg)
    _check_sweep(p, cfg)
    _check_eval(p, cfg)
    _check_distill(p, cfg)
    _check_peers(p, cfg)
    p.at_least("ray.max_failures", cfg.ray.max_failures, -1, "must be >= -1 (-1: retry forever)")
    p.at_least("ray.ingest_tasks", cfg.ray.ingest_tasks, 0, "must be >= 0 (0: one task per shard range)")
    p.at_least("ray.worker_start_timeout_s", cfg.ray.worker_start_timeout_s, 0)
    runs = {*cfg.views, "full_res", "distill", *PEER_NAMES}
    for run in cfg.ray.inject_failure_runs:
        if run not in runs:
            p.bad("ray.inject_failure_runs", list(cfg.ray.inject_failure_runs),
                  f"{run!r} is not a Train run of this config (one of {', '.join(sorted(runs))})")
    levels = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    if str(cfg.ray.train_log_level).upper() not in levels:
        p.bad("ray.train_log_level", cfg.ray.train_log_level, f"must be one of {', '.join(levels)}")
    p.raise_if_any(origin, overrides)
