"""The experiment glue without Ray, in latent space: a tiny random AutoencoderKL (a local folder,
as a user's SD VAE would be) → latent ingest of real MNIST → view models trained with bare
`bootdiff.train` and exported → one residual trial → `bootdiff.evaluation.evaluate.evaluate` (stage 3),
whose report shows VAE-decoded pictures."""

import copy
import json
import math
import os

import pytest
import torch

from bootdiff import experiment, util
from bootdiff.checkpoint import load_checkpoint
from bootdiff.config import load_config, to_object, to_yaml
from bootdiff.data.ingest import ingest
from bootdiff.evaluation.evaluate import evaluate
from bootdiff.evaluation.scores import (curve_settings, evaluate_checkpoint, generalization, generalization_pair,
                                        reusable_curve, trial_test_G)
from bootdiff.experiment import export_result, load_trial
from bootdiff.export import load_bootstrap_model, load_view_model
from bootdiff.run.layout import RunLayout
from bootdiff.sweep import trial_residual_config
from bootdiff.train import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_vae(path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=1, out_channels=1, down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], latent_channels=4,
                  norm_num_groups=8, sample_size=32, scaling_factor=0.5).save_pretrained(path)


def test_latent_experiment_without_ray(tmp_path, mnist_wheel):
    torch.set_num_threads(1)
    _tiny_vae(tmp_path / "vae")
    short = ["total_kimg=0.128", "batch_size=32", "checkpoint_every_kimg=0.064", "report_every=2"]
    overrides = [f"storage={tmp_path / 'store'}", "data.source.limit=400", "data.num_full=32",
                 "data.num_test=32", "data.num_val=8", "data.latent.enabled=true", f"data.latent.vae_path={tmp_path / 'vae'}",
                 "views.patch.patch_size=8", "views.patch.stride=4",
                 *[f"views.{v}.train.{o}" for v in ("patch", "low") for o in short],
                 *[f"residual.train.{o}" for o in short],
                 "eval.max_samples=32", "eval.num_images=3", "eval.sampler.steps=4", "eval.num_sigma=4"]
    cfg = to_object(load_config(os.path.join(REPO, "configs", "quickstart.yaml"), overrides))
    manifest = ingest(cfg, progress=False)
    assert manifest["splits"]["full"]["shape"] == [4, 16, 16] and manifest["splits"]["full"]["dtype"] == "float16"
    manifest = experiment.read_manifest(cfg)
    layout = RunLayout.of(cfg)

    for v, vcfg in cfg.views.items():  # stage 1, as each Ray Train worker runs it
        model, loss, data = experiment.view_training(cfg, manifest, v, vcfg)
        res = train(model, loss, data, vcfg.train, run_dir=str(tmp_path / "runs" / v))
        assert res.step == 4 and res.checkpoint_url
        assert export_result(cfg, v, res.checkpoint_url) == layout.model(v)
        exported, _ = load_view_model(layout.model(v))
        x, s = torch.randn(2, *manifest["splits"][v]["shape"]), torch.tensor([0.3, 3.0])
        with torch.no_grad():  # the exported model is the run's EMA
            assert torch.allclose(exported(x, s), res.ema.eval()(x, s), atol=1e-5)

    trial = {"kind": "residual", "mu_var": 0.1, "mu_l1": 0.0, "range_adapter": True, "label": "residual-a"}
    rcfg = trial_residual_config(cfg, trial)
    assert (rcfg.mu_var, rcfg.range_adapter) == (0.1, True) and cfg.residual.mu_var == 0.0
    model, loss, data = experiment.residual_training(cfg, manifest, rcfg, device=util.compute_device())
    assert util.module_device(model) == util.compute_device()  # fitted where it trains (a GPU when there is one)
    r = model.range_adapter(torch.tensor([0.01, 1.0, 50.0]))
    assert torch.all(r > 0) and r[2] > r[0]  # RMS of x − D_comb grows with σ
    res = train(model, loss, data, rcfg.train, run_dir=str(tmp_path / "runs" / "residual"))
    G, G_train = generalization_pair(cfg, manifest, res.ema)
    combined = experiment.build_combined(cfg, manifest)
    G_comb = generalization(cfg, manifest, combined, "test")
    assert len(G["mean"]) == 4 and G["total"] > 0 and G_comb["total"] > 0
    # r(σ) is fitted once per run (the run's eval_cache): another trial reads the same values
    assert len([f for f in os.listdir(layout.eval_cache) if f.startswith("range-")]) == 1
    other, _, _ = experiment.residual_training(cfg, manifest, trial_residual_config(cfg, {**trial, "mu_var": 1.0}))
    assert torch.equal(other.range_adapter.values, model.range_adapter.values)
    # what the Ray hooks report at a checkpoint: the same pair, from the checkpoint's EMA weights
    at_ckpt = evaluate_checkpoint(cfg, manifest, model, res.checkpoint_url)
    assert at_ckpt["kimg"] == res.kimg and abs(at_ckpt["test_G"] - G["total"]) < 1e-6 * G["total"]
    assert abs(at_ckpt["train_G"] - G_train["total"]) < 1e-6 * G_train["total"]
    # D_comb at G's inputs was kept (bootdiff.memo): a later checkpoint reads it, same numbers
    assert len([f for f in os.listdir(layout.eval_cache) if f.startswith("dcomb-")]) == 1
    assert evaluate_checkpoint(cfg, manifest, model, res.checkpoint_url) == at_ckpt
    # a sweep's runs: validation and training G at checkpoints, the test split left alone; the
    # trial's test G is computed once, at the checkpoint it is taken at, from that checkpoint alone
    swept = evaluate_checkpoint(cfg, manifest, model, res.checkpoint_url, test=False)
    assert math.isnan(swept["test_G"]) and math.isfinite(swept["val_G"])
    assert (swept["val_G"], swept["train_G"]) == (at_ckpt["val_G"], at_ckpt["train_G"])
    row = {"trial_id": "residual-a", "kind": "residual", "mu_var": 0.1, "mu_l1": 0.0, "range_adapter": True,
           "checkpoint": res.checkpoint_url}
    g = trial_test_G(cfg, manifest, row)
    assert abs(g["total"] - G["total"]) < 1e-6 * G["total"] and g["settings"] == curve_settings(cfg, manifest, "test")
    # evaluation reuses the curve a row keeps under the same settings, and only then
    assert reusable_curve(cfg, manifest, {**row, "test_curve": g}) == g
    other = copy.deepcopy(cfg)
    other.eval.num_sigma += 1
    assert reusable_curve(other, manifest, {**row, "test_curve": g}) is None and reusable_curve(cfg, manifest, row) is None
    kept = {**g, "mean": [2 * m for m in g["mean"]]}  # a kept curve told apart from a recomputed one

    outcome = {"best": "residual-a", "trials": [
        {"trial_id": "residual-a", "kind": "residual", "mu_var": 0.1, "mu_l1": 0.0, "range_adapter": True,
         "test_G": G["total"], "train_G": G["total"], "kimg": res.kimg, "step": res.step, "status": "complete",
         "checkpoint": res.checkpoint_url, "test_curve": kept},
        {"trial_id": "combined", "kind": "combined", "mu_var": None, "mu_l1": None, "range_adapter": None,
         "test_G": G_comb["total"], "train_G": G_comb["total"], "kimg": 0, "step": 0, "status": "complete",
         "checkpoint": None}]}
    urls = evaluate(cfg, to_yaml(cfg), outcome)
    assert urls["html"] == f"{layout.report}/report.html" and os.path.exists(layout.summary)
    html = open(urls["html"]).read()
    assert "32×32" in html and "16×16" not in html.split("Samples")[1].split("Trials")[0]  # decoded pictures
    assert html.count("data:image/png;base64,") >= 5 and "test_curve" not in html  # a curve, not a column
    total = json.load(open(layout.summary))["total_G"]["bootstrapped"]["test"]
    assert total == pytest.approx(2 * g["total"], rel=1e-9)  # the row's curve, not computed again

    # The exported bootstrapped model is the evaluated one, and the trained one.
    loaded = load_bootstrap_model(layout.model("bootstrap"))
    x, s = torch.randn(2, 4, 16, 16), torch.tensor([0.3, 3.0])
    best = load_trial(cfg, manifest, outcome["trials"][0])
    direct = experiment.ema_model(experiment.build_bootstrap(cfg, manifest, rcfg),
                                  load_checkpoint(res.checkpoint_url))
    with torch.no_grad():
        assert torch.allclose(loaded(x, s), best(x, s), atol=1e-5)
        assert torch.allclose(best(x, s), direct(x, s), atol=1e-6)
        assert torch.allclose(best(x, s), res.ema.eval()(x, s), atol=1e-5)


def test_module_device():
    """Where evaluation runs: the device of a module's first parameter, else buffer, else the CPU."""
    assert util.module_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert util.module_device(torch.nn.BatchNorm1d(2, affine=False)) == torch.device("cpu")  # buffers only
    assert util.module_device(torch.nn.ReLU()) == util.module_device(lambda x, s: x) == torch.device("cpu")
    assert util.module_device(torch.nn.Linear(2, 2).to("meta")) == torch.device("meta")
    assert util.compute_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
