"""What a run asks of the Ray cluster, checked against the cluster's live nodes before anything is
written or trained (`check`, called by `entry.init_ray`): where each run's workers may go and
whether its storage can be shared by every node.

Placement is Ray's own: a Train worker's bundle (``CPU``, ``GPU``, custom resources:
``<key>.resources_per_worker``) and its node label selector (``<key>.label_selector``, Ray's
``ScalingConfig(label_selector=…)``; nodes get labels with ``ray start --labels k=v``). A bundle
must fit on one node — Ray never splits a worker over nodes — and Ray Train V2 waits forever for a
worker group that no node can hold (docs/RAY.md), so a run no node can take is an error here,
naming the config key, instead of a hang later.

Storage: every process of a run reads and writes ``storage`` — shards, checkpoints, the sweep,
the report — so on a cluster of more than one node a local path would scatter checkpoints over
the nodes' own disks. It is refused there unless ``ray.shared_storage`` declares it a path every
node mounts (NFS, a shared volume)."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

from bootdiff.config.schema import ConfigError

# Each trial is a driver holding a token CPU share; its Train worker gets the rest of trial_cpus,
# so one trial's whole footprint is trial_cpus and `concurrency` trials fit the cluster exactly.
TRIAL_TOKEN_CPU = 0.01


def worker_cpus(cfg) -> float:
    """CPUs of a sweep trial's Train worker: ``sweep.trial_cpus`` less its driver's token share."""
    return max(cfg.sweep.trial_cpus - TRIAL_TOKEN_CPU, TRIAL_TOKEN_CPU)


def trial_task_options(cfg, **extra) -> dict:
    """``ray.remote`` options of a task that works like a sweep trial (evaluation, teacher
    samples, the ensemble's weight): ``sweep.trial_cpus``, ``trial_gpus`` and ``trial_resources``."""
    opts = {"num_cpus": cfg.sweep.trial_cpus, "num_gpus": cfg.sweep.trial_gpus, **extra}
    if cfg.sweep.trial_resources:
        opts["resources"] = dict(cfg.sweep.trial_resources)
    return opts


# Demands whose key names their resources itself (not ``<key>.resources_per_worker``)
OWN_KEYS = ("sweep.trial_resources", "eval.num_cpus")

# (config key of the run's placement, per-worker bundle, label selector, workers)
Demand = Tuple[str, Dict[str, float], Dict[str, str], int]


def live_nodes(ray) -> List[dict]:
    """The cluster's alive nodes as ``{"id", "address", "resources", "labels"}`` (``ray.nodes()``)."""
    return [{"id": n["NodeID"], "address": n.get("NodeManagerAddress", "?"), "resources": dict(n.get("Resources") or {}),
             "labels": dict(n.get("Labels") or {})} for n in ray.nodes() if n.get("Alive")]


def _scaling_demand(key: str, sc, cpus=None) -> Demand:
    need = {"CPU": cpus if cpus is not None else sc.cpus_per_worker, **dict(sc.resources_per_worker)}
    if sc.use_gpu:
        need["GPU"] = sc.gpus_per_worker or 1
    return key, {k: v for k, v in need.items() if v > 0}, dict(sc.label_selector), sc.num_workers


def demands(cfg) -> List[Demand]:
    """Every Train run this config starts and what one of its workers needs: each view
    (``views.<v>.scaling``), the residual trials (``sweep.trial_*``), the full-res baseline and the
    peers (``full_res.scaling`` at the trial's CPU share), the distilled student (``distill.scaling``),
    and the evaluation task when it has CPUs of its own (``eval.num_cpus``)."""
    out = [_scaling_demand(f"views.{v}.scaling", vc.scaling) for v, vc in cfg.views.items()]
    sw = cfg.sweep
    need = {"CPU": worker_cpus(cfg), "GPU": sw.trial_gpus, **dict(sw.trial_resources)}
    out.append(("sweep.trial_resources", {k: v for k, v in need.items() if v > 0}, dict(sw.trial_label_selector), 1))
    if sw.baseline_full_res or sw.peers:
        out.append(_scaling_demand("full_res.scaling", cfg.full_res.scaling, cpus=worker_cpus(cfg)))
    if cfg.distill.enabled:
        out.append(_scaling_demand("distill.scaling", cfg.distill.scaling))
    if cfg.eval.num_cpus > 0:  # the evaluation task: a trial's resources, its own CPU count
        need = {**need, "CPU": cfg.eval.num_cpus}
        out.append(("eval.num_cpus", {k: v for k, v in need.items() if v > 0}, {}, 1))  # no selector: as the task
    return out


def _selects(selector: Dict[str, str], labels: Dict[str, str]) -> bool:
    """Ray's label selector semantics for plain values and ``!value`` / ``in(a,b)`` / ``!in(a,b)``."""
    for k, want in selector.items():
        have = labels.get(k)
        neg = want.startswith("!")
        body = want[1:] if neg else want
        values = [s.strip() for s in body[3:-1].split(",")] if body.startswith("in(") and body.endswith(")") else [body]
        if (have in values) == neg:
            return False
    return True


def _fits(bundle: Dict[str, float], resources: Dict[str, float]) -> int:
    """How many such bundles one node's total resources hold."""
    return min((int(resources.get(k, 0) / v + 1e-9) for k, v in bundle.items()), default=1 << 30)


def _describe(nodes: List[dict]) -> str:
    """One line per node: its id, logical resources and user labels (Ray's own ``ray.io/*`` left out)."""
    out = []
    for n in nodes:
        res = [f"{k} {v:g}" for k, v in sorted(n["resources"].items())
               if not k.startswith("node:") and k not in ("memory", "object_store_memory")]
        labels = [f"{k}={v}" for k, v in sorted(n["labels"].items()) if not k.startswith("ray.io/")]
        out.append(f"node {n['id'][:8]} at {n['address']} ({', '.join(res) or 'no resources'}"
                   f"{'; labels ' + ', '.join(labels) if labels else ''})")
    return "; ".join(out)


def check(cfg, nodes: List[dict], keys: Optional[Tuple[str, ...]] = None) -> None:
    """Raise one `ConfigError` naming the key of each problem, a line each: ``storage`` a local path
    on a multi-node cluster (and not declared shared), or a run whose workers cannot be placed: no
    node has the labels its selector asks for, none of those holds one worker's bundle, or they hold
    fewer workers than the run has. ``keys``: check only the runs of those placement keys (and not
    storage)."""
    from bootdiff.run.layout import absolute_url

    problems = []
    storage = absolute_url(cfg.storage)
    if keys is None and len(nodes) > 1 and "://" not in storage and not cfg.ray.shared_storage:
        problems.append(
            f"storage='{cfg.storage}' is a local path, but the Ray cluster has {len(nodes)} nodes: each node's "
            f"workers would write their checkpoints and shards to their own disk. Set storage= to an s3:// URL "
            f"(every node reads and writes it), or, if {storage} is a folder every node mounts (NFS, a shared "
            f"volume), say so with ray.shared_storage=true")
    for key, bundle, selector, workers in demands(cfg):
        if keys is not None and key not in keys:
            continue
        where = f"{key} (label_selector {selector})" if selector else key
        match = [n for n in nodes if _selects(selector, n["labels"])]
        room = sum(_fits(bundle, n["resources"]) for n in match)
        if not match:
            sel_key = "sweep.trial_label_selector" if key == "sweep.trial_resources" else f"{key}.label_selector"
            problems.append(f"{sel_key}={selector} selects no node of the Ray cluster; its nodes: {_describe(nodes)}")
        elif room == 0:
            res_key = key if key in OWN_KEYS else f"{key}.resources_per_worker"
            what = "the evaluation task" if key == "eval.num_cpus" else "one worker"
            problems.append(f"{res_key}: {what} of {where} needs {bundle} on one node, and no node "
                            f"{'it selects ' if selector else ''}has that much; nodes: {_describe(match)}")
        elif room < workers:
            problems.append(f"{key}.num_workers={workers}: the nodes {'it selects ' if selector else ''}hold only "
                            f"{room} worker(s) of {bundle}; nodes: {_describe(match)}")
    if problems:
        raise ConfigError("\n".join(problems))


def placeable(cfg, key: str) -> Callable[[], None]:
    """For a retry after a lost worker (`ray_jobs.train_views.fit_retrying`): a check that the run of
    placement key ``key`` still fits the nodes alive now, raising `ConfigError` that names what is
    missing — e.g. the only node its label selector allowed was lost — instead of a worker group
    that waits for a node that will not come back."""

    def _check() -> None:
        import ray

        try:
            check(cfg, live_nodes(ray), keys=(key,))
        except ConfigError as exc:
            raise ConfigError(f"no live node of the Ray cluster can run it any more (a node was lost?): {exc}") from None

    return _check


def placement_key(view: str) -> str:
    """The config key whose placement a Train run of ``view`` uses (see `demands`)."""
    from bootdiff.peers import NAMES

    if view in ("full_res", *NAMES):
        return "full_res.scaling"
    if view == "residual":
        return "sweep.trial_resources"
    if view == "distill":
        return "distill.scaling"
    return f"views.{view}.scaling"
