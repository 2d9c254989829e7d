"""Ray: credentials stay out of Ray's job records, deterministic failures (a non-finite loss, a
corrupt shard) are not retried (a Train worker that dies is: the nodes lost in
tests/test_ray_multinode.py take their workers with them, and each run resumes from its
checkpoint through the same `fit_retrying`). One head started with `ray start --head`
whose environment holds fake AWS keys (the way cluster/README.md tells users to give a cluster its
credentials) and a CPU for each of the module's three jobs, which go in at once with
`ray job submit` and each train one tiny view (`ray_jobs.train_views`) on data ingested beforehand."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
import uuid

import pytest

from bootdiff import util
from bootdiff.config import load_config, to_object, to_yaml
from bootdiff.data.ingest import ingest
from test_resume import Source  # random 16² images, in memory
from rayhead import PY, RAY, REPO, _env, _free_port, _ray_tmp, _stop, _submit

KEY_ID = "AKIAFAKE" + uuid.uuid4().hex[:12].upper()
SECRET = "fakeSecret" + uuid.uuid4().hex


def _config(tmp_path, storage, name, extra=()):
    """A one-view config file (8×8 low-res view of random 16² images), its data ingested."""
    cfg = to_object(load_config(None, [
        f"storage={storage}", f"name={name}", "data.resolution=16", "data.num_full=10", "data.num_test=10", "data.num_val=2",
        "data.shard_size=16", "views.low.kind=downsample", "views.low.factor=2",
        "views.low.net.channels=[8,8]", "views.low.net.attention=[false,false]", "views.low.net.norm_groups=4",
        "views.low.train.batch_size=8", "views.low.train.total_kimg=0.048",
        "views.low.train.checkpoint_every_kimg=0.016", "views.low.train.report_every=1",
        "views.low.train.warmup_kimg=0", "views.low.scaling.cpus_per_worker=1", "ray.max_failures=2", *extra]))
    ingest(cfg, progress=False, source=Source())
    path = os.path.join(str(tmp_path), f"{name}.yaml")
    with open(path, "w") as f:
        f.write(to_yaml(cfg))
    return cfg, path


def _cmd(head, config_path, *overrides):
    return [RAY, "job", "submit", "--address", head["address"], "--working-dir", ".", "--",
            PY, "-m", "ray_jobs.train_views", "--config", config_path, *overrides]


@pytest.fixture(scope="module")
def head(s3):
    """`ray start --head` with fake AWS keys (and the moto endpoint) in its env; the CLI's env
    holds no keys."""
    tmp = _ray_tmp()
    port, dash = _free_port(), _free_port()
    clean = {k: v for k, v in _env(tmp).items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    head_env = dict(clean, AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET)
    ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "ray-client-server-port",
        "runtime-env-agent-port", "metrics-export-port")]
    for _ in range(3):  # a loaded box can miss Ray's fixed 30 s raylet start-up wait, or lose the dashboard
        started = subprocess.run([RAY, "start", "--head", f"--port={port}", f"--dashboard-port={dash}",
                                  "--num-cpus=3", "--include-dashboard=true", "--disable-usage-stats", *ports],
                                 env=head_env, capture_output=True, text=True, cwd=REPO, timeout=180)
        if started.returncode == 0:
            break
        _stop(tmp, clean)
    try:
        assert started.returncode == 0, (started.stdout + started.stderr)[-4000:]
        yield {"env": clean, "address": f"http://127.0.0.1:{dash}", "tmp": tmp}
    finally:
        _stop(tmp, clean)
        shutil.rmtree(tmp, ignore_errors=True)


def _start_job(head, cmd, env=None) -> str:
    """Submit with ``--no-wait``; the job's submission id."""
    proc = _submit(cmd[:3] + ["--no-wait"] + cmd[3:], env or head["env"], timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Job '" in out, out[-4000:]
    return out.split("Job '")[1].split("'")[0]


def _wait_job(head, sub_id: str, timeout=600) -> tuple:
    """Poll the Jobs API until the job ends (the CLI's log tail can drop under load); (status, logs)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = json.loads(_jobs_api(head, f"/{sub_id}"))["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(1)
    return status, json.loads(_jobs_api(head, f"/{sub_id}/logs"))["logs"]


def _jobs_api(head, path: str = "") -> str:
    """The dashboard's Jobs API answer (``/api/jobs/``: submission and driver jobs), as text."""
    req = urllib.request.Request(head["address"] + "/api/jobs/" + path.lstrip("/"),
                                 headers={"Authorization": f"Bearer {head['env']['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read().decode()


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


@pytest.fixture(scope="module")
def jobs(head, s3, tmp_path_factory):
    """The module's three jobs, submitted at once (the head has a CPU for each) and waited for:
    ``sec`` trains on S3 with the head's keys; ``nan`` has a non-finite loss (lr=1e6); ``bad`` a
    corrupt shard. {name: (status, logs)}, and the S3 storage of ``sec``."""
    tmp = tmp_path_factory.mktemp("jobs")
    bucket, endpoint = s3
    storage = f"{bucket}/secrets"
    _, sec_path = _config(tmp, storage, "sec")
    _, nan_path = _config(tmp, str(tmp / "store"), "nan", ["views.low.train.lr=1e6"])
    _, bad_path = _config(tmp, str(tmp / "store"), "bad")
    shard = os.path.join(str(tmp / "store"), "bad", "data", "low", "low-000000.tar")
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    open(shard, "wb").write(bytes(data))
    ids = {"sec": _start_job(head, _cmd(head, sec_path, f"storage={storage}"),
                             dict(head["env"], AWS_ENDPOINT_URL=endpoint)),
           "nan": _start_job(head, _cmd(head, nan_path)), "bad": _start_job(head, _cmd(head, bad_path))}
    return {"storage": storage, **{name: _wait_job(head, i) for name, i in ids.items()}}


@pytest.mark.ray
def test_credentials_stay_out_of_job_records_and_workers_reach_s3(head, jobs):
    status, out = jobs["sec"]
    assert status == "SUCCEEDED", out[-6000:]

    # The workers reached S3 with the head's keys: the view's checkpoints and export are there.
    fs, root = util.url_fs(f"{jobs['storage']}/sec")
    names = fs.find(root)
    assert any(n.endswith("models/low/bootdiff.json") for n in names), names
    assert any("/views/view-low/checkpoint" in n for n in names), names

    needles = (SECRET, KEY_ID)
    records = _jobs_api(head)
    assert "raysubmit_" in records and not [n for n in needles if n in records]
    assert "step 6" in out and not [n for n in needles if n in out]  # the job's logs
    assert not _files_containing(os.path.join(head["tmp"], "ray"), needles)  # Ray's session dirs
    stored = [n for n in names if fs.isfile(n) and any(s.encode() in fs.cat(n) for s in needles)]
    assert not stored


@pytest.mark.ray
def test_deterministic_failures_fail_at_once_naming_their_cause(jobs):
    """A non-finite loss (lr=1e6) and a corrupt shard: each job fails after one attempt with its
    own error, not retried. The data error reaches the driver as itself (it pickles with its own
    arguments): before, Ray's controller got a TypeError from ChecksumError's constructor inside a
    system error, and every attempt was retried."""
    (status, out), (bad_status, bad_out) = jobs["nan"], jobs["bad"]
    assert status == "FAILED", out[-6000:]
    assert re.search(r"FloatingPointError: non-finite (loss|gradient norm) at step \d", out), out[-6000:]
    assert out.count("not retried") >= 1 and "worker failure 1" not in out
    assert "FailurePolicy] RETRY" not in out
    assert len(re.findall(r"step 1 +kimg", out)) == 1, out[-6000:]  # one attempt

    assert bad_status == "FAILED", bad_out[-6000:]
    assert re.search(r"ChecksumError: shard \S*low-000000\.tar checksum mismatch", bad_out), bad_out[-6000:]
    assert "not retried" in bad_out and "worker failure 1" not in bad_out, bad_out[-6000:]
    assert "missing 2 required positional arguments" not in bad_out
