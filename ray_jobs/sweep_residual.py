"""Stage 2 on Ray: a Ray Tune sweep of the residual denoiser over μ_var × μ_L1 × range adapter.

    python -m ray_jobs.sweep_residual --config configs/quickstart.yaml [key=value ...]

Each trial is a plain function that launches its own TorchTrainer (Ray 2.60 Train V2: no
``Tuner(trainer)``), trains `D_boot = D_comb + r(σ)·R_θ` on the scarce full-resolution shards
against the frozen, exported view models of stage 1, and reports held-out generalization error
``test_G`` (and ``train_G``) at each checkpoint. ASHA stops poor trials early on ``test_G``
against reported ``kimg``. The baselines run in the same sweep: the combined denoiser alone (no
residual; evaluated, not trained) and a full-resolution model trained on the scarce set alone.
An interrupted sweep is restored with ``Tuner.restore`` and only unfinished trials run; each
trial's Train run resumes from its own latest checkpoint. The outcome goes to
``{storage}/{name}/sweep/sweep.json``. The trials, their rows and the best trial are
`bootdiff.sweep`'s; the G reported at checkpoints is `bootdiff.evaluate`'s.
"""

from __future__ import annotations

import os
import sys
import time

from bootdiff import experiment, util
from bootdiff.evaluate import generalization_pair
from bootdiff.layout import TUNE_NAME, RunLayout
from bootdiff.sweep import select_best, trial_list, trial_residual_config, trial_row
from ray_jobs import common
from ray_jobs.train_views import make_trainer, train_worker  # noqa: F401  (train_worker: pickled by name)

# Each trial is a driver holding a token CPU share; its Train worker gets the rest of trial_cpus,
# so one trial's whole footprint is trial_cpus and `concurrency` trials fit the cluster exactly.
TRIAL_TOKEN_CPU = 0.01


def worker_cpus(cfg) -> float:
    return max(cfg.sweep.trial_cpus - TRIAL_TOKEN_CPU, TRIAL_TOKEN_CPU)


def residual_worker(config: dict) -> None:
    """Ray Train ``train_loop_per_worker`` of one residual trial."""
    from bootdiff.train import train

    cfg = common.cfg_from_yaml(config["cfg_yaml"])
    rcfg = trial_residual_config(cfg, config["trial"])
    rank, world, device, run_dir = common.worker_setup(cfg.sweep.trial_cpus)
    manifest = experiment.read_manifest(cfg)
    resume = common.resume_dir()  # a resumed run takes its fitted constants from the checkpoint
    model, loss, data = experiment.residual_training(cfg, manifest, rcfg, rank, world,
                                                     run_dir=run_dir, resume_from=resume)
    extra = common.checkpoint_evaluator(cfg, manifest, model) if rank == 0 else None
    hooks = common.RayReportHooks({"label": config["trial"]["label"]}, extra_metrics=extra)
    try:
        train(model, loss, data, rcfg.train, run_dir=run_dir, hooks=hooks, device=device,
              resume_from=resume, config_yaml=config["cfg_yaml"])
    finally:
        common.cleanup(run_dir)


def sweep_trial(config: dict, cfg_yaml: str = "") -> None:
    """One Tune trial: evaluate the combined baseline, or fit a TorchTrainer for the others."""
    from ray import tune
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    config = {**config, "cfg_yaml": cfg_yaml}
    cfg = common.cfg_from_yaml(cfg_yaml)
    trial = config["trial"]
    layout = RunLayout.of(cfg)
    runs = layout.trial_runs
    # Audit trail: one object per trial start (a restored sweep starts only unfinished trials).
    common.write_json(layout.trial_start_event(trial["label"], time.time_ns()), {"trial": trial, "time": time.time()})
    if trial["kind"] == "combined":
        manifest = experiment.read_manifest(cfg)
        test, train = generalization_pair(cfg, manifest, experiment.build_combined(cfg, manifest))
        tune.report({"kimg": cfg.residual.train.total_kimg, "step": 0, "test_G": test["total"],
                     "train_G": train["total"], "label": trial["label"]})
        return
    if trial["kind"] == "full_res":
        trainer = make_trainer(cfg, config["cfg_yaml"], "full_res", f"trial-{trial['label']}", runs,
                               callbacks=[TuneReportCallback()], evaluate=True, cpus_per_worker=worker_cpus(cfg))
    else:
        sw = cfg.sweep
        resources = {"CPU": worker_cpus(cfg), **dict(sw.trial_resources)}
        if sw.trial_gpus:
            resources["GPU"] = sw.trial_gpus
        storage_path, storage_fs = common.ray_storage(runs)
        trainer = TorchTrainer(
            residual_worker,
            train_loop_config={"cfg_yaml": config["cfg_yaml"], "trial": trial},
            scaling_config=ScalingConfig(num_workers=1, use_gpu=bool(sw.trial_gpus), resources_per_worker=resources),
            run_config=RunConfig(name=f"trial-{trial['label']}", storage_path=storage_path,
                                 storage_filesystem=storage_fs, callbacks=[TuneReportCallback()],
                                 failure_config=FailureConfig(max_failures=cfg.ray.max_failures)))
    trainer.fit()


def concurrency(cfg, ray) -> int:
    """How many trials' Train workers fit on the cluster at once. More would start worker groups
    that wait for resources and time out (Train V2 then retries them forever)."""
    total = ray.cluster_resources()
    sw = cfg.sweep
    need = {"CPU": sw.trial_cpus, "GPU": sw.trial_gpus, **dict(sw.trial_resources)}
    fits = [int(total.get(k, 0) // v) for k, v in need.items() if v > 0]
    n = min(fits) if fits else 1
    if n < 1:
        raise RuntimeError(f"sweep trial resources {need} do not fit the cluster ({total})")
    return n


def sweep_done(cfg) -> bool:
    return util.exists(RunLayout.of(cfg).sweep_json)


def run(cfg, cfg_yaml: str) -> dict:
    """Run (or restore and finish) the sweep; write and return ``sweep.json``."""
    ray = common.init_ray(cfg)
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    layout = RunLayout.of(cfg)
    out = layout.sweep_json
    if sweep_done(cfg):
        print(f"[bootdiff] sweep already complete: {out}", flush=True)
        return common.read_json(out)
    trials = trial_list(cfg)
    # Only reports made at checkpoints carry the held-out test_G (evaluating costs time); the others
    # show training progress. ASHA acts on the reports that carry test_G and skips the rest.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # A token share per trial: the trial's own Train workers hold the real resources (docs/RAY.md).
    trainable = tune.with_resources(tune.with_parameters(sweep_trial, cfg_yaml=cfg_yaml), {"CPU": TRIAL_TOKEN_CPU})
    storage_path, storage_fs = common.ray_storage(layout.sweep)
    tune_path = layout.tune
    restore_path = tune_path if not cfg.storage.startswith("s3://") else storage_path + "/" + TUNE_NAME
    if tune.Tuner.can_restore(restore_path, storage_filesystem=storage_fs):
        print(f"[bootdiff] restoring interrupted sweep at {tune_path}: only unfinished trials run", flush=True)
        tuner = tune.Tuner.restore(restore_path, trainable=trainable, resume_errored=True,
                                   storage_filesystem=storage_fs)
    else:
        rt = cfg.residual.train
        evals = max(1.0, rt.total_kimg / max(rt.checkpoint_every_kimg, 1e-9))
        scheduler = None
        if cfg.sweep.asha.enabled:
            scheduler = ASHAScheduler(time_attr="kimg", max_t=rt.total_kimg,
                                      grace_period=min(rt.total_kimg, cfg.sweep.asha.grace_period * rt.total_kimg / evals),
                                      reduction_factor=cfg.sweep.asha.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(trials)},
            tune_config=tune.TuneConfig(metric="test_G", mode="min", scheduler=scheduler,
                                        max_concurrent_trials=cfg.sweep.max_concurrent or concurrency(cfg, ray),
                                        trial_dirname_creator=lambda t: f"trial-{t.config['trial']['label']}"),
            run_config=tune.RunConfig(name=TUNE_NAME, storage_path=storage_path, storage_filesystem=storage_fs,
                                      verbose=1),
        )
    print(f"[bootdiff] sweep of {len(trials)} trials ({', '.join(t['label'] for t in trials)})", flush=True)
    grid = tuner.fit()
    rows = [trial_row(cfg, result.config["trial"], result.metrics,
                      result.checkpoint.path if result.checkpoint else None, result.error) for result in grid]
    errors = [r for r in rows if r["error"]]
    if errors:
        raise RuntimeError(f"{len(errors)} sweep trial(s) failed: " + "; ".join(f"{r['trial_id']}: {r['error']}" for r in errors))
    best = select_best(rows)
    outcome = {"trials": rows, "best": best["trial_id"] if best else None, "tune_path": tune_path}
    common.write_json(out, outcome)
    print(f"[bootdiff] sweep done; best {outcome['best']} (test G {best['test_G']:.4f})" if best else
          "[bootdiff] sweep done; no residual trial finished", flush=True)
    return outcome


def _job(cfg, cfg_yaml: str) -> dict:
    outcome = run(cfg, cfg_yaml)
    return {"best": outcome["best"], "trials": len(outcome["trials"])}


if __name__ == "__main__":
    sys.exit(common.main(_job, __doc__))
