"""The ensemble denoiser (bootdiff/ensemble.py) on Gaussian data, where the ideal denoiser is known
in closed form: D*(x; σ) = s²/(s² + σ²)·x for x ~ N(0, s²I). Two denoisers that shrink too little
and too much err in opposite directions; their ensemble at the right weight is D* itself, and at
any weight its G is at most the same mix of theirs (Jensen)."""

import json

import pytest
import torch

from bootdiff.ensemble import EnsembleDenoiser
from bootdiff.evaluation.metrics import generalization_error

S = 0.5  # the data's standard deviation


class Shrink(torch.nn.Module):
    """D(x; σ) = c·s²/(s² + σ²)·x: the ideal denoiser for c = 1."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x, sigma):
        return self.c * S**2 / (S**2 + sigma.view(-1, 1, 1, 1) ** 2) * x


class Fails(torch.nn.Module):
    def forward(self, x, sigma):
        raise AssertionError("a member of weight 0 was evaluated")


def _G(D) -> float:
    x = S * torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    return generalization_error(D, [x], [0.1, 0.5, 2.0], sigma_data=S)["total"]


def test_ensemble_is_the_weighted_sum_and_its_G_is_at_most_the_mix_of_the_members():
    lo, hi = Shrink(0.6), Shrink(1.4)
    x, sigma = torch.randn(3, 1, 4, 4), torch.tensor([0.1, 1.0, 3.0])
    mix = EnsembleDenoiser([lo, hi], [0.25, 0.75])
    assert torch.allclose(mix(x, sigma), 0.25 * lo(x, sigma) + 0.75 * hi(x, sigma))
    g_lo, g_hi, g_ideal = _G(lo), _G(hi), _G(Shrink(1.0))
    for w in (0.25, 0.5, 0.75):
        assert _G(EnsembleDenoiser([lo, hi], [w, 1 - w])) <= w * g_lo + (1 - w) * g_hi + 1e-12
    # 0.5·0.6 + 0.5·1.4 = 1: the equal mix of opposite errors is the ideal denoiser
    assert _G(EnsembleDenoiser([lo, hi], [0.5, 0.5])) == pytest.approx(g_ideal, rel=1e-6)
    assert g_ideal < 0.9 * min(g_lo, g_hi)


def test_weights_are_convex_and_a_zero_weight_member_is_not_run():
    x, sigma = torch.randn(2, 1, 4, 4), torch.tensor([0.5, 1.0])
    assert torch.equal(EnsembleDenoiser([Shrink(1.0), Fails()], [1.0, 0.0])(x, sigma), Shrink(1.0)(x, sigma))
    with pytest.raises(ValueError, match="sum to 1"):
        EnsembleDenoiser([Shrink(1.0), Shrink(0.5)], [0.5, 0.6])
    with pytest.raises(ValueError, match="sum to 1"):
        EnsembleDenoiser([Shrink(1.0), Shrink(0.5)], [1.5, -0.5])
    with pytest.raises(ValueError, match="2 members but 1 weights"):
        EnsembleDenoiser([Shrink(1.0), Shrink(0.5)], [1.0])


def test_sweep_ensemble_row_weight_on_validation_recommended_and_reported(tmp_path):
    """`ensemble_trial` on a real tiny run (random 16² images, untrained view models, a residual
    trial and an Ambient peer trained a few steps through `bootdiff.train`): the best bootstrapped
    trial and the peer averaged, the weight of the lowest validation G, its G recomputed from
    freshly loaded models; the recommendation weighs it like every trial; stage 3's report scores,
    samples and names it. No ensemble without a peer or with ``sweep.ensemble=[]``."""
    import copy
    import math
    import os

    from bootdiff import experiment
    from bootdiff.config import to_object, to_yaml
    from bootdiff.data.ingest import ingest
    from bootdiff.ensemble import choose_weight, ensemble_trial
    from bootdiff.evaluation.evaluate import evaluate
    from bootdiff.evaluation.scores import generalization_pair, validation_G
    from bootdiff.export import save_view_model
    from bootdiff.peers import load_peer
    from bootdiff.peers.ambient import ambient_training
    from bootdiff.run.layout import RunLayout
    from bootdiff.sweep import recommend, trial_residual_config
    from bootdiff.train import train
    from tests.datagen import RandomSource, small_cfg

    torch.set_num_threads(1)
    net = ["net.channels=[8,8]", "net.norm_groups=4", "net.attention=[false,false]"]
    short = ["train.total_kimg=0.032", "train.batch_size=8", "train.checkpoint_every_kimg=0.016", "train.warmup_kimg=0"]
    cfg = to_object(small_cfg(tmp_path, extra=[
        "sweep.peers=[ambient]", "sweep.ensemble=[0.25,0.5,0.75]", "eval.max_samples=8", "eval.num_images=2",
        "eval.sampler.steps=2", "eval.num_sigma=3",
        *[f"{m}.{o}" for m in ("views.patch", "views.low", "residual", "full_res") for o in net + short]]))
    manifest = ingest(cfg, progress=False, source=RandomSource(n=60))
    layout = RunLayout.of(cfg)
    for i, (name, vcfg) in enumerate(cfg.views.items()):  # untrained view models stand in for stage 1's
        info = experiment.view_info(manifest, name)
        torch.manual_seed(i)
        save_view_model(experiment.build_view_denoiser(vcfg, info["shape"], info["sigma_data"]).eval(),
                        layout.model(name), vcfg)
    trial = {"kind": "residual", "mu_var": 0.0, "mu_l1": 0.0, "range_adapter": True, "label": "residual-a"}
    model, loss, data = experiment.residual_training(cfg, manifest, trial_residual_config(cfg, trial))
    res = train(model, loss, data, cfg.residual.train, run_dir=str(tmp_path / "runs" / "residual"))
    peer, ploss, pdata = ambient_training(cfg, manifest)
    pres = train(peer, ploss, pdata, cfg.full_res.train, run_dir=str(tmp_path / "runs" / "ambient"))

    def row(tid, kind, D, checkpoint):
        test, tr = generalization_pair(cfg, manifest, D)
        return {"trial_id": tid, "kind": kind, "mu_var": None, "mu_l1": None, "range_adapter": None,
                "val_G": validation_G(cfg, manifest, D), "test_G": test["total"], "train_G": tr["total"],
                "kimg": 0.032, "chosen_kimg": 0.032, "step": 4, "status": "complete", "checkpoint": checkpoint}

    rows = [row("residual-a", "residual", res.ema.eval(), res.checkpoint_url),
            row("ambient", "ambient", pres.ema.eval(), pres.checkpoint_url),
            row("combined", "combined", experiment.build_combined(cfg, manifest), None)]
    rows[0].update(mu_var=0.0, mu_l1=0.0, range_adapter=True)
    ens = ensemble_trial(cfg, manifest, rows, "residual-a")
    assert ens["kind"] == "ensemble" and ens["members"] == ["residual-a", "ambient"]
    grid = {float(w): g for w, g in ens["val_G_by_weight"].items()}
    assert set(grid) == {0.25, 0.5, 0.75} and len(set(grid.values())) == 3
    w = choose_weight(grid)
    assert ens["weights"] == [w, 1 - w] and ens["val_G"] == grid[w] == min(grid.values())
    boot = experiment.load_trial(cfg, manifest, rows[0])
    again = EnsembleDenoiser([boot, load_peer(cfg, manifest, rows[1])], ens["weights"])
    assert validation_G(cfg, manifest, again) == pytest.approx(ens["val_G"], rel=1e-5)
    assert math.isfinite(ens["test_G"]) and math.isfinite(ens["train_G"]) and ens["checkpoint"] is None
    assert recommend(rows + [ens])["val_G"] == min(r["val_G"] for r in rows + [ens])

    assert ensemble_trial(cfg, manifest, rows[::2], "residual-a") is None  # no peer to average with
    off = copy.deepcopy(cfg)
    off.sweep.ensemble = []
    assert ensemble_trial(off, manifest, rows, "residual-a") is None

    urls = evaluate(cfg, to_yaml(cfg), {"best": "residual-a", "recommended": "ensemble", "trials": rows + [ens]})
    summary = json.load(open(layout.summary))
    assert "ensemble" in summary["quality"] and summary["recommended"]["samples"] == "ensemble"
    html = open(urls["html"]).read()
    assert "Recommended model: ensemble" in html and "× residual-a +" in html and "stands on both of its members" in html
    assert any(f.endswith("_ensemble.png") for f in os.listdir(os.path.join(layout.report, "report_files")))


def test_ensemble_weights_outside_0_1_are_refused_at_load_naming_the_key():
    import os

    QUICK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart.yaml")
    from bootdiff.config import load_config
    from bootdiff.config.schema import ConfigError

    with pytest.raises(ConfigError, match=r"sweep.ensemble=\[0.0, 0.5\]: each weight of the bootstrapped model"):
        load_config(QUICK, ["sweep.ensemble=[0.0,0.5]"])
    assert load_config(QUICK, ["sweep.ensemble=[]"]).sweep.ensemble == []
