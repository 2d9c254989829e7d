"""The whole bootstrapping-diffusion pipeline on Ray:
ingest -> train_views -> sweep_residual -> evaluate.

    ray job submit --working-dir . -- python -m ray_jobs.pipeline --config configs/quickstart.yaml
    python -m ray_jobs.pipeline --config configs/quickstart.yaml [key=value ...]   # local Ray

Each stage is skipped when its outputs are already complete (manifest, exported view models,
sweep.json, report), and each stage resumes its own partial work (complete shards, Train
checkpoints, the Tune experiment), so a failed pipeline is simply submitted again.
"""

from __future__ import annotations

import sys
import time

from bootdiff import util
from bootdiff.layout import RunLayout
from ray_jobs import common, evaluate, ingest, sweep_residual, train_views


def run(cfg, cfg_yaml: str) -> dict:
    t0 = time.time()
    layout = RunLayout.of(cfg)
    common.init_ray(cfg)
    print(f"[bootdiff] pipeline '{cfg.name}' -> {layout.root}", flush=True)
    common.write_json(layout.config, {"yaml": cfg_yaml})
    stages = {}
    for name, fn in (("ingest", lambda: ingest.run(cfg)),
                     ("train_views", lambda: train_views.run(cfg, cfg_yaml)),
                     ("sweep_residual", lambda: sweep_residual.run(cfg, cfg_yaml))):
        s = time.time()
        print(f"[bootdiff] === stage {name} ===", flush=True)
        fn()
        stages[name] = time.time() - s
    s = time.time()
    print("[bootdiff] === stage evaluate ===", flush=True)
    if evaluate.report_done(cfg):
        print(f"[bootdiff] report already written: {layout.report}", flush=True)
    else:
        evaluate.run(cfg, cfg_yaml, common.read_json(layout.sweep_json))
    stages["evaluate"] = time.time() - s
    report = util.join(layout.report, "report.html")
    print(f"[bootdiff] pipeline done in {time.time() - t0:.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in stages.items())})", flush=True)
    print(f"[bootdiff] sweep report: {report}", flush=True)
    return {"report": report, "stages": stages}


def _job(cfg, cfg_yaml: str) -> None:
    run(cfg, cfg_yaml)


if __name__ == "__main__":
    sys.exit(common.main(_job, __doc__))
