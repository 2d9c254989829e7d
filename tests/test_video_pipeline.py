"""Video through the whole pipeline: `configs/moving_mnist.yaml` shrunk to seconds (8-frame 16×16
videos, 4-frame clips, a two-level VideoUNet) runs ingest → clip view model → sweep → evaluate as
one Ray job, and the report shows the sampled long videos as frame strips and animated GIFs.

The job is ``python -m ray_jobs.pipeline`` with Ray started locally by the script itself
(`ray.init()` without an address), not ``ray job submit`` against a ``ray start --head``
cluster: the job code is the same, and the head, its dashboard, job agent and working-dir upload
(tests/test_ray_multinode.py covers those) would cost more than the pipeline on this config."""

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
CONFIG = os.path.join(REPO, "configs", "moving_mnist.yaml")
FRAMES, RES, SHOWN = 8, 16, 3  # frames per video, side, sampled videos per model
NET = "{kind: video, channels: [8, 16], attention: [false, true], norm_groups: 4}"
SHORT = ["total_kimg=0.032", "batch_size=8", "checkpoint_every_kimg=0.016", "report_every=2"]
TINY = [
    "data.source.num_videos=160", f"data.source.num_frames={FRAMES}", f"data.resolution={RES}",
    "data.num_full=8", "data.num_test=16", "data.num_val=4", "data.shard_size=500", "ray.ingest_tasks=1",
    f"views.clip.net={NET}", f"residual.net={NET}", f"full_res.net={NET}",
    *[f"{run}.train.{o}" for run in ("views.clip", "residual", "full_res") for o in SHORT],
    *[f"{run}.scaling.{o}" for run in ("views.clip", "full_res") for o in ("use_gpu=false", "cpus_per_worker=1")],
    "sweep.trial_gpus=0", "sweep.trial_cpus=1", "sweep.mu_var=[1.0]", "sweep.mu_l1=[0.0]",
    "sweep.range_adapter=[true]",
    "eval.max_samples=16", f"eval.num_images={SHOWN}", "eval.sampler.steps=4", "eval.num_sigma=4",
    # the clip view early-stopped on the clips of 8 held-out videos, exported at its minimum
    "data.num_view_val=8", "views.clip.train.patience=1",
]
MODELS = ("bootstrapped", "combined", "full_res", "clip only")


def test_moving_mnist_config_loads_and_is_gpu_sized():
    """The config passes every load-time check as written and with the test's overrides; its own
    settings are the GPU-sized ones (64² 20-frame videos, 4-frame clips, GPU workers and trials)."""
    from bootdiff.config import load_config, to_object
    from bootdiff.config.check import check
    from bootdiff.experiment import build_view_denoiser

    cfg = to_object(load_config(CONFIG))
    check(cfg, CONFIG)
    src, clip = cfg.data.source, cfg.views["clip"]
    assert (src.num_frames, cfg.data.resolution, cfg.data.channels) == (20, 64, 1)
    assert 1 <= clip.clip_len < src.num_frames and clip.clip_stride <= clip.clip_len
    assert cfg.data.num_full + cfg.data.num_test <= src.num_videos // 10 + src.num_videos
    assert cfg.data.num_test <= src.num_videos // 10  # Moving MNIST's fixed test videos
    assert all(s.use_gpu and s.gpus_per_worker >= 1 for s in (clip.scaling, cfg.full_res.scaling))
    assert cfg.sweep.trial_gpus >= 1 and cfg.eval.max_samples <= cfg.data.num_test
    # the clip model is one factorised space-time U-Net, any clip length, 64² frames
    D = build_view_denoiser(clip, (1, clip.clip_len, 64, 64), sigma_data=0.5)
    assert sum(p.numel() for p in D.parameters()) > 100_000
    with torch.no_grad():
        for t in (clip.clip_len, clip.clip_len + clip.clip_stride):
            assert D(torch.randn(1, 1, t, 64, 64), torch.tensor([1.0])).shape == (1, 1, t, 64, 64)
    tiny = to_object(load_config(CONFIG, ["storage=/tmp/unused", *TINY]))
    check(tiny, "command line")
    assert tiny.views["clip"].clip_len == 4 and tiny.data.source.num_frames == FRAMES


def _kill_leftovers(tmp: str) -> None:
    """Stop what is left of the job's local Ray cluster (its processes name its temp dir): by
    process id, only processes of this test's own cluster."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if tmp.encode() in f.read():
                    os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def _data_images(html: str, mime: str) -> list:
    return [Image.open(io.BytesIO(base64.b64decode(m)))
            for m in re.findall(rf'src="data:image/{mime};base64,([A-Za-z0-9+/=]+)"', html)]


@pytest.mark.ray
def test_moving_mnist_pipeline_as_ray_job(tmp_path, mnist_wheel):
    storage = tmp_path / "storage"
    rtmp = tempfile.mkdtemp(prefix="bdray-", dir="/tmp")  # Ray's socket paths must stay short
    env = dict(os.environ, RAY_TMPDIR=rtmp, PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0", OMP_NUM_THREADS="1",
               PATH=os.path.dirname(PY) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("RAY_ADDRESS", None)  # a local cluster of its own, never someone else's
    t0 = time.time()
    try:
        proc = subprocess.run([PY, "-m", "ray_jobs.pipeline", "--config", CONFIG, f"storage={storage}", *TINY],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=1500)
    finally:
        _kill_leftovers(rtmp)
        shutil.rmtree(rtmp, ignore_errors=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    print(f"video pipeline as a Ray job: {time.time() - t0:.0f} s")
    for line in ("=== stage ingest", "=== stage train_views", "=== stage sweep_residual", "=== stage evaluate"):
        assert line in out, f"job log lacks {line!r}"
    # Ray's internal noise stays off the console of a locally started run (entry.quiet_ray).
    assert "RayDeprecationWarning" not in out and "exclude_resources" not in out, out[-5000:]
    assert "PreemptionWatcher" not in out and "core_worker.cc" not in out, out[-5000:]
    assert "worker processes have been started" not in out and "Cleaning up placement group" not in out, out[-5000:]
    assert "tensorboard --logdir" not in out  # Tune's own TensorBoard logger is off: the runs' curves are tb/'s
    # Ray's token-auth notice is the driver's dashboard line (a local cluster uses token auth by default)
    assert "Token authentication is enabled" not in out, out[-5000:]
    assert re.search(r"\[bootdiff\] Ray \S+ job \w+; dashboard: http://\S+ \(token auth: the dashboard asks for "
                     r"the token in ~/\.ray/auth_token; `ray get-auth-token` prints it\)", out), out[-5000:]
    root = storage / "moving_mnist"

    # ingest: full videos, 4-frame clips of others, test videos
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    splits = manifest["splits"]
    assert splits["full"]["shape"] == splits["test"]["shape"] == [1, FRAMES, RES, RES]
    assert splits["clip"]["shape"] == [1, 4, RES, RES] and splits["full"]["count"] == 8

    # the early-stopped clip view: G on its held-out clips at each checkpoint, exported at the lowest
    # 4 clips per video; the pool: 160 training videos less 8 full, 4 val and 8 held out (the 16 test
    # videos are made of MNIST's test digits: the source's fixed test split)
    assert splits["clip-val"]["count"] == 8 * 4 and splits["clip"]["count"] == (160 - 8 - 4 - 8) * 4
    es = json.loads((root / "views" / "view-clip.json").read_text())["early_stopping"]
    assert es["patience"] == 1 and np.isfinite(es["val_G"]) and es["val_G"] > 0 and es["reached_cap"]
    exported = json.loads((root / "models" / "clip" / "bootdiff.json").read_text())["extra"]
    assert exported["kimg"] == pytest.approx(es["chosen_kimg"]) and min(abs(es["chosen_kimg"] - k) for k in (0.016, 0.032)) < 1e-9
    assert re.search(r"view 'clip' done in \d+ s: .*reached its cap.*; exported at 0\.0[23] kimg, held-out G "
                     r"\d+\.\d{4}\)", out), out[-5000:]

    # the sweep finished: its residual trial and both baselines, with finite G
    sweep = json.loads((root / "sweep" / "sweep.json").read_text())
    kinds = sorted(t["kind"] for t in sweep["trials"])
    assert kinds == ["combined", "full_res", "residual"], sweep["trials"]
    assert all(t["status"] == "complete" and np.isfinite(t["test_G"]) and t["test_G"] > 0 for t in sweep["trials"])
    assert all(np.isfinite(t["val_G"]) and t["val_G"] > 0 for t in sweep["trials"])  # the video val split
    best = next(t for t in sweep["trials"] if t["trial_id"] == sweep["best"])
    assert best["kind"] == "residual"

    # the report: a frame strip (rows = videos, columns = frames) and a GIF per model
    rep = root / "sweep" / "report"
    html = (rep / "report.html").read_text()
    assert re.search(r"view models clip [\d.]+, each early-stopped on its held-out view samples", html)  # its budget
    for name in MODELS:
        assert f"<b>{name}</b>{SHOWN} videos × {FRAMES} frames" in html, name
    # grayscale wide PNGs; the report's matplotlib figures (curves, budgets) are RGBA
    strips = [im for im in _data_images(html, "png") if im.mode == "L" and im.size[0] > 2 * im.size[1]]
    assert len(strips) == len(MODELS)
    for im in strips:  # 2-px padding around 16² frames, nearest-upscaled by an integer k
        k = im.size[1] // (2 + SHOWN * (RES + 2))
        assert k >= 1 and im.size == ((2 + FRAMES * (RES + 2)) * k, (2 + SHOWN * (RES + 2)) * k)
    gifs = _data_images(html, "gif")
    assert len(gifs) == len(MODELS) and all(g.n_frames == FRAMES for g in gifs)
    md = (rep / "report.md").read_text()
    assert len(re.findall(r"\]\(report_files/video_\d\d_[^)]+\.gif\)", md)) == len(MODELS)
    summary = json.loads((rep / "summary.json").read_text())
    assert set(MODELS) <= set(summary["quality"])
    assert all(np.isfinite(q["swd_test"]) for q in summary["quality"].values())

    # exports load and denoise whole videos
    from bootdiff.export import load_bootstrap_model, load_view_model

    x, sigma = torch.randn(2, 1, FRAMES, RES, RES), torch.tensor([0.5, 2.0])
    with torch.no_grad():
        clip, _ = load_view_model(str(root / "models" / "clip"))
        assert clip(x[:, :, :4], sigma).shape == (2, 1, 4, RES, RES)
        full, _ = load_view_model(str(root / "models" / "full_res"))
        assert full(x, sigma).shape == x.shape
        y = load_bootstrap_model(str(root / "models" / "bootstrap"))(x, sigma)
        assert y.shape == x.shape and torch.isfinite(y).all()
