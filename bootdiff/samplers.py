"""Samplers for the VE / EDM process x_σ = x + σ·n, talking only to a denoiser ``D(x, sigma)``.

Sampling of docs/METHOD.md §7.

* ``heun_sampler``           — EDM Algorithm 2 (Karras et al. 2022): 2nd-order Heun on the
                               probability-flow ODE dx/dσ = (x − D(x; σ))/σ, with optional
                               stochastic "churn" (S_churn, S_min, S_max, S_noise); last step Euler.
* ``euler_maruyama_sampler`` — Euler–Maruyama on the reverse-time VE SDE with σ(t) = t
                               (Song et al. 2021; EDM eq. 6 with β(t) = σ̇/σ):
                               dx = −2σ̇σ·∇log p_σ(x) dt + √(2σ̇σ) dw̄,  ∇log p_σ = (D − x)/σ².
* ``pc_sampler``             — predictor–corrector (Song et al. 2021, Algorithm 2 for VE):
                               Langevin corrector with signal-to-noise ratio ``snr`` followed by
                               the reverse-diffusion predictor.
* ``sample``                 — builds the schedule (`bootdiff.schedules.make_schedule`) and the
                               latents σ_max·N(0, I), then dispatches on ``sampler_cfg.kind``.

Every sampler takes ``latents`` already at noise level ``sigmas[0]`` and a schedule ``sigmas``
(descending, ending with 0), calls ``D(x, sigma)`` with ``sigma`` a ``[N]`` tensor of ``x``'s
dtype (float32, or float64 for exact tests), and returns the final (denoised) batch. The stochastic
samplers replace their last transition to σ = 0 by the denoiser output (Song et al.'s
"denoise" step). Randomness comes from an explicit ``generator`` (`bootdiff.util.randn`: drawn
on the generator's device, so a CPU generator gives the same samples on any device).
``progress(step, num_steps, x)`` is called after every step when given.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from bootdiff.schedules import make_schedule
from bootdiff.util import broadcast_sigma, randn

SAMPLERS = ("heun", "euler_maruyama", "pc")

Progress = Optional[Callable[[int, int, torch.Tensor], None]]


def _check(latents: torch.Tensor, sigmas: torch.Tensor) -> list:
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-d schedule with at least 2 entries, got {tuple(sigmas.shape)}")
    s = [float(v) for v in sigmas.to(torch.float64)]
    if any(b >= a for a, b in zip(s[:-1], s[1:])) or s[-1] != 0.0:
        raise ValueError(f"sigmas must be strictly decreasing and end with 0, got {s[:3]}...{s[-2:]}")
    if not latents.is_floating_point():
        raise ValueError(f"latents must be floating point, got {latents.dtype}")
    return s


@torch.no_grad()
def heun_sampler(D, latents: torch.Tensor, sigmas: torch.Tensor, S_churn: float = 0.0,
                 S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0,
                 generator: Optional[torch.Generator] = None, progress: Progress = None) -> torch.Tensor:
    """EDM Algorithm 2 (deterministic when ``S_churn = 0``, then it is Algorithm 1)."""
    t = _check(latents, sigmas)
    n = len(t) - 1
    x_next = latents
    for i, (t_cur, t_next) in enumerate(zip(t[:-1], t[1:])):
        x_cur = x_next
        # Increase noise temporarily (churn): γ_i = min(S_churn/N, √2 − 1) inside [S_min, S_max].
        gamma = min(S_churn / n, math.sqrt(2.0) - 1.0) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            eps = S_noise * randn(x_cur.shape, generator, x_cur.device, x_cur.dtype)
            x_hat = x_cur + math.sqrt(t_hat ** 2 - t_cur ** 2) * eps
        else:
            x_hat = x_cur
        # Euler step.
        d_cur = (x_hat - D(x_hat, broadcast_sigma(t_hat, x_hat))) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        # 2nd-order correction (not on the last step to σ = 0).
        if i < n - 1:
            d_prime = (x_next - D(x_next, broadcast_sigma(t_next, x_next))) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        if progress is not None:
            progress(i + 1, n, x_next)
    return x_next


def _score(D, x: torch.Tensor, sigma: float) -> torch.Tensor:
    return (D(x, broadcast_sigma(sigma, x)) - x) / sigma ** 2


def _reverse_step(D, x: torch.Tensor, t_cur: float, t_next: float, g2: float, generator) -> torch.Tensor:
    """One stochastic transition σ_i → σ_{i+1}: ``x + g²·s(x, σ_i) + g·z``, or on the last one (to
    σ = 0) the denoiser output ``D(x, σ_i)`` (METHOD §7)."""
    if t_next == 0.0:
        return D(x, broadcast_sigma(t_cur, x))
    z = randn(x.shape, generator, x.device, x.dtype)
    return x + g2 * _score(D, x, t_cur) + math.sqrt(g2) * z


@torch.no_grad()
def euler_maruyama_sampler(D, latents: torch.Tensor, sigmas: torch.Tensor,
                           generator: Optional[torch.Generator] = None,
                           progress: Progress = None) -> torch.Tensor:
    """Euler–Maruyama on the reverse VE SDE with σ(t) = t, so 2σ̇σ·|dt| = 2σ_i(σ_i − σ_{i+1}):

        x_{i+1} = x_i + 2σ_i(σ_i − σ_{i+1})·s(x_i, σ_i) + √(2σ_i(σ_i − σ_{i+1}))·z_i

    with s = (D − x)/σ²; the last step (to σ = 0) returns D(x, σ_{n−1})."""
    t = _check(latents, sigmas)
    n = len(t) - 1
    x = latents
    for i, (t_cur, t_next) in enumerate(zip(t[:-1], t[1:])):
        x = _reverse_step(D, x, t_cur, t_next, 2.0 * t_cur * (t_cur - t_next), generator)
        if progress is not None:
            progress(i + 1, n, x)
    return x


@torch.no_grad()
def pc_sampler(D, latents: torch.Tensor, sigmas: torch.Tensor, snr: float = 0.1,
               n_corrector: int = 1, generator: Optional[torch.Generator] = None,
               progress: Progress = None) -> torch.Tensor:
    """Predictor–corrector sampling (Song et al. 2021, Algorithms 2 and 4, VE SDE).

    At each level σ_i: ``n_corrector`` Langevin steps x ← x + ε·s(x, σ_i) + √(2ε)·z with
    ε = 2·(snr·‖z‖/‖s‖)² (norms: per-sample L2 norms averaged over the batch, as in the reference
    implementation — a per-sample ratio explodes when ‖s‖ ≈ 0 in low dimension), then the
    reverse-diffusion predictor x ← x + (σ_i² − σ_{i+1}²)·s(x, σ_i) + √(σ_i² − σ_{i+1}²)·z.
    The last predictor step (to σ = 0) is replaced by the denoiser output D(x, σ_{n−1})."""
    t = _check(latents, sigmas)
    if n_corrector < 0 or int(n_corrector) != n_corrector:
        raise ValueError(f"sampler.n_corrector must be a non-negative integer, got {n_corrector}")
    if not snr > 0:
        raise ValueError(f"sampler.snr must be > 0, got {snr}")
    n = len(t) - 1
    x = latents
    for i, (t_cur, t_next) in enumerate(zip(t[:-1], t[1:])):
        for _ in range(int(n_corrector)):  # Langevin corrector at σ_i
            grad = _score(D, x, t_cur)
            z = randn(x.shape, generator, x.device, x.dtype)
            grad_norm = grad.flatten(1).norm(dim=1).mean()
            noise_norm = z.flatten(1).norm(dim=1).mean()
            eps = 2.0 * (snr * noise_norm / grad_norm.clamp_min(1e-20)) ** 2
            x = x + eps * grad + torch.sqrt(2.0 * eps) * z
        x = _reverse_step(D, x, t_cur, t_next, t_cur ** 2 - t_next ** 2, generator)  # predictor
        if progress is not None:
            progress(i + 1, n, x)
    return x


@torch.no_grad()
def sample(D, shape, sampler_cfg, generator: Optional[torch.Generator] = None, device=None,
           dtype: torch.dtype = torch.float32, progress: Progress = None,
           latents: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Draw ``shape[0]`` samples: schedule from ``sampler_cfg``, latents σ_max·N(0, I) (or the
    given standard-normal ``latents``), then the sampler named by ``sampler_cfg.kind``."""
    kind = sampler_cfg.kind
    if kind not in SAMPLERS:
        raise ValueError(f"sampler.kind must be one of {SAMPLERS}, got {kind!r}")
    sigmas = make_schedule(sampler_cfg).to(torch.float64)
    if latents is None:
        latents = randn(tuple(shape), generator, device, dtype)
    latents = latents.to(device=device, dtype=dtype) * float(sigmas[0])
    if kind == "heun":
        return heun_sampler(D, latents, sigmas, S_churn=sampler_cfg.S_churn, S_min=sampler_cfg.S_min,
                            S_max=sampler_cfg.S_max, S_noise=sampler_cfg.S_noise,
                            generator=generator, progress=progress)
    if kind == "euler_maruyama":
        return euler_maruyama_sampler(D, latents, sigmas, generator=generator, progress=progress)
    return pc_sampler(D, latents, sigmas, snr=sampler_cfg.snr, n_corrector=sampler_cfg.n_corrector,
                      generator=generator, progress=progress)
