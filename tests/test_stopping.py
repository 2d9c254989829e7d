"""Early stopping with patience (`bootdiff.stopping.Patience`): the rule on a known sequence, its
state replayed after a resume, and `bootdiff.train.train` ending a real run at the checkpoint
where the held-out metric had not improved for ``patience`` checkpoints."""

import math

import pytest

from bootdiff.checkpoint import latest_checkpoint
from bootdiff.stopping import Patience
from bootdiff.train import train
from test_train import RecordingLoss, gmm_data, make_cfg, model_


def _feed(p, values):
    stops = []
    for i, v in enumerate(values):
        p.update({"kimg": float(i + 1), "val_G": v})
        stops.append(p.should_stop())
    return stops


def test_patience_rule_on_a_known_sequence():
    p = Patience(2, "val_G")
    # best at 0.8 (kimg 2); 0.9 and 0.85 do not improve: stop after the second of them
    assert _feed(p, [1.0, 0.8, 0.9, 0.85, 0.7]) == [False, False, False, True, False]
    assert p.best == 0.7 and p.best_kimg == 5.0  # it goes on counting when the caller goes on
    q = Patience(2, "val_G")
    _feed(q, [1.0, 0.8, 0.9, 0.85])
    assert q.summary() == {"key": "val_G", "patience": 2, "best": 0.8, "best_kimg": 2.0, "last_kimg": 4.0,
                           "stopped": True}
    # reports without the key (between checkpoints) or with NaN do not count
    r = Patience(1, "val_G")
    r.update({"kimg": 1.0, "val_G": 1.0})
    r.update({"kimg": 1.5, "loss": 0.3})
    r.update({"kimg": 2.0, "val_G": math.nan})
    assert not r.should_stop()
    r.update({"kimg": 3.0, "val_G": 1.0})  # equal is not better
    assert r.should_stop()
    # min_delta: a relative improvement smaller than it does not count
    s = Patience(1, "val_G", min_delta=0.05)
    _feed(s, [1.0, 0.97])
    assert s.should_stop() and s.best == 1.0
    # patience 0 never stops
    assert not any(_feed(Patience(0, "val_G"), [1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match="patience=-1"):
        Patience(-1, "val_G")
    # start_kimg (train.patience_from_kimg: a pre-training phase): reports before it do not count,
    # so a G rising while the network pre-trains on other data never stops the run
    t = Patience(2, "val_G", start_kimg=3.0)
    seq = [0.5, 0.9, 1.0, 1.1, 0.8, 0.85, 0.9]
    assert _feed(t, seq) == [False] * 6 + [True]
    assert t.best == 0.8 and t.best_kimg == 5.0
    assert _feed(Patience(2, "val_G"), seq)[2] is True  # without it: stopped while pre-training


def test_replay_restores_the_state_of_an_interrupted_run():
    points = [{"kimg": k, "val_G": v} for k, v in ((3.0, 0.9), (1.0, 1.0), (2.0, 0.8))]  # any order
    p = Patience(2, "val_G")
    p.replay(points)
    assert (p.best, p.best_kimg, p.since_best) == (0.8, 2.0, 1)
    p.update({"kimg": 4.0, "val_G": 0.95})
    assert p.should_stop()


class HeldOut:
    """Hooks giving each checkpoint report a held-out value that falls, then rises (``values`` by
    checkpoint), into a `Patience` — as the benchmark's and the Ray workers' hooks do."""

    def __init__(self, values, patience):
        self.values, self.n = list(values), 0
        self.stopper = Patience(patience, "val_G")
        self.checkpoints = []

    def on_report(self, metrics, url):
        if url:
            self.checkpoints.append((metrics["step"], url))
            self.stopper.update({**metrics, "val_G": self.values[self.n]})
            self.n += 1

    def should_stop(self):
        stop = self.stopper.should_stop()
        if stop and not hasattr(self, "decided"):
            self.decided = self.stopper.summary()
        return stop


def test_train_stops_at_the_checkpoint_patience_runs_out(tmp_path):
    cfg = make_cfg(steps=40, ckpt_every=4)  # checkpoints at steps 4, 8, ..., 40
    hooks = HeldOut([1.0, 0.7, 0.6, 0.65, 0.62, 0.5, 0.4, 0.3, 0.2, 0.1], patience=2)
    res = train(model_(), RecordingLoss(), gmm_data(8, 1), cfg, run_dir=str(tmp_path / "run"), hooks=hooks)
    # best at checkpoint 3 (step 12); 0.65 and 0.62 do not beat it: train polls should_stop right
    # after checkpoint 5's report and ends there, with no step beyond the checkpoint that decided it
    assert res.stopped and hooks.decided["best_kimg"] == pytest.approx(12 * 8 / 1000)
    assert hooks.decided["last_kimg"] == pytest.approx(20 * 8 / 1000)
    assert [s for s, _ in hooks.checkpoints] == [4, 8, 12, 16, 20]
    assert res.step == 20
    assert latest_checkpoint(str(tmp_path / "run")).endswith("checkpoint-00000020")
    # patience 0: the same run trains to its cap
    again = HeldOut(hooks.values, patience=0)
    full = train(model_(), RecordingLoss(), gmm_data(8, 1), cfg, run_dir=str(tmp_path / "full"), hooks=again)
    assert not full.stopped and full.step == 40


def test_ray_workers_stop_on_val_G_or_on_the_benchmarks_curve(tmp_path):
    """`ray_jobs.common.stopping_hooks`: a pipeline run with patience stops on its val_G; a
    data-efficiency job (a curve_url) keeps its curve there and stops on its carve-out's G; rank 1
    and patience 0 get nothing; `RayReportHooks.should_stop` asks whichever it holds."""
    from bootdiff.config import TrainConfig
    from bootdiff.efficiency.train import CurveHooks
    from ray_jobs.common import RayReportHooks, stopping_hooks

    p = stopping_hooks({}, TrainConfig(patience=1), 0)["hooks"]
    assert isinstance(p, Patience) and p.key == "val_G"
    hooks = RayReportHooks({}, hooks=p)
    p.on_report({"kimg": 1.0, "val_G": 0.5})
    assert not hooks.should_stop()
    p.on_report({"kimg": 2.0, "val_G": 0.6})
    assert hooks.should_stop()
    curve = stopping_hooks({"curve_url": str(tmp_path / "curve.json")}, TrainConfig(patience=2), 0)["hooks"]
    assert isinstance(curve, CurveHooks) and curve.stopper.key == "test_G" and curve.stopper.patience == 2
    assert stopping_hooks({}, TrainConfig(patience=1), 1)["hooks"] is None
    assert stopping_hooks({}, TrainConfig(patience=0), 0)["hooks"] is None
    assert not RayReportHooks({}).should_stop()
