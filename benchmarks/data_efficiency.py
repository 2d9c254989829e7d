"""Data-efficiency benchmark: what bootstrapping buys against N full-resolution images alone and
against an all-data oracle (issue 8; the logic is `bootdiff.efficiency`).

    python benchmarks/data_efficiency.py --config configs/quickstart.yaml --out /tmp/bench \
        --ns 16 64 256 --kimg 8 [--local] [key=value ...]

Writes ``{out}/efficiency.json``, ``g_vs_n.png``, ``swd_vs_n.png`` and ``summary.md``; every
model's result goes to ``{out}/results/`` as it finishes, so a re-run resumes where it stopped.
Without ``--local`` the models are Ray Train runs (ray_jobs/efficiency.py), concurrently per
stage; with it they train in this process on CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from bootdiff.efficiency.run import DEFAULT_NS, process_runner, run_benchmark
    from bootdiff.config import load_config, to_object

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, help="benchmark folder (local path or s3:// URL)")
    p.add_argument("--ns", type=int, nargs="+", default=list(DEFAULT_NS))
    p.add_argument("--kimg", type=float, default=None,
                   help="budget of every baseline and residual (default: residual.train.total_kimg)")
    p.add_argument("--num-samples", type=int, default=128, help="samples per model for SWD / memorisation")
    p.add_argument("--val-fraction", type=float, default=0.25, help="of N, held back to pick μ_var / μ_L1")
    p.add_argument("--patience", type=int, default=0,
                   help="stop every model when its validation G has not improved for this many checkpoints "
                        "(baselines and oracle then capped at the bootstrap's training compute; 0: fixed budgets)")
    p.add_argument("--rows", default=None,
                   help="train only these rows, comma-separated (oracle, baseline, combined, bootstrap or a peer's "
                        "name), with the view models they need: e.g. --rows bootstrap --out <new folder> seed=1")
    p.add_argument("--local", action="store_true", help="train in this process (CPU), no Ray")
    p.add_argument("--workers", type=int, default=1, help="with --local: models trained at once, one process each")
    p.add_argument("overrides", nargs="*", help="config key=value overrides")
    args = p.parse_args(argv)
    cfg = to_object(load_config(args.config, args.overrides))
    out = args.out if "://" in args.out else os.path.abspath(args.out)
    runner = process_runner(args.workers)
    if not args.local:
        from ray_jobs.efficiency import ray_runner

        runner = ray_runner(cfg)
    start = time.time()
    summary = run_benchmark(cfg, out, args.ns, args.kimg, args.num_samples, args.val_fraction, runner,
                            patience=args.patience, rows=args.rows.split(",") if args.rows else None)
    from bootdiff.efficiency.report import markdown

    print(markdown(summary))
    print(f"[bench] wrote {out}/efficiency.json, g_vs_n.png, swd_vs_n.png, summary.md "
          f"({time.time() - start:.0f} s this invocation)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
