"""The data-efficiency benchmark's bookkeeping (`bootdiff.efficiency`), on a tiny random source:
the fixed partial pool (same view shards for every N, disjoint from every full-res set, the
test split untouched), the validation carve-out, one G weighting for all datasets, budgets and
patience, resuming (finished models are skipped) and `--rows`; the scores on hand-made results are
in tests/test_efficiency_scores.py. The `bench` fixture (tests/conftest.py) prepares the
datasets once for the session."""

import copy
import json
import math

import pytest
import torch

from bootdiff import experiment, util
from bootdiff.efficiency.data import prepare, source_indices, val_count
from bootdiff.efficiency.models import job_cfg, jobs
from bootdiff.efficiency.run import run_benchmark
from bootdiff.evaluation.scores import generalization
from bootdiff.config import ExperimentConfig, from_yaml, load_config, to_object
from tests.datagen import RandomSource, bench_overrides  # tiny in-memory source of random 16×16 grey images

torch.set_num_threads(1)


def test_fixed_partial_pool_and_untouched_test(bench):
    cfg, out, plan, m = bench
    assert plan["ns"] == [8, 16]  # 64 does not fit 100 training samples with an equal partial pool
    base = m["base"]
    test = source_indices(base, "test")
    views = {v: source_indices(base, v) for v in cfg.views}
    assert sorted(set(views["patch"])) == sorted(plan["partial"]) == sorted(set(views["low"]))
    fulls = {}
    for n in plan["ns"]:
        mn = m[f"N{n}"]
        full = source_indices(mn, "full")
        fulls[n] = full
        assert full == plan["pool"][:n]
        assert source_indices(mn, "test") == test  # the same samples, same order
        for v in cfg.views:  # the same view shards, byte for byte
            assert [s["sha256"] for s in mn["splits"][v]["shards"]] == [s["sha256"] for s in base["splits"][v]["shards"]]
            assert set(source_indices(mn, v)).isdisjoint(full)
        assert set(full).isdisjoint(test)
        assert [s["sha256"] for s in mn["splits"]["test"]["shards"]] == [s["sha256"] for s in base["splits"]["test"]["shards"]]
    assert fulls[16][:8] == fulls[8]  # nested
    oracle = source_indices(m["oracle"], "full")
    assert sorted(oracle) == sorted(plan["partial"] + plan["pool"]) and set(oracle).isdisjoint(test)
    assert source_indices(m["oracle"], "test") == test


def test_validation_carve_out_never_touches_test(bench):
    cfg, out, plan, m = bench
    test = set(source_indices(m["base"], "test"))
    for n in plan["ns"]:
        sel = m[f"N{n}-select"]
        train, val = source_indices(sel, "full"), source_indices(sel, "test")
        assert len(val) == val_count(n, 0.25) and set(train).isdisjoint(val)
        assert sorted(train + val) == sorted(plan["pool"][:n])
        assert set(val).isdisjoint(test) and set(train).isdisjoint(test)
    with pytest.raises(ValueError, match="N=3"):
        val_count(3, 0.25)


def test_one_g_weighting_for_all(bench):
    cfg, out, plan, m = bench
    sig = m["base"]["splits"]["test"]["sigma_data"]
    assert plan["g_sigma_data"] == sig
    fulls = {m[f"N{n}"]["splits"]["full"]["sigma_data"] for n in plan["ns"]}
    assert len(fulls) == 2  # the scarce sets' own σ_data differ ...
    def D(x, s):
        return 0.5 * x
    gs = []
    for name in ("N8", "N16", "oracle"):
        assert experiment.g_sigma_data(m[name]) == sig
        gs.append(generalization(cfg, m[name], D, "test")["total"])
    assert gs[0] == gs[1] == gs[2]  # ... but G of one model on the test split is one number
    unfixed = [generalization(cfg, {k: v for k, v in m[f"N{n}"].items() if k != "g_sigma_data"}, D,
                                         "test")["total"] for n in plan["ns"]]
    assert unfixed[0] != unfixed[1]  # what the fixed weighting repairs


def test_rerun_with_other_ns_keeps_the_pool(bench, tmp_path):
    """A re-run on the same folder with other N reuses the base ingest: the full pool stays the one
    the views were cut around, and an N beyond it (which would take images from the views' partial
    pool) is an error naming the folder, before anything is written."""
    cfg, out, plan, _ = bench
    again = prepare(cfg, out, [8], source=RandomSource())
    assert again["pool"] == plan["pool"] and again["partial"] == plan["partial"]
    small = str(tmp_path / "small")
    prepare(cfg, small, [8], source=RandomSource())
    with pytest.raises(ValueError, match=r"ingested for N up to 8.*N=16"):
        prepare(cfg, small, [8, 16], source=RandomSource())
    assert not util.exists(f"{small}/N16/data/manifest.json")


def test_resume_skips_finished_models(bench):
    cfg, out, _, _ = bench  # the datasets are written already: prepare skips them
    seen = []

    def runner(todo, b, out_, num_samples, stop_after=None):
        for j in todo:
            if stop_after is not None and len(seen) >= stop_after:
                raise KeyboardInterrupt("interrupted")
            seen.append(j["id"])
            g = 1.0 / (1 + len(j["id"])) if j["kind"] != "view" else None
            yield j, {**{k: v for k, v in j.items() if k != "cfg_yaml"}, "test_G": g, "swd": 0.1,
                      "wall_s": 0.0, "curve": [], "kimg": 1.0}

    with pytest.raises(KeyboardInterrupt):
        run_benchmark(cfg, out, [8, 16], kimg=1, source=RandomSource(),
                                 runner=lambda *a: runner(*a, stop_after=4))
    first = list(seen)
    assert len(first) == 4 and len(util.url_fs(f"{out}/results")[0].ls(f"{out}/results")) == 4
    seen.clear()
    summary = run_benchmark(cfg, out, [8, 16], kimg=1, source=RandomSource(), runner=runner)
    assert not set(seen) & set(first)  # finished models are not run again
    ids = {j["id"] for j in jobs(json.loads(util.read_bytes(f"{out}/plan.json")) | {
        "datasets": {k: "" for k in ("base", "oracle", "oracle-select", "N8", "N8-select", "N16", "N16-select")}}, cfg)}
    assert set(first) | set(seen) == ids
    assert {"N8/select-baseline", "N16/select-baseline", "select-oracle"} <= ids  # their own validation runs
    assert {"N8/ambient", "N8/select-ambient", "N16/ambient", "N8/finetune", "N8/select-finetune",
            "N8/patchdiff"} <= ids  # the peers
    assert "ambient" in summary["per_n"]["8"] and "ambient" in summary["per_n"]["8"]["selection"]
    boot = json.loads(util.read_bytes(f"{out}/results/N8__bootstrap.json"))
    sel = {k: json.loads(util.read_bytes(f"{out}/results/N8__select-{k}.json"))["test_G"]
           for k in ("residual-mv0-ml0-ra1", "residual-mv1-ml0-ra1")}
    assert boot["trial"]["label"] == min(sel, key=sel.get)  # μ chosen on the validation G
    assert summary["budgets"]["full_res_kimg"] == summary["budgets"]["residual_kimg"] == 1
    for f in ("efficiency.json", "g_vs_n.png", "swd_vs_n.png", "summary.md"):
        assert util.exists(f"{out}/{f}")
    other = copy.deepcopy(cfg)
    other.seed = 1  # another seed on the same folder would mix its models with these: refused
    before = util.read_bytes(f"{out}/plan.json")
    with pytest.raises(ValueError, match=r"seed=0; this run has seed=1 — use a new --out"):
        run_benchmark(other, out, [8, 16], kimg=1, source=RandomSource(), runner=runner)
    assert util.read_bytes(f"{out}/plan.json") == before


def test_the_experiment_seed_trains_every_model_with_other_random_numbers(tmp_path):
    """``seed=1`` reaches every model the benchmark trains (views, baselines, peers, oracle,
    residuals): their `train.seed` is filled from it at load, and a baseline trained at another
    seed is another model. The data and G's noise stay the same."""
    from bootdiff.efficiency.models import budgets, peer_budgets
    from bootdiff.efficiency.data import dataset_cfg
    from bootdiff.efficiency.train import train_local
    from bootdiff.config import to_yaml

    cfg = to_object(load_config(None, bench_overrides(tmp_path) + ["seed=1"]))
    out = str(tmp_path / "s1")
    plan = prepare(cfg, out, [8], source=RandomSource())
    b = budgets(cfg, 0.032)
    b.update(peer_budgets(cfg, experiment.read_manifest(dataset_cfg(cfg, out, "base")), b))
    kinds = set()
    for job in jobs(plan, cfg):
        c = job_cfg(job, b)
        kinds.add(job["kind"])
        assert {c.full_res.train.seed, c.residual.train.seed, c.distill.train.seed} == {1}, job["id"]
        assert {v.train.seed for v in c.views.values()} == {1} and c.eval.seed == 0 and c.data.split_seed == 0
    assert {"view", "full_res", "residual", "ambient", "finetune", "patchdiff"} <= kinds
    curves = []
    for seed in (1, 0):
        c = from_yaml(plan["datasets"]["N8-select"], ExperimentConfig)
        c.full_res.train.seed = seed
        job = {"id": f"N8/select-baseline-s{seed}", "kind": "full_res", "data": "N8-select", "N": 8,
               "quick": True, "cfg_yaml": to_yaml(c)}
        curves.append([p["test_G"] for p in train_local(job, b, out)["curve"]])
    assert len(curves[0]) == len(curves[1]) >= 1 and curves[0] != curves[1]  # one step: G at its checkpoint


def test_pipeline_report_quotes_a_benchmark_of_the_same_data(bench, tmp_path):
    """eval.benchmark: the benchmark's worth in full-res images at the run's N, in the report; a
    benchmark of other data, or a folder without one, is refused at config load naming the key."""
    from bootdiff.config import ConfigError
    from bootdiff.evaluation import report
    from bootdiff.evaluation.worth import benchmark_worth, worth_line

    cfg, out, _, _ = bench

    def runner(todo, b, out_, num_samples):
        for j in todo:
            g = 1.0 / (1 + len(j["id"])) if j["kind"] != "view" else None
            yield j, {**{k: v for k, v in j.items() if k != "cfg_yaml"}, "test_G": g, "swd": 0.1,
                      "wall_s": 0.0, "curve": [], "kimg": 1.0}

    summary = run_benchmark(cfg, out, [8, 16], kimg=1, source=RandomSource(), runner=runner)
    base = ["storage=" + cfg.storage, "name=t", "data.resolution=16", "data.num_test=20", "data.shard_size=24",
            "views.patch.kind=patch", "views.patch.patch_size=8", "views.patch.per_sample=2",
            "views.low.kind=downsample", "views.low.factor=2", "views.low.train.total_kimg=3"]  # training may differ
    run_cfg = to_object(load_config(None, base + [f"eval.benchmark={out}"]))  # the same data: accepted at load
    w = benchmark_worth(run_cfg.eval.benchmark, 8)
    assert w["worth"] == summary["per_n"]["8"]["worth"] and set(w["worth"]) >= {"bootstrap", "combined"}
    assert w["test_G"]["bootstrap"] == summary["per_n"]["8"]["bootstrap"]["test_G"]
    line = worth_line(w)
    k = w["worth"]["bootstrap"]
    bound = {"<": "fewer than ", ">": "more than "}.get(k["bound"], "≈ ")
    assert "at N = 8" in line and f"the bootstrapped model {bound}{k['images']:.0f} images" in line, line
    assert worth_line(benchmark_worth(out, 12)).endswith("measured N = 8, 16, not N = 12: no worth in full-res "
                                                         "images to quote for this run.")
    t = {"trial_id": "r", "kind": "residual", "mu_var": 0.0, "mu_l1": 0.0, "range_adapter": True, "val_G": 0.3,
         "test_G": 0.4, "train_G": 0.3, "step": 3, "status": "complete", "checkpoint": "/ck"}
    md = open(report.write_report(str(tmp_path / "rep"), [t], {}, {}, "", {}, worth=w)["markdown"]).read()
    assert "- " + line in md
    # other data (a view's geometry, the resolution) or no benchmark there: refused at load, the key named
    for bad, key in (("views.patch.patch_size=4", "views.patch.patch_size"), ("data.resolution=32", "data.resolution")):
        with pytest.raises(ConfigError, match=rf"eval.benchmark=.*measured other data.*{key}"):
            load_config(None, base + [bad, f"eval.benchmark={out}"])
    with pytest.raises(ConfigError, match=r"eval.benchmark=.*no finished data-efficiency benchmark there"):
        load_config(None, base + [f"eval.benchmark={tmp_path}"])


def test_peer_budget_is_the_bootstraps_training_compute(bench):
    """The Ambient peer's kimg buys the FLOPs of the view models plus the residual, within one of
    its steps and never more; FLOPs per step scale with the micro-batch; the job gets that kimg."""
    import dataclasses

    from bootdiff.efficiency import compute
    from bootdiff.efficiency.models import budgets, job_cfg, peer_budgets

    cfg, out, plan, m = bench
    b = budgets(cfg, 1)
    pb = peer_budgets(cfg, m["base"], b)
    f = pb["flops"]
    ft = cfg.full_res.train
    boot = f["bootstrap"]
    assert boot["total"] == pytest.approx(boot["view-patch"] + boot["view-low"] + boot["residual"])
    assert boot["total"] - f["ambient_per_step"] < f["ambient"] <= boot["total"]
    # pre-train + fine-tune is the baseline's network on full-size batches: its steps cost the same
    assert f["finetune_per_step"] == pytest.approx(f["baseline_per_step"], rel=1e-9)
    assert pb["finetune_kimg"] == pb["baseline_kimg_at_bootstrap_compute"] > pb["ambient_kimg"]
    # patchdiff in expectation: half its micro-batches whole images (two more input channels than
    # the baseline's), the rest 8² patches and crops — a quarter of the pixels
    assert 0.5 * f["baseline_per_step"] < f["patchdiff_per_step"] < f["baseline_per_step"]
    assert pb["patchdiff_kimg"] > pb["finetune_kimg"]
    assert pb["ambient_kimg"] == compute.steps(pb["ambient_kimg"], ft.batch_size) * ft.batch_size / 1000
    # a view's step: one view network, forward + backward, on its own batch size
    v = cfg.views["patch"]
    one = compute.view_step_flops(cfg, m["base"], "patch", v)
    two = compute.view_step_flops(cfg, m["base"], "patch", dataclasses.replace(
        v, train=dataclasses.replace(v.train, batch_size=2 * v.train.batch_size)))
    assert two == pytest.approx(2 * one, rel=1e-6)
    assert boot["view-patch"] == compute.steps(b["view_kimg"], v.train.batch_size) * one
    # the residual pays the frozen D_comb's forward at every step: more than its own network alone
    assert compute.residual_step_flops(cfg, m["base"]) > compute.view_step_flops(cfg, m["base"], "full", cfg.residual)
    job = {"id": "N8/ambient", "kind": "ambient", "cfg_yaml": plan["datasets"]["N8"]}
    assert job_cfg(job, {**b, **pb}).full_res.train.total_kimg == pb["ambient_kimg"]
    with pytest.raises(RuntimeError, match="no budget"):
        job_cfg(job, b)


def test_ambient_job_trains_locally_and_is_scored(bench):
    """The peer row end to end in this process: trained on its dataset's full-res images and the
    shared views' shards (`train_local`), G at its checkpoints as its curve, scored like the others."""
    from bootdiff.efficiency.models import budgets, evaluate_job
    from bootdiff.efficiency.train import train_local

    cfg, out, plan, _ = bench
    from bootdiff.config import to_yaml

    b = {**budgets(cfg, 0.05, patience=1), "ambient_kimg": 0.128}
    c = from_yaml(plan["datasets"]["N8-select"], ExperimentConfig)
    c.full_res.train.checkpoint_every_kimg = 0.032  # 4 checkpoints of G on the carve-out
    job = {"id": "N8/select-ambient", "kind": "ambient", "data": "N8-select", "N": 8, "quick": True,
           "cfg_yaml": to_yaml(c)}
    trained = train_local(job, b, out)
    assert trained["kimg"] <= 0.128 and trained["checkpoint"]
    curve = trained["curve"]
    assert curve and math.isfinite(curve[-1]["test_G"])
    # patience 1 on its carve-out's G (a selection run): it ran to its cap, or it stopped one
    # checkpoint after its best — never while still improving
    best = min(range(len(curve)), key=lambda i: curve[i]["test_G"])
    if trained["stopped_early"]:
        assert best == len(curve) - 2 and trained["kimg"] < 0.128
    else:
        assert trained["kimg"] == pytest.approx(0.128) and len(curve) == 4
    scores = evaluate_job(job, b, trained["checkpoint"], num_samples=4)
    assert math.isfinite(scores["test_G"]) and scores["test_G"] == pytest.approx(trained["curve"][-1]["test_G"], rel=1e-4)


def test_patience_stops_selection_runs_and_sets_each_models_budget(bench, tmp_path):
    """With patience: every selection run (baselines, peers, residuals) trains with it on its
    carve-out and the model it selects for trains exactly as long as it ran, without it; the caps
    of the baselines and the oracle are the bootstrap's compute (the oracle's at least every
    row's); the oracle has no patience — it trains to its cap — and is taken at its validation
    minimum, and a row near or below it is named."""

    cfg = copy.deepcopy(bench[0])
    cfg.peers.ambient.grid = [0.2, 1.0]  # two σ_tn tried on validation: 1.0 wins below
    cfg.peers.patchdiff.grid = [0.5, 0.75]
    out = str(tmp_path / "p")
    stop_at = {"N8/select-baseline": 0.4, "N8/select-ambient-sigma_tn0.2": 0.9, "N8/select-ambient-sigma_tn1": 0.6,
               "N8/select-residual-mv0-ml0-ra1": 0.3, "N8/select-residual-mv1-ml0-ra1": 0.5}
    val_G = {"N8/select-residual-mv0-ml0-ra1": 0.9, "N8/select-residual-mv1-ml0-ra1": 0.7,
             "N8/select-ambient-sigma_tn0.2": 1.3}
    test_G = {"N8/baseline": 1.0, "N8/bootstrap": 0.6, "N8/ambient": 0.5, "N8/combined": 0.552, "oracle": 0.62}
    seen = {}

    def runner(todo, b, out_, num_samples):
        for j in todo:
            c = job_cfg(j, b)
            t = c.residual.train if j["kind"] == "residual" else c.full_res.train
            seen[j["id"]] = {"budget": j.get("budget_kimg"), "total": t.total_kimg, "patience": t.patience,
                             "sigma_tn": c.peers.ambient.sigma_tn}
            kimg = stop_at.get(j["id"], t.total_kimg)
            g = val_G.get(j["id"], test_G.get(j["id"], 1.0))
            # G at 0.2 kimg and at the end; the main oracle's minimum is where its selection run's was
            curve = [{"kimg": 0.2, "test_G": g + (0.0 if j["id"] == "select-oracle" else 0.1)},
                     {"kimg": kimg, "test_G": g + (0.05 if j["id"] == "select-oracle" else 0.0)}]
            if j["id"] == "oracle":
                curve = [{"kimg": 0.2, "test_G": 0.55}, {"kimg": kimg, "test_G": 0.62}]
            yield j, {**{k: v for k, v in j.items() if k != "cfg_yaml"}, "test_G": g, "swd": 0.1, "wall_s": 0.0,
                      "curve": curve, "kimg": kimg, "stopped_early": kimg < t.total_kimg,
                      "patience": t.patience}

    summary = run_benchmark(cfg, out, [8], kimg=1, source=RandomSource(), runner=runner, patience=2)
    b = summary["budgets"]
    eq = b["baseline_kimg_at_bootstrap_compute"]
    assert b["patience"] == 2 and b["full_res_kimg"] == max(1, eq) and b["residual_kimg"] == 1
    assert b["oracle_kimg"] >= max(b["view_kimg"], b["residual_kimg"], b["full_res_kimg"], b["ambient_kimg"])
    for jid, s in seen.items():
        assert s["patience"] == (2 if "select-" in jid and jid != "select-oracle" else 0), jid
    assert seen["select-oracle"]["total"] == b["oracle_kimg"] and seen["N8/select-baseline"]["total"] == b["full_res_kimg"]
    assert seen["N8/select-ambient-sigma_tn1"]["total"] == b["ambient_kimg"] and seen["N8/select-ambient-sigma_tn1"]["sigma_tn"] == 1.0
    assert seen["N8/ambient"]["sigma_tn"] == 1.0  # the grid's winner on validation (1.1 vs 1.4), its budget
    # a patchdiff setting with more whole-image batches costs more per step: fewer kimg for the same FLOPs
    assert b["patchdiff-full_share0.75_kimg"] < b["patchdiff-full_share0.5_kimg"] <= b["oracle_kimg"]
    assert {"N8/select-patchdiff-full_share0.5", "N8/select-patchdiff-full_share0.75"} <= set(seen)
    for main, sel in (("N8/baseline", "N8/select-baseline"), ("N8/ambient", "N8/select-ambient-sigma_tn1"),
                      ("N8/bootstrap", "N8/select-residual-mv1-ml0-ra1")):
        assert seen[main]["budget"] == seen[main]["total"] == stop_at[sel], main  # as long as its selection run
    assert seen["oracle"]["budget"] == seen["oracle"]["total"] == b["oracle_kimg"]  # its cap: it had no patience
    row = summary["per_n"]["8"]
    oe = summary["oracle_early_stopped"]
    assert oe["val_kimg"] == 0.2 and oe["test_G"] == 0.55 and summary["oracle_best_test_G"] == 0.55
    assert oe["still_improving"] is False  # its minimum at 0.2 kimg, well before its cap
    # select-finetune ran to its cap with its best G at its last checkpoint: said so
    assert row["finetune_early_stopped"]["still_improving"] is True
    # gap against the oracle at its best: (1.1 − 0.6) / (1.1 − 0.55) for the stopped bootstrap
    boot = row["bootstrap_early_stopped"]
    assert row["gap_closed_test_G_early_stopped"] == pytest.approx(
        (row["baseline_early_stopped"]["test_G"] - boot["test_G"]) / (row["baseline_early_stopped"]["test_G"] - 0.55))
    assert boot["test_G"] == 0.6  # its own checkpoint at its selection run's minimum (0.5 kimg)
    # ambient 0.5 < 0.55 (said, not hidden); combined 0.552 within 1 % of it; bootstrap 0.6 neither
    assert row["vs_oracle"] == {"ambient": "beats", "combined": "within noise"}
    md = util.read_bytes(f"{out}/summary.md").decode()
    assert "oracle, stopped at 0.2 kimg" in md and "A row that beats the oracle means the oracle was cut short" in md
    assert "finetune, stopped at" in md and "still improving at its cap" in md
    assert f"not improved for 2 checkpoints, up to a cap: baselines {b['full_res_kimg']:g} kimg" in md


def test_rows_train_one_row_and_a_later_run_adds_the_rest(bench, tmp_path):
    """``rows=["bootstrap"]`` (a second seed of the bootstrap alone) trains the view models, the
    residual's selection runs and the bootstrap, nothing else, and still writes its summary; a later
    run on the same folder without it adds the other rows and trains nothing twice. An unknown row
    is refused, naming it, before anything is written."""
    cfg, _, _, _ = bench
    out = str(tmp_path / "rows")
    seen = []

    def runner(todo, b, out_, num_samples):
        for j in todo:
            seen.append(j["id"])
            g = 1.0 / (1 + len(j["id"])) if j["kind"] != "view" else None
            yield j, {**{k: v for k, v in j.items() if k != "cfg_yaml"}, "test_G": g, "swd": 0.1,
                      "wall_s": 0.0, "curve": [], "kimg": 1.0}

    with pytest.raises(ValueError, match=r"--rows names \['bootstap'\].*its rows: oracle, baseline, combined, "
                                         r"bootstrap, ambient"):
        run_benchmark(cfg, out, [8], kimg=1, source=RandomSource(), runner=runner, rows=["bootstap"])
    assert not util.exists(out)
    summary = run_benchmark(cfg, out, [8], kimg=1, source=RandomSource(), runner=runner, rows=["bootstrap"])
    views = {f"view-{v}" for v in cfg.views}
    assert set(seen) == views | {"N8/select-residual-mv0-ml0-ra1", "N8/select-residual-mv1-ml0-ra1", "N8/bootstrap"}
    row = summary["per_n"]["8"]
    assert "bootstrap" in row and "baseline" not in row and "combined" not in row
    assert math.isnan(row["gap_closed_test_G"])  # no references: no gap, and the summary says why
    assert "or a row the gap needs was not run here" in util.read_bytes(f"{out}/summary.md").decode()
    first = list(seen)
    seen.clear()
    summary = run_benchmark(cfg, out, [8], kimg=1, source=RandomSource(), runner=runner)
    assert not set(seen) & set(first)
    assert {"select-oracle", "oracle", "N8/baseline", "N8/combined", "N8/ambient"} <= set(seen)
    assert math.isfinite(summary["per_n"]["8"]["gap_closed_test_G"])
