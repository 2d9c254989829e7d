"""Which partial views each peer method (`bootdiff.peers`) uses: the view its
``peers.<name>.*_view`` key names, else the only view of that kind; and which peers a config's
views allow at all (read by the load-time check, `bootdiff.config.check`, and by the peers)."""

from __future__ import annotations

from typing import List

from bootdiff.config.choices import PEER_NAMES, VIDEO_SOURCES


def pick_view(cfg, kind: str, name: str, key: str = "") -> str:
    """The view a peer uses: ``name`` when given (it must be of ``kind``), else the only view of
    that kind; an error naming the config ``key`` (default ``peers.ambient.low_view`` /
    ``crop_view``) otherwise."""
    key = key or ("peers.ambient.low_view" if kind == "downsample" else "peers.ambient.crop_view")
    found = [v for v, vc in cfg.views.items() if str(vc.kind) == kind]
    if name:
        if name not in cfg.views or str(cfg.views[name].kind) != kind:
            raise ValueError(f"{key}={name!r}: not a {kind} view (the {kind} views: {found or 'none'})")
        return name
    if len(found) != 1:
        raise ValueError(f"{key} is unset and the config has {len(found)} {kind} views "
                         f"({found}): name the one to use")
    return found[0]


def peers_available(cfg) -> List[str]:
    """The peers (`bootdiff.peers`) this config's views allow: ``ambient`` needs a downsample and a
    patch view, ``finetune`` a downsample view, ``patchdiff`` a patch view on image data — the
    view its ``peers.<name>.*_view`` key names, else the only view of that kind
    (`pick_view` picks them the same way)."""
    def has(kind, name):
        found = [v for v, vc in cfg.views.items() if str(vc.kind) == kind]
        return (name in found) if name else len(found) == 1

    a, f, d = cfg.peers.ambient, cfg.peers.finetune, cfg.peers.patchdiff
    ok = {"ambient": has("downsample", a.low_view) and has("patch", a.crop_view),
          "finetune": has("downsample", f.low_view),
          "patchdiff": has("patch", d.patch_view) and cfg.data.source.kind not in VIDEO_SOURCES}
    return [n for n in PEER_NAMES if ok[n]]


PEER_NEEDS = {"ambient": "a downsample view and a patch view (of several of a kind, the one peers.ambient.low_view / "
                         "crop_view names)",
              "finetune": "a downsample view (of several, the one peers.finetune.low_view names)",
              "patchdiff": "a patch view on image (not video) data (of several, the one peers.patchdiff.patch_view names)"}
