"""The experiment glue without Ray, in latent space: a tiny random AutoencoderKL (a local folder,
as a user's SD VAE would be) → latent ingest of real MNIST → view models trained with bare
`bootdiff.train` and exported → one residual trial → `ray_jobs.evaluate.evaluate` (Ray-free),
whose report shows VAE-decoded pictures."""

import os

import torch

from bootdiff import experiment
from bootdiff.config import load_config, to_object, to_yaml
from bootdiff.data.ingest import ingest
from bootdiff.export import load_bootstrap_model, save_view_model
from bootdiff.train import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_vae(path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=1, out_channels=1, down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], latent_channels=4,
                  norm_num_groups=8, sample_size=32, scaling_factor=0.5).save_pretrained(path)


def test_latent_experiment_without_ray(tmp_path, mnist_wheel):
    from ray_jobs.evaluate import evaluate

    torch.set_num_threads(1)
    _tiny_vae(tmp_path / "vae")
    short = ["total_kimg=0.128", "batch_size=32", "checkpoint_every_kimg=0.064", "report_every=2"]
    overrides = [f"storage={tmp_path / 'store'}", "data.source.limit=400", "data.num_full=32",
                 "data.num_test=32", "data.latent.enabled=true", f"data.latent.vae_path={tmp_path / 'vae'}",
                 "views.patch.patch_size=8", "views.patch.stride=4",
                 *[f"views.{v}.train.{o}" for v in ("patch", "low") for o in short],
                 *[f"residual.train.{o}" for o in short],
                 "eval.max_samples=32", "eval.num_images=3", "eval.sampler.steps=4", "eval.num_sigma=4"]
    cfg = to_object(load_config(os.path.join(REPO, "configs", "quickstart.yaml"), overrides))
    manifest = ingest(cfg, progress=False)
    assert manifest["splits"]["full"]["shape"] == [4, 16, 16] and manifest["splits"]["full"]["dtype"] == "float16"
    manifest = experiment.read_manifest(cfg)

    for v, vcfg in cfg.views.items():  # stage 1, as each Ray Train worker runs it
        model, loss, data = experiment.view_training(cfg, manifest, v, vcfg)
        res = train(model, loss, data, vcfg.train, run_dir=str(tmp_path / "runs" / v))
        assert res.step == 4 and res.checkpoint_url
        save_view_model(res.ema, experiment.model_url(cfg, v), vcfg)

    trial = {"kind": "residual", "mu_var": 0.1, "mu_l1": 0.0, "range_adapter": True, "label": "residual-a"}
    rcfg = experiment.trial_residual_config(cfg, trial)
    assert (rcfg.mu_var, rcfg.range_adapter) == (0.1, True) and cfg.residual.mu_var == 0.0
    model, loss, data = experiment.residual_training(cfg, manifest, rcfg)
    r = model.range_adapter(torch.tensor([0.01, 1.0, 50.0]))
    assert torch.all(r > 0) and r[2] > r[0]  # RMS of x − D_comb grows with σ
    res = train(model, loss, data, rcfg.train, run_dir=str(tmp_path / "runs" / "residual"))
    G = experiment.generalization(cfg, manifest, res.ema, "test")
    combined = experiment.build_combined(cfg, manifest)
    G_comb = experiment.generalization(cfg, manifest, combined, "test")
    assert len(G["mean"]) == 4 and G["total"] > 0 and G_comb["total"] > 0

    outcome = {"best": "residual-a", "trials": [
        {"trial_id": "residual-a", "kind": "residual", "mu_var": 0.1, "mu_l1": 0.0, "range_adapter": True,
         "test_G": G["total"], "train_G": G["total"], "kimg": res.kimg, "step": res.step, "status": "complete",
         "checkpoint": res.checkpoint_url},
        {"trial_id": "combined", "kind": "combined", "mu_var": None, "mu_l1": None, "range_adapter": None,
         "test_G": G_comb["total"], "train_G": G_comb["total"], "kimg": 0, "step": 0, "status": "complete",
         "checkpoint": None}]}
    urls = evaluate(cfg, to_yaml(cfg), outcome)
    html = open(urls["html"]).read()
    assert "32×32" in html and "16×16" not in html.split("Samples")[1].split("Trials")[0]  # decoded pictures
    assert html.count("data:image/png;base64,") >= 5

    # The exported bootstrapped model is the evaluated one.
    loaded = load_bootstrap_model(experiment.model_url(cfg, "bootstrap"))
    x, s = torch.randn(2, 4, 16, 16), torch.tensor([0.3, 3.0])
    best = experiment.ema_model(experiment.build_bootstrap(cfg, manifest, rcfg)[0],
                                __import__("bootdiff.checkpoint", fromlist=["x"]).load_checkpoint(res.checkpoint_url))
    with torch.no_grad():
        assert torch.allclose(loaded(x, s), best(x, s), atol=1e-5)
