"""Past one machine, and the whole pipeline as users run it: `ray job submit` on a three-node Ray
cluster simulated on this machine (tests/multinode.py: a head that takes no work and worker nodes
``a`` and ``b``, each its own ``ray start`` with its own temp dir and working directory), with
moto's S3 server as the only storage. The job-submitted pipeline runs end to end with every stage
on (the Ambient peer, the early-stopped baseline, distillation) and every Train worker failing once
(FailureConfig resumes it from its checkpoint); each view lands on the node its label selector
names and the sweep's trials use both nodes (Ray Train's state API); the report, TensorBoard runs
and exported models are checked, and a re-submission skips every finished stage. A local storage
path and a placement no node can take fail at load, naming the key, before anything is written; a
worker node lost mid-stage-1 or mid-sweep costs at most one checkpoint interval and the run
finishes on the nodes left; a run with no node left for it fails naming what is missing. The
faults a user meets from a terminal joined to the cluster (drivers with ``RAY_ADDRESS``, storage a
local path every node shares): two submissions of one run at once, exactly one runs (the run's
lease); SIGINT during the sweep, and the same command restores it and runs only the unfinished
trials. Later tests reuse the pipeline test's data and view models where theirs would be the same
(`_reuse`), so their time goes to what they test; the tests that lose nodes come last."""

import glob
import json
import math
import os
import re
import signal
import subprocess
import time
import urllib.request
import uuid

import pytest

from bootdiff.sweep import chosen_report
from multinode import RAY, PY, LocalCluster
from rayhead import DISTILL, PATIENT, REPO, TINY, tb_raw_steps, terminated_trial

pytestmark = pytest.mark.ray

# The tiny quickstart without its peer, distillation or combined baseline, for the node tests.
OVERRIDES = [*TINY, "sweep.baseline_combined=false", "ray.max_failures=2"]


# Fake cloud keys of the cluster: only its nodes' `ray start` gets them (the way cluster/README.md
# tells users to give a cluster its credentials); the CLI and the drivers run without any.
KEY_ID = "AKIAFAKE" + uuid.uuid4().hex[:12].upper()
SECRET = "fakeSecret" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def cluster(s3, mnist_wheel):
    """Head (0 CPUs) + nodes a and b (2 CPUs each); they inherit the moto endpoint, and only they
    hold the cloud keys (`KEY_ID`, `SECRET`; moto takes any). The GCS checks each node's health
    every second instead of every 3 s, so a killed raylet is marked dead after its 5 failed checks
    in ≈ 5 s instead of ≈ 15 s (a slow but live node still needs 5 checks of 10 s each
    unanswered): the tests wait less for each lost node."""
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    c = LocalCluster({"a": {"cpus": 2}, "b": {"cpus": 2}}, env=dict(env, RAY_health_check_period_ms="1000"),
                     node_env={"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}).start()
    try:
        yield c
    finally:
        c.stop()


def _job(cluster, module: str, config: str, *overrides, wait=True):
    """``ray job submit`` of ``python -m <module> --config <config> …`` from the repository (its
    own working directory), with the moto endpoint in the CLI's env (it is not a secret; the keys
    come from the nodes' env)."""
    cmd = [RAY, "job", "submit", "--address", cluster.address, "--working-dir", ".",
           *([] if wait else ["--no-wait"]), "--", PY, "-m", module, "--config", config, *overrides]
    for _ in range(20):  # a just-started head's job agent may not be up yet
        proc = subprocess.run(cmd, env=dict(cluster.env, AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"]),
                              cwd=REPO, capture_output=True, text=True, timeout=1500)
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            return proc
        time.sleep(3)
    return proc


def _submit(cluster, *overrides, wait=True):
    """``ray job submit`` of the pipeline (the tiny quickstart, `OVERRIDES`)."""
    return _job(cluster, "ray_jobs.pipeline", "configs/quickstart.yaml", *OVERRIDES, *overrides, wait=wait)


def _submission_id(proc) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Job '" in out, out[-4000:]
    return out.split("Job '")[1].split("'")[0]


def _fs():
    import fsspec

    fs = fsspec.filesystem("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    fs.invalidate_cache()
    return fs


def _reuse(submitted, storage: str, models=()) -> bool:
    """Copy the pipeline test's ingested data (the same ``data`` config) and the view models it
    exported (those named in ``models``: each model and its run record) under ``storage``
    (``s3://…`` or a local path), so a later test's pipeline finds them done and spends its time
    on what it tests; without them (the pipeline test failed) the test makes its own."""
    fs, src = _fs(), submitted["key"]
    if not all(fs.exists(f"{src}/{done}") for done in ["data/manifest.json", *[f"models/{v}/COMPLETE" for v in models]]):
        return False
    for part in ["data", *[p for v in models for p in (f"models/{v}", f"views/view-{v}.json")]]:
        for f in fs.find(f"{src}/{part}"):
            dst = f"{storage}/quickstart{f[len(src):]}"
            if dst.startswith("s3://"):
                fs.copy(f, dst[len("s3://"):])
            else:
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                fs.get(f, dst)
    return True


def _jobs(cluster) -> list:
    """The dashboard's job API: every job the cluster ran."""
    req = urllib.request.Request(cluster.address + "/api/jobs/",
                                 headers={"Authorization": f"Bearer {cluster.env['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


# The pipeline test's run: the quickstart shrunk (TINY) with every stage on — the Ambient peer, the
# early-stopped baseline (PATIENT), distillation (DISTILL), the combined baseline — each Train
# worker failing once at step >= 3 (FailureConfig restarts it from its checkpoint), the patch view
# on node a, the low-res view data-parallel (DDP, 2 workers) on node b, storage on S3 only. One
# residual setting of the quickstart's two: the choice among residual trials on validation G is the
# SIGINT test's sweep (two settings, on this cluster), and a Train run less is ≈ 30 s less here.
PIPELINE = ["sweep.baseline_combined=true", "ray.inject_failure_step=3", "sweep.peers=[ambient]", "sweep.mu_var=[1.0]",
            *DISTILL, *PATIENT,
            "views.patch.scaling.label_selector={node: a}", "views.low.scaling.label_selector={node: b}",
            "views.low.scaling.num_workers=2"]


@pytest.fixture(scope="module")
def submitted(cluster, s3, tmp_path_factory):
    """The job-submitted pipeline on the three nodes, its files on S3 (and, for reading, a local copy
    of what a user opens: run records, report, TensorBoard runs, exported models)."""
    storage = f"{s3[0]}/multinode"
    since = time.time_ns()
    t0 = time.time()
    proc = _submit(cluster, f"storage={storage}", *PIPELINE)
    seconds = time.time() - t0
    fs, key = _fs(), storage[len("s3://"):] + "/quickstart"
    local = tmp_path_factory.mktemp("copy") / "quickstart"
    if proc.returncode == 0:
        for f in fs.find(key):
            rel = f[len(key) + 1:]
            if not rel.startswith(("data/", "sweep/runs/", "sweep/tune/", "sweep/cache/")):
                os.makedirs(os.path.dirname(local / rel), exist_ok=True)
                fs.get(f, str(local / rel))
    return {"proc": proc, "storage": storage, "key": key, "root": str(local), "seconds": seconds, "since": since}


def test_job_submitted_pipeline_on_three_nodes_end_to_end(cluster, submitted):
    proc, root, fs, key = submitted["proc"], submitted["root"], _fs(), submitted["key"]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in out, out[-6000:]

    # Progress in the job's logs; the dashboard's job API lists the job as SUCCEEDED.
    for line in ("=== stage ingest", "=== stage train_views", "=== stage sweep_residual", "=== stage distill",
                 "=== stage evaluate", "kimg", "sweep report:"):
        assert line in out, f"job log lacks {line!r}"
    # Train's per-report / per-checkpoint INFO lines stay off the console (ray.train_log_level)
    assert "Reporting training result" not in out and "Checkpoint successfully created" not in out
    assert "RayDeprecationWarning" not in out  # Ray's own deprecation noise (entry.quiet_ray)
    # the preemption watcher stays on on a cluster the driver joins; its actor's C++ error line does not reach the job's log
    assert "PreemptionWatcher" not in out and "core_worker.cc" not in out, out[-6000:]
    # the raylet's worker-pool warning and each Train run's placement-group cleaner line: dropped by the driver
    assert "worker processes have been started" not in out and "Cleaning up placement group" not in out, out[-6000:]
    assert "tensorboard --logdir" not in out  # Tune's own TensorBoard logger is off: the runs' curves are tb/'s
    assert "chosen on validation G" in out  # the sweep says what it chose on
    sub_id = out.split("Job '")[1].split("'")[0]
    job = next(j for j in _jobs(cluster) if j["submission_id"] == sub_id)
    assert job["status"] == "SUCCEEDED"

    # Placement, from Ray Train's state API: each view's workers on the node its label selector
    # names, the low-res view data-parallel over node b, the sweep's Train trials on both nodes.
    runs = cluster.train_runs()
    assert cluster.nodes_of(runs, "view-patch", submitted["since"]) == {"a"}, runs
    assert cluster.nodes_of(runs, "view-low", submitted["since"]) == {"b"}, runs
    low = [r for r in runs if r["name"] == "view-low"][-1]
    assert len(low["attempts"][-1]["workers"]) == 2
    trial_nodes = set().union(*[cluster.nodes_of(runs, r["name"]) for r in runs if r["name"].startswith("trial-")])
    assert trial_nodes == {"a", "b"}, [(r["name"], cluster.nodes_of(runs, r["name"])) for r in runs]

    # Everything on S3: data, Train's and Tune's checkpoints, the report; the nodes' own working
    # directories hold nothing of the run.
    files = fs.find(key)
    assert f"{key}/data/manifest.json" in files and any(f.startswith(f"{key}/data/low/") for f in files)
    assert any("/views/view-low/" in f and f.endswith("state.pt") for f in files)
    assert any("/sweep/runs/" in f and f.endswith("state.pt") for f in files)
    for name in ("head", "a", "b"):
        assert not os.listdir(os.path.join(cluster.root, name, "work")), name

    # Two views trained concurrently: their run intervals overlap.
    views = {v: json.load(open(os.path.join(root, "views", f"view-{v}.json"))) for v in ("patch", "low")}
    assert max(r["start"] for r in views.values()) < min(r["end"] for r in views.values())

    # Fault injection: each view's worker raised once at step >= 3; FailureConfig restarted it from
    # its last checkpoint and the step count carried on to the end. Patch: 0.32 kimg / 64 per step
    # = 5 steps, checkpoints at 2 and 4, failed at 4. Low-res: 2 ranks x 64 per step, 3 steps
    # (0.384 kimg), a checkpoint every step, failed at 3 (its last).
    for v in ("patch", "low"):
        assert os.path.exists(os.path.join(root, "views", f"injected-failure-{v}"))
    assert views["patch"]["metrics"]["step"] == 5
    assert views["low"]["metrics"]["step"] == 3 and abs(views["low"]["metrics"]["kimg"] - 0.384) < 1e-6
    assert "injected failure at step 4" in out and "injected failure at step 3" in out
    resumed = {}  # run -> steps it resumed from ("[bootdiff] resuming from step N (<checkpoint URL>)")
    for line in out.splitlines():
        if "resuming from step" in line:
            step, path = line.split("resuming from step ")[1].split(" ", 1)
            run = next(r for r in ("view-patch", "view-low", "trial-full_res", "trial-ambient", "trial-residual",
                                   "distill") if r in path)
            resumed.setdefault(run, set()).add(int(step))
    assert resumed["view-patch"] == {4} and resumed["view-low"] == {3}, resumed
    # The full-res baseline runs the same Train worker, so it fails once too (checkpoint every
    # 0.08 kimg / 32 per step: steps 3, 5, 8, 10); residual trials inject nothing.
    assert resumed.get("trial-full_res") == {3} and "trial-residual" not in resumed, resumed
    assert resumed.get("trial-ambient") == {3}, resumed  # a peer (sweep.peers) runs that worker too

    # The residual trial, both baselines and the peer finished; the best residual is a real trial.
    sweep = json.load(open(os.path.join(root, "sweep", "sweep.json")))
    kinds = [t["kind"] for t in sweep["trials"]]
    assert kinds.count("residual") == 1 and "combined" in kinds and "full_res" in kinds and "ambient" in kinds
    # the best bootstrapped trial averaged with the peer, its weight the lowest validation G of sweep.ensemble's
    ens = next(t for t in sweep["trials"] if t["kind"] == "ensemble")
    assert ens["members"] == [sweep["best"], "ambient"] and ens["checkpoint"] is None
    assert ens["val_G"] == min(ens["val_G_by_weight"].values()) and len(ens["val_G_by_weight"]) == 3
    assert f"[bootdiff] ensemble: {ens['weights'][0]:g} × {sweep['best']} + {ens['weights'][1]:g} × ambient" in out
    assert [(t["mu_var"], t["mu_l1"]) for t in sweep["trials"] if t["kind"] == "residual"] == [(1.0, 0.0)]
    best = next(t for t in sweep["trials"] if t["trial_id"] == sweep["best"])
    assert best["kind"] == "residual" and best["test_G"] > 0 and best["checkpoint"]
    assert all(t["test_G"] > 0 and t["val_G"] > 0 for t in sweep["trials"])
    # the recommended model: the lowest validation G of every model, the peer and the baselines included
    rec = next(t for t in sweep["trials"] if t["trial_id"] == sweep["recommended"])
    assert rec["val_G"] == min(t["val_G"] for t in sweep["trials"] if t["checkpoint"] or t["kind"] in ("combined", "ensemble"))

    # The report: HTML with embedded plots, Markdown twin, CSV of all trials.
    rep = os.path.join(root, "sweep", "report")
    html = open(os.path.join(rep, "report.html")).read()
    assert html.count("data:image/png;base64,") >= 6 and sweep["best"] in html
    assert sweep["best"] in open(os.path.join(rep, "report.md")).read()
    assert len(open(os.path.join(rep, "trials.csv")).read().strip().splitlines()) == 1 + len(sweep["trials"])
    summary = json.load(open(os.path.join(rep, "summary.json")))
    assert {"bootstrapped", "combined", "full_res", "ambient", "ensemble", "patch only", "low only"} <= set(summary["quality"])
    assert summary["recommended"]["trial_id"] == rec["trial_id"] and "Recommended model: " + rec["trial_id"] in html
    assert "Ambient Omni" in html  # the peer's row in Figure 1's table

    # TensorBoard (uploaded to S3 with each checkpoint): one run per view model and trained trial,
    # with its curves, G at checkpoints, and each step once although views, the full-res baseline
    # and the peer were resumed.
    from bootdiff.run.tb import read_runs

    tb = read_runs(os.path.join(root, "tb"))
    assert set(tb) == {"view-patch", "view-low", "distill"} | {f"trial-{t['trial_id']}" for t in sweep["trials"]
                                                    if t["kind"] not in ("combined", "ensemble")}, sorted(tb)
    for name, tags in tb.items():
        assert {"loss", "lr", "grad_norm_max", "img_per_s", "kimg"} <= set(tags), (name, sorted(tags))
        # held-out curves on the validation split: the test split is met once, at the checkpoint chosen
        assert name.startswith("view-") or ({"val_G", "train_G"} <= set(tags) and "test_G" not in tags), \
            (name, sorted(tags))
        raw = tb_raw_steps(os.path.join(root, "tb", name), "loss")
        assert raw == sorted(set(raw)) and raw == list(tags["loss"]["step"]), (name, raw)
    for v in ("patch", "low"):
        assert tb[f"view-{v}"]["loss"]["step"][-1] == round(views[v]["metrics"]["kimg"] * 1000)
    # Early stopping on validation: each trained trial (the baseline too) is taken at the checkpoint
    # with its lowest val G over the whole run (its curve), and that checkpoint was kept. A trial
    # ASHA stops may log a checkpoint or two more to TensorBoard while the stop reaches its worker
    # (seen on a loaded machine); Tune never receives them, so the curve counts to its last result.
    for t in sweep["trials"]:
        if t["kind"] in ("combined", "ensemble"):  # trained nothing of their own
            continue
        curve = tb[f"trial-{t['trial_id']}"]["val_G"]
        seen = [i for i, k in enumerate(curve["kimg"]) if k <= t["kimg"] + 1e-6]
        assert seen and (t["status"] == "stopped_early" or len(seen) == len(curve["kimg"])), (t, curve)
        k = min(seen, key=lambda i: curve["value"][i])
        assert t["val_G"] == pytest.approx(curve["value"][k], rel=1e-5), t
        assert t["chosen_kimg"] == pytest.approx(curve["kimg"][k], abs=1e-3) and t["chosen_kimg"] <= t["kimg"]
        assert fs.exists(t["checkpoint"]), t  # on S3 (Ray names it without the s3:// scheme)
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
    assert summary["verdict"][0] == said[2:]
    if fr["status"] == "stopped_early":
        assert len(vals) >= 3 and vals[-1] >= min(vals[:-1]) and fr["kimg"] < 0.32, (fr, vals)
        assert f"had not improved for 1 checkpoint, at {_fmt(fr['kimg'])} of its 0.32-kimg cap" in said, said
    else:
        assert fr["status"] == "complete" and fr["kimg"] >= 0.32, fr
        capped = fr["chosen_kimg"] >= fr["kimg"] - 1e-6
        assert ("reached its 0.32-kimg cap still improving" in said) == capped, (fr, said)

    # Exported models load with plain diffusers, and the bootstrapped model with bootdiff.
    import torch
    from diffusers import DiffusionPipeline, UNet2DModel

    from bootdiff.export import load_bootstrap_model

    for v in ("patch", "low", "full_res", "ambient"):
        assert isinstance(UNet2DModel.from_pretrained(os.path.join(root, "models", v, "net")), UNet2DModel)
    model = load_bootstrap_model(os.path.join(root, "models", "bootstrap"))
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
    assert "distill" in tb and {"val_G", "train_G"} <= set(tb["distill"])
    folder = os.path.join(root, "export", "diffusers")
    assert json.load(open(os.path.join(folder, "model_index.json")))["_class_name"] == \
        ["bootdiff_pipeline", "BootdiffEDMPipeline"]
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert pipe(batch_size=2, num_inference_steps=2, output_type="np").images.shape == (2, 32, 32, 1)


def _files_containing(root: str, needles) -> list:
    hits = []
    for d, _, files in os.walk(root, followlinks=False):
        for f in files:
            p = os.path.join(d, f)
            try:
                data = open(p, "rb").read()
            except OSError:
                continue
            hits += [f"{p}: {n[:12]}…" for n in needles if n.encode() in data]
    return hits


def test_credentials_stay_out_of_job_records_and_logs(cluster, submitted):
    """The pipeline's workers reached S3 with the keys only the nodes hold (it wrote its whole run
    there), and the keys are nowhere else: not in the dashboard's job records, the job's log,
    any file of Ray's session dirs on the three nodes, or anything the run stored."""
    assert submitted["proc"].returncode == 0
    needles = (SECRET, KEY_ID)
    assert not [n for n in needles if n in submitted["proc"].stdout + submitted["proc"].stderr]
    records = json.dumps(_jobs(cluster))
    assert "raysubmit_" in records and not [n for n in needles if n in records]
    assert not _files_containing(cluster.root, needles)  # every node's temp dir (Ray's session) and work dir
    fs = _fs()
    stored = [f for f in fs.find(submitted["key"]) if any(n.encode() in fs.cat(f) for n in needles)]
    assert not stored


def _one_view_config(tmp_path, name: str, extra=()) -> str:
    """A one-view config file (8×8 low-res view of random 16² images), its data ingested here into
    a local path the nodes share."""
    from bootdiff.config import load_config, to_object, to_yaml
    from bootdiff.data.ingest import ingest
    from test_resume import Source  # random 16² images, in memory

    cfg = to_object(load_config(None, [
        f"storage={tmp_path / 'store'}", f"name={name}", "data.resolution=16", "data.num_full=10",
        "data.num_test=10", "data.num_val=2", "data.shard_size=16", "views.low.kind=downsample",
        "views.low.factor=2", "views.low.net.channels=[8,8]", "views.low.net.attention=[false,false]",
        "views.low.net.norm_groups=4", "views.low.train.batch_size=8", "views.low.train.total_kimg=0.048",
        "views.low.train.checkpoint_every_kimg=0.016", "views.low.train.report_every=1",
        "views.low.train.warmup_kimg=0", "views.low.scaling.cpus_per_worker=1", "ray.max_failures=2",
        "ray.shared_storage=true", *extra]))
    ingest(cfg, progress=False, source=Source())
    path = tmp_path / f"{name}.yaml"
    path.write_text(to_yaml(cfg))
    return str(path)


def test_deterministic_failures_fail_at_once_naming_their_cause(cluster, tmp_path):
    """A non-finite loss (lr=1e6) and a corrupt shard, two view jobs submitted at once: each fails
    after one attempt with its own error, not retried (a Train worker that dies is: the nodes lost
    below take their workers with them, and each run resumes from its checkpoint through the same
    `fit_retrying`). The data error reaches the driver as itself (it pickles with its own
    arguments): before, Ray's controller got a TypeError from ChecksumError's constructor inside a
    system error, and every attempt was retried."""
    nan = _one_view_config(tmp_path, "nan", ["views.low.train.lr=1e6"])
    bad = _one_view_config(tmp_path, "bad")
    shard = tmp_path / "store" / "bad" / "data" / "low" / "low-000000.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    ids = [_submission_id(_job(cluster, "ray_jobs.train_views", path, wait=False)) for path in (nan, bad)]
    (status, out), (bad_status, bad_out) = [cluster.wait_job(i, timeout=600) for i in ids]
    assert status == "FAILED", out[-6000:]
    assert re.search(r"FloatingPointError: non-finite (loss|gradient norm) at step \d", out), out[-6000:]
    assert out.count("not retried") >= 1 and "worker failure 1" not in out
    assert "FailurePolicy] RETRY" not in out
    assert len(re.findall(r"step 1 +kimg", out)) == 1, out[-6000:]  # one attempt

    assert bad_status == "FAILED", bad_out[-6000:]
    assert re.search(r"ChecksumError: shard \S*low-000000\.tar checksum mismatch", bad_out), bad_out[-6000:]
    assert "not retried" in bad_out and "worker failure 1" not in bad_out, bad_out[-6000:]
    assert "missing 2 required positional arguments" not in bad_out


def test_resubmit_skips_finished_stages(cluster, submitted):
    """Re-submitting the same run finds every stage complete and carries on in seconds."""
    assert submitted["proc"].returncode == 0
    fs, marker = _fs(), f"{submitted['key']}/distill/COMPLETE"
    before = fs.info(marker)["LastModified"]
    t0 = time.time()
    proc = _submit(cluster, f"storage={submitted['storage']}", *PIPELINE)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for msg in ("data already ingested", "already exported", "sweep already complete", "distill: already done",
                "report already written"):
        assert msg in out
    assert _fs().info(marker)["LastModified"] == before
    assert time.time() - t0 < submitted["seconds"] / 2


def test_local_storage_and_unplaceable_runs_fail_at_load_naming_the_key(cluster, s3, tmp_path):
    local = tmp_path / "runs"
    proc = _submit(cluster, f"storage={local}")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "ERROR: storage=" in out, out[-4000:]
    assert f"storage='{local}' is a local path, but the Ray cluster has 3 nodes" in out and "s3://" in out
    assert "ray.shared_storage=true" in out and "Traceback" not in out
    assert not local.exists()  # nothing written: not even the run's lease
    prefix = f"{s3[0]}/unplaceable-{uuid.uuid4().hex[:6]}"
    proc = _submit(cluster, f"storage={prefix}", "views.patch.scaling.label_selector={node: c}")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    assert "views.patch.scaling.label_selector={'node': 'c'} selects no node of the Ray cluster" in out, out[-4000:]
    assert re.search(r"labels node=a\b", out) and re.search(r"labels node=b\b", out)  # what there is instead
    assert not _fs().exists(prefix[len("s3://"):])


def _driver(cluster, stage: str, storage: str, *extra) -> tuple:
    """A driver of one stage run on this machine and joined to the cluster (``RAY_ADDRESS``), as a
    user's terminal runs it; its storage a local path every node shares (``ray.shared_storage``).
    (command, environment)."""
    return ([PY, "-m", f"ray_jobs.{stage}", "--config", "configs/quickstart.yaml", f"storage={storage}", *OVERRIDES,
             "ray.shared_storage=true", *extra], dict(cluster.env, RAY_ADDRESS=cluster.gcs))


def test_two_submissions_at_once_exactly_one_runs(cluster, tmp_path):
    """Two ingest drivers of the same run started together: one takes the lease and ingests, the
    other fails at once naming the first (pid, Ray job submission id) and touches nothing."""
    root, procs = tmp_path / "quickstart", []
    for i in range(2):
        cmd, env = _driver(cluster, "ingest", str(tmp_path))
        job = json.dumps({"runtime_env": {}, "metadata": {"job_submission_id": f"raysubmit_fault{i}"}})
        procs.append(subprocess.Popen(cmd, env=dict(env, RAY_JOB_CONFIG_JSON_ENV_VAR=job), cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=170)[0] for p in procs]
    rcs = [p.returncode for p in procs]
    assert sorted(rcs) == [0, 75], (rcs, [o[-3000:] for o in outs])
    win, lose = (0, 1) if rcs[0] == 0 else (1, 0)
    msg = outs[lose]
    assert f"pid {procs[win].pid}" in msg and f"raysubmit_fault{win}" in msg and "ray_jobs.ingest" in msg, msg
    assert "ingested" in outs[win] and "ingested" not in msg
    assert (root / "data" / "manifest.json").exists()
    assert not (root / "lease.json").exists()  # released by the winner


def test_sigint_during_sweep_resumes_only_unfinished_trials(cluster, submitted, tmp_path):
    """SIGINT to the sweep driver (on the pipeline test's data and view models) after one of two
    residual trials finished: exit 130 naming the sweep, no sweep.json; the same command then
    restores Tune's experiment, runs only the unfinished trial, and writes what an uninterrupted
    sweep writes (both trials complete, the finished one's row as it was, the best trial the one
    of the lowest validation G)."""
    storage = str(tmp_path / "storage")
    root = os.path.join(storage, "quickstart")
    if not _reuse(submitted, storage, models=("patch", "low")):
        for stage in ("ingest", "train_views"):
            cmd, env = _driver(cluster, stage, storage)
            proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    sweep_root = os.path.join(root, "sweep")
    cmd, env = _driver(cluster, "sweep_residual", storage, "sweep.mu_var=[0.0,1.0]", "sweep.mu_l1=[0.0]",
                       "sweep.baseline_full_res=false", "sweep.max_concurrent=1", "sweep.asha.enabled=false")
    env["TUNE_GLOBAL_CHECKPOINT_S"] = "1"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline, finished = time.time() + 300, None
        while time.time() < deadline and finished is None and first.poll() is None:
            time.sleep(0.5)
            finished = terminated_trial(os.path.join(sweep_root, "tune"))
        assert finished is not None, open(tmp_path / "first.log").read()[-4000:]
        first.send_signal(signal.SIGINT)  # what Ctrl-C sends the driver
        first.wait(timeout=120)
    out = open(tmp_path / "first.log").read()
    assert first.returncode == 130, out[-4000:]
    assert "INTERRUPTED (SIGINT)" in out and "the sweep (1 of 2 trials unfinished" in out, out[-4000:]
    assert not os.path.exists(os.path.join(sweep_root, "sweep.json"))
    reported = [json.loads(line) for line in open(glob.glob(os.path.join(sweep_root, "tune", f"trial-{finished}",
                                                                          "result.json"))[0])]
    assert not any("test_G" in r for r in reported)  # validation and training G only: test G once, at the end
    before = reported[-1]

    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "restoring interrupted sweep" in out and "sweep already complete" not in out
    sweep = json.load(open(os.path.join(sweep_root, "sweep.json")))
    rows = {t["trial_id"]: t for t in sweep["trials"]}
    assert sorted(rows) == ["residual-mv0-ml0-ra1", "residual-mv1-ml0-ra1"]
    assert {t["status"] for t in rows.values()} == {"complete"} and all(t["checkpoint"] for t in rows.values())
    # the finished trial's row is as it was: its last step, and the checkpoint of its lowest validation G
    assert rows[finished]["step"] == before["step"] and rows[finished]["val_G"] == chosen_report(reported)["val_G"]
    assert all(math.isfinite(t["test_G"]) for t in rows.values())  # each at its chosen checkpoint
    assert rows[sweep["best"]]["val_G"] == min(t["val_G"] for t in rows.values())  # chosen on validation G
    starts = [os.path.basename(p).split(".")[0] for p in glob.glob(os.path.join(sweep_root, "events", "*.start"))]
    assert starts.count(finished) == 1, starts  # the finished trial never ran again
    other = next(t for t in rows if t != finished)
    assert 1 <= starts.count(other) <= 2, starts


def test_worker_nodes_lost_mid_stage_one_and_mid_sweep_resume_on_the_nodes_left(cluster, s3, submitted):
    """With the pipeline test's patch view reused, SIGKILL the raylet of the node training the
    low-res view once its run has a registered
    checkpoint: Train's worker group fails, `fit_retrying` starts it again on a node left from
    that checkpoint (or a later one). A fresh node d joins meanwhile; the raylet of the node running the
    residual trial is killed in turn once the trial has a checkpoint: the trial (its Train workers,
    and its Tune driver if it was there) resumes from that checkpoint on a node left, and the
    pipeline finishes with the trial complete. Runs after the tests that need both a and b."""

    storage = f"{s3[0]}/nodeloss"
    reused = _reuse(submitted, storage, models=("patch",))  # stage 1 trains the low-res view alone
    views = ["views.low.train.total_kimg=1.28", "views.low.train.checkpoint_every_kimg=0.32",
             "sweep.mu_var=[0.0]", "sweep.baseline_full_res=false",
             "residual.train.total_kimg=0.96", "residual.train.checkpoint_every_kimg=0.24"]
    since = time.time_ns()
    sub_id = _submission_id(_submit(cluster, f"storage={storage}", *views, wait=False))
    fs, root = _fs(), storage[len("s3://"):] + "/quickstart"
    deadline = time.time() + 900
    lost, at_step, _ = cluster.kill_after_checkpoint(fs, f"{root}/views/view-low/checkpoint_manager_snapshot.json",
                                                     "view-low", deadline, since)
    left = "b" if lost == "a" else "a"
    cluster.add_node("d", {"cpus": 2})  # the sweep gets two nodes again
    lost2, trial_step, trial_run = cluster.kill_after_checkpoint(
        fs, f"{root}/sweep/runs/trial-residual-*/checkpoint_manager_snapshot.json", "trial-residual", deadline, since)
    status, logs = cluster.wait_job(sub_id, timeout=max(deadline - time.time(), 60))
    assert status == "SUCCEEDED", logs[-6000:]
    assert not reused or ("data already ingested" in logs and "view 'patch': already exported" in logs)
    assert "view 'low': worker failure 1 of at most 2, retrying from the latest checkpoint" in logs, logs[-6000:]
    resumed = [int(s) for s in re.findall(r"resuming from step (\d+) \(\S*view-low", logs)]
    assert resumed and resumed[-1] >= at_step, (resumed, at_step)  # at most one checkpoint interval redone
    runs = cluster.train_runs()
    last = max((r for r in runs if r["name"] == "view-low"), key=lambda r: r["start_time_ns"])
    ids = {v: k for k, v in cluster.node_ids(alive=False).items()}
    # on a node left: the other one, or d if it had joined by the retry
    assert {ids.get(w["node_id"]) for a in last["attempts"] for w in a["workers"]} <= {left, "d"}
    info = json.loads(fs.cat(f"{root}/views/view-low.json"))
    assert info["metrics"]["step"] == 20  # 1.28 kimg / 64 per step, all of it trained
    # the sweep: the residual trial resumed from its checkpoint on a node left, and completed
    label = trial_run[len("trial-"):]
    resumed = [int(s) for s in re.findall(rf"resuming from step (\d+) \(\S*{trial_run}/", logs)]
    assert resumed and resumed[-1] >= trial_step, (resumed, trial_step, logs[-6000:])
    last = max((r for r in runs if r["name"] == trial_run), key=lambda r: r["start_time_ns"])
    assert lost2 not in {ids.get(w["node_id"]) for a in last["attempts"] for w in a["workers"]}
    sweep = json.loads(fs.cat(f"{root}/sweep/sweep.json"))
    trial = next(t for t in sweep["trials"] if t["trial_id"] == label)
    assert trial["status"] == "complete" and sweep["best"] == label, sweep["trials"]
    assert fs.exists(f"{root}/sweep/report/report.html")


def test_node_lost_with_no_other_node_for_its_run_fails_naming_what_is_missing(cluster, s3, submitted):
    """The low-res view may run only on node c (its label selector); c is lost after the view's first
    checkpoint. No node left can take the retry, so the job fails — within a worker-group start
    timeout, not a hang — with the project's message naming the key and the nodes there are."""
    cluster.add_node("c", {"cpus": 1})
    storage = f"{s3[0]}/nodeless"
    _reuse(submitted, storage, models=("patch",))
    views = ["ray.worker_start_timeout_s=20", "views.low.scaling.label_selector={node: c}", "views.low.train.total_kimg=1.28",
             "views.low.train.checkpoint_every_kimg=0.32"]
    sub_id = _submission_id(_submit(cluster, f"storage={storage}", *views, wait=False))
    fs = _fs()
    snapshot = f"{storage[len('s3://'):]}/quickstart/views/view-low/checkpoint_manager_snapshot.json"
    deadline = time.time() + 600
    while time.time() < deadline and not fs.exists(snapshot):
        fs.invalidate_cache()
        time.sleep(0.5)
    assert fs.exists(snapshot), "the low-res view never registered a checkpoint"
    cluster.kill_node("c")
    lost_at = time.time()
    status, logs = cluster.wait_job(sub_id, timeout=300)
    failed_after = time.time() - lost_at
    assert status == "FAILED", (status, logs[-6000:])
    assert failed_after < 150, failed_after  # a start timeout of 20 s (ray.worker_start_timeout_s) at most
    msg = "ERROR: views.low: no live node of the Ray cluster can run it any more (a node was lost?): " \
          "views.low.scaling.label_selector={'node': 'c'} selects no node of the Ray cluster"
    assert msg in logs, logs[-6000:]
    assert re.search(r"labels node=[abd]\b", logs)  # the nodes left (which of a, b, d: the test before decides)
