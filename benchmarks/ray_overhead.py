"""What Ray costs stage 1: concurrent view training, and the Ray-wrapped loop vs the bare loop.

    python benchmarks/ray_overhead.py [--views patch,low] [--kimg 3] [--steps 40]
                                      [--report-every 2,5,20] [--report-every-s 0,5]
                                      [--sim-step-ms 10,0] [--repeats 1] [--no-stage1]
                                      [--storage DIR] [--limit 1500]

On ``configs/quickstart.yaml`` (MNIST 32²; views 16² patches and ×2 low-res) with small overrides:
``data.source.limit`` (default 1500; ``data.num_test`` 128), storage in a temp dir (or ``--storage``), Ray's temp files
in a temp ``RAY_TMPDIR``. It first ingests (`bootdiff.data.ingest.ingest`), then measures

1. **stage-1 wall time**: `ray_jobs.train_views.run` with all ``--views`` at once (each view
   ``--kimg``, one 1-CPU worker each) vs `run` with each view alone in ``cfg.views`` (the
   ``views/`` and ``models/`` of the previous run are removed first, so each run starts fresh);
2. **per-step overhead of Ray**: the first view trained for ``--steps`` optimizer steps
   (``checkpoint_every_kimg=0``: one checkpoint, at the end) by `bootdiff.train.train` bare in
   this process (1 torch thread, like a 1-CPU worker) and by the real Ray Train worker
   (`ray_jobs.train_views.make_trainer` → ``train_worker`` → `RayReportHooks` →
   ``ray.train.report``), once per ``--report-every`` value, bare and Ray alternating. Timings
   are taken inside the worker: ``train()`` is wrapped (start, end, steps) and ``on_report``
   timed (time spent in ``ray.train.report``). ``s_per_step`` = time from the end of the first
   report to the end of the last (final checkpoint included) / the steps between them;
   ``s_per_step_total`` = whole ``train()`` call / steps. TorchTrainer start-up (``fit()`` call →
   ``train()`` entered in the worker) and tear-down (``train()`` returned → ``fit()`` returned)
   are reported separately. ``report_fraction`` = time inside the hooks (the final checkpoint
   report excluded) / ``train()`` time, and ``reporting_ray_over_bare`` = (1 + Ray's) / (1 +
   bare's): the per-step cost of reporting alone, which a loaded machine does not blur as it
   blurs the s/step ratio of two runs taken minutes apart. Each case is a (``--sim-step-ms``, ``--report-every``,
   ``--report-every-s``) triple, repeated ``--repeats`` times: ``report_every`` steps between the
   loop's reports to the hooks (stdout), ``report_every_s`` seconds between those passed on to
   ``ray.train.report`` (0: every one, the behaviour before issue 10; the config refuses < 2 s),
   and a simulated step: ``--sim-step-ms S > 0`` makes the loss sleep S ms and compute on one
   image of the batch (a fast GPU-like step; loading the batch still costs its time), 0 keeps
   the quickstart's real step. Simulated runs have ``--sim-steps`` steps, so that at least one
   ``report_every_s`` window passes.

Why report_every matters: in Ray 2.60 ``ray.train.report`` puts the result on a per-worker queue
of size 1 that the controller empties once per poll (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s),
so a report waits until the previous one was collected: reports closer than ~2 s apart cost up to
2 s each, reports further apart cost almost nothing (``report_s_mean_excl_last``).

Prints one JSON object on stdout (everything else goes to stderr). Numbers are noisy on a shared
machine: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart.yaml")


def make_config(storage: str, limit: int, views, kimg: float):
    from bootdiff.config import load_config, to_object

    # The MNIST source scales its fixed test split with the limit (1500 -> 214 test digits).
    over = [f"storage={storage}", "name=ray_overhead", f"data.source.limit={limit}",
            f"data.num_test={min(128, limit // 10)}"]
    cfg = to_object(load_config(CONFIG, over))
    unknown = [v for v in views if v not in cfg.views]
    if unknown:
        raise KeyError(f"--views {','.join(unknown)}: not in {CONFIG} (views: {sorted(cfg.views)})")
    cfg.views = {v: cfg.views[v] for v in views}
    for v in views:
        cfg.views[v].train.total_kimg = kimg
    return cfg


def with_views(cfg, views):
    import copy

    from bootdiff.config import to_yaml

    c = copy.deepcopy(cfg)
    c.views = {v: cfg.views[v] for v in views}
    return c, to_yaml(c)


def fresh_stage1(cfg) -> None:
    """Remove the Ray Train runs and exported models, so `train_views.run` starts from scratch."""
    from bootdiff import util
    from bootdiff.run.layout import RunLayout

    for sub in ("views", "models"):
        fs, path = util.url_fs(util.join(RunLayout.of(cfg).root, sub))
        if fs.exists(path):
            fs.rm(path, recursive=True)


def stage1(cfg, views) -> dict:
    """(1) `train_views.run` with all views concurrently, then each view alone."""
    from ray_jobs import train_views

    out = {}
    for label, vs in [("concurrent", list(views))] + [(f"alone_{v}", [v]) for v in views]:
        c, y = with_views(cfg, vs)
        fresh_stage1(c)
        t0 = time.time()
        infos = train_views.run(c, y)
        wall = time.time() - t0
        out[label] = {"views": vs, "wall_s": round(wall, 2),
                      "per_view_s": {i["view"]: round(i["end"] - i["start"], 2) for i in infos},
                      "kimg": {i["view"]: round(float(i["metrics"].get("kimg", 0)), 3) for i in infos}}
        print(f"[ray_overhead] stage 1 {label}: {wall:.1f} s", file=sys.stderr, flush=True)
    alone = [out[f"alone_{v}"]["wall_s"] for v in views]
    conc = out["concurrent"]["wall_s"]
    out["sum_alone_s"] = round(sum(alone), 2)
    out["concurrent_over_sum_alone"] = round(conc / sum(alone), 3)
    out["concurrent_over_max_alone"] = round(conc / max(alone), 3)
    return out


class _Timing:
    """Records (step, entered, left) of every report; base of the bare and Ray hooks."""

    def __init__(self):
        self.reports = []

    def record(self, step: int, t0: float, t1: float) -> None:
        self.reports.append([int(step), t0, t1])


def summarize(reports, t_start: float, t_end: float, steps: int) -> dict:
    """s/step between the first and last report's end, total s/step, mean s inside a report."""
    first, last = reports[0], reports[-1]
    in_report = [r[2] - r[1] for r in reports]
    out = {"steps": steps, "reports": len(reports),
           "train_s": round(t_end - t_start, 3),
           "s_per_step_total": round((t_end - t_start) / max(steps, 1), 4),
           "report_s_mean": round(sum(in_report) / len(in_report), 3),
           "report_s_mean_excl_last": round(sum(in_report[:-1]) / max(len(in_report) - 1, 1), 3),
           # share of the loop spent inside the hooks (final checkpoint report excluded): what
           # reporting adds per step, independent of how loaded the machine is
           "report_fraction": round(sum(in_report[:-1]) / max(t_end - t_start, 1e-9), 5)}
    if last[0] > first[0]:
        out["s_per_step"] = round((last[2] - first[2]) / (last[0] - first[0]), 4)
        out["window_steps"] = last[0] - first[0]
    return out


class SimulatedLoss:
    """A loss that sleeps ``ms`` and computes on the batch's first image: a step of about ``ms``."""

    def __init__(self, loss, ms: float):
        self.loss, self.ms = loss, ms

    def __call__(self, net, x, gen):
        time.sleep(self.ms / 1000)
        return self.loss(net, x[:1], gen)


def simulated(loss, cfg):
    ms = getattr(cfg, "_sim_step_ms", 0)
    return SimulatedLoss(loss, ms) if ms > 0 else loss


def bare(cfg, view: str) -> dict:
    """`bootdiff.train.train` in this process: same model, data and steps as the Ray worker."""
    import torch

    from bootdiff import experiment
    from bootdiff.train import train

    hooks = _Timing()

    class Hooks:
        def on_report(self, metrics, checkpoint_url):
            t = time.time()
            hooks.record(metrics["step"], t, time.time())

    threads = torch.get_num_threads()
    torch.set_num_threads(int(cfg.views[view].scaling.cpus_per_worker))
    run_dir = tempfile.mkdtemp(prefix="bootdiff-bare-")
    try:
        t_setup = time.time()
        manifest = experiment.read_manifest(cfg)
        vcfg = cfg.views[view]
        model, loss, data = experiment.view_training(cfg, manifest, view, vcfg, 0, 1)
        t0 = time.time()
        res = train(model, simulated(loss, cfg), data, vcfg.train, run_dir=run_dir, hooks=Hooks(), device="cpu")
        t1 = time.time()
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"setup_s": round(t0 - t_setup, 3), **summarize(hooks.reports, t0, t1, res.step)}


def make_timed_worker(out_path: str, sim_step_ms: float = 0, report_every_s: float = -1):
    """``train_views.train_worker`` as is, with `bootdiff.train.train` and
    `RayReportHooks.on_report` timed in the worker; rank 0 writes the timings to ``out_path``."""

    def timed_worker(config: dict) -> None:
        t_entered = time.time()
        import bootdiff.train as bt
        from ray_jobs import common, train_views

        real_train, real_hooks = bt.train, common.RayReportHooks
        rec = {"worker_entered": t_entered, "reports": [], "ray_reports": []}

        class TimedHooks(real_hooks):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                if report_every_s >= 0:  # also 0 (every report to Ray), which the config refuses
                    self.report_every_s = report_every_s

            def report_to_ray(self, metrics, checkpoint_url):
                n = self.ray_reports
                t0 = time.time()
                super().report_to_ray(metrics, checkpoint_url)
                if self.ray_reports > n:
                    rec["ray_reports"].append([int(metrics["step"]), t0, time.time()])

            def on_report(self, metrics, checkpoint_url):
                t0 = time.time()
                try:
                    return super().on_report(metrics, checkpoint_url)
                finally:
                    rec["reports"].append([int(metrics["step"]), t0, time.time()])

        def timed_train(model, loss, *args, **kwargs):
            if sim_step_ms > 0:
                loss = SimulatedLoss(loss, sim_step_ms)
            rec["train_start"] = time.time()
            res = real_train(model, loss, *args, **kwargs)
            rec["train_end"], rec["steps"] = time.time(), res.step
            return res

        bt.train, common.RayReportHooks = timed_train, TimedHooks
        try:
            train_views.train_worker(config)
        finally:
            bt.train, common.RayReportHooks = real_train, real_hooks
            import ray.train

            if ray.train.get_context().get_world_rank() == 0:
                with open(out_path, "w") as f:
                    json.dump(rec, f)

    return timed_worker


def ray_loop(cfg, view: str, run_name: str, tmp: str) -> dict:
    """The real Ray Train worker of ``view`` (one TorchTrainer, fit to completion)."""
    from bootdiff.config import to_yaml
    from ray_jobs import train_views

    c, y = with_views(cfg, [view])
    out_path = os.path.join(tmp, f"{run_name}.json")
    real = train_views.train_worker
    t = c.views[view].train
    # make_trainer looks it up here
    train_views.train_worker = make_timed_worker(out_path, getattr(cfg, "_sim_step_ms", 0), t.report_every_s)
    try:
        trainer = train_views.make_trainer(c, to_yaml(c), view, run_name, os.path.join(tmp, "ray_runs"))
        t_fit = time.time()
        result = trainer.fit()
        t_done = time.time()
    finally:
        train_views.train_worker = real
    if result.error:
        raise RuntimeError(f"Ray run {run_name} failed: {result.error}")
    with open(out_path) as f:
        rec = json.load(f)
    ray_in = [r[2] - r[1] for r in rec["ray_reports"][:-1]]
    return {"ray_reports": len(rec["ray_reports"]),
            "ray_report_s_mean_excl_last": round(sum(ray_in) / max(len(ray_in), 1), 3),
            "startup_s": round(rec["train_start"] - t_fit, 3),
            "teardown_s": round(t_done - rec["train_end"], 3),
            "fit_s": round(t_done - t_fit, 3),
            **summarize(rec["reports"], rec["train_start"], rec["train_end"], rec["steps"])}


def overhead(cfg, view: str, steps: int, cases, repeats: int, tmp: str, sim_steps: int = 600) -> dict:
    """(2) bare vs Ray per-step time for each (sim_step_ms, report_every, report_every_s) case,
    alternating bare and Ray, ``repeats`` times; the median ratio is the case's result."""
    import copy
    import statistics

    out = {}
    for sim, r, r_s in cases:
        c = copy.deepcopy(cfg)
        c._sim_step_ms = sim
        t = c.views[view].train
        n = sim_steps if sim > 0 else steps
        t.total_kimg = n * t.batch_size * t.accum_steps / 1000
        t.checkpoint_every_kimg, t.report_every, t.report_every_s = 0.0, r, r_s
        key = f"sim_{sim:g}ms_report_every_{r}_s_{r_s:g}"
        runs = []
        for i in range(repeats):
            b = bare(c, view)
            print(f"[ray_overhead] {key} #{i} bare: {b}", file=sys.stderr, flush=True)
            ry = ray_loop(c, view, f"overhead-{key}-{i}", tmp)
            print(f"[ray_overhead] {key} #{i} ray:  {ry}", file=sys.stderr, flush=True)
            entry = {"bare": b, "ray": ry}
            if "s_per_step" in b and "s_per_step" in ry:
                entry["ray_minus_bare_s_per_step"] = round(ry["s_per_step"] - b["s_per_step"], 4)
                entry["ray_over_bare"] = round(ry["s_per_step"] / b["s_per_step"], 3)
            entry["ray_over_bare_total"] = round(ry["s_per_step_total"] / b["s_per_step_total"], 3)
            entry["reporting_ray_over_bare"] = round((1 + ry["report_fraction"]) / (1 + b["report_fraction"]), 4)
            runs.append(entry)
        ratios = [e["ray_over_bare"] for e in runs if "ray_over_bare" in e]
        out[key] = {"sim_step_ms": sim, "report_every": r, "report_every_s": r_s, "steps": n, "runs": runs,
                    "ray_over_bare_median": round(statistics.median(ratios), 3) if ratios else None}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--views", default="patch,low", help="comma-separated views of quickstart.yaml")
    p.add_argument("--kimg", type=float, default=3.0, help="total_kimg of each view in stage 1")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of the bare-vs-Ray runs")
    p.add_argument("--report-every", default="2,5,20", help="report_every values for the overhead runs")
    p.add_argument("--report-every-s", default="0,5", help="report_every_s values (0: every report to Ray)")
    p.add_argument("--sim-step-ms", default="10,0", help="simulated step times in ms (0: the real step)")
    p.add_argument("--sim-steps", type=int, default=600, help="optimizer steps of the simulated-step runs")
    p.add_argument("--repeats", type=int, default=1, help="bare/Ray pairs per case")
    p.add_argument("--no-stage1", action="store_true", help="skip (1), the concurrent-views comparison")
    p.add_argument("--storage", default="", help="storage URL (default: a temp dir, removed at the end)")
    p.add_argument("--limit", type=int, default=1500, help="data.source.limit")
    args = p.parse_args(argv)
    views = [v for v in args.views.split(",") if v]
    report_every = [int(r) for r in args.report_every.split(",") if r]
    cases = [(float(ms), r, float(r_s)) for ms in args.sim_step_ms.split(",") if ms
             for r in report_every for r_s in args.report_every_s.split(",") if r_s]

    tmp = tempfile.mkdtemp(prefix="rayov-")
    os.environ["RAY_TMPDIR"] = os.path.join(tmp, "ray")
    os.makedirs(os.environ["RAY_TMPDIR"])
    storage = args.storage or os.path.join(tmp, "storage")
    real_stdout = sys.stdout
    result = {"benchmark": "ray_overhead", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "args": vars(args)}
    try:
        with contextlib.redirect_stdout(sys.stderr):
            import ray
            import torch

            from bootdiff.data.ingest import ingest
            from bootdiff.run.layout import absolute_url
            from ray_jobs import entry

            result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                                 "cuda": torch.cuda.is_available(), "torch": torch.__version__,
                                 "ray": ray.__version__, "loadavg_start": os.getloadavg()}
            cfg = make_config(absolute_url(storage), args.limit, views, args.kimg)
            t0 = time.time()
            manifest = ingest(cfg, progress=False)
            result["ingest_s"] = round(time.time() - t0, 2)
            result["samples"] = {v: manifest["splits"][v]["count"] for v in views}
            t0 = time.time()
            entry.init_ray(cfg)
            result["ray_init_s"] = round(time.time() - t0, 2)
            result["cluster_cpus"] = ray.cluster_resources().get("CPU")
            if not args.no_stage1:
                result["stage1"] = stage1(cfg, views)
            result["overhead"] = {"view": views[0], "steps": args.steps,
                                  "batch_size": cfg.views[views[0]].train.batch_size,
                                  **overhead(cfg, views[0], args.steps, cases, args.repeats, tmp, args.sim_steps)}
            result["machine"]["loadavg_end"] = os.getloadavg()
    finally:
        try:
            import ray

            ray.shutdown()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if os.path.exists(tmp):  # Ray's processes may still write a log while exiting
                time.sleep(2)
                shutil.rmtree(tmp, ignore_errors=True)
    real_stdout.write(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
