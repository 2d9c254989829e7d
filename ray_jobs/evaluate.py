"""Stage 3: score and sample the sweep's best trial and the baselines; write the sweep report.

    python -m ray_jobs.evaluate --config configs/quickstart.yaml [key=value ...]

For the best residual trial (bootstrapped denoiser), the combined denoiser alone, the full-res
baseline and each view model alone: per-σ generalization error on the held-out and training
full-resolution sets (mean and 1−δ quantile), samples with the configured sampler, sliced
Wasserstein distance to held-out data, memorisation rate and nearest-neighbour distance to the
training set. Writes ``report.html`` (self-contained), ``report.md`` and ``trials.csv`` to
``{storage}/{name}/sweep/report/`` and exports the bootstrapped model and the full-res baseline
in diffusers format under ``models/``. Runs as one Ray task (on a GPU when
``eval`` asks for one through the trial resources), or in-process without Ray.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from bootdiff import experiment, util
from ray_jobs import common


def _load_trial(cfg, manifest, row):
    from bootdiff.checkpoint import load_checkpoint

    state = load_checkpoint(common.storage_url(cfg, row["checkpoint"]))
    if row["kind"] == "full_res":
        info = experiment.view_info(manifest, "full")
        model = experiment.build_view_denoiser(cfg.full_res, info["shape"], float(info["sigma_data"]))
    else:
        model, _ = experiment.build_bootstrap(cfg, manifest, experiment.trial_residual_config(cfg, row))
    return experiment.ema_model(model, state)


def _samples(cfg, D, shape, seed: int):
    from bootdiff.samplers import sample

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return sample(D, (cfg.eval.num_images, *shape), cfg.eval.sampler, generator=gen).clamp(-1, 1)


def evaluate(cfg, cfg_yaml: str, outcome: dict) -> dict:
    """Everything the report shows; writes the report and the exported models. No Ray needed."""
    from bootdiff.bootstrap import CombinedDenoiser
    from bootdiff.evaluate import memorization_rate, nearest_neighbour_distance, sliced_wasserstein
    from bootdiff.export import save_bootstrap_model, save_view_model
    from bootdiff.report import write_report

    manifest = experiment.read_manifest(cfg)
    shape = experiment.full_shape(manifest)
    rows = {r["trial_id"]: r for r in outcome["trials"]}
    models, curves, samples = {}, {}, {}
    if outcome.get("best"):
        best = _load_trial(cfg, manifest, rows[outcome["best"]])
        models["bootstrapped"] = best
        save_bootstrap_model(best, experiment.model_url(cfg, "bootstrap"))
    combined = experiment.build_combined(cfg, manifest)
    models["combined"] = combined
    full = [r for r in outcome["trials"] if r["kind"] == "full_res" and r.get("checkpoint")]
    if full:
        models["full_res"] = _load_trial(cfg, manifest, full[0])
        save_view_model(models["full_res"], experiment.model_url(cfg, "full_res"), cfg.full_res,
                        extra={"shape": list(shape)})

    for name, D in models.items():
        print(f"[bootdiff] evaluating {name} ...", flush=True)
        test = experiment.generalization(cfg, manifest, D, "test")
        train = experiment.generalization(cfg, manifest, D, "full")
        curves[name] = {"sigma": test["sigma"], "test_mean": test["mean"], "train_mean": train["mean"],
                        "test_quantile": test["quantile"]}
        samples[name] = _samples(cfg, D, shape, cfg.eval.seed)

    for vm in experiment.load_view_models(cfg, manifest):
        vcfg = cfg.views[vm.name]
        if vcfg.kind == "downsample":  # sample the low-res model at its own size, show it lifted
            low = _samples(cfg, vm.denoiser, experiment.view_sample_shape(manifest, vm.name), cfg.eval.seed)
            samples[f"{vm.name} only"] = vm.view.lift(low).clamp(-1, 1)
        else:  # local views alone: their mosaic at full resolution
            samples[f"{vm.name} only"] = _samples(cfg, CombinedDenoiser([vm], fusion="average").eval(), shape, cfg.eval.seed)

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
    pictures = _decode_latents(cfg, manifest, samples)
    urls = write_report(experiment.report_root(cfg), trials, curves, pictures, cfg_yaml, manifest,
                        best_trial_id=outcome.get("best"), title=f"bootdiff sweep report — {cfg.name}",
                        extra={"sample quality": quality})
    common.write_json(util.join(experiment.report_root(cfg), "summary.json"),
                      {"best": outcome.get("best"), "quality": quality,
                       "total_G": {k: {"test": sum(v["test_mean"]) / len(v["test_mean"]),
                                       "train": sum(v["train_mean"]) / len(v["train_mean"])} for k, v in curves.items()}})
    return urls


def _decode_latents(cfg, manifest, samples: dict) -> dict:
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


def report_done(cfg) -> bool:
    return util.exists(util.join(experiment.report_root(cfg), "summary.json"))


def run(cfg, cfg_yaml: str, outcome: dict) -> dict:
    """Evaluate as one Ray task (resources as a sweep trial's), and return the report's URLs."""
    ray = common.init_ray(cfg)
    opts = {"num_cpus": cfg.sweep.trial_cpus, "num_gpus": cfg.sweep.trial_gpus}
    if cfg.sweep.trial_resources:
        opts["resources"] = dict(cfg.sweep.trial_resources)
    urls = ray.get(ray.remote(**opts)(evaluate).remote(cfg, cfg_yaml, outcome))
    print(f"[bootdiff] report: {urls.get('html')}", flush=True)
    return urls


def main(argv=None) -> int:
    from ray_jobs.sweep_residual import sweep_done

    cfg, cfg_yaml = common.parse_args(argv, __doc__)
    if not sweep_done(cfg):
        raise SystemExit(f"no finished sweep at {experiment.sweep_root(cfg)}: run ray_jobs.sweep_residual first")
    urls = run(cfg, cfg_yaml, common.read_json(util.join(experiment.sweep_root(cfg), "sweep.json")))
    print(json.dumps(urls))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
