"""Stage 1 across the nodes of a Ray cluster simulated on this machine, and what a lost node costs.

    python benchmarks/scaling.py [--kimg 2] [--checkpoint-kimg 0.5] [--limit 1500]

A head that takes no work and two worker nodes ``a`` and ``b`` (tests/multinode.py: separate
``ray start`` process trees, 2 CPUs each), moto's S3 server on loopback as the only storage;
``configs/quickstart.yaml`` (MNIST 32², views 16² patches and ×2 low-res; ``data.source.limit``
images), each view ``--kimg`` on one 1-CPU worker. Every case is ``ray_jobs.train_views``
submitted with ``ray job submit`` on the same ingested data (its views' checkpoints and exports
removed first), and is timed from the views' own run records (``views/view-<v>.json``: from the
view's ``fit()`` call to its export), so job submission and driver start-up are left out:

1. ``alone``: each view by itself (patch on node a, low on node b);
2. ``one_node``: both at once, both on node a (label selector ``node=a``);
3. ``two_nodes``: both at once, patch on node a, low on node b;
4. ``node_lost``: as 3 without selectors, and the node training the low-res view loses its raylet
   (SIGKILL) once that view has a registered checkpoint; the view resumes on the node left;
5. ``pipeline``: the whole job-submitted pipeline on that data (a short sweep: one residual
   setting of ``--residual-kimg``), once undisturbed and once with two nodes lost — the low-res
   view's mid-stage-1, then, a fresh node having joined, the residual trial's mid-sweep — and
   whether its ``sweep.json`` (trials' status, steps, G) and ``summary.json`` (times left out)
   equal the undisturbed run's.

All nodes share this machine's cores, so two nodes cannot be faster than one: ``two_nodes`` /
the slowest view alone is Ray's overhead of spreading stage 1 over nodes (target ≤ 1.15), and
``node_lost`` − ``two_nodes`` is the time a lost node costs (Ray noticing the node is gone, a new
worker group, the steps since the last checkpoint trained again), and the views' final training
losses of the two say whether the resumed run ended where the undisturbed one did. Prints one
JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from multinode import PY, RAY, LocalCluster  # noqa: E402
from s3server import moto_s3  # noqa: E402


def log(msg: str) -> None:
    print(f"[scaling] {msg}", file=sys.stderr, flush=True)


def job(cluster, module: str, overrides: list, wait: bool = True, config: str = "configs/quickstart.yaml"):
    cmd = [RAY, "job", "submit", "--address", cluster.address, "--working-dir", ".",
           *([] if wait else ["--no-wait"]), "--", PY, "-m", module, "--config", config, *overrides]
    for _ in range(20):
        proc = subprocess.run(cmd, env=dict(cluster.env, AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"]), cwd=REPO,
                              capture_output=True, text=True, timeout=3600)
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            break
        time.sleep(3)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} failed: {(proc.stdout + proc.stderr)[-4000:]}")
    return proc.stdout + proc.stderr


def _strip_times(obj):
    """A summary without what differs between any two runs: wall times, dates, paths of a run's
    own temporary files."""
    if isinstance(obj, dict):
        return {k: _strip_times(v) for k, v in obj.items()
                if not (k.endswith("_s") or any(w in k for w in ("time", "seconds", "date", "wall", "duration")))}
    if isinstance(obj, list):
        return [_strip_times(v) for v in obj]
    return obj


def _diff(a, b, path="") -> list:
    """Where two JSON values differ (dotted paths), at most 20."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        return out[:20]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")][:20]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"[:300]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kimg", type=float, default=2.0, help="kimg per view model")
    ap.add_argument("--checkpoint-kimg", type=float, default=0.5, help="kimg between checkpoints")
    ap.add_argument("--limit", type=int, default=1500, help="MNIST images ingested")
    ap.add_argument("--residual-kimg", type=float, default=0.96, help="kimg of the pipeline case's residual trial")
    args = ap.parse_args()
    t_start = time.time()
    load0 = os.getloadavg()
    with moto_s3("bootdiff-scaling") as (bucket, _):
        import fsspec

        fs = fsspec.filesystem("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        storage = f"{bucket}/scaling"
        root = storage[len("s3://"):] + "/quickstart"
        base = [f"storage={storage}", f"data.source.limit={args.limit}", "data.num_test=128"]
        for v in ("patch", "low"):
            base += [f"views.{v}.train.total_kimg={args.kimg}", f"views.{v}.train.checkpoint_every_kimg={args.checkpoint_kimg}"]
        cluster = LocalCluster({"a": {"cpus": 2}, "b": {"cpus": 2}}).start()
        try:
            log("ingest")
            job(cluster, "ray_jobs.ingest", base)

            def clean():
                fs.invalidate_cache()
                for part in ("views", "models"):
                    if fs.exists(f"{root}/{part}"):
                        fs.rm(f"{root}/{part}", recursive=True)

            def record(v):
                fs.invalidate_cache()
                return json.loads(fs.cat(f"{root}/views/view-{v}.json"))

            import yaml

            quick = yaml.safe_load(open(os.path.join(REPO, "configs", "quickstart.yaml")))

            def run(name, overrides, views=("patch", "low"), during=None):
                clean()
                log(f"{name}: views {', '.join(views)} {' '.join(overrides)}")
                config = "configs/quickstart.yaml"
                if len(views) == 1:  # the quickstart with one view: a config file on the storage
                    one = {**quick, "views": {views[0]: quick["views"][views[0]]},
                           "sweep": {**quick["sweep"], "peers": []}}  # the Ambient peer needs both views
                    config = f"{bucket}/configs/{name}.yaml"
                    fs.pipe(config[len("s3://"):], yaml.safe_dump(one).encode())
                mine = [o for o in base if not o.startswith("views.") or o.split(".")[1] in views] + overrides
                out = job(cluster, "ray_jobs.train_views", mine, config=config) if during is None else during(mine)
                recs = {v: record(v) for v in views}
                wall = max(r["end"] for r in recs.values()) - min(r["start"] for r in recs.values())
                return {"wall_s": round(wall, 1), "per_view_s": {v: round(r["end"] - r["start"], 1) for v, r in recs.items()},
                        "steps": {v: r["metrics"]["step"] for v, r in recs.items()},
                        "final_loss": {v: r["metrics"]["loss"] for v, r in recs.items()}}, out

            sel = {"patch": "views.patch.scaling.label_selector={node: a}", "low": "views.low.scaling.label_selector={node: b}"}
            alone = {v: run(f"alone-{v}", [sel[v]], views=(v,))[0] for v in ("patch", "low")}
            one_node = run("one_node", ["views.patch.scaling.label_selector={node: a}",
                                        "views.low.scaling.label_selector={node: a}"])[0]
            two_nodes = run("two_nodes", [sel["patch"], sel["low"]])[0]

            lost = {}

            def with_node_loss(overrides):
                since = time.time_ns()  # the earlier cases' view-low runs are not this one
                out = job(cluster, "ray_jobs.train_views", overrides, wait=False)
                sub = out.split("Job '")[1].split("'")[0]
                node, step, _ = cluster.kill_after_checkpoint(
                    fs, f"{root}/views/view-low/checkpoint_manager_snapshot.json", "view-low", time.time() + 1800, since)
                lost.update(node=node, step=step, at=time.time())
                state, logs = cluster.wait_job(sub, timeout=3600)
                if state != "SUCCEEDED":
                    raise RuntimeError(f"node-loss run failed: {logs[-4000:]}")
                return logs

            node_lost, logs = run("node_lost", [], during=with_node_loss)
            resumed = [int(s) for s in re.findall(r"resuming from step (\d+) \(\S*view-low", logs)]
            node_lost.update(lost_node=lost["node"], killed_after_checkpoint_step=lost["step"],
                             resumed_from_step=resumed[-1] if resumed else None,
                             retry_line="worker failure 1" in logs)

            # 5. the whole pipeline (the data above, a short sweep: one residual setting), undisturbed
            # and with two nodes lost: the low-res view's mid-stage-1, then (a fresh node d having
            # joined) the residual trial's mid-sweep; its sweep.json and summary.json against the first
            cluster.add_node("c", {"cpus": 2})  # two worker nodes again
            pipe = base + ["sweep.mu_var=[0.0]", "sweep.peers=[]", "sweep.baseline_full_res=false",
                           "sweep.baseline_combined=false", f"residual.train.total_kimg={args.residual_kimg}",
                           f"residual.train.checkpoint_every_kimg={args.residual_kimg / 4:g}"]

            def pipeline(disturb: bool):
                fs.invalidate_cache()
                for part in fs.ls(root):  # everything of the run but its ingested data
                    if part.rstrip("/").rsplit("/", 1)[-1] != "data":
                        fs.rm(part, recursive=True)
                log(f"pipeline, {'two nodes lost' if disturb else 'undisturbed'}")
                since, t0 = time.time_ns(), time.time()
                out = job(cluster, "ray_jobs.pipeline", pipe, wait=False)
                sub = out.split("Job '")[1].split("'")[0]
                kills = []
                if disturb:
                    deadline = time.time() + 1800
                    kills.append(cluster.kill_after_checkpoint(
                        fs, f"{root}/views/view-low/checkpoint_manager_snapshot.json", "view-low", deadline, since))
                    cluster.add_node("d", {"cpus": 2})
                    kills.append(cluster.kill_after_checkpoint(
                        fs, f"{root}/sweep/runs/trial-residual-*/checkpoint_manager_snapshot.json", "trial-residual",
                        deadline, since))
                state, logs = cluster.wait_job(sub, timeout=3600)
                if state != "SUCCEEDED":
                    raise RuntimeError(f"pipeline failed: {logs[-4000:]}")
                fs.invalidate_cache()
                sweep = json.loads(fs.cat(f"{root}/sweep/sweep.json"))
                summary = json.loads(fs.cat(f"{root}/sweep/report/summary.json"))
                trials = {t["trial_id"]: {k: t.get(k) for k in ("status", "step", "kimg", "val_G", "test_G", "train_G")}
                          for t in sweep["trials"]}
                return {"wall_s": round(time.time() - t0, 1), "best": sweep["best"], "trials": trials,
                        "killed": [{"node": n, "after_checkpoint_step": s, "run": r} for n, s, r in kills],
                        "resumed_from_steps": [int(s) for s in re.findall(r"resuming from step (\d+)", logs)]}, summary

            undisturbed, summary0 = pipeline(False)
            disturbed, summary1 = pipeline(True)
            pipeline_result = {"undisturbed": undisturbed, "two_nodes_lost": disturbed,
                               "sweep_equal": (undisturbed["trials"], undisturbed["best"]) == (disturbed["trials"], disturbed["best"]),
                               "summary_equal": _strip_times(summary0) == _strip_times(summary1),
                               "summary_diff": _diff(_strip_times(summary0), _strip_times(summary1))}
        finally:
            cluster.stop()
    slowest = max(alone.values(), key=lambda r: r["wall_s"])["wall_s"]
    out = {
        "benchmark": "scaling", "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_before": [round(x, 2) for x in load0], "load_after": [round(x, 2) for x in os.getloadavg()],
        "kimg_per_view": args.kimg, "checkpoint_every_kimg": args.checkpoint_kimg,
        "alone": alone, "one_node": one_node, "two_nodes": two_nodes, "node_lost": node_lost,
        "two_nodes_over_slowest_alone": round(two_nodes["wall_s"] / slowest, 3),
        "one_node_over_slowest_alone": round(one_node["wall_s"] / slowest, 3),
        "node_lost_cost_s": round(node_lost["wall_s"] - two_nodes["wall_s"], 1),
        # exact resume (bootdiff.train): the view trained through a node loss ends where the
        # undisturbed run ends, to the bit, when the resumed run replays the same batches
        "node_lost_final_loss_equals_two_nodes": node_lost["final_loss"] == two_nodes["final_loss"],
        "pipeline": pipeline_result,
        "total_s": round(time.time() - t_start, 1),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
