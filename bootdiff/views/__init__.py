"""View kinds: each partial view's operator ``A_k`` and everything else about its kind.

docs/METHOD.md §1. Every view satisfies ``A_k A_kᵀ = c_k·I``, so a noisy full sample seen through
the view is a noisy view sample with white noise of level ``σ_k = σ·√c_k``. One class per kind, each
in its own file (`bootdiff.views.patch`, `bootdiff.views.downsample`, `bootdiff.views.clip`; the base class and the
identity in `bootdiff.views.base`), registered here in ``VIEW_CLASSES`` (kind -> class); ingest,
export and config checks dispatch through it. Each class has (docs/CONTRACTS.md):

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

Adding a view kind = one class in its own file + its entry in ``VIEW_CLASSES`` and in the config's allowed
kinds (``bootdiff.config.ViewConfig.kind``).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from bootdiff.views.base import RESERVED_NAMES, FullView, View, bad_value, config_value, kind_name
from bootdiff.views.clip import ClipView
from bootdiff.views.downsample import DownsampleView
from bootdiff.views.patch import MaskedPatchView, PatchView

__all__ = ["RESERVED_NAMES", "VIEW_CLASSES", "ClipView", "DownsampleView", "FullView", "MaskedPatchView", "PatchView",
           "View", "check_view_config", "make_view", "view_class", "view_from_json"]

# ----------------------------------------------------------------------------- registry


VIEW_CLASSES: Dict[str, type] = {"patch": PatchView, "downsample": DownsampleView, "clip": ClipView,
                                 "clean_patch": MaskedPatchView, "full": FullView}


def view_class(kind, name: str = "?") -> type:
    """The class of a view kind (str or str-Enum); an unknown kind names ``views.<name>.kind``."""
    kind = kind_name(kind)
    if kind not in VIEW_CLASSES:
        raise bad_value(name, "kind", kind, f"unknown view kind {kind!r} (known: {', '.join(VIEW_CLASSES)})")
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
    ``full``, ``test`` and ``val`` are reserved for the full-resolution splits."""
    if name in RESERVED_NAMES:
        raise ValueError(f"views.{name}: the names {RESERVED_NAMES} are reserved for the "
                         "full-resolution splits; rename the view")
    view_class(config_value(vcfg, "kind"), name).check_config(name, vcfg, _sample_shape(sample_shape))


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
