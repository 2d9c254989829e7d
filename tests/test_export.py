"""Export round trips (bootdiff.export): view models and whole bootstrapped models."""

import copy
import json
import os

import pytest
import torch
from diffusers import UNet2DModel

from bootdiff.config import ConfigError, NetConfig, ViewConfig
from bootdiff.export import (load_bootstrap_model, load_view_model, read_manifest,
                             save_bootstrap_model, save_view_model)
from bootdiff.fusion import CombinedDenoiser, FusionWeights, ViewModel
from bootdiff.nets import make_net
from bootdiff.precond import EDMPrecond
from bootdiff.residual import BootstrapDenoiser, RangeAdapter, ResidualPrecond
from bootdiff.views import ClipView, DownsampleView, MaskedPatchView, PatchView

torch.set_num_threads(1)
TINY = NetConfig(channels=[16, 32], attention=[False, True], norm_groups=8, time_scale=123.0)


def _perturb(module, seed):
    """Randomise every parameter (zero-initialised layers too) so round trips are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module


def _view_model(res, channels=1, video=False, sigma_data=0.4, seed=0):
    torch.manual_seed(seed)
    net = make_net(TINY, channels, channels, res, video=video)
    return EDMPrecond(_perturb(net, seed), sigma_data).eval()


def test_image_view_model_round_trip(tmp_path):
    D = _view_model(16)
    url = str(tmp_path / "patch_model")
    save_view_model(D, url, ViewConfig(kind="patch", patch_size=16), {"step": 7})
    D2, view_cfg = load_view_model(url)
    assert not D2.training and view_cfg.kind == "patch" and view_cfg.patch_size == 16
    x, sigma = torch.randn(3, 1, 16, 16), torch.tensor([0.01, 0.7, 30.0])
    assert torch.equal(D(x, sigma), D2(x, sigma))
    m = read_manifest(url)
    assert (m["kind"], m["net_class"], m["time_scale"], m["extra"]) == ("view", "ImageUNet", 123.0, {"step": 7})
    assert abs(m["sigma_data"] - 0.4) < 1e-7 and os.path.exists(os.path.join(url, "COMPLETE"))
    # the net folder is a plain diffusers UNet2DModel
    unet = UNet2DModel.from_pretrained(os.path.join(url, "net"))
    t = 123.0 * sigma.log() / 4
    assert torch.equal(unet(x, t).sample, D.net.unet(x, t).sample)


def test_video_view_model_round_trip_remote_url():
    D = _view_model(8, channels=3, video=True)
    url = "memory://bootdiff-test/models/clip"  # a non-local fsspec filesystem (upload path)
    save_view_model(D, url, {"kind": "clip", "clip_len": 4})
    D2, view_cfg = load_view_model(url)
    assert view_cfg.kind == "clip" and view_cfg.clip_len == 4
    for T in (4, 9):
        x = torch.randn(2, 3, T, 8, 8)
        assert torch.equal(D(x, torch.tensor([0.2, 5.0])), D2(x, torch.tensor([0.2, 5.0])))


def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a bootdiff model folder"):
        load_view_model(str(tmp_path / "nothing"))
    url = str(tmp_path / "m")
    save_view_model(_view_model(8), url, ViewConfig(kind="downsample"))
    with pytest.raises(ValueError, match="key 'kind' is 'view', expected 'bootstrap'"):
        load_bootstrap_model(url)
    os.remove(os.path.join(url, "COMPLETE"))
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_view_model(url)
    with pytest.raises(ConfigError, match="colour"):
        save_view_model(_view_model(8), str(tmp_path / "bad"), {"kind": "patch", "colour": 1})
    assert not os.path.exists(tmp_path / "bad")


def test_bootstrap_model_round_trip(tmp_path):
    H = 16
    mask = torch.zeros(H, H, dtype=torch.bool)
    mask[12:, :] = True  # a subtitle band: the patches of the two top grid rows stay clean
    views = [
        ViewModel("patch", PatchView(H, 8, stride=4), _view_model(8, seed=1)),
        ViewModel("clean", MaskedPatchView(H, 8, mask, stride=4), _view_model(8, seed=2)),
        ViewModel("low", DownsampleView(2), _view_model(8, sigma_data=0.3, seed=3)),
    ]
    weights = FusionWeights([0.01, 0.5, 20.0], 2, weights=torch.rand(3, 2, dtype=torch.float64) + 0.5)
    combined = CombinedDenoiser(views, fusion="split", weights=weights)
    torch.manual_seed(4)
    residual = ResidualPrecond(_perturb(make_net(TINY, 2, 1, H), 4), 0.45)
    adapter = RangeAdapter.from_sigma_range(0.002, 80.0, torch.rand(100) * 0.5)
    model = BootstrapDenoiser(combined, residual, adapter).eval()

    url = str(tmp_path / "boot")
    save_bootstrap_model(model, url)
    loaded = load_bootstrap_model(url)
    assert not loaded.training and loaded.combined.fusion == "split"
    assert [vm.name for vm in loaded.combined.view_models] == ["patch", "clean", "low"]
    assert torch.equal(loaded.combined.view_models[1].view.locations, views[1].view.locations)
    x = torch.randn(2, 1, H, H)
    for s in (0.005, 0.3, 3.0, 60.0):
        sigma = torch.full((2,), s)
        assert torch.equal(model(x, sigma), loaded(x, sigma))
    m = json.loads(open(os.path.join(url, "bootdiff.json")).read())
    assert m["views"][2]["view"] == {"class": "DownsampleView", "factor": 2}
    # every view model inside is itself a loadable view-model folder
    D_low, cfg_low = load_view_model(os.path.join(url, m["views"][2]["folder"]))
    assert cfg_low.kind == "downsample" and cfg_low.factor == 2
    # the views are saved by their classes (to_json); a view model saved without a ViewConfig gets
    # the one its view class describes
    assert [v["view"] for v in m["views"]] == [vm.view.to_json() for vm in views]
    assert m["views"][1]["view"]["class"] == "MaskedPatchView"
    _, cfg_clean = load_view_model(os.path.join(url, m["views"][1]["folder"]))
    assert (cfg_clean.kind, cfg_clean.patch_size) == ("clean_patch", 8)
    m["views"][2]["view"]["class"] = "Tile"
    with open(os.path.join(url, "bootdiff.json"), "w") as f:
        json.dump(m, f)
    with pytest.raises(ValueError, match=r"bootdiff.json: views\[2\]: unknown view class 'Tile'"):
        load_bootstrap_model(url)


def test_bootstrap_video_model_round_trip_remote():
    views = [ViewModel("clips", ClipView(6, 4, stride=2), _view_model(8, video=True, seed=5))]
    combined = CombinedDenoiser(views, fusion="average")
    torch.manual_seed(6)
    residual = ResidualPrecond(_perturb(make_net(TINY, 2, 1, 8, video=True), 6), 0.5)
    model = BootstrapDenoiser(combined, residual, None).eval()
    url = "memory://bootdiff-test/models/boot-video"
    save_bootstrap_model(model, url)
    loaded = load_bootstrap_model(url)
    assert loaded.range_adapter is None and loaded.combined.weights is None
    x, sigma = torch.randn(2, 1, 6, 8, 8), torch.tensor([0.1, 4.0])
    assert torch.equal(model(x, sigma), loaded(x, sigma))


# ----------------------------------------------------------------------------- build vs fit (stage 2)


def _residual_experiment(tmp_path, monkeypatch):
    """A tiny experiment (16×16 grey; an 8×8 patch view and a ×2 downsample view) whose view
    models are exported; its full-resolution data comes from a patched `experiment.load_all`
    that counts its calls and raises once the data is "gone"."""
    from bootdiff import experiment
    from bootdiff.config import load_config, to_object
    from bootdiff.run.layout import RunLayout

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = to_object(load_config(os.path.join(repo, "configs", "quickstart.yaml"), [
        f"storage={tmp_path / 'store'}", "data.resolution=16", "views.patch.patch_size=8",
        "views.patch.stride=8", "residual.fit_fusion_weights=true", "residual.fusion_sigmas=5"]))
    manifest = {"root": str(tmp_path / "store"), "splits": {
        "full": {"shape": [1, 16, 16], "sigma_data": 0.45, "count": 4},
        "patch": {"shape": [1, 8, 8], "sigma_data": 0.5}, "low": {"shape": [1, 8, 8], "sigma_data": 0.4}}}
    for i, (name, vcfg) in enumerate(cfg.views.items()):
        info = manifest["splits"][name]
        torch.manual_seed(i)
        D = experiment.build_view_denoiser(vcfg, info["shape"], info["sigma_data"])
        save_view_model(_perturb(D, i).eval(), RunLayout.of(cfg).model(name), vcfg)
    full = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(7)) * 2 - 1
    data = {"calls": 0, "gone": False}

    def load_all(cfg_, manifest_, split, max_samples):
        if data["gone"]:
            raise RuntimeError("the full-resolution data is gone")
        assert split == "full" and max_samples == 4
        data["calls"] += 1
        return full

    monkeypatch.setattr(experiment, "load_all", load_all)
    return cfg, manifest, full, data


def test_bootstrap_build_reads_no_data_fit_is_the_estimate_load_refits_nothing(tmp_path, monkeypatch):
    from bootdiff import experiment
    from bootdiff.fusion import fit_fusion_weights, fusion_sigma_grid
    from bootdiff.residual import estimate_range_adapter

    cfg, manifest, full, data = _residual_experiment(tmp_path, monkeypatch)
    rcfg = cfg.residual
    data["gone"] = True
    model = experiment.build_bootstrap(cfg, manifest, rcfg)
    # placeholders of the configured shapes: fusion weights ≡ 1 on 5 σ points, r ≡ 1 on 100 bins
    assert model.combined.fusion == "split"
    assert torch.equal(model.combined.weights.weights, torch.ones(5, 2, dtype=torch.float64))
    assert torch.equal(model.range_adapter.values, torch.ones(100))
    with pytest.raises(RuntimeError, match="data is gone"):
        experiment.fit_bootstrap(cfg, manifest, model, rcfg)

    data["gone"] = False
    experiment.fit_bootstrap(cfg, manifest, model, rcfg)
    assert data["calls"] == 1
    # the same numbers as estimating them in one go (fusion weights, then r(σ) with those weights)
    combined = experiment.build_combined(cfg, manifest)
    gen = torch.Generator().manual_seed(rcfg.train.seed)
    lcfg = rcfg.train.loss
    combined.weights = fit_fusion_weights(combined.components, iter(full.split(64)),
                                          fusion_sigma_grid(lcfg.sigma_min, lcfg.sigma_max, 5), generator=gen)
    adapter = estimate_range_adapter(combined, iter(full.split(64)), lcfg.sigma_min, lcfg.sigma_max, generator=gen)
    assert torch.equal(model.combined.weights.log_sigma, combined.weights.log_sigma)
    assert torch.equal(model.combined.weights.weights, combined.weights.weights)
    assert torch.equal(model.range_adapter.values, adapter.values)
    assert torch.equal(model.range_adapter.log_sigma_min, adapter.log_sigma_min)
    assert not torch.equal(adapter.values, torch.ones(100))

    # nothing to fit: no data is read, r stays ≡ 1
    rcfg_off = copy.deepcopy(rcfg)
    rcfg_off.fit_fusion_weights, rcfg_off.range_adapter = False, False
    data["gone"] = True
    off = experiment.fit_bootstrap(cfg, manifest, experiment.build_bootstrap(cfg, manifest, rcfg_off), rcfg_off)
    assert off.combined.weights is None and torch.equal(off.range_adapter.values, torch.ones(100))
    # fitting asks for the grid the model was built with
    with pytest.raises(ValueError, match="fusion weights on None σ points, fitting asks for 5"):
        experiment.fit_bootstrap(cfg, manifest, experiment.build_bootstrap(cfg, manifest, rcfg_off), rcfg)

    # A trained model's fitted constants come from its checkpoint (`ema_model`) or its export
    # (`load_bootstrap_model`): loading never reads the full-resolution data.
    _perturb(model.residual, 3)  # "trained"
    state = {"model": model.state_dict(), "ema": model.state_dict()}
    url = str(tmp_path / "boot")
    save_bootstrap_model(model.eval(), url)
    x, sigma = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([0.05, 0.9, 20.0])
    loaded = experiment.ema_model(experiment.build_bootstrap(cfg, manifest, rcfg), state)
    exported = load_bootstrap_model(url)
    assert data["calls"] == 1  # the fit above, nothing since
    for m in (loaded, exported):
        assert torch.equal(m.combined.weights.weights, model.combined.weights.weights)
        assert torch.equal(m.range_adapter.values, model.range_adapter.values)
        with torch.no_grad():
            assert torch.equal(m(x, sigma), model(x, sigma))


def test_resumed_residual_run_takes_its_constants_from_the_checkpoint(tmp_path, monkeypatch):
    from bootdiff import experiment
    from bootdiff.config import TrainConfig
    from bootdiff.train import train

    cfg, manifest, full, data = _residual_experiment(tmp_path, monkeypatch)
    rcfg = cfg.residual
    run_dir = str(tmp_path / "run")
    tcfg = TrainConfig(total_kimg=0.008, batch_size=4, checkpoint_every_kimg=0.004, report_every=0, seed=0)
    batches = lambda step: iter(full.roll(i, 0) for i in range(step, 10 ** 6))  # noqa: E731

    model, loss, _ = experiment.residual_training(cfg, manifest, rcfg, run_dir=run_dir)
    assert data["calls"] == 1
    fitted = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("range_adapter", "combined.weights"))}
    assert not torch.equal(fitted["range_adapter.values"], torch.ones(100))
    res = train(model, loss, batches, tcfg, run_dir=run_dir)
    assert res.step == 2 and res.checkpoint_url
    for k, v in res.ema.state_dict().items():  # the EMA copy carries the fitted buffers
        if k in fitted:
            assert torch.equal(v, fitted[k]), k

    data["gone"] = True  # a resumed run reads no full-res data before training: no refit
    model2, loss2, _ = experiment.residual_training(cfg, manifest, rcfg, run_dir=run_dir)
    assert torch.equal(model2.range_adapter.values, torch.ones(100))  # placeholders until train resumes
    tcfg.total_kimg = 0.012
    res2 = train(model2, loss2, batches, tcfg, run_dir=run_dir)
    assert res2.step == 3
    for m in (res2.model, res2.ema):
        state = m.state_dict()
        assert all(torch.equal(state[k], v) for k, v in fitted.items())
