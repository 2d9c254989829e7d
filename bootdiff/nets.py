"""Backbones ``F(x, c_noise)`` for the EDM preconditioner: images and clips.

- ``kind: unet2d`` — `ImageUNet`: a diffusers `UNet2DModel` (DDPM-style U-Net, positional time
  embedding) fed the timestep ``time_scale · c_noise``. Any resolution divisible by
  ``2^(levels-1)``, 8×8 and 16×16 patches included.
- ``kind: video`` — `VideoUNet`: a factorised space–time U-Net for ``[N, C, T, H, W]`` with *any*
  T: per level (2+1)-D residual blocks (2-D spatial 3×3 convs applied per frame, a 1-D temporal
  conv along T per pixel), time-embedding injection, optional temporal self-attention, spatial
  down/up-sampling only. No T is baked into the weights, so a clip model can slide over a long
  video.
- ``kind: auto`` — video when ``video=True`` (clip views), else unet2d.

Both backbones save/load as diffusers folders (``save_pretrained`` / ``from_pretrained``).
The residual denoiser's net is built with ``in_channels = 2·C`` (noisy input and D_comb
concatenated, see `bootdiff.residual.ResidualPrecond`), ``out_channels = C``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from bootdiff.config import NetConfig


# ----------------------------------------------------------------------------- images


class ImageUNet(nn.Module):
    """``F(x, c_noise) = UNet2DModel(x, timestep=time_scale·c_noise)`` for ``[N, C, H, W]``.

    The diffusers model is ``self.unet`` (saved as a plain diffusers folder, loadable with
    ``UNet2DModel.from_pretrained``); ``time_scale`` is kept by the caller (export manifest).

    With ``augment_dim`` > 0 the net also takes the augmentation labels of
    `bootdiff.augment.augment` (non-leaking augmentation, EDM Appendix F.2): mapped by a bias-free
    linear layer ``augment_map`` to the time embedding's width and added to it (the U-Net's
    ``class_embed_type="identity"``), as EDM's ``map_augment``. Labels left out are zero — no
    augmentation, how the net is sampled — and then the layer adds nothing, so the saved folder is
    the plain unconditional U-Net (`save_pretrained`).
    """

    def __init__(self, unet: UNet2DModel, time_scale: float, augment_dim: int = 0):
        super().__init__()
        self.unet = unet
        self.time_scale = float(time_scale)
        self.augment_dim = int(augment_dim)
        if self.augment_dim:
            if unet.config.class_embed_type != "identity":
                raise ValueError("ImageUNet: augment_dim > 0 needs a UNet2DModel with class_embed_type='identity'")
            width = unet.config.block_out_channels[0] * 4  # UNet2DModel's time_embed_dim
            self.augment_map = nn.Linear(self.augment_dim, width, bias=False)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor,
                augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        t = (self.time_scale * c_noise.to(torch.float32)).reshape(-1)
        if not self.augment_dim:
            if augment_labels is not None:
                raise ValueError("ImageUNet: augmentation labels given to a net built without augment_dim "
                                 "(train.augment = 0 when it was built)")
            return self.unet(x, t).sample
        if augment_labels is None:
            augment_labels = torch.zeros(x.shape[0], self.augment_dim, device=x.device)
        emb = self.augment_map(augment_labels.to(self.augment_map.weight.dtype))
        return self.unet(x, t, class_labels=emb).sample

    def save_pretrained(self, path: str, **kwargs) -> None:
        unet = self.unet
        if self.augment_dim:  # at zero labels the augmentation input adds nothing: save the plain U-Net
            import copy

            unet = copy.deepcopy(unet)
            unet.class_embedding = None
            unet.register_to_config(class_embed_type=None)
        unet.save_pretrained(path, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str, time_scale: float) -> "ImageUNet":
        return cls(UNet2DModel.from_pretrained(path, low_cpu_mem_usage=False), time_scale)


def _unet2d(cfg, in_channels: int, out_channels: int, resolution: int, augment_dim: int = 0) -> ImageUNet:
    channels, attention = list(cfg.channels), list(cfg.attention)
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    unet = UNet2DModel(
        sample_size=resolution, in_channels=in_channels, out_channels=out_channels,
        time_embedding_type="positional", flip_sin_to_cos=True, freq_shift=0,
        down_block_types=tuple(down), up_block_types=tuple(up),
        block_out_channels=tuple(channels), layers_per_block=int(cfg.layers_per_block),
        norm_num_groups=int(cfg.norm_groups), dropout=float(cfg.dropout),
        attention_head_dim=None,  # one head per attention layer (as EDM's DDPM++)
        add_attention=bool(attention[-1]),  # mid-block attention follows the lowest level
        class_embed_type="identity" if augment_dim else None,  # the augmentation labels' embedding
    )
    return ImageUNet(unet, cfg.time_scale, augment_dim)


# ----------------------------------------------------------------------------- video


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D op to every frame of ``[N, C, T, H, W]`` (T folded into the batch)."""
    n, c, t, h, w = x.shape
    y = fn(x.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w))
    return y.reshape(n, t, *y.shape[1:]).permute(0, 2, 1, 3, 4)


def _per_pixel(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 1-D op along T to every pixel of ``[N, C, T, H, W]`` (H, W folded into batch)."""
    n, c, t, h, w = x.shape
    y = fn(x.permute(0, 3, 4, 1, 2).reshape(n * h * w, c, t))
    return y.reshape(n, h, w, y.shape[1], t).permute(0, 3, 4, 1, 2)


class ResBlock3D(nn.Module):
    """(2+1)-D residual block: norm→SiLU→spatial conv, + time embedding, norm→SiLU→dropout→
    spatial conv, then a residual temporal conv (zero-initialised, so it starts as 2-D)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.norm_t = nn.GroupNorm(groups, cout)
        self.conv_t = nn.Conv1d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv_t.weight)
        nn.init.zeros_(self.conv_t.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = _per_frame(self.conv1, F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None, None].to(h.dtype)
        h = _per_frame(self.conv2, self.dropout(F.silu(self.norm2(h))))
        h = h + _per_frame(self.skip, x)
        return h + _per_pixel(self.conv_t, F.silu(self.norm_t(h)))


class TemporalAttention(nn.Module):
    """Single-head self-attention along T at every pixel (residual, zero-initialised output)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, t, h, w = x.shape
        seq = self.norm(x).permute(0, 3, 4, 2, 1).reshape(n * h * w, t, c)
        q, k, v = self.qkv(seq).chunk(3, dim=-1)
        y = self.out(F.scaled_dot_product_attention(q, k, v))
        return x + y.reshape(n, h, w, t, c).permute(0, 4, 3, 1, 2)


class VideoUNet(ModelMixin, ConfigMixin):
    """Factorised space–time U-Net ``F(x, c_noise)`` for clips ``[N, C, T, H, W]``, any T.

    Layout follows diffusers' UNet2DModel: ``layers_per_block`` blocks per level on the way
    down (2× spatial downsampling between levels), a mid block, ``layers_per_block + 1`` blocks
    per level on the way up with skip concatenation. Timestep ``time_scale · c_noise`` goes
    through a sinusoidal embedding and an MLP (diffusers `Timesteps`, `TimestepEmbedding`).
    """

    @register_to_config
    def __init__(self, in_channels: int = 1, out_channels: int = 1,
                 block_out_channels: Sequence[int] = (32, 64),
                 attention: Sequence[bool] = (False, True), layers_per_block: int = 1,
                 norm_num_groups: int = 8, dropout: float = 0.0, time_scale: float = 250.0,
                 sample_size: int = 32):
        super().__init__()
        chs, attn, g = list(block_out_channels), list(attention), norm_num_groups
        emb_dim = 4 * chs[0]
        self.time_proj = Timesteps(chs[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(chs[0], emb_dim)
        self.conv_in = nn.Conv2d(in_channels, chs[0], 3, padding=1)

        def block(cin, cout, a):
            return nn.ModuleList([ResBlock3D(cin, cout, emb_dim, g, dropout)]
                                 + ([TemporalAttention(cout, g)] if a else []))

        self.down, skip_chs, c = nn.ModuleList(), [chs[0]], chs[0]
        for i, (ch, a) in enumerate(zip(chs, attn)):
            for _ in range(layers_per_block):
                self.down.append(block(c, ch, a))
                c = ch
                skip_chs.append(c)
            if i < len(chs) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(c, c, 3, stride=2, padding=1)]))
                skip_chs.append(c)
        self.mid = nn.ModuleList([block(c, c, attn[-1]), block(c, c, False)])
        self.up = nn.ModuleList()
        for i in reversed(range(len(chs))):
            for _ in range(layers_per_block + 1):
                self.up.append(block(c + skip_chs.pop(), chs[i], attn[i]))
                c = chs[i]
            if i > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(c, c, 3, padding=1)]))
        self.norm_out = nn.GroupNorm(g, c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    @staticmethod
    def _run(layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            if isinstance(layer, ResBlock3D):
                h = layer(h, emb)
            elif isinstance(layer, TemporalAttention):
                h = layer(h)
            else:  # spatial resampling, per frame
                h = _per_frame(layer, h)
        return h

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"VideoUNet expects [N, C, T, H, W], got shape {tuple(x.shape)}")
        t = (self.config.time_scale * c_noise.to(torch.float32)).reshape(-1)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        emb = self.time_embedding(self.time_proj(t).to(x.dtype))
        h = _per_frame(self.conv_in, x)
        skips = [h]
        for layers in self.down:
            h = self._run(layers, h, emb)
            skips.append(h)
        for layers in self.mid:
            h = self._run(layers, h, emb)
        for layers in self.up:
            if isinstance(layers[0], ResBlock3D):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(layers, h, emb)
        return _per_frame(self.conv_out, F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------- factory


def _validate(cfg, in_channels: int, out_channels: int, resolution: int) -> None:
    channels: List[int] = list(cfg.channels)
    levels = len(channels)
    if levels < 1:
        raise ValueError("NetConfig.channels: need at least one level, got []")
    if len(cfg.attention) != levels:
        raise ValueError(f"NetConfig.attention has {len(cfg.attention)} entries but "
                         f"NetConfig.channels has {levels}; give one flag per level")
    for ch in channels:
        if ch <= 0 or ch % cfg.norm_groups:
            raise ValueError(f"NetConfig.channels: {ch} is not divisible by "
                             f"NetConfig.norm_groups={cfg.norm_groups}")
    if in_channels <= 0 or out_channels <= 0:
        raise ValueError(f"make_net: in_channels={in_channels}, out_channels={out_channels} must be > 0")
    step = 2 ** (levels - 1)
    if resolution <= 0 or resolution % step:
        raise ValueError(f"make_net: resolution {resolution} is not divisible by 2^(levels-1) = "
                         f"{step} (NetConfig.channels has {levels} levels)")
    if int(cfg.layers_per_block) < 1:
        raise ValueError(f"NetConfig.layers_per_block must be >= 1, got {cfg.layers_per_block}")


def zero_output(net: nn.Module) -> nn.Module:
    """Zero the output convolution of a backbone from `make_net` (``conv_out`` of the diffusers
    ``UNet2DModel`` or of `VideoUNet`), in place, so ``F ≡ 0`` at the start — EDM's networks
    initialise their last layer at zero the same way (NVlabs/edm ``init_zero``). The layer's own
    gradient is not zero, so training moves it from the first step."""
    conv = getattr(getattr(net, "unet", net), "conv_out", None)
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"zero_output: {type(net).__name__} has no output convolution conv_out")
    with torch.no_grad():
        conv.weight.zero_()
        if conv.bias is not None:
            conv.bias.zero_()
    return net


def make_net(cfg: NetConfig, in_channels: int, out_channels: int, resolution: int,
             video: bool = False, seed: Optional[int] = None, augment_dim: int = 0) -> nn.Module:
    """Build the backbone ``F(x, c_noise)`` described by ``cfg`` (see the module docstring).

    ``resolution`` is the spatial side of the net's input (the patch size for patch views).
    Residual nets: ``in_channels = 2·C``. With ``seed`` the initial weights are drawn from
    ``torch.manual_seed(seed)`` without touching the caller's RNG state, so a run's starting point
    is reproducible (torch seeds its default generator randomly in every new process).
    ``augment_dim`` > 0: the net also takes augmentation labels (`ImageUNet`; images only).
    """
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return make_net(cfg, in_channels, out_channels, resolution, video, augment_dim=augment_dim)
    if isinstance(cfg, dict):
        cfg = NetConfig(**cfg)
    kind = cfg.kind
    if kind == "auto":
        kind = "video" if video else "unet2d"
    if kind not in ("unet2d", "video"):
        raise ValueError(f"NetConfig.kind: unknown value '{cfg.kind}' (expected auto | unet2d | video)")
    if kind == "unet2d" and video:
        raise ValueError("NetConfig.kind: 'unet2d' cannot model clips [N, C, T, H, W]; "
                         "use 'video' or 'auto' for clip views")
    _validate(cfg, in_channels, out_channels, resolution)
    if kind == "unet2d":
        return _unet2d(cfg, in_channels, out_channels, resolution, augment_dim)
    if augment_dim:
        raise ValueError("train.augment: augmentation is for images; a clip model (NetConfig.kind video) "
                         "takes no augmentation labels")
    return VideoUNet(in_channels=in_channels, out_channels=out_channels,
                     block_out_channels=[int(c) for c in cfg.channels],
                     attention=[bool(a) for a in cfg.attention],
                     layers_per_block=int(cfg.layers_per_block), norm_num_groups=int(cfg.norm_groups),
                     dropout=float(cfg.dropout), time_scale=float(cfg.time_scale),
                     sample_size=int(resolution))
