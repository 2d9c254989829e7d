"""Non-leaking augmentation of a scarce training set (Karras et al. 2022, "Elucidating the Design
Space of Diffusion-Based Generative Models", §5 and Appendix F.2; NVlabs/edm ``training/augment.py``,
its geometric part).

Each training image is, independently and each with probability ``p``: flipped left–right, flipped
up–down, rotated by a multiple of 90° (square images), and shifted by a whole number of pixels (up
to 1/8 of its side; the edge reflected into the gap). The network is told what was done, as the
augmentation label vector of `augment` fed as a conditioning input (`bootdiff.nets.ImageUNet`,
``augment_dim``), and it is sampled with the labels at zero — no augmentation. So the augmentations
do not leak into the generated images however unnatural they are for the data (an upside-down
digit): the network learns the augmented images as a *separate* conditional distribution whose
shared weights regularise the one it is sampled from. This is how EDM trains on small datasets
(CIFAR-10 at 50k images and below); here it is for the N full-resolution images of stage 2, the
full-res baseline and its peers (``train.augment``).

Labels (``[N, AUGMENT_DIM]``, all zero for an image left as it was):
``[xflip, yflip, cos(kπ/2) − 1, sin(kπ/2), tx / W, ty / H]`` — the flips as 0/1, the rotation by
k quarter turns (counter-clockwise, `torch.rot90`), the shift in pixels as a fraction of the side.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

AUGMENT_DIM = 6
MAX_SHIFT = 0.125  # of the side, as EDM's translate_int_max


def net_augment_dim(p: float) -> int:
    """The width of the augmentation input a net trained with ``train.augment = p`` gets (0: none)."""
    return AUGMENT_DIM if p > 0 else 0


def _uniform(shape, generator: Optional[torch.Generator]) -> torch.Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.rand(shape, generator=generator, device=device).cpu()


def augment(x: torch.Tensor, p: float, generator: Optional[torch.Generator] = None
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x_aug, labels)`` for a batch of images ``x`` ``[N, C, H, W]``: each of the four
    transformations of the module docstring applied to each image with probability ``p``, the
    random numbers drawn from ``generator`` (one ``[N, 8]`` draw per call, whatever ``p``).
    ``labels`` is ``[N, AUGMENT_DIM]`` on ``x``'s device, in ``x``'s dtype."""
    if x.ndim != 4:
        raise ValueError(f"train.augment: augmentation is for images [N, C, H, W], got a batch of shape "
                         f"{tuple(x.shape)} (clips are not augmented)")
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"train.augment={p}: the probability of each augmentation must be in [0, 1]")
    n, _, h, w = x.shape
    u = _uniform((n, 8), generator)
    on = u[:, :4] < float(p)  # which of xflip, yflip, rotate, shift each image gets
    xflip = on[:, 0] & (u[:, 4] < 0.5)
    yflip = on[:, 1] & (u[:, 5] < 0.5)
    quarter = torch.where(on[:, 2] & (h == w), 1 + (u[:, 6] * 3).long().clamp(max=2), 0)  # 1..3 when on
    pad = (int(MAX_SHIFT * h), int(MAX_SHIFT * w))
    # shift: one uniform number picks (ty, tx) in the (2·pad_h + 1) × (2·pad_w + 1) grid of offsets
    cells = (2 * pad[0] + 1) * (2 * pad[1] + 1)
    cell = (u[:, 7] * cells).long().clamp(max=cells - 1)
    ty = torch.where(on[:, 3], cell // (2 * pad[1] + 1) - pad[0], 0)
    tx = torch.where(on[:, 3], cell % (2 * pad[1] + 1) - pad[1], 0)
    out = []
    for i in range(n):
        img = x[i]
        if xflip[i]:
            img = img.flip(-1)
        if yflip[i]:
            img = img.flip(-2)
        if quarter[i]:
            img = torch.rot90(img, int(quarter[i]), dims=(-2, -1))
        if ty[i] or tx[i]:
            padded = F.pad(img[None], (pad[1], pad[1], pad[0], pad[0]), mode="reflect")[0]
            top, left = pad[0] - int(ty[i]), pad[1] - int(tx[i])
            img = padded[:, top:top + h, left:left + w]
        out.append(img)
    angle = quarter.double() * (math.pi / 2)
    labels = torch.stack([xflip.double(), yflip.double(), torch.cos(angle) - 1, torch.sin(angle),
                          tx.double() / w, ty.double() / h], dim=1)
    labels = torch.where(labels.abs() < 1e-12, torch.zeros_like(labels), labels)  # cos(2π/2·2)−1 etc. exactly 0
    return torch.stack(out), labels.to(device=x.device, dtype=x.dtype)
