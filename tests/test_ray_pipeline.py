"""Ray integration: the whole pipeline as a `ray job submit` job against a real head, fault
injection through FailureConfig and re-submission skipping finished stages. Few tests, each
covering a lot: an interrupted sweep restored is tests/test_ray_faults.py's, the pipeline on s3://
with DDP views is tests/test_ray_multinode.py's."""

import json
import os
import uuid
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
RAY = os.path.join(os.path.dirname(PY), "ray")

# The quickstart, shrunk to seconds per stage (MNIST digits, 32², patch + low-res views).
TINY = [
    "data.source.limit=1500", "data.num_test=64", "data.num_val=16", "data.shard_size=1000",
    "views.patch.train.total_kimg=0.32", "views.low.train.total_kimg=0.32",
    "views.patch.train.checkpoint_every_kimg=0.12", "views.low.train.checkpoint_every_kimg=0.12",
    "views.patch.train.report_every=2", "views.low.train.report_every=2",
    "residual.train.total_kimg=0.16", "residual.train.checkpoint_every_kimg=0.08",
    "residual.train.report_every=2",  # reports between checkpoints carry no G
    "full_res.train.total_kimg=0.16", "full_res.train.checkpoint_every_kimg=0.08",
    "eval.max_samples=64", "eval.num_images=4", "eval.sampler.steps=6", "eval.num_sigma=6",
    "sweep.peers=[]",  # the quickstart's Ambient peer: in the job-submitted pipeline only
]

# The strongest baseline: the full-res baseline (and the peer, which trains like it) early-stopped on
# validation G with patience 1, up to a cap with room for four checkpoints (steps 3, 5, 8, 10).
PATIENT = ["full_res.train.patience=1", "full_res.train.total_kimg=0.32"]

# The optional distillation stage (bootdiff.distill), on in the job-submitted pipeline only.
DISTILL = [
    "distill.enabled=true", "distill.num_teacher_samples=8", "distill.shard_size=4", "distill.sampler_steps=2",
    "distill.teacher_fraction=0.5", "distill.real_weight=0.5", "distill.net.channels=[8,16]",
    "distill.net.attention=[false,false]", "distill.net.norm_groups=4", "distill.train.total_kimg=0.032",
    "distill.train.batch_size=8", "distill.train.checkpoint_every_kimg=0.016", "distill.train.warmup_kimg=0",
    "distill.train.report_every=1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


AUTH_TOKEN = uuid.uuid4().hex


def _ray_tmp() -> str:
    """A short temp dir for Ray (its socket paths must stay under 107 bytes)."""
    return tempfile.mkdtemp(prefix="bdray-", dir="/tmp")


def _env(tmp: str, **extra) -> dict:
    # Token auth (new local heads use it): one fresh token for the head, the CLI and the drivers, so
    # the test does not depend on a ~/.ray/auth_token left on the machine.
    env = dict(os.environ, RAY_TMPDIR=tmp, PYTHONUNBUFFERED="1", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=AUTH_TOKEN,
               PATH=os.path.dirname(PY) + os.pathsep + os.environ.get("PATH", ""),
               RAY_TRAIN_ENABLE_STATE_TRACKING="1", RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def head(tmp_path_factory, mnist_wheel):
    """A real head started with `ray start --head` (dashboard on), stopped by killing its own processes."""
    tmp = _ray_tmp()
    port, dash = _free_port(), _free_port()
    env = _env(tmp)
    ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "ray-client-server-port",
        "runtime-env-agent-port", "metrics-export-port")]
    subprocess.run([RAY, "start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=2",
                    "--include-dashboard=true", "--disable-usage-stats", *ports], env=env, check=True,
                   capture_output=True, cwd=REPO, timeout=120)
    try:
        yield {"env": env, "address": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{port}", "tmp": tmp}
    finally:
        _stop(tmp, env)
        shutil.rmtree(tmp, ignore_errors=True)


def _stop(tmp: str, env: dict) -> None:
    """Stop this test's cluster only: its processes carry its temp dir on their command lines
    (`ray stop` would stop every Ray cluster on the machine). TERM first, then KILL what is left."""
    subprocess.run(["pkill", "-TERM", "-f", tmp], capture_output=True)
    deadline = time.time() + 5
    while time.time() < deadline and subprocess.run(["pgrep", "-f", tmp], capture_output=True).returncode == 0:
        time.sleep(0.5)
    subprocess.run(["pkill", "-KILL", "-f", tmp], capture_output=True)


@pytest.fixture(scope="module")
def submitted(head, tmp_path_factory):
    """The tiny quickstart pipeline submitted as a Ray job; a worker of each view fails once."""
    storage = str(tmp_path_factory.mktemp("storage"))
    cmd = [RAY, "job", "submit", "--address", head["address"], "--working-dir", ".", "--",
           PY, "-m", "ray_jobs.pipeline", "--config", "configs/quickstart.yaml",
           f"storage={storage}", "ray.inject_failure_step=3", *TINY, "sweep.peers=[ambient]", *DISTILL, *PATIENT]
    t0 = time.time()
    proc = _submit(cmd, head["env"], timeout=1800)
    return {"proc": proc, "storage": storage, "root": os.path.join(storage, "quickstart"),
            "seconds": time.time() - t0, "cmd": cmd}


def _submit(cmd, env, timeout):
    """`ray job submit`, retried while a just-started head's job agent is not up yet."""
    for _ in range(30):
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            return proc
        time.sleep(3)
    return proc


def _jobs(head) -> list:
    req = urllib.request.Request(head["address"] + "/api/jobs/",
                                 headers={"Authorization": f"Bearer {head['env']['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.mark.ray
def test_job_submit_pipeline_end_to_end(head, submitted):
    proc, root = submitted["proc"], submitted["root"]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in out, out[-6000:]

    # Progress in the job's logs; the dashboard's job API lists the job as SUCCEEDED.
    for line in ("=== stage ingest", "=== stage train_views", "=== stage sweep_residual", "=== stage distill",
                 "=== stage evaluate", "kimg", "sweep report:"):
        assert line in out, f"job log lacks {line!r}"
    # Train's per-report / per-checkpoint INFO lines stay off the console (ray.train_log_level)
    assert "Reporting training result" not in out and "Checkpoint successfully created" not in out
    assert "RayDeprecationWarning" not in out  # Ray's own deprecation noise (entry.quiet_ray)
    assert "chosen on validation G" in out  # the sweep says what it chose on
    sub_id = out.split("Job '")[1].split("'")[0]
    job = next(j for j in _jobs(head) if j["submission_id"] == sub_id)
    assert job["status"] == "SUCCEEDED"

    # Two views trained concurrently: their run intervals overlap.
    runs = {v: json.load(open(os.path.join(root, "views", f"view-{v}.json"))) for v in ("patch", "low")}
    assert max(r["start"] for r in runs.values()) < min(r["end"] for r in runs.values())

    # Fault injection: each view's worker raised once at step >= 3; FailureConfig restarted it
    # from its last checkpoint (step 2 or 4: at most one checkpoint interval re-done), and the
    # step count carried on to the end (0.32 kimg / 64 per step = 5 steps).
    for v in ("patch", "low"):
        assert os.path.exists(os.path.join(root, "views", f"injected-failure-{v}"))
        assert runs[v]["metrics"]["step"] == 5
    assert out.count("injected failure at step 4") >= 2
    resumed = {}  # run -> steps it resumed from ("[bootdiff] resuming from step N (<checkpoint path>)")
    for line in out.splitlines():
        if "resuming from step" in line:
            step, path = line.split("resuming from step ")[1].split(" ", 1)
            run = next(r for r in ("view-patch", "view-low", "trial-full_res", "trial-ambient", "trial-residual",
                                   "distill") if r in path)
            resumed.setdefault(run, set()).add(int(step))
    assert resumed["view-patch"] == {4} and resumed["view-low"] == {4}, resumed
    # The full-res baseline runs the same Train worker, so it fails once too (checkpoint every
    # 0.08 kimg / 32 per step: steps 3, 5, 8, 10); residual trials inject nothing.
    assert resumed.get("trial-full_res") == {3} and "trial-residual" not in resumed, resumed
    assert resumed.get("trial-ambient") == {3}, resumed  # a peer (sweep.peers) runs that worker too

    # The quickstart's 2-setting sweep plus both baselines and the peer finished; the best residual is a real trial.
    sweep = json.load(open(os.path.join(root, "sweep", "sweep.json")))
    kinds = [t["kind"] for t in sweep["trials"]]
    assert kinds.count("residual") == 2 and "combined" in kinds and "full_res" in kinds and "ambient" in kinds
    assert {(t["mu_var"], t["mu_l1"]) for t in sweep["trials"] if t["kind"] == "residual"} == {(0.0, 0.0), (1.0, 0.0)}
    best = next(t for t in sweep["trials"] if t["trial_id"] == sweep["best"])
    assert best["kind"] == "residual" and best["test_G"] > 0
    assert all(t["test_G"] > 0 and t["val_G"] > 0 for t in sweep["trials"])
    # chosen on the validation split: the lowest val G among residual trials with a checkpoint
    chosen = [t for t in sweep["trials"] if t["kind"] == "residual" and t["checkpoint"]]
    assert best["val_G"] == min(t["val_G"] for t in chosen)
    # the recommended model: the lowest validation G of every model, the peer and the baselines included
    rec = next(t for t in sweep["trials"] if t["trial_id"] == sweep["recommended"])
    assert rec["val_G"] == min(t["val_G"] for t in sweep["trials"] if t["checkpoint"] or t["kind"] == "combined")

    # The report: HTML with embedded plots, Markdown twin, CSV of all trials.
    rep = os.path.join(root, "sweep", "report")
    html = open(os.path.join(rep, "report.html")).read()
    assert html.count("data:image/png;base64,") >= 6 and sweep["best"] in html
    assert sweep["best"] in open(os.path.join(rep, "report.md")).read()
    assert len(open(os.path.join(rep, "trials.csv")).read().strip().splitlines()) == 1 + len(sweep["trials"])
    summary = json.load(open(os.path.join(rep, "summary.json")))
    assert {"bootstrapped", "combined", "full_res", "ambient", "patch only", "low only"} <= set(summary["quality"])
    assert summary["recommended"]["trial_id"] == rec["trial_id"] and "Recommended model: " + rec["trial_id"] in html
    assert "Ambient Omni" in html  # the peer's row in Figure 1's table

    # TensorBoard: one run per view model and trained trial under tb/, with its curves, G at
    # checkpoints, and each step once although views and the full-res baseline were resumed.
    from bootdiff.run.tb import read_runs

    tb = read_runs(os.path.join(root, "tb"))
    assert set(tb) == {"view-patch", "view-low", "distill"} | {f"trial-{t['trial_id']}" for t in sweep["trials"]
                                                    if t["kind"] != "combined"}, sorted(tb)
    for name, tags in tb.items():
        assert {"loss", "lr", "grad_norm_max", "img_per_s", "kimg"} <= set(tags), (name, sorted(tags))
        assert name.startswith("view-") or {"val_G", "test_G", "train_G"} <= set(tags), (name, sorted(tags))
        raw = _tb_raw_steps(os.path.join(root, "tb", name), "loss")
        assert raw == sorted(set(raw)) and raw == list(tags["loss"]["step"]), (name, raw)
    for v in ("patch", "low"):
        assert tb[f"view-{v}"]["loss"]["step"][-1] == round(runs[v]["metrics"]["kimg"] * 1000)
    # Early stopping on validation: each trained trial (the baseline too) is taken at the checkpoint
    # with its lowest val G over the whole run (its curve), and that checkpoint was kept.
    for t in sweep["trials"]:
        if t["kind"] == "combined":
            continue
        curve = tb[f"trial-{t['trial_id']}"]["val_G"]
        k = int(np.argmin(curve["value"]))
        assert t["val_G"] == pytest.approx(curve["value"][k], rel=1e-5), t
        assert t["chosen_kimg"] == pytest.approx(curve["kimg"][k], abs=1e-3) and t["chosen_kimg"] <= t["kimg"]
        assert os.path.isdir(t["checkpoint"]), t
    assert "<h2>Training curves</h2>" in html and "report_files/training_G.png" in open(
        os.path.join(rep, "report.md")).read()
    # The report's answer comes first and stands on the early-stopped baseline: stopped by patience 1
    # (its last checkpoint no better than its best before it; a resume counts patience afresh from
    # the resumed checkpoint, docs/RAY.md), or at its cap, "still improving" when the cap was its best.
    from bootdiff.evaluation.plots import _fmt

    fr = next(t for t in sweep["trials"] if t["kind"] == "full_res")
    vals = tb["trial-full_res"]["val_G"]["value"]
    said = [line for line in open(os.path.join(rep, "report.md")).read().splitlines() if line.startswith("- ")][1]
    assert said.startswith("- At N = 16 full-res samples the partial data "), said
    assert "[bootdiff] " + said[2:] in out  # the answer on the console too, before the report's path
    assert json.load(open(os.path.join(rep, "summary.json")))["verdict"][0] == said[2:]
    if fr["status"] == "stopped_early":
        assert len(vals) >= 3 and vals[-1] >= min(vals[:-1]) and fr["kimg"] < 0.32, (fr, vals)
        assert f"had not improved for 1 checkpoint, at {_fmt(fr['kimg'])} of its 0.32-kimg cap" in said, said
    else:
        assert fr["status"] == "complete" and fr["kimg"] >= 0.32, fr
        capped = fr["chosen_kimg"] >= fr["kimg"] - 1e-6
        assert ("reached its 0.32-kimg cap still improving" in said) == capped, (fr, said)

    # Exported models load with plain diffusers, and the bootstrapped model with bootdiff.
    from diffusers import UNet2DModel

    from bootdiff.export import load_bootstrap_model

    for v in ("patch", "low", "full_res", "ambient"):
        assert isinstance(UNet2DModel.from_pretrained(os.path.join(root, "models", v, "net")), UNet2DModel)
    model = load_bootstrap_model(os.path.join(root, "models", "bootstrap"))
    import torch

    x = torch.randn(2, 1, 32, 32)
    assert model(x, torch.tensor([0.5, 2.0])).shape == x.shape

    # Distillation: teacher samples written by Ray tasks as shards, the student trained as a Ray
    # Train run (its worker failed once too), scored in the report, exported as a diffusers pipeline.
    for done in ("distill/COMPLETE", "models/student/COMPLETE", "export/diffusers/COMPLETE"):
        assert os.path.exists(os.path.join(root, done)), done
    teacher = json.load(open(os.path.join(root, "distill", "teacher", "manifest.json")))
    assert teacher["splits"]["teacher"]["count"] == 8
    assert os.path.exists(os.path.join(root, "views", "injected-failure-distill"))
    assert resumed.get("distill") and resumed["distill"] <= {2, 4}, resumed  # 4 steps, checkpoints at 2 and 4
    assert "student" in summary["quality"] and "student" in summary["total_G"]
    assert summary["distill_step_time"]["ratio"] > 0 and "student" in open(os.path.join(rep, "report.md")).read()
    assert "distill" in json.load(open(os.path.join(root, "timings.json")))["stages"]
    assert "distill" in tb and {"test_G", "train_G"} <= set(tb["distill"])
    from diffusers import DiffusionPipeline

    folder = os.path.join(root, "export", "diffusers")
    assert json.load(open(os.path.join(folder, "model_index.json")))["_class_name"] == \
        ["bootdiff_pipeline", "BootdiffEDMPipeline"]
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert pipe(batch_size=2, num_inference_steps=2, output_type="np").images.shape == (2, 32, 32, 1)


def _tb_raw_steps(folder, tag):
    """Every step of ``tag`` in a TensorBoard run folder's event files, read raw (no purge)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [e.step for f in sorted(os.listdir(folder)) if "tfevents" in f
            for e in EventFileLoader(os.path.join(folder, f)).Load() for v in e.summary.value if v.tag == tag]


@pytest.mark.ray
def test_resubmit_skips_finished_stages(head, submitted):
    """Re-submitting the same run finds every stage complete and carries on in seconds."""
    assert submitted["proc"].returncode == 0
    t0 = time.time()
    proc = _submit(submitted["cmd"], head["env"], timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    marker = os.path.join(submitted["root"], "distill", "COMPLETE")
    before = os.path.getmtime(marker)
    for msg in ("data already ingested", "already exported", "sweep already complete", "distill: already done",
                "report already written"):
        assert msg in out
    assert os.path.getmtime(marker) == before
    assert time.time() - t0 < submitted["seconds"] / 2
