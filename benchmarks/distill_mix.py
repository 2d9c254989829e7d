"""Which training mix distils the bootstrapped model best (docs/METHOD.md §9): teacher samples vs
the scarce real images as the x of the distillation loss, with or without the plain denoising loss.

    python benchmarks/distill_mix.py --run /tmp/runs/quickstart --out /tmp/mix --kimg 4 \
        --mixes 0:0 0.5:0 1:0 0.5:0.5 [key=value ...]

``--run``: a finished pipeline run (``{storage}/{name}``: data, models, sweep.json); its files are
only read. Each mix ``f:w`` is ``distill.teacher_fraction=f distill.real_weight=w``. The teacher
samples (``distill.num_teacher_samples``) are drawn once; every student starts from the same
initial weights and trains ``--kimg`` in this process (`bootdiff.train.train`, the stage's own
model / loss / data from `bootdiff.distill.student.distill_training`). Scores of each student's EMA, all
on the held-out ``test`` split: G (METHOD §6), the distance to the teacher
``E λ(σ)‖D_student − D_teacher‖²`` over the same σ grid and fixed noise, and the SWD of
``--num-samples`` samples (same noise for every model). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def teacher_distance(cfg, manifest, student, teacher) -> float:
    """``mean_σ E_x λ(σ)·mean((D_s(x+σn) − D_t(x+σn))²)`` on the test split, G's σ grid and noise."""
    from bootdiff import experiment
    from bootdiff.evaluation.metrics import fixed_noise, sigma_grid
    from bootdiff.schedules import weighting

    sigmas = sigma_grid(cfg.eval)
    lam = weighting(torch.tensor(sigmas, dtype=torch.float64), experiment.g_sigma_data(manifest), "edm")
    total, seen = torch.zeros(len(sigmas), dtype=torch.float64), 0
    batches = experiment.stream(cfg, manifest, "test", batch_size=cfg.eval.batch_size, mode="eval",
                                max_samples=cfg.eval.max_samples)
    with torch.no_grad():
        for x in batches:
            x = x[0] if isinstance(x, (tuple, list)) else x
            for j, s in enumerate(sigmas):
                y = x + s * fixed_noise(cfg.eval.seed, j, seen, x.shape[0], x.shape[1:])
                sig = torch.full((x.shape[0],), s)
                total[j] += (student(y, sig) - teacher(y, sig)).flatten(1).double().pow(2).mean(1).sum()
            seen += x.shape[0]
    return float((total / seen * lam).mean())


def main(argv=None) -> dict:
    from bootdiff import experiment
    from bootdiff.distill import student as distill
    from bootdiff.checkpoint import load_checkpoint
    from bootdiff.config import load_config, to_object
    from bootdiff.evaluation.evaluate import sample_images
    from bootdiff.evaluation.metrics import sliced_wasserstein_levels
    from bootdiff.evaluation.scores import generalization
    from bootdiff.train import train

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a finished pipeline run folder {storage}/{name}")
    ap.add_argument("--out", required=True, help="scratch folder (a copy of the run's inputs + the students)")
    ap.add_argument("--kimg", type=float, default=4.0)
    ap.add_argument("--mixes", nargs="+", default=["0:0", "0.5:0", "1:0", "0.5:0.5"])
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = os.path.abspath(args.run)
    saved = json.load(open(os.path.join(run, "config.json")))["yaml"]
    name = os.path.basename(run)
    out = os.path.abspath(args.out)
    for part in ("data", "models", "sweep"):  # the inputs, copied: this benchmark never writes into the run
        if not os.path.exists(os.path.join(out, name, part)):
            shutil.copytree(os.path.join(run, part), os.path.join(out, name, part),
                            ignore=shutil.ignore_patterns("tune", "runs", "events", "report", "cache"))
    cfg_file = os.path.join(out, "config.yaml")  # the run's resolved config, re-read with our overrides
    open(cfg_file, "w").write(saved)
    base = to_object(load_config(cfg_file, [f"storage={out}", f"distill.train.total_kimg={args.kimg}", *args.overrides]))
    manifest = experiment.read_manifest(base)
    teacher = distill.load_teacher(base, manifest)
    t0 = time.time()
    distill.finalize_teacher_samples(base, distill.write_teacher_shards(base, manifest, distill.teacher_shard_plan(base), teacher))
    teacher_s = time.time() - t0
    shape = experiment.full_shape(manifest)
    base.eval.num_images = args.num_samples
    test_x = experiment.load_all(base, manifest, "test", base.eval.max_samples)
    rows = {"teacher": {"test_G": generalization(base, manifest, teacher, "test")["total"],
                        "swd": sliced_wasserstein_levels(sample_images(base, teacher, shape, base.eval.seed), test_x)["swd"]}}
    for mix in args.mixes:
        f, w = (float(v) for v in mix.split(":"))
        cfg = copy.deepcopy(base)
        cfg.distill.teacher_fraction, cfg.distill.real_weight = f, w
        start = time.time()
        student, loss, data = distill.distill_training(cfg, manifest, teacher=teacher)
        res = train(student, loss, data, cfg.distill.train, run_dir=os.path.join(out, "students", mix.replace(":", "_")))
        ema = experiment.ema_model(distill.build_student(cfg, manifest), load_checkpoint(res.checkpoint_url))
        samples = sample_images(cfg, ema, shape, cfg.eval.seed)
        rows[mix] = {"teacher_fraction": f, "real_weight": w, "kimg": res.kimg,
                     "test_G": generalization(cfg, manifest, ema, "test")["total"],
                     "train_G": generalization(cfg, manifest, ema, "full")["total"],
                     "to_teacher": teacher_distance(cfg, manifest, ema, teacher),
                     "swd": sliced_wasserstein_levels(samples, test_x)["swd"], "seconds": time.time() - start}
        print(f"[distill_mix] {mix}: {rows[mix]}", flush=True)
    result = {"benchmark": "distill_mix", "run": run, "kimg": args.kimg, "num_teacher_samples": base.distill.num_teacher_samples,
              "teacher_samples_s": teacher_s, "net": {"channels": list(base.distill.net.channels)},
              "threads": args.threads, "load_average": list(os.getloadavg()), "rows": rows}
    print(json.dumps(result, indent=1, default=float))
    return result


if __name__ == "__main__":
    main()
