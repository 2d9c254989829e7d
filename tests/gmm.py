"""A Gaussian mixture with its EXACT posterior-mean denoiser — the ground truth for tests.

API (import with ``from gmm import GaussianMixture``; pytest puts ``tests/`` on ``sys.path``)::

    gm = GaussianMixture(weights, means, variances, shape=None, dtype=torch.float64)
        weights    [K]      mixture weights (normalised here)
        means      [K, d]   component means
        variances  [K]      isotropic component variances (v_k·I), or
                   [K, d]   diagonal component variances
        shape      event shape of one sample; default (d,) — e.g. (C, H, W) with C·H·W = d
    gm.d, gm.shape, gm.K
    gm.sample(n, generator=None) -> [n, *shape]        (dtype of the mixture)
    gm(x, sigma) == gm.denoise(x, sigma) -> E[x0 | x0 + σ·n = x]   (x: [N, *shape]; sigma: float,
                                             0-d or [N]; returned in x's dtype; σ = 0 returns x)
    gm.score(x, sigma) -> ∇ log p_σ(x) = (D(x, σ) − x) / σ²
    gm.mean() -> [d];  gm.covariance() -> [d, d]      (exact moments of the clean mixture, flat)
    gm.sigma_data() -> sqrt(trace(cov) / d)           (EDM σ_data of this data set)
    GaussianMixture.two_blobs(d=2, sep=3.0, var=0.25, weight=0.3, shape=None)  a ready example

Exact denoiser: with x_σ = x0 + σn and component k ~ N(m_k, diag(v_k)), x_σ | k ~ N(m_k,
diag(v_k + σ²)); responsibilities π_k(x_σ) ∝ w_k N(x_σ; m_k, v_k + σ²) and
E[x0 | x_σ] = Σ_k π_k (m_k + v_k/(v_k + σ²)·(x_σ − m_k)).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


class GaussianMixture:
    def __init__(self, weights, means, variances, shape: Optional[Sequence[int]] = None,
                 dtype: torch.dtype = torch.float64):
        self.dtype = dtype
        w = torch.as_tensor(weights, dtype=dtype).flatten()
        m = torch.as_tensor(means, dtype=dtype)
        if m.ndim != 2 or m.shape[0] != w.shape[0]:
            raise ValueError(f"means must be [K, d] with K={w.shape[0]}, got {tuple(m.shape)}")
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {w.tolist()}")
        K, d = m.shape
        v = torch.as_tensor(variances, dtype=dtype)
        if v.ndim <= 1:
            v = v.reshape(-1, 1).expand(K, d) if v.numel() == K else v.reshape(1, 1).expand(K, d)
        if v.shape != (K, d) or (v < 0).any():
            raise ValueError(f"variances must be [K] or [K, d] and >= 0, got {tuple(v.shape)}")
        self.weights = w / w.sum()
        self.means = m
        self.variances = v.contiguous()
        self.K, self.d = K, d
        self.shape = tuple(shape) if shape is not None else (d,)
        if math.prod(self.shape) != d:
            raise ValueError(f"shape {self.shape} does not hold d={d} elements")

    @classmethod
    def two_blobs(cls, d: int = 2, sep: float = 3.0, var: float = 0.25, weight: float = 0.3,
                  shape=None) -> "GaussianMixture":
        """Two isotropic blobs at ±(sep/2)·u (u a fixed unit-ish direction), weights (w, 1 − w)."""
        u = torch.linspace(1.0, 0.5, d, dtype=torch.float64)
        u = u / u.norm()
        means = torch.stack([-0.5 * sep * u, 0.5 * sep * u])
        return cls([weight, 1.0 - weight], means, [var, var], shape=shape)

    # ---------------------------------------------------------------- sampling and moments

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.d, generator=generator, dtype=self.dtype)
        x = self.means[k] + self.variances[k].sqrt() * z
        return x.reshape(n, *self.shape)

    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        mu = self.mean()
        second = torch.einsum("k,ki,kj->ij", self.weights, self.means, self.means)
        second = second + torch.diag(self.weights @ self.variances)
        return second - torch.outer(mu, mu)

    def sigma_data(self) -> float:
        return math.sqrt(float(torch.diagonal(self.covariance()).mean()))

    # ---------------------------------------------------------------- exact denoiser

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        n = x.shape[0]
        xf = x.reshape(n, self.d).to(self.dtype)
        s = torch.as_tensor(sigma, dtype=self.dtype, device=x.device).reshape(-1)
        s = s.expand(n) if s.numel() == 1 else s
        if s.numel() != n:
            raise ValueError(f"sigma has {s.numel()} entries for a batch of {n}")
        s2 = (s ** 2).reshape(n, 1, 1)                                  # [N,1,1]
        m, v = self.means.to(x.device), self.variances.to(x.device)   # [K,d]
        tot = v.unsqueeze(0) + s2                                      # [N,K,d]
        diff = xf.unsqueeze(1) - m.unsqueeze(0)                        # [N,K,d]
        logp = -0.5 * (diff ** 2 / tot + torch.log(2 * math.pi * tot)).sum(-1)
        logp = logp + torch.log(self.weights.to(x.device)).unsqueeze(0)
        resp = torch.softmax(logp, dim=1)                              # [N,K]
        post = m.unsqueeze(0) + (v.unsqueeze(0) / tot) * diff          # [N,K,d]
        out = (resp.unsqueeze(-1) * post).sum(1)
        out = torch.where((s == 0).reshape(n, 1), xf, out)
        return out.reshape(x.shape).to(x.dtype)

    __call__ = denoise

    def score(self, x: torch.Tensor, sigma) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
        s = s.reshape([-1] + [1] * (x.ndim - 1))
        return (self.denoise(x, sigma) - x) / s ** 2
