"""Stage-2 variants measured on validation (issue 18, "the bootstrap made stronger"): on a finished
data-efficiency benchmark folder, each residual setting's selection run (N − v images, validation
G on the v held back, never the test split) again with each variant's config overrides, beside the
benchmark's own runs of the same settings (the "before").

    python benchmarks/residual_variants.py --bench /tmp/bench --ns 16 64 \
        --variant zero_init residual.zero_init=true \
        --variant low1 residual.low_ratio=1 residual.sigma_tn=0.5

Each run has the benchmark's residual budget and patience (its ``plan.json``) and is kept under
``{bench}/runs/N<n>__variant-<name>__select-<setting>`` (a re-run resumes it; a finished one is
read from ``{bench}/variants/``). Prints one JSON object: per N and variant, each setting's best
validation G and the kimg of it, the variant's best over settings against the benchmark's, and the
residual's FLOPs per step (`bootdiff.efficiency.compute`: a variant that trains on more rows per
step costs more, which equal-compute peers would be given too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def variant_yaml(cfg_yaml: str, overrides) -> str:
    """A dataset's resolved config with ``overrides`` applied: unknown keys and wrong types are
    refused; the cross-field check is not run (a benchmark dataset has no validation split of its
    own: its "test" split is the carve-out), and a bad view name fails when its run starts."""
    from bootdiff.config import load_config, to_object, to_yaml

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(cfg_yaml)
    try:
        return to_yaml(to_object(load_config(f.name, list(overrides), check=False)))
    finally:
        os.unlink(f.name)


def main(argv=None) -> int:
    from bootdiff import experiment, util
    from bootdiff.config import ExperimentConfig, from_yaml
    from bootdiff.efficiency.compute import residual_step_flops
    from bootdiff.efficiency.models import best_val_G, model_file
    from bootdiff.sweep import trial_list
    from bootdiff.efficiency.run import run_job

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bench", required=True, help="a finished data-efficiency benchmark folder")
    p.add_argument("--ns", type=int, nargs="+", required=True)
    p.add_argument("--variant", nargs="+", action="append", required=True, metavar=("NAME", "KEY=VALUE"),
                   help="a name and its config overrides (repeat for more variants)")
    args = p.parse_args(argv)
    bench = args.bench if "://" in args.bench else os.path.abspath(args.bench)
    plan = json.loads(util.read_bytes(util.join(bench, "plan.json")))
    b = plan["budgets"]
    out = {"bench": bench, "residual_kimg": b["residual_kimg"], "patience": b.get("patience", 0), "ns": {}}
    for n in args.ns:
        base_yaml = plan["datasets"][f"N{n}-select"]
        cfg0 = from_yaml(base_yaml, ExperimentConfig)
        manifest = experiment.read_manifest(cfg0)
        trials, before = {}, {}
        for t in trial_list(cfg0):
            url = util.join(bench, "results", model_file(f"N{n}/select-{t['label']}"))
            if t["kind"] != "residual":
                continue
            if not util.exists(url):
                raise SystemExit(f"{url}: the benchmark's selection run of N={n}, {t['label']}, has not finished")
            row = json.loads(util.read_bytes(url))
            trials[t["label"]] = row["trial"]
            before[t["label"]] = {"val_G": best_val_G(row), "kimg_at_best": _kimg_at_best(row)}
        res = {"before": {"settings": before, "best_val_G": min(r["val_G"] for r in before.values()),
                          "flops_per_step": residual_step_flops(cfg0, manifest)}}
        for name, *overrides in args.variant:
            y = variant_yaml(base_yaml, overrides)
            settings = {}
            for label, row0 in sorted(before.items()):
                job = {"id": f"N{n}/variant-{name}/select-{label}", "kind": "residual", "data": f"N{n}-select",
                       "stage": 1, "N": n, "trial": trials[label], "quick": True, "cfg_yaml": y}
                url = util.join(bench, "variants", model_file(job["id"]))
                if util.exists(url):
                    row = json.loads(util.read_bytes(url))
                else:
                    t0 = time.time()
                    with contextlib.redirect_stdout(sys.stderr):  # the training log: stdout is the JSON
                        row = run_job(job, b, bench, num_samples=0)
                    row["wall_s"] = time.time() - t0
                    util.atomic_write_bytes(url, json.dumps(row, default=float).encode())
                settings[label] = {"val_G": best_val_G(row), "kimg_at_best": _kimg_at_best(row),
                                   "wall_s": round(row["wall_s"], 1)}
                print(f"[variants] N={n} {name} {label}: validation G {settings[label]['val_G']:.4f} "
                      f"(before {row0['val_G']:.4f})", file=sys.stderr, flush=True)
            best = min(r["val_G"] for r in settings.values())
            res[name] = {"overrides": overrides, "settings": settings, "best_val_G": best,
                         "vs_before": best / res["before"]["best_val_G"] - 1,
                         "flops_per_step": residual_step_flops(from_yaml(y, ExperimentConfig), manifest)}
        out["ns"][str(n)] = res
    out["loadavg_end"] = os.getloadavg()
    print(json.dumps(out, indent=1, default=float))
    return 0


def _kimg_at_best(row: dict):
    curve = [p for p in row.get("curve") or [] if p.get("test_G") is not None]
    return min(curve, key=lambda p: p["test_G"])["kimg"] if curve else row.get("kimg")


if __name__ == "__main__":
    sys.exit(main())
