"""EDM preconditioning and σ_data (docs/METHOD.md §2).

- `EDMPrecond`: Karras et al. 2022 ("Elucidating the design space...", EDM), Table 1 / eq. 7:
  ``D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ))`` with
  ``c_skip = σd²/(σ²+σd²)``, ``c_out = σ·σd/√(σ²+σd²)``, ``c_in = 1/√(σ²+σd²)``,
  ``c_noise = ln(σ)/4`` (`edm_coefficients`).
- `measure_sigma_data`: σ_data of a view's data (streaming std, float64).

The residual denoiser's preconditioning and the range adapter of stage 2 are in
`bootdiff.residual` (METHOD §4, §5).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import nn

from bootdiff.util import broadcast_sigma


def edm_coefficients(sigma: torch.Tensor, sigma_data):
    """(c_skip, c_out, c_in, c_noise) of EDM Table 1 (METHOD §2) for a σ tensor (any shape, float32)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    sd = torch.as_tensor(sigma_data, dtype=torch.float32, device=sigma.device)
    c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
    c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
    c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """EDM-preconditioned denoiser ``D(x, σ)`` (METHOD §2; Karras et al. 2022, eq. 7, Table 1).

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
        sigma = broadcast_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data.float())
        c_skip, c_out, c_in = (broadcast_sigma(c, x, column=True) for c in (c_skip, c_out, c_in))
        F_x = self.net((c_in * x).to(dtype), c_noise)
        return c_skip * x + c_out * F_x.to(torch.float32)


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
