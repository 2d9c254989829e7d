"""Variants of the bootstrap measured on validation (issue 18, "the bootstrap made stronger"): on a
finished data-efficiency benchmark folder, each variant's config overrides applied, the view
models it changes trained again on the same partial pool, then — on the same carve-out of N
(validation G on the v images held back, never the test split) — the combined denoiser scored
and each residual setting's selection run trained again; beside them the benchmark's own models
(the "before"). A variant that changes ``full_res`` (the baseline's network or training, e.g.
``full_res.train.augment``) also trains the baseline's selection run again, and each peer named in
``--peers`` (its default setting: the peers train as ``full_res`` does), so that a change given to
the bootstrap is given to its rivals too and both sides are compared before and after.

    python benchmarks/variants.py --bench /tmp/bench --ns 16 64 \
        --variant zero_init residual.zero_init=true \
        --variant low1 residual.low_ratio=1 residual.sigma_tn=0.5 \
        --variant coords views.patch.coords=true \
        --variant aug full_res.train.augment=0.15 residual.train.augment=0.15 --peers ambient

Each run has the benchmark's budgets and patience (``plan.json``); a variant that changes a view
trains it in ``{bench}/base~<name>`` (the base dataset's shards, linked) and scores on
``{bench}/N<n>-select~<name>``. Finished runs are kept under ``{bench}/variants/`` (a re-run
reads them; an interrupted one resumes from its checkpoint). Prints one JSON object: per N and
variant, the combined denoiser's validation G, each residual setting's best validation G and the
kimg of it, the best over settings against the benchmark's, and FLOPs per step of the residual
and of each view model (`bootdiff.efficiency.compute`: a variant that costs more per step would
give the equal-compute peers more too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def variant_config(cfg_yaml: str, overrides):
    """The benchmark's config with ``overrides`` applied: unknown keys and wrong types are
    refused; the cross-field check is not run (a benchmark dataset has no validation split of its
    own: its "test" split is the carve-out), and a bad view name fails when its run starts."""
    from bootdiff.config import load_config, to_object

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(cfg_yaml)
    try:
        return to_object(load_config(f.name, list(overrides), check=False))
    finally:
        os.unlink(f.name)


def _copy_tree(src: str, dst: str) -> None:
    """``dst`` a copy of the local folder ``src``, files hard-linked (datasets are read-only)."""
    def link(s, d):
        if os.path.exists(d):  # linked by an earlier run
            return
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link, dirs_exist_ok=True)


def main(argv=None) -> int:
    from bootdiff import experiment, util
    from bootdiff.config import from_yaml, to_yaml, ExperimentConfig
    from bootdiff.efficiency.compute import residual_step_flops, view_step_flops
    from bootdiff.efficiency.data import dataset_cfg
    from bootdiff.efficiency.models import best_val_G, kimg_at_best, model_file
    from bootdiff.efficiency.run import run_job
    from bootdiff.run.layout import RunLayout
    from bootdiff.sweep import trial_list

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bench", required=True, help="a finished data-efficiency benchmark folder (local)")
    p.add_argument("--ns", type=int, nargs="+", required=True)
    p.add_argument("--variant", nargs="+", action="append", required=True, metavar=("NAME", "KEY=VALUE"),
                   help="a name and its config overrides (repeat for more variants)")
    p.add_argument("--peers", nargs="*", default=[],
                   help="peers whose selection runs a variant that changes full_res trains again (default setting)")
    args = p.parse_args(argv)
    bench = os.path.abspath(args.bench)
    plan = json.loads(util.read_bytes(util.join(bench, "plan.json")))
    b, cfg = plan["budgets"], from_yaml(plan["config"], ExperimentConfig)
    base = dataset_cfg(cfg, bench, "base")
    manifest = experiment.read_manifest(base)

    def run(job: dict) -> dict:
        url = util.join(bench, "variants", model_file(job["id"]))
        if util.exists(url):
            return json.loads(util.read_bytes(url))
        t0 = time.time()
        with contextlib.redirect_stdout(sys.stderr):  # the training log: stdout is the JSON
            row = run_job(job, b, bench, num_samples=0)
        row["wall_s"] = time.time() - t0
        util.atomic_write_bytes(url, json.dumps(row, default=float).encode())
        return row

    def flops(c) -> dict:
        return {"residual": residual_step_flops(c, manifest),
                **{f"view-{v}": view_step_flops(c, manifest, v, vc) for v, vc in c.views.items()}}

    out = {"bench": bench, "residual_kimg": b["residual_kimg"], "view_kimg": b["view_kimg"],
           "patience": b.get("patience", 0), "ns": {}}
    for n in args.ns:
        sel = dataset_cfg(cfg, bench, f"N{n}-select")
        labels, before = {}, {}
        for t in trial_list(cfg):
            if t["kind"] != "residual":
                continue
            url = util.join(bench, "results", model_file(f"N{n}/select-{t['label']}"))
            if not util.exists(url):
                raise SystemExit(f"{url}: the benchmark's selection run of N={n}, {t['label']}, has not finished")
            row = json.loads(util.read_bytes(url))
            labels[t["label"]] = row["trial"]
            before[t["label"]] = {"val_G": best_val_G(row), "kimg_at_best": kimg_at_best(row)}
        comb = run({"id": f"N{n}/variant-before/combined", "kind": "combined", "data": f"N{n}-select", "N": n,
                    "quick": True, "cfg_yaml": to_yaml(sel)})
        res = {"before": {"combined_val_G": comb["test_G"], "settings": before,
                          "best_val_G": min(r["val_G"] for r in before.values()), "flops_per_step": flops(cfg)}}
        for name, *overrides in args.variant:
            vcfg = variant_config(plan["config"], overrides)
            changed = [v for v in cfg.views if to_yaml(vcfg.views[v]) != to_yaml(cfg.views[v])]
            vsel = dataset_cfg(vcfg, bench, f"N{n}-select")
            if changed:  # its own view models, on the same partial pool
                vbase = dataset_cfg(vcfg, bench, f"base~{name}")
                _copy_tree(RunLayout.of(base).data, RunLayout.of(vbase).data)
                for v in changed:
                    run({"id": f"variant-{name}/view-{v}", "kind": "view", "view": v, "data": f"base~{name}",
                         "cfg_yaml": to_yaml(vbase)})
                vsel = dataset_cfg(vcfg, bench, f"N{n}-select~{name}")
                _copy_tree(RunLayout.of(sel).data, RunLayout.of(vsel).data)
                for v in cfg.views:
                    src = RunLayout.of(vbase if v in changed else base).model(v)
                    _copy_tree(src, RunLayout.of(vsel).model(v))
            y = to_yaml(vsel)
            comb = run({"id": f"N{n}/variant-{name}/combined", "kind": "combined", "data": vsel.name, "N": n,
                        "quick": True, "cfg_yaml": y})
            settings = {}
            for label, row0 in sorted(before.items()):
                row = run({"id": f"N{n}/variant-{name}/select-{label}", "kind": "residual", "data": vsel.name,
                           "stage": 1, "N": n, "trial": labels[label], "quick": True, "cfg_yaml": y})
                settings[label] = {"val_G": best_val_G(row), "kimg_at_best": kimg_at_best(row),
                                   "wall_s": round(row["wall_s"], 1)}
                print(f"[variants] N={n} {name} {label}: validation G {settings[label]['val_G']:.4f} "
                      f"(before {row0['val_G']:.4f})", file=sys.stderr, flush=True)
            best = min(r["val_G"] for r in settings.values())
            res[name] = {"overrides": overrides, "views_retrained": changed, "combined_val_G": comb["test_G"],
                         "settings": settings, "best_val_G": best, "vs_before": best / res["before"]["best_val_G"] - 1,
                         "flops_per_step": flops(vcfg)}
            if to_yaml(vcfg.full_res) != to_yaml(cfg.full_res):  # the rivals get the change too
                rivals = {}
                for kind, label in [("full_res", "baseline"), *[(q, q) for q in args.peers]]:
                    url = util.join(bench, "results", model_file(f"N{n}/select-{label}"))
                    if not util.exists(url):
                        raise SystemExit(f"{url}: the benchmark's selection run of N={n}, {label}, has not finished")
                    row0 = json.loads(util.read_bytes(url))
                    row = run({"id": f"N{n}/variant-{name}/select-{label}", "kind": kind, "data": vsel.name,
                               "stage": 0, "N": n, "quick": True, "peer_setting": {}, "cfg_yaml": y})
                    rivals[label] = {"val_G": best_val_G(row), "kimg_at_best": kimg_at_best(row),
                                     "before_val_G": best_val_G(row0), "before_kimg_at_best": kimg_at_best(row0),
                                     "wall_s": round(row["wall_s"], 1)}
                    print(f"[variants] N={n} {name} {label}: validation G {rivals[label]['val_G']:.4f} "
                          f"(before {rivals[label]['before_val_G']:.4f})", file=sys.stderr, flush=True)
                res[name]["rivals"] = rivals
        out["ns"][str(n)] = res
    out["loadavg_end"] = os.getloadavg()
    print(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
