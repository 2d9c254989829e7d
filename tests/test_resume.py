"""Exact resume through the real data path: `bootdiff.experiment.train_data` over ingested shards
(the shard loader, with 0 and 2 DataLoader workers) and `bootdiff.train.train` with checkpoints.
An interrupted run resumed from its checkpoint must produce bit-for-bit the losses and weights of
an uninterrupted one (the promise in `bootdiff.train`'s docstring)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from bootdiff import experiment
from bootdiff.checkpoint import latest_checkpoint, load_checkpoint
from bootdiff.config import load_config, to_object
from bootdiff.data.ingest import ingest
from bootdiff.train import train

torch.set_num_threads(1)

EPOCH = 5  # micro-batches per epoch: small, so runs cross epochs and resume mid-epoch
STEPS, INTERRUPT, ACCUM, BATCH = 6, 3, 2, 8  # 12 micro-batches = 3 epochs; resume at 6 = epoch 1, 1 skipped


class Source:
    """Random uint8 16×16 grey images, in memory."""

    kind, description, masks, fixed_test = "image", "random (60, 16, 16, 1)", None, None

    def __init__(self, n=60):
        self.x = np.random.default_rng(0).integers(0, 256, (n, 16, 16, 1), dtype=np.uint8)
        self.ids = [f"rand-{i:05d}" for i in range(n)]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.x[i]

    def mask(self, i):
        return None


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    kimg = STEPS * BATCH * ACCUM / 1000
    cfg = to_object(load_config(None, [
        f"storage={root}", "name=r", "data.resolution=16", "data.num_full=10", "data.num_test=10", "data.num_val=2",
        "data.shard_size=8", "views.low.kind=downsample", "views.low.factor=2",
        "views.low.net.channels=[8,8]", "views.low.net.attention=[false,false]", "views.low.net.norm_groups=4",
        f"views.low.train.batch_size={BATCH}", f"views.low.train.accum_steps={ACCUM}",
        f"views.low.train.total_kimg={kimg}", f"views.low.train.checkpoint_every_kimg={kimg * INTERRUPT / STEPS}",
        "views.low.train.report_every=1", "views.low.train.warmup_kimg=0", "views.low.train.lr=1e-3"]))
    ingest(cfg, progress=False, source=Source())
    return cfg, experiment.read_manifest(cfg)


class Record:
    """Hooks: record (step, loss); raise after the report of step ``stop_at`` (an interruption)."""

    def __init__(self, stop_at=None):
        self.stop_at, self.losses = stop_at, {}

    def on_report(self, metrics, checkpoint_url):
        self.losses[metrics["step"]] = metrics["loss"]
        if metrics["step"] == self.stop_at:
            raise KeyboardInterrupt(f"interrupted after step {self.stop_at}")


def _run(cfg, manifest, run_dir, num_workers, stop_at=None):
    vcfg = cfg.views["low"]
    vcfg.train.num_workers = num_workers
    torch.manual_seed(123)  # model init; a resumed run takes its weights from the checkpoint
    model, loss, _ = experiment.view_training(cfg, manifest, "low", vcfg)
    data = experiment.train_data(cfg, manifest, "low", vcfg.train, rank=0, world_size=1, epoch_batches=EPOCH)
    hooks = Record(stop_at)
    try:
        res = train(model, loss, data, vcfg.train, run_dir=run_dir, hooks=hooks)
    except KeyboardInterrupt:
        return hooks.losses, None
    return hooks.losses, res


def test_stream_position_is_exact(data):
    """data(k) yields what data(0) yields from micro-batch k·accum on, across epochs (with
    DataLoader workers: the resume test below)."""
    cfg, manifest = data
    tcfg = cfg.views["low"].train
    tcfg.num_workers = 0
    data_fn = experiment.train_data(cfg, manifest, "low", tcfg, rank=0, world_size=1, epoch_batches=EPOCH)
    full = list(itertools.islice(data_fn(0), 12))
    assert not torch.equal(full[0], full[EPOCH])  # epochs differ
    for start in (1, 3):  # mid-epoch 0, mid-epoch 1
        later = list(itertools.islice(data_fn(start), 12 - start * ACCUM))
        assert all(torch.equal(a, b) for a, b in zip(later, full[start * ACCUM:]))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_interrupted_and_resumed_equals_uninterrupted(data, tmp_path, num_workers):
    cfg, manifest = data
    ref, ref_res = _run(cfg, manifest, str(tmp_path / "ref"), num_workers)
    assert sorted(ref) == list(range(1, STEPS + 1)) and ref_res.step == STEPS

    run = str(tmp_path / "run")
    first, res = _run(cfg, manifest, run, num_workers, stop_at=INTERRUPT + 1)  # dies after step 4
    assert res is None and load_checkpoint(latest_checkpoint(run))["step"] == INTERRUPT
    second, res = _run(cfg, manifest, run, num_workers)  # resumes from step 3, mid-epoch
    assert sorted(second) == list(range(INTERRUPT + 1, STEPS + 1))
    assert [second[s] for s in sorted(second)] == [ref[s] for s in sorted(second)]  # bit-exact
    assert [first[s] for s in sorted(first)] == [ref[s] for s in sorted(first)]
    for a, b in zip(res.ema.parameters(), ref_res.ema.parameters()):
        assert torch.equal(a, b)

