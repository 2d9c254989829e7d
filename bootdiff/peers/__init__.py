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

from bootdiff.config.choices import PEER_NAMES as NAMES  # noqa: E402  (in the order their rows are shown)
from bootdiff.config.grid import TUNED, apply_setting, setting_label, settings  # noqa: F401  (re-exported)


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


def load_peer(cfg, manifest: dict, row: dict):
    """The trained model of a peer run (a ``sweep.json`` row or a benchmark job: ``kind`` a peer's
    name, ``checkpoint``, and its grid ``setting`` when it has one), EMA weights, as
    `bootdiff.experiment.load_trial` loads the other trials: its own network (patchdiff's has
    coordinate channels) at that setting."""
    import copy

    from bootdiff.checkpoint import load_checkpoint
    from bootdiff.experiment import ema_model
    from bootdiff.run.layout import RunLayout

    if row.get("setting"):
        cfg = apply_setting(copy.deepcopy(cfg), row["kind"], row["setting"])
    state = load_checkpoint(RunLayout.of(cfg).url(row["checkpoint"]))
    return ema_model(peer_training(cfg, manifest, row["kind"])[0], state)


def available(cfg) -> List[str]:
    """The peers this config's views allow (`bootdiff.config.peer_views.peers_available`)."""
    from bootdiff.config.peer_views import peers_available

    return peers_available(cfg)
