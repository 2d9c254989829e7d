"""The bootstrap's combined denoiser and a peer network averaged (`bootdiff.ensemble`), against the
peer's own two-seed ensemble at the same compute (issue 18, "a peer network as stage 1's partner
in the fusion"), on a finished data-efficiency benchmark folder.

    python benchmarks/ensemble.py --bench /tmp/bench --n 16 --peer ambient --weights 0.25 0.5 0.75

Models, all on the benchmark's data and budgets (``plan.json``):
- D_comb: the bootstrap's combined denoiser of the view models (no training; the residual's
  validation minimum equals it within 0.2 % at N = 16, benchmarks/RESULTS.md).
- the peer at seed 0 (the benchmark's own selection run) and at ``--seed`` (default 1: a selection
  run of its own, same budget and patience, other initialisation, noise and data order). Each
  peer's model on all N images is trained to the kimg of its selection run's validation minimum,
  so that its last checkpoint is the early-stopped model (the benchmark keeps only its last
  checkpoints).

The weight of each ensemble — D_comb + peer, and peer(seed 0) + peer(seed 1), the rival at about
the same compute (D_comb's views and one peer network, against two peer networks) — is chosen on
validation G (the N − v images of the carve-out, at the selection runs' last checkpoints), never on
the test split; then each model and both ensembles are scored on the test split like the
benchmark's rows (test and train G, SWD, classifier FD and confident share of ``--num-samples``
samples from the same noise). Finished runs are kept under ``{bench}/ensemble/`` (a re-run reads
them; an interrupted one resumes from its checkpoint). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@contextlib.contextmanager
def stdout_to_stderr():
    """``sys.stdout``, and file descriptor 1 (which spawned training processes inherit), pointed at
    standard error while training, so that the training logs stay out of the JSON on standard output."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv=None) -> int:
    import torch

    from bootdiff import experiment, util
    from bootdiff.config import ExperimentConfig, from_yaml, to_yaml
    from bootdiff.efficiency.data import dataset_cfg
    from bootdiff.efficiency.models import job_cfg, kimg_at_best, load_model, model_file, score_model
    from bootdiff.efficiency.run import process_runner
    from bootdiff.ensemble import EnsembleDenoiser, choose_weight
    from bootdiff.evaluation.scores import generalization

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bench", required=True, help="a finished data-efficiency benchmark folder (local)")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--peer", default="ambient")
    p.add_argument("--seed", type=int, default=1, help="the rival peer network's seed")
    p.add_argument("--weights", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                   help="weights of the first member tried (the second gets 1 - w)")
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    bench, n, peer = os.path.abspath(args.bench), args.n, args.peer
    plan = json.loads(util.read_bytes(util.join(bench, "plan.json")))
    b, cfg = plan["budgets"], from_yaml(plan["config"], ExperimentConfig)
    t0 = time.time()

    def result(job_id: str) -> dict:
        url = util.join(bench, "results", model_file(job_id))
        if not util.exists(url):
            raise SystemExit(f"{url}: the benchmark's {job_id} has not finished")
        return json.loads(util.read_bytes(url))

    def seeded(data: str, seed: int) -> str:
        c = dataset_cfg(cfg, bench, data)
        c.seed = seed
        c.full_res.train.seed = seed  # the peers train with full_res's training settings
        return to_yaml(c)

    # Training: the rival's selection run, then each peer network on all N to its validation minimum.
    def run(jobs):
        todo, rows = [], {}
        for j in jobs:
            url = util.join(bench, "ensemble", model_file(j["id"]))
            if util.exists(url):
                rows[j["id"]] = json.loads(util.read_bytes(url))
            else:
                todo.append(j)
        with stdout_to_stderr():  # the training log: stdout is the JSON
            for j, row in process_runner(args.workers)(todo, b, util.join(bench, "ensemble"), args.num_samples):
                util.atomic_write_bytes(util.join(bench, "ensemble", model_file(j["id"])),
                                        json.dumps(row, default=float).encode())
                rows[j["id"]] = row
        return rows

    sel0 = result(f"N{n}/select-{peer}")
    setting = dict(sel0.get("peer_setting") or {})
    sel_job = {"id": f"N{n}/select-{peer}-s{args.seed}", "kind": peer, "data": f"N{n}-select", "stage": 0, "N": n,
               "quick": True, "peer_setting": setting, "cfg_yaml": seeded(f"N{n}-select", args.seed)}
    main0 = {"id": f"N{n}/{peer}-s0-best", "kind": peer, "data": f"N{n}", "stage": 1, "N": n,
             "peer_setting": setting, "cfg_yaml": seeded(f"N{n}", cfg.seed), "budget_kimg": kimg_at_best(sel0)}
    rows = run([sel_job, main0])
    sel1 = rows[sel_job["id"]]
    main1 = {**main0, "id": f"N{n}/{peer}-s{args.seed}-best", "cfg_yaml": seeded(f"N{n}", args.seed),
             "budget_kimg": kimg_at_best(sel1)}
    rows.update(run([main1]))

    device = util.compute_device()

    def models(data: str, peer_rows: list):
        """D_comb and each peer network (``(job, checkpoint)``) on dataset ``data``."""
        c = dataset_cfg(cfg, bench, data)
        man = experiment.read_manifest(c)
        comb = load_model({"kind": "combined"}, c, man, None).to(device).eval()
        nets = [load_model(j, job_cfg(j, b), man, ck).to(device).eval() for j, ck in peer_rows]
        return c, man, comb, nets

    # Validation: each ensemble's weight on the carve-out (its "test" split).
    c, man, comb, (p0, p1) = models(f"N{n}-select", [({**sel_job, "cfg_yaml": to_yaml(dataset_cfg(cfg, bench, f"N{n}-select"))},
                                                      sel0["checkpoint"]), (sel_job, sel1["checkpoint"])])
    with torch.no_grad():
        val = {"combined": generalization(c, man, comb, "test")["total"],
               f"{peer}-s0": generalization(c, man, p0, "test")["total"],
               f"{peer}-s{args.seed}": generalization(c, man, p1, "test")["total"]}
        grid = {"combined+peer": {w: generalization(c, man, EnsembleDenoiser([comb, p0], [w, 1 - w]), "test")["total"]
                                  for w in args.weights},
                "peer+peer": {w: generalization(c, man, EnsembleDenoiser([p0, p1], [w, 1 - w]), "test")["total"]
                              for w in args.weights}}
    chosen = {k: choose_weight(v) for k, v in grid.items()}
    print(f"[ensemble] validation G: {json.dumps(val)}; grids {json.dumps(grid)}; chosen {chosen}",
          file=sys.stderr, flush=True)

    # Test: every model and both ensembles at their chosen weights, scored like the benchmark's rows.
    c, man, comb, (q0, q1) = models(f"N{n}", [(main0, rows[main0["id"]]["checkpoint"]),
                                              (main1, rows[main1["id"]]["checkpoint"])])
    test = {}
    for name, D in [("combined", comb), (f"{peer}-s0", q0), (f"{peer}-s{args.seed}", q1),
                    ("combined+peer", EnsembleDenoiser([comb, q0], [chosen["combined+peer"], 1 - chosen["combined+peer"]])),
                    ("peer+peer", EnsembleDenoiser([q0, q1], [chosen["peer+peer"], 1 - chosen["peer+peer"]]))]:
        with torch.no_grad():
            test[name] = {k: v for k, v in score_model(c, man, D, args.num_samples).items()
                          if k in ("test_G", "train_G", "swd", "classifier_fd", "confident_share")}
        print(f"[ensemble] test {name}: {test[name]}", file=sys.stderr, flush=True)
    flops = b.get("flops") or {}
    out = {"bench": bench, "N": n, "peer": peer, "seed": args.seed, "validation_G": val, "validation_grid": grid,
           "chosen_weight_of_first": chosen, "test": test,
           "kimg": {f"{peer}-s0": main0["budget_kimg"], f"{peer}-s{args.seed}": main1["budget_kimg"]},
           "flops": {"combined (views)": sum(v for k, v in (flops.get("bootstrap") or {}).items() if k.startswith("view-")),
                     f"{peer} per step": flops.get(f"{peer}_per_step")},
           "wall_s": round(time.time() - t0, 1), "loadavg_end": os.getloadavg()}
    print(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
