"""D_comb memoised for G at checkpoints (bootdiff.memo): same numbers, shared across processes."""

import copy
import os

import torch

from bootdiff.config import NetConfig
from bootdiff.fusion import CombinedDenoiser, FusionWeights, ViewModel
from bootdiff.memo import MemoDenoiser, fingerprint, memoize_combined, memoized
from bootdiff.evaluation.metrics import generalization_error
from bootdiff.nets import make_net
from bootdiff.precond import EDMPrecond
from bootdiff.residual import BootstrapDenoiser, RangeAdapter, ResidualPrecond
from bootdiff.views import DownsampleView, PatchView
from test_export import _perturb  # every parameter randomised, zero-initialised layers too

torch.set_num_threads(1)
NET = NetConfig(channels=[8, 16], attention=[False, False], norm_groups=4)
H = 16


class Counting(torch.nn.Module):
    def __init__(self, D):
        super().__init__()
        self.D, self.calls = D, 0

    def forward(self, x, sigma):
        self.calls += 1
        return self.D(x, sigma)


def _bootstrap(weight_seed=0):
    views = [ViewModel("patch", PatchView(H, 8, stride=4), EDMPrecond(_perturb(make_net(NET, 1, 1, 8, seed=1), 1), 0.5)),
             ViewModel("low", DownsampleView(2), EDMPrecond(_perturb(make_net(NET, 1, 1, 8, seed=2), 2), 0.5))]
    g = torch.Generator().manual_seed(weight_seed)
    weights = FusionWeights([0.05, 1.0, 20.0], 2, weights=torch.rand(3, 2, generator=g, dtype=torch.float64) + 0.5)
    combined = CombinedDenoiser(views, fusion="split", weights=weights)
    residual = ResidualPrecond(_perturb(make_net(NET, 2, 1, H, seed=3), 3), 0.5)
    adapter = RangeAdapter.from_sigma_range(0.002, 80.0, torch.rand(100, generator=g) * 0.5)
    return BootstrapDenoiser(combined, residual, adapter).eval()


def _G(D):
    data = torch.rand(10, 1, H, H, generator=torch.Generator().manual_seed(7)) * 2 - 1
    return generalization_error(D, data.split(4), [0.05, 0.5, 5.0], 0.5, seed=3)


def test_memoised_combined_gives_the_same_G_and_is_shared_through_its_file(tmp_path):
    plain = _bootstrap()
    expected = _G(plain)

    # first checkpoint: every D_comb call computed once and stored
    model = copy.deepcopy(plain)
    memo = memoize_combined(model, str(tmp_path))
    counting = Counting(memo.denoiser)
    memo.denoiser = counting
    assert _G(model) == expected
    assert counting.calls == 3 * 3 and memo.new == 9 and memo.hits == 0  # 3 batches × 3 σ
    memo.save()
    files = os.listdir(tmp_path)
    assert files == [f"dcomb-{fingerprint(plain.combined)}.pt"]

    # a later checkpoint in another process: a trained residual, the same frozen part -> all hits
    later = copy.deepcopy(plain)
    with torch.no_grad():
        for p in later.residual.parameters():
            p.mul_(1.1)
    want = _G(later)
    assert want["total"] != expected["total"]
    memo2 = memoize_combined(later, str(tmp_path))
    counting2 = Counting(memo2.denoiser)
    memo2.denoiser = counting2
    assert _G(later) == want and counting2.calls == 0 and memo2.hits == 9
    later.combined = memo2.denoiser  # put the plain one back
    assert isinstance(later.combined, Counting)


def test_other_fusion_weights_never_share_outputs(tmp_path):
    a, b = _bootstrap(0), _bootstrap(1)
    assert fingerprint(a.combined) != fingerprint(b.combined)
    ma = memoize_combined(a, str(tmp_path))
    _G(a)
    ma.save()
    mb = memoize_combined(b, str(tmp_path))
    assert mb.outputs == {} and _G(b) == _G(_bootstrap(1))
    assert len(os.listdir(tmp_path)) == 1 and mb.new == 9  # b's outputs not saved yet
    mb.save()
    assert len(os.listdir(tmp_path)) == 2


def test_memo_passes_gradients_through_and_skips_trainable_models(tmp_path):
    comb = _bootstrap().combined
    memo = memoized(comb, None)
    x = torch.randn(2, 1, H, H, requires_grad=True)
    with torch.enable_grad():
        out = memo(x, torch.tensor([0.3, 2.0]))
        assert torch.equal(out, comb(x, torch.tensor([0.3, 2.0])))
    assert memo.outputs == {} and memo.new == 0  # training never reads or fills the memo
    with torch.no_grad():
        y1 = memo(x, torch.tensor([0.3, 2.0]))
        y2 = memo(x + 1e-3, torch.tensor([0.3, 2.0]))  # other bytes: computed, not looked up
    assert memo.new == 2 and not torch.equal(y1, y2)
    memo.save()  # no store_url: nothing written, no error
    assert os.listdir(tmp_path) == []
    trainable = _bootstrap()
    for p in trainable.combined.parameters():
        p.requires_grad_(True)
    assert memoize_combined(trainable, str(tmp_path)) is None
    assert isinstance(memoize_combined(_bootstrap(), None), MemoDenoiser)
