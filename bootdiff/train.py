"""The training loop, framework-agnostic (modelled on NVlabs/edm ``training/training_loop.py``).

`train(model, loss_fn, data, cfg)` runs AdamW with a linear learning-rate warm-up, gradient
accumulation and clipping, an EMA of the weights with EDM's half-life in kimg and ramp-up, bf16
autocast + channels_last on CUDA, optional ``torch.compile``, periodic atomic checkpoints with
automatic resume, and reports to caller hooks. Ray code only wraps it (see ``ray_jobs/``): ranks,
``ray.train.report`` inside ``hooks.on_report``, and the checkpoint hand-off via ``resume_from``.

Data and exact resumption
-------------------------
``data`` yields micro-batches ``[cfg.batch_size, ...]`` for this rank (``cfg.accum_steps`` of
them make one optimizer step), or tuples of tensors that the loss takes apart (the groups of a
mixed batch; the kimg count is ``cfg.batch_size`` per micro-batch all the same). It is either

* an iterator / iterable — used as is (the caller must position it when resuming), or
* a callable ``data(start_step) -> iterator`` — called once with the number of optimizer steps
  already done (0 for a fresh run, the checkpoint's step on resume); the iterator must begin at
  micro-batch ``start_step * cfg.accum_steps`` of this rank's stream. The checkpoint's ``step``
  is the stream position: ``step * accum_steps`` micro-batches consumed per rank.
  `bootdiff.experiment.train_data` is such a callable over a view's shards: epoch ``e`` of its
  stream is a function of (seed, e, rank, loader worker) alone and it fast-forwards within the
  epoch, so ``data(k)`` yields exactly what ``data(0)`` yields from micro-batch ``k·accum_steps``.

Everything else (model, EMA, optimizer, step, kimg, Python/NumPy/torch CPU & CUDA RNG states and
the loss's ``torch.Generator``) is restored from the checkpoint.

What resume guarantees: with a positioned ``data`` (as above), the same world size and the same
config, an interrupted and resumed run on CPU produces bit-for-bit the same later losses and
weights as an uninterrupted one — in process and under Ray, after a killed worker or a
re-submission (tests/test_resume.py). On CUDA the same holds only up to the nondeterminism of the
GPU kernels (atomics in backward passes, bf16 autocast), i.e. statistically, not bitwise. Resuming
on a different world size reseeds the RNGs from the step and repositions each rank's stream by
its own count, which is reproducible but not the uninterrupted run. `TrainResult.step` says how
many steps (``step * accum_steps`` micro-batches per rank) were consumed.

Losses
------
``loss_fn(model, x, generator) -> [N]`` per-sample losses. If after the call ``loss_fn.last_sigma``
is a tensor ``[N]`` (the σ it sampled), the mean loss per σ band is reported as
``loss_sigma_band/<lo>-<hi>``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from bootdiff.checkpoint import checkpoint_url, latest_checkpoint, load_checkpoint, save_checkpoint
from bootdiff.config import TrainConfig, to_object, to_yaml

SIGMA_BANDS = (0.0, 0.1, 1.0, 10.0, math.inf)  # loss_sigma_band/<lo>-<hi> edges


@dataclass
class TrainResult:
    step: int  # optimizer steps done; this rank consumed step * accum_steps micro-batches
    kimg: float  # thousands of training images seen (all ranks)
    loss: float  # mean loss of the last report window
    checkpoint_url: Optional[str]  # last checkpoint written (or resumed from), None if none
    model: nn.Module  # the trained model (unwrapped)
    ema: nn.Module  # its EMA copy (eval mode, no grad)
    stopped: bool = False  # True when hooks.should_stop() ended the run early


class EMA:
    """EMA of the trainable parameters (buffers copied), as in EDM's training loop:
    ``β = 0.5 ** (batch_nimg / h)`` with half-life ``h = min(halflife_kimg·1000, cur_nimg·rampup)``
    (``rampup_ratio <= 0`` disables the ramp-up)."""

    def __init__(self, model: nn.Module, halflife_kimg: float, rampup_ratio: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.halflife_nimg = halflife_kimg * 1000
        self.rampup_ratio = rampup_ratio
        pairs = [(q, p) for q, p in zip(self.module.parameters(), model.parameters()) if p.requires_grad]
        self._ema, self._src = [q for q, _ in pairs], [p for _, p in pairs]
        self._buffers = list(zip(self.module.buffers(), model.buffers()))

    def beta(self, cur_nimg: int, batch_nimg: int) -> float:
        h = self.halflife_nimg
        if self.rampup_ratio is not None and self.rampup_ratio > 0:
            h = min(h, cur_nimg * self.rampup_ratio)
        return 0.5 ** (batch_nimg / max(h, 1e-8))

    @torch.no_grad()
    def update(self, cur_nimg: int, batch_nimg: int) -> None:
        beta = self.beta(cur_nimg, batch_nimg)
        if self._ema:
            torch._foreach_lerp_(self._ema, [p.detach() for p in self._src], 1.0 - beta)
        for b_ema, b in self._buffers:
            b_ema.copy_(b)


def learning_rate(cfg: TrainConfig, nimg: int) -> float:
    """Linear warm-up over ``warmup_kimg`` (EDM's ``lr_rampup_kimg``); ``nimg`` counts this step."""
    warm = cfg.warmup_kimg * 1000
    return cfg.lr * (min(nimg / warm, 1.0) if warm > 0 else 1.0)


def total_steps(total_kimg: float, batch_size: int, accum_steps: int = 1, world_size: int = 1) -> int:
    """Optimizer steps of a run of ``total_kimg`` (each step ``batch_size · accum_steps`` images on
    each of ``world_size`` ranks; the last step may overshoot the budget)."""
    return math.ceil(round(total_kimg * 1000) / (batch_size * accum_steps * world_size))


def _check_config(cfg: TrainConfig) -> None:
    def bad(key, value, expected):
        raise ValueError(f"TrainConfig.{key}={value!r}: expected {expected}")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        bad("precision", cfg.precision, "auto | fp32 | bf16")
    if str(cfg.channels_last).lower() not in ("auto", "true", "false"):
        bad("channels_last", cfg.channels_last, "auto | true | false")
    if cfg.batch_size < 1:
        bad("batch_size", cfg.batch_size, "a positive integer")
    if cfg.accum_steps < 1:
        bad("accum_steps", cfg.accum_steps, "a positive integer")
    if not isinstance(cfg.seed, int):
        bad("seed", cfg.seed, "an integer (load_config fills an unset one with the experiment's seed)")
    if cfg.total_kimg < 0 or cfg.lr < 0 or cfg.grad_clip < 0:
        bad("total_kimg/lr/grad_clip", (cfg.total_kimg, cfg.lr, cfg.grad_clip), "non-negative values")


def _rng_state(gen: torch.Generator) -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(python=random.getstate(), numpy=[kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
                torch=torch.get_rng_state(), loss=gen.get_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def _set_rng_state(s: dict, gen: torch.Generator) -> None:
    random.setstate(s["python"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(s["torch"])
    gen.set_state(s["loss"])
    if torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


def _seed_all(seed: int, gen: torch.Generator) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    gen.manual_seed(seed)


def _to_device(x: Any, device, channels_last: bool):
    """A micro-batch on the training device: a tensor, or a tuple of tensors (the groups of a
    mixed batch, e.g. `bootdiff.peers.ambient`), each float32 (and channels_last when asked)."""
    if isinstance(x, tuple) and x and all(isinstance(t, torch.Tensor) for t in x):
        return tuple(_to_device(t, device, channels_last) for t in x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"train(): data must yield tensors (or tuples of tensors), got {type(x).__name__}")
    x = x.to(device, torch.float32, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x


def _open_data(data: Any, start_step: int):
    if hasattr(data, "__next__"):
        return data
    if callable(data):
        return iter(data(start_step))
    return iter(data)


def train(model: nn.Module, loss_fn: Callable, data: Any, cfg: TrainConfig, run_dir: Optional[str] = None,
          hooks: Any = None, device: Any = None, resume_from: Optional[str] = None,
          config_yaml: str = "") -> TrainResult:
    """Train ``model`` with ``loss_fn`` on ``data`` for ``cfg.total_kimg``; see the module docstring.

    ``run_dir`` (URL or None): checkpoints go to ``{run_dir}/checkpoint-{step:08d}/`` and the run
    resumes from the latest complete one there, unless ``resume_from`` (a checkpoint URL) is given.
    ``hooks.on_report(metrics, checkpoint_url)`` is called on every rank every ``cfg.report_every``
    steps and whenever a checkpoint is written (its URL on rank 0, None on the other ranks, which
    write nothing); ``hooks.should_stop()`` (optional) is polled at those steps (the ranks agree):
    before the report — a stop asked for since the last one ends the run with a checkpoint of where
    it stopped — and at a checkpoint also after its report, so that a stop decided on that
    checkpoint (patience on its held-out G) ends the run at it, with no steps beyond.
    ``hooks.on_start(dict(step, kimg, rank))`` (optional) is called once the run has resumed (or
    starts fresh) and ``hooks.on_end()`` (optional) when it ends, also on an exception
    (`bootdiff.run.tb.TensorBoardHooks` writes the run's TensorBoard curves through these).
    Metrics: step, kimg, loss, loss_sigma_band/<lo>-<hi>, grad_norm_max, img_per_s, lr, rank
    (loss and bands averaged over ranks and over the steps since the last report).
    ``config_yaml`` is stored beside each checkpoint (default: the YAML of ``cfg``).
    """
    # Initialize (EDM: seeds differ per rank; only rank 0 writes).
    cfg = to_object(cfg)
    _check_config(cfg)
    config_yaml = config_yaml or to_yaml(cfg)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    cuda = device.type == "cuda"
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    channels_last = str(cfg.channels_last).lower() == "true" or (str(cfg.channels_last).lower() == "auto" and cuda)
    gen = torch.Generator(device)
    _seed_all((cfg.seed * world + rank) % (1 << 31), gen)
    step_nimg = cfg.batch_size * cfg.accum_steps * world
    last_step = total_steps(cfg.total_kimg, cfg.batch_size, cfg.accum_steps, world)
    ckpt_nimg = round(cfg.checkpoint_every_kimg * 1000)

    # Model, optimizer, EMA.
    model.train().to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if isinstance(loss_fn, nn.Module):
        loss_fn.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train(): the model has no parameters with requires_grad=True")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                  fused=True if cuda else None)
    ema = EMA(model, cfg.ema_halflife_kimg, cfg.ema_rampup_ratio)

    # Resume from the latest complete checkpoint (or the one handed over).
    step, nimg, last_ckpt = 0, 0, None
    resume_url = resume_from or latest_checkpoint(run_dir)
    if resume_url:
        state = load_checkpoint(resume_url, map_location="cpu")
        model.load_state_dict(state["model"])
        ema.module.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, nimg, last_ckpt = int(state["step"]), int(state["nimg"]), resume_url
        if len(state["rng"]) == world:
            _set_rng_state(state["rng"][rank], gen)
        else:  # a different world size: reseed deterministically from the step
            warnings.warn(f"{resume_url}: saved by {len(state['rng'])} rank(s), resuming on {world}; reseeding RNGs")
            _seed_all((cfg.seed * 1_000_003 + step * world + rank) % (1 << 31), gen)
        del state
    batches = _open_data(data, step)
    if hooks is not None and hasattr(hooks, "on_start"):  # e.g. TensorBoard continues from here
        hooks.on_start(dict(step=step, kimg=nimg / 1000, rank=rank))

    # Wrap for DDP / compile; EMA and checkpoints use the unwrapped model.
    net = ddp = model
    if distributed:
        net = ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None,
                                                        find_unused_parameters=False)
    if cfg.compile:
        net = torch.compile(net, dynamic=False)

    # Train.
    bar = tqdm(total=round(cfg.total_kimg, 3), initial=round(nimg / 1000, 3), unit="kimg",
               disable=rank != 0 or not sys.stderr.isatty(), dynamic_ncols=True)
    nbands = len(SIGMA_BANDS) - 1
    edges = torch.tensor(SIGMA_BANDS[1:-1], device=device)
    stats = torch.zeros(2 * nbands, device=device, dtype=torch.float64)  # band loss sums, counts
    win_loss, win_steps, win_norm = 0.0, 0, 0.0
    win_start, win_nimg = time.time(), nimg
    loss_mean, stopped = math.nan, False
    try:
        while step < last_step:
            # Accumulate gradients over micro-batches (DDP syncs on the last one only).
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros([], device=device)
            for round_idx in range(cfg.accum_steps):
                try:
                    x = next(batches)
                except StopIteration:
                    raise RuntimeError(f"train(): data iterator exhausted at step {step + 1} "
                                       f"(micro-batch {round_idx + 1} of {cfg.accum_steps})") from None
                x = _to_device(x, device, channels_last)
                no_sync = ddp.no_sync() if distributed and round_idx < cfg.accum_steps - 1 else contextlib.nullcontext()
                with no_sync:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        loss = loss_fn(net, x, gen)
                    if loss.ndim != 1:
                        raise ValueError(f"train(): loss_fn must return per-sample losses [N], got {list(loss.shape)}")
                    loss = loss.float()
                    loss.mean().div(cfg.accum_steps).backward()
                step_loss += loss.detach().mean() / cfg.accum_steps
                sigma = getattr(loss_fn, "last_sigma", None)
                if isinstance(sigma, torch.Tensor) and sigma.shape == loss.shape:
                    band = torch.bucketize(sigma.detach().float().reshape(-1), edges, right=True)
                    stats.index_add_(0, band, loss.detach().double())
                    stats.index_add_(0, band + nbands, torch.ones_like(loss, dtype=torch.float64))

            # Stop on a non-finite loss or gradient before the bad step touches the weights.
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            loss_val, norm_val = torch.stack([step_loss, grad_norm.float()]).tolist()
            if not (math.isfinite(loss_val) and math.isfinite(norm_val)):
                what = "loss" if not math.isfinite(loss_val) else "gradient norm"
                raise FloatingPointError(f"non-finite {what} at step {step + 1} (kimg {nimg / 1000:.3f}); "
                                         f"last good checkpoint: {last_ckpt}")

            # Update weights and EMA.
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, grad_norm)
            lr = learning_rate(cfg, nimg + step_nimg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.step()
            ema.update(nimg, step_nimg)
            nimg += step_nimg
            step += 1
            win_loss, win_steps, win_norm = win_loss + loss_val, win_steps + 1, max(win_norm, norm_val)
            bar.update(round(step_nimg / 1000, 6))

            # Maintenance: report, poll should_stop, checkpoint (EDM "once per tick").
            done = step >= last_step
            ckpt_due = done or (ckpt_nimg > 0 and nimg // ckpt_nimg > (nimg - step_nimg) // ckpt_nimg)
            report_due = ckpt_due or (cfg.report_every > 0 and step % cfg.report_every == 0)
            if not report_due:
                continue
            elapsed = time.time() - win_start
            stop = not done and _should_stop(hooks, distributed, device)  # e.g. a stop asked for since the last report
            totals = torch.cat([torch.tensor([win_loss, win_steps], device=device, dtype=torch.float64), stats])
            if distributed:
                dist.all_reduce(totals)
            totals = totals.tolist()
            loss_mean = totals[0] / max(totals[1], 1)
            metrics = dict(step=step, kimg=nimg / 1000, loss=loss_mean, grad_norm_max=win_norm,
                           img_per_s=(nimg - win_nimg) / max(elapsed, 1e-9), lr=lr, rank=rank)
            for i in range(nbands):
                if totals[2 + nbands + i] > 0:
                    lo, hi = SIGMA_BANDS[i], SIGMA_BANDS[i + 1]
                    metrics[f"loss_sigma_band/{lo:g}-{hi:g}"] = totals[2 + i] / totals[2 + nbands + i]
            url = None
            if run_dir and (ckpt_due or stop):
                url = last_ckpt = _save_checkpoint(run_dir, step, nimg, model, ema, optimizer, gen, params,
                                                   config_yaml, cfg.keep_checkpoints, distributed, rank, world)
            if rank == 0:
                # a checkpoint by its name: under Ray its folder is temporary until Ray persists it
                line = (f"step {step:<7d} kimg {nimg / 1000:<9.3f} loss {loss_mean:<9.4f} lr {lr:<9.3g} "
                        f"img/s {metrics['img_per_s']:<9.1f}" + (f" checkpoint {os.path.basename(url)}" if url else ""))
                tqdm.write(line, file=sys.stdout)
            if hooks is not None and hasattr(hooks, "on_report"):
                hooks.on_report(metrics, url if rank == 0 else None)  # only rank 0 wrote it
            if ckpt_due and not stop and not done:  # a stop decided on this checkpoint (patience) ends the run at it
                stop = _should_stop(hooks, distributed, device)
            stats.zero_()
            win_loss, win_steps, win_norm = 0.0, 0, 0.0
            win_start, win_nimg = time.time(), nimg
            if stop:
                stopped = True
                break
    finally:
        bar.close()
        if hooks is not None and hasattr(hooks, "on_end"):  # e.g. TensorBoard uploads its files
            hooks.on_end()
    return TrainResult(step=step, kimg=nimg / 1000, loss=loss_mean, checkpoint_url=last_ckpt,
                       model=model, ema=ema.module, stopped=stopped)


def _should_stop(hooks, distributed: bool, device) -> bool:
    """``hooks.should_stop()``, agreed by every rank (or the next collective hangs)."""
    if not hasattr(hooks, "should_stop"):
        return False
    stop = bool(hooks.should_stop())
    if distributed:
        flag = torch.tensor([float(stop)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item())
    return stop


def _save_checkpoint(run_dir, step, nimg, model, ema, optimizer, gen, params, config_yaml, keep,
                     distributed, rank, world) -> str:
    """Gather every rank's RNG states, refuse non-finite weights, write on rank 0, then barrier."""
    if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        raise FloatingPointError(f"non-finite weights at step {step} (kimg {nimg / 1000:.3f}); checkpoint not written")
    rngs = [_rng_state(gen)]
    if distributed:
        rngs = [None] * world
        dist.all_gather_object(rngs, _rng_state(gen))
    url = None
    if rank == 0:
        state = dict(model=model.state_dict(), ema=ema.module.state_dict(), optimizer=optimizer.state_dict(),
                     step=step, nimg=nimg, kimg=nimg / 1000, rng=rngs, world_size=world, config_yaml=config_yaml)
        url = save_checkpoint(run_dir, step, state, config_yaml, keep=keep)
    if distributed:
        dist.barrier()
    return url or checkpoint_url(run_dir, step)
