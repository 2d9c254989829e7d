"""Patch Diffusion (Wang et al. 2023, "Patch Diffusion: Faster and More Data-Efficient Training of
Diffusion Models"): one full-resolution denoiser that is told where its input lies in the image
by two coordinate channels, trained on crops of several sizes and on whole images.

The denoiser (`CoordPrecond`) is EDM's (eq. 7, Table 1; docs/METHOD.md §2) with the backbone
given ``[c_in·x, u, v]``: ``u``, ``v`` the pixel-centre coordinates of each input pixel in the
full image, scaled to [−1, 1] (``2·(row + ½)/H − 1``, likewise for columns). The coordinates are
conditioning, not signal: they are not noised or scaled, and the output has the image's
channels only. ``D(x, σ)`` without a position is the whole image (crop at (0, 0) of full size),
so the samplers and G use it unchanged; sampling is at full size.

Each micro-batch is one of three kinds, drawn per micro-batch from a generator seeded by its
index (so a resumed run continues exactly):

* with probability ``full_share``: the N full-res images, whole;
* with probability ``patch_share``: the patch view's samples from the partial pool, at the
  ``location`` (row, col) ingest recorded for each;
* otherwise: random crops of the N images, of a size drawn from ``crop_sizes`` (default half
  the image side), at uniform random locations.

The loss is the EDM loss of that micro-batch (`CoordLoss`). Network and training: ``full_res``'s
(the backbone built with two more input channels).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from bootdiff.losses import check_weighting, noisy_batch, per_sample_mean
from bootdiff.precond import edm_coefficients
from bootdiff.schedules import weighting
from bootdiff.util import broadcast_sigma

KINDS = ("full", "patch", "crop")


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


class CoordPrecond(nn.Module):
    """``D(x, σ, pos=None)``: EDM preconditioning (eq. 7) around a backbone with two coordinate
    input channels (module docstring). ``image_size`` (H, W) is the full image's; ``pos`` ``[N, 2]``
    the crops' top-left (row, col), None for whole images."""

    def __init__(self, net: nn.Module, sigma_data: float, image_size: Sequence[int]):
        super().__init__()
        if not float(sigma_data) > 0:
            raise ValueError(f"CoordPrecond: sigma_data must be > 0, got {sigma_data}")
        self.net = net
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.register_buffer("sigma_data", torch.tensor(float(sigma_data), dtype=torch.float32))

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


class CoordLoss:
    """``loss(D, (x, pos), generator) -> [N]``: the EDM loss (eq. 2) of a micro-batch of crops at
    ``pos`` (or whole images, ``pos`` of zeros at full size), σ ~ p_train."""

    def __init__(self, loss_cfg, sigma_data: float):
        self.loss_cfg, self.sigma_data = loss_cfg, float(sigma_data)
        self.weighting = check_weighting(loss_cfg.weighting)
        self.last_sigma: Optional[torch.Tensor] = None

    def __call__(self, D, batch, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        x, pos = batch
        sigma, x_noisy = noisy_batch(x, self.loss_cfg, generator)
        self.last_sigma = sigma.detach()
        lam = weighting(sigma, self.sigma_data, self.weighting)
        return lam * per_sample_mean((D(x_noisy, sigma, pos) - x) ** 2)


def crop_sizes(pcfg, image_size: Tuple[int, int]) -> List[int]:
    """The random crops' sides: ``peers.patchdiff.crop_sizes``, or half the image side."""
    sizes = [int(s) for s in pcfg.crop_sizes] or [min(image_size) // 2]
    for s in sizes:
        if not 0 < s <= min(image_size):
            raise ValueError(f"peers.patchdiff.crop_sizes: {s} is not a side in (0, {min(image_size)}]")
    return sizes


def batch_kind(seed: int, i: int, full_share: float, patch_share: float) -> str:
    """The kind of micro-batch ``i`` (`KINDS`), a function of (seed, i) alone."""
    u = torch.rand((), generator=torch.Generator().manual_seed(seed * 1_000_003 + i)).item()
    return "full" if u < full_share else ("patch" if u < full_share + patch_share else "crop")


def random_crops(x: torch.Tensor, size: int, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """``size``×``size`` crops of each image of ``x`` at uniform random top-left positions -> (crops, pos)."""
    n, H, W = x.shape[0], x.shape[-2], x.shape[-1]
    pos = torch.stack([torch.randint(0, H - size + 1, (n,), generator=gen),
                       torch.randint(0, W - size + 1, (n,), generator=gen)], dim=1)
    crops = torch.stack([x[k, :, r:r + size, c:c + size] for k, (r, c) in enumerate(pos.tolist())])
    return crops, pos


def patchdiff_data(cfg, manifest: dict, tcfg, patch_view: str, rank: int = 0, world_size: int = 1):
    """``data(start_step) -> iterator`` of ``(x, pos)`` micro-batches (module docstring): the
    ``full`` split's stream feeds whole images and random crops, the patch view's stream (with
    its recorded locations) the patch batches; each stream is positioned by how many micro-batches
    of its kinds came before ``start_step``."""
    from bootdiff import experiment

    p = cfg.peers.patchdiff
    shape = experiment.full_shape(manifest)
    sizes = crop_sizes(p, tuple(shape[-2:]))
    full = experiment.train_data(cfg, manifest, "full", tcfg, rank, world_size)
    patches = experiment.train_data(cfg, manifest, patch_view, tcfg, rank, world_size, with_meta=True)
    seed = int(tcfg.seed) * 7919 + rank

    def data(start_step: int):
        first = start_step * tcfg.accum_steps
        kinds = [batch_kind(seed, i, p.full_share, p.patch_share) for i in range(first)]
        n_patch = kinds.count("patch")
        full_it = iter(full((first - n_patch) // tcfg.accum_steps))
        for _ in range((first - n_patch) % tcfg.accum_steps):
            next(full_it)
        patch_it = iter(patches(n_patch // tcfg.accum_steps))
        for _ in range(n_patch % tcfg.accum_steps):
            next(patch_it)
        i = first
        while True:
            kind = batch_kind(seed, i, p.full_share, p.patch_share)
            if kind == "patch":
                x, metas = next(patch_it)
                pos = torch.tensor([[int(v) for v in m["location"]] for m in metas], dtype=torch.long)
                yield x, pos
            else:
                x = next(full_it)
                if kind == "full":
                    yield x, torch.zeros((x.shape[0], 2), dtype=torch.long)
                else:
                    gen = torch.Generator().manual_seed(seed * 1_000_003 + i + 1)
                    size = sizes[int(torch.randint(len(sizes), (), generator=gen))]
                    yield random_crops(x, size, gen)
            i += 1

    return data


def kind_shares(pcfg) -> dict:
    """{kind: probability} of the micro-batch kinds."""
    if not (pcfg.full_share > 0 and pcfg.patch_share >= 0 and pcfg.full_share + pcfg.patch_share <= 1):
        raise ValueError(f"peers.patchdiff: full_share={pcfg.full_share}, patch_share={pcfg.patch_share}: "
                         "need full_share > 0, patch_share >= 0 and their sum <= 1")
    return {"full": pcfg.full_share, "patch": pcfg.patch_share, "crop": 1 - pcfg.full_share - pcfg.patch_share}


def build_patchdiff_denoiser(cfg, manifest: dict) -> CoordPrecond:
    """``full_res.net`` with ``C + 2`` input channels, in `CoordPrecond` at the full-res σ_data."""
    from bootdiff import experiment
    from bootdiff.nets import make_net

    info = experiment.view_info(manifest, "full")
    shape = tuple(info["shape"])
    if len(shape) != 3:
        raise ValueError(f"peers.patchdiff: images only, the full-res samples are {shape}")
    net = make_net(cfg.full_res.net, in_channels=shape[0] + 2, out_channels=shape[0], resolution=shape[-1],
                   seed=cfg.full_res.train.seed)
    return CoordPrecond(net, float(info["sigma_data"]), shape[-2:])


def patchdiff_training(cfg, manifest: dict, rank: int = 0, world_size: int = 1):
    """(model, loss_fn, data) of the Patch Diffusion peer, as `bootdiff.experiment.view_training`
    gives a view's."""
    from bootdiff.config.check import pick_view

    p = cfg.peers.patchdiff
    kind_shares(p)
    view = pick_view(cfg, "patch", p.patch_view, key="peers.patchdiff.patch_view")
    model = build_patchdiff_denoiser(cfg, manifest)
    loss = CoordLoss(cfg.full_res.train.loss, float(model.sigma_data))
    return model, loss, patchdiff_data(cfg, manifest, cfg.full_res.train, view, rank, world_size)


def expected_step_flops(flops_of_kind: dict, pcfg) -> float:
    """FLOPs per optimizer step in expectation over the micro-batch kinds (their shares)."""
    shares = kind_shares(pcfg)
    return sum(shares[k] * flops_of_kind[k] for k in KINDS if shares[k] > 0)

