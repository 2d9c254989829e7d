"""View kinds: each partial view's operator ``A_k`` and everything else about its kind.

docs/METHOD.md §1. Every view satisfies ``A_k A_kᵀ = c_k·I``, so a noisy full sample seen through
the view is a noisy view sample with white noise of level ``σ_k = σ·√c_k``. One class per kind,
registered in ``VIEW_CLASSES`` (kind -> class); ingest, export and config checks dispatch
through it. Each class has (docs/CONTRACTS.md):

- the operator (batched torch, device-agnostic): ``c``; ``project(x)`` = ``A x``, views with ``L``
  locations stacked on the batch axis sample-major (``y[n*L + l]`` = location ``l`` of sample
  ``n``); ``lift(y)`` = ``A⁺ y = Aᵀ y / c`` (overlaps summed); ``sigma_map(σ)`` = ``σ·√c`` repeated
  to ``project``'s batch; ``coverage(like)`` = ``A⁺A·1``, how many outputs cover each element
  (0 = uncovered; ``bootdiff.fusion.mosaic`` averages overlaps with it);
- config: ``check_config(name, vcfg, sample_shape)`` raises ``ValueError("views.<name>.<key>=
  <value>: …")`` for values that cannot fit full samples of that shape; ``from_config(vcfg,
  sample_shape, mask)`` builds the evaluation-time operator; ``config()`` the ViewConfig fields
  describing an operator;
- ingest (numpy, one channel-first full sample, uint8 pixels or float latents): ``cut(x, spec,
  rng, mask)`` the view samples of ``x`` as ``(array, meta)`` pairs, locations drawn from the
  task's ``numpy.random.Generator`` (``spec`` = `View.ingest_spec`, a plain dict shipped to
  workers); ``samples_per_source``, ``min_frames``, ``uses_mask`` (cut gets the corruption mask);
- export: ``to_json()`` / ``from_json(d, where)``, the parameters that rebuild it exactly.

Adding a view kind = one class here + its entry in ``VIEW_CLASSES`` and in the config's allowed
kinds (``bootdiff.config.ViewConfig.kind``).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from bootdiff.util import broadcast_sigma

IntPair = Union[int, Sequence[int]]
RESERVED_NAMES = ("full", "test")  # split names of the full-resolution data: not view names


def _pair(v: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(v, int):
        out = (v, v)
    else:
        out = tuple(int(a) for a in v)
        if len(out) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(out) <= 0:
        raise ValueError(f"{name} must be positive, got {v!r}")
    return out


def _starts(size: int, window: int, stride: int) -> list:
    """Window starts 0, stride, 2·stride, …; the last one snapped to ``size − window``."""
    if window > size:
        raise ValueError(f"window {window} larger than the axis it slides over ({size})")
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


class _IndexCache:
    """A CPU index tensor, cached per device."""

    def __init__(self, index: torch.Tensor):
        self._cpu = index
        self._by_device = {}

    def on(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._by_device:
            self._by_device[key] = self._cpu.to(device)
        return self._by_device[key]


# ----------------------------------------------------------------------------- config helpers


def kind_name(kind) -> str:
    """A view kind as a plain string (``ViewConfig.kind`` may be a str or a str-Enum member)."""
    return str(getattr(kind, "value", kind))


def _get(vcfg, key: str):
    """``vcfg.key`` of a ViewConfig / DictConfig, or ``vcfg[key]`` of an ingest spec dict."""
    return vcfg.get(key) if isinstance(vcfg, dict) else getattr(vcfg, key, None)


def _bad(name: str, key: str, value, why: str) -> ValueError:
    return ValueError(f"views.{name}.{key}={value}: {why}")


def _check_at_least_1(name: str, vcfg, *keys: str, optional: bool = False) -> None:
    for key in keys:
        value = _get(vcfg, key)
        if (value is None and not optional) or (value is not None and int(value) < 1):
            raise _bad(name, key, value, "must be an integer ≥ 1")


def _check_ndim(name: str, kind: str, shape: Tuple[int, ...], ndim: int) -> None:
    if len(shape) != ndim:
        want = "image samples [C, H, W]" if ndim == 3 else "video samples [C, T, H, W]"
        raise _bad(name, "kind", kind, f"needs {want}, but the data's samples have shape {shape}")


class View:
    """What every view kind has beyond its operator; see the module docstring."""

    kind = ""  # the ViewConfig.kind this class is built from (its VIEW_CLASSES key)
    c = 1.0
    num_locations = 1
    uses_mask = False  # ingest passes the source sample's corruption mask to ``cut``
    draws_per_sample = False  # ``cut`` draws ``per_sample`` random crops / clips (not one sample)

    def sigma_map(self, sigma) -> torch.Tensor:
        """``σ_k = σ·√c``, repeated sample-major once per location (a 0-d σ stays 0-d)."""
        return broadcast_sigma(sigma, repeat=self.num_locations) * math.sqrt(self.c)

    def coverage(self, like: torch.Tensor) -> torch.Tensor:
        """``A⁺A·1`` over ``like``'s shape."""
        return self.lift(self.project(torch.ones_like(like[:1]))).expand_as(like)

    @staticmethod
    def ingest_spec(vcfg) -> Dict[str, Any]:
        """The plain dict an ingest task carries (and fingerprints) for a view of ``vcfg``."""
        return {"kind": kind_name(_get(vcfg, "kind")), "patch_size": int(_get(vcfg, "patch_size")),
                "per_sample": int(_get(vcfg, "per_sample")), "factor": int(_get(vcfg, "factor")),
                "clip_len": int(_get(vcfg, "clip_len"))}

    @classmethod
    def samples_per_source(cls, spec: Dict[str, Any]) -> int:
        """How many view samples ``cut`` makes of one source sample (at most)."""
        return int(spec["per_sample"]) if cls.draws_per_sample else 1

    @classmethod
    def min_frames(cls, spec: Dict[str, Any]) -> int:
        """Frames a video source must have for this view (0: no requirement)."""
        return 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ----------------------------------------------------------------------------- full (identity)


class FullView(View):
    """The identity view (``A = I``, ``c = 1``): the full-resolution model seen as a view; also
    what ingest writes for the ``full`` and ``test`` splits."""

    kind = "full"

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def lift(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def coverage(self, like: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(like)

    @classmethod
    def check_config(cls, name: str, vcfg, sample_shape: Tuple[int, ...]) -> None:
        """Nothing to check: the identity fits any sample."""

    @classmethod
    def from_config(cls, vcfg, sample_shape: Tuple[int, ...], mask=None) -> "FullView":
        return cls()

    def config(self) -> Dict[str, Any]:
        return {"kind": self.kind}

    @classmethod
    def cut(cls, x: np.ndarray, spec: Dict[str, Any], rng: np.random.Generator,
            mask: Optional[np.ndarray] = None) -> List[tuple]:
        return [(x, {})]

    def to_json(self) -> Dict[str, Any]:
        return {"class": "FullView"}

    @classmethod
    def from_json(cls, d: Dict[str, Any], where: str) -> "FullView":
        return cls()


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
        self.image_size = _pair(image_size, "image_size")
        self.patch_size = _pair(patch_size, "patch_size")
        H, W = self.image_size
        ph, pw = self.patch_size
        if ph > H or pw > W:
            raise ValueError(f"patch_size {self.patch_size} larger than image_size {self.image_size}")
        if locations is None:
            sh, sw = _pair(stride if stride is not None else self.patch_size, "stride")
            rows, cols = _starts(H, ph, sh), _starts(W, pw, sw)
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
        self._index = _IndexCache((r * W + c).reshape(-1))

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
        _check_ndim(name, kind_name(_get(vcfg, "kind")), sample_shape, 3)
        _check_at_least_1(name, vcfg, "patch_size", "per_sample")
        _check_at_least_1(name, vcfg, "stride", optional=True)
        p, (H, W) = int(_get(vcfg, "patch_size")), sample_shape[-2:]
        if p > min(H, W):
            raise _bad(name, "patch_size", p, f"larger than the data's {H}x{W} samples")

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


# ----------------------------------------------------------------------------- low resolution


class DownsampleView(View):
    """Area (block-mean) downsampling by ``factor``: ``c = 1/f²``, ``σ_k = σ/f``.

    ``A`` averages each ``f×f`` block, so ``A Aᵀ = I/f²``; the lift ``Aᵀ/c`` is block-replicate
    (nearest) upsampling. Works on the last two axes of any ``[..., H, W]`` tensor (images or
    videos). Bilinear downsampling would break ``A Aᵀ ∝ I`` (docs/METHOD.md §1), hence area.
    Ingest stores the block means of each sample, rounded back to uint8 for pixels.
    """

    kind = "downsample"

    def __init__(self, factor: int):
        if int(factor) != factor or factor < 1:
            raise ValueError(f"DownsampleView: factor must be a positive int, got {factor!r}")
        self.factor = int(factor)
        self.c = 1.0 / self.factor**2

    def project(self, x: torch.Tensor) -> torch.Tensor:
        f = self.factor
        H, W = x.shape[-2:]
        if x.ndim < 3 or H % f or W % f:
            raise ValueError(f"DownsampleView(factor={f}): spatial size {H}x{W} of input shape "
                             f"{tuple(x.shape)} is not divisible by the factor")
        return x.reshape(*x.shape[:-2], H // f, f, W // f, f).mean(dim=(-3, -1))

    def lift(self, y: torch.Tensor) -> torch.Tensor:
        f = self.factor
        h, w = y.shape[-2:]
        up = y[..., :, None, :, None].expand(*y.shape[:-2], h, f, w, f)
        return up.reshape(*y.shape[:-2], h * f, w * f)

    def coverage(self, like: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(like)

    @classmethod
    def check_config(cls, name: str, vcfg, sample_shape: Tuple[int, ...]) -> None:
        """``factor ≥ 1`` dividing both spatial sizes (images or videos). Not checked: whether it
        divides a patch view's size — the split fusion does not need it (docs/METHOD.md §3)."""
        _check_at_least_1(name, vcfg, "factor")
        f, (H, W) = int(_get(vcfg, "factor")), sample_shape[-2:]
        if H % f or W % f:
            raise _bad(name, "factor", f, f"does not divide the data's sample size {H}x{W}")

    @classmethod
    def from_config(cls, vcfg, sample_shape: Tuple[int, ...], mask=None) -> "DownsampleView":
        return cls(int(vcfg.factor))

    def config(self) -> Dict[str, Any]:
        return {"kind": self.kind, "factor": self.factor}

    @classmethod
    def cut(cls, x: np.ndarray, spec: Dict[str, Any], rng: np.random.Generator,
            mask: Optional[np.ndarray] = None) -> List[tuple]:
        """The block means of ``x`` (float64 mean; uint8 input rounded back to uint8)."""
        f = spec["factor"]
        *lead, h, w = x.shape
        y = x.astype(np.float64).reshape(*lead, h // f, f, w // f, f).mean(axis=(-3, -1))
        y = np.clip(np.rint(y), 0, 255).astype(np.uint8) if x.dtype == np.uint8 else y.astype(x.dtype)
        return [(y, {"factor": f})]

    def to_json(self) -> Dict[str, Any]:
        return {"class": "DownsampleView", "factor": self.factor}

    @classmethod
    def from_json(cls, d: Dict[str, Any], where: str) -> "DownsampleView":
        return cls(d["factor"])

    def __repr__(self) -> str:
        return f"DownsampleView(factor={self.factor})"


# ----------------------------------------------------------------------------- video clips


class ClipView(View):
    """Windows of ``clip_len`` frames on axis 2 of videos ``[N, C, T, H, W]`` (``c = 1``).

    Starts every ``stride`` frames (default ``clip_len // 2``: the sliding window used at
    evaluation), the last window snapped to the end, or explicit ``starts``. ``project`` returns
    ``[N*L, C, clip_len, H, W]`` sample-major; ``lift`` pastes clips into the frame axis and sums.
    Ingest cuts ``per_sample`` windows at uniform random starts and records ``frames`` [t0, t1).
    """

    kind = "clip"
    draws_per_sample = True

    def __init__(self, num_frames: int, clip_len: int, stride: Optional[int] = None,
                 starts: Optional[Sequence[int]] = None):
        if clip_len <= 0 or clip_len > num_frames:
            raise ValueError(f"ClipView: clip_len {clip_len} must be in [1, num_frames={num_frames}]")
        self.num_frames, self.clip_len = int(num_frames), int(clip_len)
        if starts is None:
            self.stride = int(stride) if stride is not None else max(1, clip_len // 2)
            starts = _starts(num_frames, clip_len, self.stride)
        else:
            self.stride = stride
        starts = torch.as_tensor(starts, dtype=torch.long).reshape(-1)
        if starts.numel() == 0 or (starts < 0).any() or (starts > num_frames - clip_len).any():
            raise ValueError(f"ClipView: clip starts {starts.tolist()} invalid for {num_frames} "
                             f"frames and clip_len {clip_len}")
        self.starts = starts
        self._index = _IndexCache((starts[:, None] + torch.arange(clip_len)[None, :]).reshape(-1))

    @property
    def num_locations(self) -> int:
        return int(self.starts.shape[0])

    def random_starts(self, L: int, generator: Optional[torch.Generator] = None) -> "ClipView":
        """A new ``ClipView`` with ``L`` clip starts drawn uniformly."""
        starts = torch.randint(0, self.num_frames - self.clip_len + 1, (L,), generator=generator)
        return ClipView(self.num_frames, self.clip_len, starts=starts)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[2] != self.num_frames:
            raise ValueError(f"ClipView: expected videos [N, C, {self.num_frames}, H, W], got "
                             f"shape {tuple(x.shape)}")
        N, C, _, H, W = x.shape
        L, Tc = self.num_locations, self.clip_len
        y = x[:, :, self._index.on(x.device)]  # [N, C, L*Tc, H, W]
        return y.reshape(N, C, L, Tc, H, W).transpose(1, 2).reshape(N * L, C, Tc, H, W)

    def lift(self, y: torch.Tensor) -> torch.Tensor:
        L, Tc = self.num_locations, self.clip_len
        if y.ndim != 5 or y.shape[2] != Tc or y.shape[0] % L:
            raise ValueError(f"ClipView.lift: expected clips [N*{L}, C, {Tc}, H, W], got shape "
                             f"{tuple(y.shape)}")
        N, C, H, W = y.shape[0] // L, y.shape[1], y.shape[3], y.shape[4]
        flat = y.reshape(N, L, C, Tc, H, W).transpose(1, 2).reshape(N, C, L * Tc, H, W)
        out = y.new_zeros(N, C, self.num_frames, H, W)
        out.index_add_(2, self._index.on(y.device), flat)
        return out

    @classmethod
    def check_config(cls, name: str, vcfg, sample_shape: Tuple[int, ...]) -> None:
        """Videos only; ``1 ≤ clip_len ≤ T``; ``per_sample ≥ 1``; ``clip_stride`` None or ≥ 1."""
        _check_ndim(name, kind_name(_get(vcfg, "kind")), sample_shape, 4)
        _check_at_least_1(name, vcfg, "clip_len", "per_sample")
        _check_at_least_1(name, vcfg, "clip_stride", optional=True)
        if int(_get(vcfg, "clip_len")) > sample_shape[1]:
            raise _bad(name, "clip_len", _get(vcfg, "clip_len"),
                       f"longer than the data's videos ({sample_shape[1]} frames)")

    @classmethod
    def from_config(cls, vcfg, sample_shape: Tuple[int, ...], mask=None) -> "ClipView":
        return cls(sample_shape[1], int(vcfg.clip_len), stride=vcfg.clip_stride)

    def config(self) -> Dict[str, Any]:
        return {"kind": self.kind, "clip_len": self.clip_len}

    @classmethod
    def min_frames(cls, spec: Dict[str, Any]) -> int:
        return int(spec["clip_len"])

    @classmethod
    def cut(cls, x: np.ndarray, spec: Dict[str, Any], rng: np.random.Generator,
            mask: Optional[np.ndarray] = None) -> List[tuple]:
        L = spec["clip_len"]
        starts = rng.integers(0, x.shape[1] - L + 1, size=spec["per_sample"])
        return [(x[:, t:t + L], {"frames": [int(t), int(t) + L]}) for t in starts]

    def to_json(self) -> Dict[str, Any]:
        return {"class": "ClipView", "num_frames": self.num_frames, "clip_len": self.clip_len,
                "starts": self.starts.tolist()}

    @classmethod
    def from_json(cls, d: Dict[str, Any], where: str) -> "ClipView":
        return cls(d["num_frames"], d["clip_len"], starts=d["starts"])

    def __repr__(self) -> str:
        return f"ClipView(num_frames={self.num_frames}, clip_len={self.clip_len}, L={self.num_locations})"


# ----------------------------------------------------------------------------- registry


VIEW_CLASSES: Dict[str, type] = {"patch": PatchView, "downsample": DownsampleView, "clip": ClipView,
                                 "clean_patch": MaskedPatchView, "full": FullView}


def view_class(kind, name: str = "?") -> type:
    """The class of a view kind (str or str-Enum); an unknown kind names ``views.<name>.kind``."""
    kind = kind_name(kind)
    if kind not in VIEW_CLASSES:
        raise _bad(name, "kind", kind, f"unknown view kind {kind!r} (known: {', '.join(VIEW_CLASSES)})")
    return VIEW_CLASSES[kind]


def _sample_shape(sample_shape: Sequence[int]) -> Tuple[int, ...]:
    shape = tuple(int(s) for s in sample_shape)
    if len(shape) not in (3, 4):
        raise ValueError(f"sample_shape must be [C, H, W] or [C, T, H, W], got {shape}")
    return shape


def check_view_config(name: str, vcfg, sample_shape: Sequence[int]) -> None:
    """Check the view ``views.<name>`` (a ViewConfig, its DictConfig or an ingest spec dict)
    against full samples of ``sample_shape`` ((C, H, W) or (C, T, H, W); latent sizes when the
    data is latent). Raises ``ValueError("views.<name>.<key>=<value>: why")``. The names
    ``full`` and ``test`` are reserved for the full-resolution splits."""
    if name in RESERVED_NAMES:
        raise ValueError(f"views.{name}: the names {RESERVED_NAMES} are reserved for the "
                         "full-resolution splits; rename the view")
    view_class(_get(vcfg, "kind"), name).check_config(name, vcfg, _sample_shape(sample_shape))


def make_view(vcfg, sample_shape: Sequence[int], mask: Optional[torch.Tensor] = None, name: str = "?"):
    """The evaluation-time view of a ``bootdiff.config.ViewConfig`` for full samples of shape
    ``sample_shape`` (``[C, H, W]`` images or ``[C, T, H, W]`` videos; no batch axis), checked by
    `check_view_config` (``name`` is only used in its messages). ``clean_patch`` with a ``mask``
    gives a ``MaskedPatchView``, without one the plain patch grid."""
    shape = _sample_shape(sample_shape)
    cls = view_class(vcfg.kind, name)
    cls.check_config(name, vcfg, shape)
    return cls.from_config(vcfg, shape, mask)


def view_from_json(d: Dict[str, Any], where: str) -> View:
    """Rebuild a view operator from its ``to_json()`` dict (``where`` names it in errors)."""
    by_class = {cls.__name__: cls for cls in VIEW_CLASSES.values()}
    if d.get("class") not in by_class:
        raise ValueError(f"{where}: unknown view class {d.get('class')!r} (known: {', '.join(by_class)})")
    return by_class[d["class"]].from_json(d, where)
