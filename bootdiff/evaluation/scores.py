"""Generalization error G of a denoiser on a full-resolution split (docs/METHOD.md §6), as every
stage measures it: the held-out ``test`` and training ``full`` pair, the ``val`` score the sweep
chooses on, those of a checkpoint's EMA weights that the Ray jobs report at each checkpoint, and
a sweep trial's test G at the checkpoint it is taken at, its curve kept for evaluation to reuse
under the same settings (`reusable_curve`). The metric itself is
`bootdiff.evaluation.metrics.generalization_error`.
"""

from __future__ import annotations

import copy
import math
from typing import Optional, Tuple

import torch

from bootdiff import experiment, util
from bootdiff.run.layout import RunLayout


def generalization(cfg, manifest: dict, D, split: str = "test", max_samples: Optional[int] = None) -> dict:
    """G per σ and in total (docs/METHOD.md §6) of denoiser ``D`` on a full-resolution split.

    The weighting λ(σ) uses `g_sigma_data` of the manifest: the σ_data of its ``full`` split, or
    the fixed value a manifest states (``g_sigma_data``), so G is comparable across datasets
    that differ only in the scarce set (the data-efficiency benchmark, `bootdiff.efficiency`)."""
    from bootdiff.evaluation.metrics import generalization_error, sigma_grid

    ecfg = cfg.eval
    n = max_samples or ecfg.max_samples
    sigma_data = experiment.g_sigma_data(manifest)
    batches = experiment.stream(cfg, manifest, split, batch_size=ecfg.batch_size, mode="eval", max_samples=n)
    with torch.no_grad():
        return generalization_error(D, batches, sigma_grid(ecfg), sigma_data, seed=ecfg.seed, delta=ecfg.delta,
                                    device=util.module_device(D))


def generalization_pair(cfg, manifest: dict, D) -> Tuple[dict, dict]:
    """G of ``D`` on the held-out ``test`` split and on the scarce training split ``full``
    (docs/METHOD.md §6): their gap is the over-fitting the sweep is after."""
    return (generalization(cfg, manifest, D, "test"),
            generalization(cfg, manifest, D, "full"))


def validation_G(cfg, manifest: dict, D) -> float:
    """Total G of ``D`` on the held-out ``val`` split (``data.num_val``), the score the sweep
    chooses on (ASHA, the best trial; docs/METHOD.md §6); NaN when the run has no ``val`` split."""
    if "val" not in manifest.get("splits", {}):
        return float("nan")
    return generalization(cfg, manifest, D, "val")["total"]


def view_validation_G(cfg, manifest: dict, view: str, D) -> float:
    """Total G (docs/METHOD.md §6, the same λ(σ) and σ grid) of view ``view``'s denoiser ``D`` on
    that view's samples of the held-out pool (split ``<view>-val``, ``data.num_view_val``): the
    score a view model is early-stopped on and taken at its minimum. NaN without that split."""
    from bootdiff.data.ingest import view_val_split

    split = view_val_split(view)
    if split not in manifest.get("splits", {}):
        return float("nan")
    return generalization(cfg, manifest, D, split)["total"]


def checkpoint_ema(model, checkpoint_url: str):
    """(EMA weights of a checkpoint loaded into a copy of ``model`` on its device — its own weights
    are left untouched —, the checkpoint's state)."""
    from bootdiff.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint_url)
    return experiment.ema_model(copy.deepcopy(model), state), state


def evaluate_view_checkpoint(cfg, manifest: dict, view: str, model, checkpoint_url: str) -> dict:
    """``val_G`` (`view_validation_G`) and ``kimg`` of a view checkpoint's EMA weights (`checkpoint_ema`)."""
    ema, state = checkpoint_ema(model, checkpoint_url)
    return {"val_G": view_validation_G(cfg, manifest, view, ema), "kimg": state["nimg"] / 1000}


def evaluate_checkpoint(cfg, manifest: dict, model, checkpoint_url: str, test: bool = True) -> dict:
    """``val_G``, ``test_G``, ``train_G`` and ``kimg`` of a checkpoint's EMA weights, loaded into a copy of
    ``model`` on its device (the training run's GPU when it has one; its own weights are left
    untouched). ``test`` False leaves the test split alone (``test_G`` NaN) when the run has a
    ``val`` split: a sweep's runs are followed and chosen on validation G at every checkpoint, and
    scored on the test split once, at the checkpoint chosen (`trial_test_G`). A bootstrapped
    model's frozen D_comb outputs are reused from, and added to, the run's ``eval_cache``
    (`bootdiff.memo`): they are the same at every checkpoint and in every trial with the same
    fusion weights."""
    from bootdiff.memo import memoize_combined

    ema, state = checkpoint_ema(model, checkpoint_url)
    memo = memoize_combined(ema, RunLayout.of(cfg).eval_cache)
    val = validation_G(cfg, manifest, ema)
    test_G = generalization(cfg, manifest, ema, "test")["total"] if test or math.isnan(val) else math.nan
    train = generalization(cfg, manifest, ema, "full")
    if memo is not None:
        memo.save()
    return {"val_G": val, "test_G": test_G, "train_G": train["total"], "kimg": state["nimg"] / 1000}


def curve_settings(cfg, manifest: dict, split: str) -> dict:
    """What G's curve on ``split`` depends on besides the model (docs/METHOD.md §6): the split
    (name and image count), the samples scored, the σ grid, the noise seed, δ and σ_data of λ(σ).
    A curve computed under equal settings, for the same weights, is the same curve."""
    from bootdiff.evaluation.metrics import sigma_grid

    ecfg = cfg.eval
    count = int(experiment.view_info(manifest, split)["count"])
    return {"split": split, "count": count, "n": min(count, int(ecfg.max_samples)), "sigma": sigma_grid(ecfg),
            "seed": int(ecfg.seed), "delta": float(ecfg.delta), "sigma_data": experiment.g_sigma_data(manifest)}


def trial_test_G(cfg, manifest: dict, row: dict) -> dict:
    """G on the test split (docs/METHOD.md §6: its per-σ curve and ``total``, with the
    ``settings`` it was computed under, `curve_settings`) of a sweep trial's model at the checkpoint
    it is taken at (the row's ``checkpoint``: its validation minimum, `bootdiff.sweep.chosen_report`).
    This is the one time a trained trial meets the test split; the row keeps the curve
    (``test_curve``), which evaluation reuses (`reusable_curve`). Residual trials reuse D_comb's
    outputs from the run's ``eval_cache`` (`bootdiff.memo`)."""
    from bootdiff.memo import memoize_combined
    from bootdiff.peers import NAMES, load_peer

    D = load_peer(cfg, manifest, row) if row["kind"] in NAMES else experiment.load_trial(cfg, manifest, row)
    D = D.to(util.compute_device()).eval()
    memo = memoize_combined(D, RunLayout.of(cfg).eval_cache)
    g = generalization(cfg, manifest, D, "test")
    if memo is not None:
        memo.save()
    return {**g, "settings": curve_settings(cfg, manifest, "test")}


def reusable_curve(cfg, manifest: dict, row: Optional[dict]) -> Optional[dict]:
    """The test-split G curve a sweep row keeps (``test_curve``: `trial_test_G`, or the ensemble's,
    `bootdiff.ensemble.ensemble_trial`) when it was computed under this run's `curve_settings`;
    None otherwise (no such row or curve, or evaluation settings changed since: G is computed
    again)."""
    curve = (row or {}).get("test_curve")
    if not curve or curve.get("settings") != curve_settings(cfg, manifest, "test"):
        return None
    return curve
