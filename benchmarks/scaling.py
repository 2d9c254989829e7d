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
   (SIGKILL) once that view has a registered checkpoint; the view resumes on the node left.

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kimg", type=float, default=2.0, help="kimg per view model")
    ap.add_argument("--checkpoint-kimg", type=float, default=0.5, help="kimg between checkpoints")
    ap.add_argument("--limit", type=int, default=1500, help="MNIST images ingested")
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
                snap = f"{root}/views/view-low/checkpoint_manager_snapshot.json"
                while "node" not in lost:
                    fs.invalidate_cache()
                    if fs.exists(snap):
                        ids = {v: k for k, v in cluster.node_ids().items()}
                        nodes = {ids.get(w["node_id"]) for r in cluster.train_runs()
                                 if r["name"] == "view-low" and r["start_time_ns"] >= since
                                 for a in r["attempts"] for w in a["workers"]} - {None}
                        if nodes:
                            state = json.loads(fs.cat(snap))  # Train's registered checkpoints
                            lost["step"] = max(r["metrics"]["step"] for r in state["checkpoint_results"])
                            lost["node"] = sorted(nodes)[0]
                            lost["at"] = time.time()
                            cluster.kill_node(lost["node"])
                    time.sleep(0.5)
                state, logs = cluster.wait_job(sub, timeout=3600)
                if state != "SUCCEEDED":
                    raise RuntimeError(f"node-loss run failed: {logs[-4000:]}")
                return logs

            node_lost, logs = run("node_lost", [], during=with_node_loss)
            resumed = [int(s) for s in re.findall(r"resuming from step (\d+) \(\S*view-low", logs)]
            node_lost.update(lost_node=lost["node"], killed_after_checkpoint_step=lost["step"],
                             resumed_from_step=resumed[-1] if resumed else None,
                             retry_line="worker failure 1" in logs)
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
        "total_s": round(time.time() - t_start, 1),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
