"""bootdiff.run.tb: TensorBoard event files of a training run (tags, steps, hparams), a resumed run
continuing its curves with no step twice (local and s3://), and the report's training curves
drawn from event files. CPU only: the tiny Gaussian-mixture EDM of tests/test_train.py."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch

from bootdiff import util
from bootdiff.evaluation import report
from bootdiff.checkpoint import load_checkpoint
from bootdiff.run.layout import RunLayout
from bootdiff.run.tb import TensorBoardHooks, TensorBoardRun, read_runs, trial_hparams
from bootdiff.train import train
from test_train import Recorder, RecordingLoss, TinyEDM, gmm_data, make_cfg

torch.set_num_threads(1)

NIMG = 8  # images per step in these runs (batch 8, one micro-batch)
CURVES = {"loss", "lr", "grad_norm_max", "img_per_s", "kimg"}


def _held_out(url):
    """A stand-in for held-out G at a checkpoint: numbers read from the checkpoint itself."""
    state = load_checkpoint(url)
    return {"test_G": 1.0 / state["step"], "train_G": 0.5 / state["step"]}


def _raw_steps(folder, tag):
    """Every step of ``tag`` in every event file of ``folder``, read raw (no purge applied)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for f in sorted(glob.glob(os.path.join(folder, "*tfevents*"))):
        for e in EventFileLoader(f).Load():
            steps += [e.step for v in e.summary.value if v.tag == tag]
    return steps


def _run(tb_url, run_dir, steps=6, ckpt_every=3, hooks=None, hparams=None):
    cfg = make_cfg(steps, ckpt_every=ckpt_every)
    torch.manual_seed(0)
    return train(TinyEDM(), RecordingLoss(), gmm_data(8, 1), cfg, run_dir=run_dir,
                 hooks=TensorBoardHooks(tb_url, hparams=hparams, extra_metrics=_held_out, hooks=hooks))


def test_training_writes_event_files_with_tags_steps_and_hparams(tmp_path):
    layout = RunLayout(str(tmp_path / "storage"), "exp")
    trial = {"kind": "residual", "mu_var": 0.5, "mu_l1": 0.01, "range_adapter": True}
    inner = Recorder()
    res = _run(layout.tb_run("trial-a"), str(tmp_path / "run"), hooks=inner, hparams=trial_hparams(trial))
    assert res.step == 6 and len(inner.reports) == 6  # the wrapped hooks saw every report

    runs = read_runs(layout.tb)
    assert list(runs) == ["trial-a"]
    tags = runs["trial-a"]
    assert CURVES <= set(tags) and {"test_G", "train_G"} <= set(tags)
    assert any(t.startswith("loss_sigma_band/") for t in tags)
    # step = images seen: every report (report_every=1), G at the checkpoints (steps 3 and 6)
    assert list(tags["loss"]["step"]) == [NIMG * s for s in range(1, 7)]
    assert list(tags["test_G"]["step"]) == [3 * NIMG, 6 * NIMG]
    assert np.allclose(tags["test_G"]["value"], [1 / 3, 1 / 6])
    assert np.allclose(tags["kimg"]["value"], tags["kimg"]["kimg"])
    losses = [m["loss"] for m, _ in inner.reports]
    assert np.allclose(tags["loss"]["value"], losses, rtol=1e-6)  # the values train() reported

    # hparams: the trial's μ_var / μ_L1 / range adapter, for TensorBoard's HPARAMS tab
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(layout.tb_run("trial-a")).Reload()
    content = acc.PluginTagToContent("hparams")
    start = next(plugin_data_pb2.HParamsPluginData.FromString(c).session_start_info
                 for c in content.values() if plugin_data_pb2.HParamsPluginData.FromString(c)
                 .HasField("session_start_info"))
    assert start.hparams["mu_var"].number_value == 0.5 and start.hparams["mu_l1"].number_value == 0.01
    assert start.hparams["range_adapter"].number_value == 1  # torch writes a bool as a number
    assert start.hparams["kind"].string_value == "residual"


def test_resume_continues_curves_without_duplicate_steps(tmp_path):
    tb = str(tmp_path / "tb")
    url = os.path.join(tb, "view-a")
    with pytest.raises(KeyboardInterrupt):
        _run(url, str(tmp_path / "run"), steps=8, ckpt_every=2, hooks=Recorder(raise_at_step=5))
    # the interrupted attempt logged step 5 (40 images), past its last checkpoint (step 4)
    assert _raw_steps(url, "loss") == [NIMG * s for s in range(1, 6)]
    res = _run(url, str(tmp_path / "run"), steps=8, ckpt_every=2)
    assert res.step == 8
    want = [NIMG * s for s in range(1, 9)]
    assert _raw_steps(url, "loss") == want  # in the files themselves, each step once
    assert len(glob.glob(os.path.join(url, "*tfevents*"))) == 2  # one event file per attempt
    got = read_runs(tb)["view-a"]
    assert list(got["loss"]["step"]) == want
    assert list(got["test_G"]["step"]) == [NIMG * s for s in (2, 4, 6, 8)]

    # the curve is the uninterrupted run's (training resumes exactly on CPU)
    _run(str(tmp_path / "tb2" / "view-a"), str(tmp_path / "run2"), steps=8, ckpt_every=2)
    ref = read_runs(str(tmp_path / "tb2"))["view-a"]
    assert np.array_equal(got["loss"]["value"], ref["loss"]["value"])
    assert np.array_equal(got["test_G"]["value"], ref["test_G"]["value"])


def test_s3_event_files_uploaded_at_checkpoints_and_resumed(s3, tmp_path):
    bucket = s3[0]
    layout = RunLayout(f"{bucket}/tbtest", "exp")
    url = layout.tb_run("trial-full_res")
    seen = {}  # step -> loss steps on S3 when the wrapped hooks saw a checkpoint report

    class AtCheckpoint(Recorder):
        def on_report(self, metrics, ckpt_url):
            if ckpt_url:
                fs, path = util.url_fs(url)
                fs.invalidate_cache()
                seen[metrics["step"]] = list(read_runs(layout.tb).get("trial-full_res", {})
                                             .get("loss", {}).get("step", []))
            super().on_report(metrics, ckpt_url)

    with pytest.raises(KeyboardInterrupt):
        _run(url, str(tmp_path / "run"), steps=8, ckpt_every=2, hooks=AtCheckpoint(raise_at_step=5))
    # uploaded with each checkpoint: the curve up to that checkpoint is on S3 already
    assert seen == {2: [8, 16], 4: [8, 16, 24, 32]}
    fs, path = util.url_fs(url)
    fs.invalidate_cache()
    assert len([p for p in fs.ls(path) if "tfevents" in p]) == 1  # uploaded at the end, too
    assert list(read_runs(layout.tb)["trial-full_res"]["loss"]["step"]) == [NIMG * s for s in range(1, 6)]

    _run(url, str(tmp_path / "run"), steps=8, ckpt_every=2)
    fs.invalidate_cache()
    local = tmp_path / "copy"
    fs.get(path + "/", str(local) + "/", recursive=True)
    assert _raw_steps(str(local), "loss") == [NIMG * s for s in range(1, 9)]  # no step twice on S3
    got = read_runs(layout.tb)["trial-full_res"]
    assert list(got["test_G"]["step"]) == [NIMG * s for s in (2, 4, 6, 8)]


def _write_run(url, loss_steps, g_steps=(), scale=1.0):
    run = TensorBoardRun(url).open(0)
    for s in loss_steps:
        run.log({"step": s // 64, "kimg": s / 1000, "loss": scale * (0.05 + 1.0 / (1 + s / 200)), "lr": 1e-3})
    for s in g_steps:
        run.log({"kimg": s / 1000, "train_G": 0.15 + 30 / (s + 50), "val_G": 0.21 + 40 / (s + 50)},
                upload=True)  # a sweep's run: its test G is computed once, at the checkpoint chosen
    run.close()


def test_report_draws_training_curves_from_event_files(tmp_path):
    layout = RunLayout(str(tmp_path / "storage"), "exp")
    steps = list(range(64, 6400 + 1, 64))
    _write_run(layout.tb_run("view-patch"), steps)
    _write_run(layout.tb_run("view-low"), [s // 2 for s in steps], scale=0.6)
    _write_run(layout.tb_run("trial-full_res"), steps, g_steps=(1600, 3200, 4800, 6400), scale=1.4)
    trials = [{"trial_id": "combined", "kind": "combined", "mu_var": None, "mu_l1": None,
               "range_adapter": None, "test_G": 0.5, "train_G": 0.45, "step": 0, "status": "complete",
               "checkpoint": None},
              {"trial_id": "full_res", "kind": "full_res", "mu_var": None, "mu_l1": None,
               "range_adapter": None, "test_G": 0.21, "train_G": 0.16, "step": 100, "status": "complete",
               "checkpoint": "/ck/f"}]
    for k, (mv, stop) in enumerate([(0.0, 6400), (1.0, 1600), (0.1, 3200)]):
        label = f"residual-mv{mv:g}-ml0-ra1"
        run = TensorBoardRun(layout.tb_run(f"trial-{label}"), trial_hparams(
            {"kind": "residual", "mu_var": mv, "mu_l1": 0.0, "range_adapter": True})).open(0)
        for s in range(1600, stop + 1, 1600):
            run.log({"kimg": s / 1000, "val_G": 0.11 + 0.05 * k + 20 / (s + 50),
                     "train_G": 0.08 + 0.04 * k + 18 / (s + 50)}, upload=True)
        run.close()
        trials.append({"trial_id": label, "kind": "residual", "mu_var": mv, "mu_l1": 0.0,
                       "range_adapter": True, "test_G": 0.1 + 0.05 * k + 20 / (stop + 50),
                       "val_G": 0.11 + 0.05 * k + 20 / (stop + 50),
                       "train_G": 0.1, "step": stop // 64,
                       "status": "complete" if stop == 6400 else "stopped_early", "checkpoint": f"/ck/{k}"})

    training = read_runs(layout.tb)
    assert set(training) == {"view-patch", "view-low", "trial-full_res", "trial-residual-mv0-ml0-ra1",
                             "trial-residual-mv1-ml0-ra1", "trial-residual-mv0.1-ml0-ra1"}
    assert list(training["trial-full_res"]["val_G"]["kimg"]) == [1.6, 3.2, 4.8, 6.4]
    assert "test_G" not in training["trial-full_res"]
    assert training["trial-residual-mv1-ml0-ra1"]["val_G"]["kimg"][-1] == 1.6  # stopped: shorter

    out = str(tmp_path / "report")
    urls = report.write_report(out, trials, {}, {}, "a: 1\n", {}, training=training)
    assert {"training_loss.png", "training_G.png"} <= set(urls["images"])
    md = open(urls["markdown"]).read()
    assert "## Training curves" in md and "](report_files/training_G.png)" in md
    assert "](report_files/training_loss.png)" in md
    html = open(urls["html"]).read()
    assert "<h2>Training curves</h2>" in html
    assert 'alt="Generalization error G of every trial during training"' in html
    assert "Held-out (validation split, left)" in html  # what the sweep chose on; test G only at the choice
    from PIL import Image

    for name in ("training_loss.png", "training_G.png"):
        img = np.asarray(Image.open(urls["images"][name]).convert("RGB"))
        assert img.shape[0] > 300 and img.shape[1] > 500 and img.std() > 10  # a drawn figure

    # runs without a validation split (data.num_val = 0) report test G at checkpoints: that is the curve
    no_val = {run: {("test_G" if k == "val_G" else k): v for k, v in tags.items()} for run, tags in training.items()}
    urls = report.write_report(str(tmp_path / "r1"), trials, {}, {}, "", {}, training=no_val)
    assert "Held-out (test split, left)" in open(urls["html"]).read()

    # the same trials without event files: no training section, nothing invented
    urls = report.write_report(str(tmp_path / "r2"), trials, {}, {}, "", {}, training={})
    assert "training_G.png" not in urls["images"] and "Training curves" not in open(urls["markdown"]).read()


def test_tb_run_names():
    layout = RunLayout("s3://b/x", "exp")
    assert layout.tb == "s3://b/x/exp/tb" and layout.tb_run("view-low") == "s3://b/x/exp/tb/view-low"
    with pytest.raises(ValueError, match="bad run name"):
        layout.tb_run("../escape")
