"""DataLoader workers inside a Ray Train worker, and reports passed on to Ray by time.

One local Ray cluster (``ray.init``), one TorchTrainer with one worker that trains a view model
from shards with ``train.num_workers=2``: the DataLoader's workers must start with forkserver
(forking a Ray worker can deadlock, docs/RAY.md §8), training must finish, and only checkpoint
reports and reports ``report_every_s`` apart reach ``ray.train.report`` (docs/RAY.md §3)."""

import json
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch

from bootdiff.config import load_config, to_object, to_yaml
from bootdiff.data.ingest import ingest

torch.set_num_threads(1)


def loop(config: dict) -> None:
    """Ray Train worker: the real view training, data wrapped to see the DataLoader's workers."""
    import multiprocessing

    import ray.train

    from bootdiff import experiment
    from bootdiff.train import train
    from ray_jobs import common

    cfg = common.cfg_from_yaml(config["cfg_yaml"])
    vcfg = cfg.views["patch"]
    torch.set_num_threads(1)
    manifest = experiment.read_manifest(cfg)
    model, loss, data = experiment.view_training(cfg, manifest, "patch", vcfg, 0, 1)
    kinds, batches = set(), [0]

    def watched(start_step):
        for x in data(start_step):
            kinds.update(type(p).__name__ for p in multiprocessing.active_children())
            batches[0] += 1
            yield x

    hooks = common.RayReportHooks({"view": "patch"}, report_every_s=vcfg.train.report_every_s)
    calls = []
    real = hooks.report_to_ray
    hooks.report_to_ray = lambda m, url: (calls.append(m["step"]), real(m, url))
    run_dir = tempfile.mkdtemp(prefix="raylo-")
    try:
        res = train(model, loss, watched, vcfg.train, run_dir=run_dir, hooks=hooks, device="cpu")
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    if ray.train.get_context().get_world_rank() == 0:
        with open(config["out"], "w") as f:
            json.dump({"kinds": sorted(kinds), "batches": batches[0], "steps": res.step, "loss": res.loss,
                       "hook_calls": len(calls), "ray_reports": hooks.ray_reports, "nice": os.nice(0)}, f)


def test_dataloader_workers_under_ray_train_start_with_forkserver(local_ray, mnist_wheel, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # 80 steps of batch 8 at ~10 ms: reports to the hooks every 2 steps, to Ray every 2 s.
    cfg = to_object(load_config(None, [
        f"storage={tmp_path / 'storage'}", "name=rl", "data.source.kind=mnist", f"data.source.path={mnist_wheel}",
        "data.source.limit=300", "data.resolution=16", "data.num_full=16", "data.num_test=16", "data.num_val=8",
        "data.shard_size=100", "views.patch.kind=patch", "views.patch.patch_size=8",
        "views.patch.per_sample=2", "views.patch.net.channels=[8]", "views.patch.net.attention=[false]",
        "views.patch.net.norm_groups=4", "views.patch.train.batch_size=8", "views.patch.train.total_kimg=0.64",
        "views.patch.train.checkpoint_every_kimg=0.32", "views.patch.train.report_every=2",
        "views.patch.train.report_every_s=2", "views.patch.train.num_workers=2",
        "views.low.kind=downsample", "views.low.factor=2"]))
    manifest = ingest(cfg, progress=False)
    assert len(manifest["splits"]["patch"]["shards"]) >= 2  # both loader workers get shards
    out = tmp_path / "worker.json"
    trainer = TorchTrainer(loop, train_loop_config={"cfg_yaml": to_yaml(cfg), "out": str(out)},
                           scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name="rl", storage_path=str(tmp_path / "ray")))
    result = trainer.fit()
    assert result.error is None
    rec = json.loads(out.read_text())
    assert rec["kinds"] == ["ForkServerProcess"], rec  # not ForkProcess
    # the Train worker runs at this process's priority (tests/conftest.py), not at Ray's nice 15
    assert rec["nice"] == os.nice(0), rec
    assert rec["steps"] == 80 and rec["batches"] == 80 and np.isfinite(rec["loss"])
    assert rec["hook_calls"] == 40  # every 2 steps (checkpoints at 40 and 80 fall on them)
    # Ray gets the two checkpoint reports plus at most one per 2 s of training in between.
    assert 2 <= rec["ray_reports"] < rec["hook_calls"]
    assert result.checkpoint is not None and result.metrics["step"] == 80


def test_ray_report_due_by_time_or_checkpoint(monkeypatch):
    from ray_jobs import common

    hooks = common.RayReportHooks({}, report_every_s=2.0)
    now = [1000.0]
    monkeypatch.setattr(common.time, "monotonic", lambda: now[0])
    hooks.last_ray_report = 1000.0
    assert not hooks.ray_report_due(None)
    assert hooks.ray_report_due("/tmp/checkpoint-00000010")  # checkpoints always go
    now[0] = 1001.9
    assert not hooks.ray_report_due(None)
    now[0] = 1002.0
    assert hooks.ray_report_due(None)


def test_drivers_printer_drops_rays_worker_pool_and_cleaner_lines_and_keeps_the_rest(capsys):
    """Ray's driver-side printer, as `entry.quiet_ray` wraps it: the raylet's worker-pool warning,
    the placement-group cleaner's line and the preemption watcher's C++ line are dropped; a
    worker's own lines, its errors and Ray's other warnings are printed as before (here through
    Ray's real printer)."""
    import ray._private.worker as ray_worker

    from ray_jobs.entry import drop_ray_lines

    printer = drop_ray_lines(ray_worker.print_to_stdstream)
    pool = ("WARNING: 8 PYTHON worker processes have been started on node: 876ab9 with address: 192.0.2.2, which "
            "is 4x the maximum expected startup concurrency (2). This could be a result of using a large number "
            "of actors, tasks blocked in ray.get() calls, or tasks with fractional CPU requests.")
    cleaner = ("Detected that the Ray Train controller actor (f33cafae8249d5a72a329e5701000000) is dead. Cleaning up "
               "placement group = [PlacementGroupID(a6401b250c8e1bbdc1fb69c62c8a01000000)] created by this run.")
    watcher = ("[2026-12-06 18:13:24,693 E 14413 14485] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
               "and ID: '565b045b97c0e47f0638e7f902000000' has constructor arguments in the object store and "
               "max_restarts > 0")  # as a job's log showed it (the rest of the line cut)
    printer({"lines": [pool], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    printer({"lines": [watcher], "pid": 14413, "actor_name": "TrainController", "is_err": True, "ip": "192.0.2.2"},
            ignore_prefix=False)
    printer({"lines": [cleaner, "[bootdiff] step 4 kimg 0.256"], "pid": 31827, "actor_name": "PlacementGroupCleaner",
             "is_err": False, "ip": "192.0.2.2"}, ignore_prefix=False)
    printer({"lines": ["RuntimeError: injected failure at step 4"], "pid": 9, "is_err": True, "ip": "192.0.2.2",
             "task_name": "fit_view"}, ignore_prefix=False)
    printer({"lines": ["WARNING: the object store is full"], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    out = capsys.readouterr()
    assert "worker processes have been started" not in out.out + out.err
    assert "Detected that the Ray Train controller" not in out.out + out.err
    assert "PreemptionWatcher" not in out.out + out.err  # on a cluster the driver joins (docs/RAY.md §4)
    assert "[bootdiff] step 4 kimg 0.256" in out.out and "injected failure at step 4" in out.err
    assert "the object store is full" in out.out


def test_token_auth_notice_is_the_drivers_own_line_and_the_disabled_warning_stays(monkeypatch):
    """Ray's "Token authentication is enabled" notice at a local ``ray.init`` (through Ray's own
    function) is dropped once `entry.quiet_ray` ran; its warning that a cluster has no token auth
    is kept; the driver's dashboard line says where the token is instead (`entry.token_hint`)."""
    import logging

    from ray._private.authentication import authentication_token_setup as setup

    from ray_jobs.entry import quiet_ray, token_hint

    monkeypatch.setattr(os, "environ", dict(os.environ))  # quiet_ray sets PYTHONWARNINGS and Train's watcher
    monkeypatch.setattr(setup.logger, "filters", list(setup.logger.filters))
    quiet_ray(local=True)
    quiet_ray(local=True)  # a second call adds nothing
    assert len(setup.logger.filters) == 1
    records = []  # a handler on Ray's logger itself: Ray's "ray" logger does not propagate to pytest's
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    setup.logger.addHandler(handler)
    try:
        setup._warn_token_auth_enabled()
        setup._warn_token_auth_disabled()
    finally:
        setup.logger.removeHandler(handler)
    assert [r.getMessage()[:40] for r in records] == ["Token authentication is disabled for thi"]

    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    assert token_hint() == ""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert token_hint() == (" (token auth: the dashboard asks for the token in ~/.ray/auth_token; "
                            "`ray get-auth-token` prints it)")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/etc/ray/token")
    assert "in /etc/ray/token;" in token_hint()
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    assert "$RAY_AUTH_TOKEN" in token_hint() and "abc" not in token_hint()


def test_time_breakdown_reads_the_stage_records(tmp_path, capsys):
    from bootdiff.run.layout import RunLayout
    from ray_jobs import common
    from ray_jobs.pipeline import time_breakdown

    cfg = to_object(load_config("configs/quickstart.yaml", [f"storage={tmp_path}"]))
    layout = RunLayout.of(cfg)
    t0 = 1_000.0
    common.write_json(layout.view_run_info("patch"), {"start": t0 + 10, "end": t0 + 70, "metrics": {
        "worker_start_time": t0 + 25, "report_time": t0 + 60, "kimg": 6}})
    label = "residual-mv0-ml0-ra1"
    common.write_json(layout.trial_start_event(label, 5), {"trial": {"label": label}, "time": t0 + 80})
    rows = [{"worker_start_time": t0 + 95, "report_time": t0 + 100, "kimg": 0.5},
            {"worker_start_time": t0 + 95, "report_time": t0 + 110, "kimg": 1, "eval_s": 3.0},
            {"worker_start_time": t0 + 95, "report_time": t0 + 120, "kimg": 2, "eval_s": 4.0}]
    res = os.path.join(layout.tune, f"trial-{label}", "result.json")
    os.makedirs(os.path.dirname(res))
    with open(res, "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    out = time_breakdown(cfg, t0, {"ingest": 5.0, "train_views": 60.0})
    v = out["views"]["patch"]
    assert (v["startup_s"], v["train_s"], v["wrapup_s"], v["total_s"]) == (15, 35, 10, 60)
    t = out["trials"][label]
    assert (t["startup_s"], t["train_s"], t["eval_s"], t["evals"], t["total_s"], t["kimg"]) == (15, 25, 7, 2, 40, 2)
    assert "view low" not in capsys.readouterr().out  # no record, no row
    assert json.loads(open(os.path.join(layout.root, "timings.json")).read())["trials"][label]["evals"] == 2
