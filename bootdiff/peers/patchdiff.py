"""Patch Diffusion (Wang et al. 2023, "Patch Diffusion: Faster and More Data-Efficient Training of
Diffusion Models"): one full-resolution denoiser that is told where its input lies in the image
by two coordinate channels, trained on crops of several sizes and on whole images.

The denoiser (`bootdiff.precond.CoordPrecond`) is EDM's (eq. 7, Table 1; docs/METHOD.md §2) with the backbone
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

The loss is the EDM loss of that micro-batch (`bootdiff.losses.CoordLoss`). Network and training: ``full_res``'s
(the backbone built with two more input channels), except ``full_res.train.augment``: a flipped or
rotated crop would no longer lie where its coordinates say, so Patch Diffusion is not augmented.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from bootdiff.losses import CoordLoss
from bootdiff.precond import CoordPrecond

KINDS = ("full", "patch", "crop")


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
    from bootdiff.config.peer_views import pick_view

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

