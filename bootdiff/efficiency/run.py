"""Running the data-efficiency benchmark: every job of `bootdiff.efficiency.models` trained and
scored in stages (in this process, in local processes, or by a Ray runner), finished models
skipped on a re-run, then the summary (`bootdiff.efficiency.report`).
"""

from __future__ import annotations

import json
from typing import Callable, List, Optional

import torch

from bootdiff import experiment, util
from bootdiff.config import to_object, to_yaml
from bootdiff.efficiency.data import dataset_cfg, prepare
from bootdiff.efficiency.models import (budgets, evaluate_job, job_cfg, jobs, main_budget, model_file, only_rows,
                                        peer_budgets, peers, row_names, pick_candidate, raise_caps, select, share_view_models)

DEFAULT_NS = (16, 64, 256, 1024)


def run_job(job: dict, b: dict, out: str, num_samples: int, train_fn: Optional[Callable] = None) -> dict:
    """Train (``train_fn(job, b, out)``, default `bootdiff.efficiency.train.train_local`; the combined
    denoiser is not trained) and score one job."""
    import time

    from bootdiff.efficiency.train import train_local

    train_fn = train_fn or train_local

    start = time.time()
    print(f"[bench] {job['id']} ({job['kind']}) ...", flush=True)
    trained = {"checkpoint": None, "curve": [], "kimg": 0.0}
    if job["kind"] != "combined":
        trained = train_fn(job, b, out)
    row = {k: v for k, v in job.items() if k != "cfg_yaml"}
    row.update(trained, train_wall_s=time.time() - start, patience=trained_patience(job, b))
    if job["kind"] != "view":
        row.update(evaluate_job(job, b, trained["checkpoint"], num_samples))
    row["wall_s"] = time.time() - start
    return row


def trained_patience(job: dict, b: dict) -> int:
    """The patience a job trained with (`bootdiff.efficiency.models.job_cfg`: selection runs only,
    the oracle's never); 0 for view models and the combined denoiser."""
    if job["kind"] in ("view", "combined"):
        return 0
    cfg = job_cfg(job, b)
    return int((cfg.residual.train if job["kind"] == "residual" else cfg.full_res.train).patience)


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


def _check_same_seed(cfg, out: str) -> None:
    """A re-run on a folder whose models were trained with another ``seed`` would mix the two
    (finished models are skipped): an error naming the folder, before anything is written."""
    url = util.join(out, "plan.json")
    if not util.exists(url):
        return
    from bootdiff.config import ExperimentConfig, from_yaml

    done = from_yaml(json.loads(util.read_bytes(url))["config"], ExperimentConfig)
    if int(done.seed) != int(cfg.seed):
        raise ValueError(f"data-efficiency: {out} holds models trained with seed={done.seed}; this run has "
                         f"seed={cfg.seed} — use a new --out for another seed")


def run_benchmark(cfg, out: str, ns=DEFAULT_NS, kimg: Optional[float] = None, num_samples: int = 128,
                  val_fraction: float = 0.25, runner: Callable = local_runner, source=None,
                  ingest_fn=None, patience: int = 0, rows=None) -> dict:
    """The whole benchmark (module docstring); finished models (``results/<model>.json``) are
    skipped, so an interrupted run resumes where it stopped. Returns and writes the summary.
    ``patience`` > 0 stops every selection run when its validation G has not improved for that
    many checkpoints, and trains the model it selects for as long (`bootdiff.efficiency.models.main_budget`).
    ``rows`` (e.g. ``["bootstrap"]``) trains only those rows' models (`bootdiff.efficiency.models.only_rows`);
    a later run without it on the same folder adds the others."""
    cfg = to_object(cfg)
    unknown = sorted(set(rows or ()) - set(row_names(cfg)))
    if unknown:  # before anything is written
        raise ValueError(f"data-efficiency: --rows names {unknown}, which this benchmark does not have "
                         f"(its rows: {', '.join(row_names(cfg))})")
    out = util.join(out, "") .rstrip("/")
    _check_same_seed(cfg, out)
    plan = prepare(cfg, out, ns, val_fraction, source=source, ingest_fn=ingest_fn)
    b = budgets(cfg, kimg, patience)
    b.update(peer_budgets(cfg, experiment.read_manifest(dataset_cfg(cfg, out, "base")), b))
    b = raise_caps(b)
    if patience > 0:
        print(f"[bench] early stopping: patience {patience} checkpoints on validation G; caps: baselines "
              f"{b['full_res_kimg']:g} kimg, oracle {b['oracle_kimg']:g} kimg", flush=True)
    for peer in peers(cfg):
        print(f"[bench] {peer}: {b[f'{peer}_kimg']:g} kimg = the bootstrap's training compute "
              f"({b['flops']['bootstrap']['total']:.3g} FLOPs: views + residual)", flush=True)
    util.atomic_write_bytes(util.join(out, "plan.json"), json.dumps(  # the config: a pipeline's eval.benchmark checks its data
        {**{k: v for k, v in plan.items() if k != "datasets"}, "budgets": b, "config": to_yaml(cfg)}).encode())
    all_jobs = only_rows(jobs(plan, cfg), rows)
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
        for j in todo:
            if stage == 2:  # the bootstrap: the residual setting chosen on validation, and its budget
                j["trial"] = select(results, j["N"])
                j["select"] = f"N{j['N']}/select-{j['trial']['label']}"
            if j.get("candidates"):  # a peer: its grid's setting chosen on validation
                pick_candidate(j, results)
            j["budget_kimg"] = main_budget(j, results)
        for job, row in runner(todo, b, out, num_samples):
            results[job["id"]] = row
            util.atomic_write_bytes(util.join(out, "results", model_file(job["id"])),
                                    json.dumps(row, default=float).encode())
            shown = {k: round(row[k], 4) for k in ("test_G", "train_G", "swd", "memorization_rate")
                     if row.get(k) is not None}
            print(f"[bench] ({len(results)}/{total}) {job['id']} finished in {row['wall_s']:.0f} s: {shown}", flush=True)
    from bootdiff.efficiency.report import summarize, write_outputs

    summary = summarize(results, plan, b)
    write_outputs(out, summary)
    return summary
