"""View operators: linear maps ``A_k`` from a full sample to what a partial view observes.

DESIGN.md §1, table "Views". Every view satisfies ``A_k A_kᵀ = c_k·I`` so that a noisy full sample
seen through the view is a noisy view sample with white noise of level ``σ_k = σ·√c_k``.

Every view has the same small interface (docs/CONTRACTS.md):

- ``c``                      the constant of ``A Aᵀ = c·I``,
- ``project(x) -> y``        ``A x``; views with ``L`` locations stack them on the batch axis,
                             sample-major (``y[n*L + l]`` = location ``l`` of sample ``n``),
- ``lift(y) -> x``           ``A⁺ y = Aᵀ y / c`` (overlapping outputs are summed),
- ``sigma_map(sigma)``       ``σ·√c``, repeated to match ``project``'s batch,
- ``coverage(like)``         ``A⁺ A 1``: how many view outputs cover each element (0 = uncovered),
                             used to average overlaps (``bootdiff.fusion.mosaic``).

Batched and device-agnostic: index tensors are built on the CPU once and moved to ``x.device``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

IntPair = Union[int, Sequence[int]]


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


def _repeat_sigma(sigma, c: float, L: int) -> torch.Tensor:
    """``σ·√c`` repeated sample-major ``L`` times (a 0-d σ stays 0-d: it broadcasts)."""
    sigma = torch.as_tensor(sigma)
    if not sigma.is_floating_point():
        sigma = sigma.to(torch.get_default_dtype())
    sigma = sigma * math.sqrt(c)
    if sigma.ndim == 0 or L == 1:
        return sigma
    return sigma.reshape(-1).repeat_interleave(L)


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


# ----------------------------------------------------------------------------- full (identity)


class FullView:
    """The identity view (``A = I``, ``c = 1``): the full-resolution model seen as a view."""

    c = 1.0
    num_locations = 1

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def lift(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def sigma_map(self, sigma) -> torch.Tensor:
        return _repeat_sigma(sigma, self.c, 1)

    def coverage(self, like: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(like)

    def __repr__(self) -> str:
        return "FullView()"


# ----------------------------------------------------------------------------- patches


class PatchView:
    """``p×p`` crops at ``L`` top-left locations (``A`` = crop, ``c = 1``, lift = paste and sum).

    ``locations`` ``[L, 2]`` (row, col) explicit, or a grid with ``stride`` (default: the patch
    size) whose last row/column is snapped to the border so the grid covers the whole image.
    Images ``[N, C, H, W]`` -> patches ``[N*L, C, p, p]`` (sample-major).
    """

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

    c = 1.0

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

    def sigma_map(self, sigma) -> torch.Tensor:
        return _repeat_sigma(sigma, self.c, self.num_locations)

    def coverage(self, like: torch.Tensor) -> torch.Tensor:
        return self.lift(self.project(torch.ones_like(like[:1]))).expand_as(like)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(image_size={self.image_size}, patch_size={self.patch_size}, "
                f"L={self.num_locations})")


class MaskedPatchView(PatchView):
    """The patch grid restricted to patches that miss the corruption mask.

    ``mask`` ``[H, W]`` bool, True = corrupted (watermark, subtitle band). A patch is kept iff
    none of its pixels is corrupted. Raises if no patch is clean.
    """

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


# ----------------------------------------------------------------------------- low resolution


class DownsampleView:
    """Area (block-mean) downsampling by ``factor``: ``c = 1/f²``, ``σ_k = σ/f``.

    ``A`` averages each ``f×f`` block, so ``A Aᵀ = I/f²``; the lift ``Aᵀ/c`` is block-replicate
    (nearest) upsampling. Works on the last two axes of any ``[..., H, W]`` tensor (images or
    videos). Bilinear downsampling would break ``A Aᵀ ∝ I`` (DESIGN.md §1), hence area.
    """

    num_locations = 1

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

    def sigma_map(self, sigma) -> torch.Tensor:
        return _repeat_sigma(sigma, self.c, 1)

    def coverage(self, like: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(like)

    def __repr__(self) -> str:
        return f"DownsampleView(factor={self.factor})"


# ----------------------------------------------------------------------------- video clips


class ClipView:
    """Windows of ``clip_len`` frames on axis 2 of videos ``[N, C, T, H, W]`` (``c = 1``).

    Starts every ``stride`` frames (default ``clip_len // 2``: the sliding window used at
    evaluation), the last window snapped to the end, or explicit ``starts``. ``project`` returns
    ``[N*L, C, clip_len, H, W]`` sample-major; ``lift`` pastes clips into the frame axis and sums.
    """

    c = 1.0

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

    def sigma_map(self, sigma) -> torch.Tensor:
        return _repeat_sigma(sigma, self.c, self.num_locations)

    def coverage(self, like: torch.Tensor) -> torch.Tensor:
        return self.lift(self.project(torch.ones_like(like[:1]))).expand_as(like)

    def __repr__(self) -> str:
        return f"ClipView(num_frames={self.num_frames}, clip_len={self.clip_len}, L={self.num_locations})"


# ----------------------------------------------------------------------------- factory


def make_view(view_cfg, sample_shape: Sequence[int], mask: Optional[torch.Tensor] = None):
    """The evaluation-time view of a ``bootdiff.config.ViewConfig`` for full samples of shape
    ``sample_shape`` (``[C, H, W]`` images or ``[C, T, H, W]`` videos; no batch axis).

    ``patch``/``clean_patch``: a grid with ``stride`` (None: patch size); ``clean_patch`` with a
    ``mask`` gives a ``MaskedPatchView``, without one a plain ``PatchView``. ``downsample``:
    ``factor``. ``clip``: sliding windows with ``clip_stride`` (None: ``clip_len // 2``).
    ``full``: the identity.
    """
    kind = view_cfg.kind
    shape = tuple(int(s) for s in sample_shape)
    if len(shape) not in (3, 4):
        raise ValueError(f"make_view: sample_shape must be [C, H, W] or [C, T, H, W], got {shape}")
    if kind in ("patch", "clean_patch"):
        if len(shape) != 3:
            raise ValueError(f"make_view: view kind '{kind}' needs image samples [C, H, W], got {shape}")
        if kind == "clean_patch" and mask is not None:
            return MaskedPatchView(shape[-2:], view_cfg.patch_size, mask, stride=view_cfg.stride)
        return PatchView(shape[-2:], view_cfg.patch_size, stride=view_cfg.stride)
    if kind == "downsample":
        view = DownsampleView(view_cfg.factor)
        if shape[-1] % view.factor or shape[-2] % view.factor:
            raise ValueError(f"make_view: view.factor={view.factor} does not divide the sample size "
                             f"{shape[-2]}x{shape[-1]}")
        return view
    if kind == "clip":
        if len(shape) != 4:
            raise ValueError(f"make_view: view kind 'clip' needs video samples [C, T, H, W], got {shape}")
        stride = view_cfg.clip_stride if view_cfg.clip_stride is not None else max(1, view_cfg.clip_len // 2)
        return ClipView(shape[1], view_cfg.clip_len, stride=stride)
    if kind == "full":
        return FullView()
    raise ValueError(f"make_view: unknown view kind '{kind}' (expected patch | downsample | clip | "
                     f"clean_patch | full)")
