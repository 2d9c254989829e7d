"""The data-efficiency benchmark's peer row on its Ray Train path (`ray_jobs.efficiency.ray_runner`):
an Ambient-Omni job trained as a TorchTrainer on a real local Ray cluster, G reported at its
checkpoints (its curve), its checkpoint kept on validation, and scored like the in-process run."""

from __future__ import annotations

import math

import pytest

from bootdiff.efficiency.data import prepare
from bootdiff.efficiency.models import budgets
from test_data import RandomSource
from test_efficiency import _cfg
from test_ray_loader import local_ray  # noqa: F401  (the fixture: one local Ray cluster)

pytestmark = pytest.mark.ray


def test_ambient_peer_trains_as_a_ray_train_run(local_ray, tmp_path):
    from ray_jobs.efficiency import ray_runner

    cfg = _cfg(tmp_path)
    out = str(tmp_path / "out")
    plan = prepare(cfg, out, [8], val_fraction=0.25, source=RandomSource())
    b = {**budgets(cfg, 0.05), "ambient_kimg": 0.064}
    job = {"id": "N8/ambient", "kind": "ambient", "data": "N8", "N": 8, "stage": 0,
           "cfg_yaml": plan["datasets"]["N8"]}
    rows = list(ray_runner(cfg)([job], b, out, 4))
    (done, row), = rows
    assert done["id"] == "N8/ambient" and row["kind"] == "ambient"
    assert row["checkpoint"].startswith(out) and row["kimg"] == pytest.approx(0.064, abs=0.04)
    assert row["curve"] and all(math.isfinite(p["test_G"]) for p in row["curve"])
    assert math.isfinite(row["test_G"]) and math.isfinite(row["swd"])  # scored like every row
