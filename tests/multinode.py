"""A multi-node Ray cluster on one machine, for tests and benchmarks/scaling.py: a head that takes
no work (``--num-cpus=0``; the dashboard and job server on it) and worker nodes, each a separate
``ray start`` process tree with its own ``--temp-dir``, working directory, resources and node
labels (``node=<name>``), all joined with one fresh auth token. A node is lost with `kill_node`
(SIGKILL to its raylet, as when a machine goes away); `stop` ends only this cluster's processes
(they carry its temp dirs on their command lines; ``ray stop`` would stop every cluster here)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Dict, Optional

PY = sys.executable
RAY = os.path.join(os.path.dirname(PY), "ray")


def free_ports(n: int, taken=()) -> list:
    """``n`` distinct free loopback ports, none of ``taken``: all bound at once, then released. (One
    port at a time, bound and released, can come back twice in a row: seen as `ray start` refusing
    a node whose object manager and dashboard agent were given the same port.)"""
    socks, ports = [], []
    try:
        while len(ports) < n:
            socks.append(socket.socket())
            socks[-1].bind(("127.0.0.1", 0))
            if socks[-1].getsockname()[1] not in taken:
                ports.append(socks[-1].getsockname()[1])
        return ports
    finally:
        for s in socks:
            s.close()


def processes_of(marker: str) -> list:
    """Pids of the processes that belong to a test's Ray cluster: ``marker`` (its temp dir) on the
    command line, in the environment (``RAY_TMPDIR``) or in the working directory. Ray's agents
    rename themselves (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) and outlive a killed
    raylet, so a match on command lines alone leaves them running, and using CPU, for the rest of
    the test session."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                found = marker.encode() in f.read()
            if not found:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    found = marker.encode() in f.read()
            found = found or os.readlink(f"/proc/{pid}/cwd").startswith(marker)
        except OSError:  # gone, or not ours to read
            continue
        if found:
            pids.append(int(pid))
    return pids


def kill_processes_of(marker: str, grace_s: float = 5.0) -> None:
    """SIGTERM every process of `processes_of(marker)`, SIGKILL what is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_of(marker):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + (grace_s if sig == signal.SIGTERM else 0)
        while time.time() < deadline and processes_of(marker):
            time.sleep(0.5)


class LocalCluster:
    """``LocalCluster({"a": {"cpus": 2}, "b": {"cpus": 2, "resources": {"fake_gpu": 1}}}, env,
    node_env)``:
    ``start()`` brings up the head and the nodes and waits until every node is alive;
    ``address`` (dashboard URL, for ``ray job submit``), ``gcs`` (for ``RAY_ADDRESS``), ``env``
    (token auth, for drivers and the CLI), ``node_ids()`` (name -> Ray node id). ``node_env``:
    variables only the nodes' ``ray start`` gets (e.g. the cloud credentials a cluster is given,
    which the CLI's and the drivers' ``env`` then lack)."""

    def __init__(self, nodes: Dict[str, dict], env: Optional[dict] = None, node_env: Optional[dict] = None):
        self.nodes = nodes
        self.node_env = dict(node_env or {})
        self.root = tempfile.mkdtemp(prefix="bdmn-", dir="/tmp")  # Ray's socket paths stay short
        # The nodes' temp folder (TMPDIR of every ``ray start``, so of its workers): one, as they
        # share this machine's /tmp, but the cluster's own, apart from the other tests' runs.
        self.tmp = os.path.join(self.root, "tmp")
        os.makedirs(self.tmp)
        token = uuid.uuid4().hex
        self.env = dict(env or os.environ, PYTHONUNBUFFERED="1", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
                        RAY_TRAIN_ENABLE_STATE_TRACKING="1", RAY_DEDUP_LOGS="0",
                        PATH=os.path.dirname(PY) + os.pathsep + os.environ.get("PATH", ""))
        self.env.pop("RAY_ADDRESS", None)
        self.gcs = self.address = ""
        self.started: set = set()

    def _dir(self, name: str) -> str:
        path = os.path.join(self.root, name)
        os.makedirs(os.path.join(path, "work"), exist_ok=True)
        return path

    def _start(self, name: str, args: list, port_names: tuple, taken=()) -> None:
        """``ray start`` of a node, its ``port_names`` ports chosen free (and not ``taken``) at each attempt."""
        d = self._dir(name)
        # RAY_ADDRESS: Ray's own code on the nodes that looks its cluster up without an address
        # (Train's PlacementGroupCleaner asks the state API for its controller) finds it; without,
        # it searches this machine and, with another test's Ray running, fails ("Found multiple
        # active Ray instances"): a Train run's placement group then outlived its aborted run.
        for attempt in range(3):  # a loaded box can miss Ray's fixed 30 s raylet start-up wait
            ports = [f"--{n}={p}" for n, p in zip(port_names, free_ports(len(port_names), taken))]
            proc = subprocess.run([RAY, "start", f"--temp-dir={d}/t", "--disable-usage-stats", *args, *ports],
                                  env=dict(self.env, **self.node_env, TMPDIR=self.tmp, RAY_ADDRESS=self.gcs),
                                  cwd=os.path.join(d, "work"),
                                  capture_output=True, text=True, timeout=180)
            if proc.returncode == 0:
                return
            self._kill(f"{d}/t")
        raise RuntimeError(f"ray start of node {name} failed: {(proc.stdout + proc.stderr)[-3000:]}")

    def start(self) -> "LocalCluster":
        port, dash = free_ports(2)
        self.gcs, self.address = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
        self._start("head", ["--head", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=0",
                             "--include-dashboard=true", "--labels=node=head"],
                    ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "ray-client-server-port",
                     "runtime-env-agent-port", "metrics-export-port"), taken=(port, dash))
        for name, spec in self.nodes.items():
            self.add_node(name, spec)
        return self

    def add_node(self, name: str, spec: dict) -> None:
        self._start(name, [f"--address={self.gcs}", f"--num-cpus={spec.get('cpus', 2)}",
                           f"--resources={json.dumps(spec.get('resources', {}))}",
                           f"--labels={','.join(f'{k}={v}' for k, v in {'node': name, **spec.get('labels', {})}.items())}"],
                    ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                     "metrics-export-port", "node-manager-port", "object-manager-port"))
        self.nodes[name] = spec
        self.started.add(name)
        self.wait_nodes()

    def list_nodes(self) -> list:
        """Ray's state API, what ``ray list nodes`` asks (alive and dead): ``[]`` while the
        dashboard is not up yet."""
        try:
            reply = self.api("/api/v0/nodes?limit=100")
        except (OSError, ValueError):
            return []
        return reply["data"]["result"]["result"] if reply.get("result") else []

    def wait_nodes(self, timeout: float = 120) -> None:
        want = {"head", *[n for n in self.started if not self.nodes[n].get("lost")]}
        deadline = time.time() + timeout
        while time.time() < deadline:
            alive = {n.get("labels", {}).get("node") for n in self.list_nodes() if n.get("state") == "ALIVE"}
            if want <= alive:
                return
            time.sleep(1)
        raise RuntimeError(f"nodes {sorted(want - alive)} did not come up in {timeout:.0f} s")

    def node_ids(self, alive: bool = True) -> Dict[str, str]:
        """Node name (its ``node`` label) -> Ray node id, for the nodes alive now (or every node
        the cluster has had, ``alive=False``: a lost node's id stays its own)."""
        return {n["labels"]["node"]: n["node_id"] for n in self.list_nodes()
                if (n.get("state") == "ALIVE" or not alive) and "node" in n.get("labels", {})}

    def kill_node(self, name: str) -> None:
        """Lose a worker node: SIGKILL its raylet (its workers die with it, and the GCS marks the
        node dead when its health checks stop)."""
        out = subprocess.run(["pgrep", "-f", f"raylet.*{self.root}/{name}/t"], capture_output=True, text=True).stdout
        pids = [int(p) for p in out.split()]
        if not pids:
            raise RuntimeError(f"node {name}: no raylet running")
        for pid in pids:
            os.kill(pid, 9)
        self.nodes[name]["lost"] = True

    def _kill(self, pattern: str) -> None:
        kill_processes_of(pattern)

    def stop(self) -> None:
        self._kill(self.root)
        shutil.rmtree(self.root, ignore_errors=True)

    def api(self, path: str):
        """The dashboard's REST API at ``path`` (token auth): its JSON. What the ``ray`` CLI asks,
        without a CLI process (≈ 0.7 CPU-s each) per question."""
        import urllib.request

        req = urllib.request.Request(self.address + path, headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def wait_job(self, submission_id: str, timeout: float = 600) -> tuple:
        """Poll the job's status (the dashboard's job API, what ``ray job status`` asks) every 2 s
        until the job ends (or ``timeout``): (its final state, e.g. ``"SUCCEEDED"``, or ``""`` if
        it did not end in time; its full log)."""
        deadline, state = time.time() + timeout, ""
        while time.time() < deadline and not state:
            try:
                status = self.api(f"/api/jobs/{submission_id}").get("status", "")
            except (OSError, ValueError):  # the dashboard busy or restarting: ask again
                status = ""
            state = status if status in ("SUCCEEDED", "FAILED", "STOPPED") else ""
            if not state:
                time.sleep(2)
        return state, self.api(f"/api/jobs/{submission_id}/logs")["logs"]

    def nodes_of(self, runs: list, name: str, since_ns: int = 0) -> set:
        """Node names that workers of the Train runs called ``name`` (every attempt; started after
        ``since_ns``, so an earlier job's run of that name is left out) ran on."""
        ids = {v: k for k, v in self.node_ids(alive=False).items()}
        return {ids.get(w["node_id"], w["node_id"]) for r in runs if r["name"] == name and r["start_time_ns"] >= since_ns
                for a in r["attempts"] for w in a["workers"]}

    def kill_after_checkpoint(self, fs, snapshot_glob: str, run_prefix: str, deadline: float, since_ns: int) -> tuple:
        """Once a Train run called ``run_prefix…`` has a registered checkpoint (its checkpoint
        manager's snapshot under storage, found with fsspec ``fs``), SIGKILL the raylet of a node
        its workers run on: (that node, the latest registered step, the run's name, the run folders
        (``bootdiff-run-*``) in the nodes' temp folder (`tmp`) just before the kill)."""
        while time.time() < deadline:
            fs.invalidate_cache()
            for snapshot in fs.glob(snapshot_glob):
                name = snapshot.split("/")[-2]
                nodes = self.nodes_of(self.train_runs(), name, since_ns) - {"head"} if name.startswith(run_prefix) else set()
                if nodes:
                    state = json.loads(fs.cat(snapshot))  # Train's checkpoint manager: the registered checkpoints
                    step = max(r["metrics"]["step"] for r in state["checkpoint_results"])
                    lost = sorted(nodes)[0]
                    scratch = glob.glob(os.path.join(self.tmp, "bootdiff-run-*"))
                    self.kill_node(lost)
                    return lost, step, name, scratch
            time.sleep(0.5)
        raise RuntimeError(f"no checkpoint of a Train run {run_prefix}* registered in time")

    def train_runs(self) -> list:
        """Ray Train's state API (the dashboard's ``/api/train/v2/runs/v1``, Train V2): every Train run with its
        attempts and their workers (``node_id``)."""
        return self.api("/api/train/v2/runs/v1")["train_runs"]
