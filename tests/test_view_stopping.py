"""View models early-stopped on held-out view samples (issue 18, "view budgets from their pool"):
``data.num_view_val`` partial-pool samples are kept out of every view's training and cut into
each view's split ``<view>-val``; a view with ``train.patience`` > 0 is scored there at each
checkpoint (G, docs/METHOD.md §6), stopped by patience, and exported at its minimum. The Ray
pipeline's path is in tests/test_video_pipeline.py (the clip view)."""

from __future__ import annotations

import json
import math
import os

import pytest

from bootdiff.config import ExperimentConfig, ConfigError, from_yaml, load_config, to_object, to_yaml
from bootdiff.data.ingest import ingest
from bootdiff.efficiency.data import prepare, source_indices
from bootdiff.run.layout import RunLayout
from bootdiff.stopping import Patience
from tests.datagen import RandomSource, bench_overrides


def test_held_out_view_samples_are_cut_from_pool_samples_no_other_split_holds(tmp_path):
    base = bench_overrides(tmp_path) + ["data.num_full=8", "data.num_val=4"]
    cfg = to_object(load_config(None, base + ["data.num_view_val=6"]))
    manifest = ingest(cfg, progress=False, source=RandomSource())
    splits = manifest["splits"]
    assert splits["low-val"]["count"] == 6 and splits["patch-val"]["count"] == 6 * 2  # per_sample=2
    assert splits["low-val"]["shape"] == splits["low"]["shape"]
    held = set(source_indices(manifest, "low-val"))
    assert held == set(source_indices(manifest, "patch-val")) and len(held) == 6
    for other in ("low", "patch", "full", "test", "val"):
        assert not held & set(source_indices(manifest, other)), other
    # the pool the views train on is the one without the carve-out, in the same order
    plain = ingest(to_object(load_config(None, base + [f"storage={tmp_path}/plain"])), progress=False,
                   source=RandomSource())
    pool = source_indices(plain, "low")
    assert source_indices(manifest, "low") == pool[:len(pool) - 6] and held == set(pool[len(pool) - 6:])


@pytest.mark.parametrize("extra, key, words", [
    (["views.low.train.patience=2"], "views.low.train.patience", "set data.num_view_val >= 1"),
    (["views.patch.coords=true", "views.patch.train.patience=1", "data.num_view_val=4"],
     "views.patch.train.patience", "not supported yet"),
    (["data.num_view_val=-1"], "data.num_view_val", "must be >= 0"),
    (["data.source.limit=39", "data.num_view_val=12"], "data.num_full", "num_view_val = 40 samples"),
])
def test_view_patience_without_held_out_samples_fails_at_load_naming_the_key(tmp_path, extra, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, bench_overrides(tmp_path) + ["data.num_full=4", "data.num_val=4"] + extra)
    assert key in str(err.value) and words in str(err.value), str(err.value)


def test_benchmark_view_stops_on_its_held_out_samples_and_is_exported_at_their_minimum(tmp_path):
    """The benchmark's view job (`train_local`): G on the view's held-out samples at every
    checkpoint as its curve; patience 1 stops it at the first checkpoint that did not improve (or
    it reaches its cap); the exported model is the checkpoint of the lowest
    held-out G, still on disk although 2 are kept by default."""
    from bootdiff.efficiency.models import budgets
    from bootdiff.efficiency.train import train_local
    from bootdiff.export import load_view_model

    cfg = to_object(load_config(None, bench_overrides(tmp_path) + [
        "data.num_view_val=8", "views.low.train.patience=1", "views.low.train.total_kimg=0.16",
        "views.low.train.checkpoint_every_kimg=0.032", "views.low.train.batch_size=16", "views.low.train.lr=0.01",
        "views.low.train.warmup_kimg=0", "views.low.train.ema_halflife_kimg=0.004", "views.low.train.report_every=1"]))
    out = str(tmp_path / "out")
    plan = prepare(cfg, out, [8], source=RandomSource())
    c = from_yaml(plan["datasets"]["base"], ExperimentConfig)
    job = {"id": "view-low", "kind": "view", "view": "low", "data": "base", "cfg_yaml": to_yaml(c)}
    trained = train_local(job, budgets(cfg, 0.16), out)
    curve = trained["curve"]
    assert curve and all(math.isfinite(p["val_G"]) and "test_G" not in p for p in curve)
    # where patience 1 fires: the first checkpoint whose held-out G is not below the best before it
    patience, fired = Patience(1, "val_G"), None
    for i, point in enumerate(curve):
        patience.update(point)
        if fired is None and patience.should_stop():
            fired = i
    if trained["stopped_early"]:  # at the checkpoint where it fired: no step beyond it
        assert fired is not None and len(curve) == fired + 1 and trained["kimg"] < 0.16 - 1e-9, curve
        assert trained["kimg"] == pytest.approx(curve[fired]["kimg"])
    else:  # its cap: 5 checkpoints, patience firing at most at the last (there is no report after it)
        assert trained["kimg"] == pytest.approx(0.16) and len(curve) == 5 and fired in (None, 4), curve
    best = min(range(len(curve)), key=lambda i: (curve[i]["val_G"], curve[i]["kimg"]))
    assert trained["checkpoint"] == curve[best]["checkpoint"] and os.path.exists(trained["checkpoint"])
    exported = RunLayout.of(c).model("low")
    load_view_model(exported)  # loads
    meta = json.load(open(os.path.join(exported, "bootdiff.json")))["extra"]
    assert meta["kimg"] == pytest.approx(curve[best]["kimg"]) and meta["checkpoint"] == curve[best]["checkpoint"]
