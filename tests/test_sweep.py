"""The sweep's bookkeeping (`bootdiff.sweep`): the trial list and each trial's config, peers as
baselines, the trial rows and best trial, each trained trial taken at its validation minimum, and the
recommended model (docs/CONTRACTS.md, `bootdiff/sweep.py`); the four trial statuses and ASHA after a
restore (`ray_jobs.sweep_residual.RestoreSafeASHA`)."""

import math
import os
from types import SimpleNamespace

import pytest


def _sweep_cfg(*overrides):
    from bootdiff.config import load_config, to_object

    return to_object(load_config(None, ["views.low.kind=downsample", "views.low.factor=2", *overrides]))


def test_trial_list_labels_and_residual_config():
    from bootdiff.sweep import trial_list, trial_residual_config

    cfg = _sweep_cfg("sweep.mu_var=[0.0,0.5,0.5]", "sweep.mu_l1=[0.01]", "sweep.range_adapter=[true,false]")
    trials = trial_list(cfg)
    assert [t["label"] for t in trials] == ["full_res", "residual-mv0-ml0.01-ra1", "residual-mv0-ml0.01-ra0",
                                            "residual-mv0.5-ml0.01-ra1", "residual-mv0.5-ml0.01-ra0",
                                            "combined"]
    cfg.sweep.search, cfg.sweep.num_samples = "random", 5
    assert trial_list(cfg) == trial_list(cfg) and len(trial_list(cfg)) <= 5 + 2
    cfg.sweep.search = "bogus"
    with pytest.raises(ValueError, match="sweep.search"):
        trial_list(cfg)
    rcfg = trial_residual_config(cfg, trials[4])
    assert (rcfg.mu_var, rcfg.mu_l1, rcfg.range_adapter) == (0.5, 0.01, False)
    assert (cfg.residual.mu_var, cfg.residual.range_adapter) == (0.0, True)  # the config is untouched


def test_peers_as_sweep_baselines_each_grid_setting_its_own_config():
    from bootdiff.sweep import trial_config, trial_list

    cfg = _sweep_cfg("views.patch.kind=patch", "views.patch.patch_size=8", "sweep.mu_var=[0.0]", "sweep.mu_l1=[0.0]",
                     "sweep.peers=[ambient,finetune]",
                     "peers.ambient.grid=[0.5,2]")
    trials = trial_list(cfg)
    assert [t["label"] for t in trials] == ["full_res", "ambient-sigma_tn0.5", "ambient-sigma_tn2", "finetune",
                                            "residual-mv0-ml0-ra1", "combined"]
    amb = trials[2]
    assert amb["kind"] == "ambient" and amb["setting"] == {"sigma_tn": 2.0} and amb["mu_var"] is None
    tcfg = trial_config(cfg, amb)
    assert tcfg.peers.ambient.sigma_tn == 2.0 and cfg.peers.ambient.sigma_tn != 2.0  # a copy, the config untouched
    assert trial_config(cfg, trials[0]) is cfg
    ft = trial_config(cfg, trials[3])  # finetune: a copy with its switch fixed, no patience before it
    assert ft is not cfg and ft.full_res.train.patience_from_kimg == ft.peers.finetune.pretrain_kimg > 0


def test_recommended_model_is_the_lowest_validation_G_of_every_kind():
    from bootdiff.sweep import recommend, select_best, trial_row

    cfg = _sweep_cfg("residual.train.total_kimg=2.0", "full_res.train.total_kimg=4.0")
    none = {"mu_var": None, "mu_l1": None, "range_adapter": None}

    def row(kind, label, val, test, ck="/ck", kimg=2.0, **extra):
        t = {"kind": kind, "label": label, **(none if kind != "residual" else
                                              {"mu_var": 0.0, "mu_l1": 0.0, "range_adapter": True}), **extra}
        return trial_row(cfg, t, {"val_G": val, "test_G": test, "kimg": kimg}, ck, None)

    res = row("residual", "r0", 0.50, 0.40)
    full = row("full_res", "full_res", 0.45, 0.60, kimg=4.0)
    amb = row("ambient", "ambient-sigma_tn1", 0.30, 0.70, kimg=3.0, setting={"sigma_tn": 1.0})
    lost = row("finetune", "finetune", 0.10, 0.10, ck=None)  # no checkpoint: no model to recommend
    comb = row("combined", "combined", 0.35, 0.35, ck=None)  # needs none
    # the peer wins on validation although its test G is the worst: the test split never chooses
    assert recommend([res, full, amb, lost, comb]) is amb and amb["status"] == "stopped_early"
    assert amb["setting"] == {"sigma_tn": 1.0} and "setting" not in res
    assert recommend([res, full, lost, comb]) is comb and recommend([res, full]) is full
    assert select_best([res, full, amb, comb]) is res  # the best bootstrapped trial stays the residual's
    assert recommend([lost, dict(res, val_G=float("nan"))]) is None
    ens = {"trial_id": "ensemble", "kind": "ensemble", "val_G": 0.25, "test_G": 0.9, "checkpoint": None}
    assert recommend([res, full, amb, comb, ens]) is ens  # bootdiff.ensemble: no checkpoint of its own, needs none
    assert select_best([res, amb, ens]) is res


def test_trial_rows_status_and_best():
    from bootdiff.sweep import num, select_best, trial_row

    cfg = _sweep_cfg("residual.train.total_kimg=2.0")
    res = {"kind": "residual", "mu_var": 0.0, "mu_l1": 0.0, "range_adapter": True, "label": "r0"}
    done = trial_row(cfg, res, {"val_G": 0.2, "test_G": 0.5, "train_G": 0.4, "kimg": 2.0, "step": 9}, "/ck/r0", None)
    assert done["status"] == "complete" and done["checkpoint"] == "/ck/r0" and done["error"] is None
    early = trial_row(cfg, dict(res, label="r1"), {"val_G": 0.25, "test_G": 0.3, "kimg": 1.0,
                                                   "checkpoint_path": "/ck/r1"}, None, None)
    assert early["status"] == "stopped_early" and early["checkpoint"] == "/ck/r1" and math.isnan(early["train_G"])
    failed = trial_row(cfg, dict(res, label="r2"), None, None, RuntimeError("boom"))
    assert failed["status"] == "error" and failed["error"] == "boom" and math.isnan(failed["test_G"])
    nock = trial_row(cfg, dict(res, label="r3"), {"val_G": 0.1, "test_G": 0.1, "kimg": 2.0}, None, None)
    comb = trial_row(cfg, {"kind": "combined", "mu_var": None, "mu_l1": None, "range_adapter": None,
                           "label": "combined"}, {"val_G": 0.05, "test_G": 0.05, "kimg": 2.0}, None, None)
    assert comb["status"] == "complete" and num(None) != num(None) and num("x") != num("x")
    rows = [done, early, failed, nock, comb]
    # the residual trial with a checkpoint and the lowest finite validation G (r3 has no
    # checkpoint): r0, although r1's test G is lower: the test split never chooses
    assert select_best(rows)["trial_id"] == "r0" and done["val_G"] == 0.2 and math.isnan(failed["val_G"])
    assert select_best([early, failed, comb])["trial_id"] == "r1"
    assert select_best(rows, "r0") is done
    with pytest.raises(ValueError, match="'nope'"):
        select_best(rows, "nope")
    assert select_best([failed, comb]) is None  # no residual trial finished: nothing to export
    assert select_best([failed, comb], baselines=True) is comb  # the report still highlights one
    # without a validation split there is nothing to choose on: one residual trial is the best,
    # several are an error (the sweep's config check asks for data.num_val first), or no best in a report
    unval = [dict(r, val_G=float("nan")) for r in (done, early)]
    assert select_best(unval[:1]) is unval[0]
    with pytest.raises(ValueError, match="no validation G"):
        select_best(unval)
    assert select_best(unval, baselines=True) is None


def test_each_trained_trial_is_taken_at_its_validation_minimum():
    from bootdiff.sweep import chosen_report, trial_row

    cfg = _sweep_cfg("residual.train.total_kimg=3.0")
    nan = float("nan")
    # a trial's reports as Tune's metrics_dataframe holds them (progress reports: NaN G, no checkpoint)
    history = [{"kimg": 0.5, "loss": 1.0, "val_G": nan, "test_G": nan, "checkpoint_path": nan},
               {"kimg": 1.0, "val_G": 0.40, "test_G": 0.45, "train_G": 0.30, "checkpoint_path": "/ck/1"},
               {"kimg": 2.0, "val_G": 0.35, "test_G": 0.50, "train_G": 0.20, "checkpoint_path": "/ck/2"},
               {"kimg": 2.5, "val_G": 0.10, "test_G": 0.10, "checkpoint_path": nan},  # no checkpoint: not takeable
               {"kimg": 3.0, "val_G": 0.38, "test_G": 0.30, "train_G": 0.10, "checkpoint_path": "/ck/3"}]
    chosen = chosen_report(history)
    assert chosen["checkpoint_path"] == "/ck/2"  # the validation minimum, not the test minimum (/ck/3)
    res = {"kind": "residual", "mu_var": 0.0, "mu_l1": 0.0, "range_adapter": True, "label": "r0"}
    row = trial_row(cfg, res, history[-1], "/ck/3", None, chosen=chosen)
    assert (row["val_G"], row["test_G"], row["train_G"], row["checkpoint"]) == (0.35, 0.50, 0.20, "/ck/2")
    assert row["kimg"] == 3.0 and row["chosen_kimg"] == 2.0 and row["status"] == "complete"
    # ties go to the earlier checkpoint; without any validated checkpoint there is no choice
    assert chosen_report(history[:2] + [dict(history[2], val_G=0.40)])["checkpoint_path"] == "/ck/1"
    assert chosen_report([dict(h, val_G=nan) for h in history]) is None and chosen_report(None) is None
    last = trial_row(cfg, res, history[-1], "/ck/3", None, chosen=None)
    assert last["checkpoint"] == "/ck/3" and last["chosen_kimg"] == 3.0


def test_trial_statuses_distinct_and_asha_after_restore():
    """complete / stopped_early / interrupted / error are four statuses; a trial restored with
    results is never stopped by ASHA's emptied rungs, a trial started after the restore still is."""
    from ray.tune.schedulers import TrialScheduler

    from bootdiff.config import load_config, to_object
    from bootdiff.sweep import STATUSES, trial_status
    from ray_jobs.sweep_residual import RestoreSafeASHA

    cfg = to_object(load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart.yaml"), ["residual.train.total_kimg=2"]))
    res = {"kind": "residual"}
    got = [trial_status(cfg, res, {"kimg": 2.0}, None),
           trial_status(cfg, res, {"kimg": 1.0}, None),
           trial_status(cfg, res, {"kimg": 1.0}, None, finished=False),
           trial_status(cfg, res, {"kimg": 1.0}, RuntimeError("boom"), finished=False)]
    assert got == list(STATUSES) == ["complete", "stopped_early", "interrupted", "error"]

    def asha():
        return RestoreSafeASHA(time_attr="kimg", metric="val_G", mode="min", max_t=4, grace_period=1,
                               reduction_factor=2)

    def trial(tid, last=None, kind="residual"):
        return SimpleNamespace(trial_id=tid, last_result=last or {}, config={"trial": {"kind": kind}})

    # A fresh scheduler (as Tuner.restore builds it): trial "good" started after the restore and
    # reports a low G at kimg 1 and 2; trial "bad" reports a worse G at kimg 2.
    for restored, expect in ((False, TrialScheduler.STOP), (True, TrialScheduler.CONTINUE)):
        s = asha()
        good, bad = trial("good"), trial("bad", {"kimg": 1.0, "val_G": 0.9} if restored else None)
        s.on_trial_add(None, good)
        s.on_trial_add(None, bad)
        assert s.on_trial_result(None, good, {"kimg": 1.0, "val_G": 0.1}) == TrialScheduler.CONTINUE
        assert s.on_trial_result(None, good, {"kimg": 2.0, "val_G": 0.1}) == TrialScheduler.CONTINUE
        # "bad" resumes at kimg 2: plain ASHA judges it on the rungs "good" alone filled and stops it
        assert s.on_trial_result(None, bad, {"kimg": 2.0, "val_G": 0.9}) == expect, restored
    # ASHA still acts on trials that start after the restore.
    late = trial("late")
    s.on_trial_add(None, late)
    assert s.on_trial_result(None, late, {"kimg": 2.0, "val_G": 0.95}) == TrialScheduler.STOP
    # The baselines are never judged: a full-res baseline far worse than every residual trial at
    # the same kimg runs on, and its results do not enter the rungs (a later trial is not judged on them).
    s = asha()
    base, r1 = trial("full_res", kind="full_res"), trial("r1")
    s.on_trial_add(None, base)
    s.on_trial_add(None, r1)
    assert s.on_trial_result(None, r1, {"kimg": 2.0, "val_G": 0.1}) == TrialScheduler.CONTINUE
    assert s.on_trial_result(None, base, {"kimg": 2.0, "val_G": 5.0}) == TrialScheduler.CONTINUE
    s.on_trial_complete(None, base, {"kimg": 14.0, "val_G": 0.01})
    r2 = trial("r2")
    s.on_trial_add(None, r2)
    assert s.on_trial_result(None, r2, {"kimg": 2.0, "val_G": 0.5}) == TrialScheduler.STOP  # judged on r1 alone
