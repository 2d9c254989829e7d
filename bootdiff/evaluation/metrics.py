"""Sample and denoiser metrics that need no downloaded weights (docs/METHOD.md §6 and §8).

* ``generalization_error`` (§6) — G = E_x E_σ E_n λ(σ)·mean_elements (D(x + σn; σ) − x)² on a
  fixed σ grid with fixed noise, per σ and in total (the denoising score-matching loss of EDM
  eq. 2 measured on held-out data; compare it with the same figure on the training set), plus
  the per-σ (1−δ) quantile over samples of the per-sample error ("Improved sample complexity
  bounds for diffusion model training", Gupta et al. 2023: the 1−δ quantile error).
* ``sliced_wasserstein`` (a float) and ``sliced_wasserstein_levels`` (per level) (§8) —
  multi-scale sliced Wasserstein distance of ProGAN (Karras et al. 2018,
  `metrics/sliced_wasserstein.py`): Laplacian pyramid, 7×7 descriptor patches per level,
  per-channel normalisation, random 1-d projections, sorted-sample Wasserstein-1.
* ``memorization_rate`` (§8) — fraction of samples whose nearest / second-nearest training-set
  L2 distance ratio is below 1/3; ``nearest_neighbour_distance`` — mean L2 to the nearest
  training sample. Both batched with ``torch.cdist`` and chunking.

The evaluation procedure that applies them to a finished sweep is `bootdiff.evaluation.evaluate`.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from bootdiff.schedules import weighting as loss_weighting
from bootdiff.util import randn


def sigma_grid(eval_cfg) -> list:
    """``eval_cfg.num_sigma`` log-spaced levels from ``sigma_min`` to ``sigma_max`` (ascending)."""
    lo, hi, n = eval_cfg.sigma_min, eval_cfg.sigma_max, eval_cfg.num_sigma
    if not (0 < lo < hi) or n < 1:
        raise ValueError(f"eval: need 0 < sigma_min < sigma_max and num_sigma >= 1, got "
                         f"sigma_min={lo}, sigma_max={hi}, num_sigma={n}")
    if n == 1:
        return [math.sqrt(lo * hi)]
    return torch.logspace(math.log10(lo), math.log10(hi), n, dtype=torch.float64).tolist()


def _noise_seed(seed: int, j: int, i: int) -> int:
    """A 63-bit seed for the noise of sample ``i`` at σ index ``j`` (splitmix64-style mixing)."""
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(j) * 0xBF58476D1CE4E5B9 + int(i) * 0x94D049BB133111EB
         + 0x2545F4914F6CDD1D) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def fixed_noise(seed: int, j: int, start: int, count: int, sample_shape, dtype=torch.float32) -> torch.Tensor:
    """Noise ``[count, *sample_shape]`` for samples ``start .. start+count−1`` at σ index ``j``:
    each sample's noise comes from its own CPU generator seeded by (seed, j, i), so it does not
    depend on the batch size, the device, or the denoiser."""
    g = torch.Generator()
    out = torch.empty((count, *sample_shape), dtype=torch.float32)
    for k in range(count):
        g.manual_seed(_noise_seed(seed, j, start + k))
        out[k] = randn(sample_shape, g)
    return out.to(dtype)


@torch.no_grad()
def generalization_error(D, batches: Iterable, sigma_grid: Sequence[float], sigma_data: float,
                         seed: int = 0, delta: float = 0.1, weighting: str = "edm",
                         max_samples: Optional[int] = None, device=None,
                         return_per_sample: bool = False) -> dict:
    """Per-σ mean and (1−δ) quantile of e_i(σ) = λ(σ)·mean_elements (D(x_i + σn_ij; σ) − x_i)².

    ``batches``: iterable of tensors ``[B, ...]`` (or tuples/lists whose first item is one), the
    samples in a fixed order; at most ``max_samples`` are scored. Noise for sample i at σ_j is fixed
    by (seed, j, i) (`fixed_noise`). Returns ``{'sigma': [J], 'mean': [J], 'quantile': [J],
    'total': mean over σ of the means, 'n': samples scored, 'delta': δ}`` (plain Python floats) and,
    with ``return_per_sample``, ``'per_sample'``: a ``[n, J]`` tensor of e_i(σ_j).
    """
    sigmas = [float(s) for s in (sigma_grid.tolist() if torch.is_tensor(sigma_grid) else sigma_grid)]
    if not sigmas or any(s <= 0 for s in sigmas):
        raise ValueError(f"generalization_error: sigma_grid must be non-empty and positive, got {sigmas}")
    if not 0 <= delta < 1:
        raise ValueError(f"generalization_error: delta must be in [0, 1), got {delta}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"generalization_error: max_samples must be >= 1, got {max_samples}")
    errors = []  # list of [B, J]
    seen = 0
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise ValueError(f"generalization_error: batches must yield float tensors, got {type(x).__name__}")
        if max_samples is not None:
            x = x[: max_samples - seen]
        if x.shape[0] == 0:
            break
        if device is not None:
            x = x.to(device)
        cols = []
        for j, s in enumerate(sigmas):
            n = fixed_noise(seed, j, seen, x.shape[0], x.shape[1:], x.dtype).to(x.device)
            sig = torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device)
            err = (D(x + s * n, sig) - x).flatten(1).to(torch.float64).pow(2).mean(1)
            cols.append(err.cpu())
        lam = loss_weighting(torch.tensor(sigmas, dtype=torch.float64), sigma_data, weighting)
        errors.append(torch.stack(cols, dim=1) * lam)
        seen += x.shape[0]
        if max_samples is not None and seen >= max_samples:
            break
    if seen == 0:
        raise ValueError("generalization_error: no samples in batches")
    e = torch.cat(errors)
    means = e.mean(0)
    quant = torch.quantile(e, 1.0 - delta, dim=0)
    out = {"sigma": sigmas, "mean": means.tolist(), "quantile": quant.tolist(),
           "total": float(means.mean()), "n": int(seen), "delta": float(delta)}
    if return_per_sample:
        out["per_sample"] = e
    return out


# ----------------------------------------------------------------------------- sliced Wasserstein

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _blur(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    c = x.shape[1]
    k = torch.outer(_BINOMIAL, _BINOMIAL).to(x) * gain
    k = k.expand(c, 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k, groups=c)


def laplacian_pyramid(x: torch.Tensor, min_size: int = 16) -> list:
    """Laplacian pyramid of ``[N, C, H, W]`` as ProGAN (= cv2.pyrDown / pyrUp: 5×5 binomial blur,
    decimate; zero-insert, blur ×4): finest first, levels down to side ``>= min_size``; the last
    level is the coarsest Gaussian level."""
    levels = []
    cur = x
    while min(cur.shape[-2:]) // 2 >= min_size:
        small = _blur(cur)[..., ::2, ::2]
        up = torch.zeros_like(cur)
        up[..., ::2, ::2] = small
        levels.append(cur - _blur(up, 4.0))
        cur = small
    levels.append(cur)
    return levels


def _descriptors(level: torch.Tensor, per_image: int, patch: int, g: torch.Generator) -> torch.Tensor:
    n, c, h, w = level.shape
    if h < patch or w < patch:
        raise ValueError(f"sliced_wasserstein: pyramid level {h}x{w} smaller than the {patch}x{patch} patch")
    ys = torch.randint(0, h - patch + 1, (n, per_image), generator=g)
    xs = torch.randint(0, w - patch + 1, (n, per_image), generator=g)
    ar = torch.arange(patch)
    rows = (ys[..., None] + ar).reshape(n, per_image, patch, 1).expand(n, per_image, patch, patch)
    cols = (xs[..., None] + ar).reshape(n, per_image, 1, patch).expand(n, per_image, patch, patch)
    flat = (rows * w + cols).reshape(n, 1, -1).expand(n, c, -1).to(level.device)
    d = torch.gather(level.flatten(2), 2, flat)                      # [n, c, P*p*p]
    d = d.reshape(n, c, per_image, patch * patch).permute(0, 2, 1, 3)
    return d.reshape(n * per_image, c, patch * patch)


def _normalize(d: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return ((d - mean) / std.clamp_min(1e-8)).flatten(1)


def _channel_stats(d: torch.Tensor):
    return d.mean(dim=(0, 2), keepdim=True), d.std(dim=(0, 2), keepdim=True)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, **kwargs) -> float:
    """Multi-scale sliced Wasserstein distance (ProGAN), averaged over pyramid levels; the keyword
    arguments and details are those of `sliced_wasserstein_levels`."""
    return sliced_wasserstein_levels(a, b, **kwargs)["swd"]


@torch.no_grad()
def sliced_wasserstein_levels(a: torch.Tensor, b: torch.Tensor, descriptors_per_image: int = 128,
                              patch_size: int = 7, min_size: int = 16, dir_repeats: int = 4,
                              dirs_per_repeat: int = 128, seed: int = 0,
                              normalize: str = "separate") -> dict:
    """Multi-scale sliced Wasserstein distance between image sets ``a`` and ``b`` (ProGAN).

    ``a``, ``b``: ``[N, C, H, W]`` (videos ``[N, C, T, H, W]`` are scored frame by frame).
    Per pyramid level: ``descriptors_per_image`` random ``patch_size``² patches per image, each set
    normalised per channel (``normalize="separate"``: each set by its own mean/std, as ProGAN —
    insensitive to global brightness/contrast; ``"reference"``: both by ``a``'s statistics), then
    ``dir_repeats × dirs_per_repeat`` random unit directions, SWD = mean |sorted(proj a) −
    sorted(proj b)|. Seeded by ``seed``. Returns ``{'swd': mean over levels, 'per_level': [...],
    'resolutions': [...]}`` (raw distances; ProGAN prints them ×1e3).
    """
    if normalize not in ("separate", "reference"):
        raise ValueError(f"sliced_wasserstein: normalize must be 'separate' or 'reference', got {normalize!r}")
    a, b = _as_images(a, "a"), _as_images(b, "b").to(a.device)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"sliced_wasserstein: image shapes differ: {tuple(a.shape[1:])} vs {tuple(b.shape[1:])}")
    g = torch.Generator().manual_seed(int(seed))
    pa = laplacian_pyramid(a.float(), min_size)
    pb = laplacian_pyramid(b.float(), min_size)
    per_level, res = [], []
    for la, lb in zip(pa, pb):
        da = _descriptors(la, descriptors_per_image, patch_size, g)
        db = _descriptors(lb, descriptors_per_image, patch_size, g)
        m = min(da.shape[0], db.shape[0])  # equal counts for the sorted comparison
        if da.shape[0] > m:
            da = da[torch.randperm(da.shape[0], generator=g)[:m].to(da.device)]
        if db.shape[0] > m:
            db = db[torch.randperm(db.shape[0], generator=g)[:m].to(db.device)]
        sa = _channel_stats(da)
        sb = sa if normalize == "reference" else _channel_stats(db)
        da, db = _normalize(da, *sa), _normalize(db, *sb)
        dists = []
        for _ in range(dir_repeats):
            dirs = torch.randn(da.shape[1], dirs_per_repeat, generator=g).to(da)
            dirs = dirs / dirs.norm(dim=0, keepdim=True)
            proj_a = torch.sort((dirs.T @ da.T).contiguous(), dim=1).values  # [dirs, m], row sort
            proj_b = torch.sort((dirs.T @ db.T).contiguous(), dim=1).values
            dists.append((proj_a - proj_b).abs().mean())
        per_level.append(float(torch.stack(dists).mean()))
        res.append(int(la.shape[-1]))
    return {"swd": sum(per_level) / len(per_level), "per_level": per_level, "resolutions": res}


def _as_images(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.ndim == 5:  # [N, C, T, H, W] -> frames
        x = x.permute(0, 2, 1, 3, 4).reshape(-1, x.shape[1], x.shape[3], x.shape[4])
    if x.ndim != 4:
        raise ValueError(f"sliced_wasserstein: {name} must be [N,C,H,W] or [N,C,T,H,W], got {tuple(x.shape)}")
    return x


# ----------------------------------------------------------------------------- nearest neighbours


@torch.no_grad()
def _two_nearest(samples: torch.Tensor, train: torch.Tensor, chunk: int = 1024,
                 train_chunk: int = 8192) -> torch.Tensor:
    """``[N, 2]`` distances to the nearest and second-nearest training sample (flattened L2)."""
    s = samples.flatten(1).float()
    t = train.flatten(1).float().to(s.device)
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"samples have {s.shape[1]} elements each but train has {t.shape[1]}")
    k = min(2, t.shape[0])
    out = []
    for i in range(0, s.shape[0], chunk):
        si = s[i:i + chunk]
        best = torch.full((si.shape[0], k), float("inf"), device=s.device)
        for j in range(0, t.shape[0], train_chunk):
            d = torch.cdist(si, t[j:j + train_chunk])
            best = torch.cat([best, d], dim=1).topk(k, dim=1, largest=False).values
        out.append(best)
    return torch.cat(out)


def nearest_neighbour_distance(samples: torch.Tensor, train: torch.Tensor, chunk: int = 1024) -> float:
    """Mean L2 distance from each sample to its nearest training sample."""
    if train.shape[0] < 1 or samples.shape[0] < 1:
        raise ValueError("nearest_neighbour_distance: need at least one sample and one training sample")
    return float(_two_nearest(samples, train, chunk)[:, 0].mean())


def memorization_rate(samples: torch.Tensor, train: torch.Tensor, ratio: float = 1.0 / 3.0,
                      chunk: int = 1024) -> float:
    """Fraction of samples with d(nearest train) / d(second-nearest train) < ``ratio`` (a sample
    at distance 0 from a training sample counts as memorised)."""
    if train.shape[0] < 2:
        raise ValueError(f"memorization_rate: need at least 2 training samples, got {train.shape[0]}")
    d = _two_nearest(samples, train, chunk)
    r = torch.where(d[:, 0] == 0, torch.zeros_like(d[:, 0]), d[:, 0] / d[:, 1].clamp_min(1e-30))
    return float((r < ratio).float().mean())
