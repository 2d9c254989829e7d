"""Ingest: raw source → WebDataset shards of every view (+ the full and test splits) + manifest.

``python -m bootdiff.data.ingest CONFIG [key=value ...]`` writes to ``{storage}/{name}/data``:

    {root}/{split_or_view}/{split_or_view}-{i:06d}.tar   (+ a ``.tar.json`` commit sidecar)
    {root}/manifest.json

Split (seeded by ``data.split_seed``): the held-out ``test`` set (``num_test``; drawn from the
source's natural ``fixed_test`` when it has one, else from the seeded permutation), the scarce
``full`` set (``num_full``) and the partial-view set (``num_partial``, 0 = all the rest), all
disjoint. Each view in ``cfg.views`` is applied to the partial set (DESIGN.md §1 table):

    patch        ``per_sample`` random ``patch_size²`` crops; ``location`` (row, col) recorded
    downsample   area (block-mean) downsample by ``factor``, rounded to uint8
    clip         ``per_sample`` random windows of ``clip_len`` frames; ``frames`` [t0, t1) recorded
    clean_patch  ``per_sample`` random crops that miss the sample's corruption mask
    full         the sample itself

With ``data.latent.enabled`` each sample is first encoded by the VAE (`bootdiff.data.latent`)
and the view applies to the latent (sizes in latent pixels).

The work is a list of independent `ShardTask`s (`plan_ingest`), each run by `run_shard_task`
(serially here, as Ray tasks in ``ray_jobs/ingest.py``), then `finalize_manifest`. A shard's
randomness comes from (split_seed, view, shard index) only, so the result does not depend on the
order of execution; committed shards are skipped on a re-run, so an interrupted ingest resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import sys
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from bootdiff.config import DataConfig, from_yaml, load_config, to_yaml
from bootdiff.data.shards import (FORMAT, ShardInfo, ShardWriter, shard_is_complete, shard_name,
                                  split_entry, write_manifest)
from bootdiff.util import join, url_fs

VIEW_KINDS = ("patch", "downsample", "clip", "clean_patch", "full")
RESERVED = ("full", "test")
_SOURCES: Dict[str, Any] = {}  # per-process cache of opened sources (one per data config)


@dataclass
class ShardTask:
    """One shard to write: picklable, self-contained (Ray ships it to a worker)."""

    split: str  # "full", "test" or a view name
    view: Dict[str, Any]  # kind, patch_size, per_sample, factor, clip_len
    indices: List[int]  # source sample indices that feed this shard
    index: int  # shard index within the split
    url: str
    seed: List[int]  # numpy SeedSequence entropy: [split_seed, crc32(split), index]
    data_yaml: str  # the DataConfig, to open the source / VAE in the worker
    corrupted: bool = False  # read the corrupted source (partial set with data.corruption)
    fingerprint: str = ""
    meta: Dict[str, Any] = field(default_factory=dict)  # source description, split sizes

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)


def data_root(cfg) -> str:
    """``{storage}/{name}/data``; a relative local storage path is made absolute."""
    storage = str(cfg.storage)
    if "://" not in storage:
        storage = os.path.abspath(storage)
    return join(storage, str(cfg.name), "data")


def _data_cfg(cfg) -> DataConfig:
    return from_yaml(to_yaml(cfg.data), DataConfig)


def _view_dict(name: str, v) -> Dict[str, Any]:
    kind = str(v.kind)
    if kind not in VIEW_KINDS:
        raise ValueError(f"views.{name}.kind: unknown view kind {kind!r} (known: {VIEW_KINDS})")
    if name in RESERVED:
        raise ValueError(f"views.{name}: the names {RESERVED} are reserved for the full-resolution "
                         "splits; rename the view")
    return {"kind": kind, "patch_size": int(v.patch_size), "per_sample": int(v.per_sample),
            "factor": int(v.factor), "clip_len": int(v.clip_len)}


def get_source(data: DataConfig, corrupted: bool = False, min_frames: int = 0):
    """Open (once per process) the source of a data config, optionally its corrupted form."""
    key = to_yaml(data) + f"|{corrupted}|{min_frames}"
    if key not in _SOURCES:
        from bootdiff.data.source import open_source

        src = open_source(data, min_frames=min_frames)
        if corrupted:
            from bootdiff.data.corrupt import CorruptedSource

            src = CorruptedSource(src, data.corruption)
        _SOURCES[key] = src
    return _SOURCES[key]


def split_indices(n: int, fixed_test: Optional[List[int]], data: DataConfig) -> Dict[str, List[int]]:
    """Disjoint index lists ``full``, ``partial``, ``test`` of a source of ``n`` samples."""
    rng = np.random.default_rng(int(data.split_seed))
    if fixed_test:
        fixed = sorted({int(i) for i in fixed_test if 0 <= int(i) < n})
        if data.num_test > len(fixed):
            raise ValueError(f"data.num_test={data.num_test} but the source's fixed test split has "
                             f"only {len(fixed)} samples")
        test = [fixed[i] for i in rng.permutation(len(fixed))[:data.num_test]]
        taken = set(fixed)
        pool = [i for i in rng.permutation(n).tolist() if i not in taken]
    else:
        perm = rng.permutation(n).tolist()
        test, pool = perm[:data.num_test], perm[data.num_test:]
    if data.num_full > len(pool):
        raise ValueError(f"data.num_full={data.num_full} but only {len(pool)} source samples remain "
                         f"after the test set ({n} in the source)")
    full, rest = pool[:data.num_full], pool[data.num_full:]
    if data.num_partial > len(rest):
        raise ValueError(f"data.num_partial={data.num_partial} but only {len(rest)} source samples "
                         f"remain after full ({data.num_full}) and test ({len(test)})")
    partial = rest[:data.num_partial] if data.num_partial > 0 else rest
    return {"full": full, "partial": partial, "test": test}


def plan_ingest(cfg, source=None) -> List[ShardTask]:
    """All shard tasks of an experiment config (``source`` overrides ``open_source``, for tests)."""
    data = _data_cfg(cfg)
    views = {name: _view_dict(name, v) for name, v in cfg.views.items()}
    min_frames = max([v["clip_len"] for v in views.values() if v["kind"] == "clip"], default=0)
    src = source if source is not None else get_source(data, min_frames=min_frames)
    if data.shard_size <= 0:
        raise ValueError(f"data.shard_size must be positive, got {data.shard_size}")
    splits = split_indices(len(src), src.fixed_test, data)
    root = data_root(cfg)
    data_yaml = to_yaml(data)
    meta = {"source_description": src.description, "source_kind": src.kind, "source_size": len(src),
            "split_sizes": {k: len(v) for k, v in splits.items()}}
    jobs = [("full", {"kind": "full"}, splits["full"], False),
            ("test", {"kind": "full"}, splits["test"], False)]
    corrupted = bool(data.corruption.enabled)
    jobs += [(name, v, splits["partial"], corrupted) for name, v in views.items()]
    tasks = []
    for split, view, idx, corr in jobs:
        per = view["per_sample"] if view["kind"] in ("patch", "clip", "clean_patch") else 1
        step = max(1, data.shard_size // max(per, 1))
        for j, start in enumerate(range(0, len(idx), step)):
            chunk = [int(i) for i in idx[start:start + step]]
            seed = [int(data.split_seed), zlib.crc32(split.encode()), j]
            fp = hashlib.sha256(json.dumps([data_yaml, view, chunk, seed, corr, FORMAT]).encode())
            tasks.append(ShardTask(split, view, chunk, j, join(root, shard_name(split, j)), seed,
                                   data_yaml, corr, fp.hexdigest()[:16], meta))
    return tasks


# ----------------------------------------------------------------------------- view geometry


def area_downsample(x: np.ndarray, f: int) -> np.ndarray:
    """Block mean over ``f×f`` blocks of the last two axes (the DownsampleView operator);
    uint8 input is rounded back to uint8."""
    *lead, h, w = x.shape
    if h % f or w % f:
        raise ValueError(f"downsample factor {f} does not divide the sample size {h}x{w}")
    y = x.astype(np.float64).reshape(*lead, h // f, f, w // f, f).mean(axis=(-3, -1))
    return np.clip(np.rint(y), 0, 255).astype(np.uint8) if x.dtype == np.uint8 else y.astype(x.dtype)


def clean_locations(mask: Optional[np.ndarray], h: int, w: int, p: int) -> np.ndarray:
    """Top-left (row, col) of every ``p×p`` window that misses ``mask`` (True = corrupted)."""
    rows, cols = np.meshgrid(np.arange(h - p + 1), np.arange(w - p + 1), indexing="ij")
    locs = np.stack([rows.ravel(), cols.ravel()], 1)
    if mask is None:
        return locs
    ii = np.pad(np.cumsum(np.cumsum(mask.astype(np.int64), 0), 1), ((1, 0), (1, 0)))
    s = ii[p:, p:] - ii[:-p, p:] - ii[p:, :-p] + ii[:-p, :-p]  # corrupted pixels per window
    return locs[s.ravel() == 0]


def _latent_mask(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """A pixel mask at latent resolution: a latent pixel is corrupted if any pixel under it is."""
    fh, fw = mask.shape[0] // h, mask.shape[1] // w
    return mask[:h * fh, :w * fw].reshape(h, fh, w, fw).any(axis=(1, 3))


def apply_view(x: np.ndarray, view: Dict[str, Any], rng: np.random.Generator,
               mask: Optional[np.ndarray] = None) -> List[tuple]:
    """The view's samples of one channel-first sample ``x`` as ``(array, meta)`` pairs."""
    kind = view["kind"]
    h, w = x.shape[-2:]
    if kind == "full":
        return [(x, {})]
    if kind == "downsample":
        return [(area_downsample(x, view["factor"]), {"factor": view["factor"]})]
    if kind == "clip":
        if x.ndim != 4:
            raise ValueError(f"clip view needs videos [C, T, H, W], got a sample of shape {x.shape}")
        L, T = view["clip_len"], x.shape[1]
        if L > T:
            raise ValueError(f"clip_len {L} is longer than the video ({T} frames)")
        starts = rng.integers(0, T - L + 1, size=view["per_sample"])
        return [(x[:, t:t + L], {"frames": [int(t), int(t) + L]}) for t in starts]
    p = view["patch_size"]
    if p > min(h, w):
        raise ValueError(f"patch_size {p} is larger than the sample ({h}x{w})")
    if kind == "patch":
        locs = np.stack([rng.integers(0, h - p + 1, view["per_sample"]),
                         rng.integers(0, w - p + 1, view["per_sample"])], 1)
    else:  # clean_patch
        if mask is not None and mask.shape != (h, w):
            mask = _latent_mask(mask, h, w)
        valid = clean_locations(mask, h, w, p)
        if len(valid) == 0:
            return []
        pick = rng.choice(len(valid), size=view["per_sample"], replace=len(valid) < view["per_sample"])
        locs = valid[pick]
    return [(x[..., r:r + p, c:c + p], {"location": [int(r), int(c)]}) for r, c in locs]


def to_channel_first(a: np.ndarray) -> np.ndarray:
    """uint8 HWC image → CHW; THWC video → CTHW."""
    if a.ndim == 3:
        return np.ascontiguousarray(a.transpose(2, 0, 1))
    if a.ndim == 4:
        return np.ascontiguousarray(a.transpose(3, 0, 1, 2))
    raise ValueError(f"source sample of shape {a.shape} is neither HWC nor THWC")


# ----------------------------------------------------------------------------- running tasks


def _remove_stale_temps(url: str) -> None:
    fs, path = url_fs(url)
    if "://" not in url or url.startswith("file://"):
        for tmp in glob.glob(glob.escape(path) + ".tmp-*") + glob.glob(glob.escape(path) + ".json.tmp-*"):
            os.remove(tmp)


def run_shard_task(task: ShardTask, source=None, verify: bool = True) -> ShardInfo:
    """Write one shard (or reuse it when already committed with the same fingerprint)."""
    done = shard_is_complete(task.url, task.fingerprint, verify=verify)
    if done is not None:
        done.meta = {**task.meta, "reused": True}
        return done
    _remove_stale_temps(task.url)
    data = from_yaml(task.data_yaml, DataConfig)
    if source is None:
        min_frames = task.view.get("clip_len", 0) if task.view["kind"] == "clip" else 0
        source = get_source(data, corrupted=task.corrupted, min_frames=min_frames)
    rng = np.random.default_rng(task.seed)
    xs = [to_channel_first(np.asarray(source[i])) for i in task.indices]
    if data.latent.enabled:
        from bootdiff.data.latent import encode_samples

        xs = encode_samples(xs, data.latent)
    writer = ShardWriter(task.url, task.split, task.index)
    writer.info.fingerprint = task.fingerprint
    writer.info.meta = dict(task.meta)
    for i, x in zip(task.indices, xs):
        mask = source.mask(i) if task.view["kind"] == "clean_patch" else None
        outs = apply_view(x, task.view, rng, mask)
        writer.info.num_source += 1
        writer.info.skipped += int(not outs)
        for k, (y, extra) in enumerate(outs):
            meta = {"source_id": str(source.ids[i]), "source_index": int(i), "split": task.split,
                    "view": task.view["kind"], **extra}
            writer.write(f"{task.split}_{i:08d}_{k:03d}", np.ascontiguousarray(y), meta)
    return writer.commit()


def finalize_manifest(cfg, infos: Optional[List[ShardInfo]] = None) -> Dict[str, Any]:
    """Gather the shard infos (from the sidecars when ``infos`` is None), write and return the
    manifest. Raises if a planned shard was never committed."""
    tasks = None
    if infos is None:
        tasks = plan_ingest(cfg)
        infos = []
        for t in tasks:
            info = shard_is_complete(t.url, t.fingerprint, verify=False)
            if info is None:
                raise RuntimeError(f"ingest: shard {t.url} is not complete; run the ingest again")
            infos.append(info)
    if not infos:
        raise ValueError("finalize_manifest: no shards")
    data = _data_cfg(cfg)
    views = {name: _view_dict(name, v) for name, v in cfg.views.items()}
    views.update(full={"kind": "full"}, test={"kind": "full"})
    by_split: Dict[str, List[ShardInfo]] = {}
    for info in infos:
        by_split.setdefault(info.split, []).append(info)
    meta = infos[0].meta
    latent = None
    if data.latent.enabled:
        latent = {"vae_path": data.latent.vae_path, "scaling_factor": data.latent.scaling_factor}
    manifest = {
        "format": FORMAT,
        "name": str(cfg.name),
        "split_seed": int(data.split_seed),
        "source": {"description": meta.get("source_description", ""), "kind": meta.get("source_kind", ""),
                   "size": meta.get("source_size", 0), "split_sizes": meta.get("split_sizes", {})},
        "layout": "CHW (images) / CTHW (videos)",
        "value_range": "uint8 pixels: x/127.5-1 in [-1, 1]; float16 latents: as stored",
        "latent": latent,
        "splits": {s: split_entry(i, {"view": views.get(s, {})}) for s, i in sorted(by_split.items())},
        "config": {"data": json.loads(json.dumps(dataclasses.asdict(data))),
                   "views": views},
    }
    write_manifest(data_root(cfg), manifest)
    manifest["root"] = data_root(cfg)
    return manifest


def ingest(cfg, progress: bool = True, source=None) -> Dict[str, Any]:
    """Plan, run every shard task serially (skipping committed shards) and write the manifest."""
    from tqdm import tqdm

    tasks = plan_ingest(cfg, source=source)
    infos = []
    bar = tqdm(total=len(tasks), desc=f"ingest {cfg.name}", unit="shard", disable=not progress)
    for t in tasks:
        info = run_shard_task(t, source=source)
        infos.append(info)
        bar.set_postfix_str(f"{t.split} {info.count} samples{' (reused)' if info.meta.get('reused') else ''}")
        bar.update(1)
    bar.close()
    return finalize_manifest(cfg, infos)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", help="experiment YAML (any fsspec URL)")
    p.add_argument("overrides", nargs="*", help="key=value dotlist overrides")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    manifest = ingest(cfg, progress=not args.no_progress)
    summary = {s: {"count": e["count"], "shape": e["shape"], "sigma_data": round(e["sigma_data"], 4),
                   "shards": len(e["shards"])} for s, e in manifest["splits"].items()}
    print(json.dumps({"manifest": join(manifest["root"], "manifest.json"), "splits": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
