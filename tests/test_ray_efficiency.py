"""The data-efficiency benchmark's peer rows on their Ray Train path (`ray_jobs.efficiency.ray_runner`):
a Patch Diffusion row at its budget and an Ambient-Omni selection run under patience, each trained
as a TorchTrainer on a real local Ray cluster, G at every checkpoint kept as the curve, scored
like the in-process runs."""

from __future__ import annotations

import math

import pytest

from bootdiff.config import ExperimentConfig, from_yaml, load_config, to_object, to_yaml
from bootdiff.efficiency.data import prepare
from bootdiff.efficiency.models import budgets
from tests.datagen import RandomSource, bench_overrides

pytestmark = pytest.mark.ray


def test_peer_rows_train_as_ray_train_runs(local_ray, tmp_path):
    from ray_jobs.efficiency import ray_runner

    cfg = to_object(load_config(None, bench_overrides(tmp_path)))
    out = str(tmp_path / "out")
    plan = prepare(cfg, out, [8], val_fraction=0.25, source=RandomSource())
    b = {**budgets(cfg, 0.05, patience=1), "ambient_kimg": 0.128, "patchdiff_kimg": 0.128}
    c = from_yaml(plan["datasets"]["N8-select"], ExperimentConfig)
    c.full_res.train.checkpoint_every_kimg = 0.032  # 4 checkpoints of G on the carve-out
    sel = {"id": "N8/select-ambient", "kind": "ambient", "data": "N8-select", "N": 8, "stage": 0, "quick": True,
           "cfg_yaml": to_yaml(c)}
    pd = {"id": "N8/patchdiff", "kind": "patchdiff", "data": "N8", "N": 8, "stage": 1,
          "cfg_yaml": plan["datasets"]["N8"], "budget_kimg": 0.064}
    rows = dict((j["id"], r) for j, r in ray_runner(cfg)([sel, pd], b, out, 4))
    # a stage-1 row at its budget: the coordinate-channel network, trained under Train, loaded back
    # as its own kind, sampled at full size and scored like every row
    row = rows["N8/patchdiff"]
    assert row["kind"] == "patchdiff" and row["patience"] == 0 and not row["stopped_early"]
    assert row["checkpoint"].startswith(out) and row["kimg"] == pytest.approx(0.064, abs=1e-6)  # its budget_kimg
    assert row["curve"] and all(math.isfinite(p["test_G"]) for p in row["curve"])
    assert math.isfinite(row["test_G"]) and math.isfinite(row["swd"])
    # the selection run, with patience 1 on its carve-out's G through RayReportHooks' stopper: it
    # ran to its cap, or stopped one checkpoint after its best — never while still improving
    s = rows["N8/select-ambient"]
    curve = s["curve"]
    assert s["kind"] == "ambient" and s["patience"] == 1 and curve
    best = min(range(len(curve)), key=lambda i: curve[i]["test_G"])
    if s["stopped_early"]:
        assert best == len(curve) - 2 and s["kimg"] < 0.128
    else:
        assert s["kimg"] == pytest.approx(0.128) and len(curve) == 4
