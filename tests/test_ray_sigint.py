"""Ctrl-C during the sweep, and the same command resumes it: SIGINT to the sweep's driver (a
terminal's ``python -m ray_jobs.sweep_residual`` joined to a running Ray cluster, ``RAY_ADDRESS``)
after one of two residual trials finished exits 130 naming the sweep and records nothing as done;
the same command restores Tune's experiment and runs only the unfinished trial. On the local Ray
cluster the `local_ray` tests share (one node: where the driver's Tune loop and the trials' actors
run does not change what an interrupt does); the data ingested and the view models trained
in this process, as the stages' tasks and Train workers do."""

import glob
import json
import math
import os
import signal
import subprocess
import time

import pytest

from bootdiff import experiment
from bootdiff.config import load_config, to_object
from bootdiff.data.ingest import ingest
from bootdiff.sweep import chosen_report
from bootdiff.train import train
from raycluster import OVERRIDES, stage_command
from rayhead import REPO, terminated_trial

pytestmark = pytest.mark.ray


def test_sigint_during_sweep_resumes_only_unfinished_trials(local_ray, mnist_wheel, tmp_path):
    """SIGINT to the sweep driver after one of two residual trials finished: exit 130 naming the
    sweep, no sweep.json; the same command then restores Tune's experiment, runs only the
    unfinished trial, and writes what an uninterrupted sweep writes (both trials complete, the
    finished one's row as it was, the best trial the one of the lowest validation G)."""
    storage = str(tmp_path / "storage")
    root = os.path.join(storage, "quickstart")
    cfg = to_object(load_config(os.path.join(REPO, "configs", "quickstart.yaml"), [f"storage={storage}", *OVERRIDES]))
    manifest = ingest(cfg, progress=False)
    for v, vcfg in cfg.views.items():  # stage 1 as each view's Train worker runs it, without Ray's start-ups
        model, loss, data = experiment.view_training(cfg, manifest, v, vcfg)
        res = train(model, loss, data, vcfg.train, run_dir=str(tmp_path / "runs" / v))
        experiment.export_result(cfg, v, res.checkpoint_url)
    sweep_root = os.path.join(root, "sweep")
    # the sweep's driver as a terminal joined to the running cluster starts it (``RAY_ADDRESS``)
    cmd = stage_command("sweep_residual", storage, "sweep.mu_var=[0.0,1.0]", "sweep.mu_l1=[0.0]",
                        "sweep.baseline_full_res=false", "sweep.max_concurrent=1", "sweep.asha.enabled=false")
    env = dict(os.environ, RAY_ADDRESS=local_ray.get_runtime_context().gcs_address, PYTHONUNBUFFERED="1",
               TUNE_GLOBAL_CHECKPOINT_S="1")
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
