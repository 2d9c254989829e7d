"""Shard write rate and loader throughput, from local disk and from an S3-protocol server (moto).

    python benchmarks/loader.py [--limit 3000] [--batches 40] [--no-s3]

Data: the 64x64 cat faces of ``../shared/data/cats64.tar`` (beside the checkout) through the ``tar`` source when the
file exists (else random 64x64 RGB images). Views: 16² patches (4 per image), 16² low-res (area
downsample x4) and the 64² images themselves. Prints one JSON object: per storage and view, the
ingest write rate (samples/s, MB/s) and the single-process loader rate (samples/s per core,
``mode="train"``, batch 256, num_workers=0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bootdiff.config import load_config  # noqa: E402
from bootdiff.data.ingest import finalize_manifest, plan_ingest, run_shard_task  # noqa: E402
from bootdiff.data.loader import make_loader, view_urls  # noqa: E402

CATS = os.environ.get("BOOTDIFF_CATS64") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data", "cats64.tar")
VIEWS = {"patch16": ["kind=patch", "patch_size=16", "per_sample=4"],
         "low16": ["kind=downsample", "factor=4"],
         "full64": ["kind=full"]}


class RandomImages:
    kind, description, fixed_test = "image", "random 64x64 RGB", None

    def __init__(self, n):
        self.x = np.random.default_rng(0).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
        self.ids = [f"rand-{i}" for i in range(n)]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.x[i]

    def mask(self, i):
        return None


def config(storage, limit):
    over = [f"storage={storage}", "name=bench", "data.resolution=64", "data.channels=3",
            "data.num_full=64", "data.num_test=64", "data.shard_size=1000"]
    if os.path.exists(CATS):
        over += ["data.source.kind=tar", f"data.source.path={CATS}", f"data.source.limit={limit}"]
    for name, kv in VIEWS.items():
        over += [f"views.{name}.{x}" for x in kv]
    return load_config(None, over)


def bench(storage, limit, batches, source=None):
    cfg = config(storage, limit)
    tasks = plan_ingest(cfg, source=source)
    out, infos = {}, []
    for name in VIEWS:
        t0 = time.perf_counter()
        mine = [run_shard_task(t, source=source) for t in tasks if t.split == name]
        dt = time.perf_counter() - t0
        infos += mine
        n, nbytes = sum(i.count for i in mine), sum(i.bytes for i in mine)
        out[name] = {"samples": n, "shards": len(mine), "write_samples_per_s": round(n / dt, 1),
                     "write_MB_per_s": round(nbytes / dt / 1e6, 2)}
    infos += [run_shard_task(t, source=source) for t in tasks if t.split in ("full", "test")]
    manifest = finalize_manifest(cfg, infos)
    for name in VIEWS:
        loader = make_loader(view_urls(manifest, name), 256, mode="train", seed=0, rank=0,
                             world_size=1, shuffle_buffer=1000, epoch_samples=256 * batches)
        it = iter(loader)
        next(it)  # start-up (first shard open, shuffle buffer fill) not counted
        t0 = time.perf_counter()
        n = sum(len(x) for x in it)
        out[name]["load_samples_per_s_per_core"] = round(n / (time.perf_counter() - t0), 1)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--limit", type=int, default=3000, help="source images used")
    p.add_argument("--batches", type=int, default=40, help="batches of 256 timed per loader")
    p.add_argument("--no-s3", action="store_true")
    args = p.parse_args()
    source = None if os.path.exists(CATS) else RandomImages(args.limit)
    result = {"data": CATS if source is None else "random 64x64 RGB", "limit": args.limit,
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        result["local"] = bench(tmp, args.limit, args.batches, source)
    if not args.no_s3:
        from tests.s3server import moto_s3

        with moto_s3("bootdiff-bench") as (bucket, _):
            result["s3_moto"] = bench(f"{bucket}/runs", args.limit, args.batches, source)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
