"""Stage 3 on Ray: the evaluation procedure (`bootdiff.evaluation.evaluate.evaluate`) as one Ray task.

    python -m ray_jobs.evaluate --config configs/quickstart.yaml [key=value ...]

Scores and samples the sweep's best trial and the baselines and writes the sweep report to
``{storage}/{name}/sweep/report/`` (`bootdiff.run.layout.RunLayout.report`), exporting the
bootstrapped model and the full-res baseline under ``models/``. The task asks for a sweep
trial's resources (a GPU when the trials have one), with ``eval.num_cpus`` CPUs when set.
"""

from __future__ import annotations

import sys

from bootdiff import util
from bootdiff.distill.student import student_entry
from bootdiff.evaluation import evaluate as evaluation
from bootdiff.run.layout import RunLayout
from ray_jobs import common, entry
from ray_jobs.cluster import trial_task_options
from ray_jobs.sweep_residual import sweep_done


def report_done(cfg) -> bool:
    return util.exists(RunLayout.of(cfg).summary)


def evaluate(cfg, cfg_yaml: str, outcome: dict) -> dict:
    """The task (its log lines show as ``(evaluate pid=…)``): `bootdiff.evaluation.evaluate.evaluate`
    with as many torch threads as CPUs Ray gave it (a reused worker process keeps the thread count
    of the task it first ran)."""
    import ray
    import torch

    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    return evaluation.evaluate(cfg, cfg_yaml, outcome, student_entry)


def run(cfg, cfg_yaml: str, outcome: dict) -> dict:
    """Evaluate as one Ray task (resources as a sweep trial's, ``eval.num_cpus`` CPUs when set),
    and return the report's URLs."""
    ray = entry.init_ray(cfg)
    options = trial_task_options(cfg, **({"num_cpus": cfg.eval.num_cpus} if cfg.eval.num_cpus > 0 else {}))
    urls = ray.get(ray.remote(**options)(evaluate).remote(cfg, cfg_yaml, outcome))
    for line in urls.get("verdict") or []:  # the report's answer: did the partial data help?
        print(f"[bootdiff] {line}", flush=True)
    print(f"[bootdiff] report: {urls.get('html')}", flush=True)
    return urls


def _job(cfg, cfg_yaml: str) -> dict:
    layout = RunLayout.of(cfg)
    if not sweep_done(cfg):
        raise SystemExit(f"no finished sweep at {layout.sweep}: run ray_jobs.sweep_residual first")
    return run(cfg, cfg_yaml, common.read_json(layout.sweep_json))


if __name__ == "__main__":
    sys.exit(entry.main(_job, __doc__))
