"""Position-aware patch views (``views.<v>.coords``): the view's denoiser is told where its patch
lies (`bootdiff.precond.CoordPrecond`), trained at each crop's recorded location, exported and
loaded as such, and given each grid patch's location inside the combined denoiser."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from bootdiff import experiment
from bootdiff.config import ConfigError, to_object
from bootdiff.data.ingest import ingest
from bootdiff.fusion import CombinedDenoiser, ViewModel
from bootdiff.precond import CoordPrecond
from bootdiff.train import train
from bootdiff.views import PatchView
from tests.datagen import RandomSource, small_cfg

SMALL_NETS = [f"views.{v}.net.{k}" for v in ("patch", "low")
              for k in ("channels=[8,16]", "norm_groups=4", "attention=[false,false]")]


def test_a_position_aware_patch_view_trains_at_recorded_locations_exports_and_fuses(tmp_path):
    from bootdiff.export import load_view_model, save_view_model
    from bootdiff.run.layout import RunLayout

    cfg = to_object(small_cfg(tmp_path, extra=[*SMALL_NETS, "views.patch.coords=true", "views.patch.stride=4",
                                               "views.patch.train.total_kimg=0.032", "views.patch.train.batch_size=8",
                                               "views.patch.train.checkpoint_every_kimg=0"]))
    manifest = ingest(cfg, progress=False, source=RandomSource(n=60))
    vcfg = cfg.views["patch"]
    model, loss, data = experiment.view_training(cfg, manifest, "patch", vcfg)
    assert isinstance(model, CoordPrecond) and model.image_size == (16, 16)
    # the batches: each patch with the location ingest recorded for it
    raw = list(itertools.islice(experiment.train_data(cfg, manifest, "patch", vcfg.train, 0, 1, with_meta=True)(0), 3))
    got = list(itertools.islice(data(0), 3))
    for (x, metas), (gx, pos) in zip(raw, got):
        assert torch.equal(x, gx) and pos.tolist() == [list(m["location"]) for m in metas]
    assert (got[0][1] >= 0).all() and (got[0][1] <= 8).all() and len({tuple(p) for p in got[0][1].tolist()}) > 1
    assert torch.equal(next(iter(data(2)))[1], got[2][1])  # positioned exactly on resume
    # the coordinates reach the network: the same patch at two places is denoised differently
    x, s = got[0][0][:2], torch.full((2,), 0.5)
    with torch.no_grad():
        a, b = model(x, s, torch.tensor([[0, 0], [0, 0]])), model(x, s, torch.tensor([[8, 8], [8, 8]]))
    assert a.shape == x.shape and not torch.allclose(a, b)
    res = train(model, loss, data, vcfg.train)
    assert res.step == 4 and math.isfinite(res.loss)
    # exported and loaded as a position-aware model, same outputs
    url = RunLayout.of(cfg).model("patch")
    save_view_model(res.ema.eval(), url, vcfg)
    loaded, lcfg = load_view_model(url)
    assert isinstance(loaded, CoordPrecond) and loaded.image_size == (16, 16) and lcfg.coords
    pos = torch.tensor([[0, 4], [8, 0]])
    with torch.no_grad():
        assert torch.equal(loaded(x, s, pos), res.ema.eval()(x, s, pos))
    # in the combined denoiser each grid patch is denoised at its own location
    seen = []

    class Recording(torch.nn.Module):
        takes_position = True

        def forward(self, y, sigma, pos):
            seen.append(pos.clone())
            return loaded(y, sigma, pos)

    view = PatchView((16, 16), 8, stride=4)  # 3 × 3 grid
    comb = CombinedDenoiser([ViewModel("patch", view, Recording())], fusion="average")
    out = comb(torch.randn(2, 1, 16, 16), torch.tensor([0.3, 2.0]))
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()
    assert torch.equal(seen[0], view.locations.repeat(2, 1))  # sample-major, as project() cuts them


def test_coords_only_on_patch_views_of_images(tmp_path):
    with pytest.raises(ConfigError, match="views.low.coords"):
        small_cfg(tmp_path, extra=["views.low.coords=true"])
