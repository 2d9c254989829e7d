"""Distillation (`bootdiff.distill`): the loss, a tiny distillation of a bootstrapped teacher, the
teacher-sample shards read back by the loader and mixed with real data, the `distill` config
checks and the stage's skip-when-COMPLETE decision. CPU, tiny."""

import json
import os

import numpy as np
import pytest
import torch

from bootdiff import experiment
from bootdiff.distill import student as distill
from bootdiff.config import ConfigError, LossConfig, NetConfig, TrainConfig, load_config, to_object
from bootdiff.data.shards import FORMAT, ShardWriter, split_entry, write_manifest
from bootdiff.fusion import CombinedDenoiser, ViewModel
from bootdiff.run.layout import RunLayout
from bootdiff.losses import EDMLoss
from bootdiff.nets import make_net
from bootdiff.precond import EDMPrecond
from bootdiff.residual import BootstrapDenoiser, RangeAdapter, ResidualPrecond
from bootdiff.train import train
from bootdiff.views import DownsampleView, PatchView

torch.set_num_threads(1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H = 16
TINY = NetConfig(kind="unet2d", channels=[8, 16], attention=[False, False], norm_groups=4)


def _perturbed(module, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def _teacher():
    """A tiny bootstrapped denoiser: 8² patch and ×2 low-res view models fused, plus a residual."""
    views = [ViewModel("patch", PatchView(H, 8), _perturbed(EDMPrecond(make_net(TINY, 1, 1, 8, seed=1), 0.5), 1)),
             ViewModel("low", DownsampleView(2), _perturbed(EDMPrecond(make_net(TINY, 1, 1, 8, seed=2), 0.4), 2))]
    residual = ResidualPrecond(_perturbed(make_net(TINY, 2, 1, H, seed=3), 3), 0.5)
    adapter = RangeAdapter.from_sigma_range(0.002, 80.0, torch.linspace(0.05, 0.6, 100))
    return BootstrapDenoiser(CombinedDenoiser(views, fusion="split"), residual, adapter).eval()


def _images(n, seed):
    """Smooth random images in [-1, 1] (blurred noise): a stand-in for the data."""
    x = torch.randn(n, 1, H // 4, H // 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(x, size=(H, H), mode="bilinear").tanh()


def _gap(student, teacher, x, sigmas=(0.05, 0.3, 1.0, 3.0)):
    """Mean λ(σ)·‖D_student − D_teacher‖²/d over fixed noisy inputs (held-out x)."""
    g, out = torch.Generator().manual_seed(123), []
    with torch.no_grad():
        for s in sigmas:
            xs = x + s * torch.randn(x.shape, generator=g)
            lam = (s ** 2 + 0.25) / (s * 0.5) ** 2
            out.append(lam * ((student(xs, torch.full((len(x),), s)) - teacher(xs, torch.full((len(x),), s))) ** 2).mean())
    return float(torch.stack(out).mean())


def test_loss_terms_exact():
    """Teacher = student: the distillation term is 0 and the real term is the EDM loss on real rows."""
    D = _perturbed(EDMPrecond(make_net(TINY, 1, 1, H, seed=0), 0.5), 0).eval()
    x = _images(6, 0)
    loss = distill.DistillLoss(D, LossConfig(), 0.5, num_teacher=2, real_weight=0.7)
    got = loss(D, x, torch.Generator().manual_seed(5))
    edm = EDMLoss(LossConfig(), 0.5)
    ref = edm(D, x, torch.Generator().manual_seed(5))
    assert torch.equal(loss.last_sigma, edm.last_sigma)  # same σ and noise draws as the EDM loss
    assert torch.allclose(loss.last_terms["distill"], torch.zeros(6), atol=1e-10)
    assert torch.allclose(got[:2], torch.zeros(2), atol=1e-10)
    assert torch.allclose(got[2:], 0.7 * ref[2:], rtol=1e-5)
    assert not any(p.requires_grad for p in loss.teacher.parameters())
    with pytest.raises(ValueError, match="real_weight"):
        distill.DistillLoss(D, LossConfig(), 0.5, real_weight=-1)


def test_tiny_distillation_lowers_gap_to_teacher():
    teacher = _teacher()
    student = EDMPrecond(make_net(TINY, 1, 1, H, seed=0), 0.5)
    held_out = _images(16, 99)
    before = _gap(student.eval(), teacher, held_out)
    data = iter(_images(16, 1000 + i) for i in range(10_000))
    tcfg = TrainConfig(total_kimg=1.28, batch_size=16, lr=3e-3, warmup_kimg=0.0, ema_halflife_kimg=0.05,
                       checkpoint_every_kimg=0, report_every=0, precision="fp32", channels_last="false", seed=0)
    loss = distill.DistillLoss(teacher, tcfg.loss, 0.5, num_teacher=16)
    res = train(student, loss, data, tcfg)
    after = _gap(res.model.eval(), teacher, held_out)
    print(f"distillation gap: untrained {before:.4f} -> trained {after:.4f}")
    assert res.step == 80 and after < 0.6 * before  # measured: 0.98 -> 0.48


# ----------------------------------------------------------------------------- shards and the mix


def _run(tmp_path, n_full=24, **distill_overrides):
    """A config over a hand-made data root (a 'full' split of random uint8 images) and a sweep.json
    whose best trial is the teacher."""
    over = [f"storage={tmp_path}", "name=d", "data.resolution=16", "distill.enabled=true",
            "distill.num_teacher_samples=10", "distill.shard_size=4", "distill.sampler_steps=3",
            "distill.train.batch_size=4", "distill.teacher_fraction=0.5", "eval.batch_size=3",
            *[f"distill.{k}={v}" for k, v in distill_overrides.items()]]
    cfg = to_object(load_config(os.path.join(REPO, "configs", "quickstart.yaml"), over))
    layout = RunLayout.of(cfg)
    rng = np.random.default_rng(0)
    w = ShardWriter(os.path.join(layout.data, "full", "full-000000.tar"), "full", 0)
    for i in range(n_full):
        w.write(f"f{i:04d}", rng.integers(0, 256, (1, H, H), dtype=np.uint8), {})
    write_manifest(layout.data, {"format": FORMAT, "splits": {"full": split_entry([w.commit()])}})
    os.makedirs(layout.sweep, exist_ok=True)
    with open(layout.sweep_json, "w") as f:
        json.dump({"best": "residual-a", "trials": [{"trial_id": "residual-a", "kind": "residual",
                                                      "checkpoint": "ckpt"}]}, f)
    return cfg, experiment.read_manifest(cfg)


def _shrink(x, sigma):  # a cheap analytic teacher: the Gaussian posterior mean, σ_data = 0.5
    return x * 0.25 / (0.25 + sigma.reshape(-1, 1, 1, 1) ** 2)


def _read_all(urls):
    from bootdiff.data.loader import make_loader

    return torch.cat(list(make_loader(urls, 5, mode="eval")))


def test_teacher_shards_written_and_streamed(tmp_path):
    cfg, manifest = _run(tmp_path / "a")
    plan = distill.teacher_shard_plan(cfg)
    assert plan == [(0, 4), (1, 4), (2, 2)]
    infos = distill.write_teacher_shards(cfg, manifest, plan, teacher=_shrink)
    assert not distill.teacher_samples_done(cfg)
    tm = distill.finalize_teacher_samples(cfg, infos)
    assert distill.teacher_samples_done(cfg)
    assert tm["splits"]["teacher"]["count"] == 10 and tm["splits"]["teacher"]["shape"] == [1, H, H]
    from bootdiff.data.loader import view_urls

    x = _read_all(view_urls(tm, "teacher"))
    assert x.shape == (10, 1, H, H) and x.min() >= -1 and x.max() <= 1 and x.std() > 0.05

    def boom(x, s):
        raise AssertionError("a committed shard was sampled again")

    again = distill.write_teacher_shards(cfg, manifest, plan, teacher=boom)  # committed: skipped
    assert [i.sha256 for i in again] == [i.sha256 for i in infos]
    # a shard's samples depend on its index alone, not on which task (call) writes it
    cfg_b, manifest_b = _run(tmp_path / "b")
    other = distill.write_teacher_shards(cfg_b, manifest_b, plan[::-1][:1], teacher=_shrink)
    assert other[0].sha256 == infos[2].sha256

    # the mixed stream: 2 teacher rows then 2 real rows per micro-batch, positioned exactly
    full = _read_all(view_urls(manifest, "full"))
    k = distill.teacher_rows(cfg.distill)
    data = distill.mixed_data(cfg, manifest, tm, cfg.distill.train, k)
    first = [b for _, b in zip(range(6), data(0))]
    assert k == 2 and all(b.shape == (4, 1, H, H) for b in first)
    in_set = lambda rows, ref: all(bool(((ref - r).abs().flatten(1).max(1).values < 1e-6).any()) for r in rows)
    assert all(in_set(b[:2], x) and in_set(b[2:], full) for b in first)
    assert torch.equal(next(iter(data(3))), first[3])


def test_distill_config_errors_name_the_key(tmp_path):
    base = [f"storage={tmp_path}", "distill.enabled=true"]
    qs = os.path.join(REPO, "configs", "quickstart.yaml")
    for bad, key in (("distill.teacher_fraction=1.5", "distill.teacher_fraction"),
                     ("distill.num_teacher_samples=0", "distill.num_teacher_samples"),
                     ("distill.net.kind=video", "distill.net.kind"),
                     ("distill.train.batch_size=0", "distill.train.batch_size"),
                     ("distill.sampler_steps=0", "distill.sampler_steps")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(qs, base + [bad])
    load_config(qs, [f"storage={tmp_path}", "distill.teacher_fraction=1.5"])  # off: not checked
    load_config(qs, base + ["distill.teacher_fraction=0", "distill.num_teacher_samples=0"])  # real data only


def test_stage_skips_when_complete(tmp_path):
    cfg, _ = _run(tmp_path)
    assert distill.stage_action(cfg) == "run"
    distill.mark_done(cfg, {"teacher": "residual-a"})
    assert distill.stage_action(cfg) == "done"
    cfg.distill.enabled = False
    assert distill.stage_action(cfg) == "off"
    assert distill.load_student(cfg) is None  # nothing exported: the evaluation adds no student
