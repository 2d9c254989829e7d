"""Export the distilled student as a diffusers pipeline folder (docs/METHOD.md §9).

``save_pipeline(student, url, sampler_cfg)`` writes, atomically (`bootdiff.util.atomic_dir`,
``COMPLETE`` last):

    model_index.json        {"_class_name": ["bootdiff_pipeline", "BootdiffEDMPipeline"], "time_scale": …,
                             "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers", "EDMEulerScheduler"]}
    bootdiff_pipeline.py    the pipeline class (`bootdiff.distill.pipeline`, torch + diffusers only)
    unet/                   the student's raw network F, a plain ``UNet2DModel``
    scheduler/              ``EDMEulerScheduler(sigma_data=σ_d, sigma_min, sigma_max, rho)``: Karras σ schedule

Loading, with nothing but diffusers installed::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(path, trust_remote_code=True)
    images = pipe(batch_size=4, num_inference_steps=18).images

How diffusers (0.42) finds the class: ``DiffusionPipeline.from_pretrained`` reads
``model_index.json``; a plain ``_class_name`` string must name a class of the ``diffusers``
module itself (``pipeline_loading_utils._get_pipeline_class``: ``getattr(diffusers, name)``). A
``[module, class]`` pair whose ``module.py`` lies in the folder is loaded from that file
(``_resolve_custom_pipeline_and_cls``) — no ``custom_pipeline=`` argument needed — but diffusers
executes a folder's own code only with ``trust_remote_code=True``
(``dynamic_modules_utils.get_cached_module_file`` raises otherwise, for local folders too). No
pipeline in diffusers fits: ``DDPMPipeline`` and the like feed the U-Net the raw sample and an
integer timestep, without c_in, the σ_max start or ``time_scale``. So the fewest extra arguments
are that one flag. With bootdiff installed, ``BootdiffEDMPipeline.from_pretrained(path)``
(`bootdiff.distill.pipeline`) needs none.

Preconditioning: bootdiff's `EDMPrecond` and the scheduler agree term by term — c_in, c_skip,
c_out (``prediction_type="epsilon"``) and ``c_noise = ¼ ln σ`` (bootdiff: ``ln(σ)/4``); the
U-Net's timestep is ``time_scale · c_noise`` in both (the pipeline's ``time_scale``). The
exported scheduler uses the Karras (EDM) schedule of ``sampler_cfg`` (σ_min, σ_max, ρ); the
pipeline's ``num_inference_steps`` is bootdiff's ``eval.sampler.steps``.
"""

from __future__ import annotations

import json
import os
import shutil

from bootdiff import util

PIPELINE_FILE = "bootdiff_pipeline.py"
PIPELINE_CLASS = "BootdiffEDMPipeline"


def make_pipeline(student, sampler_cfg):
    """The in-memory `BootdiffEDMPipeline` of an `EDMPrecond` student whose net is an ``ImageUNet``."""
    from diffusers import EDMEulerScheduler

    from bootdiff.distill.pipeline import BootdiffEDMPipeline
    from bootdiff.nets import ImageUNet

    if not isinstance(student.net, ImageUNet):
        raise ValueError(f"diffusers export: the student's net is a {type(student.net).__name__}; only a "
                         "UNet2DModel (distill.net.kind: unet2d) exports as a diffusers pipeline")
    if str(getattr(sampler_cfg.schedule, "value", sampler_cfg.schedule)) != "edm":
        raise ValueError(f"diffusers export: eval.sampler.schedule={sampler_cfg.schedule}: EDMEulerScheduler "
                         "has the Karras (edm) schedule only")
    scheduler = EDMEulerScheduler(sigma_min=float(sampler_cfg.sigma_min), sigma_max=float(sampler_cfg.sigma_max),
                                  sigma_data=float(student.sigma_data), sigma_schedule="karras",
                                  rho=float(sampler_cfg.rho), prediction_type="epsilon", final_sigmas_type="zero")
    return BootdiffEDMPipeline(unet=student.net.unet, scheduler=scheduler, time_scale=student.net.time_scale)


def save_pipeline(student, url: str, sampler_cfg) -> str:
    """Write the student as a diffusers pipeline folder at ``url`` (see the module docstring)."""
    from bootdiff.distill import pipeline as diffusers_pipeline

    pipe = make_pipeline(student, sampler_cfg)
    with util.atomic_dir(str(url)) as stage:
        pipe.save_pretrained(stage, safe_serialization=True)
        index_path = os.path.join(stage, "model_index.json")
        with open(index_path) as f:
            index = json.load(f)
        index["_class_name"] = [os.path.splitext(PIPELINE_FILE)[0], PIPELINE_CLASS]
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        shutil.copyfile(diffusers_pipeline.__file__, os.path.join(stage, PIPELINE_FILE))
    return str(url)
