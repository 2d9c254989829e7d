"""EDM preconditioning, the residual denoiser's preconditioning, σ_data and the range adapter.

- `EDMPrecond`: Karras et al. 2022 ("Elucidating the design space...", EDM), Table 1 / eq. 7:
  ``D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ))`` with
  ``c_skip = σd²/(σ²+σd²)``, ``c_out = σ·σd/√(σ²+σd²)``, ``c_in = 1/√(σ²+σd²)``,
  ``c_noise = ln(σ)/4``.
- `ResidualPrecond`: the bootstrapping-diffusion residual ``R_θ(x_σ, D_comb, σ)``; the net sees
  ``[c_in·x_σ, D_comb/σd]`` (channel concat) and ``c_noise``; its raw output is ``R``.
- `measure_sigma_data`: σ_data of a view's data (streaming std, float64).
- `RangeAdapter` / `estimate_range_adapter`: the paper's range adapter ``r(σ)``, piecewise linear
  in log σ over 100 intervals, valued at the interval centres (bootstrapping-diffusion paper,
  "Hyper-parameters at the range adapter"), estimated as the RMS of ``x − D_comb(x+σn; σ)`` on
  full-resolution data.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
from torch import nn


def _sigma_vector(sigma, x: torch.Tensor) -> torch.Tensor:
    """σ as a float32 vector ``[N]`` (a Python float / 0-d / 1-element tensor is broadcast)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
    if sigma.numel() == 1:
        sigma = sigma.expand(x.shape[0])
    if sigma.numel() != x.shape[0]:
        raise ValueError(f"sigma has {sigma.numel()} entries but the batch has {x.shape[0]} samples")
    return sigma


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``[N]`` -> ``[N, 1, ..., 1]`` broadcastable against x."""
    return v.reshape([-1] + [1] * (x.ndim - 1))


def edm_coefficients(sigma: torch.Tensor, sigma_data):
    """(c_skip, c_out, c_in, c_noise) of EDM Table 1 for a σ tensor (any shape, float32)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    sd = torch.as_tensor(sigma_data, dtype=torch.float32, device=sigma.device)
    c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
    c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
    c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """EDM-preconditioned denoiser ``D(x, σ)`` (Karras et al. 2022, eq. 7, Table 1).

    ``net(x, c_noise)`` is any backbone from `bootdiff.nets.make_net`. The net runs in the
    input's dtype; the output is float32 (``F`` cast to float32 before the skip combination, as
    NVlabs/edm). ``sigma_data`` is a buffer, so it is part of the ``state_dict``.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        if not float(sigma_data) > 0:
            raise ValueError(f"EDMPrecond: sigma_data must be > 0, got {sigma_data}")
        self.net = net
        self.register_buffer("sigma_data", torch.tensor(float(sigma_data), dtype=torch.float32))

    def forward(self, x: torch.Tensor, sigma) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        sigma = _sigma_vector(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data.float())
        F_x = self.net((_col(c_in, x) * x).to(dtype), c_noise)
        return _col(c_skip, x) * x + _col(c_out, x) * F_x.to(torch.float32)


class ResidualPrecond(nn.Module):
    """Residual denoiser ``R_θ(x_σ, D_comb, σ)`` of bootstrapping diffusion (unit-scale output).

    The net is built with ``in_channels = 2·C`` and sees the channel concat
    ``[c_in(σ)·x_σ, D_comb/σ_data]`` (both ~unit variance) and ``c_noise = ln σ / 4``. The raw
    net output (float32) is ``R``; the caller scales it by the range adapter ``r(σ)``.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        if not float(sigma_data) > 0:
            raise ValueError(f"ResidualPrecond: sigma_data must be > 0, got {sigma_data}")
        self.net = net
        self.register_buffer("sigma_data", torch.tensor(float(sigma_data), dtype=torch.float32))

    def forward(self, x: torch.Tensor, sigma, d_comb: torch.Tensor) -> torch.Tensor:
        if d_comb.shape != x.shape:
            raise ValueError(f"ResidualPrecond: d_comb shape {tuple(d_comb.shape)} != x shape "
                             f"{tuple(x.shape)}")
        dtype = x.dtype
        x = x.to(torch.float32)
        sigma = _sigma_vector(sigma, x)
        sd = self.sigma_data.float()
        _, _, c_in, c_noise = edm_coefficients(sigma, sd)
        inp = torch.cat([_col(c_in, x) * x, d_comb.to(torch.float32) / sd], dim=1)
        return self.net(inp.to(dtype), c_noise).to(torch.float32)


def measure_sigma_data(batches: Iterable[torch.Tensor], max_batches: Optional[int] = None) -> float:
    """Standard deviation (population, over every element) of the data in ``batches``.

    Streaming and numerically stable: per-batch (count, mean, M2) in float64 merged with Chan et
    al.'s parallel update, so nothing is concatenated. Stops after ``max_batches`` if given.
    """
    count, mean, m2 = 0, 0.0, 0.0
    for i, x in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        if not torch.is_tensor(x):
            raise TypeError(f"measure_sigma_data: batch {i} is a {type(x).__name__}, not a tensor")
        x = x.detach().to(torch.float64).reshape(-1)
        n = x.numel()
        if n == 0:
            continue
        b_mean = x.mean().item()
        b_m2 = ((x - b_mean) ** 2).sum().item()
        delta = b_mean - mean
        total = count + n
        mean += delta * n / total
        m2 += b_m2 + delta * delta * count * n / total
        count = total
    if count == 0:
        raise ValueError("measure_sigma_data: no data (empty iterator or empty batches)")
    return math.sqrt(m2 / count)


class RangeAdapter(nn.Module):
    """The range adapter ``r(σ)``: piecewise linear in log σ (bootstrapping diffusion).

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
        """The "off" setting: r(σ) = 1 everywhere (same arguments as the constructor)."""
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
def estimate_range_adapter(d_comb: Callable, batches: Iterable[torch.Tensor], sigma_min: float,
                           sigma_max: float, num_bins: int = 100, samples_per_bin: int = 64,
                           max_batches: Optional[int] = None,
                           generator: Optional[torch.Generator] = None,
                           device=None) -> RangeAdapter:
    """Range adapter whose value at each interval centre σ_i is the per-element RMS of
    ``x − D_comb(x + σ_i·n; σ_i)`` over full-resolution data ``x`` (bootstrapping diffusion).

    Reads batches until ``samples_per_bin`` samples (or ``max_batches`` batches) have been used;
    every sample is evaluated at every centre, with noise from ``generator``.
    """
    adapter = RangeAdapter.from_sigma_range(sigma_min, sigma_max, torch.zeros(num_bins))
    sigmas = adapter.centres().tolist()
    sq = torch.zeros(num_bins, dtype=torch.float64)
    count, seen = 0, 0
    for b, x in enumerate(batches):
        if (max_batches is not None and b >= max_batches) or seen >= samples_per_bin:
            break
        if not torch.is_tensor(x):
            raise TypeError(f"estimate_range_adapter: batch {b} is a {type(x).__name__}, not a tensor")
        x = x.to(device if device is not None else x.device)
        x = (x if x.is_floating_point() else x.float())[: samples_per_bin - seen]
        for i, s in enumerate(sigmas):
            gen_dev = generator.device if generator is not None else x.device
            n = torch.randn(x.shape, generator=generator, device=gen_dev).to(x.device, x.dtype)
            sig = torch.full((x.shape[0],), s, device=x.device, dtype=x.dtype)
            err = x - d_comb(x + s * n, sig).to(x.dtype)
            sq[i] += err.double().pow(2).sum().item()
        count += x.numel()
        seen += x.shape[0]
    if count == 0:
        raise ValueError("estimate_range_adapter: no data (empty iterator)")
    adapter.values.copy_((sq / count).sqrt().float())
    return adapter
