"""Fréchet distance between sample sets in the feature space of a local network — docs/METHOD.md §8.

    FD = ||mu_1 - mu_2||^2 + tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2))

is the squared 2-Wasserstein distance between the Gaussians fitted to two feature sets (Heusel et
al. 2017, "GANs trained by a two time-scale update rule converge to a local Nash equilibrium",
eq. 6). Two feature networks, both loaded from the user's disk only (nothing is ever downloaded):

  kind "inception": the FID Inception-v3 (bootdiff/evaluation/inception.py, the network of pytorch-fid,
      torch-fidelity and NVlabs/edm), pool_3 features, D = 2048. `path` is its state-dict file:
      pytorch-fid's pt_inception-2015-12-05-6726825d.pth or torch-fidelity's
      weights-inception-2015-12-05-6726825d.pth. Images -> uint8 -> TF1 bilinear resize to 299.
  kind "dinov2": transformers' Dinov2Model read from a local `save_pretrained` folder (config.json
      + model.safetensors, e.g. a copy of facebook/dinov2-large), the layer-normed CLS token
      (D = hidden size), as FD-DINOv2 is reported by NVlabs/edm2 and ambient-omni: uint8 ->
      bicubic antialiased resize to 224 -> /255 -> ImageNet mean/std.

Images are [-1, 1] tensors [N, C, H, W]; they are quantised to uint8 first as the reference
implementations see them (saved PNGs; `x * 127.5 + 128` truncated, as EDM's generate.py), and
grey images (C = 1) are repeated to 3 channels.

Config block (`eval.features` in bootdiff/config/schema.py; `check_features_config` is its load check):

    class FeatureKind(Choice):
        none = "none"
        inception = "inception"
        dinov2 = "dinov2"

    @dataclass
    class FeaturesConfig:
        kind: FeatureKind = FeatureKind.none  # none: FD is skipped, with a one-line note
        path: Optional[str] = None  # inception: state-dict .pth file; dinov2: save_pretrained folder
        batch_size: int = 64        # images per forward pass of the feature network

Use (the test split's features once, then one FD per model):

    net = load_feature_network(cfg.kind, cfg.path, device)
    ref = features(net, test_images, cfg.batch_size)
    fd_value = fd_features(features(net, samples, cfg.batch_size), ref)
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch

from bootdiff.evaluation import inception

FEATURE_KINDS = ("none", "inception", "dinov2")

INCEPTION_FORMAT = ("a PyTorch state dict of the FID Inception-v3 (pytorch-fid's "
                    "pt_inception-2015-12-05-6726825d.pth or torch-fidelity's "
                    "weights-inception-2015-12-05-6726825d.pth)")
DINOV2_FORMAT = ("a folder written by transformers' Dinov2Model.save_pretrained (config.json with "
                 "model_type 'dinov2' and model.safetensors or pytorch_model.bin), e.g. a local copy "
                 "of facebook/dinov2-large")
DINOV2_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FeatureNetwork(torch.nn.Module):
    """A loaded feature network: uint8 images [N, 3, H, W] -> features [N, dim] (float32)."""

    def __init__(self, kind: str, model: torch.nn.Module, dim: int, path: str):
        super().__init__()
        self.kind, self.model, self.dim, self.path = kind, model, dim, path

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        if self.kind == "inception":
            return self.model(images_uint8)
        # dinov2: the "torch" preprocessing of NVlabs/edm2's DINOv2 detector.
        x = torch.nn.functional.interpolate(images_uint8.to(torch.float32), size=(DINOV2_SIZE, DINOV2_SIZE),
                                            mode="bicubic", antialias=True) / 255
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return self.model(pixel_values=(x - mean) / std).pooler_output


def _kind(kind) -> str:
    kind = str(getattr(kind, "value", kind))
    if kind not in FEATURE_KINDS:
        raise ValueError(f"eval.features.kind={kind!r}: expected one of {', '.join(FEATURE_KINDS)}")
    return kind


def _load_inception(path: str) -> torch.nn.Module:
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise FileNotFoundError(f"eval.features.path={path!r} {what}; kind 'inception' expects a file: "
                                f"{INCEPTION_FORMAT}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"eval.features.path={path!r} could not be read as {INCEPTION_FORMAT}: "
                         f"{type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"eval.features.path={path!r} holds a {type(state).__name__}, not a state dict of "
                         f"tensors; expected {INCEPTION_FORMAT}")
    net = inception.InceptionV3FID()
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"eval.features.path={path!r} is not {INCEPTION_FORMAT}: {len(missing)} missing keys "
                         f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}, "
                         f"{len(wrong)} of another shape {wrong[:3]}")
    net.load_state_dict(state)
    return net


def _load_dinov2(path: str) -> torch.nn.Module:
    config_file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        what = "is a file" if os.path.isfile(path) else "does not exist"
        raise FileNotFoundError(f"eval.features.path={path!r} {what}; kind 'dinov2' expects {DINOV2_FORMAT}")
    try:
        with open(config_file) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError) as e:
        raise ValueError(f"eval.features.path={path!r}: cannot read {config_file} ({type(e).__name__}: {e}); "
                         f"expected {DINOV2_FORMAT}") from e
    if model_type != "dinov2":
        raise ValueError(f"eval.features.path={path!r}: {config_file} has model_type={model_type!r}, not 'dinov2'; "
                         f"expected {DINOV2_FORMAT}")
    try:  # imported here: transformers takes seconds to import
        from transformers import Dinov2Model
    except ImportError as e:
        raise ImportError(f"eval.features.kind='dinov2' needs the optional dependency transformers, which is "
                          f"not installed ({e}); install it with: pip install 'bootdiff[features]'") from e
    try:  # a local folder and local_files_only: transformers never goes to the network
        return Dinov2Model.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise ValueError(f"eval.features.path={path!r}: transformers could not load a Dinov2Model from it "
                         f"({type(e).__name__}: {e}); expected {DINOV2_FORMAT}") from e


def load_feature_network(kind, path: Optional[str], device="cpu") -> Optional[FeatureNetwork]:
    """The feature network `kind` read from the local `path` (see the module docstring for the
    formats), in eval mode on `device`; None for kind "none". Never downloads. A missing path is a
    FileNotFoundError and a wrong file a ValueError, each naming the path and the expected format."""
    kind = _kind(kind)
    if kind == "none":
        return None
    if not path:
        raise ValueError(f"eval.features.path is not set; kind {kind!r} expects "
                         f"{INCEPTION_FORMAT if kind == 'inception' else DINOV2_FORMAT}")
    path = os.path.abspath(os.path.expanduser(str(path)))
    if kind == "inception":
        model, dim = _load_inception(path), inception.FEATURE_DIM
    else:
        model = _load_dinov2(path)
        dim = model.config.hidden_size
    net = FeatureNetwork(kind, model, dim, path)
    return net.to(device).eval().requires_grad_(False)


def check_features_config(cfg) -> Optional[str]:
    """The load-time check of an `eval.features` block: raises on a bad kind, batch size or weights
    path (by loading the network on the CPU once); returns the one-line note to print when FD is
    off, else None."""
    kind = _kind(cfg.kind)
    if kind == "none":
        return "FD skipped: eval.features.kind is 'none' (set kind and path to a local feature network)"
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise ValueError(f"eval.features.batch_size={cfg.batch_size!r}: expected a positive integer")
    load_feature_network(kind, cfg.path, "cpu")
    return None


def to_uint8_rgb(images) -> torch.Tensor:
    """[-1, 1] images [N, C, H, W] with C = 1 or 3 -> uint8 [N, 3, H, W], as EDM writes PNGs."""
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"FD needs images [N, C, H, W] with C = 1 or 3 in [-1, 1]; got shape {tuple(x.shape)} "
                         "(decode latents and split video into frames first)")
    x = (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.no_grad()
def features(net: FeatureNetwork, images, batch_size: int = 64) -> np.ndarray:
    """Features [N, net.dim] (float64 numpy) of [-1, 1] images [N, C, H, W], `batch_size` at a time
    on the network's device."""
    x = to_uint8_rgb(images)
    if x.shape[0] < 2:
        raise ValueError(f"FD needs at least 2 images per set; got {x.shape[0]}")
    device = next(net.parameters()).device
    out = [net(x[i:i + batch_size].to(device)).to("cpu", torch.float64) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out).numpy()


def statistics(feats: np.ndarray):
    """(mu, sigma): the mean [D] and the unbiased covariance [D, D] of features [N, D]."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _nonnegative(eigenvalues: np.ndarray) -> np.ndarray:
    """PSD eigenvalues with round-off zeros set to 0: a square root would turn a 1e-16 into 1e-8."""
    tol = len(eigenvalues) * np.finfo(np.float64).eps * max(float(np.abs(eigenvalues).max()), 1e-300)
    return np.where(eigenvalues > tol, eigenvalues, 0.0)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Heusel et al. 2017 eq. 6 for two Gaussians. tr((Sigma_1 Sigma_2)^(1/2)) is computed as the sum
    of the square roots of the eigenvalues of the symmetric PSD matrix Sigma_1^(1/2) Sigma_2
    Sigma_1^(1/2) (same spectrum as Sigma_1 Sigma_2), which stays real and exact when the
    covariances are singular (fewer samples than dimensions). O(D^3)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"frechet_distance: shapes do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(_nonnegative(w))) @ v.T
    tr_covmean = np.sqrt(_nonnegative(np.linalg.eigvalsh(root1 @ sigma2 @ root1))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fd_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """FD between two feature sets [N1, D], [N2, D]: frechet_distance of their statistics. When both
    sets are smaller than D (e.g. 1,000 test images in Inception's 2048 dimensions) the same number
    is computed without D x D matrices: with A_i the centred features / sqrt(N_i - 1), Sigma_i =
    A_i^T A_i and tr((Sigma_1 Sigma_2)^(1/2)) is the sum of the singular values of A_2 A_1^T."""
    f1, f2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"fd_features needs two [N, D] feature sets with N >= 2 and one D; got {f1.shape}, {f2.shape}")
    if max(len(f1), len(f2)) >= f1.shape[1]:
        return frechet_distance(*statistics(f1), *statistics(f2))
    a1 = (f1 - f1.mean(0)) / np.sqrt(len(f1) - 1)
    a2 = (f2 - f2.mean(0)) / np.sqrt(len(f2) - 1)
    tr_covmean = np.linalg.svd(a2 @ a1.T, compute_uv=False).sum()
    diff = f1.mean(0) - f2.mean(0)
    return float(diff @ diff + (a1 * a1).sum() + (a2 * a2).sum() - 2 * tr_covmean)


def fd(samples, reference, net: FeatureNetwork, batch_size: int = 64) -> float:
    """FD between two image sets ([-1, 1], [N, C, H, W]) in the features of `net`."""
    return fd_features(features(net, samples, batch_size), features(net, reference, batch_size))
