"""The whole bootstrapping-diffusion pipeline on Ray:
ingest -> train_views -> sweep_residual [-> distill, when ``distill.enabled``] -> evaluate.

    ray job submit --working-dir . -- python -m ray_jobs.pipeline --config configs/quickstart.yaml
    python -m ray_jobs.pipeline --config configs/quickstart.yaml [key=value ...]   # local Ray

Each stage is skipped when its outputs are already complete (manifest, exported view models,
sweep.json, report), and each stage resumes its own partial work (complete shards, Train
checkpoints, the Tune experiment), so a failed pipeline is simply submitted again. A stage's
"done" marker is written only when it completed, last: the manifest (ingest), each view's
``models/<v>/COMPLETE`` (train_views), ``sweep.json`` (sweep_residual), ``distill/COMPLETE``
(distill), ``summary.json`` (evaluate).

Ctrl-C or SIGTERM (``ray job stop``) stops the pipeline without marking anything done (Tune saves
the sweep's state first); it exits with 130 / 143 naming the interrupted stage, and the same command
resumes: finished stages are skipped, a view resumes from its checkpoint, the sweep is restored
and runs only its unfinished trials. One submission of a run at a time (its lease, `entry.main`).
"""

from __future__ import annotations

import json
import os
import sys
import time

from bootdiff import util
from bootdiff.run.layout import RunLayout
from ray_jobs import common, distill, entry, evaluate, ingest, sweep_residual, train_views


def run(cfg, cfg_yaml: str) -> dict:
    t0 = time.time()
    layout = RunLayout.of(cfg)
    entry.init_ray(cfg)
    print(f"[bootdiff] pipeline '{cfg.name}' -> {layout.root}", flush=True)
    common.write_json(layout.config, {"yaml": cfg_yaml})
    stages = {}
    for name, fn in (("ingest", lambda: ingest.run(cfg)),
                     ("train_views", lambda: train_views.run(cfg, cfg_yaml)),
                     ("sweep_residual", lambda: sweep_residual.run(cfg, cfg_yaml)),
                     *([("distill", lambda: distill.run(cfg, cfg_yaml))] if cfg.distill.enabled else []),
                     ("evaluate", lambda: evaluate_stage(cfg, cfg_yaml))):
        s = time.time()
        print(f"[bootdiff] === stage {name} ===", flush=True)
        try:
            fn()
        except KeyboardInterrupt as exc:
            detail = f": {exc}" if isinstance(exc, entry.Interrupted) and str(exc) else ""
            raise entry.Interrupted(f"pipeline stage {name}{detail}; finished stages: "
                                     f"{', '.join(stages) or 'none'}") from exc
        stages[name] = time.time() - s
    report = util.join(layout.report, "report.html")
    print(f"[bootdiff] pipeline done in {time.time() - t0:.0f} s "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in stages.items())})", flush=True)
    print(f"[bootdiff] sweep report: {report}", flush=True)
    time_breakdown(cfg, t0, stages)
    return {"report": report, "stages": stages}


def time_breakdown(cfg, t0: float, stages: dict) -> dict:
    """Where a pipeline run's time went, printed as a table and written to ``timings.json``.

    From the records the stages write: the stage times of this run (Ray start = the rest of the
    total), each view's ``view-<v>.json`` (fit start and end) and the last metrics Ray got from its
    worker (``worker_start_time``, ``report_time``: `common.RayReportHooks`), and each trial's
    start event and Tune ``result.json`` rows (the same times, plus ``eval_s`` of each held-out
    evaluation at a checkpoint). Per run: *start-up* = launch → worker entered training,
    *train* = → last report (checkpoint evaluations included; *eval* of them), *wrap-up* = → done
    (tear-down, export). Records older than this run (stages skipped) are marked ``earlier``."""
    layout = RunLayout.of(cfg)
    total = time.time() - t0
    out = {"total_s": total, "stages": {"ray_start_and_setup": total - sum(stages.values()), **stages},
           "views": {}, "trials": {}}

    def phases(start, rows, end=None):
        rows = [r for r in rows if "worker_start_time" in r]
        d = {"start": start}
        if rows:
            d["startup_s"] = rows[0]["worker_start_time"] - start
            d["train_s"] = rows[-1]["report_time"] - rows[0]["worker_start_time"]
            d["eval_s"] = sum(r.get("eval_s", 0.0) for r in rows)
            d["evals"] = sum(1 for r in rows if "eval_s" in r)
            if end is not None:
                d["wrapup_s"] = end - rows[-1]["report_time"]
        last = rows[-1]["report_time"] if rows else None
        d["total_s"] = (end if end is not None else last) - start if (end or last) else None
        d["earlier"] = start < t0
        return d

    for v in cfg.views:
        url = layout.view_run_info(v)
        if util.exists(url):
            info = common.read_json(url)
            out["views"][v] = phases(info["start"], [info.get("metrics") or {}], info["end"])
    fs, events = util.url_fs(layout.events)
    for path in sorted(fs.glob(events + "/*.start")):
        event = common.read_json(layout.url(path))
        label = event["trial"]["label"]
        res = util.join(layout.tune, f"trial-{label}", "result.json")
        rows = [json.loads(line) for line in util.read_bytes(res).decode().splitlines() if line.strip()] \
            if util.exists(res) else []
        d = phases(event["time"], rows)
        if rows and "worker_start_time" not in rows[-1]:  # the combined baseline: evaluated in the trial itself
            d["total_s"] = d["eval_s"] = rows[-1].get("timestamp", event["time"]) - event["time"]
        d["kimg"] = rows[-1].get("kimg") if rows else None
        out["trials"][label] = d  # a restored trial: its latest start

    def fmt(x):
        return f"{'-':>7s}" if x is None else f"{x:7.1f}"

    runs = [(f"view {k}", d) for k, d in out["views"].items()] + [(f"trial {k}", d) for k, d in out["trials"].items()]
    w = max([len(k) for k, _ in runs] + [19])
    lines = [f"[bootdiff] time breakdown of '{cfg.name}' ({total:.0f} s; load average "
             f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}), seconds:",
             f"  {'stage':<{w}s}    total"]
    lines += [f"  {k:<{w}s}  {fmt(v)}" for k, v in out["stages"].items()]
    lines.append(f"  {'run':<{w}s}    total start-up    train     eval (n)  wrap-up")
    for k, d in runs:
        lines.append(f"  {k:<{w}s}  {fmt(d['total_s'])}  {fmt(d.get('startup_s'))}  {fmt(d.get('train_s'))}  "
                     f"{fmt(d.get('eval_s'))} ({d.get('evals', 0)})  {fmt(d.get('wrapup_s'))}"
                     + ("  (earlier run)" if d["earlier"] else ""))
    print("\n".join(lines), flush=True)
    common.write_json(util.join(layout.root, "timings.json"), out)
    return out


def evaluate_stage(cfg, cfg_yaml: str) -> None:
    if evaluate.report_done(cfg):
        print(f"[bootdiff] report already written: {RunLayout.of(cfg).report}", flush=True)
    else:
        evaluate.run(cfg, cfg_yaml, common.read_json(RunLayout.of(cfg).sweep_json))


def _job(cfg, cfg_yaml: str) -> None:
    run(cfg, cfg_yaml)


if __name__ == "__main__":
    sys.exit(entry.main(_job, __doc__))
