"""One model of the data-efficiency benchmark (`bootdiff.efficiency`) trained in this process
(``benchmarks/data_efficiency.py --local``): `bootdiff.train.train` on the job's dataset, resuming
from its own run folder, with G at every checkpoint kept as the model's learning curve."""

from __future__ import annotations

import json
from typing import Optional

from bootdiff import experiment, util
from bootdiff.config import to_yaml
from bootdiff.efficiency.models import job_cfg
from bootdiff.peers import NAMES as PEER_NAMES, peer_training
from bootdiff.run.layout import RunLayout
from bootdiff.stopping import early_stopped_view


class CurveHooks:
    """`bootdiff.train` hooks (inside `bootdiff.run.tb.TensorBoardHooks`, which adds G at checkpoints):
    each checkpoint's kimg, loss, test / train G (a view model's: ``val_G``, on its held-out
    samples) and URL appended to ``curve_url`` (kept on resume).
    With ``patience`` > 0 (a selection run, whose "test" split is its validation carve-out; or an
    early-stopped view, ``key="val_G"``) the run stops when ``key`` has not improved for
    ``patience`` checkpoints (`bootdiff.stopping.Patience`, its state replayed from the curve on
    resume); checkpoints before ``start_kimg`` do not count."""

    def __init__(self, curve_url: str, patience: int = 0, start_kimg: float = 0.0, key: str = "test_G"):
        from bootdiff.stopping import Patience

        self.url = curve_url
        self.stopper = Patience(patience, key, start_kimg=start_kimg)
        if util.exists(curve_url):
            self.stopper.replay(json.loads(util.read_bytes(curve_url)))

    def should_stop(self) -> bool:
        return self.stopper.should_stop()

    def on_report(self, metrics: dict, checkpoint_url: Optional[str]) -> None:
        if not checkpoint_url:
            return
        curve = json.loads(util.read_bytes(self.url)) if util.exists(self.url) else []
        point = {k: float(metrics[k]) for k in ("kimg", "loss", "test_G", "train_G", "val_G") if k in metrics}
        point["checkpoint"] = checkpoint_url
        curve = [p for p in curve if p["kimg"] < point["kimg"] - 1e-9] + [point]
        self.stopper.update(point)
        util.atomic_write_bytes(self.url, json.dumps(curve).encode())
        print(f"[bench]   {point}", flush=True)


def train_local(job: dict, b: dict, out: str) -> dict:
    """Train one job in this process (`bootdiff.train.train`), resuming from its own run folder;
    returns ``{"checkpoint": url, "curve": [...], "kimg": k, "stopped_early": bool}`` (patience
    ended it before its cap)."""
    from bootdiff.evaluation.scores import evaluate_checkpoint, evaluate_view_checkpoint
    from bootdiff.experiment import export_result
    from bootdiff.sweep import trial_residual_config
    from bootdiff.run.tb import TensorBoardHooks
    from bootdiff.train import train

    cfg = job_cfg(job, b)
    manifest = experiment.read_manifest(cfg)
    run_dir = util.join(out, "runs", job["id"].replace("/", "__"))
    if job["kind"] == "view":
        vcfg = cfg.views[job["view"]]
        model, loss, data = experiment.view_training(cfg, manifest, job["view"], vcfg)
        tcfg = vcfg.train
    elif job["kind"] == "full_res":
        model, loss, data = experiment.view_training(cfg, manifest, "full", cfg.full_res)
        tcfg = cfg.full_res.train
    elif job["kind"] in PEER_NAMES:
        model, loss, data = peer_training(cfg, manifest, job["kind"])
        tcfg = cfg.full_res.train
    else:
        rcfg = trial_residual_config(cfg, job["trial"])
        model, loss, data = experiment.residual_training(cfg, manifest, rcfg, run_dir=run_dir,
                                                         device=util.compute_device())
        tcfg = rcfg.train
    curve_url = util.join(run_dir, "curve.json")
    def g_at_checkpoint(url: str) -> dict:
        m = evaluate_checkpoint(cfg, manifest, model, url)
        return {"test_G": m["test_G"], "train_G": m["train_G"]}

    def view_g_at_checkpoint(url: str) -> dict:
        return {"val_G": evaluate_view_checkpoint(cfg, manifest, job["view"], model, url)["val_G"]}

    view_stops = job["kind"] == "view" and early_stopped_view(cfg, job["view"])
    extra = g_at_checkpoint if job["kind"] != "view" else view_g_at_checkpoint if view_stops else None
    if view_stops:  # keep the held-out minimum on disk: `patience` checkpoints back when patience
        # fires, at the checkpoint that ends the run
        tcfg.keep_checkpoints = max(int(tcfg.keep_checkpoints), int(tcfg.patience) + 1)
    hooks = TensorBoardHooks(RunLayout(out, "tb").tb_run(job["id"]), hparams=dict(job.get("trial") or {}),
                             extra_metrics=extra, hooks=CurveHooks(curve_url, tcfg.patience, tcfg.patience_from_kimg,
                                                                   key="val_G" if view_stops else "test_G"))
    res = train(model, loss, data, tcfg, run_dir=run_dir, hooks=hooks, config_yaml=to_yaml(cfg))
    curve = json.loads(util.read_bytes(curve_url)) if util.exists(curve_url) else []
    checkpoint = res.checkpoint_url
    if view_stops:  # taken at its held-out minimum
        checkpoint = min((p for p in curve if p.get("val_G") is not None),
                         key=lambda p: (p["val_G"], p["kimg"]))["checkpoint"]
    if job["kind"] == "view":
        export_result(cfg, job["view"], checkpoint)
    return {"checkpoint": checkpoint, "curve": curve, "kimg": res.kimg, "stopped_early": bool(res.stopped)}
