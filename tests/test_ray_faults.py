"""Faults (issue 9): a sweep interrupted by SIGINT is not recorded as finished and, run again,
finishes only its unfinished trials; one submission of a run at a time (the run lease); the
sweep's statuses are distinct, and ASHA never stops a trial restored on partial rung data.

The Ray tests share one head (`head`, below) and one run's storage:
data ingested by the lease test, one view model (the quickstart without its patch view)."""

import glob
import json
import math
import os
import shutil
import signal
import subprocess
import time
from types import SimpleNamespace

import pytest
import yaml

from bootdiff.sweep import chosen_report
from rayhead import PY, RAY, REPO, TINY, _env, _free_port, _ray_tmp, _stop

OVERRIDES = [o for o in TINY if not o.startswith("views.patch")]


def start_head(tmp: str, tries: int = 3) -> dict:
    """`ray start --head` (2 CPUs, dashboard, free ports, token auth) with Ray's files under
    ``tmp``; retried because Ray gives a new node only 30 s to register, which a loaded machine can
    miss. Returns the environment for drivers (``RAY_ADDRESS`` set); stop with `_stop`."""
    env = _env(tmp)
    for attempt in range(tries):
        port = _free_port()
        ports = [f"--{n}={_free_port()}" for n in ("dashboard-port", "dashboard-agent-listen-port",
                                                   "dashboard-agent-grpc-port", "ray-client-server-port",
                                                   "runtime-env-agent-port", "metrics-export-port")]
        proc = subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
                               "--disable-usage-stats", *ports], env=env, capture_output=True, text=True, timeout=180)
        if proc.returncode == 0:
            return dict(env, RAY_ADDRESS=f"127.0.0.1:{port}")
        _stop(tmp, env)
    raise RuntimeError(f"ray start --head failed {tries} times: {proc.stderr[-2000:]}")


@pytest.fixture(scope="module")
def head():
    tmp = _ray_tmp()
    env = start_head(tmp)
    try:
        yield {"env": env}
    finally:
        _stop(tmp, env)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory, mnist_wheel):
    """Config (quickstart, low-res view only) and storage of the run the Ray tests share."""
    tmp = tmp_path_factory.mktemp("faults")
    cfg = yaml.safe_load(open(os.path.join(REPO, "configs", "quickstart.yaml")))
    del cfg["views"]["patch"]
    path = tmp / "faults.yaml"
    path.write_text(yaml.safe_dump(cfg))
    storage = str(tmp / "storage")
    return {"config": str(path), "storage": storage, "root": os.path.join(storage, "quickstart")}


def _cmd(run, stage, *extra):
    return [PY, "-m", f"ray_jobs.{stage}", "--config", run["config"], f"storage={run['storage']}",
            *OVERRIDES, *extra]


def _driver_env(head, **extra):
    return dict(head["env"], **extra)


def test_trial_statuses_distinct_and_asha_after_restore():
    """complete / stopped_early / interrupted / error are four statuses; a trial restored with
    results is never stopped by ASHA's emptied rungs, a trial started after the restore still is."""
    from ray.tune.schedulers import TrialScheduler

    from bootdiff.config import load_config, to_object
    from bootdiff.sweep import STATUSES, trial_status
    from ray_jobs.sweep_residual import RestoreSafeASHA

    cfg = to_object(load_config(os.path.join(REPO, "configs", "quickstart.yaml"), ["residual.train.total_kimg=2"]))
    res = {"kind": "residual"}
    got = [trial_status(cfg, res, {"kimg": 2.0}, None),
           trial_status(cfg, res, {"kimg": 1.0}, None),
           trial_status(cfg, res, {"kimg": 1.0}, None, finished=False),
           trial_status(cfg, res, {"kimg": 1.0}, RuntimeError("boom"), finished=False)]
    assert got == list(STATUSES) == ["complete", "stopped_early", "interrupted", "error"]

    def asha():
        return RestoreSafeASHA(time_attr="kimg", metric="val_G", mode="min", max_t=4, grace_period=1,
                               reduction_factor=2)

    def trial(tid, last=None, kind="residual"):
        return SimpleNamespace(trial_id=tid, last_result=last or {}, config={"trial": {"kind": kind}})

    # A fresh scheduler (as Tuner.restore builds it): trial "good" started after the restore and
    # reports a low G at kimg 1 and 2; trial "bad" reports a worse G at kimg 2.
    for restored, expect in ((False, TrialScheduler.STOP), (True, TrialScheduler.CONTINUE)):
        s = asha()
        good, bad = trial("good"), trial("bad", {"kimg": 1.0, "val_G": 0.9} if restored else None)
        s.on_trial_add(None, good)
        s.on_trial_add(None, bad)
        assert s.on_trial_result(None, good, {"kimg": 1.0, "val_G": 0.1}) == TrialScheduler.CONTINUE
        assert s.on_trial_result(None, good, {"kimg": 2.0, "val_G": 0.1}) == TrialScheduler.CONTINUE
        # "bad" resumes at kimg 2: plain ASHA judges it on the rungs "good" alone filled and stops it
        assert s.on_trial_result(None, bad, {"kimg": 2.0, "val_G": 0.9}) == expect, restored
    # ASHA still acts on trials that start after the restore.
    late = trial("late")
    s.on_trial_add(None, late)
    assert s.on_trial_result(None, late, {"kimg": 2.0, "val_G": 0.95}) == TrialScheduler.STOP
    # The baselines are never judged: a full-res baseline far worse than every residual trial at
    # the same kimg runs on, and its results do not enter the rungs (a later trial is not judged on them).
    s = asha()
    base, r1 = trial("full_res", kind="full_res"), trial("r1")
    s.on_trial_add(None, base)
    s.on_trial_add(None, r1)
    assert s.on_trial_result(None, r1, {"kimg": 2.0, "val_G": 0.1}) == TrialScheduler.CONTINUE
    assert s.on_trial_result(None, base, {"kimg": 2.0, "val_G": 5.0}) == TrialScheduler.CONTINUE
    s.on_trial_complete(None, base, {"kimg": 14.0, "val_G": 0.01})
    r2 = trial("r2")
    s.on_trial_add(None, r2)
    assert s.on_trial_result(None, r2, {"kimg": 2.0, "val_G": 0.5}) == TrialScheduler.STOP  # judged on r1 alone


@pytest.mark.ray
def test_two_submissions_at_once_exactly_one_runs(head, run):
    """Two ingest drivers of the same run started together: one takes the lease and ingests, the
    other fails at once naming the first (pid, Ray job submission id) and touches nothing."""
    procs = []
    for i in range(2):
        job = json.dumps({"runtime_env": {}, "metadata": {"job_submission_id": f"raysubmit_fault{i}"}})
        procs.append(subprocess.Popen(_cmd(run, "ingest"), env=_driver_env(head, RAY_JOB_CONFIG_JSON_ENV_VAR=job),
                                      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=170)[0] for p in procs]
    rcs = [p.returncode for p in procs]
    assert sorted(rcs) == [0, 75], (rcs, [o[-3000:] for o in outs])
    win, lose = (0, 1) if rcs[0] == 0 else (1, 0)
    msg = outs[lose]
    assert f"pid {procs[win].pid}" in msg and f"raysubmit_fault{win}" in msg and "ray_jobs.ingest" in msg, msg
    assert "ingested" in outs[win] and "ingested" not in msg
    assert os.path.exists(os.path.join(run["root"], "data", "manifest.json"))
    assert not os.path.exists(os.path.join(run["root"], "lease.json"))  # released by the winner


@pytest.mark.ray
def test_sigint_during_sweep_resumes_only_unfinished_trials(head, run, tmp_path):
    """SIGINT to the sweep driver after one of two trials finished: exit 130 naming the sweep, no
    sweep.json; the same command then restores Tune's experiment, runs only the unfinished trial,
    and writes what an uninterrupted sweep writes (both trials complete, the finished one's row
    as it was)."""
    env = _driver_env(head, TUNE_GLOBAL_CHECKPOINT_S="1")
    for stage in ("ingest", "train_views"):
        proc = subprocess.run(_cmd(run, stage), env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    sweep_root = os.path.join(run["root"], "sweep")
    cmd = _cmd(run, "sweep_residual", "sweep.mu_var=[0.0,1.0]", "sweep.mu_l1=[0.0]", "sweep.baseline_combined=false",
               "sweep.baseline_full_res=false", "sweep.max_concurrent=1", "sweep.asha.enabled=false")
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline, finished = time.time() + 300, None
        while time.time() < deadline and finished is None and first.poll() is None:
            time.sleep(0.5)
            finished = _terminated_trial(os.path.join(sweep_root, "tune"))
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
    starts = [os.path.basename(p).split(".")[0] for p in glob.glob(os.path.join(sweep_root, "events", "*.start"))]
    assert starts.count(finished) == 1, starts  # the finished trial never ran again
    other = next(t for t in rows if t != finished)
    assert 1 <= starts.count(other) <= 2, starts


def _terminated_trial(tune_dir: str):
    """Label of a trial that Tune's saved experiment state records as TERMINATED, if any."""
    for path in glob.glob(os.path.join(tune_dir, "experiment_state-*.json")):
        try:
            state = json.load(open(path))
        except ValueError:  # being rewritten
            continue
        for data, _ in state["trial_data"]:
            trial = json.loads(data)
            if trial["status"] == "TERMINATED":
                return trial["config"]["trial"]["label"]
    return None
