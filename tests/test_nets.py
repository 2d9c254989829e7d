"""Backbones (bootdiff.nets), preconditioning / σ_data (bootdiff.precond) and the residual's
preconditioning / range adapter (bootdiff.residual)."""

import math

import pytest
import torch

from bootdiff.config import NetConfig
from bootdiff.nets import ImageUNet, VideoUNet, make_net
from bootdiff.precond import EDMPrecond, measure_sigma_data
from bootdiff.residual import RangeAdapter, ResidualPrecond, estimate_range_adapter

torch.set_num_threads(1)
TINY = NetConfig(channels=[16, 32], attention=[False, True], layers_per_block=1, norm_groups=8)


# ----------------------------------------------------------------------------- nets


@pytest.mark.parametrize("res", [8, 16, 32])
def test_image_unet_shapes(res):
    torch.manual_seed(0)
    net = make_net(TINY, in_channels=2, out_channels=1, resolution=res)
    assert isinstance(net, ImageUNet) and net.unet.config.sample_size == res
    out = net(torch.randn(3, 2, res, res), torch.tensor([-1.0, 0.0, 1.0]))
    assert out.shape == (3, 1, res, res) and torch.isfinite(out).all()


def test_image_unet_time_scale_reaches_timestep():
    torch.manual_seed(0)
    net = make_net(NetConfig(channels=[16], attention=[False], time_scale=100.0), 1, 1, 8).eval()
    x, c = torch.randn(2, 1, 8, 8), torch.tensor([0.3, -0.7])
    assert torch.allclose(net(x, c), net.unet(x, 100.0 * c).sample)
    assert not torch.allclose(net(x, c), net(x, c + 0.5))


def test_video_unet_any_T_same_weights():
    torch.manual_seed(0)
    net = make_net(TINY, in_channels=1, out_channels=1, resolution=16, video=True).eval()
    assert isinstance(net, VideoUNet)
    for m in net.modules():  # the temporal convs start at zero: make them mix frames
        if isinstance(m, torch.nn.Conv1d):
            torch.nn.init.normal_(m.weight, std=0.1)
    for T in (4, 8, 20):
        x = torch.randn(2, 1, T, 16, 16)
        out = net(x, torch.tensor([0.1, -0.2]))
        assert out.shape == (2, 1, T, 16, 16) and torch.isfinite(out).all()
        x2 = x.clone()
        x2[:, :, -1] += 1.0  # change the last frame only: frame 0 sees it through temporal layers
        assert not torch.allclose(net(x2, torch.tensor([0.1, -0.2]))[:, :, 0], out[:, :, 0])


def test_video_unet_attention_and_depth():
    torch.manual_seed(0)
    cfg = NetConfig(channels=[8, 16, 16], attention=[False, True, True], layers_per_block=2, norm_groups=4)
    net = make_net(cfg, 2, 1, 8, video=True)
    assert net(torch.randn(1, 2, 3, 8, 8), torch.tensor([0.0])).shape == (1, 1, 3, 8, 8)


def test_auto_kind_and_bad_configs():
    assert isinstance(make_net(TINY, 1, 1, 8), ImageUNet)
    assert isinstance(make_net(TINY, 1, 1, 8, video=True), VideoUNet)
    with pytest.raises(ValueError, match="resolution 12 .*2\\^\\(levels-1\\) = 8"):
        make_net(NetConfig(channels=[8, 16, 16, 16], attention=[False] * 4), 1, 1, 12)
    with pytest.raises(ValueError, match="channels: 20 is not divisible by NetConfig.norm_groups=8"):
        make_net(NetConfig(channels=[16, 20], attention=[False, False]), 1, 1, 16)
    with pytest.raises(ValueError, match="attention has 1 entries"):
        make_net(NetConfig(channels=[16, 32], attention=[False]), 1, 1, 16)
    with pytest.raises(ValueError, match="unknown value 'transformer'"):
        make_net(NetConfig(kind="transformer"), 1, 1, 16)
    with pytest.raises(ValueError, match="'unet2d' cannot model clips"):
        make_net(NetConfig(kind="unet2d"), 1, 1, 16, video=True)


# ----------------------------------------------------------------------------- preconditioning


class Probe(torch.nn.Module):
    """F(x, c_noise) = 2·x + c_noise, recording what it was given."""

    def forward(self, x, c_noise):
        self.seen = (x.clone(), c_noise.clone())
        return 2 * x + c_noise.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)


def test_edm_precond_matches_formulas():
    sd = 0.5
    D = EDMPrecond(Probe(), sd)
    x = torch.randn(3, 1, 4, 4)
    sigma = torch.tensor([0.01, 1.0, 50.0])
    out = D(x, sigma)
    for i, s in enumerate(sigma.tolist()):
        c_skip = sd ** 2 / (s ** 2 + sd ** 2)
        c_out = s * sd / math.sqrt(s ** 2 + sd ** 2)
        c_in = 1 / math.sqrt(s ** 2 + sd ** 2)
        c_noise = math.log(s) / 4
        assert torch.allclose(D.net.seen[0][i], c_in * x[i], atol=1e-6)
        assert abs(D.net.seen[1][i].item() - c_noise) < 1e-6
        expect = c_skip * x[i] + c_out * (2 * c_in * x[i] + c_noise)
        assert torch.allclose(out[i], expect, atol=1e-5)
    assert "sigma_data" in D.state_dict() and float(D.state_dict()["sigma_data"]) == sd
    # a Python float σ broadcasts; bf16 input runs the net in bf16 and returns float32
    assert torch.equal(D(x, 1.0), D(x, torch.ones(3)))
    out16 = D(x.to(torch.bfloat16), sigma)
    assert D.net.seen[0].dtype == torch.bfloat16 and out16.dtype == torch.float32


def test_residual_precond_input_and_raw_output():
    sd = 0.25
    R = ResidualPrecond(Probe(), sd)
    x, d = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    sigma = torch.tensor([0.5, 2.0])
    out = R(x, sigma, d)
    seen, c_noise = R.net.seen
    c_in = (1 / (sigma ** 2 + sd ** 2).sqrt()).reshape(-1, 1, 1, 1)
    assert seen.shape == (2, 2, 4, 4)
    assert torch.allclose(seen[:, :1], c_in * x) and torch.allclose(seen[:, 1:], d / sd)
    assert torch.allclose(c_noise, sigma.log() / 4)
    assert torch.allclose(out, 2 * seen + c_noise.reshape(-1, 1, 1, 1))  # raw net output
    with pytest.raises(ValueError, match="d_comb shape"):
        R(x, sigma, d[:, :, :2])


def test_measure_sigma_data_streaming():
    g = torch.Generator().manual_seed(0)
    batches = [1000.0 + 0.3 * torch.randn(n, 1, 5, 5, generator=g) for n in (7, 1, 13)]
    expect = torch.cat(batches).double().std(unbiased=False).item()
    assert abs(measure_sigma_data(iter(batches)) - expect) < 1e-9
    first = batches[0].double().std(unbiased=False).item()
    assert abs(measure_sigma_data(iter(batches), max_batches=1) - first) < 1e-9
    with pytest.raises(ValueError, match="no data"):
        measure_sigma_data(iter([]))


# ----------------------------------------------------------------------------- range adapter


def test_range_adapter_piecewise_linear_in_log_sigma():
    values = torch.rand(100, generator=torch.Generator().manual_seed(1)) + 0.1
    ra = RangeAdapter.from_sigma_range(0.002, 80.0, values)
    centres = ra.centres()
    assert torch.allclose(ra(centres), values, atol=1e-5)  # exact at the interval centres
    lc = ra.log_centres()
    for i in (0, 41, 98):  # linear in log σ between neighbouring centres
        for a in (0.25, 0.5, 0.9):
            s = ((1 - a) * lc[i] + a * lc[i + 1]).exp()
            assert torch.allclose(ra(s), (1 - a) * values[i] + a * values[i + 1], atol=1e-5)
    ends = ra(torch.tensor([1e-5, 0.002, 80.0, 1e4]))  # clamped beyond the end centres
    assert torch.allclose(ends, values[[0, 0, -1, -1]])
    assert ra(torch.tensor([1.0, 2.0, 3.0])).shape == (3,)
    assert torch.equal(RangeAdapter.ones()(torch.tensor([0.01, 1.0, 100.0])), torch.ones(3))
    off = RangeAdapter.ones(math.log(0.01), math.log(10.0), num_bins=7)
    assert off.num_bins == 7 and abs(off.log_sigma_min.exp().item() - 0.01) < 1e-8
    copy = RangeAdapter(0.0, 1.0, torch.zeros(100))
    copy.load_state_dict(ra.state_dict())
    assert torch.equal(copy(centres), ra(centres))


def test_estimate_range_adapter_known_denoisers():
    g = torch.Generator().manual_seed(0)
    data = [0.7 * torch.randn(16, 1, 8, 8, generator=g) for _ in range(3)]
    # D = 0: r = RMS of the data at every σ, exactly
    ra = estimate_range_adapter(lambda x, s: torch.zeros_like(x), iter(data), 0.01, 10.0,
                                num_bins=10, samples_per_bin=48, generator=g)
    rms = torch.cat(data).pow(2).mean().sqrt()
    assert torch.allclose(ra.values, rms.expand(10), rtol=1e-5)
    # D = identity: x − D(x+σn) = −σn, so r ≈ σ at each centre
    ra = estimate_range_adapter(lambda x, s: x, iter(data), 0.01, 10.0, num_bins=10,
                                samples_per_bin=32, generator=g)
    assert torch.allclose(ra.values, ra.centres(), rtol=0.05)
    # samples_per_bin limits the data used: only the first 16 samples
    ra = estimate_range_adapter(lambda x, s: torch.zeros_like(x), iter(data), 0.01, 10.0,
                                num_bins=4, samples_per_bin=16, generator=g)
    assert torch.allclose(ra.values, data[0].pow(2).mean().sqrt().expand(4), rtol=1e-5)


def test_make_net_seed_gives_the_same_weights_in_any_process_and_keeps_the_callers_rng():
    """torch seeds its default generator randomly per process: a seeded build is reproducible
    across processes and leaves the caller's RNG where it was."""
    import subprocess
    import sys

    code = ("import torch; from bootdiff.config import NetConfig; from bootdiff.nets import make_net; "
            "n = make_net(NetConfig(channels=[8, 16], attention=[False, False]), 1, 1, 8, seed=3); "
            "print(repr(sum(float(p.double().sum()) for p in n.parameters())))")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    torch.manual_seed(12345)  # this process's generator elsewhere than a fresh one's
    state = torch.random.get_rng_state()
    here = make_net(NetConfig(channels=[8, 16], attention=[False, False]), 1, 1, 8, seed=3)
    assert there.strip() == repr(sum(float(p.detach().double().sum()) for p in here.parameters()))
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize("video", [False, True])
def test_zero_output_starts_the_residual_at_D_comb_and_still_trains(video):
    """residual.zero_init: R_θ ≡ 0 at the start, so D_boot = D_comb exactly; the output layer's
    gradient is not zero, so one optimizer step moves the net off zero."""
    from bootdiff.nets import zero_output
    from bootdiff.residual import BootstrapDenoiser

    class Comb(torch.nn.Module):  # a stand-in D_comb: any denoiser of the same shape
        def forward(self, x, sigma):
            return 0.5 * x

    shape = (2, 1, 4, 8, 8) if video else (2, 1, 8, 8)
    net = zero_output(make_net(TINY, in_channels=2, out_channels=1, resolution=8, video=video, seed=0))
    model = BootstrapDenoiser(Comb(), ResidualPrecond(net, sigma_data=0.5), RangeAdapter.ones(-5.0, 4.0))
    x, sigma = torch.randn(shape), torch.tensor([0.3, 2.0])
    assert torch.equal(model(x, sigma), 0.5 * x)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ((model(x, sigma) - x) ** 2).mean().backward()
    opt.step()
    assert model(x, sigma).sub(0.5 * x).abs().max() > 0
    with pytest.raises(TypeError, match="conv_out"):
        zero_output(torch.nn.Linear(2, 2))
