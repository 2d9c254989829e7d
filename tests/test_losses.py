"""Training σ distributions, weightings, the EDM loss and the residual (bootstrapping) loss."""

import math

import pytest
import torch
from torch import nn

from bootdiff.config import LossConfig
from bootdiff.losses import EDMLoss
from bootdiff.residual import ResidualLoss
from bootdiff.schedules import sample_training_sigma, weighting

try:
    from gmm import GaussianMixture
except ImportError:  # tests/ imported as a package
    from tests.gmm import GaussianMixture

torch.set_num_threads(1)


def test_lognormal_and_loguniform_sigma():
    n = 20000
    g = torch.Generator().manual_seed(0)
    s = sample_training_sigma(n, LossConfig(P_mean=-1.2, P_std=1.2), g)
    assert s.shape == (n,) and s.dtype == torch.float32 and (s > 0).all()
    ls = s.double().log()
    assert abs(ls.mean() - (-1.2)) < 4 * 1.2 / math.sqrt(n)          # SE of the mean of ln σ
    assert abs(ls.std() - 1.2) < 4 * 1.2 / math.sqrt(2 * n)          # SE of the std
    cfg = LossConfig(sigma_dist="loguniform", sigma_min=0.01, sigma_max=10.0)
    s = sample_training_sigma(n, cfg, g)
    assert s.min() >= 0.01 * (1 - 1e-6) and s.max() <= 10.0 * (1 + 1e-6)
    u = (s.double().log() - math.log(0.01)) / math.log(1000.0)        # ~ U(0, 1)
    assert abs(u.mean() - 0.5) < 4 * math.sqrt(1 / 12 / n)
    with pytest.raises(ValueError, match="sigma_dist"):
        sample_training_sigma(4, LossConfig(sigma_dist="cosine"), g)


def test_weighting_formulas():
    s = torch.tensor([0.1, 0.5, 1.0, 5.0])
    sd = 0.5
    torch.testing.assert_close(weighting(s, sd, "edm"), (s ** 2 + sd ** 2) / (s * sd) ** 2)
    assert abs(float(weighting(torch.tensor(sd), sd, "edm")) - 2 / sd ** 2) < 1e-5
    torch.testing.assert_close(weighting(s, sd, "snr"), 1 / s ** 2)
    torch.testing.assert_close(weighting(s, sd, "uniform"), torch.ones(4))
    # EDM weighting makes the loss of the trivial denoisers D = x (σ→0) and D = 0 (σ→∞) ≈ 1
    assert abs(float(weighting(torch.tensor(1e-4), sd, "edm") * 1e-8) - 1) < 1e-3
    with pytest.raises(ValueError, match="weighting"):
        weighting(s, sd, "p2")


def test_edm_loss_formula_and_last_sigma():
    """D ≡ 0 records x_σ: the loss must be λ(σ)·mean(x²) and (x_σ − x)/σ must be N(0, 1)."""
    seen = {}

    def D(x_noisy, sigma):
        seen["x"], seen["sigma"] = x_noisy, sigma
        return torch.zeros_like(x_noisy)

    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    loss_fn = EDMLoss(LossConfig(), sigma_data=0.5)
    loss = loss_fn(D, x, torch.Generator().manual_seed(2))
    sigma = loss_fn.last_sigma
    assert loss.shape == (64,) and sigma.shape == (64,) and torch.equal(sigma, seen["sigma"])
    torch.testing.assert_close(loss, weighting(sigma, 0.5, "edm") * x.pow(2).mean((1, 2, 3)))
    n = (seen["x"] - x) / sigma.reshape(-1, 1, 1, 1)
    assert abs(float(n.mean())) < 4 / math.sqrt(n.numel()) and abs(float(n.std()) - 1) < 0.02
    # same generator seed -> same σ and noise
    loss2 = loss_fn(D, x, torch.Generator().manual_seed(2))
    torch.testing.assert_close(loss, loss2)
    # weighting override
    loss3 = EDMLoss(LossConfig(), 0.5, weighting="uniform")(D, x, torch.Generator().manual_seed(2))
    torch.testing.assert_close(loss3, x.pow(2).mean((1, 2, 3)))


def test_exact_denoiser_has_lower_edm_loss():
    gm = GaussianMixture.two_blobs(d=8, shape=(2, 2, 2))
    x = gm.sample(4000, torch.Generator().manual_seed(0))
    loss_fn = EDMLoss(LossConfig(), sigma_data=gm.sigma_data())
    exact = loss_fn(gm, x, torch.Generator().manual_seed(1))
    for bad in (lambda x, s: gm(x, s) + 0.05, lambda x, s: 0.9 * gm(x, s), lambda x, s: gm(x, 1.5 * s)):
        worse = loss_fn(bad, x, torch.Generator().manual_seed(1))
        diff = worse - exact   # paired: same σ and noise
        assert diff.mean() > 4 * diff.std() / math.sqrt(len(diff)), float(diff.mean())


# ----------------------------------------------------------------------------- residual loss


class ToyBootstrap(nn.Module):
    """Stand-in for `BootstrapDenoiser`: d_comb and r come with autograd graphs on purpose, so the
    test checks that the LOSS (not the model) keeps gradients away from them."""

    def __init__(self, r_value=0.7, R_scale=0.3):
        super().__init__()
        self.comb = nn.Parameter(torch.tensor(0.8))      # "frozen" combined denoiser: x ↦ comb·x
        self.r = nn.Parameter(torch.tensor(r_value))     # range adapter value
        self.res = nn.Parameter(torch.tensor(R_scale))   # residual: R = res·x
        self.zero_R = False

    def forward_parts(self, x, sigma):
        d_comb = self.comb * x
        r = self.r * torch.ones_like(sigma)              # [N]
        R = self.res * x * (0.0 if self.zero_R else 1.0)
        return d_comb, r, R


def _res_loss(model, x, seed=3, **kw):
    fn = ResidualLoss(LossConfig(), 0.5, **kw)
    return fn(model, x, torch.Generator().manual_seed(seed)), fn


def test_residual_loss_terms():
    x = torch.randn(32, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    m = ToyBootstrap()
    base, fn = _res_loss(m, x)
    sigma = fn.last_sigma
    lam = weighting(sigma, 0.5, "edm")
    # reproduce x_σ with the same draws (σ first, then noise)
    rec = {}

    class Rec(ToyBootstrap):
        def forward_parts(self, xn, s):
            rec["xn"] = xn
            return super().forward_parts(xn, s)

    rm = Rec()
    _res_loss(rm, x)
    xn = rec["xn"]
    d_boot = 0.8 * xn + 0.7 * 0.3 * xn
    torch.testing.assert_close(base, lam * (d_boot - x).pow(2).mean((1, 2, 3)))
    # μ_var: exactly linear in μ_var with slope λ·mean((rR)²); zero when R = 0
    var_term = lam * (0.7 * 0.3 * xn).pow(2).mean((1, 2, 3))
    for mu in (0.5, 2.0):
        lv, _ = _res_loss(m, x, mu_var=mu)
        torch.testing.assert_close(lv, base + mu * var_term)
    assert (_res_loss(m, x, mu_var=2.0)[0] > base).all()
    m.zero_R = True
    torch.testing.assert_close(_res_loss(m, x, mu_var=5.0, mu_l1=3.0)[0], _res_loss(m, x)[0])
    m.zero_R = False
    # ℓ1: μ_L1·w(σ)·mean|R| with w = 1 or min(1, σ_data/σ)
    l1 = (0.3 * xn).abs().mean((1, 2, 3))
    torch.testing.assert_close(_res_loss(m, x, mu_l1=0.1)[0], base + 0.1 * l1)
    lw, fn = _res_loss(m, x, mu_l1=0.1, l1_decay="inverse_sigma")
    w = (0.5 / sigma).clamp(max=1.0)
    torch.testing.assert_close(lw, base + 0.1 * w * l1)
    assert (w <= 1).all() and (w < 1).any() and (w == 1).any()
    assert set(fn.last_terms) == {"mse", "var", "l1"}


def test_residual_loss_gradients_reach_only_the_residual():
    x = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    m = ToyBootstrap()
    loss, _ = _res_loss(m, x, mu_var=1.0, mu_l1=0.1)
    loss.mean().backward()
    assert m.res.grad is not None and m.res.grad.abs() > 0
    assert m.comb.grad is None and m.r.grad is None


def test_residual_loss_errors():
    with pytest.raises(ValueError, match="l1_decay"):
        ResidualLoss(LossConfig(), 0.5, l1_decay="exp")
    with pytest.raises(ValueError, match="mu_var"):
        ResidualLoss(LossConfig(), 0.5, mu_var=-1.0)
    with pytest.raises(TypeError, match="forward_parts"):
        ResidualLoss(LossConfig(), 0.5)(lambda x, s: x, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="sigma_data"):
        EDMLoss(LossConfig(), 0.0)
