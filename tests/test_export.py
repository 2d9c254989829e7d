"""Export round trips (bootdiff.export): view models and whole bootstrapped models."""

import json
import os

import pytest
import torch
from diffusers import UNet2DModel

from bootdiff.bootstrap import BootstrapDenoiser, CombinedDenoiser, ViewModel
from bootdiff.config import ConfigError, NetConfig, ViewConfig
from bootdiff.export import (load_bootstrap_model, load_view_model, read_manifest,
                             save_bootstrap_model, save_view_model)
from bootdiff.fusion import FusionWeights
from bootdiff.nets import make_net
from bootdiff.precond import EDMPrecond, RangeAdapter, ResidualPrecond
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
