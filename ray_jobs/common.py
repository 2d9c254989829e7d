"""What the Ray stages' drivers and Train workers share: Ray storage for ``file``/``s3://`` URLs,
JSON on storage, and the hooks that hand `bootdiff.train` reports and checkpoints (with held-out
G) to ``ray.train.report``. The command line, `main` and joining Ray are `ray_jobs.entry`'s.
Thin on purpose: the work itself is `bootdiff`'s."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from typing import Optional, Tuple

from bootdiff import util
from bootdiff.config import ExperimentConfig, from_yaml
from bootdiff.run.layout import absolute_url
from bootdiff.run.scratch import scratch_dir


def cfg_from_yaml(text: str) -> ExperimentConfig:
    return from_yaml(text, ExperimentConfig)


def ray_storage(url: str):
    """(storage_path, storage_filesystem) for Ray's RunConfig from a bootdiff storage URL."""
    if url.startswith("s3://"):
        import pyarrow.fs as pafs

        fs, path = util.url_fs(url)
        return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    return absolute_url(url), None


def write_json(url: str, obj) -> None:
    util.atomic_write_bytes(url, json.dumps(obj, indent=2, default=str).encode())


def read_json(url: str):
    return json.loads(util.read_bytes(url))


def checkpoint_evaluator(cfg, manifest: dict, model, test: bool = False):
    """``extra_metrics`` for `RayReportHooks`: validation and training G of the EMA weights at
    each checkpoint (`bootdiff.evaluation.scores.evaluate_checkpoint`), reported as ``val_G`` /
    ``train_G``. ``val_G`` is what the sweep follows and chooses on: ASHA, the checkpoint of each
    trained model (`checkpoint_config`), the best trial; the test split's G is computed once, at
    the checkpoint chosen (`bootdiff.evaluation.scores.trial_test_G`). ``test_G`` is reported at
    every checkpoint too with ``test`` (a data-efficiency job's curve) or when the run has no
    ``val`` split (nothing then chooses, and the held-out curve is the test split's)."""
    from bootdiff.evaluation.scores import evaluate_checkpoint

    def extra(checkpoint_dir: str) -> dict:
        m = evaluate_checkpoint(cfg, manifest, model, checkpoint_dir, test=test)
        return {k: m[k] for k in ("val_G", "test_G", "train_G") if math.isfinite(m[k])}

    return extra


def view_checkpoint_evaluator(cfg, manifest: dict, view: str, model):
    """``extra_metrics`` for `RayReportHooks` of an early-stopped view model: ``val_G``, the G of
    the checkpoint's EMA weights on the view's held-out samples
    (`bootdiff.evaluation.scores.evaluate_view_checkpoint`), what its patience and the checkpoint
    it is exported at are chosen on; not reported when the run has no such split."""
    from bootdiff.evaluation.scores import evaluate_view_checkpoint

    def extra(checkpoint_dir: str) -> dict:
        g = evaluate_view_checkpoint(cfg, manifest, view, model, checkpoint_dir)["val_G"]
        return {"val_G": g} if math.isfinite(g) else {}

    return extra


def curve_hooks(config: dict, tcfg, rank: int, key: str = "test_G"):
    """Rank 0's `bootdiff.efficiency.train.CurveHooks` when the run's ``train_loop_config`` names
    a ``curve_url`` (a data-efficiency job, `ray_jobs.efficiency`): G at every checkpoint kept
    in storage (Train's own result keeps only the retained checkpoints' metrics), and patience
    on it (``train.patience``, replayed from that file on resume); else None."""
    if rank != 0 or not config.get("curve_url"):
        return None
    from bootdiff.efficiency.train import CurveHooks

    return CurveHooks(config["curve_url"], int(tcfg.patience), float(tcfg.patience_from_kimg), key=key)


def stopping_hooks(config: dict, tcfg, rank: int, curve_key: str = "test_G") -> dict:
    """`RayReportHooks`' early stopping for a worker's ``train_loop_config``: a data-efficiency
    job's curve file and patience on its ``curve_key`` (`curve_hooks`: ``test_G``, the selection
    runs' carve-out; ``val_G`` for a view), else patience on ``val_G`` (`early_stopper`)."""
    curve = curve_hooks(config, tcfg, rank, curve_key)
    return {"hooks": curve if curve is not None else early_stopper(tcfg, rank)}


def early_stopper(tcfg, rank: int, key: str = "val_G"):
    """Rank 0's `bootdiff.stopping.Patience` on ``key`` for a run evaluated at its checkpoints
    with ``train.patience`` > 0, else None. A run resumed by Train counts its patience afresh from
    the resumed checkpoint (the reports before it are Train's, not the worker's), so it stops at
    most ``patience`` checkpoints later than it would have uninterrupted. Checkpoints before
    ``train.patience_from_kimg`` do not count."""
    from bootdiff.stopping import Patience

    if rank != 0 or int(tcfg.patience) <= 0:
        return None
    return Patience(tcfg.patience, key, start_kimg=float(tcfg.patience_from_kimg))


def checkpoint_config(cfg, keep: int, chosen_on_val: bool, num_val: Optional[int] = None):
    """Train's ``CheckpointConfig``: keep ``keep`` checkpoints. With ``chosen_on_val`` (a run
    evaluated at its checkpoints, with a validation split of ``num_val`` samples, default
    ``data.num_val``; a view's is ``data.num_view_val``) those are the ``keep`` lowest ``val_G``
    (Train V2 also keeps the latest, for resuming), so the checkpoint a trial or view is taken at —
    its validation minimum (`bootdiff.sweep.chosen_report`, `ray_jobs.train_views.fit_view`) — is
    never deleted; else the latest."""
    from ray.train import CheckpointConfig

    if chosen_on_val and int(cfg.data.num_val if num_val is None else num_val) > 0:
        return CheckpointConfig(num_to_keep=max(1, keep), checkpoint_score_attribute="val_G",
                                checkpoint_score_order="min")
    return CheckpointConfig(num_to_keep=max(1, keep))


def tensorboard_run(cfg, rank: int, hparams: Optional[dict] = None):
    """Rank 0's TensorBoard run of this Ray Train run, named as the run (``view-<v>``,
    ``trial-<label>``): ``{storage}/{name}/tb/<run>`` (`bootdiff.run.tb`); None on other ranks."""
    if rank != 0:
        return None
    import ray.train

    from bootdiff.run.layout import RunLayout
    from bootdiff.run.tb import TensorBoardRun

    return TensorBoardRun(RunLayout.of(cfg).tb_run(ray.train.get_context().get_experiment_name()), hparams)


class RayReportHooks:
    """`bootdiff.train` hooks that report through ``ray.train.report``.

    `bootdiff.train` calls ``on_report`` on every rank at the same steps (every
    ``train.report_every`` steps and at each checkpoint); those go to stdout (and TensorBoard).
    Only some are passed on to Ray (`report_to_ray`): every checkpoint report, and otherwise at
    most one per ``report_every_s`` seconds, because a ``ray.train.report`` made less than Ray
    Train's poll interval (2 s) after the previous one blocks training (docs/RAY.md §3). Ray's
    report is a barrier, so rank 0 decides and broadcasts (`ray_report_due`). Rank 0 hands its
    freshly written local checkpoint directory to Ray, which persists it to the run's storage;
    ``extra_metrics(checkpoint_dir)`` (rank 0, at checkpoints) adds e.g. held-out G, and
    ``eval_s``, its time. Reports to Ray carry ``worker_start_time`` and ``report_time`` (epoch
    seconds) for the pipeline's time breakdown (`ray_jobs.pipeline.time_breakdown`).
    ``pause_s`` (test hook, ``ray.inject_pause_s``; the caller passes 0 on a resumed attempt):
    rank 0 waits that long once, after its first checkpoint report, so a test can lose the run's
    node while it is mid-run however fast the machine trains.
    ``fail_at_step`` injects one failure (test hook): rank 0 raises once, after its report,
    remembered by a marker URL. Only rank 0: its report, the one with the checkpoint, is put on
    Ray's queue after the other ranks' (it uploads first), so the controller has every rank's report
    of that step when it sees the failure and keeps the checkpoint. A rank > 0 raising could be seen
    before rank 0's upload ends, and the run would resume one checkpoint earlier.
    ``hooks`` (optional, rank 0: `stopping_hooks`) receive every report after ``extra_metrics``
    and may end the run through their ``should_stop`` (`bootdiff.stopping.Patience`, or the
    benchmark's `bootdiff.efficiency.train.CurveHooks`).
    """

    def __init__(self, tag: dict, extra_metrics=None, fail_at_step: int = -1, fail_marker: str = "",
                 report_every_s: float = 5.0, tb=None, hooks=None, pause_s: float = 0.0):
        self.tag = tag
        self.hooks = hooks
        self.extra_metrics = extra_metrics
        self.fail_at_step = fail_at_step
        self.fail_marker = fail_marker
        self.report_every_s = report_every_s
        self.tb = tb  # rank 0's bootdiff.run.tb.TensorBoardRun (`tensorboard_run`), None on other ranks
        self.last_ray_report = time.monotonic()
        self.worker_start_time = time.time()  # for the pipeline's time breakdown (ray_jobs/pipeline.py)
        self.ray_reports = 0  # reports passed on to Ray (all of them carry the same steps on every rank)
        self.pause_s = pause_s
        self.rank = None  # only rank 0 injects the failure or pauses (see above); read from Train only then
        if fail_at_step >= 0 or pause_s > 0:
            import ray.train

            self.rank = ray.train.get_context().get_world_rank()

    def on_report(self, metrics: dict, checkpoint_url: Optional[str]) -> None:
        metrics = {**metrics, **self.tag}
        if checkpoint_url and self.extra_metrics is not None:
            t = time.time()
            metrics.update(self.extra_metrics(checkpoint_url))
            metrics["eval_s"] = time.time() - t
        if self.hooks is not None:
            self.hooks.on_report(metrics, checkpoint_url)
        self.to_tensorboard(metrics, checkpoint_url)
        self.report_to_ray(metrics, checkpoint_url)
        if checkpoint_url and self.pause_s > 0 and self.rank == 0:
            time.sleep(self.pause_s)  # the test hook above: once
            self.pause_s = 0.0
        if 0 <= self.fail_at_step <= int(metrics.get("step", -1)) and self.rank == 0 and not util.exists(self.fail_marker):
            util.atomic_write_bytes(self.fail_marker, f"failed at step {metrics.get('step')}\n".encode())
            raise RuntimeError(f"injected failure at step {metrics.get('step')} (ray.inject_failure_step)")

    def should_stop(self) -> bool:
        return bool(getattr(self.hooks, "should_stop", lambda: False)())

    def on_start(self, info: dict) -> None:
        """`bootdiff.train` has (re)started at ``info["kimg"]``: rank 0 opens its TensorBoard run
        there (a resumed run's later events are cut away: no step twice)."""
        if self.tb is not None:
            self.tb.open(round(info["kimg"] * 1000))

    def to_tensorboard(self, metrics: dict, checkpoint_url: Optional[str]) -> None:
        """Every report goes to TensorBoard (rank 0); at checkpoints its files are uploaded."""
        if self.tb is not None:
            self.tb.log(metrics, upload=checkpoint_url is not None)

    def on_end(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def ray_report_due(self, checkpoint_url: Optional[str]) -> bool:
        """Rank 0's decision, the same on every rank: a checkpoint (only rank 0 gets its URL), or
        ``report_every_s`` elapsed since the last report to Ray."""
        import torch
        import torch.distributed as dist

        due = checkpoint_url is not None or time.monotonic() - self.last_ray_report >= self.report_every_s
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            on_gpu = dist.get_backend() == "nccl"
            flag = torch.tensor([float(due)], device=torch.cuda.current_device() if on_gpu else "cpu")
            dist.broadcast(flag, src=0)
            due = bool(flag.item())
        return due

    def report_to_ray(self, metrics: dict, checkpoint_url: Optional[str]) -> None:
        """``ray.train.report`` (with rank 0's checkpoint) when `ray_report_due`; else nothing."""
        import ray.train

        if not self.ray_report_due(checkpoint_url):
            return
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_url) if checkpoint_url else None
        metrics = {**metrics, "worker_start_time": self.worker_start_time, "report_time": time.time()}
        ray.train.report(metrics, checkpoint=checkpoint)
        self.last_ray_report = time.monotonic()
        self.ray_reports += 1


def resume_dir(run_dir: str) -> Optional[str]:
    """Local copy, inside the worker's ``run_dir`` (removed with it when the worker ends), of the
    run's latest checkpoint (Ray restores it on retry or re-submission); None for a fresh run."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    from bootdiff.checkpoint import load_checkpoint

    local = ckpt.to_directory(tempfile.mkdtemp(prefix="resume-", dir=run_dir))
    print(f"[bootdiff] resuming from step {load_checkpoint(local).get('step')} ({ckpt.path})", flush=True)
    return local


def train_logging(cfg):
    """Ray Train's ``LoggingConfig`` at ``ray.train_log_level``: at INFO Train prints a line per
    report (the whole metrics dict) and per checkpoint, which drowns the workers' own progress
    lines on the console. Ray's session log files keep every level."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level=str(cfg.ray.train_log_level))


def quiet_report_log(level: str) -> None:
    """Ray 2.60's "Reporting training result …" line comes from a logger named by its module's file
    path, which `LoggingConfig`'s filter (``ray.train.*`` names only) does not reach (docs/RAY.md
    §4); set that logger to ``level`` too. Its session log file (Ray's worker log) still has it."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(str(level).upper())


def worker_setup(cpus: float, log_level: str = "WARNING") -> Tuple[int, int, "object", str]:
    """(rank, world size, device, local run dir) inside a Ray Train worker; Train's per-report
    console line quieted to ``log_level`` (`quiet_report_log`)."""
    import ray.train
    import ray.train.torch
    import torch

    quiet_report_log(log_level)
    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, int(cpus)))
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), scratch_dir("bootdiff-run")


def cleanup(path: Optional[str]) -> None:
    if path and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
