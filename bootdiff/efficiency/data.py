"""The data-efficiency benchmark's datasets: one base ingest, then per N the nested full-res sets,
their validation carve-outs and the oracle's, sharing the base ingest's shards (`bootdiff.efficiency`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from typing import Dict, List

from bootdiff import util
from bootdiff.config import to_object, to_yaml
from bootdiff.run.layout import RunLayout


def val_count(n: int, fraction: float) -> int:
    """Validation images carved from N: ``round(fraction·N)``, at least 2, leaving at least 2."""
    if n < 4:
        raise ValueError(f"data-efficiency: N={n} is too small to carve a validation split (need N >= 4)")
    return min(max(2, round(fraction * n)), n - 2)


def dataset_cfg(cfg, out: str, name: str):
    c = copy.deepcopy(to_object(cfg))
    c.storage, c.name = out, name
    return c


def _link(src: str, dst: str) -> None:
    """Make ``dst`` hold the bytes of ``src``: a hard link locally (a copy across devices), a copy
    on object stores."""
    fs, sp = util.url_fs(src)
    _, dp = util.url_fs(dst)
    if util._is_local(fs):
        os.makedirs(os.path.dirname(dp), exist_ok=True)
        if os.path.exists(dp):
            os.remove(dp)
        try:
            os.link(sp, dp)
        except OSError:
            shutil.copyfile(sp, dp)
    else:
        fs.copy(sp, dp)


def _full_split(cfg, root: str, split: str, indices: List[int], source=None) -> dict:
    """Write a full-resolution split of the given source indices under ``root``; its manifest entry."""
    from bootdiff.data.ingest import FULL_SPEC, ShardTask, run_shard_task
    from bootdiff.data.shards import shard_name, split_entry

    data_yaml = to_yaml(cfg.data)
    step = max(1, int(cfg.data.shard_size))
    infos = []
    for j, start in enumerate(range(0, len(indices), step)):
        chunk = [int(i) for i in indices[start:start + step]]
        fp = hashlib.sha256(json.dumps([data_yaml, chunk, split]).encode()).hexdigest()[:16]
        task = ShardTask(split, dict(FULL_SPEC), chunk, j, util.join(root, shard_name(split, j)),
                         [int(cfg.data.split_seed), 0, j], data_yaml, False, fp, {})
        infos.append(run_shard_task(task, source=source))
    return split_entry(infos, {"view": dict(FULL_SPEC), "source_indices": [int(i) for i in indices]})


def _write_dataset(cfg, base: dict, splits: Dict[str, object], g_sigma: float, source=None) -> dict:
    """A dataset (manifest + shards) at ``RunLayout.of(cfg).data``: ``splits`` maps a split name to
    a list of source indices (written at full resolution) or to a split name of ``base`` (linked)."""
    from bootdiff.data.shards import read_manifest, write_manifest

    root = RunLayout.of(cfg).data
    entries = {}
    for name, what in splits.items():
        if isinstance(what, str):
            entry = copy.deepcopy(base["splits"][what])
            for s in entry["shards"]:
                _link(util.join(base["root"], s["name"]), util.join(root, s["name"].replace(what, name, 1)
                                                                     if name != what else s["name"]))
                s["name"] = s["name"].replace(what, name, 1) if name != what else s["name"]
            entries[name] = entry
        else:
            entries[name] = _full_split(cfg, root, name, list(what), source)
    manifest = {k: v for k, v in base.items() if k not in ("root", "splits")}
    manifest.update(name=str(cfg.name), splits=entries, g_sigma_data=float(g_sigma), root=root)
    write_manifest(root, manifest)
    return read_manifest(root)


def prepare(cfg, out: str, ns, val_fraction: float = 0.25, source=None, ingest_fn=None) -> dict:
    """Ingest once and write every dataset of the benchmark (skipping those already written).

    Returns ``{"ns": [...], "pool": [...], "partial": [...], "test": [...], "g_sigma_data": s,
    "datasets": {name: cfg_yaml}}``. N larger than the data allows (the pool must keep at least as
    many partial samples as the largest N) are dropped with a note."""
    from bootdiff.data.ingest import _data_cfg, _view_spec, get_source, ingest, split_indices
    from bootdiff.data.shards import read_manifest
    from bootdiff.views import view_class

    ns = sorted({int(n) for n in ns})
    data = _data_cfg(cfg)
    specs = [_view_spec(k, v) for k, v in cfg.views.items()]
    min_frames = max([view_class(v["kind"]).min_frames(v) for v in specs], default=0)
    src = source if source is not None else get_source(data, min_frames=min_frames)  # as ingest opens it
    avail = len(src) - (len(set(src.fixed_test)) if src.fixed_test else data.num_test)
    keep = [n for n in ns if 2 * n <= avail]
    if keep != ns:
        print(f"[bench] N {sorted(set(ns) - set(keep))} dropped: the source has {avail} training samples "
              "(the partial pool must keep at least as many as the largest N)", flush=True)
    if not keep:
        raise ValueError(f"data-efficiency: no N of {ns} fits a source of {avail} training samples")
    base_cfg = dataset_cfg(cfg, out, "base")
    base_cfg.data.num_full = max(keep)
    base_cfg.data.num_val = 0  # μ is chosen on each N's own carve-out (N<n>-select), not a val split
    layout = RunLayout.of(base_cfg)
    if not util.exists(layout.manifest):
        (ingest_fn or (lambda c: ingest(c, progress=False, source=source)))(base_cfg)
    base = read_manifest(layout.data)
    have = int(base["splits"]["full"]["num_source"])
    if have != max(keep):  # a re-run with other N: the pool must be the one the views were cut around
        if max(keep) > have:
            raise ValueError(f"data-efficiency: {layout.data} was ingested for N up to {have} (its full pool); "
                             f"N={max(keep)} would take full-res images from the views' partial pool — "
                             "use a new --out, or N <= " + str(have))
        base_cfg.data.num_full = have
    idx = split_indices(len(src), src.fixed_test, _data_cfg(base_cfg))
    g_sigma = float(base["splits"]["test"]["sigma_data"])
    views = list(cfg.views)
    part = idx["partial"]
    v_oracle = min(len(idx["test"]), max(2, round(val_fraction * len(part))))  # at most the test split's size
    plans = {"oracle": {"full": part + idx["full"], "test": "test"},
             # the oracle's own carve-out, from the partial pool's end (no N image): where it stops
             "oracle-select": {"full": part[:-v_oracle] + idx["full"], "test": part[-v_oracle:]}}
    for n in keep:
        v = val_count(n, val_fraction)
        plans[f"N{n}"] = {"full": idx["full"][:n], "test": "test", **{w: w for w in views}}
        plans[f"N{n}-select"] = {"full": idx["full"][:n - v], "test": idx["full"][n - v:n], **{w: w for w in views}}
    datasets = {"base": to_yaml(base_cfg)}
    for name, splits in plans.items():
        c = dataset_cfg(base_cfg, out, name)
        if not util.exists(RunLayout.of(c).manifest):
            _write_dataset(c, base, splits, g_sigma, source=src)
        datasets[name] = to_yaml(c)
    return {"ns": keep, "pool": idx["full"], "partial": idx["partial"], "test": idx["test"],
            "g_sigma_data": g_sigma, "datasets": datasets, "views": views}


def source_indices(manifest: dict, split: str) -> List[int]:
    """The source index of every sample in a split's shards, read from the shards themselves."""
    import tarfile

    from bootdiff.data.loader import view_urls

    out = []
    for url in view_urls(manifest, split):
        fs, path = util.url_fs(url)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    out.append(int(json.loads(tar.extractfile(m).read())["source_index"]))
    return out
