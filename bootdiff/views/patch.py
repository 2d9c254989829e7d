"""Patch views: ``p×p`` crops on a grid or at random (`PatchView`), and the crops that miss a
corruption mask (`MaskedPatchView`, the clean parts of watermarked images); docs/METHOD.md §1."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from bootdiff.views.base import (IntPair, IndexCache, View, as_pair, bad_value, check_at_least_1, check_ndim, config_value,
                                 kind_name, window_starts)


# ----------------------------------------------------------------------------- patches


class PatchView(View):
    """``p×p`` crops at ``L`` top-left locations (``A`` = crop, ``c = 1``, lift = paste and sum).

    ``locations`` ``[L, 2]`` (row, col) explicit, or a grid with ``stride`` (default: the patch
    size) whose last row/column is snapped to the border so the grid covers the whole image.
    Images ``[N, C, H, W]`` -> patches ``[N*L, C, p, p]`` (sample-major). Ingest cuts
    ``per_sample`` crops at uniform random locations and records ``location`` (row, col).
    """

    kind = "patch"
    draws_per_sample = True

    def __init__(self, image_size: IntPair, patch_size: IntPair, stride: Optional[IntPair] = None,
                 locations: Optional[Union[torch.Tensor, Sequence[Sequence[int]]]] = None):
        self.image_size = as_pair(image_size, "image_size")
        self.patch_size = as_pair(patch_size, "patch_size")
        H, W = self.image_size
        ph, pw = self.patch_size
        if ph > H or pw > W:
            raise ValueError(f"patch_size {self.patch_size} larger than image_size {self.image_size}")
        if locations is None:
            sh, sw = as_pair(stride if stride is not None else self.patch_size, "stride")
            rows, cols = window_starts(H, ph, sh), window_starts(W, pw, sw)
            locations = [(r, c) for r in rows for c in cols]
        locations = torch.as_tensor(locations, dtype=torch.long).reshape(-1, 2)
        if locations.shape[0] == 0:
            raise ValueError("PatchView needs at least one location")
        bad = ((locations[:, 0] < 0) | (locations[:, 0] > H - ph)
               | (locations[:, 1] < 0) | (locations[:, 1] > W - pw))
        if bad.any():
            raise ValueError(f"patch locations {locations[bad].tolist()} fall outside the "
                             f"{H}x{W} image for {ph}x{pw} patches")
        self.locations = locations
        self.stride = stride
        # Flat pixel index of every patch element: [L * ph * pw], patch-major then row-major.
        r = locations[:, 0, None, None] + torch.arange(ph)[None, :, None]
        c = locations[:, 1, None, None] + torch.arange(pw)[None, None, :]
        self._index = IndexCache((r * W + c).reshape(-1))

    @property
    def num_locations(self) -> int:
        return int(self.locations.shape[0])

    def random_locations(self, L: int, generator: Optional[torch.Generator] = None) -> "PatchView":
        """A new ``PatchView`` of the same sizes with ``L`` top-left corners drawn uniformly."""
        H, W = self.image_size
        ph, pw = self.patch_size
        rows = torch.randint(0, H - ph + 1, (L,), generator=generator)
        cols = torch.randint(0, W - pw + 1, (L,), generator=generator)
        return PatchView(self.image_size, self.patch_size, locations=torch.stack([rows, cols], 1))

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(f"{type(self).__name__}: expected images [N, C, {self.image_size[0]}, "
                             f"{self.image_size[1]}], got shape {tuple(x.shape)}")

    def project(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        N, C, H, W = x.shape
        (ph, pw), L = self.patch_size, self.num_locations
        y = x.reshape(N, C, H * W)[:, :, self._index.on(x.device)]  # [N, C, L*ph*pw]
        return y.reshape(N, C, L, ph, pw).transpose(1, 2).reshape(N * L, C, ph, pw)

    def lift(self, y: torch.Tensor) -> torch.Tensor:
        (ph, pw), L = self.patch_size, self.num_locations
        if y.ndim != 4 or tuple(y.shape[-2:]) != (ph, pw) or y.shape[0] % L:
            raise ValueError(f"{type(self).__name__}.lift: expected patches [N*{L}, C, {ph}, {pw}], "
                             f"got shape {tuple(y.shape)}")
        N, C = y.shape[0] // L, y.shape[1]
        H, W = self.image_size
        flat = y.reshape(N, L, C, ph * pw).transpose(1, 2).reshape(N, C, L * ph * pw)
        out = y.new_zeros(N, C, H * W)
        out.index_add_(2, self._index.on(y.device), flat)
        return out.reshape(N, C, H, W)

    @classmethod
    def check_config(cls, name: str, vcfg, sample_shape: Tuple[int, ...]) -> None:
        """Images only; ``1 ≤ patch_size ≤ min(H, W)``; ``per_sample ≥ 1``; ``stride`` None or ≥ 1."""
        check_ndim(name, kind_name(config_value(vcfg, "kind")), sample_shape, 3)
        check_at_least_1(name, vcfg, "patch_size", "per_sample")
        check_at_least_1(name, vcfg, "stride", optional=True)
        p, (H, W) = int(config_value(vcfg, "patch_size")), sample_shape[-2:]
        if p > min(H, W):
            raise bad_value(name, "patch_size", p, f"larger than the data's {H}x{W} samples")

    @classmethod
    def from_config(cls, vcfg, sample_shape: Tuple[int, ...], mask=None) -> "PatchView":
        return PatchView(sample_shape[-2:], int(vcfg.patch_size), stride=vcfg.stride)

    def config(self) -> Dict[str, Any]:
        return {"kind": self.kind, "patch_size": self.patch_size[0]}

    @classmethod
    def cut(cls, x: np.ndarray, spec: Dict[str, Any], rng: np.random.Generator,
            mask: Optional[np.ndarray] = None) -> List[tuple]:
        p, n = spec["patch_size"], spec["per_sample"]
        locs = cls._draw_locations(x.shape[-2], x.shape[-1], p, n, rng, mask)
        return [(x[..., r:r + p, c:c + p], {"location": [int(r), int(c)]}) for r, c in locs]

    @staticmethod
    def _draw_locations(h: int, w: int, p: int, n: int, rng: np.random.Generator,
                        mask: Optional[np.ndarray]) -> np.ndarray:
        """``n`` uniform top-left corners ``[n, 2]`` (rows drawn first, then columns)."""
        return np.stack([rng.integers(0, h - p + 1, n), rng.integers(0, w - p + 1, n)], 1)

    def to_json(self) -> Dict[str, Any]:
        return {"class": "PatchView", "image_size": list(self.image_size),
                "patch_size": list(self.patch_size), "locations": self.locations.tolist()}

    @classmethod
    def from_json(cls, d: Dict[str, Any], where: str) -> "PatchView":
        return PatchView(d["image_size"], d["patch_size"], locations=d["locations"])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(image_size={self.image_size}, patch_size={self.patch_size}, "
                f"L={self.num_locations})")


def _clean_locations(mask: Optional[np.ndarray], h: int, w: int, p: int) -> np.ndarray:
    """Top-left (row, col) of every ``p×p`` window that misses ``mask`` (True = corrupted)."""
    rows, cols = np.meshgrid(np.arange(h - p + 1), np.arange(w - p + 1), indexing="ij")
    locs = np.stack([rows.ravel(), cols.ravel()], 1)
    if mask is None:
        return locs
    ii = np.pad(np.cumsum(np.cumsum(mask.astype(np.int64), 0), 1), ((1, 0), (1, 0)))
    s = ii[p:, p:] - ii[:-p, p:] - ii[p:, :-p] + ii[:-p, :-p]  # corrupted pixels per window
    return locs[s.ravel() == 0]


def _coarse_mask(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """A pixel mask at latent resolution ``h×w``: a latent pixel is corrupted if any pixel under
    it is."""
    fh, fw = mask.shape[0] // h, mask.shape[1] // w
    return mask[:h * fh, :w * fw].reshape(h, fh, w, fw).any(axis=(1, 3))


class MaskedPatchView(PatchView):
    """The patch grid restricted to patches that miss the corruption mask (kind ``clean_patch``).

    ``mask`` ``[H, W]`` bool, True = corrupted (watermark, subtitle band). A patch is kept iff
    none of its pixels is corrupted. Raises if no patch is clean. Ingest cuts ``per_sample``
    crops drawn among all the windows that miss the source sample's mask (with replacement when
    fewer are clean; none when no window is clean); the mask of a pixel sample is reduced to
    latent resolution for latents.
    """

    kind = "clean_patch"
    uses_mask = True

    def __init__(self, image_size: IntPair, patch_size: IntPair, mask: torch.Tensor,
                 stride: Optional[IntPair] = None):
        grid = PatchView(image_size, patch_size, stride=stride)
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool or tuple(mask.shape) != grid.image_size:
            raise ValueError(f"MaskedPatchView: mask must be a bool tensor of shape "
                             f"{grid.image_size}, got {mask.dtype} {tuple(mask.shape)}")
        hit = grid.project(mask.reshape(1, 1, *mask.shape).to(torch.float32))  # [L, 1, p, p]
        keep = hit.reshape(grid.num_locations, -1).sum(1) == 0
        if not keep.any():
            raise ValueError(f"MaskedPatchView: every {grid.patch_size} patch of the grid touches "
                             f"the mask ({int(mask.sum())} corrupted pixels)")
        super().__init__(image_size, patch_size, stride=stride, locations=grid.locations[keep])
        self.mask = mask

    @classmethod
    def from_config(cls, vcfg, sample_shape: Tuple[int, ...], mask=None) -> PatchView:
        """With a ``mask``, the clean part of the grid; without (clean evaluation samples), the
        plain patch grid."""
        if mask is None:
            return PatchView.from_config(vcfg, sample_shape)
        return cls(sample_shape[-2:], int(vcfg.patch_size), mask, stride=vcfg.stride)

    @staticmethod
    def _draw_locations(h: int, w: int, p: int, n: int, rng: np.random.Generator,
                        mask: Optional[np.ndarray]) -> np.ndarray:
        if mask is not None and mask.shape != (h, w):
            mask = _coarse_mask(mask, h, w)
        valid = _clean_locations(mask, h, w, p)
        if len(valid) == 0:
            return valid
        return valid[rng.choice(len(valid), size=n, replace=len(valid) < n)]

    def to_json(self) -> Dict[str, Any]:
        return {"class": "MaskedPatchView", "image_size": list(self.image_size),
                "patch_size": list(self.patch_size), "stride": self.stride,
                "locations": self.locations.tolist(),
                "mask": [[int(b) for b in row] for row in self.mask.tolist()]}

    @classmethod
    def from_json(cls, d: Dict[str, Any], where: str) -> "MaskedPatchView":
        view = cls(d["image_size"], d["patch_size"], torch.tensor(d["mask"], dtype=torch.bool),
                   stride=d["stride"])
        if view.locations.tolist() != d["locations"]:
            raise ValueError(f"{where}: the mask and stride do not give the saved patch locations")
        return view
