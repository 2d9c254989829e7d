"""TensorBoard event files of a training run, and reading them back for the report.

Every training run (a view model, the full-resolution baseline, a sweep trial, a benchmark run)
writes one TensorBoard run folder, ``{storage}/{name}/tb/<run>/`` (`bootdiff.run.layout.RunLayout.
tb_run`), so that ``tensorboard --logdir {storage}/{name}/tb`` shows all runs side by side. Only
rank 0 writes. The event step is the number of training images seen (``kimg · 1000``), so runs
with different batch sizes line up; the scalars are `bootdiff.train`'s report metrics under their
own names (loss, ``loss_sigma_band/<lo>-<hi>``, lr, grad_norm_max, img_per_s, kimg) and, at
checkpoints, the generalization error (docs/METHOD.md §6) on the validation, test and training
splits ``val_G`` / ``test_G`` / ``train_G``. A sweep trial's μ_var,
μ_L1 and range-adapter setting are the run's hparams (TensorBoard's HPARAMS tab).

Storage: a local run folder is written in place; for any other fsspec URL (``s3://``) the writer
writes to a local temporary folder and each event file is uploaded whole at every checkpoint
(``log(..., upload=True)``) and at the end (`TensorBoardRun.close`).

Resumption: a run resumed from the checkpoint at ``S`` images first cuts every existing event
file of the run back to the events with step ≤ S (what the run had logged up to its checkpoint),
then writes a new event file that starts with TensorBoard's ``purge_step`` (S + 1) marker, so no
step appears twice, whichever reader is used.

`TensorBoardHooks` is the `bootdiff.train.train` hooks object for runs outside Ray; Ray workers
hand a `TensorBoardRun` to ``ray_jobs.common.RayReportHooks``. `read_runs` reads a ``tb`` tree
back with TensorBoard's own ``EventAccumulator`` (purge markers honoured).
"""

from __future__ import annotations

import io
import math
import os
import shutil
import tempfile
from typing import Callable, Optional

import numpy as np

from bootdiff import util
from bootdiff.run.scratch import scratch_dir

SKIP = ("step", "rank")  # report keys that are not curves (the event step is kimg · 1000)
METRICS = ("val_G", "test_G", "train_G")  # the hparams tab's metrics


def event_step(metrics: dict) -> int:
    """The TensorBoard step of a report: training images seen (``round(kimg · 1000)``)."""
    return int(round(float(metrics["kimg"]) * 1000))


def trial_hparams(trial: dict) -> dict:
    """A sweep trial's hparams: its kind, and μ_var, μ_L1, range adapter where it has them."""
    out = {"kind": str(trial["kind"])}
    for key in ("mu_var", "mu_l1", "range_adapter"):
        if trial.get(key) is not None:
            out[key] = bool(trial[key]) if key == "range_adapter" else float(trial[key])
    return out


def _event_files(url: str) -> list:
    """URLs of the event files directly in the run folder ``url`` (sorted: oldest first)."""
    fs, path = util.url_fs(url)
    fs.invalidate_cache(path)  # s3fs caches listings: another attempt may have written since
    if not fs.exists(path):
        return []
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    return [util.join(url, n) for n in names if "tfevents" in n and ".tmp-" not in n]


def truncate(url: str, last_step: int) -> int:
    """Cut every event file of the run folder ``url`` back to its events with step ≤
    ``last_step`` (rewritten atomically; files with nothing later are left alone). Returns the
    number of events dropped."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    dropped = 0
    for f in _event_files(url):
        with tempfile.NamedTemporaryFile(suffix=".tfevents") as tmp:
            tmp.write(util.read_bytes(f))
            tmp.flush()
            try:
                events = list(RawEventFileLoader(tmp.name).Load())  # records as written
                keep = [r for r in events if Event.FromString(r).step <= last_step]
            except Exception as e:
                raise RuntimeError(f"TensorBoard event file {f} cannot be read: {e}") from e
        if len(keep) == len(events):
            continue
        dropped += len(events) - len(keep)
        buf = io.BytesIO()
        rw = RecordWriter(buf)
        for r in keep:
            rw.write(r)
        util.atomic_write_bytes(f, buf.getvalue())
    return dropped


class TensorBoardRun:
    """The event files of one run at ``url`` (``RunLayout.tb_run(run)``): `open` at the start
    step, `log` each report, `close` at the end. ``hparams`` (str/float/bool values) are written
    once, when the run has no event files yet."""

    def __init__(self, url: str, hparams: Optional[dict] = None, flush_secs: int = 30):
        self.url = str(url).rstrip("/")
        self.hparams = dict(hparams or {})
        self.flush_secs = flush_secs
        self.writer = None
        self._dir = None  # the folder the writer writes in
        self._remote = False

    def open(self, start_step: int = 0) -> "TensorBoardRun":
        """Start (or continue after a resume from ``start_step`` images) writing the run."""
        from torch.utils.tensorboard import SummaryWriter

        if self.writer is not None:
            return self
        fs, path = util.url_fs(self.url)
        self._remote = not util._is_local(fs)
        existing = _event_files(self.url)
        if existing:
            truncate(self.url, start_step)
        if self._remote:
            self._dir = scratch_dir("bootdiff-tb")  # a killed worker's is removed by the next one
        else:
            os.makedirs(path, exist_ok=True)
            self._dir = path
        self.writer = SummaryWriter(self._dir, purge_step=start_step + 1 if existing else None,
                                    flush_secs=self.flush_secs)
        if self.hparams and not existing:
            from torch.utils.tensorboard.summary import hparams

            for summary in hparams(self.hparams, {m: math.nan for m in METRICS}):
                self.writer.file_writer.add_summary(summary)
        self.writer.flush()
        return self

    def log(self, metrics: dict, upload: bool = False) -> None:
        """Write the numeric entries of one report (step: `event_step`); ``upload`` (at
        checkpoints) also copies the event files to a remote ``url``."""
        if self.writer is None:
            raise RuntimeError(f"TensorBoardRun({self.url}): log() before open(start_step)")
        step = event_step(metrics)
        for key, value in metrics.items():
            if key in SKIP or isinstance(value, (bool, str)) or value is None:
                continue
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        if upload:
            self.sync()

    def sync(self) -> None:
        """Flush; for a remote ``url`` upload every event file of this writer, whole."""
        if self.writer is None:
            return
        self.writer.flush()
        if self._remote:
            fs, path = util.url_fs(self.url)
            for name in sorted(os.listdir(self._dir)):
                fs.put_file(os.path.join(self._dir, name), f"{path}/{name}")

    def close(self) -> None:
        if self.writer is None:
            return
        self.sync()
        self.writer.close()
        self.writer = None
        if self._remote:
            shutil.rmtree(self._dir, ignore_errors=True)


class TensorBoardHooks:
    """`bootdiff.train.train` hooks that write the run's TensorBoard events on rank 0 (for runs
    outside Ray, e.g. benchmarks)::

        hooks = TensorBoardHooks(RunLayout.of(cfg).tb_run("bench-1"), hparams={"n": 64})
        train(model, loss, data, cfg.train, run_dir=..., hooks=hooks)

    ``extra_metrics(checkpoint_url) -> dict`` (rank 0, at checkpoints) adds e.g. held-out G
    (`bootdiff.evaluation.scores.evaluate_checkpoint`); ``hooks`` (optional) receives every call after.
    """

    def __init__(self, url: str, hparams: Optional[dict] = None,
                 extra_metrics: Optional[Callable[[str], dict]] = None, hooks=None):
        self.run = TensorBoardRun(url, hparams)
        self.extra_metrics = extra_metrics
        self.hooks = hooks
        self.rank = 0

    def on_start(self, info: dict) -> None:
        self.rank = int(info.get("rank", 0))
        if self.rank == 0:
            self.run.open(event_step(info))
        if hasattr(self.hooks, "on_start"):
            self.hooks.on_start(info)

    def on_report(self, metrics: dict, checkpoint_url: Optional[str]) -> None:
        if self.rank == 0:
            if checkpoint_url and self.extra_metrics is not None:
                metrics = {**metrics, **self.extra_metrics(checkpoint_url)}
            self.run.log(metrics, upload=bool(checkpoint_url))
        if hasattr(self.hooks, "on_report"):
            self.hooks.on_report(metrics, checkpoint_url)

    def should_stop(self) -> bool:
        return bool(self.hooks.should_stop()) if hasattr(self.hooks, "should_stop") else False

    def on_end(self) -> None:
        self.run.close()
        if hasattr(self.hooks, "on_end"):
            self.hooks.on_end()


def read_runs(url: str, tags: Optional[tuple] = None) -> dict:
    """Every run under the ``tb`` folder ``url`` as ``{run: {tag: {"step": int64[], "kimg":
    float64[], "value": float64[]}}}`` (``run``: the folder's path below ``url``), read with
    TensorBoard's ``EventAccumulator`` (all events kept, purge markers honoured). A remote tree
    is copied to a temporary folder first. No folder: ``{}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fs, path = util.url_fs(url)
    if not fs.exists(path):
        return {}
    tmp = None
    if not util._is_local(fs):
        tmp = tempfile.mkdtemp(prefix="bootdiff-tb-read-")
        fs.get(path.rstrip("/") + "/", tmp + "/", recursive=True)
        path = tmp
    try:
        out = {}
        for folder, _, files in sorted(os.walk(path)):
            if not any("tfevents" in f and ".tmp-" not in f for f in files):
                continue
            acc = EventAccumulator(folder, size_guidance={"scalars": 0}).Reload()
            run = os.path.relpath(folder, path).replace(os.sep, "/")
            curves = {}
            for tag in acc.Tags()["scalars"]:
                if tags is not None and tag not in tags:
                    continue
                ev = acc.Scalars(tag)
                step = np.array([e.step for e in ev], dtype=np.int64)
                curves[tag] = {"step": step, "kimg": step / 1000.0,
                               "value": np.array([e.value for e in ev], dtype=np.float64)}
            out[run] = curves
        return out
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
