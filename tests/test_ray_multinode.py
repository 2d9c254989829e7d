"""Past one machine: the job-submitted pipeline on a three-node Ray cluster simulated on this
machine (tests/multinode.py: a head that takes no work and worker nodes ``a`` and ``b``, each its own
``ray start`` with its own temp dir and working directory), with moto's S3 server as the only
storage. Each view's Train run lands on the node its label selector names and the sweep's trials
use both nodes (Ray Train's state API); a local storage path and a placement no node can take fail
at load, naming the key, before anything is written; a worker node lost mid-stage-1 costs at most
one checkpoint interval and the run finishes on the node left."""

import json
import os
import re
import subprocess
import time
import uuid

import pytest

from multinode import RAY, PY, LocalCluster
from test_ray_pipeline import REPO, TINY

pytestmark = pytest.mark.ray

# The tiny quickstart without its peer, distillation or combined baseline: this file is about nodes.
OVERRIDES = [*TINY, "sweep.baseline_combined=false", "ray.max_failures=2"]


@pytest.fixture(scope="module")
def cluster(s3, mnist_wheel):
    """Head (0 CPUs) + nodes a and b (2 CPUs each); they inherit the moto endpoint and test keys."""
    c = LocalCluster({"a": {"cpus": 2}, "b": {"cpus": 2}}).start()
    try:
        yield c
    finally:
        c.stop()


def _submit(cluster, *overrides, wait=True):
    """``ray job submit`` of the pipeline from the repository (its own working directory), with the
    moto endpoint in the job's env (it is not a secret; the keys come from the nodes' env)."""
    cmd = [RAY, "job", "submit", "--address", cluster.address, "--working-dir", ".",
           *([] if wait else ["--no-wait"]), "--", PY, "-m", "ray_jobs.pipeline",
           "--config", "configs/quickstart.yaml", *OVERRIDES, *overrides]
    for _ in range(20):  # a just-started head's job agent may not be up yet
        proc = subprocess.run(cmd, env=dict(cluster.env, AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"]),
                              cwd=REPO, capture_output=True, text=True, timeout=1500)
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            return proc
        time.sleep(3)
    return proc


def _fs():
    import fsspec

    fs = fsspec.filesystem("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    fs.invalidate_cache()
    return fs


def test_pipeline_on_three_nodes_with_views_placed_and_storage_on_s3(cluster, s3):
    storage = f"{s3[0]}/multinode"
    proc = _submit(cluster, f"storage={storage}", "views.patch.scaling.label_selector={node: a}",
                   "views.low.scaling.label_selector={node: b}", "views.low.scaling.num_workers=2")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in out, out[-6000:]
    runs = cluster.train_runs()
    # each view's workers on the node its label selector names, from Ray Train's state API
    assert cluster.nodes_of(runs, "view-patch") == {"a"}, runs
    assert cluster.nodes_of(runs, "view-low") == {"b"}, runs
    low = [r for r in runs if r["name"] == "view-low"][-1]
    assert len(low["attempts"][-1]["workers"]) == 2  # the low-res view data-parallel (DDP) over node b
    # the sweep's three Train trials (full-res baseline, two residual settings) used both nodes
    trial_nodes = set().union(*[cluster.nodes_of(runs, r["name"]) for r in runs if r["name"].startswith("trial-")])
    assert trial_nodes == {"a", "b"}, [(r["name"], cluster.nodes_of(runs, r["name"])) for r in runs]
    # everything on S3: the nodes' own working directories hold nothing of the run
    fs, root = _fs(), storage[len("s3://"):] + "/quickstart"
    sweep = json.loads(fs.cat(f"{root}/sweep/sweep.json"))
    assert {t["kind"] for t in sweep["trials"]} == {"full_res", "residual"} and sweep["best"]
    assert "data:image/png;base64," in fs.cat(f"{root}/sweep/report/report.html").decode()
    run = json.loads(fs.cat(f"{root}/views/view-low.json"))  # 2 ranks × 64 per step: 0.32 kimg = 3 steps
    assert run["metrics"]["step"] == 3 and abs(run["metrics"]["kimg"] - 0.384) < 1e-6
    files = fs.find(root)
    assert f"{root}/data/manifest.json" in files and any(f.startswith(f"{root}/data/low/") for f in files)
    assert any("/views/view-low/" in f and f.endswith("state.pt") for f in files)  # Train's checkpoints
    assert any("/sweep/runs/" in f and f.endswith("state.pt") for f in files)
    for name in ("head", "a", "b"):
        assert not os.listdir(os.path.join(cluster.root, name, "work")), name


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


def test_worker_nodes_lost_mid_stage_one_and_mid_sweep_resume_on_the_nodes_left(cluster, s3):
    """SIGKILL the raylet of the node training the low-res view once its run has a registered
    checkpoint: Train's worker group fails, `fit_retrying` starts it again on a node left from
    that checkpoint (or a later one). A fresh node d joins meanwhile; the raylet of the node running the
    residual trial is killed in turn once the trial has a checkpoint: the trial (its Train workers,
    and its Tune driver if it was there) resumes from that checkpoint on a node left, and the
    pipeline finishes with the trial complete. Runs after the tests that need both a and b."""

    storage = f"{s3[0]}/nodeloss"
    views = ["views.patch.train.total_kimg=1.28", "views.low.train.total_kimg=1.28",
             "views.patch.train.checkpoint_every_kimg=0.32", "views.low.train.checkpoint_every_kimg=0.32",
             "sweep.mu_var=[0.0]", "sweep.baseline_full_res=false",
             "residual.train.total_kimg=0.96", "residual.train.checkpoint_every_kimg=0.24"]
    since = time.time_ns()
    proc = _submit(cluster, f"storage={storage}", *views, wait=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Job '" in out, out[-4000:]
    sub_id = out.split("Job '")[1].split("'")[0]
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


def test_node_lost_with_no_other_node_for_its_run_fails_naming_what_is_missing(cluster, s3):
    """The low-res view may run only on node c (its label selector); c is lost after the view's first
    checkpoint. No node left can take the retry, so the job fails — within a worker-group start
    timeout, not a hang — with the project's message naming the key and the nodes there are."""
    cluster.add_node("c", {"cpus": 1})
    storage = f"{s3[0]}/nodeless"
    views = ["ray.worker_start_timeout_s=20", "views.low.scaling.label_selector={node: c}", "views.low.train.total_kimg=1.28",
             "views.low.train.checkpoint_every_kimg=0.32"]
    proc = _submit(cluster, f"storage={storage}", *views, wait=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Job '" in out, out[-4000:]
    sub_id = out.split("Job '")[1].split("'")[0]
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
