"""Stage 3: score and sample the sweep's best trial and the baselines; write the sweep report.

For the best residual trial (bootstrapped denoiser), the combined denoiser alone, the full-res
baseline and each view model alone: per-σ generalization error G on the held-out and the
training full-resolution sets (mean and 1−δ quantile, docs/METHOD.md §6), samples with the
configured sampler (§7), and their sliced Wasserstein distance to held-out data, memorisation rate
and nearest-neighbour distance to the training set (§8). Writes ``report.html``, ``report.md``,
``trials.csv`` and ``summary.json`` to the run's report folder (`bootdiff.layout.RunLayout.report`)
and exports the bootstrapped model and the full-res baseline in diffusers format under
``models/``. Also the held-out/training G pair that the Ray jobs report at each checkpoint, and
the export of a finished view run. No Ray here: ``ray_jobs/evaluate.py`` runs `evaluate` as a Ray
task, and the metrics themselves are `bootdiff.metrics`.
"""

from __future__ import annotations

import copy
import json
from typing import Tuple

import torch

from bootdiff import experiment, util
from bootdiff.layout import RunLayout
from bootdiff.sweep import trial_residual_config

# ----------------------------------------------------------------------------- G at checkpoints


def generalization_pair(cfg, manifest: dict, D) -> Tuple[dict, dict]:
    """G of ``D`` on the held-out ``test`` split and on the scarce training split ``full``
    (docs/METHOD.md §6): their gap is the over-fitting the sweep is after."""
    return (experiment.generalization(cfg, manifest, D, "test"),
            experiment.generalization(cfg, manifest, D, "full"))


def evaluate_checkpoint(cfg, manifest: dict, model, checkpoint_url: str) -> dict:
    """``test_G``, ``train_G`` and ``kimg`` of a checkpoint's EMA weights, loaded into a CPU copy
    of ``model`` (the training run's own model is left untouched)."""
    from bootdiff.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint_url)
    ema = experiment.ema_model(copy.deepcopy(model).cpu(), state)
    test, train = generalization_pair(cfg, manifest, ema)
    return {"test_G": test["total"], "train_G": train["total"], "kimg": state["nimg"] / 1000}


# ----------------------------------------------------------------------------- trained models


def load_run(cfg, manifest: dict, run: str, checkpoint: str):
    """(EMA model, checkpoint state) of a view-model run (a view, or ``"full_res"``) from one of
    its checkpoints (a URL, or a path as Ray reports it)."""
    from bootdiff.checkpoint import load_checkpoint

    vcfg, split = experiment.run_split(cfg, run)
    info = experiment.view_info(manifest, split)
    model = experiment.build_view_denoiser(vcfg, info["shape"], float(info["sigma_data"]))
    state = load_checkpoint(RunLayout.of(cfg).url(checkpoint))
    return experiment.ema_model(model, state), state


def load_trial(cfg, manifest: dict, row: dict):
    """The trained model of a sweep trial (a ``sweep.json`` row with a checkpoint), EMA weights.

    A residual trial's model is built without fitting anything and takes its fitted constants
    (fusion weights, r(σ)) from the checkpoint, so loading never re-estimates them."""
    if row["kind"] == "full_res":
        return load_run(cfg, manifest, "full_res", row["checkpoint"])[0]
    from bootdiff.checkpoint import load_checkpoint

    state = load_checkpoint(RunLayout.of(cfg).url(row["checkpoint"]))
    model = experiment.build_bootstrap(cfg, manifest, trial_residual_config(cfg, row))
    return experiment.ema_model(model, state)


def export_result(cfg, view: str, checkpoint_path: str) -> str:
    """Export a view run's checkpoint (EMA weights) to ``models/<view>`` in diffusers format."""
    from bootdiff.export import save_view_model

    manifest = experiment.read_manifest(cfg)
    vcfg, split = experiment.run_split(cfg, view)
    model, state = load_run(cfg, manifest, view, checkpoint_path)
    url = RunLayout.of(cfg).model(view)
    save_view_model(model, url, vcfg, extra={"shape": list(experiment.view_sample_shape(manifest, split)),
                                             "step": state.get("step"), "kimg": state.get("kimg"),
                                             "checkpoint": checkpoint_path})
    return url


# ----------------------------------------------------------------------------- the procedure


def sample_images(cfg, D, shape, seed: int) -> torch.Tensor:
    """``cfg.eval.num_images`` samples of ``shape`` with the configured sampler, clamped to [-1, 1]."""
    from bootdiff.samplers import sample

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return sample(D, (cfg.eval.num_images, *shape), cfg.eval.sampler, generator=gen).clamp(-1, 1)


def evaluate(cfg, cfg_yaml: str, outcome: dict) -> dict:
    """Everything the report shows, from a sweep's ``outcome`` (``sweep.json``: ``trials`` rows
    and the ``best`` trial id); writes the report, ``summary.json`` and the exported models and
    returns the report's URLs (`bootdiff.report.write_report`)."""
    from bootdiff.export import save_bootstrap_model, save_view_model
    from bootdiff.fusion import CombinedDenoiser
    from bootdiff.metrics import memorization_rate, nearest_neighbour_distance, sliced_wasserstein
    from bootdiff.report import write_report

    layout = RunLayout.of(cfg)
    manifest = experiment.read_manifest(cfg)
    shape = experiment.full_shape(manifest)
    rows = {r["trial_id"]: r for r in outcome["trials"]}
    models, curves, samples = {}, {}, {}
    if outcome.get("best"):
        best = load_trial(cfg, manifest, rows[outcome["best"]])
        models["bootstrapped"] = best
        save_bootstrap_model(best, layout.model("bootstrap"))
    models["combined"] = experiment.build_combined(cfg, manifest)
    full = [r for r in outcome["trials"] if r["kind"] == "full_res" and r.get("checkpoint")]
    if full:
        models["full_res"] = load_trial(cfg, manifest, full[0])
        save_view_model(models["full_res"], layout.model("full_res"), cfg.full_res,
                        extra={"shape": list(shape)})

    for name, D in models.items():
        print(f"[bootdiff] evaluating {name} ...", flush=True)
        test, train = generalization_pair(cfg, manifest, D)
        curves[name] = {"sigma": test["sigma"], "test_mean": test["mean"], "train_mean": train["mean"],
                        "test_quantile": test["quantile"]}
        samples[name] = sample_images(cfg, D, shape, cfg.eval.seed)

    for vm in experiment.load_view_models(cfg, manifest):
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
    quality = {}
    for name, s in samples.items():
        quality[name] = {"swd_test": float(sliced_wasserstein(s, test_x)),
                         "memorization_rate": float(memorization_rate(s, train_x)),
                         "nn_distance_train": float(nearest_neighbour_distance(s, train_x))}
    trials = []
    for r in outcome["trials"]:
        row = dict(r)
        key = {"combined": "combined", "full_res": "full_res"}.get(r["kind"])
        key = key or ("bootstrapped" if r["trial_id"] == outcome.get("best") else None)
        if key in quality:
            row.update(quality[key])
        trials.append(row)
    pictures = decode_latents(manifest, samples)
    urls = write_report(layout.report, trials, curves, pictures, cfg_yaml, manifest,
                        best_trial_id=outcome.get("best"), title=f"bootdiff sweep report — {cfg.name}",
                        extra={"sample quality": quality})
    summary = {"best": outcome.get("best"), "quality": quality,
               "total_G": {k: {"test": sum(v["test_mean"]) / len(v["test_mean"]),
                               "train": sum(v["train_mean"]) / len(v["train_mean"])} for k, v in curves.items()}}
    util.atomic_write_bytes(layout.summary, json.dumps(summary, indent=2, default=str).encode())
    return urls


def decode_latents(manifest: dict, samples: dict) -> dict:
    """Latent-space experiments: decode samples with the same local VAE for the report's
    pictures (scores above are computed in latent space, where the data lives)."""
    latent = manifest.get("latent")
    if not latent:
        return samples
    from bootdiff.data.latent import decode, load_vae

    vae = load_vae(latent["vae_path"])
    print(f"[bootdiff] decoding latent samples with the VAE at {latent['vae_path']}", flush=True)
    with torch.no_grad():
        return {k: decode(vae, v, latent.get("scaling_factor")).clamp(-1, 1) for k, v in samples.items()}
