"""Sampling throughput (img/s) of the bootstrapped teacher vs the distilled student (docs/METHOD.md §9).

Quickstart scale (``configs/quickstart.yaml``): 32² grey images; the teacher is the bootstrapped
denoiser of that config — the 16² patch view model (stride 8: 9 patches per image) and the ×2
low-res view model fused, plus the residual net (`bootdiff.experiment`'s architecture, built
here with random weights: speed does not depend on them); the student is ``distill.net`` at 32²
(`bootdiff.distill.student.build_student`'s architecture). Both sample with bootdiff's Heun sampler
(``eval.sampler``, ``--steps`` levels) on the same noise; img/s = batch / median seconds of a
whole sampling run. Also the step-time ratio student/teacher (`bootdiff.distill.student.step_time_ratio`)
and its goal 1/(K+1) for K view models.

    python benchmarks/distill_speed.py --device cpu --batch 16 --steps 18 --repeats 3 \
        distill.net.channels=[16,32] distill.net.attention=[false,false]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import torch

from bootdiff.config import load_config, to_object
from bootdiff.distill.student import step_time_ratio
from bootdiff.fusion import CombinedDenoiser, ViewModel
from bootdiff.nets import make_net
from bootdiff.precond import EDMPrecond
from bootdiff.residual import BootstrapDenoiser, RangeAdapter, ResidualPrecond
from bootdiff.samplers import sample
from bootdiff.views import make_view

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def models(cfg, device):
    c, h = cfg.data.channels, cfg.data.resolution
    shape = (c, h, h)
    vms = []
    for name, v in cfg.views.items():
        view = make_view(v, shape)
        side = v.patch_size if str(v.kind) in ("patch", "clean_patch") else h // v.factor
        vms.append(ViewModel(name, view, EDMPrecond(make_net(v.net, c, c, side, seed=0), 0.5)))
    r = cfg.residual
    teacher = BootstrapDenoiser(CombinedDenoiser(vms, fusion=r.fusion),
                                ResidualPrecond(make_net(r.net, 2 * c, c, h, seed=0), 0.5),
                                RangeAdapter.ones(-6.2, 4.4))
    student = EDMPrecond(make_net(cfg.distill.net, c, c, h, seed=0), 0.5)
    return teacher.eval().to(device), student.eval().to(device), shape


def throughput(D, shape, sampler, batch, repeats, device) -> dict:
    times = []
    for i in range(repeats + 1):
        z = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(i))
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        sample(D, (batch, *shape), sampler, latents=z, device=device)
        if device != "cpu":
            torch.cuda.synchronize()
        if i:  # the first run warms up
            times.append(time.perf_counter() - t)
    s = statistics.median(times)
    return {"img_per_s": batch / s, "s_per_batch": s}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "quickstart.yaml"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. distill.net.channels=[16,32]")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = to_object(load_config(args.config, args.overrides))
    teacher, student, shape = models(cfg, args.device)
    sampler = dataclasses.replace(cfg.eval.sampler, steps=args.steps)
    with torch.no_grad():
        t = throughput(teacher, shape, sampler, args.batch, args.repeats, args.device)
        s = throughput(student, shape, sampler, args.batch, args.repeats, args.device)
        step = step_time_ratio(student, teacher, shape, args.batch) if args.device == "cpu" else None
    out = {"benchmark": "distill_speed", "config": os.path.relpath(args.config, REPO), "device": args.device,
           "overrides": args.overrides, "threads": args.threads, "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
           "shape": list(shape), "views": list(cfg.views), "teacher": t, "student": s,
           "speedup": s["img_per_s"] / t["img_per_s"], "step_time": step,
           "goal_ratio": 1 / (len(cfg.views) + 1), "load_average": list(os.getloadavg())}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
