"""A diffusers pipeline for an EDM-preconditioned ``UNet2DModel`` (bootdiff's distilled student).

This file imports only torch and diffusers: `bootdiff.distill.export.save_pipeline` copies it
into the exported folder as ``bootdiff_pipeline.py`` and names it in ``model_index.json``
(``"_class_name": ["bootdiff_pipeline", "BootdiffEDMPipeline"]``), so anyone with diffusers loads
the folder without bootdiff::

    pipe = DiffusionPipeline.from_pretrained(path, trust_remote_code=True)
    images = pipe(batch_size=4, num_inference_steps=18).images

Components: ``unet`` (a plain ``UNet2DModel``: the raw network F) and ``scheduler`` (diffusers'
``EDMEulerScheduler``, holding σ_data, σ_min, σ_max, ρ). The preconditioning is the scheduler's
(Karras et al. 2022, Table 1): ``c_in = 1/√(σ²+σ_d²)`` (``precondition_inputs``),
``c_noise = ¼·ln σ`` (``precondition_noise``: the scheduler's ``timesteps``),
``c_skip = σ_d²/(σ²+σ_d²)``, ``c_out = σσ_d/√(σ²+σ_d²)`` (``precondition_outputs``,
``prediction_type="epsilon"``) — exactly bootdiff's (`bootdiff.precond.edm_coefficients`). The
one addition is ``time_scale`` (pipeline config): the U-Net's timestep is ``time_scale · c_noise``,
as in `bootdiff.nets.ImageUNet`.

Sampling is EDM's deterministic sampler on the scheduler's Karras σ schedule, started from
``σ_max · N(0, I)``: each step is the scheduler's Euler ``step``; with ``heun=True`` (default)
the step is corrected with the derivative at the next σ (EDM Algorithm 1, second order, none on
the last step to σ = 0), which is bootdiff's Heun sampler (`bootdiff.samplers.heun_sampler` with
``S_churn = 0``). ``heun=False`` is plain ``EDMEulerScheduler`` sampling.
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch
from diffusers import DiffusionPipeline, EDMEulerScheduler, ImagePipelineOutput, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor


class BootdiffEDMPipeline(DiffusionPipeline):
    """Unconditional EDM sampling with an EDM-preconditioned ``UNet2DModel`` (see the module docstring)."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: EDMEulerScheduler, time_scale: float = 250.0):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(time_scale=float(time_scale))

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``D(x; σ) = c_skip·x + c_out·F(c_in·x; time_scale·c_noise)`` with the scheduler's coefficients."""
        sched = self.scheduler
        t = sched.precondition_noise(sigma.reshape(1).to(torch.float32)) * self.config.time_scale
        out = self.unet(sched.precondition_inputs(x, sigma).to(self.unet.dtype), t.to(x.device)).sample
        return sched.precondition_outputs(x, out.to(torch.float32), sigma)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int = 18,
                 generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
                 latents: Optional[torch.Tensor] = None, heun: bool = True, output_type: str = "pil",
                 return_dict: bool = True):
        """Draw ``batch_size`` samples in ``num_inference_steps`` σ levels (+ the final σ = 0).

        ``latents``: standard-normal starting noise ``[N, C, H, W]`` (scaled by σ_max here); by
        default drawn with ``generator``. ``output_type``: ``"pil"``, ``"np"`` (``[N, H, W, C]`` in
        [0, 1]), ``"pt"`` (``[N, C, H, W]`` in [0, 1]) or ``"latent"`` (the raw sample in model
        units, [-1, 1] for pixels, unclamped)."""
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, self.unet.config.in_channels, *size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        sched = self.scheduler
        sched.set_timesteps(num_inference_steps, device=self.device)
        sigmas = sched.sigmas.to(self.device)
        x = latents.to(self.device, torch.float32) * sigmas[0]
        for i, t in enumerate(self.progress_bar(sched.timesteps)):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            x_in = sched.scale_model_input(x, t)  # c_in·x
            tt = (t * self.config.time_scale).reshape(1)
            out = self.unet(x_in.to(self.unet.dtype), tt).sample.to(torch.float32)
            step = sched.step(out, t, x)  # Euler: x + (σ_next − σ)·(x − D)/σ
            x_next = step.prev_sample
            if heun and sigma_next > 0:
                d_cur = (x - step.pred_original_sample) / sigma
                d_next = (x_next - self.denoise(x_next, sigma_next)) / sigma_next
                x_next = x + (sigma_next - sigma) * (0.5 * d_cur + 0.5 * d_next)
            x = x_next
        if output_type == "latent":
            images = x
        else:
            images = (x / 2 + 0.5).clamp(0, 1)
            if output_type in ("np", "pil"):
                images = images.cpu().permute(0, 2, 3, 1).numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
            elif output_type != "pt":
                raise ValueError(f"output_type must be pil, np, pt or latent, got {output_type!r}")
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
