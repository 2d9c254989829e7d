"""The stage-2 sweep as data: its trials, each trial's residual config, the row a finished trial
leaves in ``sweep.json``, and the choice of the best trial.

A sweep runs the residual denoiser (docs/METHOD.md §4–§5) over μ_var × μ_L1 × range adapter (a
grid, or seeded random draws) next to two baselines: the combined denoiser alone (stage 1's
fusion, not trained) and a full-resolution model trained on the scarce set alone. Everything is
chosen on the held-out validation split (docs/METHOD.md §6), never on the test split: each
trained model is taken at its checkpoint with the lowest validation G (`chosen_report`), and the
best trial is the residual trial with the lowest validation G (`select_best`). Running
the trials is Ray Tune's job (``ray_jobs/sweep_residual.py``); the report (`bootdiff.evaluation.report`)
and the evaluation (`bootdiff.evaluation.evaluate`) read the same rows.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from typing import Optional

from bootdiff.config import ResidualConfig
from bootdiff.config.choices import PEER_NAMES
from bootdiff.config.grid import apply_setting, fix_finetune_schedule, setting_label, settings

KINDS = ("residual", "combined", "full_res", *PEER_NAMES, "ensemble")


def num(v) -> float:
    """A metric value as a float; NaN when it is missing or not a number."""
    if v is None or isinstance(v, bool):
        return float("nan")
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def trial_label(t: dict) -> str:
    """A trial's id: its kind for baselines (a peer's grid setting appended, ``ambient-sigma_tn0.5``),
    e.g. ``residual-mv0.1-ml0-ra1`` for residual trials."""
    if t["kind"] != "residual":
        return setting_label(t["kind"], t.get("setting") or {})
    return f"residual-mv{t['mu_var']:g}-ml{t['mu_l1']:g}-ra{int(bool(t['range_adapter']))}"


def trial_list(cfg) -> list:
    """The sweep's trials, in the order Tune starts them: the full-res baseline and the peers of
    ``sweep.peers`` (one trial per setting of ``peers.<name>.grid``) first (the longest runs at the
    fair budget: started first, they overlap the residual trials instead of running alone at the
    end), then the grid (or random samples) of residual settings, then the combined baseline."""
    sw = cfg.sweep
    search = getattr(sw.search, "value", sw.search)
    if search == "grid":
        combos = list(itertools.product(sw.mu_var, sw.mu_l1, sw.range_adapter))
    elif search == "random":
        rng = random.Random(cfg.seed)
        combos = [(rng.choice(sw.mu_var), rng.choice(sw.mu_l1), rng.choice(sw.range_adapter))
                  for _ in range(sw.num_samples)]
    else:
        raise ValueError(f"sweep.search must be 'grid' or 'random', got '{sw.search}'")
    trials = [{"kind": "residual", "mu_var": float(a), "mu_l1": float(b), "range_adapter": bool(c)}
              for a, b, c in dict.fromkeys(combos)]
    none = {"mu_var": None, "mu_l1": None, "range_adapter": None}
    peers = [{"kind": name, **none, "setting": s} for name in sw.peers for s in settings(cfg, name)]
    trials = ([{"kind": "full_res", **none}] if sw.baseline_full_res else []) + peers + trials
    if sw.baseline_combined:
        trials.append({"kind": "combined", "mu_var": None, "mu_l1": None, "range_adapter": None})
    for t in trials:
        t["label"] = trial_label(t)
    return trials


def trial_residual_config(cfg, trial: dict) -> ResidualConfig:
    """The residual config of a sweep trial: cfg.residual with the trial's μ_var, μ_L1, r(σ)."""
    rcfg = cfg.residual
    if not isinstance(rcfg, ResidualConfig):
        from omegaconf import OmegaConf

        rcfg = OmegaConf.to_object(OmegaConf.structured(rcfg))
    rcfg = copy.deepcopy(rcfg)
    rcfg.mu_var = float(trial.get("mu_var", rcfg.mu_var))
    rcfg.mu_l1 = float(trial.get("mu_l1", rcfg.mu_l1))
    rcfg.range_adapter = bool(trial.get("range_adapter", rcfg.range_adapter))
    return rcfg


def trial_config(cfg, trial: dict):
    """The config a trial trains with: ``cfg`` itself, or for a peer trial with a grid setting a
    copy of it with ``peers.<name>`` at that setting (`bootdiff.peers.apply_setting`); a finetune
    trial's copy has its switch fixed and no patience before it (`bootdiff.config.grid.fix_finetune_schedule`)."""
    if trial["kind"] == "finetune":  # its switch fixed, no patience while it pre-trains
        return fix_finetune_schedule(apply_setting(copy.deepcopy(cfg), "finetune", trial.get("setting") or {}))
    if trial["kind"] not in PEER_NAMES or not trial.get("setting"):
        return cfg
    return apply_setting(copy.deepcopy(cfg), trial["kind"], trial["setting"])


STATUSES = ("complete", "stopped_early", "interrupted", "error")


def trial_status(cfg, trial: dict, metrics: dict, error, finished: bool = True) -> str:
    """One of `STATUSES`, each a different fate:

    * ``error``: the trial raised (after its retries);
    * ``interrupted``: the sweep stopped (Ctrl-C / SIGTERM to the driver) before the trial ended —
      its Tune state says neither terminated nor errored (``finished`` False); re-running the sweep
      resumes it from its latest checkpoint;
    * ``complete``: it reached its budget (``*.train.total_kimg``; baselines without one always);
    * ``stopped_early``: it ended before its budget, stopped by the scheduler (ASHA).
    """
    if error:
        return "error"
    if not finished:
        return "interrupted"
    total = cfg.residual.train.total_kimg if trial["kind"] == "residual" else \
        cfg.full_res.train.total_kimg if trial["kind"] != "combined" else None
    if total is None or num(metrics.get("kimg")) >= total - 1e-6:
        return "complete"
    return "stopped_early"


def chosen_report(history) -> Optional[dict]:
    """Early stopping on the validation split: of a trained trial's reports (oldest first), the
    checkpoint report with the lowest finite ``val_G`` (the earliest of equals), or None when no
    checkpoint report carries one (no ``val`` split, or no checkpoint yet). The trial's model is
    taken at that checkpoint, never at one chosen by the test split."""
    best = None
    for r in history or []:
        v, path = num(r.get("val_G")), r.get("checkpoint_path")
        if isinstance(path, str) and path and math.isfinite(v) and (best is None or v < num(best["val_G"])):
            best = r
    return best


def how_it_stopped(row: dict) -> str:
    """How an early-stopped trial's row (`trial_row`) ended: ``"patience"`` (its validation G had
    stopped improving), ``"cap_improving"`` (it reached its budget with its last checkpoint its best,
    `chosen_report`: a longer budget could lower its G) or ``"cap"`` (taken at an earlier minimum)."""
    if row.get("status") == "stopped_early":
        return "patience"
    ran, at = num(row.get("kimg")), num(row.get("chosen_kimg"))
    return "cap_improving" if math.isfinite(at) and math.isfinite(ran) and at >= ran - 1e-6 else "cap"


def trial_row(cfg, trial: dict, metrics: dict, checkpoint, error, finished: bool = True,
              chosen: Optional[dict] = None) -> dict:
    """A trial's row in ``sweep.json`` (the report's trial table reads these keys); ``finished``:
    whether the trial ended (see `trial_status`). ``metrics``: its last report (how far it
    trained: ``kimg``, ``step``, status); ``chosen``: the report of the checkpoint the trial is
    taken at (`chosen_report`), whose G values, checkpoint and ``chosen_kimg`` the row carries —
    else those of the last report."""
    m = metrics or {}
    c = chosen or m
    return {"trial_id": trial["label"], "kind": trial["kind"], "mu_var": trial["mu_var"],
            "mu_l1": trial["mu_l1"], "range_adapter": trial["range_adapter"],
            "val_G": num(c.get("val_G")), "test_G": num(c.get("test_G")), "train_G": num(c.get("train_G")),
            "kimg": num(m.get("kimg")), "chosen_kimg": num(c.get("kimg")),
            "step": m.get("step"), "status": trial_status(cfg, trial, m, error, finished),
            "checkpoint": c.get("checkpoint_path") or checkpoint,
            "error": str(error)[:500] if error else None,
            **({"setting": trial["setting"]} if trial.get("setting") else {})}


def select_best(trials, best_trial_id=None, baselines: bool = False):
    """The best trial of ``trials`` (rows as `trial_row` writes them), or None.

    The trial named ``best_trial_id`` (unknown ids raise ValueError); else the residual trial with
    a checkpoint and the lowest finite validation G (``val_G``: the held-out ``val`` split, never
    the test split, docs/METHOD.md §6); else, with ``baselines``, the trial of any kind with the
    lowest finite validation G (so a report still highlights a model when no residual trial
    finished). Without a ``val`` split (``data.num_val = 0``) there is nothing to choose on: the
    only residual trial is returned, and more than one is an error (None with ``baselines``).
    """
    if best_trial_id is not None:
        for t in trials:
            if t["trial_id"] == best_trial_id:
                return t
        raise ValueError(f"best_trial_id {best_trial_id!r} is not among the trials")
    pools = [[t for t in trials if t["kind"] == "residual" and t.get("checkpoint")]]
    if baselines:
        pools.append(list(trials))
    for pool in pools:
        scored = [t for t in pool if math.isfinite(num(t.get("val_G")))]
        if scored:
            return min(scored, key=lambda t: num(t["val_G"]))
    if any(math.isfinite(num(t.get("val_G"))) for t in trials):
        return None  # validated trials, none of them with a checkpoint
    if len(pools[0]) == 1:
        return pools[0][0]
    if len(pools[0]) > 1 and not baselines:  # a report shows such trials without a best one
        raise ValueError(f"{len(pools[0])} residual trials and no validation G to choose among them "
                         "(data.num_val = 0?); the test split is never used to choose")
    return None


def recommend(trials) -> Optional[dict]:
    """The model the sweep recommends: of every trial with a model (a checkpoint, or the combined
    denoiser and the ensemble, which need none of their own) the one with the lowest finite
    validation G — the bootstrapped residual trials, the combined denoiser, the full-res baseline,
    the peers and the ensemble (`bootdiff.ensemble`) alike, each at its own validation minimum
    (`chosen_report`); the earliest of equals. None when no trial has a
    finite validation G. The test split never enters the choice."""
    scored = [t for t in trials if (t.get("checkpoint") or t["kind"] in ("combined", "ensemble"))
              and math.isfinite(num(t.get("val_G")))]
    return min(scored, key=lambda t: num(t["val_G"])) if scored else None
