"""Optional latent space (Rombach et al. 2022, §4.3.2): a local diffusers ``AutoencoderKL``.

``z = (E(x).mean − shift_factor) · scaling_factor`` — the posterior mean, scaled to about unit
variance (``shift_factor`` only for VAEs that define one, e.g. SD3/Flux). Latents are stored as
float16 ``[c, h, w]`` (videos: every frame encoded, ``[c, T, h, w]``); the views then act on the
latent exactly as on pixels. `decode` inverts the scaling and runs the decoder, for samples.

The VAE is loaded from a local folder only (``local_files_only=True``; nothing is downloaded):
``data.latent.vae_path`` is a folder written by ``save_pretrained`` (a local path, or any fsspec
URL, which is copied to a temporary local folder first).
"""

from __future__ import annotations

import os
import tempfile
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from bootdiff.data.shards import to_model_units

_VAES: Dict[str, object] = {}  # per-process cache: path -> AutoencoderKL


def _local_folder(url: str) -> str:
    if "://" not in url or url.startswith("file://"):
        path = url[len("file://"):] if url.startswith("file://") else url
        if not os.path.isdir(path):
            raise FileNotFoundError(f"data.latent.vae_path: no VAE folder at {url}")
        return path
    from bootdiff.util import url_fs

    fs, path = url_fs(url)
    if not fs.isdir(path):
        raise FileNotFoundError(f"data.latent.vae_path: no VAE folder at {url}")
    local = tempfile.mkdtemp(prefix="bootdiff-vae-")
    fs.get(path.rstrip("/") + "/", local, recursive=True)
    return local


def load_vae(vae_path: str, device: Optional[str] = None):
    """The ``AutoencoderKL`` saved at ``vae_path`` (cached per process), in eval mode."""
    if not vae_path:
        raise ValueError("data.latent.enabled is true but data.latent.vae_path is empty")
    key = f"{vae_path}|{device}"
    if key not in _VAES:
        from diffusers import AutoencoderKL

        folder = _local_folder(vae_path)
        try:
            vae = AutoencoderKL.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"data.latent.vae_path {vae_path}: cannot load an AutoencoderKL: {exc}") from None
        _VAES[key] = vae.eval().requires_grad_(False).to(device or "cpu")
    return _VAES[key]


def _scale_shift(vae, scaling_factor: Optional[float]) -> Tuple[float, float]:
    scale = float(scaling_factor) if scaling_factor is not None else float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None)
    return scale, float(shift) if shift is not None else 0.0


@torch.no_grad()
def encode(vae, x: torch.Tensor, scaling_factor: Optional[float] = None, batch_size: int = 16) -> torch.Tensor:
    """Scaled latents of images ``x`` ``[N, C, H, W]`` in [-1, 1] (float32 out).

    Grey images are repeated to the VAE's input channels when it expects 3."""
    scale, shift = _scale_shift(vae, scaling_factor)
    in_ch = int(vae.config.in_channels)
    if x.shape[1] != in_ch:
        if x.shape[1] == 1:
            x = x.expand(-1, in_ch, -1, -1)
        else:
            raise ValueError(f"VAE expects {in_ch} input channels, the data has {x.shape[1]}")
    dev = next(vae.parameters()).device
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(dev, torch.float32)
        out.append(((vae.encode(xb).latent_dist.mean - shift) * scale).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def decode(vae, z: torch.Tensor, scaling_factor: Optional[float] = None, batch_size: int = 16) -> torch.Tensor:
    """Images in [-1, 1] (clamped) from scaled latents ``z`` ``[N, c, h, w]`` or ``[N, c, T, h, w]``."""
    scale, shift = _scale_shift(vae, scaling_factor)
    video = z.ndim == 5
    if video:
        n, c, t, h, w = z.shape
        z = z.permute(0, 2, 1, 3, 4).reshape(n * t, c, h, w)
    dev = next(vae.parameters()).device
    out = []
    for i in range(0, len(z), batch_size):
        zb = z[i:i + batch_size].to(dev, torch.float32) / scale + shift
        out.append(vae.decode(zb).sample.clamp(-1, 1).float().cpu())
    x = torch.cat(out)
    if video:
        x = x.reshape(n, t, *x.shape[1:]).permute(0, 2, 1, 3, 4)
    return x


def encode_samples(xs: List[np.ndarray], latent_cfg) -> List[np.ndarray]:
    """uint8 channel-first samples (CHW images / CTHW videos) → float16 latents, batched."""
    if not xs:
        return []
    vae = load_vae(str(latent_cfg.vae_path))
    bs = int(latent_cfg.batch_size)
    frames, sizes = [], []
    for x in xs:
        if x.ndim == 4:  # CTHW: encode every frame
            frames.extend(np.moveaxis(x, 1, 0))
            sizes.append(x.shape[1])
        else:
            frames.append(x)
            sizes.append(0)
    pix = torch.from_numpy(to_model_units(np.stack(frames), np.float32))
    z = encode(vae, pix, latent_cfg.scaling_factor, bs).numpy().astype(np.float16)
    out, k = [], 0
    for t in sizes:
        if t == 0:
            out.append(z[k])
            k += 1
        else:
            out.append(np.ascontiguousarray(np.moveaxis(z[k:k + t], 0, 1)))
            k += t
    return out
