"""The ensemble denoiser (bootdiff/ensemble.py) on Gaussian data, where the ideal denoiser is known
in closed form: D*(x; σ) = s²/(s² + σ²)·x for x ~ N(0, s²I). Two denoisers that shrink too little
and too much err in opposite directions; their ensemble at the right weight is D* itself, and at
any weight its G is at most the same mix of theirs (Jensen)."""

import pytest
import torch

from bootdiff.ensemble import EnsembleDenoiser
from bootdiff.evaluation.metrics import generalization_error

S = 0.5  # the data's standard deviation


class Shrink(torch.nn.Module):
    """D(x; σ) = c·s²/(s² + σ²)·x: the ideal denoiser for c = 1."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x, sigma):
        return self.c * S**2 / (S**2 + sigma.view(-1, 1, 1, 1) ** 2) * x


class Fails(torch.nn.Module):
    def forward(self, x, sigma):
        raise AssertionError("a member of weight 0 was evaluated")


def _G(D) -> float:
    x = S * torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    return generalization_error(D, [x], [0.1, 0.5, 2.0], sigma_data=S)["total"]


def test_ensemble_is_the_weighted_sum_and_its_G_is_at_most_the_mix_of_the_members():
    lo, hi = Shrink(0.6), Shrink(1.4)
    x, sigma = torch.randn(3, 1, 4, 4), torch.tensor([0.1, 1.0, 3.0])
    mix = EnsembleDenoiser([lo, hi], [0.25, 0.75])
    assert torch.allclose(mix(x, sigma), 0.25 * lo(x, sigma) + 0.75 * hi(x, sigma))
    g_lo, g_hi, g_ideal = _G(lo), _G(hi), _G(Shrink(1.0))
    for w in (0.25, 0.5, 0.75):
        assert _G(EnsembleDenoiser([lo, hi], [w, 1 - w])) <= w * g_lo + (1 - w) * g_hi + 1e-12
    # 0.5·0.6 + 0.5·1.4 = 1: the equal mix of opposite errors is the ideal denoiser
    assert _G(EnsembleDenoiser([lo, hi], [0.5, 0.5])) == pytest.approx(g_ideal, rel=1e-6)
    assert g_ideal < 0.9 * min(g_lo, g_hi)


def test_weights_are_convex_and_a_zero_weight_member_is_not_run():
    x, sigma = torch.randn(2, 1, 4, 4), torch.tensor([0.5, 1.0])
    assert torch.equal(EnsembleDenoiser([Shrink(1.0), Fails()], [1.0, 0.0])(x, sigma), Shrink(1.0)(x, sigma))
    with pytest.raises(ValueError, match="sum to 1"):
        EnsembleDenoiser([Shrink(1.0), Shrink(0.5)], [0.5, 0.6])
    with pytest.raises(ValueError, match="sum to 1"):
        EnsembleDenoiser([Shrink(1.0), Shrink(0.5)], [1.5, -0.5])
    with pytest.raises(ValueError, match="2 members but 1 weights"):
        EnsembleDenoiser([Shrink(1.0), Shrink(0.5)], [1.0])
