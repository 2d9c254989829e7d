"""Faults on the three-node Ray cluster the Ray tests share (tests/raycluster.py), after
tests/test_ray_multinode.py's pipeline (its data and view models are reused where a test's would
be the same: `raycluster.reuse`), nodes are lost: a worker node lost mid-stage-1 or mid-sweep
costs at most one checkpoint interval and the run finishes on the nodes left; a run with no node
left for it fails naming what is missing. (Two submissions of one run at once:
tests/test_ray_lease.py, on the local Ray.) This module uses the cluster last and stops it when done."""

import glob
import json
import os
import re
import time

import pytest

from raycluster import reuse, s3fs, submission_id, submit

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module", autouse=True)
def _stop_cluster_after(cluster):
    """The shared cluster's last user (its tests lose nodes): stop it when this module is done,
    not at the end of the session, so no cluster idles beside the tests after it."""
    yield
    cluster.stop()


def test_worker_nodes_lost_mid_stage_one_and_mid_sweep_resume_on_the_nodes_left(cluster, s3, submitted):
    """With the pipeline test's patch view reused, SIGKILL the raylet of the node training the
    low-res view once its run has a registered checkpoint (each run's rank 0 waits there on its
    first attempt, `ray.inject_pause_s`, so the loss lands mid-run however fast the machine
    trains: before, an idle machine finished the view first): Train's worker group fails, `fit_retrying` starts it again on a node left from
    that checkpoint (or a later one). A fresh node d joins meanwhile; the raylet of the node running the
    residual trial is killed in turn once the trial has a checkpoint: the trial (its Train workers,
    and its Tune driver if it was there) resumes from that checkpoint on a node left, and the
    pipeline finishes with the trial complete, the killed workers' local run dirs removed by the
    workers after them. Runs after the tests that need both a and b."""

    storage = f"{s3[0]}/nodeloss"
    reused = reuse(submitted, storage, models=("patch",))  # stage 1 trains the low-res view alone
    views = ["views.low.train.total_kimg=0.64", "views.low.train.checkpoint_every_kimg=0.32", "ray.inject_pause_s=60",
             "sweep.mu_var=[0.0]", "sweep.baseline_full_res=false",
             "residual.train.total_kimg=0.48", "residual.train.checkpoint_every_kimg=0.24"]
    since = time.time_ns()
    sub_id = submission_id(submit(cluster, f"storage={storage}", *views, wait=False))
    fs, root = s3fs(), storage[len("s3://"):] + "/quickstart"
    deadline = time.time() + 900
    lost, at_step, _, scratch = cluster.kill_after_checkpoint(
        fs, f"{root}/views/view-low/checkpoint_manager_snapshot.json", "view-low", deadline, since)
    left = "b" if lost == "a" else "a"
    cluster.add_node("d", {"cpus": 2})  # the sweep gets two nodes again
    lost2, trial_step, trial_run, scratch2 = cluster.kill_after_checkpoint(
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
    assert info["metrics"]["step"] == 10  # 0.64 kimg / 64 per step, all of it trained
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
    # the killed workers' local run dirs (a checkpoint each) and TensorBoard folders were removed by
    # the workers after them (bootdiff.run.scratch)
    # (the nodes' temp folder is the cluster's own, `LocalCluster.tmp`: the killed runs' folders
    # were there at the kills, and the other tests' runs on this machine leave nothing there)
    assert scratch and scratch2, (scratch, scratch2)
    left = [p for kind in ("bootdiff-run-*", "bootdiff-tb-*") for p in glob.glob(os.path.join(cluster.tmp, kind))]
    assert not left, left


def test_node_lost_with_no_other_node_for_its_run_fails_naming_what_is_missing(cluster, s3, submitted):
    """The low-res view may run only on node c (its label selector); c is lost after the view's first
    checkpoint (where its rank 0 waits, `ray.inject_pause_s`). No node left can take the retry, so the job fails — within a worker-group start
    timeout, not a hang — with the project's message naming the key and the nodes there are."""
    cluster.add_node("c", {"cpus": 1})
    storage = f"{s3[0]}/nodeless"
    reuse(submitted, storage, models=("patch",))
    views = ["ray.worker_start_timeout_s=20", "views.low.scaling.label_selector={node: c}", "views.low.train.total_kimg=0.64",
             "views.low.train.checkpoint_every_kimg=0.32", "ray.inject_pause_s=60"]
    sub_id = submission_id(submit(cluster, f"storage={storage}", *views, wait=False))
    fs = s3fs()
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
