"""The Gaussian identity test: for x ~ N(0, Σ) every posterior mean is known in closed form,
``E[x | x_σ] = Σ(Σ + σ²I)⁻¹ x_σ``, so the combined and bootstrapped denoisers can be checked
against the exact answer.

(a) Σ block-diagonal over the patch grid (the same block for every patch): the patch mosaic of
    exact patch posterior means *is* the exact full posterior mean.
(b) Σ smooth and stationary over the whole image (patches coupled): the combined estimate is
    strictly worse than the exact posterior; a residual trained on a scarce full-resolution set
    (``bootdiff.residual.ResidualLoss`` + ``bootdiff.train.train``) closes most of the gap on
    held-out data, and with a very large variance penalty μ_var the trained residual goes to ~0.
"""

import math

import torch

from bootdiff.config import LossConfig, TrainConfig
from bootdiff.fusion import CombinedDenoiser, ViewModel
from bootdiff.precond import measure_sigma_data
from bootdiff.residual import BootstrapDenoiser, ResidualLoss, ResidualPrecond, estimate_range_adapter
from bootdiff.train import train
from bootdiff.views import PatchView

torch.set_num_threads(1)
F64 = torch.float64
H = W = 8  # 1×8×8 images, a 2×2 grid of 4×4 patches
P = 4


class GaussianDenoiser(torch.nn.Module):
    """Exact posterior mean of x ~ N(0, S) (flattened): ``S(S + σ²I)⁻¹ y = U diag(λ/(λ+σ²)) Uᵀ y``,
    one σ per sample."""

    def __init__(self, S: torch.Tensor):
        super().__init__()
        lam, U = torch.linalg.eigh(S.to(F64))
        self.register_buffer("lam", lam)
        self.register_buffer("U", U)

    def forward(self, y, sigma):
        f = y.reshape(y.shape[0], -1)
        U, lam = self.U.to(y.dtype), self.lam.to(y.dtype)
        s2 = torch.as_tensor(sigma, dtype=y.dtype).reshape(-1, 1).expand(y.shape[0], 1) ** 2
        return (((f @ U) * lam / (lam + s2)) @ U.T).reshape(y.shape)


def patch_index(r=0, c=0):
    """Flat pixel indices (row-major, as ``PatchView`` pastes) of the 4×4 patch at (r, c)."""
    return torch.arange(H * W).reshape(H, W)[r:r + P, c:c + P].reshape(-1)


def sample(S, n, seed):
    L = torch.linalg.cholesky(S)
    z = torch.randn(n, S.shape[0], generator=torch.Generator().manual_seed(seed), dtype=F64)
    return (z @ L.T).reshape(n, 1, H, W)


def test_block_diagonal_gaussian_patch_mosaic_is_the_exact_posterior():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(P * P, P * P, generator=g, dtype=F64)
    block = A @ A.T / (P * P) + 0.05 * torch.eye(P * P, dtype=F64)  # one SPD block, all patches
    S = torch.zeros(H * W, H * W, dtype=F64)
    for r in (0, P):
        for c in (0, P):
            i = patch_index(r, c)
            S[i[:, None], i[None, :]] = block
    exact = GaussianDenoiser(S)
    comb = CombinedDenoiser([ViewModel("patch", PatchView(H, P), GaussianDenoiser(block))])
    x = sample(S, 64, seed=1)
    sigma = torch.exp(torch.linspace(math.log(0.01), math.log(20.0), 64, dtype=F64))
    x_sigma = x + sigma.reshape(-1, 1, 1, 1) * torch.randn(x.shape, generator=g, dtype=F64)
    assert torch.allclose(comb(x_sigma, sigma), exact(x_sigma, sigma), rtol=0, atol=1e-10)
    # and a Σ that couples the blocks breaks the identity (the check above can fail)
    S2 = S + 0.3 * torch.ones_like(S)
    assert not torch.allclose(comb(x_sigma, sigma), GaussianDenoiser(S2)(x_sigma, sigma), atol=1e-3)


class PiecewiseLinearNet(torch.nn.Module):
    """A linear residual net: ``out = M(c_noise) · inp`` with ``M`` piecewise linear in
    ``c_noise = ln σ / 4`` between knots (the backbone signature ``net(x, c_noise)``)."""

    def __init__(self, in_dim, out_shape, knot_sigmas, init=0.01, seed=0):
        super().__init__()
        self.out_shape = tuple(out_shape)
        self.register_buffer("knots", torch.log(torch.tensor(knot_sigmas)) / 4)
        g = torch.Generator().manual_seed(seed)
        out_dim = math.prod(out_shape)
        self.weight = torch.nn.Parameter(init * torch.randn(len(knot_sigmas), out_dim, in_dim, generator=g))

    def forward(self, inp, c_noise):
        k, K = self.knots, self.knots.numel()
        t = c_noise.reshape(-1).to(k.dtype).clamp(k[0], k[-1])
        i = torch.searchsorted(k, t, right=True).clamp(1, K - 1)
        a = ((t - k[i - 1]) / (k[i] - k[i - 1])).to(inp.dtype)
        hat = torch.zeros(t.shape[0], K, dtype=inp.dtype)
        hat = hat.scatter(1, (i - 1)[:, None], (1 - a)[:, None]).scatter_add(1, i[:, None], a[:, None])
        per_knot = torch.einsum("koi,ni->nko", self.weight, inp.flatten(1))
        return torch.einsum("nk,nko->no", hat, per_knot).reshape(-1, *self.out_shape)


def smooth_covariance(ell=2.0, nugget=1e-2):
    """Squared-exponential stationary covariance over the 8×8 pixel grid (couples all patches)."""
    ii, jj = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    p = torch.stack([ii.reshape(-1), jj.reshape(-1)], 1).to(F64)
    d2 = ((p[:, None] - p[None]) ** 2).sum(-1)
    return torch.exp(-d2 / (2 * ell**2)) + nugget * torch.eye(H * W, dtype=F64)


def test_coupled_gaussian_combined_is_worse_and_the_residual_closes_the_gap():
    S = smooth_covariance()
    x_train = sample(S, 512, seed=0).float()  # the scarce full-resolution set
    x_test = sample(S, 2000, seed=1)  # held out
    i = patch_index()
    # Stationary Σ: every patch has the same marginal, so one exact patch denoiser serves all.
    comb = CombinedDenoiser([ViewModel("patch", PatchView(H, P), GaussianDenoiser(S[i][:, i]))])
    exact = GaussianDenoiser(S)
    sigma_data = measure_sigma_data([x_train])
    ranges = estimate_range_adapter(comb, [x_train], 0.05, 10.0, num_bins=100, samples_per_bin=512,
                                    generator=torch.Generator().manual_seed(1))

    eval_sigmas = [0.2, 0.5, 1.0, 2.0]
    noise = torch.randn(x_test.shape, generator=torch.Generator().manual_seed(2), dtype=F64)

    @torch.no_grad()
    def held_out(D, s, dtype=F64):
        """(MSE of D on held-out data at σ = s, RMS of r·R if D is bootstrapped)."""
        x_s = (x_test + s * noise).to(dtype)
        sig = torch.full((x_test.shape[0],), s, dtype=dtype)
        mse = ((D(x_s, sig).to(F64) - x_test) ** 2).mean().item()
        if isinstance(D, BootstrapDenoiser):
            _, r, R = D.forward_parts(x_s, sig)
            return mse, (r * R).double().pow(2).mean().sqrt().item()
        return mse, None

    mse_exact = [held_out(exact, s)[0] for s in eval_sigmas]
    mse_comb = [held_out(comb, s)[0] for s in eval_sigmas]
    for s, me, mc in zip(eval_sigmas, mse_exact, mse_comb):
        assert mc > 1.05 * me, f"σ={s}: combined MSE {mc:.5f} not clearly worse than exact {me:.5f}"

    def fit_residual(mu_var):
        net = PiecewiseLinearNet(2 * H * W, (1, H, W), [0.1, 0.25, 0.6, 1.5, 4.0])
        boot = BootstrapDenoiser(comb, ResidualPrecond(net, sigma_data), ranges)
        loss = ResidualLoss(LossConfig(sigma_dist="loguniform", sigma_min=0.1, sigma_max=4.0),
                            sigma_data, mu_var=mu_var)
        steps, batch = 1500, 64

        def data():
            g = torch.Generator().manual_seed(10)
            while True:
                yield x_train[torch.randint(0, x_train.shape[0], (batch,), generator=g)]

        cfg = TrainConfig(total_kimg=steps * batch / 1000, batch_size=batch, lr=5e-3, warmup_kimg=0.5,
                          grad_clip=0.0, ema_halflife_kimg=steps * batch / 1000 / 10,
                          checkpoint_every_kimg=0.0, report_every=0, seed=0)
        result = train(boot, loss, data(), cfg, run_dir=None, device="cpu")
        assert result.step == steps
        return result.ema  # EDM practice: evaluate the EMA of the weights

    boot = fit_residual(mu_var=0.0)
    rms_free = []
    for s, me, mc in zip(eval_sigmas, mse_exact, mse_comb):
        mb, rms = held_out(boot, s, torch.float32)
        closed = (mc - mb) / (mc - me)
        assert closed > 0.5, f"σ={s}: residual closed only {closed:.2f} of the gap (exact {me:.5f}, " \
                             f"combined {mc:.5f}, bootstrapped {mb:.5f})"
        rms_free.append(rms)

    damped = fit_residual(mu_var=1e4)
    for s, mc, rf in zip(eval_sigmas, mse_comb, rms_free):
        mb, rms = held_out(damped, s, torch.float32)
        assert rms < 0.1 * rf, f"σ={s}: with μ_var=1e4 the residual r·R has RMS {rms:.4f} (free: {rf:.4f})"
        assert abs(mb - mc) < 0.01 * mc
