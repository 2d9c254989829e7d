"""Distillation: one full-resolution student trained to match the frozen best model (docs/METHOD.md §9).

The teacher is the sweep's best trial (`bootdiff.experiment.load_trial` of ``sweep.json``'s
``best``: the bootstrapped denoiser ``D_boot``, which evaluates every view model and the residual
at each step). The student is an EDM-preconditioned backbone (`bootdiff.precond.EDMPrecond` over
`bootdiff.nets.make_net` of ``distill.net``; by default a diffusers ``UNet2DModel``, so it exports
as a diffusers pipeline: `bootdiff.distill.export`). Its loss, per sample (`DistillLoss`):

    L = λ(σ)·mean((D_student(x_σ;σ) − D_teacher(x_σ;σ))²) + w_real·[x real]·λ(σ)·mean((D_student(x_σ;σ) − x)²)

with σ, n and λ(σ) as in the EDM loss (METHOD §2) and the teacher frozen under ``no_grad``.
Each micro-batch holds ``round(teacher_fraction · batch_size)`` teacher samples first, then real
full-res images (`mixed_data`): the teacher samples are drawn once, before training, with the
evaluation sampler (`bootdiff.samplers.sample`, ``distill.sampler_steps`` steps, seeded per shard)
and written as WebDataset shards with the project's shard writer (`write_teacher_shards`), so the
loader streams them like any split (split ``teacher`` of ``distill/teacher/manifest.json``).
The training loop is `bootdiff.train.train`, unchanged; no Ray here (``ray_jobs/distill.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from bootdiff import experiment, util
from bootdiff.config import to_yaml
from bootdiff.run.layout import RunLayout
from bootdiff.losses import check_weighting, noisy_batch, per_sample_mean
from bootdiff.schedules import weighting

TEACHER_SPLIT = "teacher"

# ----------------------------------------------------------------------------- the loss


class DistillLoss(nn.Module):
    """``__call__(student, x, generator) -> [N]`` (the loss `bootdiff.train.train` expects; see the
    module docstring). ``teacher`` is any denoiser ``D(x, σ)``; it is frozen (eval, no grad) and
    moved with the loss (`train` calls ``loss.to(device)``). The first ``num_teacher`` rows of a
    batch are teacher samples; the rest are real images, where ``real_weight`` adds the EDM
    denoising loss. σ and n are drawn as in `bootdiff.losses.EDMLoss` (one student forward per
    batch serves both terms). Sets ``last_sigma`` and ``last_terms`` (``distill``, ``real``)."""

    def __init__(self, teacher, loss_cfg, sigma_data: float, num_teacher: int = 0, real_weight: float = 0.0,
                 weighting_kind: Optional[str] = None):
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        if real_weight < 0 or num_teacher < 0:
            raise ValueError(f"distill.real_weight and the teacher rows must be >= 0, got {real_weight}, {num_teacher}")
        self.teacher = teacher.eval().requires_grad_(False) if isinstance(teacher, nn.Module) else teacher
        self.loss_cfg = loss_cfg
        self.sigma_data = float(sigma_data)
        self.num_teacher = int(num_teacher)
        self.real_weight = float(real_weight)
        self.weighting = check_weighting(weighting_kind or loss_cfg.weighting)
        self.last_sigma: Optional[torch.Tensor] = None
        self.last_terms: dict = {}

    def forward(self, student, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        sigma, x_noisy = noisy_batch(x, self.loss_cfg, generator)
        self.last_sigma = sigma.detach()
        with torch.no_grad():
            target = self.teacher(x_noisy, sigma).to(torch.float32)
        lam = weighting(sigma, self.sigma_data, self.weighting)
        d = student(x_noisy, sigma)
        distill = lam * per_sample_mean((d - target) ** 2)
        real = torch.zeros_like(distill)
        if self.real_weight > 0 and self.num_teacher < x.shape[0]:
            k = self.num_teacher
            real[k:] = lam[k:] * per_sample_mean((d[k:] - x[k:].to(d.dtype)) ** 2)
        self.last_terms = {"distill": distill.detach(), "real": real.detach()}
        return distill + self.real_weight * real


# ----------------------------------------------------------------------------- models and data


def teacher_rows(dcfg) -> int:
    """Teacher samples per micro-batch: ``round(distill.teacher_fraction · distill.train.batch_size)``."""
    return int(round(float(dcfg.teacher_fraction) * int(dcfg.train.batch_size)))


def build_student(cfg, manifest: dict):
    """The untrained student: `EDMPrecond` (σ_data of the ``full`` split) over ``distill.net``."""
    from bootdiff.nets import make_net
    from bootdiff.precond import EDMPrecond

    shape = experiment.full_shape(manifest)
    if len(shape) != 3:
        raise ValueError(f"distill: the student models images [C, H, W]; the data's samples are {list(shape)}")
    net = make_net(cfg.distill.net, in_channels=shape[0], out_channels=shape[0], resolution=shape[-1],
                   seed=cfg.distill.train.seed)
    return EDMPrecond(net, sigma_data=float(experiment.view_info(manifest, "full")["sigma_data"]))


def best_row(cfg) -> dict:
    """The ``sweep.json`` row of the sweep's best trial (the teacher); an error when there is none."""
    url = RunLayout.of(cfg).sweep_json
    if not util.exists(url):
        raise FileNotFoundError(f"distill: no finished sweep at {url}: run ray_jobs.sweep_residual first")
    outcome = json.loads(util.read_bytes(url))
    rows = {r["trial_id"]: r for r in outcome["trials"]}
    if not outcome.get("best") or outcome["best"] not in rows or not rows[outcome["best"]].get("checkpoint"):
        raise ValueError(f"distill: {url} names no best trial with a checkpoint (best: {outcome.get('best')!r})")
    return rows[outcome["best"]]


def load_teacher(cfg, manifest: dict):
    """The frozen teacher: the best trial's EMA model (`bootdiff.experiment.load_trial`), eval, no grad."""
    from bootdiff.experiment import load_trial

    return load_trial(cfg, manifest, best_row(cfg)).eval().requires_grad_(False)


def mixed_data(cfg, manifest: dict, teacher_manifest: Optional[dict], tcfg, num_teacher: int,
               rank: int = 0, world_size: int = 1):
    """``data(start_step) -> iterator`` of micro-batches ``[tcfg.batch_size, ...]``: ``num_teacher``
    rows of the teacher-sample split, then the rest from the scarce ``full`` split. Each part is
    its own `bootdiff.experiment.train_data` stream, positioned exactly (one micro-batch of each
    per micro-batch), so a resumed run continues the same stream."""
    parts = []
    if num_teacher > 0:
        t = dataclasses.replace(tcfg, batch_size=num_teacher)
        parts.append(experiment.train_data(cfg, teacher_manifest, TEACHER_SPLIT, t, rank, world_size))
    if tcfg.batch_size - num_teacher > 0:
        r = dataclasses.replace(tcfg, batch_size=tcfg.batch_size - num_teacher)
        parts.append(experiment.train_data(cfg, manifest, "full", r, rank, world_size))

    def data(start_step: int):
        streams = [iter(p(start_step)) for p in parts]
        while True:
            yield torch.cat([next(s) for s in streams])

    return data


def distill_training(cfg, manifest: dict, rank: int = 0, world_size: int = 1, teacher=None):
    """(student, loss_fn, data) of the distillation run, as `bootdiff.experiment.view_training`
    gives a view's: the same `bootdiff.train.train` call trains it (``distill.train``)."""
    dcfg = cfg.distill
    teacher = teacher if teacher is not None else load_teacher(cfg, manifest)
    student = build_student(cfg, manifest)
    k = teacher_rows(dcfg)
    loss = DistillLoss(teacher, dcfg.train.loss, float(student.sigma_data), num_teacher=k,
                       real_weight=dcfg.real_weight)
    tm = read_teacher_manifest(cfg) if k > 0 else None
    return student, loss, mixed_data(cfg, manifest, tm, dcfg.train, k, rank, world_size)


# ----------------------------------------------------------------------------- teacher samples


def teacher_shard_plan(cfg) -> List[Tuple[int, int]]:
    """``[(shard index, samples)]``: ``distill.num_teacher_samples`` in shards of ``distill.shard_size``."""
    n, size = int(cfg.distill.num_teacher_samples), int(cfg.distill.shard_size)
    return [(i, min(size, n - i * size)) for i in range((n + size - 1) // size)]


def _fingerprint(cfg, row: dict, index: int, count: int) -> str:
    d = cfg.distill
    what = [row.get("trial_id"), row.get("checkpoint"), index, count, d.sampler_steps, d.train.seed,
            to_yaml(cfg.eval.sampler)]
    return hashlib.sha256(json.dumps(what, default=str).encode()).hexdigest()[:16]


def _to_stored(x: torch.Tensor, dtype: str) -> np.ndarray:
    """Samples in model units as the shard dtype: uint8 pixels (the data's own quantisation) or
    float16 latents."""
    if dtype == "uint8":
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return x.to(torch.float16).numpy()


def write_teacher_shards(cfg, manifest: dict, shards: Sequence[Tuple[int, int]], teacher=None) -> list:
    """Draw and write the teacher-sample shards ``shards`` (from `teacher_shard_plan`), skipping
    those already committed with the same fingerprint; returns their `ShardInfo`s. Shard ``i``'s
    samples come from a generator seeded with ``distill.train.seed · 1000003 + i`` alone, so the
    shards do not depend on which task writes them."""
    from bootdiff.data.shards import ShardWriter, shard_is_complete, shard_name
    from bootdiff.samplers import sample

    layout, dcfg = RunLayout.of(cfg), cfg.distill
    row = best_row(cfg)
    shape = experiment.full_shape(manifest)
    dtype = experiment.view_info(manifest, "full")["dtype"] or "uint8"
    sampler = dataclasses.replace(cfg.eval.sampler, steps=int(dcfg.sampler_steps))
    infos = []
    for index, count in shards:
        url = util.join(layout.teacher_samples, shard_name(TEACHER_SPLIT, index))
        fp = _fingerprint(cfg, row, index, count)
        done = shard_is_complete(url, fp)
        if done is not None:
            infos.append(done)
            continue
        teacher = teacher if teacher is not None else load_teacher(cfg, manifest)
        params = list(teacher.parameters()) if isinstance(teacher, nn.Module) else []
        device = params[0].device if params else torch.device("cpu")
        gen = torch.Generator().manual_seed(int(dcfg.train.seed) * 1_000_003 + index)  # CPU: same on any device
        with torch.no_grad():
            x = torch.cat([sample(teacher, (len(c), *shape), sampler, generator=gen, device=device).cpu()
                           for c in torch.arange(count).split(cfg.eval.batch_size)])
        w = ShardWriter(url, TEACHER_SPLIT, index)
        w.info.fingerprint = fp
        for j, arr in enumerate(_to_stored(x, dtype)):
            w.write(f"t{index:06d}_{j:06d}", arr, {"teacher": row["trial_id"], "shard": index, "index": j})
        w.info.num_source = count
        infos.append(w.commit())
        print(f"[bootdiff] teacher samples: shard {index} ({count}) -> {url}", flush=True)
    return infos


def finalize_teacher_samples(cfg, infos: list) -> dict:
    """Write ``distill/teacher/manifest.json`` (split ``teacher``) from the shards' infos; return it read back."""
    from bootdiff.data.shards import FORMAT, read_manifest, split_entry, write_manifest

    row = best_row(cfg)
    root = RunLayout.of(cfg).teacher_samples
    write_manifest(root, {"format": FORMAT, "splits": {TEACHER_SPLIT: split_entry(list(infos))},
                          "teacher": {"trial_id": row["trial_id"], "checkpoint": row.get("checkpoint")}})
    return read_manifest(root)


def read_teacher_manifest(cfg) -> dict:
    from bootdiff.data.shards import read_manifest

    return read_manifest(RunLayout.of(cfg).teacher_samples)


def teacher_samples_done(cfg) -> bool:
    """The teacher samples' manifest exists (written after every shard) for the same best trial."""
    from bootdiff.data.shards import ManifestError

    try:
        m = read_teacher_manifest(cfg)
    except ManifestError:
        return False
    return m.get("teacher", {}).get("trial_id") == best_row(cfg)["trial_id"] and \
        m["splits"][TEACHER_SPLIT]["count"] == int(cfg.distill.num_teacher_samples)


# ----------------------------------------------------------------------------- export and the stage's state


def export_student(cfg, checkpoint_url: str) -> dict:
    """The run's final checkpoint (EMA weights) → ``models/student`` (bootdiff format, as the
    full-res baseline) and ``export/diffusers`` (`bootdiff.distill.export`); returns their URLs."""
    from bootdiff.checkpoint import load_checkpoint
    from bootdiff.config import ViewConfig, ViewKind
    from bootdiff.distill.export import save_pipeline
    from bootdiff.export import save_view_model

    layout = RunLayout.of(cfg)
    manifest = experiment.read_manifest(cfg)
    state = load_checkpoint(layout.url(checkpoint_url))
    student = experiment.ema_model(build_student(cfg, manifest), state)
    vcfg = ViewConfig(kind=ViewKind.full, net=cfg.distill.net, train=cfg.distill.train)
    save_view_model(student, layout.model("student"), vcfg,
                    extra={"shape": list(experiment.full_shape(manifest)), "step": state.get("step"),
                           "kimg": state.get("kimg"), "teacher": best_row(cfg)["trial_id"]})
    save_pipeline(student, layout.diffusers_export, cfg.eval.sampler)
    return {"student": layout.model("student"), "diffusers": layout.diffusers_export}


def load_student(cfg, device=None):
    """The exported student (`EDMPrecond`, eval), or None when the run has none."""
    from bootdiff.export import load_view_model

    url = RunLayout.of(cfg).model("student")
    return load_view_model(url, device)[0] if util.is_complete(url) else None


def mark_done(cfg, info: dict) -> None:
    """Write the stage's done-marker ``distill/COMPLETE`` (last, after both exports)."""
    util.atomic_write_bytes(RunLayout.of(cfg).distill_done, json.dumps(info, indent=1, default=str).encode())


def stage_action(cfg) -> str:
    """What the pipeline's distill stage does: ``"off"`` (``distill.enabled`` false), ``"done"``
    (its ``COMPLETE`` marker exists: skipped) or ``"run"`` (fresh, or resumed from its checkpoint)."""
    if not cfg.distill.enabled:
        return "off"
    return "done" if util.exists(RunLayout.of(cfg).distill_done) else "run"


# ----------------------------------------------------------------------------- cost of a sampling step


def step_time(D, x: torch.Tensor, sigma: float = 1.0, repeats: int = 5) -> float:
    """Median seconds of one call ``D(x, σ)`` over ``repeats`` calls (after one warm-up call)."""
    s = torch.full((x.shape[0],), float(sigma))
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            t = time.perf_counter()
            D(x, s)
            if i:
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def step_time_ratio(student, teacher, shape: Sequence[int], batch: int, repeats: int = 5, seed: int = 0) -> dict:
    """The sampling-step cost of the student against the teacher's, measured in this process on
    the same batch: {student_s, teacher_s, ratio, batch}."""
    x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))
    s, t = step_time(student, x, repeats=repeats), step_time(teacher, x, repeats=repeats)
    return {"student_s": s, "teacher_s": t, "ratio": s / t, "batch": batch}


def student_entry(cfg, models: dict, shape):
    """The evaluation's ``student`` hook (`bootdiff.evaluation.evaluate.evaluate`): (the exported
    student or None, its sampling-step cost against the teacher's — `step_time_ratio`, on one
    ``eval.batch_size`` batch in this process — or None)."""
    student = load_student(cfg)
    if student is None or "bootstrapped" not in models:
        return student, None
    cost = step_time_ratio(student, models["bootstrapped"], shape, cfg.eval.batch_size)
    return student, {**cost, "goal_ratio": 1 / (len(cfg.views) + 1)}  # K view models + the residual
