"""The three-node Ray cluster the Ray tests share (tests/conftest.py's session fixtures
``cluster`` and ``submitted``; tests/test_ray_multinode.py and tests/test_ray_multinode_faults.py
use it, the second last) and what they do with it: the tiny pipeline submitted with ``ray job
submit`` and every stage on (`run_pipeline`, `PIPELINE`), other jobs on the cluster (`job`,
`submit`), a stage's command (`stage_command`), the pipeline's data and view models copied for a
later test that would only make them again (`reuse`), and where secrets must not be
(`files_containing`). A
cluster simulated on this machine: a head that takes no work and worker nodes ``a`` and ``b``,
each its own ``ray start`` (tests/multinode.py), with moto's S3 server as the only storage."""

import os
import subprocess
import time
import uuid

from multinode import PY, RAY, LocalCluster
from rayhead import DISTILL, PATIENT, REPO, TINY


# The tiny quickstart without its peer, distillation or combined baseline, for the node tests.
OVERRIDES = [*TINY, "sweep.baseline_combined=false", "ray.max_failures=2"]


# Fake cloud keys of the cluster: only its nodes' `ray start` gets them (the way cluster/README.md
# tells users to give a cluster its credentials); the CLI and the drivers run without any.
KEY_ID = "AKIAFAKE" + uuid.uuid4().hex[:12].upper()
SECRET = "fakeSecret" + uuid.uuid4().hex


def start_cluster() -> LocalCluster:
    """Head (0 CPUs) + nodes a and b (2 CPUs each); they inherit the moto endpoint, and only they
    hold the cloud keys (`KEY_ID`, `SECRET`; moto takes any). The GCS checks each node's health
    every second instead of every 3 s, so a killed raylet is marked dead after its 5 failed checks
    in ≈ 5 s instead of ≈ 15 s (a slow but live node still needs 5 checks of 10 s each
    unanswered): the tests wait less for each lost node."""
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    return LocalCluster({"a": {"cpus": 2}, "b": {"cpus": 2}}, env=dict(env, RAY_health_check_period_ms="1000"),
                        node_env={"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}).start()


def job(cluster, module: str, config: str, *overrides, wait=True):
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


def submit(cluster, *overrides, wait=True):
    """``ray job submit`` of the pipeline (the tiny quickstart, `OVERRIDES`)."""
    return job(cluster, "ray_jobs.pipeline", "configs/quickstart.yaml", *OVERRIDES, *overrides, wait=wait)


def submission_id(proc) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Job '" in out, out[-4000:]
    return out.split("Job '")[1].split("'")[0]


def s3fs():
    import fsspec

    fs = fsspec.filesystem("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    fs.invalidate_cache()
    return fs


def reuse(submitted, storage: str, models=()) -> bool:
    """Copy the pipeline test's ingested data (the same ``data`` config) and the view models it
    exported (those named in ``models``: each model and its run record) under ``storage``
    (``s3://…`` or a local path), so a later test's pipeline finds them done and spends its time
    on what it tests; without them (the pipeline test failed) the test makes its own."""
    fs, src = s3fs(), submitted["key"]
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


# The pipeline test's run: the quickstart shrunk (TINY) with every stage on — the Ambient peer, the
# early-stopped baseline (PATIENT), distillation (DISTILL), the combined baseline — the patch view
# on node a, the low-res view data-parallel (DDP, 2 workers) on node b, its workers failing once at
# step >= 3 (the run restarts from its checkpoint; a run less restarted than "every view" is ≈ 25 s
# less here, and the node-loss tests restart a view and a trial), storage on S3 only. One
# residual setting of the quickstart's two: the choice among residual trials on validation G is the
# SIGINT test's sweep (two settings, on this cluster), and a Train run less is ≈ 30 s less here.
PIPELINE = ["sweep.baseline_combined=true", "ray.inject_failure_step=3", "ray.inject_failure_runs=[low]",
            "sweep.peers=[ambient]", "sweep.mu_var=[1.0]",
            *DISTILL, *PATIENT,
            "views.patch.scaling.label_selector={node: a}", "views.low.scaling.label_selector={node: b}",
            "views.low.scaling.num_workers=2"]


def files_containing(root: str, needles) -> list:
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


def stage_command(stage: str, storage: str, *extra) -> list:
    """``python -m ray_jobs.<stage>`` of the tiny quickstart (`OVERRIDES`) at ``storage``."""
    return [PY, "-m", f"ray_jobs.{stage}", "--config", "configs/quickstart.yaml", f"storage={storage}", *OVERRIDES,
            *extra]


def run_pipeline(cluster, s3, tmp_path_factory) -> dict:
    """The job-submitted pipeline on the three nodes, its files on S3 (and, for reading, a local copy
    of what a user opens: run records, report, TensorBoard runs, exported models)."""
    storage = f"{s3[0]}/multinode"
    since = time.time_ns()
    t0 = time.time()
    proc = submit(cluster, f"storage={storage}", *PIPELINE)
    seconds = time.time() - t0
    fs, key = s3fs(), storage[len("s3://"):] + "/quickstart"
    local = tmp_path_factory.mktemp("copy") / "quickstart"
    if proc.returncode == 0:
        for f in fs.find(key):
            rel = f[len(key) + 1:]
            if not rel.startswith(("data/", "sweep/runs/", "sweep/tune/", "sweep/cache/")):
                os.makedirs(os.path.dirname(local / rel), exist_ok=True)
                fs.get(f, str(local / rel))
    return {"proc": proc, "storage": storage, "key": key, "root": str(local), "seconds": seconds, "since": since}
