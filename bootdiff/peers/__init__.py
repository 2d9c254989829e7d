"""Peer methods: what a user would train instead of the bootstrap, one ordinary network on the
same full-res images and partial views, measured beside it by the data-efficiency benchmark.

- `bootdiff.peers.ambient`: Ambient Diffusion Omni, the partial data σ-gated (lifted low-res
  copies only at high σ, crops only at low σ).
- `bootdiff.peers.finetune`: pre-train on the lifted low-res copies, fine-tune on the full-res
  images.
- `bootdiff.peers.patchdiff`: Patch Diffusion, coordinate channels and crops of several sizes
  (the partial pool's patches at their recorded locations) plus whole images.

Each is a full-res network of the baseline's size and training (``full_res``; patchdiff's with
two more input channels), trained by
`bootdiff.train.train` on its own ``(model, loss_fn, data)`` (`peer_training`).
"""

from __future__ import annotations

from typing import List

NAMES = ("ambient", "finetune", "patchdiff")  # in the order their rows are shown
# the one hyperparameter of each peer that ``peers.<name>.grid`` tries on validation
TUNED = {"ambient": "sigma_tn", "finetune": "pretrain_share", "patchdiff": "full_share"}


def settings(cfg, name: str) -> List[dict]:
    """The settings of peer ``name`` to try on validation: ``[{}]`` (its config as it is) without a
    ``peers.<name>.grid``, else one ``{TUNED[name]: value}`` per grid value."""
    grid = list(getattr(cfg.peers, name).grid)
    return [{TUNED[name]: float(v)} for v in grid] or [{}]


def setting_label(name: str, setting: dict) -> str:
    """``<name>`` for the config as it is, ``<name>-<key><value>`` for a grid setting."""
    return name + "".join(f"-{k}{v:g}" for k, v in sorted(setting.items()))


def apply_setting(cfg, name: str, setting: dict):
    """``cfg`` with ``peers.<name>`` set to ``setting`` (in place; returned)."""
    for k, v in setting.items():
        setattr(getattr(cfg.peers, name), k, v)
    return cfg


def peer_training(cfg, manifest: dict, name: str, rank: int = 0, world_size: int = 1):
    """(model, loss_fn, data) of peer ``name``, as `bootdiff.experiment.view_training` gives a view's."""
    if name == "ambient":
        from bootdiff.peers.ambient import ambient_training

        return ambient_training(cfg, manifest, rank, world_size)
    if name == "finetune":
        from bootdiff.peers.finetune import finetune_training

        return finetune_training(cfg, manifest, rank, world_size)
    if name == "patchdiff":
        from bootdiff.peers.patchdiff import patchdiff_training

        return patchdiff_training(cfg, manifest, rank, world_size)
    raise ValueError(f"no peer method {name!r} (the peers: {', '.join(NAMES)})")


def available(cfg) -> List[str]:
    """The peers this config's views allow: ``ambient`` needs one downsample and one patch view,
    ``finetune`` one downsample view, ``patchdiff`` one patch view on image data (or the
    ``peers.<name>.*_view`` keys naming them)."""
    from bootdiff.peers.ambient import pick_view

    def has(kind, name, key):
        try:
            pick_view(cfg, kind, name, key)
            return True
        except ValueError:
            return False

    a, f = cfg.peers.ambient, cfg.peers.finetune
    out = []
    if has("downsample", a.low_view, "peers.ambient.low_view") and has("patch", a.crop_view, "peers.ambient.crop_view"):
        out.append("ambient")
    if has("downsample", f.low_view, "peers.finetune.low_view"):
        out.append("finetune")
    from bootdiff.config import VIDEO_SOURCES

    if has("patch", cfg.peers.patchdiff.patch_view, "peers.patchdiff.patch_view") and \
            cfg.data.source.kind not in VIDEO_SOURCES:  # coordinate channels of images
        out.append("patchdiff")
    return out
