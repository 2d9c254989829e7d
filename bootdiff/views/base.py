"""What every view kind shares (docs/METHOD.md §1; the kinds and their contract: `bootdiff.views`):
the `View` base class, the identity `FullView`, and the small helpers the kinds' files use."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from bootdiff.util import broadcast_sigma

IntPair = Union[int, Sequence[int]]
RESERVED_NAMES = ("full", "test", "val")  # split names of the full-resolution data: not view names


def as_pair(v: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(v, int):
        out = (v, v)
    else:
        out = tuple(int(a) for a in v)
        if len(out) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(out) <= 0:
        raise ValueError(f"{name} must be positive, got {v!r}")
    return out


def window_starts(size: int, window: int, stride: int) -> list:
    """Window starts 0, stride, 2·stride, …; the last one snapped to ``size − window``."""
    if window > size:
        raise ValueError(f"window {window} larger than the axis it slides over ({size})")
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


class IndexCache:
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


def config_value(vcfg, key: str):
    """``vcfg.key`` of a ViewConfig / DictConfig, or ``vcfg[key]`` of an ingest spec dict."""
    return vcfg.get(key) if isinstance(vcfg, dict) else getattr(vcfg, key, None)


def bad_value(name: str, key: str, value, why: str) -> ValueError:
    return ValueError(f"views.{name}.{key}={value}: {why}")


def check_at_least_1(name: str, vcfg, *keys: str, optional: bool = False) -> None:
    for key in keys:
        value = config_value(vcfg, key)
        if (value is None and not optional) or (value is not None and int(value) < 1):
            raise bad_value(name, key, value, "must be an integer ≥ 1")


def check_ndim(name: str, kind: str, shape: Tuple[int, ...], ndim: int) -> None:
    if len(shape) != ndim:
        want = "image samples [C, H, W]" if ndim == 3 else "video samples [C, T, H, W]"
        raise bad_value(name, "kind", kind, f"needs {want}, but the data's samples have shape {shape}")


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
        return {"kind": kind_name(config_value(vcfg, "kind")), "patch_size": int(config_value(vcfg, "patch_size")),
                "per_sample": int(config_value(vcfg, "per_sample")), "factor": int(config_value(vcfg, "factor")),
                "clip_len": int(config_value(vcfg, "clip_len"))}

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
