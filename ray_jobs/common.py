"""What every Ray entry point shares: the command line and `main`, joining or starting Ray, Ray
storage for ``file``/``s3://`` URLs, and the hook that hands `bootdiff.train` reports and
checkpoints (with held-out G) to ``ray.train.report``. Thin on purpose: the work itself is
`bootdiff`'s."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Callable, List, Optional, Tuple

from bootdiff import util
from bootdiff.config import ExperimentConfig, from_yaml, load_config, to_object, to_yaml
from bootdiff.run.layout import absolute_url

# Ray Train's dashboard tab needs this before the cluster starts (docs/RAY.md).
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")


def parse_args(argv: Optional[List[str]] = None, description: str = "") -> Tuple[ExperimentConfig, str, float]:
    """``--config FILE [--wait-lease S] [--debug] [key=value ...]`` -> (typed config, resolved YAML,
    wait_lease_s)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--debug", action="store_true",
                        help="print the Python traceback behind a configuration, data or storage error")
    parser.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
    parser.add_argument("--wait-lease", type=float, default=0.0, metavar="SECONDS",
                        help="if another submission of this run holds its lease ({storage}/{name}/lease.json), "
                             "wait up to SECONDS for it (default 0: fail at once, naming it)")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. sweep.mu_var=[0,1]")
    args = parser.parse_args(argv)
    cfg = to_object(load_config(args.config, args.overrides))
    if "://" not in cfg.storage and not os.path.isabs(cfg.storage) and "runtime_resources" in os.getcwd():
        print(f"[bootdiff] WARNING: storage '{cfg.storage}' is relative to this Ray job's temporary working "
              f"directory ({os.getcwd()}); pass storage=/absolute/path or s3://... to keep the results",
              file=sys.stderr, flush=True)
    cfg.storage = absolute_url(cfg.storage)  # so Ray workers in other directories agree on it
    return cfg, to_yaml(cfg), args.wait_lease


class Interrupted(KeyboardInterrupt):
    """A stage stopped by Ctrl-C (SIGINT) or SIGTERM before it completed; its "done" marker was not
    written, so running the same command again resumes it."""


_signals: List[str] = []  # stop signals this process received that Python does not name itself


def _sigterm_as_sigint(signum, frame) -> None:
    """SIGTERM (``ray job stop``, a batch scheduler) does what Ctrl-C does: it calls whatever
    handles SIGINT now — Tune's graceful stop during a sweep (docs/RAY.md §7), else
    KeyboardInterrupt."""
    _signals.append("SIGTERM")
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def catch_sigterm() -> None:
    """Handle SIGTERM as Ctrl-C (`_sigterm_as_sigint`); main thread only, as Python requires."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm_as_sigint)


def ray_submission_id() -> Optional[str]:
    """The ``ray job submit`` submission id of this driver (None when not run as a Ray job)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    try:
        return (json.loads(raw).get("metadata") or {}).get("job_submission_id") if raw else None
    except (ValueError, AttributeError):
        return None


def main(job: Callable, description: str, argv: Optional[List[str]] = None) -> int:
    """The body of every ``python -m ray_jobs.<stage>``: parse ``--config FILE [key=value ...]``,
    take the run's lease (`bootdiff.run.lease.RunLease` at `RunLayout.lease`: a second submission of
    the same run fails at once naming the first, or waits ``--wait-lease`` seconds), run
    ``job(cfg, cfg_yaml)`` and print what it returns (if anything) as one JSON line.

    SIGTERM is handled as Ctrl-C. An interrupted job exits with 130 (SIGINT) or 143 (SIGTERM) and
    says what was interrupted; nothing unfinished is recorded as done, so the same command resumes.
    A lease held by another submission exits with 75 (EX_TEMPFAIL). A mistake in config, data or
    storage (`_user_errors`) prints the project's one-paragraph message naming the key, file or URL
    and exits with 2; ``--debug`` raises it with its traceback instead."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        return _main(job, description, argv)
    except _user_errors() as exc:
        if debug:
            raise
        print(f"[bootdiff] ERROR: {exc}\n[bootdiff] Finished work is kept; fix it and run the same command "
              f"again (--debug shows the traceback).", file=sys.stderr, flush=True)
        return 2


def _user_errors() -> tuple:
    """The exceptions that mean the user's input is at fault — a config value, a data file, the
    manifest of a run — whose messages already name the key, file or URL: `main` prints them as
    one paragraph and exits 2 (a bug still shows its traceback)."""
    from bootdiff.config.schema import ConfigError
    from bootdiff.data.shards import ManifestError
    from bootdiff.data.source import DataError

    return (ConfigError, DataError, ManifestError, StorageError)


class StorageError(OSError):
    """``storage`` cannot be written (a missing parent on a read-only file system, no permission,
    an unknown bucket): raised before anything is trained, naming the URL."""


def _main(job: Callable, description: str, argv: Optional[List[str]]) -> int:
    from bootdiff.run.layout import RunLayout
    from bootdiff.run.lease import LeaseHeld, RunLease

    cfg, cfg_yaml, wait_lease = parse_args(argv, description)
    catch_sigterm()
    init_ray(cfg)  # joins (or starts) Ray and checks the cluster can hold the run before the lease is written
    entry = "ray_jobs." + os.path.splitext(os.path.basename(sys.argv[0] or "main"))[0]
    lease = RunLease(RunLayout.of(cfg).lease, owner=f"{entry} ({cfg.name})", job_id=ray_submission_id(),
                     wait_s=wait_lease)
    try:
        lease.acquire()
    except LeaseHeld as exc:
        print(f"[bootdiff] {exc}", file=sys.stderr, flush=True)
        return 75
    except OSError as exc:  # the first write under storage: nothing exists to lose yet
        raise StorageError(f"storage '{cfg.storage}' cannot be written ({type(exc).__name__}: {exc}); set "
                           f"storage= to a writable folder or an s3:// URL you can write to") from exc
    try:
        out = job(cfg, cfg_yaml)
        lease.check()
    except KeyboardInterrupt as exc:
        what = str(exc) if isinstance(exc, Interrupted) and str(exc) else entry
        sig = _signals[-1] if _signals else "SIGINT"
        print(f"[bootdiff] INTERRUPTED ({sig}): {what}. Nothing unfinished was recorded as done; run the "
              f"same command again to resume (finished work is kept).", file=sys.stderr, flush=True)
        return 143 if sig == "SIGTERM" else 130
    finally:
        lease.release()
    if out is not None:
        print(json.dumps(out, default=str))
    return 0


def cfg_from_yaml(text: str) -> ExperimentConfig:
    return from_yaml(text, ExperimentConfig)


# The driver's environment variables that travel to Ray workers in the job's runtime_env. Ray
# publishes a runtime_env (the dashboard's Jobs API, its session logs), so no credential may be
# among them: workers take AWS credentials from the cluster's own environment — the env of
# `ray start` (inherited by every worker it starts; a local ray.init() cluster inherits the
# driver's), an instance profile / IAM role, or a Kubernetes Secret (cluster/README.md).
SHARED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
              "BOOTDIFF_CACHE", "RAY_TRAIN_ENABLE_STATE_TRACKING", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
              "PYTHONWARNINGS", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S")

# Ray's own console lines that a newcomer takes for failures and that ask nothing of them: Ray
# Data's deprecation of an option Ray Train itself passes (every Train controller prints it).
RAY_WARNINGS_IGNORED = ("ignore:`ExecutionOptions.exclude_resources` is deprecated",)


def quiet_ray(local: bool) -> None:
    """Keep Ray's internal noise off the console (set before ``ray.init``; `SHARED_ENV` carries it
    to every Ray worker): the warnings in `RAY_WARNINGS_IGNORED` (through ``PYTHONWARNINGS``, kept
    beside any the user set) and, on a cluster this process starts on its own machine, Train's
    preemption watcher — it watches for cloud nodes being preempted, which a local machine never
    is, and its actor logs a C++ error line (``PreemptionWatcher … max_restarts > 0``) on every
    Train run. A user's own ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER`` is kept."""
    have = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
    os.environ["PYTHONWARNINGS"] = ",".join(have + [w for w in RAY_WARNINGS_IGNORED if w not in have])
    if local:
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def init_ray(cfg: ExperimentConfig):
    """Join the cluster named by cfg.ray.address / RAY_ADDRESS (as under ``ray job submit``), or
    start a local one with the dashboard, and check that the cluster can hold the run
    (`ray_jobs.cluster.check`: shared storage, placements; a `ConfigError` naming the key). Non-secret settings (`SHARED_ENV`: S3 endpoint, region,
    cache) travel to the workers; credentials never do (cluster/README.md, "Credentials")."""
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    quiet_ray(local=address is None)
    if cfg.ray.worker_start_timeout_s > 0:  # how long Train waits for a worker group (docs/RAY.md §2)
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = f"{cfg.ray.worker_start_timeout_s:g}"
    env = {k: os.environ[k] for k in SHARED_ENV if k in os.environ}
    kwargs = {"runtime_env": {"env_vars": env}} if env else {}
    ray.init(address=address, logging_level="WARNING", **kwargs)
    from ray_jobs import cluster

    try:  # before anything is written: storage every node can reach, placements some node can take
        cluster.check(cfg, cluster.live_nodes(ray))
    except Exception:
        ray.shutdown()
        raise
    catch_sigterm()  # ray.init set its own SIGTERM handler (sys.exit), which skips Tune's state save
    ctx = ray.get_runtime_context()
    dash = getattr(ray, "_private", None) and ray._private.worker.global_worker.node.address_info.get("webui_url")
    print(f"[bootdiff] Ray {ray.__version__} job {ctx.get_job_id()}; dashboard: http://{dash}" if dash else
          f"[bootdiff] Ray {ray.__version__} job {ctx.get_job_id()}", flush=True)
    return ray


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


def checkpoint_evaluator(cfg, manifest: dict, model):
    """``extra_metrics`` for `RayReportHooks`: validation, held-out test and training G of the EMA
    weights at each checkpoint (`bootdiff.evaluation.scores.evaluate_checkpoint`), reported as ``val_G``
    (without a ``val`` split: not reported) / ``test_G`` / ``train_G``. ``val_G`` is what the sweep
    chooses on: ASHA, the checkpoint of each trained model (`checkpoint_config`) and the best
    trial; ``test_G`` is only reported."""
    from bootdiff.evaluation.scores import evaluate_checkpoint

    def extra(checkpoint_dir: str) -> dict:
        m = evaluate_checkpoint(cfg, manifest, model, checkpoint_dir)
        out = {"test_G": m["test_G"], "train_G": m["train_G"]}
        if math.isfinite(m["val_G"]):
            out["val_G"] = m["val_G"]
        return out

    return extra


def curve_hooks(config: dict, tcfg, rank: int):
    """Rank 0's `bootdiff.efficiency.train.CurveHooks` when the run's ``train_loop_config`` names
    a ``curve_url`` (a data-efficiency job, `ray_jobs.efficiency`): G at every checkpoint kept
    in storage (Train's own result keeps only the retained checkpoints' metrics), and patience
    on it (``train.patience``, replayed from that file on resume); else None."""
    if rank != 0 or not config.get("curve_url"):
        return None
    from bootdiff.efficiency.train import CurveHooks

    return CurveHooks(config["curve_url"], int(tcfg.patience))


def stopping_hooks(config: dict, tcfg, rank: int) -> dict:
    """`RayReportHooks`' early stopping for a worker's ``train_loop_config``: a data-efficiency
    job's curve file and patience (`curve_hooks`), else patience on ``val_G`` (`early_stopper`)."""
    curve = curve_hooks(config, tcfg, rank)
    return {"hooks": curve if curve is not None else early_stopper(tcfg, rank)}


def early_stopper(tcfg, rank: int, key: str = "val_G"):
    """Rank 0's `bootdiff.stopping.Patience` on ``key`` for a run evaluated at its checkpoints
    with ``train.patience`` > 0, else None. A run resumed by Train counts its patience afresh from
    the resumed checkpoint (the reports before it are Train's, not the worker's), so it stops at
    most ``patience`` checkpoints later than it would have uninterrupted."""
    from bootdiff.stopping import Patience

    return Patience(tcfg.patience, key) if rank == 0 and int(tcfg.patience) > 0 else None


def checkpoint_config(cfg, keep: int, chosen_on_val: bool):
    """Train's ``CheckpointConfig``: keep ``keep`` checkpoints. With ``chosen_on_val`` (a run
    evaluated at its checkpoints, with a ``val`` split) those are the ``keep`` lowest ``val_G``
    (Train V2 also keeps the latest, for resuming), so the checkpoint a trial is taken at — its
    validation minimum (`bootdiff.sweep.chosen_report`) — is never deleted; else the latest."""
    from ray.train import CheckpointConfig

    if chosen_on_val and int(cfg.data.num_val) > 0:
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
    ``fail_at_step`` injects one failure (test hook): it raises once, remembered by a marker URL.
    ``hooks`` (optional, rank 0: `stopping_hooks`) receive every report after ``extra_metrics``
    and may end the run through their ``should_stop`` (`bootdiff.stopping.Patience`, or the
    benchmark's `bootdiff.efficiency.train.CurveHooks`).
    """

    def __init__(self, tag: dict, extra_metrics=None, fail_at_step: int = -1, fail_marker: str = "",
                 report_every_s: float = 5.0, tb=None, hooks=None):
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
        if 0 <= self.fail_at_step <= int(metrics.get("step", -1)) and not util.exists(self.fail_marker):
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


def resume_dir() -> Optional[str]:
    """Local copy of the run's latest checkpoint (Ray restores it on retry or re-submission)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    from bootdiff.checkpoint import load_checkpoint

    local = ckpt.to_directory(tempfile.mkdtemp(prefix="bootdiff-resume-"))
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
    run_dir = tempfile.mkdtemp(prefix=f"bootdiff-run-{ctx.get_world_rank()}-")
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), run_dir


def cleanup(path: Optional[str]) -> None:
    if path and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
