"""What every Ray entry point shares: the command line and `main`, joining or starting Ray, Ray
storage for ``file``/``s3://`` URLs, and the hook that hands `bootdiff.train` reports and
checkpoints (with held-out G) to ``ray.train.report``. Thin on purpose: the work itself is
`bootdiff`'s."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Callable, List, Optional, Tuple

from bootdiff import util
from bootdiff.config import ExperimentConfig, from_yaml, load_config, to_object, to_yaml
from bootdiff.layout import absolute_url

# Ray Train's dashboard tab needs this before the cluster starts (docs/RAY.md).
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")


def parse_args(argv: Optional[List[str]] = None, description: str = "") -> Tuple[ExperimentConfig, str]:
    """``--config FILE [key=value ...]`` -> (typed config, resolved YAML)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="experiment YAML (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. sweep.mu_var=[0,1]")
    args = parser.parse_args(argv)
    cfg = to_object(load_config(args.config, args.overrides))
    if "://" not in cfg.storage and not os.path.isabs(cfg.storage) and "runtime_resources" in os.getcwd():
        print(f"[bootdiff] WARNING: storage '{cfg.storage}' is relative to this Ray job's temporary working "
              f"directory ({os.getcwd()}); pass storage=/absolute/path or s3://... to keep the results",
              file=sys.stderr, flush=True)
    cfg.storage = absolute_url(cfg.storage)  # so Ray workers in other directories agree on it
    return cfg, to_yaml(cfg)


def main(job: Callable, description: str, argv: Optional[List[str]] = None) -> int:
    """The body of every ``python -m ray_jobs.<stage>``: parse ``--config FILE [key=value ...]``,
    run ``job(cfg, cfg_yaml)`` and print what it returns (if anything) as one JSON line."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    cfg, cfg_yaml = parse_args(argv, description)
    out = job(cfg, cfg_yaml)
    if out is not None:
        print(json.dumps(out, default=str))
    return 0


def cfg_from_yaml(text: str) -> ExperimentConfig:
    return from_yaml(text, ExperimentConfig)


def init_ray(cfg: ExperimentConfig):
    """Join the cluster named by cfg.ray.address / RAY_ADDRESS (as under ``ray job submit``), or
    start a local one with the dashboard. S3 credentials and endpoint travel to the workers."""
    import ray

    if ray.is_initialized():
        return ray
    env = {k: v for k, v in os.environ.items()
           if k.startswith("AWS_") or k in ("BOOTDIFF_CACHE", "RAY_TRAIN_ENABLE_STATE_TRACKING")}
    kwargs = {"runtime_env": {"env_vars": env}} if env else {}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, logging_level="WARNING", **kwargs)
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


def checkpoint_evaluator(cfg, manifest: dict, model, final_only_kimg: Optional[float] = None):
    """``extra_metrics`` for `RayReportHooks`: held-out and training G of the EMA weights at each
    checkpoint (`bootdiff.evaluate.evaluate_checkpoint`), reported as ``test_G`` / ``train_G``.

    With ``final_only_kimg`` (the full-res baseline) intermediate evaluations are reported as
    ``baseline_test_G`` and only the final one as ``test_G``: ASHA acts only on results that carry
    its metric, so a baseline is never stopped early."""
    from bootdiff.evaluate import evaluate_checkpoint

    def extra(checkpoint_dir: str) -> dict:
        m = evaluate_checkpoint(cfg, manifest, model, checkpoint_dir)
        final = final_only_kimg is None or m["kimg"] >= final_only_kimg - 1e-9
        return {"test_G" if final else "baseline_test_G": m["test_G"], "train_G": m["train_G"]}

    return extra


class RayReportHooks:
    """`bootdiff.train` hooks that report through ``ray.train.report``.

    Every rank calls ``on_report`` at the same steps (Ray's report is a barrier). Rank 0 hands its
    freshly written local checkpoint directory to Ray, which persists it to the run's storage;
    ``extra_metrics(checkpoint_dir)`` (rank 0, at checkpoints) adds e.g. held-out G.
    ``fail_at_step`` injects one failure (test hook): it raises once, remembered by a marker URL.
    """

    def __init__(self, tag: dict, extra_metrics=None, fail_at_step: int = -1, fail_marker: str = ""):
        self.tag = tag
        self.extra_metrics = extra_metrics
        self.fail_at_step = fail_at_step
        self.fail_marker = fail_marker

    def on_report(self, metrics: dict, checkpoint_url: Optional[str]) -> None:
        import ray.train

        metrics = {**metrics, **self.tag}
        if checkpoint_url and self.extra_metrics is not None:
            metrics.update(self.extra_metrics(checkpoint_url))
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_url) if checkpoint_url else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if 0 <= self.fail_at_step <= int(metrics.get("step", -1)) and not util.exists(self.fail_marker):
            util.atomic_write_bytes(self.fail_marker, f"failed at step {metrics.get('step')}\n".encode())
            raise RuntimeError(f"injected failure at step {metrics.get('step')} (ray.inject_failure_step)")


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


def worker_setup(cpus: float) -> Tuple[int, int, "object", str]:
    """(rank, world size, device, local run dir) inside a Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch

    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, int(cpus)))
    run_dir = tempfile.mkdtemp(prefix=f"bootdiff-run-{ctx.get_world_rank()}-")
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), run_dir


def cleanup(path: Optional[str]) -> None:
    if path and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
