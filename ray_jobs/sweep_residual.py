"""Stage 2 on Ray: a Ray Tune sweep of the residual denoiser over μ_var × μ_L1 × range adapter.

    python -m ray_jobs.sweep_residual --config configs/quickstart.yaml [key=value ...]

Each trial is a plain function that launches its own TorchTrainer (Ray 2.60 Train V2: no
``Tuner(trainer)``), trains `D_boot = D_comb + r(σ)·R_θ` on the scarce full-resolution shards
against the frozen, exported view models of stage 1, and reports generalization error on the
held-out validation split ``val_G`` (with ``train_G``) at each checkpoint. ASHA
stops poor residual trials early on ``val_G`` against reported ``kimg``; each trained trial is
taken at its lowest-``val_G`` checkpoint, and the best trial is the lowest ``val_G``. The test
split never chooses: after the trials, each trained trial's ``test_G`` is computed once, at the
checkpoint it is taken at (`score_on_test`). The baselines run in the same sweep: the combined
denoiser alone (no residual; evaluated, not trained), a full-resolution model trained on the
scarce set alone, and the peer methods of ``sweep.peers`` (`bootdiff.peers`, full-res networks
trained on the same data their own way, through the same Train worker as the full-res baseline).
When the sweep has a peer, the best bootstrapped trial averaged with the best peer
(`bootdiff.ensemble`, ``sweep.ensemble``: its weight chosen on validation G) is one more row,
scored in a Ray task after the trials, beside their test-G tasks. ``sweep.json`` names the best residual trial (``best``)
and the model the sweep recommends (``recommended``: the lowest validation G of all, the
ensemble included, `bootdiff.sweep.recommend`).
An interrupted sweep (Ctrl-C / SIGTERM: Tune saves its state, `trial_rows` finds the trials
it left unfinished) writes no ``sweep.json``; run again, it is restored with ``Tuner.restore``
and only unfinished trials run (`RestoreSafeASHA`: none is stopped on rungs the restore emptied),
each trial's Train run resuming from its own latest checkpoint. The outcome goes to
``{storage}/{name}/sweep/sweep.json``. The trials, their rows and the best trial are
`bootdiff.sweep`'s; the G reported at checkpoints is `bootdiff.evaluation.scores`'.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Optional

from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.schedulers import ASHAScheduler

from bootdiff import experiment, util
from bootdiff.ensemble import ensemble_trial, partner
from bootdiff.errors import deterministic
from bootdiff.evaluation.scores import generalization_pair, trial_test_G, validation_G
from bootdiff.run.layout import TUNE_NAME, RunLayout
from bootdiff.memo import memoized
from bootdiff.config import to_yaml
from bootdiff.sweep import (chosen_report, num, recommend, select_best, trial_config, trial_list, trial_residual_config,
                            trial_row)
from bootdiff.run.tb import trial_hparams
from ray_jobs import cluster, common, entry
from ray_jobs.cluster import TRIAL_TOKEN_CPU, trial_task_options, worker_cpus
from ray_jobs.train_views import fit_retrying, make_trainer, train_worker  # noqa: F401  (train_worker: pickled by name)
from ray_jobs.tune_report import fit_reporting

def residual_worker(config: dict) -> None:
    """Ray Train ``train_loop_per_worker`` of one residual trial."""
    from bootdiff.train import train

    cfg = common.cfg_from_yaml(config["cfg_yaml"])
    rcfg = trial_residual_config(cfg, config["trial"])
    rank, world, device, run_dir = common.worker_setup(cfg.sweep.trial_cpus, cfg.ray.train_log_level)
    try:
        manifest = experiment.read_manifest(cfg)
        resume = common.resume_dir(run_dir)  # a resumed run takes its fitted constants from the checkpoint
        model, loss, data = experiment.residual_training(cfg, manifest, rcfg, rank, world, run_dir=run_dir,
                                                         resume_from=resume, device=device)
        extra = common.checkpoint_evaluator(cfg, manifest, model, test=bool(config.get("curve_url"))) if rank == 0 else None
        hooks = common.RayReportHooks({"label": config["trial"]["label"]}, extra_metrics=extra,
                                      report_every_s=rcfg.train.report_every_s,
                                      pause_s=cfg.ray.inject_pause_s if resume is None else 0.0,
                                      tb=common.tensorboard_run(cfg, rank, trial_hparams(config["trial"])),
                                      **common.stopping_hooks(config, rcfg.train, rank))
        train(model, loss, data, rcfg.train, run_dir=run_dir, hooks=hooks, device=device,
              resume_from=resume, config_yaml=config["cfg_yaml"])
    finally:
        common.cleanup(run_dir)


def residual_trainer(cfg, cfg_yaml: str, trial: dict, runs: str, callbacks=None):
    """The TorchTrainer of one residual trial: one worker of ``sweep.trial_cpus`` (less the trial
    driver's token) and its resources; worker failures are `fit_retrying`'s to retry."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    sw = cfg.sweep
    resources = {"CPU": worker_cpus(cfg), **dict(sw.trial_resources)}
    if sw.trial_gpus:
        resources["GPU"] = sw.trial_gpus
    storage_path, storage_fs = common.ray_storage(runs)
    return TorchTrainer(
        residual_worker,
        train_loop_config={"cfg_yaml": cfg_yaml, "trial": trial},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=bool(sw.trial_gpus), resources_per_worker=resources,
                                     label_selector=dict(sw.trial_label_selector) or None),
        run_config=RunConfig(name=f"trial-{trial['label']}", storage_path=storage_path,
                             storage_filesystem=storage_fs, callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=0, controller_failure_limit=0), logging_config=common.train_logging(cfg),
                             checkpoint_config=common.checkpoint_config(cfg, cfg.residual.train.keep_checkpoints, True)))


def sweep_trial(config: dict, cfg_yaml: str = "", session: str = "") -> None:
    """One Tune trial: evaluate the combined baseline, or fit a TorchTrainer for the others.

    A lost Train worker is retried by `fit_retrying`, a crashed trial driver by Tune's
    FailureConfig. A deterministic failure (`bootdiff.errors.deterministic`) is recorded for this
    sweep ``session`` (`RunLayout.trial_final_error`), so Tune's retries of the trial fail at once
    with its message instead of training again; a new run of the sweep (a new session) tries again."""
    from ray import tune

    config = {**config, "cfg_yaml": cfg_yaml}
    cfg = common.cfg_from_yaml(cfg_yaml)
    trial = config["trial"]
    layout = RunLayout.of(cfg)
    runs = layout.trial_runs
    final = layout.trial_final_error(trial["label"], session)
    if session and util.exists(final):
        raise RuntimeError(f"trial {trial['label']} failed deterministically in this sweep, not retried: "
                           f"{common.read_json(final)['error']}")
    # Audit trail: one object per trial start (a restored sweep starts only unfinished trials).
    common.write_json(layout.trial_start_event(trial["label"], time.time_ns()), {"trial": trial, "time": time.time()})
    if trial["kind"] == "combined":
        manifest = experiment.read_manifest(cfg)
        combined = experiment.build_combined(cfg, manifest).to(util.compute_device())  # the trial's GPU, if any
        memo = memoized(combined, layout.eval_cache)  # reused by evaluate
        test, train = generalization_pair(cfg, manifest, memo)
        val = validation_G(cfg, manifest, memo)
        memo.save()
        tune.report({"kimg": cfg.residual.train.total_kimg, "step": 0, "test_G": test["total"],
                     "train_G": train["total"], "label": trial["label"],
                     **({"val_G": val} if math.isfinite(val) else {})})
        return
    if trial["kind"] != "residual":  # the full-res baseline or a peer (at its grid setting)
        tcfg = trial_config(cfg, trial)
        tyaml = config["cfg_yaml"] if tcfg is cfg else to_yaml(tcfg)

        def make(callbacks):
            return make_trainer(tcfg, tyaml, trial["kind"], f"trial-{trial['label']}", runs,
                                callbacks=callbacks, evaluate=True, cpus_per_worker=worker_cpus(cfg))
    else:
        def make(callbacks):
            return residual_trainer(cfg, config["cfg_yaml"], trial, runs, callbacks=callbacks)

    def fit(callbacks):
        return fit_retrying(lambda: make(callbacks), cfg.ray.max_failures, f"trial '{trial['label']}'",
                            cluster.placeable(cfg, cluster.placement_key(trial["kind"])))

    try:  # the Train run's reports reach Tune through this thread (`tune_report`: Ray's bridge can hang)
        fit_reporting(fit)
    except Exception as exc:
        if session and deterministic(exc):
            common.write_json(final, {"error": f"{type(exc).__name__}: {exc}"[:2000]})
        raise


class RestoreSafeASHA(ASHAScheduler):
    """ASHA that never stops a trial on rung data lost to a restore (docs/RAY.md §7).

    ``Tuner.restore`` re-creates the scheduler from the TuneConfig pickled when the sweep started,
    so ASHA's rungs start empty (a known Ray limitation): a resumed trial's first report would pass
    every milestone below its kimg at once and be judged against the few results the new rungs
    hold. A trial that had reported before the restore (its ``last_result`` is restored with it)
    is exempt: it runs to its budget. Its results still enter the rungs, and trials that start
    after the restore are judged by ASHA as usual.

    The baselines (full-res, combined) are not ASHA's to judge: their results never enter the
    rungs and they are never stopped, so they report ``val_G`` at every checkpoint like the
    residual trials."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.restored = set()  # ids of trials that had reported before a restore

    @staticmethod
    def baseline(trial) -> bool:
        return ((getattr(trial, "config", None) or {}).get("trial") or {}).get("kind", "residual") != "residual"

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        if self._time_attr in (trial.last_result or {}):
            self.restored.add(trial.trial_id)

    def on_trial_complete(self, tune_controller, trial, result):
        if self.baseline(trial):
            self._trial_info.pop(trial.trial_id, None)
            return
        super().on_trial_complete(tune_controller, trial, result)

    def on_trial_result(self, tune_controller, trial, result):
        if self.baseline(trial):
            return self.CONTINUE
        action = super().on_trial_result(tune_controller, trial, result)
        if action == self.STOP and trial.trial_id in self.restored and result.get(self._time_attr, 0) < self._max_t:
            self._num_stopped -= 1
            return self.CONTINUE
        return action


def trial_rows(cfg, grid, experiment_path: str, storage_fs=None) -> list:
    """The trials table (`bootdiff.sweep.trial_row` rows): each trial's last reported metrics from
    ``ResultGrid.get_dataframe()``, the checkpoint it is taken at (its lowest ``val_G``,
    `bootdiff.sweep.chosen_report`) from its ``Result``'s ``metrics_dataframe``, its error from its
    ``Result``, and whether it
    ended from Tune's saved experiment state. After Ctrl-C, Tune saves the state (running trials
    RUNNING, the others PENDING) before it stops the trials, whose in-memory status then reads
    TERMINATED like an ASHA stop (docs/RAY.md §7); the saved state tells them apart."""
    from ray.tune import ExperimentAnalysis

    df = grid.get_dataframe()
    last = {r["config/trial/label"]: r for r in df.to_dict("records")} if "config/trial/label" in df else {}
    # A trial that never reported has no config in its Result: found by its path instead.
    results = {(r.config["trial"]["label"] if r.config else r.path): r for r in grid}
    rows = []
    for t in ExperimentAnalysis(experiment_path, storage_filesystem=storage_fs).trials:
        trial = t.config["trial"]
        result = results.get(trial["label"], results.get(t.path))
        m = {k: v for k, v in last.get(trial["label"], {}).items()
             if not (isinstance(v, float) and math.isnan(v))}
        ckpt = result.checkpoint.path if result is not None and result.checkpoint else None
        history = result.metrics_dataframe if result is not None else None
        chosen = chosen_report(history.to_dict("records")) if history is not None else None
        rows.append(trial_row(cfg, trial, m, ckpt, result.error if result is not None else None,
                              finished=t.status in ("TERMINATED", "ERROR"), chosen=chosen))
    return rows


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


def _ensemble(cfg_yaml: str, rows: list, best_id) -> Optional[dict]:
    cfg = common.cfg_from_yaml(cfg_yaml)
    return ensemble_trial(cfg, experiment.read_manifest(cfg), rows, best_id)


def _trial_test_G(cfg_yaml: str, row: dict) -> dict:
    cfg = common.cfg_from_yaml(cfg_yaml)
    return trial_test_G(cfg, experiment.read_manifest(cfg), row)


def score_on_test(cfg, cfg_yaml: str, rows: list, best_id) -> Optional[dict]:
    """Fill in ``test_G`` (and its curve, ``test_curve``) of every trained trial at the checkpoint
    it is taken at (`bootdiff.evaluation.scores.trial_test_G`), and return the ensemble row of the
    best bootstrapped trial ``best_id`` and the best peer (`bootdiff.ensemble.ensemble_trial`: its
    weight chosen on validation G), or None when there is none to make (no peer, no bootstrapped
    trial, ``sweep.ensemble=[]``). During training the trials report validation and training G
    only, so the test split is met once per trial, after every choice was made on validation.

    One Ray task per trial and one for the ensemble, each with a sweep trial's resources, all
    submitted at once: they run side by side on the cluster the trials had (the ensemble, the
    longest, first), and Ray reuses a finished task's worker process for the next, so the workers'
    start-up (imports) is paid once per concurrent task, not once per trial."""
    import ray

    todo = [r for r in rows if r.get("checkpoint") and r["kind"] not in ("combined", "ensemble")
            and not math.isfinite(num(r.get("test_G")))]
    want_ensemble = bool(cfg.sweep.ensemble) and partner(rows) is not None and best_id is not None
    if not todo and not want_ensemble:
        return None
    print(f"[bootdiff] test G of {len(todo)} trained trial(s) at the checkpoint each is taken at"
          f"{' and the ensemble' if want_ensemble else ''} ...", flush=True)
    options = trial_task_options(cfg, max_retries=2)
    ens_ref = ray.remote(**options)(_ensemble).remote(cfg_yaml, rows, best_id) if want_ensemble else None
    refs = [ray.remote(**options)(_trial_test_G).remote(cfg_yaml, r) for r in todo]
    for r, g in zip(todo, ray.get(refs)):
        r["test_G"], r["test_curve"] = g["total"], g  # the curve: evaluation reuses it (scores.reusable_curve)
    row = ray.get(ens_ref) if ens_ref is not None else None
    if row is not None:
        tried = ", ".join(f"{w} → {g:.4f}" for w, g in row["val_G_by_weight"].items())
        print(f"[bootdiff] ensemble: {row['weights'][0]:g} × {row['members'][0]} + {row['weights'][1]:g} × "
              f"{row['members'][1]}, the weight of the lowest validation G (tried: {tried}); validation G "
              f"{row['val_G']:.4f}, test G {row['test_G']:.4f}", flush=True)
    return row


def run(cfg, cfg_yaml: str) -> dict:
    """Run (or restore and finish) the sweep; write and return ``sweep.json``."""
    ray = entry.init_ray(cfg)
    from ray import tune

    layout = RunLayout.of(cfg)
    out = layout.sweep_json
    if sweep_done(cfg):
        print(f"[bootdiff] sweep already complete: {out}", flush=True)
        return common.read_json(out)
    trials = trial_list(cfg)
    # Only reports made at checkpoints carry G (evaluating costs time); the others show training
    # progress. ASHA acts on the reports that carry its metric, val_G, and skips the rest; the
    # test split's G is computed after the trials, at each one's chosen checkpoint (score_on_test).
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Tune's own result files (result.json, progress.csv: the sweep's records read them), without
    # its TensorBoard logger: the runs' curves are bootdiff's (tb/), and that logger makes Tune print
    # a `tensorboard --logdir <Ray session folder>` line that points a newcomer at the wrong place.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    entry.keep_credentials_out_of_tune()  # Tune would publish the driver's cloud keys in its trials' runtime_env
    # A token share per trial: the trial's own Train workers hold the real resources (docs/RAY.md).
    trainable = tune.with_resources(tune.with_parameters(sweep_trial, cfg_yaml=cfg_yaml, session=str(time.time_ns())),
                                    {"CPU": TRIAL_TOKEN_CPU})
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
            scheduler = RestoreSafeASHA(time_attr="kimg", max_t=rt.total_kimg,
                                        grace_period=min(rt.total_kimg, cfg.sweep.asha.grace_period * rt.total_kimg / evals),
                                        reduction_factor=cfg.sweep.asha.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(trials)},
            tune_config=tune.TuneConfig(metric="val_G", mode="min", scheduler=scheduler,
                                        max_concurrent_trials=cfg.sweep.max_concurrent or concurrency(cfg, ray),
                                        trial_dirname_creator=lambda t: f"trial-{t.config['trial']['label']}"),
            # A crashed trial driver (the trial's own process) is retried from its Train checkpoint.
            run_config=tune.RunConfig(name=TUNE_NAME, storage_path=storage_path, storage_filesystem=storage_fs,
                                      failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures),
                                      callbacks=[JsonLoggerCallback(), CSVLoggerCallback()], verbose=1),
        )
    print(f"[bootdiff] sweep of {len(trials)} trials ({', '.join(t['label'] for t in trials)})", flush=True)
    grid = tuner.fit()  # returns normally on Ctrl-C / SIGTERM, after saving its state (docs/RAY.md §7)
    rows = trial_rows(cfg, grid, restore_path, storage_fs)
    # Tune creates trials lazily: one the interrupted sweep had not created yet has no row at all.
    known = {r["trial_id"] for r in rows}
    unfinished = [r["trial_id"] for r in rows if r["status"] == "interrupted"] + \
        [t["label"] for t in trials if t["label"] not in known]
    if unfinished:  # nothing is recorded as finished: the next run restores the Tune experiment
        raise entry.Interrupted(
            f"the sweep ({len(unfinished)} of {len(trials)} trials unfinished: {', '.join(unfinished)}; "
            f"Tune saved its state at {tune_path})")
    errors = [r for r in rows if r["error"]]
    if errors:
        raise RuntimeError(f"{len(errors)} sweep trial(s) failed: " + "; ".join(f"{r['trial_id']}: {r['error']}" for r in errors))
    best = select_best(rows)  # on validation G: the test split is scored after every choice
    ens = score_on_test(cfg, cfg_yaml, rows, best["trial_id"] if best else None)
    if ens is not None:
        rows.append(ens)
    rec = recommend(rows)
    outcome = {"trials": rows, "best": best["trial_id"] if best else None,
               "recommended": rec["trial_id"] if rec else None, "tune_path": tune_path}
    common.write_json(out, outcome)
    print(f"[bootdiff] sweep done; best {outcome['best']} (chosen on validation G {best['val_G']:.4f}; "
          f"test G {best['test_G']:.4f})" if best else
          "[bootdiff] sweep done; no residual trial finished", flush=True)
    if rec is not None and rec is not best:
        print(f"[bootdiff] recommended model: {rec['trial_id']} (validation G {rec['val_G']:.4f}, lower than "
              f"every bootstrapped trial's; test G {rec['test_G']:.4f})", flush=True)
    return outcome


def _job(cfg, cfg_yaml: str) -> dict:
    outcome = run(cfg, cfg_yaml)
    return {"best": outcome["best"], "trials": len(outcome["trials"])}


if __name__ == "__main__":
    sys.exit(entry.main(_job, __doc__))
