"""`benchmarks/variants.py` on the data-efficiency benchmark's tiny random datasets (the `bench`
fixture, tests/conftest.py): a variant of the bootstrap measured on the validation carve-out
beside the benchmark's own runs."""

import copy
import json
import math
import os
import shutil

import pytest
import torch

from benchmarks.variants import main as variants_main
from bootdiff import experiment, util
from bootdiff.config import ExperimentConfig, from_yaml, to_yaml
from bootdiff.efficiency.models import share_view_models
from bootdiff.export import load_view_model, save_view_model
from bootdiff.precond import CoordPrecond
from bootdiff.run.layout import RunLayout

torch.set_num_threads(1)


def _finished_bench(bench, tmp_path) -> str:
    """A finished benchmark folder of N = 8 made from the `bench` fixture: untrained view models
    stand in for stage 1's, and rows stand in for the benchmark's residual selection runs and its
    rivals' (baseline, Ambient peer)."""
    cfg, out0, plan, manifests = bench
    cfg = copy.deepcopy(cfg)
    out = str(tmp_path / "bench")
    shutil.copytree(out0, out)  # the fixture's datasets, moved: their configs name the old folder
    cfg.views["patch"].train.total_kimg = 0.032  # a view trained again: a few steps
    datasets = {k: y.replace(out0, out) for k, y in plan["datasets"].items()}
    budgets = {"residual_kimg": 0.032, "full_res_kimg": 0.032, "view_kimg": 0.032, "oracle_kimg": 0.032, "patience": 2,
               "ambient_kimg": 0.032}
    base = from_yaml(datasets["base"], ExperimentConfig)
    for i, (name, vcfg) in enumerate(base.views.items()):  # untrained view models stand in for stage 1's
        info = experiment.view_info(manifests["base"], name)
        torch.manual_seed(i)
        save_view_model(experiment.build_view_denoiser(vcfg, info["shape"], info["sigma_data"]).eval(),
                        RunLayout.of(base).model(name), vcfg)
    share_view_models({**plan, "datasets": datasets}, out)
    util.atomic_write_bytes(os.path.join(out, "plan.json"), json.dumps(  # as run_benchmark writes it
        {"ns": plan["ns"], "views": plan["views"], "budgets": budgets, "config": to_yaml(cfg)}).encode())
    for mv, g in ((0.0, 0.9), (1.0, 0.8)):  # the benchmark's own selection runs (their rows)
        label = f"residual-mv{mv:g}-ml0-ra1"
        row = {"trial": {"kind": "residual", "mu_var": mv, "mu_l1": 0.0, "range_adapter": True, "label": label},
               "curve": [{"kimg": 0.016, "test_G": g}], "test_G": g, "kimg": 0.016}
        util.atomic_write_bytes(os.path.join(out, "results", f"N8__select-{label}.json"), json.dumps(row).encode())
    for label, g in (("baseline", 0.95), ("ambient", 0.85)):  # the rivals' selection runs
        row = {"curve": [{"kimg": 0.016, "test_G": g}], "test_G": g, "kimg": 0.016}
        util.atomic_write_bytes(os.path.join(out, "results", f"N8__select-{label}.json"), json.dumps(row).encode())
    return out


def test_variants_rerun_views_and_selection_runs_with_overrides(bench, tmp_path, capsys):
    """`benchmarks/variants.py`: each variant's overrides applied, the view models it changes
    trained again on the same partial pool (here a position-aware patch view), the combined
    denoiser scored and each residual setting's selection run trained again on the same carve-out
    (here also the σ-gated low-res rows of stage 2), at the benchmark's budgets and patience;
    "before" is the benchmark's own run; a re-run reads the finished runs instead of training them."""
    out = _finished_bench(bench, tmp_path)
    args = ["--bench", out, "--ns", "8",
            "--variant", "low", "residual.low_ratio=1", "residual.sigma_tn=0.5", "residual.train.checkpoint_every_kimg=0.016",
            "--variant", "coords", "views.patch.coords=true",
            "--variant", "aug", "full_res.train.augment=0.5", "residual.train.augment=0.5", "--peers", "ambient"]
    assert variants_main(args) == 0
    res = json.loads(capsys.readouterr().out)["ns"]["8"]
    assert res["before"]["best_val_G"] == 0.8 and math.isfinite(res["before"]["combined_val_G"])
    assert res["low"]["views_retrained"] == [] and res["coords"]["views_retrained"] == ["patch"]
    for v in ("low", "coords"):
        assert set(res[v]["settings"]) == set(res["before"]["settings"]) and math.isfinite(res[v]["combined_val_G"])
        for s in res[v]["settings"].values():  # real runs: G on the carve-out at each checkpoint
            assert math.isfinite(s["val_G"]) and 0 < s["kimg_at_best"] <= 0.032
        assert res[v]["vs_before"] == pytest.approx(res[v]["best_val_G"] / 0.8 - 1)
    assert res["low"]["combined_val_G"] == res["before"]["combined_val_G"]  # the same D_comb
    assert res["coords"]["combined_val_G"] != res["before"]["combined_val_G"]  # its own patch model
    assert res["low"]["flops_per_step"]["residual"] > 1.5 * res["before"]["flops_per_step"]["residual"]  # twice the rows
    assert res["coords"]["flops_per_step"]["view-patch"] > res["before"]["flops_per_step"]["view-patch"]  # 2 more inputs
    model, _ = load_view_model(os.path.join(out, "N8-select~coords", "models", "patch"))
    assert isinstance(model, CoordPrecond)  # the variant's D_comb used the position-aware patch model
    assert not isinstance(load_view_model(os.path.join(out, "base", "models", "patch"))[0], CoordPrecond)  # untouched
    # a variant that changes full_res gives it to the baseline and the named peer too, before / after
    assert "rivals" not in res["low"] and set(res["aug"]["rivals"]) == {"baseline", "ambient"}
    for label, g in (("baseline", 0.95), ("ambient", 0.85)):
        r = res["aug"]["rivals"][label]
        assert r["before_val_G"] == g and math.isfinite(r["val_G"]) and r["val_G"] != g
    for run in ("N8__variant-aug__select-baseline", "N8__variant-aug__select-ambient",
                "N8__variant-aug__select-residual-mv0-ml0-ra1"):  # trained with the augmentation input
        ckpt = sorted(f for f in os.listdir(os.path.join(out, "runs", run)) if f.startswith("checkpoint-"))[-1]
        state = torch.load(os.path.join(out, "runs", run, ckpt, "state.pt"), weights_only=False)
        assert any("augment_map" in k for k in state["model"]), run
    ran = sorted(os.listdir(os.path.join(out, "variants")))
    assert len(ran) == 13 and "variant-coords__view-patch.json" in ran  # 4 combined, 8 selection runs, 1 view
    assert variants_main(args) == 0  # finished runs are read, not trained again
    again = json.loads(capsys.readouterr().out)["ns"]["8"]
    assert again["low"]["settings"] == res["low"]["settings"] and again["coords"]["settings"] == res["coords"]["settings"]
    assert again["aug"]["rivals"] == res["aug"]["rivals"]


def test_ensemble_weights_chosen_on_validation_and_the_rival_trained_at_another_seed(bench, tmp_path, capsys):
    """`benchmarks/ensemble.py`: the Ambient peer's selection run at another seed and each peer
    network on all N trained to its selection run's validation minimum; each ensemble's weight the
    one of lowest validation G; every model and both ensembles scored on the test split; a re-run
    trains nothing."""
    from benchmarks.ensemble import main as ensemble_main
    from bootdiff.ensemble import choose_weight
    from bootdiff.efficiency.run import run_job

    out = _finished_bench(bench, tmp_path)
    plan = json.load(open(os.path.join(out, "plan.json")))
    sel = plan["config"]  # the benchmark's config
    from bootdiff.efficiency.data import dataset_cfg

    job = {"id": "N8/select-ambient", "kind": "ambient", "data": "N8-select", "stage": 0, "N": 8, "quick": True,
           "cfg_yaml": to_yaml(dataset_cfg(from_yaml(sel, ExperimentConfig), out, "N8-select"))}
    row = run_job(job, plan["budgets"], out, 0)  # the benchmark's own selection run of the peer, for real
    util.atomic_write_bytes(os.path.join(out, "results", "N8__select-ambient.json"), json.dumps(row).encode())
    capsys.readouterr()
    args = ["--bench", out, "--n", "8", "--weights", "0.25", "0.5", "--num-samples", "4", "--workers", "1"]
    assert ensemble_main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["test"]) == {"combined", "ambient-s0", "ambient-s1", "combined+peer", "peer+peer"}
    for name, grid in res["validation_grid"].items():
        assert set(grid) == {"0.25", "0.5"} and res["chosen_weight_of_first"][name] == choose_weight(
            {float(w): g for w, g in grid.items()})
    for r in res["test"].values():
        assert math.isfinite(r["test_G"]) and math.isfinite(r["swd"])
    assert res["validation_G"]["ambient-s0"] != res["validation_G"]["ambient-s1"]  # another network
    assert 0 < res["kimg"]["ambient-s1"] <= 0.032
    names = sorted(os.listdir(os.path.join(out, "ensemble")))
    assert "N8__ambient-s0-best.json" in names and "N8__select-ambient-s1.json" in names
    assert ensemble_main(args) == 0 and json.loads(capsys.readouterr().out)["test"] == res["test"]  # read back
    assert choose_weight({0.25: 0.5, 0.5: 0.4, 0.75: 0.4}) == 0.75 and choose_weight({0.25: 0.3, 0.5: 0.4}) == 0.25
