"""The choices of the typed configuration (`bootdiff.config`): one `Choice` enum per field that
takes one of a fixed list of values, so OmegaConf rejects a typo at merge time, naming the key and
the allowed values. Members are ``str`` (``kind == "patch"`` holds; ``str()``, f-strings,
``json.dumps`` and YAML give the plain value). Adding a view kind: one class in
`bootdiff.views` and one member of `ViewKind` here.
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A config choice: a ``str`` whose members are named by their values, so a member compares,
    hashes, prints, formats and serialises (json, YAML) as the plain string (``"patch"``) on
    Python 3.10-3.12 alike, and OmegaConf (which looks members up by name) rejects anything else
    at merge time, naming the key and the allowed values."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(str.__str__(self), spec)


class NetKind(Choice):
    auto = "auto"  # video for clip views, else unet2d
    unet2d = "unet2d"
    video = "video"


class SigmaDist(Choice):
    lognormal = "lognormal"
    loguniform = "loguniform"


class Weighting(Choice):
    edm = "edm"  # bell-shaped
    snr = "snr"
    uniform = "uniform"


class Precision(Choice):
    auto = "auto"  # bf16 on CUDA, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"


class Toggle(Choice):
    """auto | true | false (a YAML boolean is accepted too and read as true / false)."""

    auto = "auto"
    true = "true"
    false = "false"


class ViewKind(Choice):
    """The view kinds (`bootdiff.views`); adding a kind = its view class + one member here."""

    patch = "patch"
    downsample = "downsample"
    clip = "clip"
    clean_patch = "clean_patch"
    full = "full"


class SourceKind(Choice):
    """The raw data source kinds (`bootdiff.data.registry.SOURCES`)."""

    mnist = "mnist"
    fashion_mnist = "fashion_mnist"
    idx = "idx"
    images = "images"
    tar = "tar"
    video = "video"
    frames = "frames"
    moving_mnist = "moving_mnist"


VIDEO_SOURCES = (SourceKind.video, SourceKind.frames, SourceKind.moving_mnist)
PEER_NAMES = ("ambient", "finetune", "patchdiff")  # `bootdiff.peers`, in the order their rows are shown


class CorruptionKind(Choice):
    subtitle = "subtitle"
    watermark = "watermark"


class Resize(Choice):
    error = "error"
    resize = "resize"
    center_crop = "center_crop"


class L1Decay(Choice):
    none = "none"
    inverse_sigma = "inverse_sigma"


class Fusion(Choice):
    auto = "auto"  # split with exactly one downsample view and >= 1 other, else average
    split = "split"
    average = "average"


class Search(Choice):
    grid = "grid"
    random = "random"


class SamplerKind(Choice):
    heun = "heun"
    euler_maruyama = "euler_maruyama"
    pc = "pc"


class Schedule(Choice):
    edm = "edm"  # ρ-polynomial
    ve = "ve"  # exponential, Song et al.
    linear = "linear"


class FeatureKind(Choice):
    """The feature network of the Fréchet distance (`bootdiff.evaluation.fd`); none: FD is skipped."""

    none = "none"
    inception = "inception"
    dinov2 = "dinov2"
