"""Stage 1 on Ray: one TorchTrainer per view, all launched concurrently.

    python -m ray_jobs.train_views --config configs/quickstart.yaml [key=value ...]

Each view's run has its own ScalingConfig (``views.<v>.scaling``: workers, GPU or CPU, resources
per worker; DDP across a view's workers), streams its view's shards split by world rank, reports
loss (also per σ band), kimg, img/s and lr, checkpoints to ``{storage}/{name}/views/view-<v>``
(local or s3://), retries a lost worker from that checkpoint (`fit_retrying`; a deterministic
failure is not retried), and resumes from its latest checkpoint when the
same run is submitted again. The final checkpoint's EMA weights are exported in diffusers format to
``{storage}/{name}/models/<v>`` (`bootdiff.experiment.export_result`) — or, for a view with
``train.patience`` > 0 and held-out view samples (``data.num_view_val``), the checkpoint with the
lowest G on them: such a view is scored at each checkpoint and stopped by patience
(`bootdiff.stopping.early_stopped_view`). The training itself is `bootdiff.train.train`.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, Optional, Tuple

from bootdiff import experiment, util
from bootdiff.config.schema import ConfigError
from bootdiff.experiment import export_result
from bootdiff.peers import NAMES as PEER_NAMES, peer_training
from bootdiff.run.layout import RunLayout
from bootdiff.stopping import early_stopped_view
from ray_jobs import cluster, common, entry


def train_worker(config: dict) -> None:
    """Ray Train ``train_loop_per_worker``: `bootdiff.train` on this rank's share of the shards."""
    from bootdiff.train import train

    cfg = common.cfg_from_yaml(config["cfg_yaml"])
    view = config["view"]
    vcfg, split = experiment.run_split(cfg, view)
    rank, world, device, run_dir = common.worker_setup(vcfg.scaling.cpus_per_worker, cfg.ray.train_log_level)
    manifest = experiment.read_manifest(cfg)
    if view == "distill":  # the student of ray_jobs/distill.py: same worker, its own (model, loss, data)
        from bootdiff.distill.student import distill_training

        model, loss, data = distill_training(cfg, manifest, rank, world)
    elif view in PEER_NAMES:  # a peer (bootdiff.peers): a sweep baseline or a data-efficiency row
        model, loss, data = peer_training(cfg, manifest, view, rank, world)
    else:
        model, loss, data = experiment.view_training(cfg, manifest, split, vcfg, rank, world)
    extra = None
    if config.get("evaluate") and rank == 0:  # a view: G on its held-out samples; else full-res G
        extra = (common.view_checkpoint_evaluator(cfg, manifest, view, model) if view in cfg.views
                 else common.checkpoint_evaluator(cfg, manifest, model, test=bool(config.get("curve_url"))))
    resume = common.resume_dir(run_dir)
    fails = not cfg.ray.inject_failure_runs or view in cfg.ray.inject_failure_runs
    hooks = common.RayReportHooks({"view": view}, extra_metrics=extra, fail_at_step=cfg.ray.inject_failure_step if fails else -1,
                                  fail_marker=RunLayout.of(cfg).failure_marker(view),
                                  pause_s=cfg.ray.inject_pause_s if resume is None else 0.0,
                                  report_every_s=vcfg.train.report_every_s,
                                  tb=common.tensorboard_run(cfg, rank, {"kind": view} if view in ("full_res", *PEER_NAMES) else None),
                                  **(common.stopping_hooks(config, vcfg.train, rank, "val_G" if view in cfg.views else "test_G")
                                     if config.get("evaluate") else {}))
    try:
        train(model, loss, data, vcfg.train, run_dir=run_dir, hooks=hooks, device=device,
              resume_from=resume, config_yaml=config["cfg_yaml"])
    finally:
        common.cleanup(run_dir)


def make_trainer(cfg, cfg_yaml: str, view: str, run_name: str, storage: str, callbacks=None,
                 evaluate: bool = False, cpus_per_worker=None, curve_url: str = ""):
    """The TorchTrainer of one view (or of the full-res baseline, ``view == "full_res"``, or of a
    peer, ``view`` a `bootdiff.peers` name);
    ``evaluate`` runs G at its checkpoints, and with ``train.patience`` the run stops on its
    ``val_G`` — or, given ``curve_url`` (a data-efficiency job), keeps its curve there and stops on it."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    vcfg, _ = experiment.run_split(cfg, view)
    sc = vcfg.scaling
    resources = {"CPU": cpus_per_worker or sc.cpus_per_worker, **dict(sc.resources_per_worker)}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker or 1
    storage_path, storage_fs = common.ray_storage(storage)
    return TorchTrainer(
        train_worker,
        train_loop_config={"cfg_yaml": cfg_yaml, "view": view, "evaluate": evaluate, "curve_url": curve_url},
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                     resources_per_worker=resources, label_selector=dict(sc.label_selector) or None),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            # worker failures and worker groups that cannot start: fit_retrying decides
            failure_config=FailureConfig(max_failures=0, controller_failure_limit=0),
            checkpoint_config=common.checkpoint_config(
                cfg, vcfg.train.keep_checkpoints, chosen_on_val=evaluate and view != "distill",
                num_val=cfg.data.num_view_val if view in cfg.views else None),
            callbacks=callbacks, logging_config=common.train_logging(cfg)),
    )


def fit_retrying(make: Callable[[], "object"], max_failures: int, what: str,
                 placeable: Optional[Callable[[], None]] = None):
    """``make().fit()``, retried from the run's latest checkpoint only when a retry can help.

    Ray 2.60 Train V2 retries every worker-group failure alike (`DefaultFailurePolicy`: any
    `WorkerGroupError` until ``FailureConfig.max_failures``) and offers no public way to mark an
    error final, so the trainers run with ``max_failures=0`` and this loop decides: when any
    worker failed deterministically (`bootdiff.errors.deterministic`: non-finite loss, config or
    data error) that worker's exception is raised at once, with its message; otherwise (a killed
    or lost worker, another error) a fresh trainer of the same run name fits again — Train then
    hands the workers the latest checkpoint (docs/RAY.md §1) — up to ``max_failures`` times
    (``ray.max_failures``; −1: forever). Preemptions stay Ray's (``max_preemption_failures``).
    A retry starts a new Train controller, listed as another run of the same name in the
    dashboard's Train tab.

    A lost node: before every retry ``placeable()`` (`ray_jobs.cluster.placeable`) checks that the
    nodes alive now can still hold the run, and raises `ConfigError` naming what is missing (e.g.
    the only node its label selector allows) instead of retrying. A worker group that does not
    start within ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (the trainers run with
    ``controller_failure_limit=0``, so Train raises `ControllerError`) is started again, without
    counting as a failure — the cluster may be busy, or still adding nodes — as long as
    ``placeable()`` passes."""
    from ray.train import ControllerError, WorkerGroupError

    from bootdiff.errors import deterministic

    failures = 0
    while True:
        try:
            return make().fit()
        except ControllerError as err:  # the worker group did not start: still placeable?
            if placeable is None:
                raise
            placeable()
            print(f"[bootdiff] {what}: its Train workers did not start in time ({err.controller_failure}); "
                  f"waiting for room on the cluster", file=sys.stderr, flush=True)
            continue
        except WorkerGroupError as err:
            errs = err.worker_failures
            final = [errs[r] for r in sorted(errs) if deterministic(errs[r])]
            if final:
                print(f"[bootdiff] {what}: {type(final[0]).__name__}: {final[0]} — not retried "
                      f"(a retry would fail the same way)", file=sys.stderr, flush=True)
                raise final[0] from err
            failures += 1
            if 0 <= max_failures < failures:
                raise
            if placeable is not None:
                placeable()
            print(f"[bootdiff] {what}: worker failure {failures}"
                  f"{'' if max_failures < 0 else f' of at most {max_failures}'}, retrying from the "
                  f"latest checkpoint: {err}", file=sys.stderr, flush=True)


def chosen_checkpoint(result) -> Tuple["object", dict]:
    """(checkpoint, its metrics) a view is exported at: the lowest ``val_G`` among those Train kept
    (`common.checkpoint_config` keeps the best) when the run reported one, else the latest."""
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if math.isfinite(float(m.get("val_G", math.nan)))]
    if scored:
        return min(scored, key=lambda cm: (float(cm[1]["val_G"]), float(cm[1].get("kimg", 0))))
    return result.checkpoint, dict(result.metrics or {})


def fit_view(cfg_yaml: str, view: str) -> dict:
    """Fit one view's trainer to completion (resuming if it ran before) and export it: at its
    held-out minimum when it is early-stopped (`early_stopped_view`), else its last checkpoint."""
    cfg = common.cfg_from_yaml(cfg_yaml)
    layout = RunLayout.of(cfg)
    start = time.time()
    evaluate = early_stopped_view(cfg, view)
    result = fit_retrying(lambda: make_trainer(cfg, cfg_yaml, view, f"view-{view}", layout.view_runs, evaluate=evaluate),
                          cfg.ray.max_failures, f"view '{view}'", cluster.placeable(cfg, cluster.placement_key(view)))
    if result.checkpoint is None:
        raise RuntimeError(f"view '{view}': training finished without a checkpoint")
    checkpoint, chosen = chosen_checkpoint(result)
    url = export_result(cfg, view, checkpoint.path)
    info = {"view": view, "start": start, "end": time.time(), "metrics": result.metrics,
            "checkpoint": checkpoint.path, "model": url}
    if evaluate:  # where it stopped, where it was taken, and whether patience or the cap ended it
        info["early_stopping"] = {
            "patience": int(cfg.views[view].train.patience), "cap_kimg": float(cfg.views[view].train.total_kimg),
            "stopped_kimg": float(result.metrics.get("kimg", math.nan)), "chosen_kimg": float(chosen.get("kimg", math.nan)),
            "val_G": float(chosen.get("val_G", math.nan)),
            "reached_cap": float(result.metrics.get("kimg", 0)) >= float(cfg.views[view].train.total_kimg) - 1e-6}
    common.write_json(layout.view_run_info(view), info)
    return info


def view_done(cfg, view: str) -> bool:
    """The view's export is complete: its ``COMPLETE`` marker, written after every file (on S3 the
    files are uploaded one by one, so ``bootdiff.json`` alone can precede a partial export)."""
    return util.is_complete(RunLayout.of(cfg).model(view))


def run(cfg, cfg_yaml: str) -> list:
    """Train every view that is not exported yet, all concurrently; return their run infos."""
    ray = entry.init_ray(cfg)
    todo = [v for v in cfg.views if not view_done(cfg, v)]
    for v in cfg.views:
        if v not in todo:
            print(f"[bootdiff] view '{v}': already exported at {RunLayout.of(cfg).model(v)}, skipped", flush=True)
    if not todo:
        return []
    # fit() blocks its caller: each trainer runs in its own zero-CPU task (docs/RAY.md), kept on the
    # driver's node (soft affinity), so losing a worker node loses only Train workers, which
    # `fit_retrying` restarts on the nodes left from the run's last checkpoint.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    remote_fit = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy=here)(fit_view)
    refs = {v: remote_fit.remote(cfg_yaml, v) for v in todo}
    print(f"[bootdiff] training {len(todo)} view model(s) concurrently: {', '.join(todo)}", flush=True)
    infos, pending = [], dict(refs)
    while pending:
        done, _ = ray.wait(list(pending.values()), num_returns=1)
        view = next(v for v, r in pending.items() if r == done[0])
        del pending[view]
        try:
            info = ray.get(done[0])
        except ray.exceptions.RayTaskError as exc:  # a user-facing error (no node left for it): its message
            if isinstance(exc.cause, ConfigError):
                raise ConfigError(f"views.{view}: {exc.cause}") from None
            raise
        infos.append(info)
        m, es = info["metrics"], info.get("early_stopping")
        taken = ""
        if es:
            why = (f"stopped by patience {es['patience']}" if not es["reached_cap"] else
                   "reached its cap still improving" if es["chosen_kimg"] >= es["stopped_kimg"] - 1e-6 else
                   "reached its cap")
            taken = f" ({why}; exported at {es['chosen_kimg']:.2f} kimg, held-out G {es['val_G']:.4f})"
        print(f"[bootdiff] view '{view}' done in {info['end'] - info['start']:.0f} s: "
              f"loss {m.get('loss', float('nan')):.4f}, {m.get('kimg', 0):.2f} kimg{taken} -> {info['model']}", flush=True)
    return infos


def _job(cfg, cfg_yaml: str) -> list:
    return [{k: i[k] for k in ("view", "start", "end", "model")} for i in run(cfg, cfg_yaml)]


if __name__ == "__main__":
    sys.exit(entry.main(_job, __doc__))
