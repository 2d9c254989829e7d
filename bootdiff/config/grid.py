"""The peers' small grids (`bootdiff.peers`; one hyperparameter per peer, a few values, chosen on
validation): which hyperparameter ``peers.<name>.grid`` varies, its settings, their labels, and a
config at one of them; and the finetune peer's switch fixed in kimg (`fix_finetune_schedule`).
Shared by the data-efficiency benchmark's rows and the sweep's peer trials (`bootdiff.sweep`)."""

from __future__ import annotations

from typing import List

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


def fix_finetune_schedule(cfg):
    """``cfg`` (in place; returned) with the finetune peer's switch fixed in kimg:
    ``peers.finetune.pretrain_kimg`` = ``pretrain_share · full_res.train.total_kimg`` (the cap),
    unless already set, and ``full_res.train.patience_from_kimg`` at least that — so that patience
    never ends the run while it pre-trains (the held-out G of a network trained on blurred copies
    says nothing of the fine-tuned one), and a model trained only to where its selection run
    stopped switches where that run did (`bootdiff.peers.finetune.pretrain_steps`). The sweep's
    finetune trials and the benchmark's finetune jobs train with it."""
    f, tcfg = cfg.peers.finetune, cfg.full_res.train
    if not f.pretrain_kimg > 0:
        f.pretrain_kimg = float(f.pretrain_share) * float(tcfg.total_kimg)
    tcfg.patience_from_kimg = max(float(tcfg.patience_from_kimg), float(f.pretrain_kimg))
    return cfg
