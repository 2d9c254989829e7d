"""Samplers and schedules against the exact denoiser of a Gaussian mixture (tests/gmm.py).

Each sampler draws N = 8000 samples in float64 from a 2-component, diagonal-covariance mixture in
d = 4 (stored as [1, 2, 2] images). With the exact posterior-mean denoiser the only errors left are
Monte-Carlo error and time discretisation. For every moment (4 means, 10 covariance entries) we
require |estimate − exact| ≤ 5 standard errors, the SE estimated from the sample itself
(std(x_i)/√N for means, std((x_i−μ_i)(x_j−μ_j))/√N for covariances). At N = 1e5 the discretisation
bias of the chosen step counts measured ≤ 5.6 SE(1e5) ≈ 1.6 SE(8000), so 5 SE leaves room for the
noise while a wrong drift or noise scale (≥ 10 % covariance error ≈ 10+ SE) fails. The fraction of
samples in the lighter mode (weight 0.3, SE = √(0.21/N) ≈ 0.005) is checked to 5 SE as well.
"""

import math

import pytest
import torch

from bootdiff.config import SamplerConfig
from bootdiff.samplers import euler_maruyama_sampler, heun_sampler, pc_sampler, sample
from bootdiff.schedules import edm_sigmas, linear_sigmas, make_schedule, ve_sigmas

try:
    from gmm import GaussianMixture
except ImportError:  # tests/ imported as a package
    from tests.gmm import GaussianMixture

torch.set_num_threads(1)

N = 8000
GM = GaussianMixture(
    [0.3, 0.7],
    [[-1.5, -0.8, 0.5, 0.0], [1.2, 0.6, -0.4, 0.3]],
    [[0.2, 0.3, 0.1, 0.4], [0.3, 0.1, 0.2, 0.15]],
    shape=(1, 2, 2),
)

CASES = {
    "heun": dict(kind="heun", steps=40),
    "heun_churn": dict(kind="heun", steps=64, S_churn=10.0, S_min=0.01, S_max=50.0),
    "euler_maruyama": dict(kind="euler_maruyama", steps=256),
    "pc": dict(kind="pc", steps=200, snr=0.1, n_corrector=1),
}


def _check_moments(x: torch.Tensor, gm: GaussianMixture, z_max: float = 5.0):
    n = x.shape[0]
    x = x.reshape(n, -1)
    mu, cov = gm.mean(), gm.covariance()
    se_mean = x.std(0) / math.sqrt(n)
    z_mean = (x.mean(0) - mu) / se_mean
    xc = x - mu
    prod = (xc[:, :, None] * xc[:, None, :]).reshape(n, -1)
    z_cov = (prod.mean(0) - cov.flatten()) / (prod.std(0) / math.sqrt(n))
    assert z_mean.abs().max() < z_max, f"mean off by {z_mean.abs().max():.2f} SE: {x.mean(0)} vs {mu}"
    assert z_cov.abs().max() < z_max, f"cov off by {z_cov.abs().max():.2f} SE:\n{torch.cov(x.T)}\nvs\n{cov}"
    # mode weights: assign each sample to the nearer mean
    d = torch.cdist(x, gm.means)
    frac = (d.argmin(1) == 0).double().mean()
    assert abs(frac - 0.3) < z_max * math.sqrt(0.21 / n), f"light-mode fraction {frac:.4f} != 0.3"


@pytest.mark.parametrize("case", list(CASES))
def test_sampler_reproduces_mixture_moments(case):
    cfg = SamplerConfig(**CASES[case])
    g = torch.Generator().manual_seed(123)
    calls = []
    x = sample(GM, (N, 1, 2, 2), cfg, generator=g, dtype=torch.float64,
               progress=lambda i, n, xi: calls.append((i, n)))
    assert x.shape == (N, 1, 2, 2) and x.dtype == torch.float64
    assert calls[-1] == (cfg.steps, cfg.steps) and len(calls) == cfg.steps
    _check_moments(x, GM)


def test_sampler_with_wrong_denoiser_fails_the_moment_check():
    """The moment check has teeth: a denoiser that over-shrinks by 10 % is caught."""
    cfg = SamplerConfig(kind="heun", steps=40)
    x = sample(lambda x, s: 0.9 * GM(x, s), (N, 1, 2, 2), cfg,
               generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    with pytest.raises(AssertionError):
        _check_moments(x, GM)


def test_float32_and_reproducible():
    cfg = SamplerConfig(kind="pc", steps=20)
    a = sample(GM, (64, 1, 2, 2), cfg, generator=torch.Generator().manual_seed(5))
    b = sample(GM, (64, 1, 2, 2), cfg, generator=torch.Generator().manual_seed(5))
    c = sample(GM, (64, 1, 2, 2), cfg, generator=torch.Generator().manual_seed(6))
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_deterministic_heun_is_noise_free():
    """Without churn Heun is an ODE solver: the result depends only on the latents."""
    lat = torch.randn(16, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80
    s = edm_sigmas(12)
    a = heun_sampler(GM, lat, s, generator=torch.Generator().manual_seed(1))
    b = heun_sampler(GM, lat, s, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = heun_sampler(GM, lat, s, S_churn=20.0, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, c)


def test_samplers_pass_sigma_as_batch_tensor():
    seen = []

    def D(x, sigma):
        assert torch.is_tensor(sigma) and sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype
        seen.append(float(sigma[0]))
        return torch.zeros_like(x)

    lat = torch.randn(3, 2, 4, 4)
    s = ve_sigmas(5, 0.01, 10.0)
    for fn in (heun_sampler, euler_maruyama_sampler, pc_sampler):
        seen.clear()
        out = fn(D, lat * 10.0, s, generator=torch.Generator().manual_seed(0))
        assert out.shape == lat.shape
        assert max(seen) <= 10.0 * math.sqrt(2) + 1e-4 and min(seen) > 0
    # D ≡ 0 means every stochastic sampler ends with D's output exactly
    assert torch.equal(euler_maruyama_sampler(D, lat, s), torch.zeros_like(lat))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="sampler.kind"):
        sample(GM, (4, 1, 2, 2), SamplerConfig(kind="ddim"))
    with pytest.raises(ValueError, match="sampler.schedule"):
        sample(GM, (4, 1, 2, 2), SamplerConfig(schedule="cosine"))
    with pytest.raises(ValueError, match="decreasing"):
        heun_sampler(GM, torch.zeros(2, 4), torch.tensor([1.0, 2.0, 0.0]))


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("fn", [edm_sigmas, ve_sigmas, linear_sigmas])
@pytest.mark.parametrize("n", [1, 2, 18, 100])
def test_schedule_shape_and_monotone(fn, n):
    s = fn(n, 0.002, 80.0)
    assert s.dtype == torch.float32 and s.shape == (n + 1,)
    assert s[-1] == 0 and abs(float(s[0]) - 80.0) < 1e-5
    assert (s[1:] < s[:-1]).all()
    if n > 1:
        assert abs(float(s[-2]) - 0.002) < 1e-7


def test_edm_sigmas_formula():
    n, lo, hi, rho = 18, 0.002, 80.0, 7.0
    s = edm_sigmas(n, lo, hi, rho).double()
    i = torch.arange(n, dtype=torch.float64)
    ref = (hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    torch.testing.assert_close(s[:-1], ref.float().double())
    # ve is geometric: constant ratio; linear: constant difference
    v = ve_sigmas(10, 0.01, 10.0).double()[:-1]
    torch.testing.assert_close(v[1:] / v[:-1], torch.full((9,), (0.001) ** (1 / 9), dtype=torch.float64),
                               rtol=1e-5, atol=0)
    lin = linear_sigmas(5, 1.0, 5.0)
    torch.testing.assert_close(lin, torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0]))


def test_make_schedule_dispatch_and_errors():
    cfg = SamplerConfig(schedule="ve", steps=7, sigma_min=0.01, sigma_max=20.0)
    torch.testing.assert_close(make_schedule(cfg), ve_sigmas(7, 0.01, 20.0))
    with pytest.raises(ValueError, match="sigma_min"):
        edm_sigmas(10, 1.0, 0.5)
    with pytest.raises(ValueError, match="positive integer"):
        edm_sigmas(0)
