"""What the Ray integration tests share: the tiny quickstart's overrides (`TINY`, and the
`PATIENT` baseline and `DISTILL` stage the job-submitted pipeline adds), TensorBoard's raw steps,
and the trial Tune's saved state records as finished (`terminated_trial`); for
benchmarks/faults.py, a local head of its own (`start_head`: token auth with a fresh token, Ray's
files in a temp dir) and stopping only that head's processes (`_stop`). The job-submitted
pipeline itself, and the faults tests (SIGINT during the sweep, two submissions at once, nodes
lost), run on the simulated multi-node cluster the Ray tests share (tests/raycluster.py)."""

import glob
import json
import os
import subprocess
import sys
import uuid

from multinode import free_ports, kill_processes_of

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


AUTH_TOKEN = uuid.uuid4().hex


def _env(tmp: str, **extra) -> dict:
    # Token auth (new local heads use it): one fresh token for the head, the CLI and the drivers, so
    # the test does not depend on a ~/.ray/auth_token left on the machine.
    env = dict(os.environ, RAY_TMPDIR=tmp, PYTHONUNBUFFERED="1", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=AUTH_TOKEN,
               PATH=os.path.dirname(PY) + os.pathsep + os.environ.get("PATH", ""),
               RAY_TRAIN_ENABLE_STATE_TRACKING="1", RAY_DEDUP_LOGS="0")
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def _stop(tmp: str, env: dict) -> None:
    """Stop this test's cluster only: its processes carry its temp dir on their command lines or
    in their environment (`ray stop` would stop every Ray cluster on the machine). TERM first,
    then KILL what is left (`multinode.kill_processes_of`)."""
    kill_processes_of(tmp)


def tb_raw_steps(folder, tag):
    """Every step of ``tag`` in a TensorBoard run folder's event files, read raw (no purge)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [e.step for f in sorted(os.listdir(folder)) if "tfevents" in f
            for e in EventFileLoader(os.path.join(folder, f)).Load() for v in e.summary.value if v.tag == tag]


def start_head(tmp: str, tries: int = 3) -> dict:
    """`ray start --head` (2 CPUs, dashboard, free ports, token auth) with Ray's files under
    ``tmp``; retried because Ray gives a new node only 30 s to register, which a loaded machine can
    miss. Returns the environment for drivers (``RAY_ADDRESS`` set); stop with `_stop`."""
    env = _env(tmp)
    for attempt in range(tries):
        names = ("dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                 "ray-client-server-port", "runtime-env-agent-port", "metrics-export-port")
        port, *free = free_ports(1 + len(names))
        ports = [f"--{n}={p}" for n, p in zip(names, free)]
        proc = subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
                               "--disable-usage-stats", *ports], env=env, capture_output=True, text=True, timeout=180)
        if proc.returncode == 0:
            return dict(env, RAY_ADDRESS=f"127.0.0.1:{port}")
        _stop(tmp, env)
    raise RuntimeError(f"ray start --head failed {tries} times: {proc.stderr[-2000:]}")


def terminated_trial(tune_dir: str):
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
