"""bootdiff.train / bootdiff.checkpoint: exact resume, atomic checkpoints, non-finite stop,
learning a Gaussian mixture's exact posterior mean, hooks, EMA and gradient accumulation.

Everything runs on CPU: `bootdiff.precond.EDMPrecond` around a tiny MLP, `bootdiff.losses.EDMLoss`,
2-D Gaussian-mixture data with its exact denoiser (tests/gmm.py).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import os

import pytest
import torch
from torch import nn

import bootdiff.checkpoint as ckpt
from bootdiff.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from bootdiff.config import LossConfig, TrainConfig
from bootdiff.losses import EDMLoss
from bootdiff.precond import EDMPrecond
from bootdiff.train import EMA, train
from gmm import GaussianMixture

torch.set_num_threads(1)


class MLP(nn.Module):
    """Backbone F(x, c_noise) for flat [N, d] data (the `bootdiff.nets` interface); counts calls
    in a buffer so the EMA's buffer copy can be checked."""

    def __init__(self, d=2, hidden=64, dropout=0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d + 1, hidden), nn.SiLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, d))
        self.register_buffer("calls", torch.zeros([], dtype=torch.long))

    def forward(self, x, c_noise):
        self.calls += 1
        return self.net(torch.cat([x, c_noise.reshape(-1, 1).to(x.dtype)], dim=1))


def TinyEDM(d=2, hidden=64, sigma_data=1.0, dropout=0.0):
    """An EDM-preconditioned MLP denoiser D(x, σ)."""
    return EDMPrecond(MLP(d, hidden, dropout), sigma_data=sigma_data)


class RecordingLoss:
    """`bootdiff.losses.EDMLoss` that records each per-sample loss and can turn call k into NaN."""

    def __init__(self, sigma_data=1.0, P_mean=-1.2, P_std=1.2, nan_at_call=None):
        self.loss = EDMLoss(LossConfig(P_mean=P_mean, P_std=P_std), sigma_data)
        self.nan_at_call, self.calls, self.losses = nan_at_call, 0, []

    @property
    def last_sigma(self):
        return self.loss.last_sigma

    def __call__(self, D, x, generator):
        self.calls += 1
        loss = self.loss(D, x, generator)
        if self.nan_at_call == self.calls:
            loss = loss * float("nan")
        self.losses.append(loss.detach().clone())
        return loss


GM = GaussianMixture.two_blobs(d=2, sep=3.0, var=0.25, weight=0.3)


def gmm_data(batch_size, accum_steps):
    """data(start_step): micro-batch i is drawn with seed i, so fast-forwarding is exact."""
    def data(start_step):
        for i in itertools.count(start_step * accum_steps):
            yield GM.sample(batch_size, torch.Generator().manual_seed(i)).float()
    return data


def make_cfg(steps, batch_size=8, accum_steps=1, ckpt_every=None, **kw):
    nimg = batch_size * accum_steps
    base = dict(total_kimg=steps * nimg / 1000, batch_size=batch_size, accum_steps=accum_steps, lr=2e-3,
                warmup_kimg=3 * nimg / 1000, grad_clip=1.0, ema_halflife_kimg=0.05, report_every=1,
                checkpoint_every_kimg=(ckpt_every or 0) * nimg / 1000, keep_checkpoints=3, seed=0)
    base.update(kw)
    return TrainConfig(**base)


class Recorder:
    def __init__(self, raise_at_step=None, stop_after_step=None):
        self.reports, self.raise_at_step, self.stop_after_step = [], raise_at_step, stop_after_step

    def on_report(self, metrics, url):
        self.reports.append((dict(metrics), url))
        if metrics["step"] == self.raise_at_step:
            raise KeyboardInterrupt("simulated preemption")

    def should_stop(self):
        return self.stop_after_step is not None and any(m["step"] >= self.stop_after_step for m, _ in self.reports)


def model_(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    return TinyEDM(dropout=dropout)


# ----------------------------------------------------------------------------- (a) exact resume


def test_resume_is_exact(tmp_path):
    cfg = make_cfg(steps=12, batch_size=8, accum_steps=2, ckpt_every=4)
    full_loss = RecordingLoss()
    full = train(model_(), full_loss, gmm_data(8, 2), cfg, run_dir=str(tmp_path / "full"))
    assert full.step == 12 and len(full_loss.losses) == 24

    run = str(tmp_path / "interrupted")
    with pytest.raises(KeyboardInterrupt):
        train(model_(), RecordingLoss(), gmm_data(8, 2), cfg, run_dir=run, hooks=Recorder(raise_at_step=6))
    assert latest_checkpoint(run).endswith("checkpoint-00000004")
    resumed_loss = RecordingLoss()
    resumed = train(model_(seed=123), resumed_loss, gmm_data(8, 2), cfg, run_dir=run)  # other init: loaded
    assert resumed.step == 12 and len(resumed_loss.losses) == 16  # steps 5..12, 2 micro-batches each
    for a, b in zip(resumed_loss.losses, full_loss.losses[8:]):
        assert torch.equal(a, b)
    for (name, a), b in zip(resumed.model.state_dict().items(), full.model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(resumed.ema.state_dict().values(), full.ema.state_dict().values()):
        assert torch.equal(a, b)
    # Resuming a finished run does nothing more.
    again = RecordingLoss()
    assert train(model_(), again, gmm_data(8, 2), cfg, run_dir=run).step == 12 and again.calls == 0


def test_resume_from_explicit_checkpoint(tmp_path):
    cfg = make_cfg(steps=8, ckpt_every=4)
    first = RecordingLoss()
    train(model_(), first, gmm_data(8, 1), cfg, run_dir=str(tmp_path / "a"))
    handed = str(tmp_path / "a" / "checkpoint-00000004")  # e.g. Ray's checkpoint directory
    second = RecordingLoss()
    res = train(model_(), second, gmm_data(8, 1), cfg, run_dir=str(tmp_path / "b"), resume_from=handed)
    assert res.step == 8 and all(torch.equal(a, b) for a, b in zip(second.losses, first.losses[4:]))
    state = load_checkpoint(res.checkpoint_url)
    assert state["step"] == 8 and state["nimg"] == 64 and "accum_steps: 1" in state["config_yaml"]
    assert "batch_size: 8" in (tmp_path / "b" / "checkpoint-00000008" / "config.yaml").read_text()


# ----------------------------------------------------------------------------- (b) atomic checkpoints


def test_checkpoint_killed_mid_write_leaves_previous(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    real_atomic_dir = ckpt.atomic_dir

    @contextlib.contextmanager
    def crash_on_second(url):
        with real_atomic_dir(url) as stage:
            yield stage
            if url.endswith("checkpoint-00000008"):
                assert os.path.getsize(os.path.join(stage, "state.pt")) > 0  # files written ...
                raise SystemExit("killed before the COMPLETE marker")  # ... but never committed

    monkeypatch.setattr(ckpt, "atomic_dir", crash_on_second)
    with pytest.raises(SystemExit):
        train(model_(), RecordingLoss(), gmm_data(8, 1), make_cfg(steps=12, ckpt_every=4), run_dir=run)
    assert latest_checkpoint(run).endswith("checkpoint-00000004")
    assert sorted(os.listdir(run)) == ["checkpoint-00000004"]
    assert load_checkpoint(latest_checkpoint(run))["step"] == 4

    # A hard kill leaves debris: a staging dir and a marker-less checkpoint dir. Both are ignored.
    os.makedirs(os.path.join(run, ".tmp-deadbeef"))
    os.makedirs(os.path.join(run, "checkpoint-00000099"))
    with open(os.path.join(run, "checkpoint-00000099", "state.pt"), "wb") as f:
        f.write(b"half a pickle")
    assert latest_checkpoint(run).endswith("checkpoint-00000004")
    with pytest.raises(FileNotFoundError, match="checkpoint-00000099.*incomplete"):
        load_checkpoint(os.path.join(run, "checkpoint-00000099"))
    monkeypatch.setattr(ckpt, "atomic_dir", real_atomic_dir)
    res = train(model_(), RecordingLoss(), gmm_data(8, 1), make_cfg(steps=12, ckpt_every=4), run_dir=run)
    assert res.step == 12 and latest_checkpoint(run).endswith("checkpoint-00000012")


def test_checkpoint_prune_and_s3(s3, tmp_path):
    from bootdiff.util import url_fs

    bucket, _ = s3
    run = f"{bucket}/{tmp_path.name}/run"
    assert latest_checkpoint(run) is None
    for step in (1, 2, 3):
        save_checkpoint(run, step, {"w": torch.full([2], float(step))}, "a: 1\n", keep=2)
    assert list_checkpoints(run) == [f"{run}/checkpoint-00000002", f"{run}/checkpoint-00000003"]
    fs, path = url_fs(run)
    fs.pipe(f"{path}/checkpoint-00000007/state.pt", b"partial upload")  # no COMPLETE marker
    assert latest_checkpoint(run) == f"{run}/checkpoint-00000003"
    assert torch.equal(load_checkpoint(latest_checkpoint(run))["w"], torch.full([2], 3.0))
    with pytest.raises(FileNotFoundError, match="checkpoint-00000007"):
        load_checkpoint(f"{run}/checkpoint-00000007")
    cfg = make_cfg(steps=4, ckpt_every=2, keep_checkpoints=1)
    res = train(model_(), RecordingLoss(), gmm_data(8, 1), cfg, run_dir=f"{bucket}/{tmp_path.name}/train")
    assert list_checkpoints(f"{bucket}/{tmp_path.name}/train") == [res.checkpoint_url]
    assert load_checkpoint(res.checkpoint_url)["step"] == 4


# ----------------------------------------------------------------------------- (c) non-finite loss


def test_nonfinite_loss_stops_and_keeps_last_good(tmp_path):
    run = str(tmp_path / "run")
    loss = RecordingLoss(nan_at_call=6)
    msg = r"non-finite loss at step 6 \(kimg 0\.040\); last good checkpoint: .*checkpoint-00000003"
    with pytest.raises(FloatingPointError, match=msg):
        train(model_(), loss, gmm_data(8, 1), make_cfg(steps=12, ckpt_every=3), run_dir=run)
    assert list_checkpoints(run) == [os.path.join(run, "checkpoint-00000003")]
    state = load_checkpoint(latest_checkpoint(run))
    assert state["step"] == 3 and all(torch.isfinite(v).all() for v in state["model"].values())


# ----------------------------------------------------------------------------- (d) Gaussian mixture


def test_learns_exact_gmm_posterior_mean():
    """A 2-D two-blob mixture: the EMA denoiser trained by train() approaches the exact E[x0 | x_σ]."""
    torch.manual_seed(0)
    sd = float(GM.sigma_data())
    model = TinyEDM(hidden=128, sigma_data=sd)
    untrained = copy.deepcopy(model).eval()
    cfg = TrainConfig(total_kimg=1500 * 256 / 1000, batch_size=256, lr=5e-3, warmup_kimg=10.0, grad_clip=0.0,
                      ema_halflife_kimg=30.0, report_every=0, checkpoint_every_kimg=0.0, seed=0)
    res = train(model, RecordingLoss(sigma_data=sd, P_mean=-0.4, P_std=1.0), gmm_data(256, 1), cfg)
    assert res.step == 1500
    g = torch.Generator().manual_seed(999)
    x0 = GM.sample(4096, g)
    for sigma in (0.2, 0.5, 1.0, 2.0):
        xs = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=x0.dtype)
        exact = GM(xs, sigma).float()
        with torch.no_grad():
            err = ((res.ema(xs.float(), torch.full([len(xs)], sigma)) - exact) ** 2).mean().item()
            err0 = ((untrained(xs.float(), torch.full([len(xs)], sigma)) - exact) ** 2).mean().item()
        assert err < 0.1 * err0 and err < 0.006, (sigma, err, err0)  # trained: ~1e-4 .. 3e-3


# ----------------------------------------------------------------------------- (e) hooks, EMA, accumulation


def test_hooks_receive_metrics_and_checkpoint_urls(tmp_path):
    run = str(tmp_path / "run")
    hooks = Recorder()
    res = train(model_(), RecordingLoss(), gmm_data(8, 1), make_cfg(steps=10, ckpt_every=4, report_every=3),
                run_dir=run, hooks=hooks)
    steps = [m["step"] for m, _ in hooks.reports]
    assert steps == [3, 4, 6, 8, 9, 10]
    urls = {m["step"]: u for m, u in hooks.reports}
    assert urls[3] is None and urls[4].endswith("checkpoint-00000004") and urls[10] == res.checkpoint_url
    m = hooks.reports[-1][0]
    assert {"step", "kimg", "loss", "img_per_s", "lr", "rank"} <= set(m) and m["rank"] == 0
    assert m["kimg"] == pytest.approx(0.08) and m["lr"] == pytest.approx(2e-3) and m["img_per_s"] > 0
    bands = [k for k in m if k.startswith("loss_sigma_band/")]
    assert bands and set(bands) <= {"loss_sigma_band/0-0.1", "loss_sigma_band/0.1-1",
                                    "loss_sigma_band/1-10", "loss_sigma_band/10-inf"}
    assert all(math.isfinite(m[k]) for k in bands) and math.isfinite(m["loss"])
    assert hooks.reports[0][0]["lr"] == pytest.approx(2e-3)  # warm-up (3 steps) done at step 3

    stop = Recorder(stop_after_step=3)  # polled at the step-6 report: stop there
    res = train(model_(), RecordingLoss(), gmm_data(8, 1), make_cfg(steps=10, report_every=3),
                run_dir=str(tmp_path / "stop"), hooks=stop)
    assert res.stopped and res.step == 6 and res.checkpoint_url.endswith("checkpoint-00000006")
    assert stop.reports[-1][0]["step"] == 6 and stop.reports[-1][1] == res.checkpoint_url


def test_ema_update_and_rampup():
    model = model_(dropout=0.0)
    p0 = copy.deepcopy(model.state_dict())
    cfg = make_cfg(steps=1, ema_halflife_kimg=0.02, ema_rampup_ratio=0.0, warmup_kimg=0.0)
    res = train(model, RecordingLoss(), gmm_data(8, 1), cfg)
    beta = 0.5 ** (8 / 20)
    p1 = res.model.state_dict()
    for name, e in res.ema.state_dict().items():
        if name in ("net.calls", "sigma_data"):  # buffers are copied
            assert e.item() == p1[name].item() == 1  # one forward call; σ_data = 1
        else:
            assert not torch.equal(p1[name], p0[name])
            assert torch.allclose(e, p1[name].lerp(p0[name], beta), atol=1e-7), name
    # With EDM's ramp-up the half-life at 0 kimg is 0: after the first step EMA == model.
    res = train(model_(dropout=0.0), RecordingLoss(), gmm_data(8, 1), make_cfg(steps=1))
    assert all(torch.equal(a, b) for a, b in zip(res.ema.state_dict().values(), res.model.state_dict().values()))
    assert EMA(model, 0.5, 0.05).beta(cur_nimg=10_000, batch_nimg=8) == pytest.approx(0.5 ** (8 / 500))


def test_grad_accumulation_matches_big_batch():
    x = GM.sample(64, torch.Generator().manual_seed(5)).float()

    def det_loss(D, xb, generator):  # deterministic: fixed σ grid, no noise draw
        sigma = xb[:, 0].abs() + 0.1
        return ((D(xb + sigma[:, None] * 0.5, sigma) - xb) ** 2).mean(1)

    def batches(bs):
        return lambda start: itertools.islice(itertools.cycle(x.split(bs)), start * 16 // bs, None)

    runs = []
    for bs, accum in ((16, 1), (8, 2)):
        hooks = Recorder()
        cfg = make_cfg(steps=4, batch_size=bs, accum_steps=accum, grad_clip=0.0, warmup_kimg=0.0)
        runs.append((train(model_(dropout=0.0), det_loss, batches(bs), cfg, hooks=hooks), hooks))
    (big, hb), (acc, ha) = runs
    for (mb, _), (ma, _) in zip(hb.reports, ha.reports):
        assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5)
        assert ma["grad_norm_max"] == pytest.approx(mb["grad_norm_max"], rel=1e-4)
    big_params = dict(big.model.named_parameters())
    for name, a in acc.model.named_parameters():
        assert torch.allclose(a, big_params[name], atol=1e-5), name


def test_bad_config_names_the_key():
    with pytest.raises(ValueError, match="TrainConfig.precision='fp16'"):
        train(model_(), RecordingLoss(), gmm_data(8, 1), make_cfg(steps=1, precision="fp16"))


# ----------------------------------------------------------------------------- DDP (2 CPU ranks, gloo)


def _ddp_worker(rank, world, init_file, run_dir, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        def data(start_step):  # each rank its own stream
            for i in itertools.count(start_step):
                yield GM.sample(8, torch.Generator().manual_seed(1000 * rank + i)).float()

        hooks = Recorder()
        cfg = make_cfg(steps=12, batch_size=8, ckpt_every=6, report_every=2)  # 16 img/step: 6 steps
        res = train(model_(seed=rank, dropout=0.0), RecordingLoss(), data, cfg, run_dir=run_dir, hooks=hooks)
        torch.save(dict(step=res.step, model=res.model.state_dict(), ema=res.ema.state_dict(),
                        reports=hooks.reports), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks(tmp_path):
    import torch.multiprocessing as mp

    run = str(tmp_path / "run")
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), run, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["step"] == r1["step"] == 6
    for name, a in r0["model"].items():  # DDP: one model (rank 0's init broadcast, grads averaged)
        assert torch.equal(a, r1["model"][name]), name
    for (m0, u0), (m1, u1) in zip(r0["reports"], r1["reports"]):
        assert (m0["step"], m0["rank"], m1["rank"]) == (m1["step"], 0, 1)
        assert m0["loss"] == pytest.approx(m1["loss"]) and m0["kimg"] == pytest.approx(m0["step"] * 0.016)
        assert u1 is None and (u0 is not None) == (m0["step"] in (3, 6))
    assert [os.path.basename(u) for u in list_checkpoints(run)] == ["checkpoint-00000003", "checkpoint-00000006"]
    state = load_checkpoint(latest_checkpoint(run))
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["loss"], state["rng"][1]["loss"])  # seeds differ per rank
