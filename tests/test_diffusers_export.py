"""The student as a diffusers pipeline (`bootdiff.distill.export`): the folder loads with plain
``DiffusionPipeline.from_pretrained``, samples, and matches bootdiff's own Heun sampler on the same
model for the same initial noise and σ schedule; the scheduler's preconditioning is bootdiff's."""

import json
import os

import pytest
import torch
from diffusers import DiffusionPipeline, EDMEulerScheduler

from bootdiff.config import NetConfig, SamplerConfig
from bootdiff.distill.export import PIPELINE_FILE, save_pipeline
from bootdiff.nets import make_net
from bootdiff.precond import EDMPrecond, edm_coefficients
from bootdiff.samplers import sample

torch.set_num_threads(1)
TINY = NetConfig(kind="unet2d", channels=[8, 16], attention=[False, True], norm_groups=4, time_scale=250.0)
# Stated tolerance: the pipeline and bootdiff's sampler agree to 1e-4 in model units ([-1, 1] pixels)
# (float32 σ schedule in the scheduler vs float64 in bootdiff; measured difference here: 0).
TOL = 1e-4


def _student(seed=0, sigma_data=0.6):
    net = make_net(TINY, 1, 1, 16, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # randomise every weight (zero-initialised layers too): a non-trivial F
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return EDMPrecond(net, sigma_data).eval()


def test_scheduler_preconditioning_is_bootdiffs():
    sd = 0.37
    sched = EDMEulerScheduler(sigma_data=sd, prediction_type="epsilon")
    sigma = torch.tensor([0.002, 0.05, 0.7, 3.0, 80.0])
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, sd)
    x, F = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(sched.precondition_inputs(x, sigma), c_in * x)
    torch.testing.assert_close(sched.precondition_noise(sigma), c_noise)
    torch.testing.assert_close(sched.precondition_outputs(x, F, sigma), c_skip * x + c_out * F)


def test_pipeline_round_trip_matches_bootdiff_heun(tmp_path):
    student = _student()
    sampler = SamplerConfig(steps=5, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    url = save_pipeline(student, str(tmp_path / "pipe"), sampler)
    index = json.load(open(os.path.join(url, "model_index.json")))
    assert index["_class_name"] == ["bootdiff_pipeline", "BootdiffEDMPipeline"]
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "EDMEulerScheduler"]
    assert os.path.isfile(os.path.join(url, PIPELINE_FILE)) and os.path.isfile(os.path.join(url, "COMPLETE"))

    pipe = DiffusionPipeline.from_pretrained(url, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "BootdiffEDMPipeline"
    assert abs(pipe.scheduler.config.sigma_data - 0.6) < 1e-7 and pipe.config.time_scale == 250.0

    images = pipe(batch_size=3, num_inference_steps=5).images  # the README's three lines
    assert len(images) == 3 and images[0].size == (16, 16) and images[0].mode == "L"

    z = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    ours = sample(student, (4, 1, 16, 16), sampler, latents=z)  # Heun (EDM Alg. 1), same schedule
    theirs = pipe(latents=z, num_inference_steps=5, output_type="latent").images
    assert ours.abs().max() > 0.5  # a non-trivial comparison
    assert (theirs - ours).abs().max() < TOL
    pt = pipe(latents=z, num_inference_steps=5, output_type="pt").images
    torch.testing.assert_close(pt, (ours / 2 + 0.5).clamp(0, 1), atol=TOL, rtol=0)
    euler = pipe(latents=z, num_inference_steps=5, output_type="latent", heun=False).images
    assert torch.isfinite(euler).all() and (euler - ours).abs().max() > 10 * TOL  # first order differs


def test_export_refuses_what_diffusers_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="trust_remote_code"):  # diffusers runs a folder's code only when asked
        url = save_pipeline(_student(), str(tmp_path / "p"), SamplerConfig(steps=3))
        DiffusionPipeline.from_pretrained(url)
    video = EDMPrecond(make_net(NetConfig(kind="video", channels=[8], attention=[False], norm_groups=4),
                                1, 1, 8, video=True), 0.5)
    with pytest.raises(ValueError, match="UNet2DModel"):
        save_pipeline(video, str(tmp_path / "v"), SamplerConfig())
    with pytest.raises(ValueError, match="schedule"):
        save_pipeline(_student(), str(tmp_path / "s"), SamplerConfig(schedule="ve"))
    assert not os.path.exists(tmp_path / "v") and not os.path.exists(tmp_path / "s")


def test_pipeline_on_s3_is_the_whole_folder(s3, tmp_path):
    """On ``s3://`` the folder arrives whole — its ``unet/`` and ``scheduler/`` subfolders too
    (`util.atomic_dir` once uploaded only the top-level files: a pipeline that did not load) —
    and a second export replaces the first rather than mixing with it."""
    from bootdiff.util import url_fs

    bucket, _ = s3
    url = f"{bucket}/export-{os.getpid()}/diffusers"
    fs, path = url_fs(url)
    fs.makedirs(f"{path}/unet", exist_ok=True)
    with fs.open(f"{path}/unet/stale.bin", "wb") as f:  # left by an earlier export
        f.write(b"old")
    save_pipeline(_student(), url, SamplerConfig(steps=3))
    fs.invalidate_cache()
    rel = sorted(p[len(path) + 1:] for p in fs.find(path))
    assert {"COMPLETE", "model_index.json", PIPELINE_FILE, "unet/config.json",
            "scheduler/scheduler_config.json"} <= set(rel) and "unet/stale.bin" not in rel, rel
    local = tmp_path / "copy"
    fs.get(path, str(local), recursive=True)
    pipe = DiffusionPipeline.from_pretrained(str(local), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 1)
