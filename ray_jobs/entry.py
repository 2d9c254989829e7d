"""The body of every ``python -m ray_jobs.<stage>``: the command line and `main` (the run's
lease, signals, a user's mistake printed as one paragraph), and joining or starting Ray with the
console kept to the project's lines. Thin on purpose: the work itself is `bootdiff`'s."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
from typing import Callable, List, Optional, Tuple

from bootdiff.config import ExperimentConfig, load_config, to_object, to_yaml
from bootdiff.run.layout import absolute_url

# Ray Train's dashboard tab needs this before the cluster starts (docs/RAY.md).
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
# Ray Train's controller polls its worker group every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
# default), and a run's every change of state — workers up, a report collected, training done —
# waits for the next poll: ≈ 4 s of each Train run's start and end on the development box
# (docs/RAY.md §2). A poll is one small remote call per worker; a user's own value is kept.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


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


# The driver's environment variables that travel to Ray workers in the job's runtime_env. Ray
# publishes a runtime_env (the dashboard's Jobs API, its session logs), so no credential may be
# among them: workers take AWS credentials from the cluster's own environment — the env of
# `ray start` (inherited by every worker it starts; a local ray.init() cluster inherits the
# driver's), an instance profile / IAM role, or a Kubernetes Secret (cluster/README.md).
SHARED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
              "BOOTDIFF_CACHE", "RAY_TRAIN_ENABLE_STATE_TRACKING", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
              "PYTHONWARNINGS", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")

# The credentials Ray Tune copies from the driver's environment into every trial actor's runtime_env
# (`ray/tune/execution/class_cache.py`, 2.60) — and so into the Train run each trial starts (a
# child inherits its parent's runtime_env). Ray publishes a runtime_env: each node's
# runtime_env_agent.log held the keys of the head that ran the sweep's driver.
TUNE_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


def keep_credentials_out_of_tune() -> None:
    """Take `TUNE_CREDENTIALS` out of the variables Ray Tune sends its trials: the trials and their
    Train workers take credentials from the cluster's own environment, as every other worker does
    (`SHARED_ENV`; cluster/README.md). A local ``ray.init()`` cluster's workers inherit the
    driver's environment, so nothing changes there."""
    from ray.tune.execution import class_cache

    if hasattr(class_cache, "ENV_VARS_TO_PROPAGATE"):
        class_cache.ENV_VARS_TO_PROPAGATE = frozenset(class_cache.ENV_VARS_TO_PROPAGATE) - set(TUNE_CREDENTIALS)


# Ray's own console lines that a newcomer takes for failures and that ask nothing of them: Ray
# Data's deprecation of an option Ray Train itself passes (every Train controller prints it).
RAY_WARNINGS_IGNORED = ("ignore:`ExecutionOptions.exclude_resources` is deprecated",)
# ... and two that reach the driver as log lines, which the driver drops (`quiet_ray`); both stay
# in Ray's log folder (raylet.out, the cleaner actor's worker log): the raylet's worker-pool
# warning, whose threshold is 4 × min(cores, num_cpus) Python processes, which every Train run
# passes on a small machine (a controller, its workers, Tune's trial actors), and the line each
# Train run's placement-group cleaner logs when the run's controller has ended, as it should.
RAY_LINES_DROPPED = (
    re.compile(r"PYTHON worker processes have been started on node: .*maximum expected startup concurrency"),
    re.compile(r"Detected that the Ray Train controller actor \(\w+\) is dead\. Cleaning up placement group"),
    # on a cluster the driver joins, Train's preemption watcher stays on and its actor logs this C++ line each run
    re.compile(r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' .*max_restarts > 0"),
)


# Ray's notice when ``ray.init`` starts a local cluster with token auth, its default. The driver
# says it in its own dashboard line instead, with where the token is (`token_hint`); the notice
# that a cluster starts *without* token auth is kept.
RAY_TOKEN_NOTICE = ("ray._private.authentication.authentication_token_setup",
                    "Token authentication is enabled for this Ray cluster")


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefix)


def token_hint() -> str:
    """What a user opening the dashboard of a token-auth cluster needs: where the token is
    (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or Ray's default ``~/.ray/auth_token``, docs/RAY.md
    §6); empty when this process does not use token auth."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return ""
    where = ("$RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN")
             else os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token")
    return f" (token auth: the dashboard asks for the token in {where}; `ray get-auth-token` prints it)"


def drop_ray_lines(print_to_stdstream: Callable) -> Callable:
    """``print_to_stdstream`` (Ray's driver-side printer of worker, actor and raylet lines) without
    the lines `RAY_LINES_DROPPED` matches."""

    def printer(data: dict, ignore_prefix: bool):
        lines = [line for line in data.get("lines", ()) if not any(p.search(line) for p in RAY_LINES_DROPPED)]
        if lines:
            print_to_stdstream({**data, "lines": lines}, ignore_prefix)

    printer.bootdiff_filtered = True
    return printer


def quiet_ray(local: bool) -> None:
    """Keep Ray's internal noise off the console (set before ``ray.init``; `SHARED_ENV` carries it
    to every Ray worker): the warnings in `RAY_WARNINGS_IGNORED` (through ``PYTHONWARNINGS``, kept
    beside any the user set) and, on a cluster this process starts on its own machine, Train's
    preemption watcher — it watches for cloud nodes being preempted, which a local machine never
    is, and its actor logs a C++ error line (``PreemptionWatcher … max_restarts > 0``) on every
    Train run. A user's own ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER`` is kept. The lines of
    `RAY_LINES_DROPPED` are dropped by this driver: Ray prints what workers, actors and the raylet
    send it through ``ray._private.worker.print_to_stdstream`` (its log thread and its error
    listener both look it up there when ``ray.init`` connects), and offers no filter of its own.
    Ray's notice that a local cluster uses token auth (`RAY_TOKEN_NOTICE`) is dropped: the
    driver's dashboard line says so, with where the token is (`token_hint`)."""
    import ray._private.worker as ray_worker

    if not getattr(ray_worker.print_to_stdstream, "bootdiff_filtered", False):
        ray_worker.print_to_stdstream = drop_ray_lines(ray_worker.print_to_stdstream)
    token_logger = logging.getLogger(RAY_TOKEN_NOTICE[0])
    if not any(isinstance(f, _DropMessage) for f in token_logger.filters):
        token_logger.addFilter(_DropMessage(RAY_TOKEN_NOTICE[1]))
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
    print(f"[bootdiff] Ray {ray.__version__} job {ctx.get_job_id()}; dashboard: http://{dash}{token_hint()}" if dash else
          f"[bootdiff] Ray {ray.__version__} job {ctx.get_job_id()}", flush=True)
    return ray
