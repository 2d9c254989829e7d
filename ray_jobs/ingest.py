"""Ingest on Ray: the data layer's shard-range tasks (`bootdiff.data.ingest`) as parallel Ray
tasks, with a progress bar, then the manifest.

    python -m ray_jobs.ingest --config configs/quickstart.yaml [key=value ...]

Shards already complete are skipped, so an interrupted ingest re-submitted carries on.
"""

from __future__ import annotations

import sys

from bootdiff import experiment, util
from bootdiff.run.layout import RunLayout
from ray_jobs import entry


def ingest_done(cfg) -> bool:
    return util.exists(RunLayout.of(cfg).manifest)


def run(cfg) -> dict:
    """Run every shard task as a Ray task (1 CPU each) and write the manifest."""
    from tqdm import tqdm

    from bootdiff.data.ingest import finalize_manifest, plan_ingest, run_shard_task

    if ingest_done(cfg):
        print(f"[bootdiff] data already ingested: {RunLayout.of(cfg).manifest}", flush=True)
        return experiment.read_manifest(cfg)
    ray = entry.init_ray(cfg)
    tasks = plan_ingest(cfg)
    remote = ray.remote(num_cpus=1, max_retries=2)(run_shard_task)
    pending = [remote.remote(t) for t in tasks]
    infos = []
    with tqdm(total=len(pending), desc="ingest shards", unit="shard", mininterval=2) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            infos.extend(ray.get(done))
            bar.update(len(done))
    manifest = finalize_manifest(cfg, infos)
    print(f"[bootdiff] ingested {len(infos)} shards to {RunLayout.of(cfg).data}", flush=True)
    return manifest


def _job(cfg, cfg_yaml: str) -> None:
    run(cfg)


if __name__ == "__main__":
    sys.exit(entry.main(_job, __doc__))
