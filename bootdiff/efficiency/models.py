"""The data-efficiency benchmark's models as jobs: their budgets and configs, the choice of the
residual setting on validation, and the scores of a finished model (`bootdiff.efficiency`).
"""

from __future__ import annotations

import copy
import math
import shutil
from typing import Dict, List, Optional

from bootdiff import experiment, util
from bootdiff.config import to_object
from bootdiff.peers import NAMES as PEER_NAMES  # every peer method, in the order rows are shown
from bootdiff.peers import apply_setting, setting_label, settings as peer_settings
from bootdiff.run.layout import RunLayout


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


def worth_in_images(g: float, curve: Dict[float, float]) -> dict:
    """What a test G is worth in full-resolution images: the N at which the full-res-only curve
    ``curve`` ({N: test G}, measured N) reaches ``g``, interpolated linearly in log N between the
    measured N. The curve is first made non-increasing (G at N is the best at any N' ≤ N: a model
    may always ignore images), so the answer is unique. Returns ``{"images": K, "bound": "="}``;
    ``bound`` ``">"`` with K the largest N when ``g`` beats the whole curve, ``"<"`` with K the
    smallest N when the smallest N already does better, and K None for a non-finite ``g``."""
    pts = sorted((float(n), float(v)) for n, v in curve.items() if v is not None and math.isfinite(float(v)))
    if not pts or g is None or not math.isfinite(float(g)):
        return {"images": None, "bound": None}
    mono, best = [], math.inf
    for n, v in pts:
        best = min(best, v)
        mono.append((n, best))
    g = float(g)
    if g > mono[0][1]:
        return {"images": mono[0][0], "bound": "<"}
    hit = next((n for n, v in mono if v == g), None)  # a measured N exactly (the first one reaching g)
    if hit is not None:
        return {"images": hit, "bound": "="}
    for (n0, v0), (n1, v1) in zip(mono, mono[1:]):
        if v1 < g < v0:
            t = (v0 - g) / (v0 - v1)
            return {"images": math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0))), "bound": "="}
    return {"images": mono[-1][0], "bound": ">"}


def budgets(cfg, kimg: Optional[float] = None, patience: int = 0) -> dict:
    """The benchmark's budgets: every baseline and residual ``kimg`` (default: the residual's),
    every view model and the oracle the views' largest ``total_kimg``; ``patience`` (checkpoints,
    0: off) stops every selection run on its validation G (`bootdiff.stopping.Patience`), and the
    model it selects for is then trained as long as it ran (`main_budget`). With patience the caps
    are raised by `raise_caps` once the bootstrap's compute is known."""
    k = float(kimg if kimg is not None else cfg.residual.train.total_kimg)
    view = max(float(v.train.total_kimg) for v in cfg.views.values())
    return {"full_res_kimg": k, "residual_kimg": k, "view_kimg": view, "oracle_kimg": view,
            "patience": int(patience)}


def raise_caps(b: dict) -> dict:
    """With early stopping (``b["patience"] > 0``) the full-res-only models are no longer held to
    the residual's kimg: the baselines and the oracle may train up to the bootstrap's whole
    training compute in their own network's steps (``baseline_kimg_at_bootstrap_compute``, from
    `peer_budgets`), and the oracle at least a view model's budget — so that no row can beat the
    baseline or the oracle because they were cut short. Without patience ``b`` is unchanged."""
    if b.get("patience", 0) <= 0:
        return b
    eq = float(b.get("baseline_kimg_at_bootstrap_compute", 0.0))
    return {**b, "full_res_kimg": max(b["full_res_kimg"], eq),
            "oracle_kimg": max(b["oracle_kimg"], b["residual_kimg"], eq, *(  # every peer setting's too
                v for k, v in b.items() if k.endswith("_kimg") and k[:-5].split("-")[0] in PEER_NAMES))}


def peers(cfg) -> List[str]:
    """The peer methods (`bootdiff.peers`) this config's views allow (`bootdiff.peers.available`)."""
    from bootdiff.peers import available

    return available(cfg)


def peer_budgets(cfg, manifest: dict, b: dict) -> dict:
    """Each peer's kimg at the bootstrap's training compute (`bootdiff.efficiency.compute`): the
    FLOPs of every view model (``view_kimg``) and of the residual (``residual_kimg``), divided by
    the peer's FLOPs per step (each ``peers.<peer>.grid`` setting's too, as ``<peer>-<key><value>_kimg``).
    Returns ``{"<peer>_kimg": k, "flops": {...}}``: the bootstrap's
    FLOPs by part, each peer's per step and in total, and the baseline's per step; and
    ``baseline_kimg_at_bootstrap_compute``, the baseline network's kimg at that compute (`raise_caps`)."""
    from bootdiff.efficiency import compute

    boot = compute.bootstrap_flops(cfg, manifest, b)
    ft = cfg.full_res.train
    flops = {"bootstrap": boot, "baseline_per_step": compute.view_step_flops(cfg, manifest, "full", cfg.full_res)}
    out = {"baseline_kimg_at_bootstrap_compute": compute.equal_compute_kimg(
        boot["total"], flops["baseline_per_step"], ft.batch_size, ft.accum_steps)}
    for peer in peers(cfg):
        for st in [{}] + [x for x in peer_settings(cfg, peer) if x]:  # a grid setting may cost otherwise per step
            name = setting_label(peer, st)
            per_step = compute.peer_step_flops(apply_setting(copy.deepcopy(cfg), peer, st), manifest, peer)
            kimg = compute.equal_compute_kimg(boot["total"], per_step, ft.batch_size, ft.accum_steps)
            out[f"{name}_kimg"] = kimg
            flops[f"{name}_per_step"] = per_step
            flops[name] = compute.steps(kimg, ft.batch_size, ft.accum_steps) * per_step
    return {**out, "flops": flops}


def with_budgets(cfg, b: dict):
    c = copy.deepcopy(to_object(cfg))
    c.full_res.train.total_kimg = b["full_res_kimg"]
    c.residual.train.total_kimg = b["residual_kimg"]
    return c


def jobs(plan: dict, cfg) -> List[dict]:
    """Every model of the benchmark as a job dict, in stages: 0, the view models and the selection
    runs of the baselines, peers and oracle (on N − v, scored on the v held back); 1, those models
    (each as long as its selection run trained, `main_budget`), the combined denoisers and the
    residuals' selection runs; 2, the bootstraps, whose μ and budget come from stage 1. ``select``
    names the selection run a model is stopped by."""
    from bootdiff.sweep import trial_list

    ds = plan["datasets"]
    out = [{"id": f"view-{v}", "kind": "view", "view": v, "data": "base", "stage": 0} for v in plan["views"]]
    out.append({"id": "select-oracle", "kind": "full_res", "data": "oracle-select", "stage": 0, "N": None,
                "quick": True})
    out.append({"id": "oracle", "kind": "full_res", "data": "oracle", "stage": 1, "N": None, "select": "select-oracle"})
    grid = [t for t in trial_list(cfg) if t["kind"] == "residual"]
    for n in plan["ns"]:
        out.append({"id": f"N{n}/select-baseline", "kind": "full_res", "data": f"N{n}-select", "stage": 0,
                    "N": n, "quick": True})
        out.append({"id": f"N{n}/baseline", "kind": "full_res", "data": f"N{n}", "stage": 1, "N": n,
                    "select": f"N{n}/select-baseline"})
        for peer in peers(cfg):  # one ordinary network on the same data, tuned and stopped on validation too
            ids = []
            for st in peer_settings(cfg, peer):  # `peers.<peer>.grid`: one selection run per value
                ids.append(f"N{n}/select-{setting_label(peer, st)}")
                out.append({"id": ids[-1], "kind": peer, "data": f"N{n}-select", "stage": 0, "N": n,
                            "quick": True, "peer_setting": st})
            out.append({"id": f"N{n}/{peer}", "kind": peer, "data": f"N{n}", "stage": 1, "N": n, "candidates": ids})
        out.append({"id": f"N{n}/combined", "kind": "combined", "data": f"N{n}", "stage": 1, "N": n})
        for t in grid:
            out.append({"id": f"N{n}/select-{t['label']}", "kind": "residual", "data": f"N{n}-select",
                        "stage": 1, "N": n, "trial": t, "quick": True})
        out.append({"id": f"N{n}/bootstrap", "kind": "residual", "data": f"N{n}", "stage": 2, "N": n})
    for j in out:
        j["cfg_yaml"] = ds[j["data"]]
    return out


def row_of(job: dict) -> str:
    """The benchmark row a job serves: ``oracle``, ``baseline``, ``combined``, ``bootstrap`` (the
    residual's selection runs and model), a peer's name, or ``views`` (needed by ``combined`` and
    ``bootstrap``)."""
    if job["kind"] == "view":
        return "views"
    if job["kind"] == "full_res":
        return "oracle" if job["N"] is None else "baseline"
    return "bootstrap" if job["kind"] == "residual" else job["kind"]


def row_names(cfg) -> List[str]:
    """The rows a ``--rows`` may name: ``oracle``, ``baseline``, ``combined``, ``bootstrap`` and each peer of ``cfg``."""
    return ["oracle", "baseline", "combined", "bootstrap", *peers(cfg)]


def only_rows(all_jobs: List[dict], rows) -> List[dict]:
    """The jobs of ``rows`` (`row_names`; None: every job), with the view models when a row needs
    them: e.g. ``["bootstrap"]`` for another seed of the bootstrap alone, its references
    (baselines, oracle, peers) read from a run that has them."""
    if rows is None:
        return all_jobs
    keep = set(rows) | ({"views"} if {"combined", "bootstrap"} & set(rows) else set())
    return [j for j in all_jobs if row_of(j) in keep]


def pick_candidate(job: dict, results: Dict[str, dict]) -> None:
    """A peer's setting (``job["candidates"]``, its selection runs, one per ``peers.<peer>.grid``
    value): the one with the lowest validation G (each at its own minimum, `best_val_G`) becomes
    the job's ``select`` and ``peer_setting``."""
    missing = [c for c in job["candidates"] if c not in results]
    if missing:
        raise RuntimeError(f"data-efficiency: {job['id']} needs {missing}, which have not finished")
    best = min(job["candidates"], key=lambda c: best_val_G(results[c]))
    job["select"], job["peer_setting"] = best, dict(results[best].get("peer_setting") or {})


def main_budget(job: dict, results: Dict[str, dict]) -> Optional[float]:
    """The kimg a model is trained for: as long as its selection run trained (``job["select"]``:
    to where patience stopped it, or to the cap), so that its own curve reaches its validation
    minimum and no further; None for jobs without one."""
    sel = job.get("select")
    if not sel:
        return None
    if sel not in results:
        raise RuntimeError(f"data-efficiency: {job['id']} needs {sel}, which has not finished")
    return float(results[sel]["kimg"])


def job_cfg(job: dict, b: dict):
    """The config a job trains with: the budgets ``b`` (the oracle's and the peers' own), patience
    on selection runs (their "test" split is the validation carve-out) but the oracle's, and a
    model's ``budget_kimg`` (`main_budget`) when its selection run set one. The oracle, the
    reference every row is measured against, trains to its cap (at least every row's compute) and
    is taken at its validation minimum: patience can end a run that still improves slowly, and a
    row must never beat the reference because the reference stopped early (on 12-06 patience 3
    stopped it at 33 of 149 kimg on a plateau, and the Ambient peer then beat it on test)."""
    from bootdiff.config import ExperimentConfig, from_yaml

    cfg = from_yaml(job["cfg_yaml"], ExperimentConfig)
    cfg = with_budgets(cfg, b)
    if job["id"] in ("oracle", "select-oracle"):
        cfg.full_res.train.total_kimg = b["oracle_kimg"]
    if job["kind"] in peers(cfg):
        key = setting_label(job["kind"], job.get("peer_setting") or {}) + "_kimg"
        if key not in b:
            raise RuntimeError(f"data-efficiency: no budget for {job['id']} (peer_budgets was not run)")
        cfg.full_res.train.total_kimg = b[key]
    if job["kind"] == "view":
        return cfg
    if job["kind"] in PEER_NAMES:
        apply_setting(cfg, job["kind"], job.get("peer_setting") or {})
    if job["kind"] == "finetune":  # the switch from the cap (before budget_kimg), no patience before it
        from bootdiff.config.grid import fix_finetune_schedule

        fix_finetune_schedule(cfg)
    tcfg = cfg.residual.train if job["kind"] == "residual" else cfg.full_res.train
    tcfg.patience = int(b.get("patience", 0)) if job.get("quick") and job["id"] != "select-oracle" else 0
    if job.get("budget_kimg") is not None:
        tcfg.total_kimg = float(job["budget_kimg"])
    return cfg


def best_val_G(row: dict) -> float:
    """A selection run's best validation G: the lowest over its checkpoints (the model is taken at
    its validation minimum, `bootdiff.efficiency.report.early_stopped`), its final G without a curve."""
    vals = [p["test_G"] for p in row.get("curve") or [] if p.get("test_G") is not None]
    return min(vals) if vals else row["test_G"]


def kimg_at_best(row: dict) -> float:
    """The kimg of a selection run's lowest validation G (its curve's "test" G on the carve-out);
    its last kimg without a curve."""
    curve = [p for p in row.get("curve") or [] if p.get("test_G") is not None]
    return min(curve, key=lambda p: p["test_G"])["kimg"] if curve else row.get("kimg")


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
        if name in ("base", "oracle", "oracle-select"):
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


def load_model(job: dict, cfg, manifest: dict, checkpoint: Optional[str]):
    """The EMA model of a finished job (the combined denoiser needs no checkpoint), loaded as the
    pipeline loads a sweep trial (`bootdiff.experiment.load_trial`); a peer is its own network
    (`bootdiff.peers.peer_training`, at the setting `job_cfg` applied) with the checkpoint's EMA weights."""
    if job["kind"] == "combined":
        return experiment.build_combined(cfg, manifest)
    if job["kind"] in PEER_NAMES:  # its own network (patchdiff's has coordinate channels), EMA weights
        from bootdiff.peers import load_peer

        return load_peer(cfg, manifest, {"kind": job["kind"], "checkpoint": checkpoint})
    kind = "full_res" if job["kind"] == "full_res" else "residual"
    return experiment.load_trial(cfg, manifest, {**(job.get("trial") or {}), "kind": kind, "checkpoint": checkpoint})


def evaluate_job(job: dict, b: dict, checkpoint: Optional[str], num_samples: int) -> dict:
    """Scores of a finished job's model (`load_model`), by `score_model`; a selection run
    (``quick``) gets G only."""
    cfg = job_cfg(job, b)
    manifest = experiment.read_manifest(cfg)
    D = load_model(job, cfg, manifest, checkpoint).to(util.compute_device())
    return score_model(cfg, manifest, D, num_samples, quick=bool(job.get("quick")))


def score_model(cfg, manifest: dict, D, num_samples: int, quick: bool = False) -> dict:
    """Scores of denoiser ``D``: test and train G (the manifest's fixed σ_data), and — unless
    ``quick`` — SWD to the test split (total and per pyramid level), memorisation rate and
    nearest-neighbour distance to its own training set of ``num_samples`` samples, the classifier's
    FD and confident share (labelled sources), FD when ``eval.features`` is set."""
    from bootdiff.evaluation.evaluate import sample_images
    from bootdiff.evaluation.scores import generalization
    from bootdiff.evaluation.metrics import memorization_rate, nearest_neighbour_distance, sliced_wasserstein_levels

    out = {"test_G": generalization(cfg, manifest, D, "test")["total"],
           "train_G": generalization(cfg, manifest, D, "full")["total"],
           "g_sigma_data": experiment.g_sigma_data(manifest)}
    if quick:
        return out
    cfg = copy.deepcopy(cfg)
    cfg.eval.num_images = num_samples
    samples = sample_images(cfg, D, experiment.full_shape(manifest), cfg.eval.seed)
    test_x = experiment.load_all(cfg, manifest, "test", cfg.eval.max_samples)
    train_x = experiment.load_all(cfg, manifest, "full", experiment.view_info(manifest, "full")["count"])
    swd = sliced_wasserstein_levels(samples, test_x)
    out.update(swd=swd["swd"], swd_levels=swd["per_level"], swd_resolutions=swd["resolutions"],
               memorization_rate=memorization_rate(samples, train_x),
               nn_distance_train=nearest_neighbour_distance(samples, train_x), num_samples=num_samples)
    from bootdiff.evaluation.classifier import label_quality

    out.update(label_quality(cfg, manifest, samples, test_x))  # classifier FD, confident share (labelled sources)
    feats = getattr(cfg.eval, "features", None)
    kind = str(getattr(getattr(feats, "kind", None), "value", getattr(feats, "kind", "none")))
    if feats is not None and kind != "none":
        from bootdiff.evaluation import fd

        net = fd.load_feature_network(kind, feats.path)
        out["fd"] = fd.fd_features(fd.features(net, samples, feats.batch_size),
                                   fd.features(net, test_x, feats.batch_size))
    return out
