"""Stage 2: the residual denoiser on top of the frozen combined denoiser (docs/METHOD.md §4, §5).

    D_boot(x_σ; σ) = D_comb(x_σ; σ) + r(σ) · R_θ(x_σ, D_comb, σ)

- `ResidualPrecond`: ``R_θ``; the net sees ``[c_in·x_σ, D_comb/σ_d]`` (channel concat) and
  ``c_noise`` (METHOD §4).
- `RangeAdapter` / `fit_range_adapter` / `estimate_range_adapter`: ``r(σ)``, piecewise linear in
  log σ over 100 bins, valued at the bin centres with the RMS of ``x − D_comb(x+σn; σ)`` on
  full-resolution data (METHOD §5).
- `BootstrapDenoiser`: ``D_boot`` (METHOD §4).
- `ResidualLoss`: the residual loss with its variance and ℓ1 penalties (METHOD §4).
- `fit_constants`: fits the stage-2 constants — the fusion weights (METHOD §3) and r(σ) — into
  the placeholders of a freshly built model. They are buffers, so every checkpoint, the EMA copy
  and the export carry them, and loading a trained model never re-estimates them.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from bootdiff.augment import augment
from bootdiff.fusion import CombinedDenoiser, fit_fusion_weights
from bootdiff.losses import check_weighting, noisy_batch, per_sample_mean
from bootdiff.precond import edm_coefficients
from bootdiff.schedules import weighting
from bootdiff.util import broadcast_sigma, randn

L1_DECAYS = ("none", "inverse_sigma")


# ----------------------------------------------------------------------------- R_θ and r(σ)


class ResidualPrecond(nn.Module):
    """Residual denoiser ``R_θ(x_σ, D_comb, σ)`` of bootstrapping diffusion (METHOD §4), unit scale.

    The net is built with ``in_channels = 2·C`` and sees the channel concat
    ``[c_in(σ)·x_σ, D_comb/σ_data]`` (both ~unit variance, `bootdiff.precond.edm_coefficients`)
    and ``c_noise = ln σ / 4``. The raw net output (float32) is ``R``; the caller scales it by
    the range adapter ``r(σ)``.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        if not float(sigma_data) > 0:
            raise ValueError(f"ResidualPrecond: sigma_data must be > 0, got {sigma_data}")
        self.net = net
        self.register_buffer("sigma_data", torch.tensor(float(sigma_data), dtype=torch.float32))

    def forward(self, x: torch.Tensor, sigma, d_comb: torch.Tensor,
                augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if d_comb.shape != x.shape:
            raise ValueError(f"ResidualPrecond: d_comb shape {tuple(d_comb.shape)} != x shape "
                             f"{tuple(x.shape)}")
        dtype = x.dtype
        x = x.to(torch.float32)
        sigma = broadcast_sigma(sigma, x)
        sd = self.sigma_data.float()
        _, _, c_in, c_noise = edm_coefficients(sigma, sd)
        inp = torch.cat([broadcast_sigma(c_in, x, column=True) * x, d_comb.to(torch.float32) / sd], dim=1)
        extra = () if augment_labels is None else (augment_labels,)  # `bootdiff.augment`, training only
        return self.net(inp.to(dtype), c_noise, *extra).to(torch.float32)


class RangeAdapter(nn.Module):
    """The range adapter ``r(σ)``: piecewise linear in log σ (METHOD §5).

    ``[log_sigma_min, log_sigma_max]`` is split into ``len(values)`` (default 100) equal
    intervals; ``values[i]`` is r at the *centre* of interval i (as the paper estimates it).
    Between two centres r is linear in log σ; below the first / above the last centre it is
    clamped to the end value. Everything is a buffer, so the ``state_dict`` saves it.
    """

    def __init__(self, log_sigma_min: float, log_sigma_max: float, values):
        super().__init__()
        values = torch.as_tensor(values, dtype=torch.float32).detach().clone().reshape(-1)
        if values.numel() < 1:
            raise ValueError("RangeAdapter: values must have at least one entry")
        if not float(log_sigma_max) > float(log_sigma_min):
            raise ValueError(f"RangeAdapter: log_sigma_max ({log_sigma_max}) must exceed "
                             f"log_sigma_min ({log_sigma_min})")
        self.register_buffer("log_sigma_min", torch.tensor(float(log_sigma_min)))
        self.register_buffer("log_sigma_max", torch.tensor(float(log_sigma_max)))
        self.register_buffer("values", values)

    @classmethod
    def from_sigma_range(cls, sigma_min: float, sigma_max: float, values) -> "RangeAdapter":
        if not (sigma_min > 0 and sigma_max > sigma_min):
            raise ValueError(f"RangeAdapter: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        return cls(math.log(sigma_min), math.log(sigma_max), values)

    @classmethod
    def ones(cls, log_sigma_min: float = math.log(0.002), log_sigma_max: float = math.log(80.0),
             num_bins: int = 100) -> "RangeAdapter":
        """r(σ) = 1 everywhere: the "off" setting, and the placeholder `fit_range_adapter` fills."""
        return cls(log_sigma_min, log_sigma_max, torch.ones(num_bins))

    @property
    def num_bins(self) -> int:
        return self.values.numel()

    def log_centres(self) -> torch.Tensor:
        """log σ at the interval centres (where ``values`` are exact)."""
        n = self.num_bins
        width = (self.log_sigma_max - self.log_sigma_min) / n
        return self.log_sigma_min + width * (torch.arange(n, device=self.values.device) + 0.5)

    def centres(self) -> torch.Tensor:
        """σ at the interval centres."""
        return self.log_centres().exp()

    def forward(self, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=self.values.device).reshape(-1)
        n = self.num_bins
        if n == 1:
            return self.values.expand(sigma.shape[0]).clone()
        width = (self.log_sigma_max - self.log_sigma_min) / n
        u = ((sigma.log() - self.log_sigma_min) / width - 0.5).clamp(0, n - 1)
        i0 = u.floor().long().clamp(max=n - 2)
        frac = u - i0
        return self.values[i0] * (1 - frac) + self.values[i0 + 1] * frac

    def extra_repr(self) -> str:
        return (f"num_bins={self.num_bins}, sigma=[{self.log_sigma_min.exp().item():.4g}, "
                f"{self.log_sigma_max.exp().item():.4g}]")


@torch.no_grad()
def fit_range_adapter(adapter: RangeAdapter, d_comb: Callable, batches: Iterable[torch.Tensor],
                      samples_per_bin: int = 64, max_batches: Optional[int] = None,
                      generator: Optional[torch.Generator] = None, device=None) -> RangeAdapter:
    """Set ``adapter.values`` (in place) to the per-element RMS of ``x − D_comb(x + σ_i·n; σ_i)``
    over full-resolution data ``x`` at each bin centre σ_i (METHOD §5).

    Reads batches until ``samples_per_bin`` samples (or ``max_batches`` batches) have been used;
    every sample is evaluated at every centre, with noise from ``generator``.
    """
    sigmas = adapter.centres().tolist()
    sq = torch.zeros(adapter.num_bins, dtype=torch.float64)
    count, seen = 0, 0
    for b, x in enumerate(batches):
        if (max_batches is not None and b >= max_batches) or seen >= samples_per_bin:
            break
        if not torch.is_tensor(x):
            raise TypeError(f"fit_range_adapter: batch {b} is a {type(x).__name__}, not a tensor")
        x = x.to(device if device is not None else x.device)
        x = (x if x.is_floating_point() else x.float())[: samples_per_bin - seen]
        for i, s in enumerate(sigmas):
            n = randn(x.shape, generator, x.device).to(x.dtype)  # drawn in float32 whatever x's dtype
            err = x - d_comb(x + s * n, broadcast_sigma(s, x)).to(x.dtype)
            sq[i] += err.double().pow(2).sum().item()
        count += x.numel()
        seen += x.shape[0]
    if count == 0:
        raise ValueError("fit_range_adapter: no data (empty iterator)")
    adapter.values.copy_((sq / count).sqrt().float())
    return adapter


def estimate_range_adapter(d_comb: Callable, batches: Iterable[torch.Tensor], sigma_min: float,
                           sigma_max: float, num_bins: int = 100, samples_per_bin: int = 64,
                           max_batches: Optional[int] = None,
                           generator: Optional[torch.Generator] = None,
                           device=None) -> RangeAdapter:
    """A new `RangeAdapter` on ``[sigma_min, sigma_max]`` with ``num_bins`` bins, fitted by
    `fit_range_adapter` (METHOD §5)."""
    adapter = RangeAdapter.from_sigma_range(sigma_min, sigma_max, torch.zeros(num_bins))
    return fit_range_adapter(adapter, d_comb, batches, samples_per_bin=samples_per_bin,
                             max_batches=max_batches, generator=generator, device=device)


# ----------------------------------------------------------------------------- D_boot


class BootstrapDenoiser(nn.Module):
    """``D_boot = D_comb + r(σ)·R(x, σ, D_comb)`` (stage 2, METHOD §4).

    ``combined``: `bootdiff.fusion.CombinedDenoiser` (frozen); ``residual(x, sigma, d_comb) -> R``
    (`ResidualPrecond`); ``range_adapter(sigma) -> [N]`` (`RangeAdapter`; None: ``r ≡ 1``). Only
    the residual's parameters are trainable.
    """

    def __init__(self, combined: CombinedDenoiser, residual: nn.Module,
                 range_adapter: Optional[nn.Module] = None):
        super().__init__()
        self.combined = combined
        self.residual = residual
        self.range_adapter = range_adapter

    def forward_parts(self, x: torch.Tensor, sigma, augment_labels: Optional[torch.Tensor] = None):
        """``(d_comb, r, R)`` with ``r`` shaped ``[N, 1, …]`` — what the residual loss needs.
        ``augment_labels`` (training with `bootdiff.augment`) go to the residual net only: the
        frozen D_comb sees the augmented image as it is."""
        sigma = broadcast_sigma(sigma, x)
        d_comb = self.combined(x, sigma)
        r = torch.ones_like(sigma) if self.range_adapter is None else self.range_adapter(sigma)
        extra = {} if augment_labels is None else {"augment_labels": augment_labels}
        R = self.residual(x, sigma, d_comb, **extra)
        return d_comb, broadcast_sigma(r, x, column=True), R

    def forward(self, x: torch.Tensor, sigma, return_parts: bool = False,
                augment_labels: Optional[torch.Tensor] = None):
        """``D_boot(x; σ)``; with ``return_parts`` the tuple of `forward_parts` (the residual
        loss calls it this way through a DDP wrapper, so gradients are synchronised)."""
        d_comb, r, R = self.forward_parts(x, sigma, augment_labels)
        if return_parts:
            return d_comb, r, R
        return d_comb + r * R


# ----------------------------------------------------------------------------- fitting the constants


@torch.no_grad()
def fit_constants(model: BootstrapDenoiser, batches: Callable[[], Iterable[torch.Tensor]],
                  generator: Optional[torch.Generator] = None,
                  fusion_grid: Optional[Sequence[float]] = None,
                  range_adapter: bool = True) -> BootstrapDenoiser:
    """Fit the stage-2 constants of a freshly built ``model`` into its placeholders, in place.

    ``batches()`` opens one pass over the full-resolution training data; ``generator`` draws all
    the noise, in this order:

    1. with ``fusion_grid`` (σ values): the fusion weights on that grid (METHOD §3,
       `bootdiff.fusion.fit_fusion_weights`) into ``model.combined.weights`` — a `FusionWeights`
       placeholder with as many σ points;
    2. with ``range_adapter``: r(σ) at the centres of ``model.range_adapter``'s bins (METHOD §5,
       `fit_range_adapter`), measured on ``D_comb`` with the weights of step 1.

    Only for a run that starts fresh: a resumed run, the EMA copy and a loaded model take these
    buffers from the checkpoint / export.
    """
    check_placeholders(model, fusion_grid, range_adapter)
    combined = model.combined
    if fusion_grid is not None:
        fitted = fit_fusion_weights(combined.components, batches(), fusion_grid, generator=generator)
        combined.weights.load_state_dict(fitted.state_dict())
    if range_adapter:
        fit_range_adapter(model.range_adapter, combined, batches(), generator=generator)
    return model


def check_placeholders(model: BootstrapDenoiser, fusion_grid: Optional[Sequence[float]] = None,
                       range_adapter: bool = True) -> None:
    """Raise unless ``model`` has the placeholders `fit_constants` fills: `FusionWeights` on
    ``len(fusion_grid)`` σ points (when given) and a `RangeAdapter` (when ``range_adapter``)."""
    if fusion_grid is not None:
        weights = model.combined.weights
        points = None if weights is None else weights.log_sigma.numel()
        if points != len(fusion_grid):
            raise ValueError(f"fit_constants: the model has fusion weights on {points} σ points, "
                             f"fitting asks for {len(fusion_grid)} (build the model with the same "
                             f"residual.fit_fusion_weights / residual.fusion_sigmas)")
    if range_adapter and not isinstance(model.range_adapter, RangeAdapter):
        raise ValueError(f"fit_constants: the model's range adapter is a "
                         f"{type(model.range_adapter).__name__}, not a RangeAdapter to fit")


# ----------------------------------------------------------------------------- loss


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
        return lambda x, sigma, augment_labels=None: model(x, sigma, return_parts=True, augment_labels=augment_labels)
    raise TypeError(f"ResidualLoss needs a model with forward_parts(x, sigma) -> (d_comb, r, R), "
                    f"got {type(model).__name__}")


class ResidualLoss:
    """Residual-denoiser loss of bootstrapping diffusion (METHOD §4; variance penalty: the paper's eq. 7):

        L = λ(σ)‖D_boot − x‖²/d + μ_var·λ(σ)‖r(σ)R_θ‖²/d + μ_L1·w(σ)‖R_θ‖₁/d,
        w(σ) = 1 (``l1_decay="none"``) or min(1, σ_data/σ) (``"inverse_sigma"``),

    all terms means over the ``d`` elements (METHOD §4 gives μ_L1's scale against the sum form).
    ``__call__(model, x, generator) -> [N]`` where ``model`` is a `BootstrapDenoiser` (or anything
    with ``forward_parts(x, sigma) -> (d_comb, r, R)``; a DDP-wrapped one is called as
    ``model(x, sigma, return_parts=True)``). σ and the noise are drawn as in
    `bootdiff.losses.EDMLoss`. ``d_comb`` and ``r`` are treated as constants (detached):
    gradients reach only the residual network R_θ. ``r`` may be ``[N]`` (one value per sample) or
    broadcastable to x. Sets ``self.last_sigma`` and ``self.last_terms`` (per-sample ``mse``,
    ``var``, ``l1``, detached).

    σ-gated partial data (the Ambient-Omni gate of `bootdiff.peers.ambient`, here in stage 2;
    ``residual.low_ratio``): with ``lift`` (the low-res view's Aᵀ/c) the batch may be a pair
    ``(x_full, y_low)``; the lifted rows ``lift(y_low)`` get the same loss with σ ~ p_train
    truncated to σ ≥ ``sigma_tn``, where their missing detail is drowned by the noise. The
    returned losses are the full-res rows' then the lifted rows'.

    ``augment`` > 0 (``residual.train.augment``): the full-res rows are augmented, non-leaking
    (`bootdiff.augment`; EDM Appendix F.2), and R_θ gets their labels; D_comb, frozen, sees the
    augmented image as it is and R_θ learns to correct it there too. The lifted rows are not.
    """

    def __init__(self, loss_cfg, sigma_data: float, mu_var: float = 0.0, mu_l1: float = 0.0,
                 l1_decay: str = "none", weighting: Optional[str] = None, lift: Optional[Callable] = None,
                 sigma_tn: float = 0.0, augment: float = 0.0):
        l1_decay = str(getattr(l1_decay, "value", l1_decay))  # an Enum member of the config, or a str
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
        if lift is not None and not sigma_tn > 0:
            raise ValueError(f"residual.sigma_tn must be > 0 (the σ gate of the lifted low-res rows), got {sigma_tn}")
        self.lift, self.sigma_tn = lift, float(sigma_tn)
        self.augment = float(augment)
        self.weighting = check_weighting(weighting or loss_cfg.weighting)
        self.last_sigma: Optional[torch.Tensor] = None
        self.last_terms: dict = {}

    def l1_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """w(σ): 1, or min(1, σ_data/σ) — the ℓ1 penalty decreasing with the noise level."""
        if self.l1_decay == "inverse_sigma":
            return (self.sigma_data / sigma).clamp(max=1.0)
        return torch.ones_like(sigma)

    def __call__(self, model, x, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        parts = _parts_fn(model)
        if not isinstance(x, (tuple, list)):
            return self._terms(parts, x, generator)
        if self.lift is None or len(x) != 2:
            raise ValueError("ResidualLoss: a batch of (full-res, low-res) rows needs lift= (residual.low_ratio > 0)")
        full, low = x
        if low.shape[0] == 0:
            return self._terms(parts, full, generator)
        out_full = self._terms(parts, full, generator)
        sigma_full, terms_full = self.last_sigma, self.last_terms
        out_low = self._terms(parts, self.lift(low), generator, lo=self.sigma_tn, full=False)
        self.last_sigma = torch.cat([sigma_full, self.last_sigma])
        self.last_terms = {k: torch.cat([terms_full[k], self.last_terms[k]]) for k in terms_full}
        return torch.cat([out_full, out_low])

    def _terms(self, parts, x: torch.Tensor, generator, lo: float = 0.0, full: bool = True) -> torch.Tensor:
        extra = {}
        if self.augment > 0 and full:  # the full-res rows only
            x, extra["augment_labels"] = augment(x, self.augment, generator)
        sigma, x_noisy = noisy_batch(x, self.loss_cfg, generator, lo=lo)
        self.last_sigma = sigma.detach()
        d_comb, r, R = parts(x_noisy, sigma, **extra)
        d_comb = d_comb.detach()
        r = torch.as_tensor(r, dtype=x.dtype, device=x.device).detach()
        if r.ndim <= 1:
            r = broadcast_sigma(r, x, column=True)
        rR = r * R
        lam = weighting(sigma, self.sigma_data, self.weighting)
        mse = lam * per_sample_mean((d_comb + rR - x) ** 2)
        var = lam * per_sample_mean(rR ** 2)
        l1 = self.l1_weight(sigma) * per_sample_mean(R.abs())
        self.last_terms = {"mse": mse.detach(), "var": var.detach(), "l1": l1.detach()}
        return mse + self.mu_var * var + self.mu_l1 * l1
