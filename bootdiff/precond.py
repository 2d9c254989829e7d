"""EDM preconditioning and σ_data (docs/METHOD.md §2).

- `EDMPrecond`: Karras et al. 2022 ("Elucidating the design space...", EDM), Table 1 / eq. 7:
  ``D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ))`` with
  ``c_skip = σd²/(σ²+σd²)``, ``c_out = σ·σd/√(σ²+σd²)``, ``c_in = 1/√(σ²+σd²)``,
  ``c_noise = ln(σ)/4`` (`edm_coefficients`).
- `CoordPrecond`: the same around a backbone given two coordinate channels, where its input lies
  in the full image (`coordinate_channels`; Patch Diffusion, Wang et al. 2023).
- `measure_sigma_data`: σ_data of a view's data (streaming std, float64).

The residual denoiser's preconditioning and the range adapter of stage 2 are in
`bootdiff.residual` (METHOD §4, §5).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Tuple

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

    def forward(self, x: torch.Tensor, sigma, augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``D(x; σ)``; ``augment_labels`` (training with `bootdiff.augment` only) go to the net."""
        dtype = x.dtype
        x = x.to(torch.float32)
        sigma = broadcast_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data.float())
        c_skip, c_out, c_in = (broadcast_sigma(c, x, column=True) for c in (c_skip, c_out, c_in))
        extra = () if augment_labels is None else (augment_labels,)
        F_x = self.net((c_in * x).to(dtype), c_noise, *extra)
        return c_skip * x + c_out * F_x.to(torch.float32)


def coordinate_channels(pos: torch.Tensor, size: Tuple[int, int], image_size: Tuple[int, int],
                        device=None, dtype=torch.float32) -> torch.Tensor:
    """``[N, 2, h, w]``: for crops of ``size`` (h, w) at top-left ``pos`` ``[N, 2]`` (row, col) of an
    image of ``image_size`` (H, W), each pixel centre's row and column in the full image, in [−1, 1]."""
    (h, w), (H, W) = size, image_size
    pos = pos.to(device=device, dtype=dtype)
    rows = (pos[:, 0, None] + torch.arange(h, device=device, dtype=dtype)[None] + 0.5) * (2 / H) - 1  # [N, h]
    cols = (pos[:, 1, None] + torch.arange(w, device=device, dtype=dtype)[None] + 0.5) * (2 / W) - 1  # [N, w]
    u = rows[:, :, None].expand(-1, h, w)
    v = cols[:, None, :].expand(-1, h, w)
    return torch.stack([u, v], dim=1)


class CoordPrecond(EDMPrecond):
    """``D(x, σ, pos=None)``: EDM preconditioning (eq. 7) around a backbone with two coordinate
    input channels ``[c_in·x, u, v]`` (`coordinate_channels`; Patch Diffusion, Wang et al. 2023):
    the coordinates are conditioning, not signal — not noised or scaled —, and the output has the
    image's channels only. ``image_size`` (H, W) is the full image's; ``pos`` ``[N, 2]`` the
    crops' top-left (row, col), None for whole images. The Patch Diffusion peer
    (`bootdiff.peers.patchdiff`) and position-aware patch views (``views.<v>.coords``) use it;
    `bootdiff.fusion` passes each grid patch's location (``takes_position``)."""

    takes_position = True

    def __init__(self, net: nn.Module, sigma_data: float, image_size: Sequence[int]):
        super().__init__(net, sigma_data)
        self.image_size = (int(image_size[0]), int(image_size[1]))

    def forward(self, x: torch.Tensor, sigma, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        if pos is None:
            if tuple(x.shape[-2:]) != self.image_size:
                raise ValueError(f"CoordPrecond: a {tuple(x.shape[-2:])} input needs its position "
                                 f"(pos) in the {self.image_size} image")
            pos = torch.zeros((x.shape[0], 2), dtype=torch.long)
        sigma = broadcast_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data.float())
        c_skip, c_out, c_in = (broadcast_sigma(c, x, column=True) for c in (c_skip, c_out, c_in))
        coords = coordinate_channels(pos, tuple(x.shape[-2:]), self.image_size, x.device)
        F_x = self.net(torch.cat([c_in * x, coords], dim=1).to(dtype), c_noise)
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
