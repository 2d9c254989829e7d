"""Deterministic failures of a Ray Train run are final: a non-finite loss (lr=1e6) and a corrupt
shard each fail the view's training after one attempt with their own error, although the view may
be retried twice (``ray.max_failures=2``). A Train worker that dies is retried (the node-loss tests
on the three-node cluster, tests/test_ray_multinode_faults.py, go through the same
`ray_jobs.train_views.fit_retrying`); one that raises a deterministic error
(`bootdiff.errors.deterministic`) is not, and its exception reaches the driver as itself through
the worker, Ray Train's controller and the view's task (the shard error pickles with its own
arguments: before, the controller got a TypeError from ChecksumError's constructor inside a system
error, and every attempt was retried). Had the run been retried, `fit_retrying` would end with Ray
Train's ``WorkerGroupError`` after the last retry, not with the worker's own error. One local Ray
cluster (``ray.init``), the stage's own `run` as its driver calls it."""

import pytest

from bootdiff.config import load_config, to_object, to_yaml
from bootdiff.data.ingest import ingest

pytestmark = pytest.mark.ray


def one_view_config(tmp_path, name: str, extra=()):
    """A one-view config (8×8 low-res view of random 16² images, a checkpoint every 2 steps), its
    data ingested: (config, its YAML)."""
    from test_resume import Source  # random 16² images, in memory

    cfg = to_object(load_config(None, [
        f"storage={tmp_path / 'store'}", f"name={name}", "data.resolution=16", "data.num_full=10",
        "data.num_test=10", "data.num_val=2", "data.shard_size=16", "views.low.kind=downsample",
        "views.low.factor=2", "views.low.net.channels=[8,8]", "views.low.net.attention=[false,false]",
        "views.low.net.norm_groups=4", "views.low.train.batch_size=8", "views.low.train.total_kimg=0.048",
        "views.low.train.checkpoint_every_kimg=0.016", "views.low.train.report_every=1",
        "views.low.train.warmup_kimg=0", "views.low.scaling.cpus_per_worker=1", "ray.max_failures=2", *extra]))
    ingest(cfg, progress=False, source=Source())
    return cfg, to_yaml(cfg)


def test_deterministic_failures_fail_at_once_naming_their_cause(local_ray, tmp_path):
    from bootdiff.data.shards import ChecksumError
    from ray_jobs import train_views

    nan = one_view_config(tmp_path, "nan", ["views.low.train.lr=1e6"])
    with pytest.raises(FloatingPointError, match=r"non-finite (loss|gradient norm) at step \d"):
        train_views.run(*nan)

    cfg, _ = bad = one_view_config(tmp_path, "bad")
    shard = tmp_path / "store" / "bad" / "data" / "low" / "low-000000.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"shard \S*low-000000\.tar checksum mismatch") as err:
        train_views.run(*bad)
    assert err.value.url.endswith("low-000000.tar")  # the error itself, its fields intact
    assert not train_views.view_done(nan[0], "low") and not train_views.view_done(cfg, "low")  # nothing exported
