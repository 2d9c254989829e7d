"""The data-efficiency benchmark's models as Ray Train runs (``benchmarks/data_efficiency.py``
without ``--local``); the benchmark itself is `bootdiff.efficiency`.

Each job trains through the pipeline's own trainers — `ray_jobs.train_views.make_trainer` for
the view models, the N-image baselines and the oracle; `ray_jobs.sweep_residual.residual_worker`
for the residuals — under ``{out}/ray/<model>`` (a re-submitted run resumes from its latest
checkpoint, docs/RAY.md), then is scored by `bootdiff.efficiency.models.evaluate_job`. The jobs of one
stage run concurrently, each ``fit()`` in its own zero-CPU task (``fit`` blocks its caller).
"""

from __future__ import annotations

import json

from bootdiff import util
from bootdiff.efficiency.models import PEER_NAMES, job_cfg
from bootdiff.efficiency.run import run_job
from bootdiff.run.layout import RunLayout
from ray_jobs import cluster, common, entry


def train_ray(job: dict, b: dict, out: str) -> dict:
    """Fit one job's TorchTrainer to completion (resuming a run of the same name) -> checkpoint, curve."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from bootdiff.config import to_yaml
    from bootdiff.experiment import export_result
    from bootdiff.stopping import early_stopped_view
    from ray_jobs.cluster import worker_cpus
    from ray_jobs.sweep_residual import residual_worker
    from ray_jobs.train_views import chosen_checkpoint, fit_retrying, make_trainer

    cfg = job_cfg(job, b)
    cfg_yaml = to_yaml(cfg)
    storage = util.join(out, "ray")
    name = job["id"].replace("/", "__")
    # G at every checkpoint, written by the worker (`bootdiff.efficiency.train.CurveHooks`), which
    # also stops a selection run by patience on it: its "test" split is its validation carve-out
    curve_url = util.join(storage, name, "curve.json")
    if job["kind"] in ("view", "full_res", *PEER_NAMES):
        view = job["view"] if job["kind"] == "view" else job["kind"]
        # through fit_retrying like every other Train run: a lost worker is retried from the run's
        # checkpoint, a worker group that cannot start waits while some node can take it
        scored = job["kind"] != "view" or early_stopped_view(cfg, view)  # a view: on its held-out samples
        result = fit_retrying(lambda: make_trainer(cfg, cfg_yaml, view, name, storage, evaluate=scored,
                                                   curve_url=curve_url if scored else ""),
                              cfg.ray.max_failures, f"data-efficiency {job['id']}",
                              cluster.placeable(cfg, cluster.placement_key(view)))
    else:
        sw = cfg.sweep
        resources = {"CPU": worker_cpus(cfg), **dict(sw.trial_resources)}
        if sw.trial_gpus:
            resources["GPU"] = sw.trial_gpus
        path, fs = common.ray_storage(storage)
        trainer = TorchTrainer(
            residual_worker, train_loop_config={"cfg_yaml": cfg_yaml, "trial": job["trial"], "curve_url": curve_url},
            scaling_config=ScalingConfig(num_workers=1, use_gpu=bool(sw.trial_gpus), resources_per_worker=resources),
            run_config=RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                                 failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                                 logging_config=common.train_logging(cfg)))
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"data-efficiency: {job['id']} finished without a checkpoint")
    ckpt = RunLayout.of(cfg).url(result.checkpoint.path)
    if job["kind"] == "view":  # an early-stopped view at its held-out minimum
        ckpt = RunLayout.of(cfg).url(chosen_checkpoint(result)[0].path)
        export_result(cfg, job["view"], ckpt)
    kimg = float(result.metrics.get("kimg", 0))
    tcfg = (cfg.residual.train if job["kind"] == "residual" else cfg.views[job["view"]].train if job["kind"] == "view"
            else cfg.full_res.train)
    curve = json.loads(util.read_bytes(curve_url)) if util.exists(curve_url) else []
    return {"checkpoint": ckpt, "curve": curve, "kimg": kimg, "stopped_early": kimg < float(tcfg.total_kimg) - 1e-6}


def _run_job(job: dict, b: dict, out: str, num_samples: int) -> dict:
    return run_job(job, b, out, num_samples, train_fn=train_ray)


def ray_runner(cfg):
    """A `bootdiff.efficiency.run.run_benchmark` runner: a stage's jobs concurrently on the cluster,
    each finished row yielded as it arrives (so it is persisted at once)."""

    def run(todo, b, out, num_samples):
        if not todo:
            return
        ray = entry.init_ray(cfg)
        remote = ray.remote(num_cpus=0, max_retries=0)(_run_job)
        pending = {remote.remote(j, b, out, num_samples): j for j in todo}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            yield job, ray.get(done[0])

    return run
