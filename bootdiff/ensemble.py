"""An ensemble of denoisers: D(x; σ) = Σ_i w_i D_i(x; σ), the w_i ≥ 0 summing to one.

Each D_i estimates E[x | x + σn]; so does any convex combination of them, and its error is no
larger than the same combination of theirs: the squared error is convex in D (Jensen), so
G(Σ w_i D_i) ≤ Σ w_i G(D_i) at every σ, with a strict gain where the members' errors differ. Two
models trained on the same data in different ways — the bootstrap's D_comb from the partial views
and one full-resolution network trained the Ambient-Omni way (`bootdiff.peers.ambient`) — err
differently, so their average can be better than either (benchmarks/ensemble.py measures it, the
weight chosen on validation G). It is sampled like any denoiser (`bootdiff.samplers`), at the sum
of its members' cost per step."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


class EnsembleDenoiser(torch.nn.Module):
    """D(x; σ) = Σ_i w_i D_i(x; σ) for denoisers ``members`` and convex ``weights`` (each ≥ 0, their
    sum 1 within 1e-6); a weight of 0 skips its member."""

    def __init__(self, members: Sequence[torch.nn.Module], weights: Sequence[float]):
        super().__init__()
        weights = [float(w) for w in weights]
        if len(members) != len(weights) or not members:
            raise ValueError(f"ensemble: {len(members)} members but {len(weights)} weights")
        if any(w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
            raise ValueError(f"ensemble: weights {weights} must be ≥ 0 and sum to 1")
        self.members = torch.nn.ModuleList(members)
        self.weights = weights

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = None
        for D, w in zip(self.members, self.weights):
            if w == 0:
                continue
            y = w * D(x, sigma)
            out = y if out is None else out + y
        return out


def choose_weight(val_G: dict) -> float:
    """The weight of the lowest validation G (``{w: G}``, NaN never chosen); the larger w on a tie."""
    finite = [w for w in sorted(val_G, reverse=True) if math.isfinite(val_G[w])]
    if not finite:
        raise ValueError(f"ensemble: no finite validation G among {val_G}")
    return min(finite, key=lambda w: val_G[w])


def partner(trials) -> Optional[dict]:
    """The peer the bootstrapped model is averaged with: of the sweep's peer trials
    (`bootdiff.peers`) with a checkpoint, the one with the lowest finite validation G."""
    from bootdiff.peers import NAMES
    from bootdiff.sweep import num

    peers = [t for t in trials if t["kind"] in NAMES and t.get("checkpoint") and math.isfinite(num(t.get("val_G")))]
    return min(peers, key=lambda t: num(t["val_G"])) if peers else None


def ensemble_trial(cfg, manifest: dict, trials, best_id: Optional[str]) -> Optional[dict]:
    """The sweep's ensemble row: the best bootstrapped trial ``best_id`` averaged with the best
    peer (`partner`), its weight the one of ``sweep.ensemble`` with the lowest validation G
    (`choose_weight`; the test split never chooses), then scored like every trial (validation,
    test and train G). None when ``sweep.ensemble`` is empty, there is no bootstrapped trial or
    peer to average, or no validation split (``data.num_val = 0``) to choose the weight on. Each
    member's outputs at G's fixed inputs are computed once for all the weights (`bootdiff.memo`; D_comb's from the run's ``eval_cache``, as the trials left them)."""
    from bootdiff import experiment, util
    from bootdiff.evaluation.scores import curve_settings, generalization_pair, validation_G
    from bootdiff.memo import memoize_combined, memoized
    from bootdiff.peers import load_peer
    from bootdiff.run.layout import RunLayout

    weights = [float(w) for w in cfg.sweep.ensemble]
    rows = {t["trial_id"]: t for t in trials}
    best, peer = rows.get(best_id), partner(trials)
    if not weights or best is None or not best.get("checkpoint") or peer is None or "val" not in manifest["splits"]:
        return None  # nothing to average, or no validation split to choose the weight on
    device = util.compute_device()
    boot = experiment.load_trial(cfg, manifest, best).to(device).eval()
    memo = memoize_combined(boot, RunLayout.of(cfg).eval_cache)
    members = [memoized(boot, None), memoized(load_peer(cfg, manifest, peer).to(device).eval(), None)]
    with torch.no_grad():
        val = {w: validation_G(cfg, manifest, EnsembleDenoiser(members, [w, 1 - w])) for w in weights}
        w = choose_weight(val)
        test, train = generalization_pair(cfg, manifest, EnsembleDenoiser(members, [w, 1 - w]))
    if memo is not None:
        memo.save()
    return {"trial_id": "ensemble", "kind": "ensemble", "mu_var": None, "mu_l1": None, "range_adapter": None,
            "members": [best["trial_id"], peer["trial_id"]], "weights": [w, 1 - w],
            "val_G_by_weight": {f"{k:g}": v for k, v in val.items()}, "val_G": val[w], "test_G": test["total"],
            "test_curve": {**test, "settings": curve_settings(cfg, manifest, "test")},  # reused by evaluation
            "train_G": train["total"], "kimg": None, "chosen_kimg": None, "step": 0, "status": "complete",
            "checkpoint": None, "error": None}


def load_ensemble(row: dict, members: dict) -> EnsembleDenoiser:
    """The ensemble of a ``sweep.json`` row (`ensemble_trial`) from its members' models,
    ``members``: {trial id: denoiser} (the report's loaded models)."""
    missing = [m for m in row["members"] if m not in members]
    if missing:
        raise KeyError(f"ensemble: members {missing} of {row['trial_id']} are not loaded")
    return EnsembleDenoiser([members[m] for m in row["members"]], row["weights"])
