"""Stage distill on Ray (optional, ``distill.enabled``): one full-resolution student distilled from
the sweep's best model and exported as a diffusers pipeline (`bootdiff.distill`, docs/METHOD.md §9).

    python -m ray_jobs.distill --config configs/quickstart.yaml distill.enabled=true [key=value ...]

1. Teacher samples: the plan's shards (`bootdiff.distill.student.teacher_shard_plan`) split over parallel
   ``@ray.remote`` tasks, each loading the teacher once and writing a few shards
   (`bootdiff.distill.student.write_teacher_shards`; committed shards are skipped), then their manifest.
2. The student: a Ray Train run named ``distill`` under ``{storage}/{name}/distill/runs``, through
   the view models' own worker and trainer (`ray_jobs.train_views.train_worker`, `make_trainer`,
   `fit_retrying`): DDP over ``distill.scaling``, checkpoints, retries, resume on re-submission.
3. Export: ``models/student`` and ``export/diffusers`` (`bootdiff.distill.student.export_student`), then
   the done-marker ``distill/COMPLETE``; a re-submitted pipeline skips the stage when it exists
   (`bootdiff.distill.student.stage_action`).
"""

from __future__ import annotations

import sys
import time

from bootdiff import experiment
from bootdiff.distill import student as distill
from bootdiff.run.layout import RunLayout
from ray_jobs import cluster, common, entry
from ray_jobs.train_views import fit_retrying, make_trainer, train_worker  # noqa: F401  (train_worker: pickled by name)


def sample_shards(cfg_yaml: str, shards: list) -> list:
    """One Ray task's share of the teacher samples: load the teacher once, write ``shards``."""
    import torch

    cfg = common.cfg_from_yaml(cfg_yaml)
    manifest = experiment.read_manifest(cfg)
    teacher = distill.load_teacher(cfg, manifest).to("cuda" if torch.cuda.is_available() else "cpu")
    return [i.to_dict() for i in distill.write_teacher_shards(cfg, manifest, shards, teacher)]


def generate_teacher_samples(cfg, cfg_yaml: str) -> dict:
    """The teacher-sample shards in parallel Ray tasks (resources as a sweep trial's), then their manifest."""
    from bootdiff.data.shards import ShardInfo

    ray = entry.init_ray(cfg)
    plan = distill.teacher_shard_plan(cfg)
    ntasks = max(1, min(len(plan), int(ray.cluster_resources().get("CPU", 1) // max(cfg.sweep.trial_cpus, 1))))
    task = ray.remote(**cluster.trial_task_options(cfg, max_retries=2))(sample_shards)
    refs = [task.remote(cfg_yaml, plan[k::ntasks]) for k in range(ntasks)]
    print(f"[bootdiff] distill: {cfg.distill.num_teacher_samples} teacher samples in {len(plan)} shard(s), "
          f"{ntasks} task(s)", flush=True)
    infos = [ShardInfo.from_dict(d) for part in ray.get(refs) for d in part]
    return distill.finalize_teacher_samples(cfg, infos)


def run(cfg, cfg_yaml: str) -> dict:
    """The distill stage: skipped when off or done, else teacher samples → student → exports → marker."""
    layout = RunLayout.of(cfg)
    action = distill.stage_action(cfg)
    if action != "run":
        print(f"[bootdiff] distill: {'disabled (distill.enabled: false)' if action == 'off' else f'already done ({layout.distill_done}), skipped'}",
              flush=True)
        return {"action": action}
    start = time.time()
    if distill.teacher_rows(cfg.distill) > 0 and not distill.teacher_samples_done(cfg):
        generate_teacher_samples(cfg, cfg_yaml)
    result = fit_retrying(lambda: make_trainer(cfg, cfg_yaml, "distill", "distill", layout.distill_runs, evaluate=True),
                          cfg.ray.max_failures, "distillation", cluster.placeable(cfg, "distill.scaling"))
    if result.checkpoint is None:
        raise RuntimeError("distillation: training finished without a checkpoint")
    urls = distill.export_student(cfg, result.checkpoint.path)
    info = {"action": "run", "start": start, "end": time.time(), "teacher": distill.best_row(cfg)["trial_id"],
            "metrics": result.metrics, "checkpoint": result.checkpoint.path, **urls}
    distill.mark_done(cfg, info)
    print(f"[bootdiff] distill done in {info['end'] - start:.0f} s -> {urls['diffusers']}", flush=True)
    return info


def _job(cfg, cfg_yaml: str) -> dict:
    return run(cfg, cfg_yaml)


if __name__ == "__main__":
    sys.exit(entry.main(_job, __doc__))
