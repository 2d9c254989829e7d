"""Peer methods (`bootdiff.peers`): the σ gates of the Ambient-Omni loss, the truncated σ law
behind them, and the peer's training run on real shards through `bootdiff.train.train`."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from bootdiff import experiment
from bootdiff.config import LossConfig, to_object
from bootdiff.data.ingest import ingest
from bootdiff.config.peer_views import pick_view
from bootdiff.peers.ambient import AmbientLoss, ambient_training, group_sizes
from bootdiff.schedules import sample_training_sigma
from bootdiff.train import train
from bootdiff.views import DownsampleView
from tests.datagen import RandomSource, small_cfg


def _phi(z):
    return 0.5 * math.erfc(-z / math.sqrt(2))


def test_ungated_sigma_draws_are_the_untruncated_ones():
    cfg = LossConfig()
    a = sample_training_sigma(1000, cfg, torch.Generator().manual_seed(3))
    xi = torch.randn(1000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.equal(a, torch.exp(cfg.P_mean + cfg.P_std * xi).float())


@pytest.mark.parametrize("lo,hi", [(0.5, math.inf), (0.0, 0.5), (0.2, 3.0)])
def test_truncated_lognormal_is_the_truncated_law(lo, hi):
    """Inside the gate only, and distributed as p_train restricted to it: Φ((ln σ − P_mean)/P_std)
    is uniform on [Φ(a), Φ(b)], so its mean is the midpoint and its quartiles are evenly spaced."""
    cfg = LossConfig()
    s = sample_training_sigma(20000, cfg, torch.Generator().manual_seed(0), lo=lo, hi=hi).double()
    assert s.min() >= torch.tensor(lo, dtype=torch.float32) and s.max() <= torch.tensor(hi, dtype=torch.float32)
    u = torch.tensor([_phi((math.log(v) - cfg.P_mean) / cfg.P_std) for v in s.tolist()])
    a = _phi((math.log(lo) - cfg.P_mean) / cfg.P_std) if lo > 0 else 0.0
    b = _phi((math.log(hi) - cfg.P_mean) / cfg.P_std) if math.isfinite(hi) else 1.0
    assert u.mean().item() == pytest.approx((a + b) / 2, abs=0.01 * (b - a) + 1e-3)
    q = torch.quantile(u, torch.tensor([0.25, 0.75], dtype=u.dtype))
    assert q.tolist() == pytest.approx([a + (b - a) / 4, a + 3 * (b - a) / 4], abs=0.02 * (b - a))


def test_loguniform_gate_and_a_gate_outside_the_range():
    cfg = LossConfig(sigma_dist="loguniform", sigma_min=0.01, sigma_max=10.0)
    s = sample_training_sigma(5000, cfg, torch.Generator().manual_seed(1), lo=1.0)
    assert s.min() >= 1.0 and s.max() <= 10.0 and s.median() == pytest.approx(math.sqrt(10), rel=0.1)
    with pytest.raises(ValueError, match="outside"):
        sample_training_sigma(4, cfg, torch.Generator(), lo=20.0)


def test_ambient_gates_no_lifted_sample_below_sigma_tn_no_crop_above_sigma_crop():
    seen = []

    def D(x, sigma):  # records what the network is given: shape and σ per row
        seen.append((tuple(x.shape), sigma.clone()))
        return torch.zeros_like(x)

    view = DownsampleView(2)
    loss = AmbientLoss(LossConfig(), 0.5, view.lift, sigma_tn=0.7, sigma_crop=0.3)
    gen = torch.Generator().manual_seed(0)
    full, low, crops = torch.rand(6, 1, 16, 16), torch.rand(5, 1, 8, 8), torch.rand(7, 1, 8, 8)
    by_group = {0: [], 1: [], 2: []}
    for _ in range(200):
        out = loss(D, (full, low, crops), gen)
        assert out.shape == (18,) and torch.isfinite(out).all()
        for g in by_group:
            by_group[g].append(loss.last_sigma[loss.last_groups == g])
    shapes = [s for s, _ in seen[:3]]
    assert shapes == [(6, 1, 16, 16), (5, 1, 16, 16), (7, 1, 8, 8)]  # low-res lifted, crops at their size
    s0, s1, s2 = (torch.cat(v) for v in by_group.values())
    assert s1.min() >= torch.tensor(0.7) and s2.max() <= torch.tensor(0.3)
    assert s0.min() < 0.3 and s0.max() > 0.7  # the full-res images at every σ
    # the network sees exactly the σ the loss reports, and the lifted rows are the view's lift
    assert torch.equal(torch.cat([s for _, s in seen[-3:]]), loss.last_sigma)
    assert torch.equal(view.lift(low)[:, :, ::2, ::2], low)


def test_group_sizes_and_view_choice():
    acfg = to_object(small_cfg("/tmp/unused")).peers.ambient
    assert group_sizes(acfg, 32) == (16, 16, 32)
    acfg.low_share, acfg.crop_ratio = 0.25, 0.0
    assert group_sizes(acfg, 32) == (24, 8, 0)
    acfg.low_share = 1.0
    with pytest.raises(ValueError, match="low_share"):
        group_sizes(acfg, 32)
    cfg = to_object(small_cfg("/tmp/unused"))
    assert pick_view(cfg, "downsample", "") == "low" and pick_view(cfg, "patch", "") == "patch"
    with pytest.raises(ValueError, match="peers.ambient.low_view='patch'"):
        pick_view(cfg, "downsample", "patch")


def test_ambient_peer_trains_on_real_shards_and_its_stream_resumes_exactly(tmp_path):
    cfg = to_object(small_cfg(tmp_path, extra=[
        "full_res.train.total_kimg=0.064", "full_res.train.batch_size=8", "full_res.train.checkpoint_every_kimg=0",
        "full_res.net.channels=[8,16]", "full_res.net.norm_groups=4", "full_res.net.attention=[false,false]"]))
    manifest = ingest(cfg, progress=False, source=RandomSource(n=60))
    model, loss, data = ambient_training(cfg, manifest)
    first = list(itertools.islice(data(0), 4))
    full, low, crops = first[0]
    assert full.shape == (4, 1, 16, 16) and low.shape == (4, 1, 8, 8) and crops.shape == (8, 1, 8, 8)
    for a, b in zip(first[2], next(iter(data(2)))):  # data(k) starts at micro-batch k
        assert torch.equal(a, b)
    res = train(model, loss, data, cfg.full_res.train)
    assert res.step == 8 and math.isfinite(res.loss)
    assert set(loss.last_groups.tolist()) == {0, 1, 2}
    info = experiment.view_info(manifest, "full")  # the peer is a full-res denoiser: same shape as the data
    assert tuple(model(full, torch.full((4,), 0.5)).shape) == (4, *info["shape"])


def test_finetune_peer_pretrains_on_lifted_low_res_then_fine_tunes_and_resumes_exactly(tmp_path):
    """The first round(share · S) steps' micro-batches are the low view's batches lifted by the
    view's own Aᵀ/c (checked against the view's lift of the raw low-res stream), the rest the
    full-res images; data(k) starts at step k in either phase; the run trains end to end."""
    from bootdiff.peers import available, peer_training
    from bootdiff.peers.finetune import pretrain_steps
    from bootdiff.views import make_view

    cfg = to_object(small_cfg(tmp_path, extra=[
        "full_res.train.total_kimg=0.064", "full_res.train.batch_size=8", "full_res.train.checkpoint_every_kimg=0",
        "full_res.net.channels=[8,16]", "full_res.net.norm_groups=4", "full_res.net.attention=[false,false]",
        "peers.finetune.pretrain_share=0.5"]))
    manifest = ingest(cfg, progress=False, source=RandomSource(n=60))
    assert "finetune" in available(cfg)
    tcfg = cfg.full_res.train
    f = cfg.peers.finetune
    assert pretrain_steps(f, tcfg) == 4  # 8 steps of 8 images
    f.pretrain_share = 0.0
    assert pretrain_steps(f, tcfg) == 0
    f.pretrain_share = 1
    with pytest.raises(ValueError, match="pretrain_share=1"):
        pretrain_steps(f, tcfg)
    f.pretrain_share = 0.5
    # fix_schedule: the switch in kimg from the cap, and no patience before it — a model trained
    # to where its selection run stopped (a shorter total_kimg) switches where that run did
    import copy

    from bootdiff.config.grid import fix_finetune_schedule as fix_schedule
    from bootdiff.sweep import trial_config

    fixed = fix_schedule(copy.deepcopy(cfg))
    assert fixed.peers.finetune.pretrain_kimg == pytest.approx(0.032)
    assert fixed.full_res.train.patience_from_kimg == pytest.approx(0.032)
    fixed.full_res.train.total_kimg = 0.048
    assert pretrain_steps(fixed.peers.finetune, fixed.full_res.train) == 4 and pretrain_steps(f, fixed.full_res.train) == 3
    swept = trial_config(cfg, {"kind": "finetune", "setting": {}})  # the sweep's finetune trial: the same rule
    assert swept is not cfg and swept.full_res.train.patience_from_kimg == pytest.approx(0.032)
    assert cfg.full_res.train.patience_from_kimg == 0 and f.pretrain_kimg == 0  # the user's config untouched
    model, loss, data = peer_training(cfg, manifest, "finetune")
    batches = list(itertools.islice(data(0), 8))
    low_name = pick_view(cfg, "downsample", "", "peers.finetune.low_view")
    shape = experiment.full_shape(manifest)
    lift = make_view(cfg.views[low_name], shape, name=low_name).lift
    raw_low = list(itertools.islice(experiment.train_data(cfg, manifest, low_name, tcfg, 0, 1)(0), 4))
    raw_full = list(itertools.islice(experiment.train_data(cfg, manifest, "full", tcfg, 0, 1)(0), 4))
    for got, want in zip(batches[:4], raw_low):
        assert got.shape == (8, *shape) and torch.equal(got, lift(want))
    for got, want in zip(batches[4:], raw_full):
        assert torch.equal(got, want)
    assert not torch.equal(batches[3], batches[4])
    for k in (2, 4, 6):  # resume inside pre-training, at the switch, inside fine-tuning
        assert torch.equal(next(iter(data(k))), batches[k])
    res = train(model, loss, data, tcfg)
    assert res.step == 8 and math.isfinite(res.loss)
    assert tuple(model(batches[4], torch.full((8,), 0.5)).shape) == (8, *shape)


def test_coordinate_channels_match_the_crops_location():
    """A crop's coordinate channels are the whole image's grid cut at the crop's place; the grid
    spans [−1, 1] at pixel centres."""
    from bootdiff.precond import coordinate_channels

    H = W = 16
    whole = coordinate_channels(torch.zeros((1, 2), dtype=torch.long), (H, W), (H, W))[0]
    assert whole[0, :, 0].tolist() == pytest.approx([(2 * r + 1) / H - 1 for r in range(H)])  # rows
    assert torch.equal(whole[0, 3], whole[0, 3, 0].expand(W)) and torch.equal(whole[1, :, 5], whole[1, 0, 5].expand(H))
    pos = torch.tensor([[0, 8], [5, 3], [8, 8]])
    crops = coordinate_channels(pos, (8, 8), (H, W))
    for k, (r, c) in enumerate(pos.tolist()):
        assert torch.allclose(crops[k], whole[:, r:r + 8, c:c + 8])


def test_patchdiff_peer_batches_are_where_they_say_and_its_stream_resumes_exactly(tmp_path):
    """Each micro-batch is whole images (position 0), the pool's patches with the locations ingest
    recorded (each patch is its source image cut there), or random crops of the full-res images
    (each the image of the same stream cut at its position); data(k) starts at micro-batch k; the
    denoiser trains on the mix and denoises whole images through D(x, σ) for the samplers."""
    from bootdiff.peers import peer_training
    from bootdiff.peers.patchdiff import batch_kind
    from bootdiff.data.shards import to_model_units

    src = RandomSource(n=60)
    cfg = to_object(small_cfg(tmp_path, extra=[
        "full_res.train.total_kimg=0.08", "full_res.train.batch_size=4", "full_res.train.checkpoint_every_kimg=0",
        "full_res.net.channels=[8,16]", "full_res.net.norm_groups=4", "full_res.net.attention=[false,false]",
        "peers.patchdiff.full_share=0.4", "peers.patchdiff.patch_share=0.3", "peers.patchdiff.crop_sizes=[8]"]))
    manifest = ingest(cfg, progress=False, source=src)
    tcfg = cfg.full_res.train
    model, loss, data = peer_training(cfg, manifest, "patchdiff")
    got = list(itertools.islice(data(0), 20))
    seed = tcfg.seed * 7919
    kinds = [batch_kind(seed, i, 0.4, 0.3) for i in range(20)]
    assert set(kinds) == {"full", "patch", "crop"}
    full = iter(experiment.train_data(cfg, manifest, "full", tcfg, 0, 1)(0))
    patches = iter(experiment.train_data(cfg, manifest, "patch", tcfg, 0, 1, with_meta=True)(0))
    for kind, (x, pos) in zip(kinds, got):
        if kind == "patch":
            want, metas = next(patches)
            assert torch.equal(x, want) and x.shape[-1] == 8
            for k, m in enumerate(metas):
                r, c = m["location"]
                assert pos[k].tolist() == [r, c]
                img = torch.from_numpy(to_model_units(src[m["source_index"]], np.float32)).permute(2, 0, 1)
                assert torch.allclose(x[k], img[:, r:r + 8, c:c + 8])
        else:
            whole = next(full)
            if kind == "full":
                assert torch.equal(x, whole) and not pos.any()
            else:
                assert x.shape[-1] == 8
                for k, (r, c) in enumerate(pos.tolist()):
                    assert torch.equal(x[k], whole[k, :, r:r + 8, c:c + 8])
    for k in (3, 7, 11):
        x, pos = next(iter(data(k)))
        assert torch.equal(x, got[k][0]) and torch.equal(pos, got[k][1])
    res = train(model, loss, data, tcfg)
    assert res.step == 20 and math.isfinite(res.loss)
    x = got[kinds.index("full")][0]
    assert tuple(model(x, torch.full((4,), 0.5)).shape) == tuple(x.shape)  # D(x, σ): the whole image
    with pytest.raises(ValueError, match="needs its position"):
        model(x[..., :8, :8], torch.full((4,), 0.5))


def test_residual_with_sigma_gated_low_res_rows_trains_on_real_shards(tmp_path):
    """The Ambient gate brought into stage 2 (``residual.low_ratio``): each micro-batch is the
    full-res rows plus low-res samples lifted by the view's Aᵀ/c, those only at σ ≥ σ_tn; the
    gradient reaches R_θ alone; the stream resumes exactly; the benchmark's FLOPs count grows by
    the extra rows; a low_view that is not a downsample view is refused naming the key."""
    from bootdiff.config import ConfigError
    from bootdiff.efficiency.compute import residual_step_flops
    from bootdiff.export import save_view_model
    from bootdiff.run.layout import RunLayout

    common = ["residual.train.total_kimg=0.032", "residual.train.batch_size=4", "residual.train.checkpoint_every_kimg=0",
              "residual.net.channels=[8,16]", "residual.net.norm_groups=4", "residual.net.attention=[false,false]",
              *[f"views.{v}.net.{k}" for v in ("patch", "low")
                for k in ("channels=[8,16]", "norm_groups=4", "attention=[false,false]")]]
    cfg = to_object(small_cfg(tmp_path, extra=[*common, "residual.low_ratio=1.5", "residual.sigma_tn=0.8"]))
    manifest = ingest(cfg, progress=False, source=RandomSource(n=60))
    for i, (name, vcfg) in enumerate(cfg.views.items()):  # untrained view models stand in for stage 1's
        info = experiment.view_info(manifest, name)
        torch.manual_seed(i)
        save_view_model(experiment.build_view_denoiser(vcfg, info["shape"], info["sigma_data"]).eval(),
                        RunLayout.of(cfg).model(name), vcfg)
    model, loss, data = experiment.residual_training(cfg, manifest, cfg.residual)
    first = list(itertools.islice(data(0), 3))
    full, low = first[0]
    assert full.shape == (4, 1, 16, 16) and low.shape == (6, 1, 8, 8)
    for a, b in zip(first[2], next(iter(data(2)))):  # data(k) starts at micro-batch k
        assert torch.equal(a, b)
    seen = []
    for _ in range(20):
        out = loss(model, (full, low), torch.Generator().manual_seed(len(seen)))
        assert out.shape == (10,) and torch.isfinite(out).all()
        seen.append(loss.last_sigma)
    s = torch.stack(seen)
    assert s[:, 4:].min() >= 0.8 and s[:, :4].min() < 0.8  # the lifted rows only at σ ≥ σ_tn; full-res at every σ
    model.zero_grad()
    loss(model, (full, low)).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(n.startswith("residual.") for n in grads)  # D_comb frozen: only R_θ learns
    assert any(g is not None and g.abs().sum() > 0 for g in grads.values())
    res = train(model, loss, data, cfg.residual.train)
    assert res.step == 8 and math.isfinite(res.loss)
    plain = to_object(small_cfg(tmp_path, extra=common))
    assert residual_step_flops(cfg, manifest) > 1.5 * residual_step_flops(plain, manifest)  # 10 rows a step, not 4
    with pytest.raises(ConfigError, match="residual.low_view='?patch'?: must name a downsample view"):
        small_cfg(tmp_path, extra=["residual.low_ratio=0.5", "residual.low_view=patch"])
