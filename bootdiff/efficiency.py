"""The data-efficiency benchmark: test G and SWD against the number N of full-resolution samples.

For one config and a list of N (``benchmarks/data_efficiency.py``), under ``{out}/``:

    base/data        one ingest with ``data.num_full = max N``: the views (cut from the partial
                     pool, fixed for every N), the test split, and the full pool
    base/models/<v>  the view models, trained once; copied to every dataset below
    N<n>/data        full = the first N of the full pool (nested: N16 ⊂ N64 ⊂ ...); test, views shared
    N<n>-select/data full = the first N − v of them, test = the last v (validation carve-out: μ
                     selection never sees the test split)
    oracle/data      full = the whole pool (partial pool + full pool) at full resolution
    runs/<model>/    local training runs; results/<model>.json one file per finished model

Shared splits are the base ingest's shard files (hard-linked, or copied on object stores) with
their sha256, so "same views, same test" is checkable bit for bit. Every manifest states one
``g_sigma_data``, the test split's σ_data, so G (docs/METHOD.md §6) weighs every model alike
(`bootdiff.experiment.g_sigma_data`).

Models: per N a ``baseline`` (full-res model on the N images), ``combined`` (fusion of the view
models, no training, docs/METHOD.md §3), ``select-*`` residuals on N − v images scored on the v
held back, ``select-baseline`` (the baseline on the same N − v, whose validation curve says where
to stop the baseline, as the selected residual's says for the bootstrap), and ``bootstrap`` (the
residual with the selected μ_var / μ_L1 on all N, §4); once an ``oracle`` (full-res model on the
whole pool, with a view model's budget). Baselines and residuals share one budget (kimg). Training is a runner's job: `bootdiff.efficiency_train.train_local`
in this process, Ray Train in
``ray_jobs/efficiency.py``; `evaluate_job` scores a finished model (G on test and train, SWD per
pyramid level, memorisation, nearest-neighbour distance, FD when ``eval.features`` is set, §8).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
from typing import Callable, Dict, List, Optional

import torch

from bootdiff import experiment, util
from bootdiff.config import to_object, to_yaml
from bootdiff.layout import RunLayout

DEFAULT_NS = (16, 64, 256, 1024)


def model_file(model_id: str) -> str:
    return model_id.replace("/", "__") + ".json"


def gap_closed(base: float, boot: float, oracle: float, min_gap: float = 0.01) -> float:
    """(base − boot) / (base − oracle): 0 = no better than the baseline, 1 = as good as the oracle;
    NaN when the baseline is within ``min_gap`` (relative, of the oracle's value) of the oracle:
    there is no gap to close, and a ratio over a gap inside the metric's noise would read as a
    huge gain or loss (G moves by ≈ 1 % between neighbouring checkpoints of one model)."""
    vals = [float(v) for v in (base, boot, oracle)]
    if not all(math.isfinite(v) for v in vals) or abs(vals[0] - vals[2]) <= min_gap * abs(vals[2]):
        return float("nan")
    return (vals[0] - vals[1]) / (vals[0] - vals[2])


def val_count(n: int, fraction: float) -> int:
    """Validation images carved from N: ``round(fraction·N)``, at least 2, leaving at least 2."""
    if n < 4:
        raise ValueError(f"data-efficiency: N={n} is too small to carve a validation split (need N >= 4)")
    return min(max(2, round(fraction * n)), n - 2)


# ----------------------------------------------------------------------------- datasets


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
    plans = {"oracle": {"full": idx["partial"] + idx["full"], "test": "test"}}
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


# ----------------------------------------------------------------------------- models


def budgets(cfg, kimg: Optional[float] = None) -> dict:
    """The benchmark's budgets: every baseline and residual ``kimg`` (default: the residual's),
    every view model and the oracle the views' largest ``total_kimg``."""
    k = float(kimg if kimg is not None else cfg.residual.train.total_kimg)
    view = max(float(v.train.total_kimg) for v in cfg.views.values())
    return {"full_res_kimg": k, "residual_kimg": k, "view_kimg": view, "oracle_kimg": view}


def with_budgets(cfg, b: dict):
    c = copy.deepcopy(to_object(cfg))
    c.full_res.train.total_kimg = c.residual.train.total_kimg = b["full_res_kimg"]
    return c


def jobs(plan: dict, cfg) -> List[dict]:
    """Every model of the benchmark as a job dict, in stages (0: views, baselines; 1: oracle,
    combined, selection residuals; 2: bootstraps, whose μ comes from stage 1)."""
    from bootdiff.sweep import trial_list

    ds = plan["datasets"]
    out = [{"id": f"view-{v}", "kind": "view", "view": v, "data": "base", "stage": 0} for v in plan["views"]]
    out.append({"id": "oracle", "kind": "full_res", "data": "oracle", "stage": 1, "N": None})
    grid = [t for t in trial_list(cfg) if t["kind"] == "residual"]
    for n in plan["ns"]:
        out.append({"id": f"N{n}/baseline", "kind": "full_res", "data": f"N{n}", "stage": 0, "N": n})
        out.append({"id": f"N{n}/select-baseline", "kind": "full_res", "data": f"N{n}-select", "stage": 0,
                    "N": n, "quick": True})
        out.append({"id": f"N{n}/combined", "kind": "combined", "data": f"N{n}", "stage": 1, "N": n})
        for t in grid:
            out.append({"id": f"N{n}/select-{t['label']}", "kind": "residual", "data": f"N{n}-select",
                        "stage": 1, "N": n, "trial": t, "quick": True})
        out.append({"id": f"N{n}/bootstrap", "kind": "residual", "data": f"N{n}", "stage": 2, "N": n})
    for j in out:
        j["cfg_yaml"] = ds[j["data"]]
    return out


def job_cfg(job: dict, b: dict):
    from bootdiff.config import ExperimentConfig, from_yaml

    cfg = from_yaml(job["cfg_yaml"], ExperimentConfig)
    cfg = with_budgets(cfg, b)
    if job["id"] == "oracle":
        cfg.full_res.train.total_kimg = b["oracle_kimg"]
    return cfg


def best_val_G(row: dict) -> float:
    """A selection run's best validation G: the lowest over its checkpoints (the model is taken at
    its validation minimum, `bootdiff.efficiency_report.early_stopped`), its final G without a curve."""
    vals = [p["test_G"] for p in row.get("curve") or [] if p.get("test_G") is not None]
    return min(vals) if vals else row["test_G"]


def select(results: Dict[str, dict], n: int) -> dict:
    """The residual setting with the lowest validation G among N's selection runs (each at its own
    validation minimum)."""
    rows = [r for k, r in results.items() if k.startswith(f"N{n}/select-") and r.get("trial")]
    if not rows:
        raise RuntimeError(f"data-efficiency: no selection run of N={n} finished")
    best = min(rows, key=best_val_G)
    return dict(best["trial"])


def share_view_models(plan: dict, out: str) -> None:
    """Copy the exported view models of ``base`` to every other dataset (the same weights)."""
    from bootdiff.config import ExperimentConfig, from_yaml

    src = RunLayout(out, "base")
    for name, y in plan["datasets"].items():
        if name in ("base", "oracle"):
            continue
        dst = RunLayout.of(from_yaml(y, ExperimentConfig))
        for v in plan["views"]:
            if util.exists(util.join(dst.model(v), "bootdiff.json")) or not util.exists(src.model(v)):
                continue  # copied before, or not trained (then loading it names the missing model)
            fs, sp = util.url_fs(src.model(v))
            _, dp = util.url_fs(dst.model(v))
            if util._is_local(fs):
                shutil.copytree(sp, dp, dirs_exist_ok=True)
            else:
                fs.copy(sp, dp, recursive=True)


# ----------------------------------------------------------------------------- evaluation


def load_model(job: dict, cfg, manifest: dict, checkpoint: Optional[str]):
    """The EMA model of a finished job (the combined denoiser needs no checkpoint)."""
    from bootdiff.checkpoint import load_checkpoint
    from bootdiff.evaluate import load_run
    from bootdiff.sweep import trial_residual_config

    if job["kind"] == "combined":
        return experiment.build_combined(cfg, manifest)
    if job["kind"] == "full_res":
        return load_run(cfg, manifest, "full_res", checkpoint)[0]
    state = load_checkpoint(RunLayout.of(cfg).url(checkpoint))
    model = experiment.build_bootstrap(cfg, manifest, trial_residual_config(cfg, job["trial"]))
    return experiment.ema_model(model, state)


def evaluate_job(job: dict, b: dict, checkpoint: Optional[str], num_samples: int) -> dict:
    """Scores of a finished model: test and train G (the manifest's fixed σ_data), and — except
    for selection runs — SWD to the test split (total and per pyramid level), memorisation rate and
    nearest-neighbour distance to its own training set, FD when ``eval.features`` is set."""
    from bootdiff.evaluate import sample_images
    from bootdiff.metrics import memorization_rate, nearest_neighbour_distance, sliced_wasserstein_levels

    cfg = job_cfg(job, b)
    manifest = experiment.read_manifest(cfg)
    D = load_model(job, cfg, manifest, checkpoint).to(util.compute_device())
    out = {"test_G": experiment.generalization(cfg, manifest, D, "test")["total"],
           "train_G": experiment.generalization(cfg, manifest, D, "full")["total"],
           "g_sigma_data": experiment.g_sigma_data(manifest)}
    if job.get("quick"):
        return out
    cfg.eval.num_images = num_samples
    samples = sample_images(cfg, D, experiment.full_shape(manifest), cfg.eval.seed)
    test_x = experiment.load_all(cfg, manifest, "test", cfg.eval.max_samples)
    train_x = experiment.load_all(cfg, manifest, "full", experiment.view_info(manifest, "full")["count"])
    swd = sliced_wasserstein_levels(samples, test_x)
    out.update(swd=swd["swd"], swd_levels=swd["per_level"], swd_resolutions=swd["resolutions"],
               memorization_rate=memorization_rate(samples, train_x),
               nn_distance_train=nearest_neighbour_distance(samples, train_x), num_samples=num_samples)
    feats = getattr(cfg.eval, "features", None)
    kind = str(getattr(getattr(feats, "kind", None), "value", getattr(feats, "kind", "none")))
    if feats is not None and kind != "none":
        from bootdiff import fd

        net = fd.load_feature_network(kind, feats.path)
        out["fd"] = fd.fd_features(fd.features(net, samples, feats.batch_size),
                                   fd.features(net, test_x, feats.batch_size))
    return out


def run_job(job: dict, b: dict, out: str, num_samples: int, train_fn: Optional[Callable] = None) -> dict:
    """Train (``train_fn(job, b, out)``, default `bootdiff.efficiency_train.train_local`; the combined
    denoiser is not trained) and score one job."""
    import time

    from bootdiff.efficiency_train import train_local

    train_fn = train_fn or train_local

    start = time.time()
    print(f"[bench] {job['id']} ({job['kind']}) ...", flush=True)
    trained = {"checkpoint": None, "curve": [], "kimg": 0.0}
    if job["kind"] != "combined":
        trained = train_fn(job, b, out)
    row = {k: v for k, v in job.items() if k != "cfg_yaml"}
    row.update(trained, train_wall_s=time.time() - start)
    if job["kind"] != "view":
        row.update(evaluate_job(job, b, trained["checkpoint"], num_samples))
    row["wall_s"] = time.time() - start
    return row


def local_runner(todo: List[dict], b: dict, out: str, num_samples: int):
    """Run jobs one after another in this process (``--local``), yielding each finished row."""
    for job in todo:
        yield job, run_job(job, b, out, num_samples)


def process_runner(workers: int):
    """A runner for ``--local --workers K``: a stage's jobs in K local processes (spawned, one
    torch thread each), rows yielded as they finish."""
    if workers <= 1:
        return local_runner

    def run(todo, b, out, num_samples):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        if not todo:
            return
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx, initializer=torch.set_num_threads,
                                 initargs=(1,)) as pool:
            futures = {pool.submit(run_job, j, b, out, num_samples): j for j in todo}
            for f in as_completed(futures):
                yield futures[f], f.result()

    return run


def run_benchmark(cfg, out: str, ns=DEFAULT_NS, kimg: Optional[float] = None, num_samples: int = 128,
                  val_fraction: float = 0.25, runner: Callable = local_runner, source=None,
                  ingest_fn=None) -> dict:
    """The whole benchmark (module docstring); finished models (``results/<model>.json``) are
    skipped, so an interrupted run resumes where it stopped. Returns and writes the summary."""
    cfg = to_object(cfg)
    out = util.join(out, "") .rstrip("/")
    plan = prepare(cfg, out, ns, val_fraction, source=source, ingest_fn=ingest_fn)
    b = budgets(cfg, kimg)
    util.atomic_write_bytes(util.join(out, "plan.json"), json.dumps(
        {**{k: v for k, v in plan.items() if k != "datasets"}, "budgets": b}).encode())
    all_jobs = jobs(plan, cfg)
    results = {}
    for job in all_jobs:
        url = util.join(out, "results", model_file(job["id"]))
        if util.exists(url):
            results[job["id"]] = json.loads(util.read_bytes(url))
    total = len(all_jobs)
    for stage in (0, 1, 2):
        if stage == 1:
            share_view_models(plan, out)
        todo = [j for j in all_jobs if j["stage"] == stage and j["id"] not in results]
        for j in all_jobs:
            if j["stage"] == stage and j["id"] in results:
                print(f"[bench] {j['id']}: done before, skipped", flush=True)
        if stage == 2:
            for j in todo:
                j["trial"] = select(results, j["N"])
        for job, row in runner(todo, b, out, num_samples):
            results[job["id"]] = row
            util.atomic_write_bytes(util.join(out, "results", model_file(job["id"])),
                                    json.dumps(row, default=float).encode())
            shown = {k: round(row[k], 4) for k in ("test_G", "train_G", "swd", "memorization_rate")
                     if row.get(k) is not None}
            print(f"[bench] ({len(results)}/{total}) {job['id']} finished in {row['wall_s']:.0f} s: {shown}", flush=True)
    from bootdiff.efficiency_report import summarize, write_outputs

    summary = summarize(results, plan, b)
    write_outputs(out, summary)
    return summary
