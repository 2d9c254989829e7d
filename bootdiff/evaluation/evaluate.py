"""Stage 3: score and sample the sweep's best trial and the baselines; write the sweep report.

For the best residual trial (bootstrapped denoiser), the combined denoiser alone, the full-res
baseline and each view model alone: per-σ generalization error G on the held-out and the
training full-resolution sets (mean and 1−δ quantile, docs/METHOD.md §6; the held-out curve of a
model the sweep already scored on the test split — a trial at the checkpoint it is taken at, the
ensemble — is the sweep's, `bootdiff.evaluation.scores.reusable_curve`), samples with the
configured sampler (§7), and their sliced Wasserstein distance to held-out data (in total and per
pyramid level: Figure 1 of the paper as numbers — which model lacks fine detail, which lacks
coarse structure), memorisation rate and nearest-neighbour distance to the training set, and the
Fréchet distance to the test split in a local feature network when ``eval.features`` names one
(§8; `sample_quality`), and the training budget of each model (`budgets`: the full-res baseline
gets the bootstrapped model's kimg by default, `bootdiff.config.full_res_budget`). Writes
``report.html``, ``report.md``,
``trials.csv`` and ``summary.json`` to the run's report folder (`bootdiff.run.layout.RunLayout.report`)
and exports the bootstrapped model and the full-res baseline in diffusers format under
``models/``. Also the held-out/training G pair that the Ray jobs report at each checkpoint, and
the export of a finished view run. No Ray here: ``ray_jobs/evaluate.py`` runs `evaluate` as a Ray
task, and the metrics themselves are `bootdiff.evaluation.metrics`.
"""

from __future__ import annotations

import json
import math
from typing import Callable, Optional

import torch

from bootdiff import experiment, util
from bootdiff.config import VIDEO_SOURCES
from bootdiff.evaluation import fd
from bootdiff.evaluation.scores import generalization, reusable_curve
from bootdiff.run.layout import RunLayout
from bootdiff.sweep import num

TEST_KEY = "\0test split"  # the test split among the sets `decode_latents` decodes
ROW_METRICS = ("swd_test", "swd_fine", "swd_coarse", "fd", "classifier_fd", "confident_share", "memorization_rate",
               "nn_distance_train")

# ----------------------------------------------------------------------------- the procedure


def sample_images(cfg, D, shape, seed: int) -> torch.Tensor:
    """``cfg.eval.num_images`` samples of ``shape`` with the configured sampler, clamped to [-1, 1],
    drawn on ``D``'s device (noise from a CPU generator, so the same on any device), returned on the CPU."""
    from bootdiff.samplers import sample

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = sample(D, (cfg.eval.num_images, *shape), cfg.eval.sampler, generator=gen, device=util.module_device(D))
    return out.clamp(-1, 1).cpu()


def evaluate(cfg, cfg_yaml: str, outcome: dict, student: Optional[Callable] = None) -> dict:
    """Everything the report shows, from a sweep's ``outcome`` (``sweep.json``: ``trials`` rows
    and the ``best`` trial id); writes the report, ``summary.json`` and the exported models and
    returns the report's URLs (`bootdiff.evaluation.report.write_report`) with ``verdict``: the
    report's answer, whether the partial data helped (`bootdiff.evaluation.summary.verdict`).

    ``student(cfg, models, shape)``, when given, returns (a distilled student to score beside the
    others, or None; its sampling-step cost against the teacher's, or None): the pipeline passes
    `bootdiff.distill.student.student_entry`, so evaluation never imports the later stage."""
    from bootdiff.export import save_bootstrap_model, save_view_model
    from bootdiff.fusion import CombinedDenoiser
    from bootdiff.peers import load_peer
    from bootdiff.precond import EDMPrecond
    from bootdiff.memo import memoize_combined, memoized
    from bootdiff.evaluation.report import write_report
    from bootdiff.run.tb import read_runs

    layout = RunLayout.of(cfg)
    manifest = experiment.read_manifest(cfg)
    shape = experiment.full_shape(manifest)
    device = util.compute_device()  # this task's GPU when it was given one
    rows = {r["trial_id"]: r for r in outcome["trials"]}
    models, curves, samples = {}, {}, {}
    if outcome.get("best"):
        best = experiment.load_trial(cfg, manifest, rows[outcome["best"]])
        models["bootstrapped"] = best
        save_bootstrap_model(best, layout.model("bootstrap"))
    models["combined"] = experiment.build_combined(cfg, manifest)
    full = [r for r in outcome["trials"] if r["kind"] == "full_res" and r.get("checkpoint")]
    if full:
        models["full_res"] = experiment.load_trial(cfg, manifest, full[0])
        save_view_model(models["full_res"], layout.model("full_res"), cfg.full_res,
                        extra={"shape": list(shape)})
    for r in best_peers(outcome["trials"]):  # each peer of sweep.peers at its best setting on validation
        models[r["trial_id"]] = load_peer(cfg, manifest, r)
        if isinstance(models[r["trial_id"]], EDMPrecond):  # patchdiff's coordinate network has no diffusers twin
            save_view_model(models[r["trial_id"]], layout.model(r["trial_id"]), cfg.full_res,
                            extra={"shape": list(shape), "peer": r["kind"], "setting": r.get("setting")})
    ens = next((r for r in outcome["trials"] if r["kind"] == "ensemble"), None)
    if ens is not None:  # the best bootstrapped trial and the best peer, averaged (bootdiff.ensemble)
        from bootdiff.ensemble import load_ensemble

        members = {**models, outcome.get("best"): models.get("bootstrapped")}  # by trial id
        models["ensemble"] = load_ensemble(ens, {k: v for k, v in members.items() if v is not None})
    distilled, step_cost = student(cfg, models, shape) if student is not None else (None, None)
    if distilled is not None:
        models["student"] = distilled

    # the sweep's rows of the models it scored on the test split (their curves are reused)
    row_of = {"bootstrapped": rows.get(outcome.get("best")), "full_res": full[0] if full else None,
              "ensemble": ens, **{r["trial_id"]: r for r in best_peers(outcome["trials"])}}
    for name, D in models.items():
        print(f"[bootdiff] evaluating {name} ...", flush=True)
        D.to(device)
        boot = D.members[0] if name == "ensemble" else D  # the ensemble's bootstrapped member holds D_comb
        memo = memoized(D, layout.eval_cache) if name == "combined" else memoize_combined(boot, layout.eval_cache)
        scored = memo if name == "combined" else D
        # test G as the sweep computed it, for the same weights and settings (scores.reusable_curve)
        test = reusable_curve(cfg, manifest, row_of.get(name)) or generalization(cfg, manifest, scored, "test")
        train = generalization(cfg, manifest, scored, "full")
        if memo is not None:  # outputs the sweep computed for the same weights are reused
            memo.save()
            if name != "combined":
                boot.combined = memo.denoiser
        curves[name] = {"sigma": test["sigma"], "test_mean": test["mean"], "train_mean": train["mean"],
                        "test_quantile": test["quantile"]}
        samples[name] = sample_images(cfg, D, shape, cfg.eval.seed)

    for vm in experiment.load_view_models(cfg, manifest):
        vm.denoiser.to(device)
        vcfg = cfg.views[vm.name]
        if vcfg.kind == "downsample":  # sample the low-res model at its own size, show it lifted
            low = sample_images(cfg, vm.denoiser, experiment.view_sample_shape(manifest, vm.name), cfg.eval.seed)
            samples[f"{vm.name} only"] = vm.view.lift(low).clamp(-1, 1)
        else:  # local views alone: their mosaic at full resolution
            samples[f"{vm.name} only"] = sample_images(cfg, CombinedDenoiser([vm], fusion="average").eval(),
                                                       shape, cfg.eval.seed)

    n_ref = cfg.eval.max_samples
    test_x = experiment.load_all(cfg, manifest, "test", n_ref)
    train_x = experiment.load_all(cfg, manifest, "full", n_ref)
    pictures = decode_latents(manifest, {**samples, TEST_KEY: test_x})  # FD and SWD levels: on pictures
    test_pictures = pictures.pop(TEST_KEY)
    quality = sample_quality(cfg, samples, test_x, train_x, pictures, test_pictures)
    from bootdiff.evaluation.classifier import label_quality

    for name in samples:  # labelled sources: FD in a classifier's features, share confidently classified
        quality[name].update(label_quality(cfg, manifest, pictures[name], test_pictures))
    budget = budgets(cfg, manifest, outcome)
    trials = []
    for r in outcome["trials"]:
        row = dict(r)
        key = {"combined": "combined", "full_res": "full_res", "ensemble": "ensemble"}.get(r["kind"])
        key = key or ("bootstrapped" if r["trial_id"] == outcome.get("best") else r["trial_id"])
        if key in quality:
            row.update({k: v for k, v in quality[key].items() if k in ROW_METRICS})
        trials.append(row)
    roles = model_roles(cfg, manifest, samples)
    from bootdiff.evaluation.worth import benchmark_worth

    worth = benchmark_worth(cfg.eval.benchmark, budget["n_full"])  # a benchmark of the same data, if named
    fd_off = fd_note(cfg.eval.features, cfg.eval.num_images, len(test_x))
    urls = write_report(layout.report, trials, curves, pictures, cfg_yaml, manifest,
                        best_trial_id=outcome.get("best"), recommended=outcome.get("recommended"), worth=worth, title=f"bootdiff sweep report — {cfg.name}",
                        quality=quality, roles=roles, fd_note=fd_off, budget=budget,
                        training=read_runs(layout.tb, ("loss", "val_G", "test_G", "train_G")),
                        extra={"Distillation: sampling-step cost": step_cost} if step_cost else None)
    summary = {"best": outcome.get("best"), "recommended": recommended_model(outcome), "quality": quality, "budget_kimg": budget,
               "fd": {"kind": str(cfg.eval.features.kind), "path": cfg.eval.features.path, "note": fd_off},
               "total_G": {k: {"test": sum(v["test_mean"]) / len(v["test_mean"]),
                               "train": sum(v["train_mean"]) / len(v["train_mean"])} for k, v in curves.items()}}
    summary["verdict"] = urls["verdict"]  # the report's answer, for the console too
    if worth:
        summary["benchmark_worth"] = worth
    if step_cost:
        summary["distill_step_time"] = step_cost
    util.atomic_write_bytes(layout.summary, json.dumps(summary, indent=2, default=str).encode())
    return urls


def best_peers(trials) -> list:
    """The rows of ``trials`` the report scores for the peers (`bootdiff.peers`): per peer method,
    its trial with a checkpoint and the lowest validation G (its best grid setting), in trial order."""
    from bootdiff.peers import NAMES

    best = {}
    for r in trials:
        if r["kind"] in NAMES and r.get("checkpoint"):
            b = best.get(r["kind"])
            if b is None or num(r.get("val_G")) < num(b.get("val_G")) or not math.isfinite(num(b.get("val_G"))):
                best[r["kind"]] = r
    return [r for r in trials if r in best.values()]


def recommended_model(outcome: dict) -> Optional[dict]:
    """The summary's record of the sweep's recommended model (``sweep.json``'s ``recommended``,
    `bootdiff.sweep.recommend`): its trial id, kind, validation and test G, where it was taken, and
    the name of its sample set in the report (``bootstrapped`` for the best residual trial)."""
    rid = outcome.get("recommended")
    row = next((r for r in outcome["trials"] if r["trial_id"] == rid), None)
    if row is None:
        return None
    name = {"combined": "combined", "full_res": "full_res", "ensemble": "ensemble"}.get(row["kind"]) or \
        ("bootstrapped" if rid == outcome.get("best") else rid)
    return {"trial_id": rid, "kind": row["kind"], "val_G": num(row.get("val_G")), "test_G": num(row.get("test_G")),
            "chosen_kimg": num(row.get("chosen_kimg")), "samples": name}


def decode_latents(manifest: dict, samples: dict) -> dict:
    """Latent-space experiments: decode samples with the same local VAE for the report's
    pictures, FD and the SWD's pyramid levels (G, ``swd_test``, memorisation and nearest
    neighbours are measured in latent space, where the data lives); other experiments: a new dict
    of the same tensors."""
    latent = manifest.get("latent")
    if not latent:
        return dict(samples)
    from bootdiff.data.latent import decode, load_vae

    vae = load_vae(latent["vae_path"])
    print(f"[bootdiff] decoding latent samples with the VAE at {latent['vae_path']}", flush=True)
    with torch.no_grad():
        return {k: decode(vae, v, latent.get("scaling_factor")).clamp(-1, 1) for k, v in samples.items()}


# ----------------------------------------------------------------------------- sample quality


def _frames(x: torch.Tensor) -> torch.Tensor:
    """Videos ``[N, C, T, H, W]`` as their frames ``[N·T, C, H, W]``; images unchanged."""
    return x.transpose(1, 2).flatten(0, 1) if x.ndim == 5 else x


def frechet_distances(features_cfg, pictures: dict, reference: torch.Tensor, device=None) -> dict:
    """FD (docs/METHOD.md §8, `bootdiff.evaluation.fd`) of every picture set in ``pictures`` ({name: [-1, 1]
    images [N, C, H, W] or videos [N, C, T, H, W], scored frame by frame}) against ``reference``
    (the test split's pictures: decoded when the experiment is latent), in the feature network
    that ``features_cfg`` (`bootdiff.config.FeaturesConfig`) names; {} when its kind is none.
    The reference's features are computed once. Public for the data-efficiency benchmark."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    net = fd.load_feature_network(features_cfg.kind, features_cfg.path, device)
    if net is None:
        return {}
    bs = features_cfg.batch_size
    ref = fd.features(net, _frames(reference), bs)
    return {name: fd.fd_features(fd.features(net, _frames(x), bs), ref) for name, x in pictures.items()}


def sample_quality(cfg, samples: dict, test_x, train_x, pictures=None, test_pictures=None) -> dict:
    """Sample quality per model (docs/METHOD.md §8): {name: {swd_test, memorization_rate,
    nn_distance_train, swd_levels, swd_resolutions, swd_fine, swd_coarse, fd?}}.

    ``samples`` and ``test_x`` / ``train_x`` are in data space (latents for latent experiments),
    where ``swd_test``, memorisation and nearest neighbours are measured. ``pictures`` /
    ``test_pictures`` are the same sets as pictures (default: the samples themselves): the pyramid
    levels of the SWD (finest first; ``swd_fine`` / ``swd_coarse``: the finest and the coarsest,
    Figure 1 of the paper as numbers) and FD (when ``cfg.eval.features`` names a network) are
    measured on them. Public for the data-efficiency benchmark."""
    from bootdiff.evaluation.metrics import memorization_rate, nearest_neighbour_distance, sliced_wasserstein_levels

    same = pictures is None  # the pictures are the samples: one SWD computation serves both
    pictures = samples if same else pictures
    test_pictures = test_x if test_pictures is None else test_pictures
    quality = {}
    for name, s in samples.items():
        levels = sliced_wasserstein_levels(pictures[name], test_pictures)
        same_set = same or (pictures[name] is s and test_pictures is test_x)
        swd = levels["swd"] if same_set else sliced_wasserstein_levels(s, test_x)["swd"]
        quality[name] = {"swd_test": float(swd), "memorization_rate": float(memorization_rate(s, train_x)),
                         "nn_distance_train": float(nearest_neighbour_distance(s, train_x)),
                         "swd_levels": levels["per_level"], "swd_resolutions": levels["resolutions"],
                         "swd_fine": levels["per_level"][0], "swd_coarse": levels["per_level"][-1]}
    for name, value in frechet_distances(cfg.eval.features, pictures, test_pictures).items():
        quality[name]["fd"] = value
    return quality


def fd_note(features_cfg, n_samples: int, n_test: int) -> str:
    """The report's one line on FD: skipped (``eval.features.kind`` none), or how it was measured."""
    if str(features_cfg.kind) == "none":
        return fd.check_features_config(features_cfg)
    return (f"FD: {features_cfg.kind} features ({features_cfg.path}), {n_samples} samples per model against "
            f"{n_test} test images; few samples bias FD upwards: compare the models of this report with "
            f"each other, not with published figures.")


def model_roles(cfg, manifest: dict, samples: dict) -> dict:
    """{sample set: what its model was trained on}, for the report's Figure-1 table."""
    n = experiment.view_info(manifest, "full")["count"]
    roles = {"combined": "the view models fused, no full-res training",
             "bootstrapped": f"the view models + a residual on the {n} full-res samples",
             "full_res": f"the {n} full-res samples alone",
             "student": "one network distilled from the bootstrapped model",
             "ensemble": "the bootstrapped model and the best peer, averaged (weight chosen on validation G)"}
    for name in samples:
        kind = str(name).split("-")[0]
        if kind in ("ambient", "finetune", "patchdiff") and name not in roles:
            roles[name] = peer_role(cfg, kind, n)
    for name, v in cfg.views.items():
        what = {"downsample": f"×{v.factor} downsampled copies", "patch": f"{v.patch_size} px patches",
                "clean_patch": f"clean {v.patch_size} px patches", "clip": f"{v.clip_len}-frame clips"}
        roles[f"{name} only"] = f"{what.get(str(v.kind), f'{v.kind} views')} alone"
    return {k: v for k, v in roles.items() if k in samples}


def peer_role(cfg, kind: str, n: int) -> str:
    """What peer ``kind`` (`bootdiff.peers`) trained on, naming the views it used."""
    from bootdiff.config.peer_views import pick_view

    p = cfg.peers
    if kind == "ambient":
        low, crop = pick_view(cfg, "downsample", p.ambient.low_view), pick_view(cfg, "patch", p.ambient.crop_view)
        return (f"one network: the {n} full-res samples at every σ, the {low} view's copies lifted at high σ, "
                f"the {crop} view's crops at low σ (Ambient Omni)")
    if kind == "finetune":
        low = pick_view(cfg, "downsample", p.finetune.low_view, "peers.finetune.low_view")
        return f"one network pre-trained on the {low} view's copies lifted, fine-tuned on the {n} full-res samples"
    patch = pick_view(cfg, "patch", p.patchdiff.patch_view, "peers.patchdiff.patch_view")
    return (f"one network with coordinate channels on crops of the {n} full-res samples, the {patch} view's "
            f"patches and whole images (Patch Diffusion)")


def _kimg(row) -> Optional[float]:
    x = num(row.get("kimg")) if row else math.nan
    return x if math.isfinite(x) else None


def budgets(cfg, manifest: dict, outcome: dict) -> dict:
    """The training budgets (kimg) the report states side by side: each view model's and the
    residual's (the bootstrapped model stands on their sum) and the full-res baseline's, as
    configured and as the sweep's rows (``outcome``: ``sweep.json``) say they trained
    (``*_trained``: None when unknown), the baseline's (and peers') early-stopping patience
    (``patience``, checkpoints; 0: none, then its budget is not a cap), and what each peer the report
    scores trained (``peers``: {trial id: kimg}; their cap is the full-res baseline's), the baseline's
    non-leaking augmentation (``augment``; ``augmentable``: False for video, which takes none). An
    early-stopped view (``views_early_stopped``) counts the kimg it trained, from its ``view-<v>.json``."""
    rows = {r["trial_id"]: r for r in outcome["trials"]}
    full = next((r for r in outcome["trials"] if r["kind"] == "full_res"), None)
    views, stopped = {n: float(v.train.total_kimg) for n, v in cfg.views.items()}, []
    for n in views:
        url = RunLayout.of(cfg).view_run_info(n)
        es = json.loads(util.read_bytes(url)).get("early_stopping") if util.exists(url) else None
        if es:
            views[n] = float(es["stopped_kimg"])
            stopped.append(n)
    return {"n_full": int(experiment.view_info(manifest, "full")["count"]), "views": views,
            "views_early_stopped": stopped,
            "residual": float(cfg.residual.train.total_kimg),
            "bootstrapped": float(sum(views.values()) + cfg.residual.train.total_kimg),
            "full_res": float(cfg.full_res.train.total_kimg), "full_res_trained": _kimg(full),
            "patience": int(cfg.full_res.train.patience),
            "augment": float(cfg.full_res.train.augment), "augmentable": cfg.data.source.kind not in VIDEO_SOURCES,
            "residual_trained": _kimg(rows.get(outcome.get("best"))),
            "peers": {r["trial_id"]: _kimg(r) for r in best_peers(outcome["trials"])}}
