"""Throughput of one training step (EDM loss + AdamW step) — the plain fp32 form vs bootdiff's.

For a 64² image U-Net and a 16² patch U-Net (`bootdiff.nets.make_net` + `bootdiff.precond.EDMPrecond`,
the net configs of ``configs/cats64.yaml``; ``--size tiny`` divides the widths by 4 for CPUs), each
measured in one run on the same model and the same fixed batch, warm-up steps excluded:

* ``plain``  — what a diffusers user writes: fp32, ``torch.optim.AdamW`` (default foreach), no
  compile; with ``clip_grad_norm_`` and diffusers' ``EMAModel``, the same work as our loop.
* ``ours``   — `bootdiff.train.train` itself (bf16 autocast + channels_last + fused AdamW on CUDA,
  ``torch.compile``, EMA, grad-norm check); ``ours_nocompile`` is the same without compile.
  On CPU ``precision``/``channels_last`` "auto" mean fp32 / contiguous and AdamW is not fused;
  ``--precision bf16`` forces bf16 autocast. What was used is in the JSON.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` on one fp32 forward+backward of the loss
(matmul/conv FLOPs only); TFLOP/s = FLOPs per step × steps per second. Step time is the median
over the measured steps (robust to a shared machine's hiccups).

    python benchmarks/train_step.py --device cuda --steps 20 --batch 64
    python benchmarks/train_step.py --device cpu --steps 3 --batch 2 --modes plain,ours_nocompile

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bootdiff.config import LossConfig, NetConfig, TrainConfig  # noqa: E402
from bootdiff.losses import EDMLoss  # noqa: E402
from bootdiff.nets import make_net  # noqa: E402
from bootdiff.precond import EDMPrecond  # noqa: E402
from bootdiff.train import train  # noqa: E402

NETS = {  # configs/cats64.yaml: full_res/residual net at 64², view net on 16² patches
    "image64": (64, NetConfig(channels=[64, 128, 256, 256], attention=[False, False, True, True],
                              layers_per_block=2, norm_groups=32)),
    "patch16": (16, NetConfig(channels=[128, 256, 256], attention=[False, True, True],
                              layers_per_block=2, norm_groups=32)),
}


def build(name: str, size: str, seed: int = 0) -> torch.nn.Module:
    res, cfg = NETS[name]
    cfg = copy.deepcopy(cfg)
    if size == "tiny":
        cfg.channels, cfg.norm_groups = [max(16, c // 4) for c in cfg.channels], 8
    torch.manual_seed(seed)
    return EDMPrecond(make_net(cfg, 3, 3, res), sigma_data=0.5)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_step(model, loss_fn, x) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(model)
    with FlopCounterMode(display=False) as counter:
        loss_fn(m, x, torch.Generator(x.device).manual_seed(0)).mean().backward()
    return float(counter.get_total_flops())


def run_plain(model, loss_fn, x, warmup: int, steps: int, lr: float = 2e-4) -> float:
    """The diffusers-style loop; returns the median seconds per step (warm-up excluded)."""
    from diffusers.training_utils import EMAModel

    model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    ema = EMAModel(model.parameters(), decay=0.999)
    gen = torch.Generator(x.device).manual_seed(0)
    times = []
    for i in range(warmup + steps):
        sync(x.device)
        t0 = time.perf_counter()
        loss = loss_fn(model, x, gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.step(model.parameters())
        loss.item()  # a user logs the loss
        sync(x.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warmup:])


class _Times:
    def __init__(self):
        self.img_per_s = []

    def on_report(self, metrics, url):
        self.img_per_s.append(metrics["img_per_s"])


def run_ours(model, loss_fn, x, warmup: int, steps: int, compile: bool, precision: str) -> tuple:
    """`bootdiff.train.train` on a fixed batch; returns (median seconds per step, what was used)."""
    hooks = _Times()
    batch = x.shape[0]
    cfg = TrainConfig(total_kimg=(warmup + steps) * batch / 1000, batch_size=batch, lr=2e-4, warmup_kimg=0.0,
                      grad_clip=1.0, compile=compile, precision=precision, report_every=1,
                      checkpoint_every_kimg=0.0, seed=0)
    data = iter(lambda: x, None)  # the same batch forever
    with contextlib.redirect_stdout(sys.stderr):  # the loop's report lines; stdout is the JSON
        train(copy.deepcopy(model), loss_fn, data, cfg, hooks=hooks, device=x.device)
    measured = hooks.img_per_s[warmup:]
    cuda = x.device.type == "cuda"
    used = dict(precision="bf16" if precision == "bf16" or (precision == "auto" and cuda) else "fp32",
                channels_last=cuda, fused_adamw=cuda, compile=compile)
    return statistics.median(batch / v for v in measured), used


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20, help="measured steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="excluded steps per mode (compile happens here)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--nets", default="image64,patch16")
    p.add_argument("--size", choices=["cats64", "tiny"], default=None,
                   help="net widths: configs/cats64.yaml (default on CUDA) or /4 (default on CPU)")
    p.add_argument("--modes", default="plain,ours,ours_nocompile")
    p.add_argument("--no-compile", action="store_true", help="drop the compiled 'ours' mode")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="for 'ours'")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    size = args.size or ("cats64" if device.type == "cuda" else "tiny")
    modes = [m for m in args.modes.split(",") if m and not (args.no_compile and m == "ours")]
    if args.threads:
        torch.set_num_threads(args.threads)
    out = dict(benchmark="train_step", date=datetime.date.today().isoformat(), device=str(device),
               device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
               or platform.machine(), cpu_threads=torch.get_num_threads(), torch=torch.__version__,
               size=size, batch=args.batch, steps=args.steps, warmup=args.warmup, results=[])
    for name in args.nets.split(","):
        res = NETS[name][0]
        model = build(name, size).to(device)
        loss_fn = EDMLoss(LossConfig(), sigma_data=0.5)
        x = (torch.rand([args.batch, 3, res, res], generator=torch.Generator().manual_seed(1)) * 2 - 1).to(device)
        flops = flops_per_step(model, loss_fn, x)
        row = dict(net=name, resolution=res, params_M=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                   gflop_per_step=round(flops / 1e9, 2))
        for mode in modes:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if mode == "plain":
                sec = run_plain(model, loss_fn, x, args.warmup, args.steps)
                used = dict(precision="fp32", channels_last=False, fused_adamw=False, compile=False)
            else:
                sec, used = run_ours(model, loss_fn, x, args.warmup, args.steps, mode == "ours", args.precision)
            entry = dict(row, mode=mode, **used, step_ms=round(sec * 1e3, 2), img_per_s=round(args.batch / sec, 2),
                         tflops=round(flops / sec / 1e12, 4))
            if device.type == "cuda":
                entry["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
            out["results"].append(entry)
            print(json.dumps(entry), file=sys.stderr, flush=True)
        base = {r["mode"]: r["img_per_s"] for r in out["results"] if r["net"] == name}
        if "plain" in base:
            row_speedups = {m: round(v / base["plain"], 3) for m, v in base.items() if m != "plain"}
            out.setdefault("speedup_vs_plain", {})[name] = row_speedups
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
