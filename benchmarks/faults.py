"""Fault injection on the tiny pipeline: what is lost when things go wrong, and whether the end
result is still that of an uninterrupted run. Prints one JSON object.

    python benchmarks/faults.py [--views low] [--out /tmp/faults]

It runs the tiny quickstart (tests/rayhead.py's overrides, every Train report printed)
twice on one local Ray cluster it starts and stops itself:

* uninterrupted, into ``{out}/clean``;
* with faults, into ``{out}/faulted``, re-running the same command after each: SIGINT to the driver
  during ingest; a Train worker killed (SIGKILL) after the first view checkpoint, then SIGINT
  during train_views; one full-res shard corrupted (bytes changed, size kept) — the next run must
  refuse it, ``python -m bootdiff.data.ingest CONFIG --verify --repair`` rewrites it; SIGINT during
  the sweep once a trial finished; SIGINT during evaluate; then the run that finishes.

Reported: each fault's exit code, the seconds each re-run took, Train steps run in all vs the clean
run (steps re-done), trial starts (a trial run twice), and whether sweep.json's trials (ids,
statuses, steps, test G) and the report's summary equal the clean run's.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from rayhead import PY, TINY, _stop, start_head, terminated_trial  # noqa: E402

STEP_LINE = re.compile(r"\bstep (\d+)\s+kimg ")


class Run:
    """The pipeline command on one storage; every attempt's log is kept."""

    def __init__(self, config: str, storage: str, env: dict, extra):
        self.storage, self.env = storage, env
        self.root = os.path.join(storage, "quickstart")
        self.cmd = [PY, "-m", "ray_jobs.pipeline", "--config", config, f"storage={storage}", *extra]
        self.logs, self.attempts = [], []

    def start(self):
        log = os.path.join(self.storage + f".attempt{len(self.logs)}.log")
        os.makedirs(self.storage, exist_ok=True)
        self.logs.append(log)
        self.t0 = time.time()
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        return self

    def log(self) -> str:
        return open(self.logs[-1]).read()

    def wait(self, what: str, timeout: float = 900) -> dict:
        self.proc.wait(timeout=timeout)
        out = self.log()
        att = {"fault": what, "rc": self.proc.returncode, "seconds": round(time.time() - self.t0, 1),
               "message": next((ln for ln in out.splitlines() if "INTERRUPTED" in ln or "Error" in ln), None)}
        self.attempts.append(att)
        return att

    def until(self, cond, timeout: float = 900, what: str = "") -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if cond():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"pipeline ended (rc {self.proc.returncode}) before {what}:\n{self.log()[-3000:]}")
            time.sleep(0.3)
        raise TimeoutError(what)

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def steps_run(self) -> int:
        return sum(len(STEP_LINE.findall(open(p).read())) for p in self.logs)

    def outcome(self) -> dict:
        sweep = json.load(open(os.path.join(self.root, "sweep", "sweep.json")))
        summary = json.load(open(os.path.join(self.root, "sweep", "report", "summary.json")))
        trials = {t["trial_id"]: {k: t[k] for k in ("status", "step", "kimg", "test_G", "train_G")}
                  for t in sweep["trials"]}
        starts = [os.path.basename(p).split(".")[0] for p in glob.glob(os.path.join(self.root, "sweep", "events", "*.start"))]
        return {"best": sweep["best"], "trials": trials, "summary": summary,
                "trial_starts": {t: starts.count(t) for t in trials}}


def kill_train_worker(env: dict) -> int:
    """SIGKILL one live Ray Train worker of this cluster (found through Ray's state API)."""
    code = ("import ray, json; from ray.util.state import list_actors; ray.init(logging_level='ERROR');"
            "print(json.dumps([a.pid for a in list_actors(filters=[('class_name','=','RayTrainWorker'),"
            "('state','=','ALIVE')])]))")
    pids = json.loads(subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True,
                                     timeout=120).stdout.strip().splitlines()[-1])
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]


def corrupt_shard(root: str, split: str) -> str:
    """Flip bytes in the middle of a split's first shard, keeping its size."""
    shard = sorted(glob.glob(os.path.join(root, "data", split, "*.tar")))[0]
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)
        chunk = f.read(64)
        f.seek(-len(chunk), 1)
        f.write(bytes(b ^ 0xFF for b in chunk))
    return os.path.relpath(shard, root)


def faulted(run: Run, config: str, extra) -> dict:
    views = os.path.join(run.root, "views")
    ckpts = lambda: glob.glob(os.path.join(views, "view-*", "checkpoint_*"))  # noqa: E731
    faults = {}
    # 1. SIGINT during ingest.
    run.start().until(lambda: "=== stage ingest" in run.log(), what="ingest")
    run.interrupt()
    faults["ingest_sigint"] = run.wait("SIGINT during ingest")
    # 2. A Train worker killed after the first view checkpoint, then SIGINT during train_views.
    run.start().until(lambda: ckpts(), what="a view checkpoint")
    faults["train_worker_killed_pid"] = kill_train_worker(run.env)
    n = len(ckpts())
    run.until(lambda: len(ckpts()) > n or "resuming from step" in run.log(), what="the view resumed")
    run.interrupt()
    faults["train_views_sigint"] = run.wait("SIGINT during train_views")
    # 3. A corrupted shard: the next run must refuse it; --verify --repair rewrites it.
    faults["corrupted_shard"] = corrupt_shard(run.root, "full")
    run.start()
    faults["corrupt_shard_run"] = run.wait("corrupted shard")
    rep = subprocess.run([PY, "-m", "bootdiff.data.ingest", config, f"storage={run.storage}", *extra,
                          "--verify", "--repair"], env=run.env, cwd=REPO, capture_output=True, text=True, timeout=600)
    faults["repair"] = {"rc": rep.returncode, "repaired": json.loads(rep.stdout[rep.stdout.index("{"):]).get("repaired")}
    # 4. SIGINT during the sweep, once a trial finished.
    run.start().until(lambda: terminated_trial(os.path.join(run.root, "sweep", "tune")) is not None,
                      what="a finished trial")
    run.interrupt()
    faults["sweep_sigint"] = run.wait("SIGINT during sweep_residual")
    faults["sweep_json_after_sigint"] = os.path.exists(os.path.join(run.root, "sweep", "sweep.json"))
    # 5. SIGINT during evaluate.
    run.start().until(lambda: "=== stage evaluate" in run.log(), what="evaluate")
    time.sleep(5)
    run.interrupt()
    faults["evaluate_sigint"] = run.wait("SIGINT during evaluate")
    faults["summary_after_sigint"] = os.path.exists(os.path.join(run.root, "sweep", "report", "summary.json"))
    # 6. The run that finishes.
    run.start()
    faults["final"] = run.wait("none (finishes)")
    return faults


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--views", default="patch,low", help="views of the quickstart to keep (comma list)")
    p.add_argument("--out", default=None, help="work folder (default: a temporary one, removed)")
    args = p.parse_args()
    import yaml

    work = args.out or tempfile.mkdtemp(prefix="bootdiff-faults-")
    os.makedirs(work, exist_ok=True)
    keep = args.views.split(",")
    cfg = yaml.safe_load(open(os.path.join(REPO, "configs", "quickstart.yaml")))
    cfg["views"] = {k: v for k, v in cfg["views"].items() if k in keep}
    config = os.path.join(work, "faults.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    extra = [o for o in TINY if not o.startswith("views.") or o.split(".")[1] in keep]
    extra += [f"views.{v}.train.report_every=1" for v in keep] + ["residual.train.report_every=1",
                                                                  "full_res.train.report_every=1"]
    rtmp = tempfile.mkdtemp(prefix="bdray-", dir="/tmp")
    load0 = os.getloadavg()
    env = dict(start_head(rtmp), TUNE_GLOBAL_CHECKPOINT_S="1")
    try:
        t0 = time.time()
        clean = Run(config, os.path.join(work, "clean"), env, extra).start()
        clean_att = clean.wait("none")
        if clean_att["rc"] != 0:
            raise RuntimeError(clean.log()[-4000:])
        bad = Run(config, os.path.join(work, "faulted"), env, extra)
        faults = faulted(bad, config, extra)
        a, b = clean.outcome(), bad.outcome()
        result = {
            "machine": f"{platform.node()} {os.cpu_count()} CPUs", "load_avg_start": load0,
            "views": keep, "clean_seconds": clean_att["seconds"],
            "faulted_seconds_all_attempts": round(sum(x["seconds"] for x in bad.attempts), 1),
            "attempts": bad.attempts, "faults": faults,
            "train_steps_clean": clean.steps_run(), "train_steps_faulted": bad.steps_run(),
            "train_steps_redone": bad.steps_run() - clean.steps_run(),
            "trial_starts_faulted": b["trial_starts"],
            "sweep_trials_equal": a["trials"] == b["trials"],
            "sweep_statuses_equal": {k: v["status"] for k, v in a["trials"].items()} ==
                                    {k: v["status"] for k, v in b["trials"].items()},
            "best_equal": a["best"] == b["best"], "summary_equal": a["summary"] == b["summary"],
            "trials_clean": a["trials"], "trials_faulted": b["trials"], "wall_s": round(time.time() - t0, 1),
        }
        result["load_avg_end"] = os.getloadavg()
        print(json.dumps(result, indent=1, default=str))
    finally:
        _stop(rtmp, env)
        shutil.rmtree(rtmp, ignore_errors=True)
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
