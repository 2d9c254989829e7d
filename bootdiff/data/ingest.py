"""Ingest: raw source → WebDataset shards of every view (+ the full and test splits) + manifest.

``python -m bootdiff.data.ingest CONFIG [key=value ...]`` writes to ``{storage}/{name}/data``:

    {root}/{split_or_view}/{split_or_view}-{i:06d}.tar   (+ a ``.tar.json`` commit sidecar)
    {root}/manifest.json

Split (seeded by ``data.split_seed``): the held-out ``test`` set (``num_test``; drawn from the
source's natural ``fixed_test`` when it has one, else from the seeded permutation), the scarce
``full`` set (``num_full``), the held-out ``val`` set (``num_val``, the last of the remaining
samples; the sweep chooses on it, never on ``test``) and the partial-view set (``num_partial``,
0 = all the rest), all disjoint; with ``num_view_val`` > 0, that many more samples are held out
of the partial set, and each view's samples of them are its split ``<view>-val``
(`view_val_split`), on which an early-stopped view is scored. Each view in ``cfg.views`` is cut
from every sample of the partial set by its view class's ``cut`` (`bootdiff.views.VIEW_CLASSES`; docs/METHOD.md §1,
column "cut at ingest"): patches and clips record their ``location`` (row, col) / ``frames``
[t0, t1), a downsample view its ``factor``; the ``full``, ``test`` and ``val`` splits hold the
samples themselves (`FullView`).

With ``data.latent.enabled`` each sample is first encoded by the VAE (`bootdiff.data.latent`)
and the view applies to the latent (sizes in latent pixels). A view that does not fit the
samples fails naming ``views.<name>.<key>=<value>`` (`bootdiff.views.check_view_config`).

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
from bootdiff.run.layout import RunLayout
from bootdiff.util import join, url_fs
from bootdiff.views import RESERVED_NAMES, FullView, view_class

FULL_SPEC = {"kind": FullView.kind}  # the view spec of the full and test splits
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


def _data_cfg(cfg) -> DataConfig:
    return from_yaml(to_yaml(cfg.data), DataConfig)


def _view_spec(name: str, v) -> Dict[str, Any]:
    """The ingest spec of ``views.<name>`` (`View.ingest_spec`; part of every shard fingerprint)."""
    if name in RESERVED_NAMES:
        raise ValueError(f"views.{name}: the names {RESERVED_NAMES} are reserved for the "
                         "full-resolution splits; rename the view")
    return view_class(v.kind, name).ingest_spec(v)


def get_source(data: DataConfig, corrupted: bool = False, min_frames: int = 0):
    """Open (once per process) the source of a data config, optionally its corrupted form."""
    key = to_yaml(data) + f"|{corrupted}|{min_frames}"
    if key not in _SOURCES:
        from bootdiff.data.registry import open_source

        src = open_source(data, min_frames=min_frames)
        if corrupted:
            from bootdiff.data.corrupt import CorruptedSource

            src = CorruptedSource(src, data.corruption)
        _SOURCES[key] = src
    return _SOURCES[key]


def split_indices(n: int, fixed_test: Optional[List[int]], data: DataConfig) -> Dict[str, List[int]]:
    """Disjoint index lists ``full``, ``partial``, ``test`` of a source of ``n`` samples, and
    ``val`` (``data.num_val``) and ``view_val`` (``data.num_view_val``: the pool samples whose view
    samples are each view's held-out split, `view_val_split`) when asked for. Each is carved from
    the end of what is left, so the order of the others stays put."""
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
    n_val, n_view_val = max(int(data.num_val), 0), max(int(data.num_view_val), 0)
    if n_val + n_view_val + max(data.num_partial, 0) > len(rest):
        raise ValueError(f"data.num_val={n_val} + data.num_view_val={n_view_val} + data.num_partial="
                         f"{data.num_partial} but only {len(rest)} source samples remain after full "
                         f"({data.num_full}) and test ({len(test)})")
    val, rest = rest[len(rest) - n_val:], rest[:len(rest) - n_val]  # from the end: full, test and
    view_val, rest = rest[len(rest) - n_view_val:], rest[:len(rest) - n_view_val]  # the partial order stay put
    partial = rest[:data.num_partial] if data.num_partial > 0 else rest
    out = {"full": full, "partial": partial, "test": test}
    if val:
        out["val"] = val
    if view_val:
        out["view_val"] = view_val
    return out


def view_val_split(view: str) -> str:
    """The split of view ``view``'s samples of the held-out pool samples (``data.num_view_val``)."""
    return f"{view}-val"


def plan_ingest(cfg, source=None) -> List[ShardTask]:
    """All shard tasks of an experiment config (``source`` overrides ``open_source``, for tests)."""
    data = _data_cfg(cfg)
    views = {name: _view_spec(name, v) for name, v in cfg.views.items()}
    min_frames = max([view_class(v["kind"]).min_frames(v) for v in views.values()], default=0)
    src = source if source is not None else get_source(data, min_frames=min_frames)
    if data.shard_size <= 0:
        raise ValueError(f"data.shard_size must be positive, got {data.shard_size}")
    splits = split_indices(len(src), src.fixed_test, data)
    root = RunLayout.of(cfg).data
    data_yaml = to_yaml(data)
    meta = {"source_description": src.description, "source_kind": src.kind, "source_size": len(src),
            "split_sizes": {k: len(v) for k, v in splits.items()}}
    jobs = [("full", FULL_SPEC, splits["full"], False), ("test", FULL_SPEC, splits["test"], False)]
    if splits.get("val"):
        jobs.append(("val", FULL_SPEC, splits["val"], False))
    corrupted = bool(data.corruption.enabled)
    jobs += [(name, v, splits["partial"], corrupted) for name, v in views.items()]
    if splits.get("view_val"):
        jobs += [(view_val_split(name), v, splits["view_val"], corrupted) for name, v in views.items()]
    tasks = []
    for split, view, idx, corr in jobs:
        step = max(1, data.shard_size // max(view_class(view["kind"]).samples_per_source(view), 1))
        for j, start in enumerate(range(0, len(idx), step)):
            chunk = [int(i) for i in idx[start:start + step]]
            seed = [int(data.split_seed), zlib.crc32(split.encode()), j]
            fp = hashlib.sha256(json.dumps([data_yaml, view, chunk, seed, corr, FORMAT]).encode())
            tasks.append(ShardTask(split, view, chunk, j, join(root, shard_name(split, j)), seed,
                                   data_yaml, corr, fp.hexdigest()[:16], meta))
    return tasks


# ----------------------------------------------------------------------------- view samples


def _cut(cls, task: ShardTask, i: int, x: np.ndarray, rng: np.random.Generator,
         mask: Optional[np.ndarray]) -> List[tuple]:
    """The view samples of source sample ``i`` (``x``, channel-first) as ``(array, meta)`` pairs,
    cut by the task's view class; a view that does not fit the sample, or any other failure,
    names ``views.<name>`` (and the key, for a bad value)."""
    cls.check_config(task.split, task.view, tuple(x.shape))
    try:
        return cls.cut(x, task.view, rng, mask)
    except Exception as exc:
        raise ValueError(f"views.{task.split} (kind {task.view['kind']}): cutting source sample {i} "
                         f"of shape {tuple(x.shape)} failed: {type(exc).__name__}: {exc}") from exc


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
    cls = view_class(task.view["kind"], task.split)
    if source is None:
        source = get_source(data, corrupted=task.corrupted, min_frames=cls.min_frames(task.view))
    rng = np.random.default_rng(task.seed)
    xs = [to_channel_first(np.asarray(source[i])) for i in task.indices]
    if data.latent.enabled:
        from bootdiff.data.latent import encode_samples

        xs = encode_samples(xs, data.latent)
    writer = ShardWriter(task.url, task.split, task.index)
    writer.info.fingerprint = task.fingerprint
    writer.info.meta = dict(task.meta)
    for i, x in zip(task.indices, xs):
        outs = _cut(cls, task, i, x, rng, source.mask(i) if cls.uses_mask else None)
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
    views = {name: _view_spec(name, v) for name, v in cfg.views.items()}
    views.update(full=dict(FULL_SPEC), test=dict(FULL_SPEC))
    views.update({view_val_split(name): _view_spec(name, v) for name, v in cfg.views.items()})
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
    manifest["root"] = RunLayout.of(cfg).data
    write_manifest(manifest["root"], manifest)
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


def verify_shards(cfg, repair: bool = False, source=None) -> Dict[str, Any]:
    """Check every shard of a run's manifest (present, recorded size and sha256, sidecar count:
    `bootdiff.data.shards.shard_problems`); with ``repair``, rewrite only the bad shards (their
    sidecars are removed first, so `run_shard_task` cannot reuse their bytes), then the manifest.

    Returns ``{"manifest": url, "checked": n, "bad": [{"split", "name", "url", "problem"}],
    "repaired": [names]}``. Repair needs the config that wrote the shards: a good shard whose
    sidecar does not match this config's plan is an error naming it (nothing is re-ingested
    silently). ``source`` overrides ``open_source`` (for tests), as in `ingest`.
    """
    from bootdiff.data.shards import read_manifest, shard_problems, sidecar_url

    url = RunLayout.of(cfg).manifest
    manifest = read_manifest(url)
    bad = shard_problems(manifest)
    out = {"manifest": url, "checked": sum(len(e["shards"]) for e in manifest["splits"].values()),
           "bad": bad, "repaired": []}
    if not repair or not bad:
        return out
    tasks = plan_ingest(cfg, source=source)
    bad_names = {p["name"] for p in bad}
    unplanned = bad_names - {t.name for t in tasks}
    if unplanned:
        raise ValueError(f"ingest --repair: shards {sorted(unplanned)} of {url} are not planned by "
                         "this config; repair with the config that wrote them")
    infos = []
    for t in tasks:
        if t.name in bad_names:
            fs, path = url_fs(sidecar_url(t.url))
            if fs.exists(path):
                fs.rm(path)
            infos.append(run_shard_task(t, source=source))
            continue
        info = shard_is_complete(t.url, t.fingerprint, verify=False)
        if info is None:
            raise ValueError(f"ingest --repair: shard {t.url} was not written by this config "
                             "(missing, or its sidecar's fingerprint differs); run the ingest instead")
        infos.append(info)
    finalize_manifest(cfg, infos)
    out["repaired"] = sorted(bad_names)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("config", help="experiment YAML (any fsspec URL)")
    p.add_argument("overrides", nargs="*", help="key=value dotlist overrides")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verify", action="store_true",
                   help="check every shard's size and sha256 against the manifest; exit 1 if any is bad")
    p.add_argument("--repair", action="store_true",
                   help="with --verify: rewrite only the bad shards, then the manifest")
    args = p.parse_args(argv)
    if args.repair and not args.verify:
        p.error("--repair needs --verify")
    cfg = load_config(args.config, args.overrides)
    if args.verify:
        result = verify_shards(cfg, repair=args.repair)
        for bad in result["bad"]:
            print(f"bad shard ({bad['split']}): {bad['problem']}", file=sys.stderr)
        print(json.dumps(result, indent=1))
        return 1 if result["bad"] and not result["repaired"] else 0
    manifest = ingest(cfg, progress=not args.no_progress)
    summary = {s: {"count": e["count"], "shape": e["shape"], "sigma_data": round(e["sigma_data"], 4),
                   "shards": len(e["shards"])} for s, e in manifest["splits"].items()}
    print(json.dumps({"manifest": join(manifest["root"], "manifest.json"), "splits": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
