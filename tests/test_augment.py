"""Non-leaking augmentation (bootdiff.augment; EDM Appendix F.2): the labels say exactly what was
done to each image, the net takes them as a conditioning input that adds nothing at zero (so its
saved folder is the plain U-Net, sampled without augmentation), the losses give D the augmented
image and its labels (the residual loss its full-res rows only), and the config refuses it where
it cannot apply, naming the key."""

import os

import pytest
import torch
from torch import nn

from bootdiff.augment import AUGMENT_DIM, augment
from bootdiff.config import ConfigError, LossConfig, NetConfig, load_config
from bootdiff.losses import EDMLoss, noisy_batch
from bootdiff.nets import make_net
from bootdiff.precond import EDMPrecond
from bootdiff.residual import BootstrapDenoiser, ResidualLoss, ResidualPrecond

torch.set_num_threads(1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NET = NetConfig(channels=[8, 16], attention=[False, False], norm_groups=4)


def test_labels_say_what_was_done_and_zero_means_untouched():
    x = torch.randn(400, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    same, labels = augment(x, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(same, x) and labels.shape == (400, AUGMENT_DIM) and not labels.any()

    out, labels = augment(x, 1.0, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and labels.dtype == x.dtype
    moved = 0
    for i in range(len(x)):  # the transformation the label describes, applied to the original, is the output
        assert _redo(x[i], labels[i], out[i]), (i, labels[i])
        moved += not torch.equal(out[i], x[i])
    assert moved > 380  # at p = 1 nearly every image is moved (1/4 · 1/4 · 1/4 · 1/289 of them are not)
    # every transformation happens and every shift is within 1/8 of the side
    assert labels[:, 0].any() and labels[:, 1].any() and labels[:, 3].any() and labels[:, 4].any()
    assert labels[:, 4:].abs().max() <= 0.125 + 1e-6

    # probability p: each transformation on ≈ p of the images (flips: half of those, as EDM's)
    _, labels = augment(torch.zeros(4000, 1, 8, 8), 0.3, torch.Generator().manual_seed(2))
    assert abs(float(labels[:, 0].mean()) - 0.15) < 0.025 and abs(float(labels[:, 1].mean()) - 0.15) < 0.025
    assert abs(float((labels[:, 3] != 0).logical_or(labels[:, 2] != 0).float().mean()) - 0.3) < 0.03
    with pytest.raises(ValueError, match=r"train.augment: augmentation is for images"):
        augment(torch.zeros(2, 1, 4, 8, 8), 0.5)
    with pytest.raises(ValueError, match=r"train.augment=1.5"):
        augment(x, 1.5)


def _redo(original, label, img) -> bool:
    """Whether the flips, quarter turns and shift that ``label`` describes, applied to
    ``original`` in that order, give exactly ``img`` (the shift's reflected band included)."""
    import torch.nn.functional as F

    xflip, yflip, cos_m1, sin, tx, ty = label.tolist()
    h, w = img.shape[-2:]
    ref = original
    if xflip:
        ref = ref.flip(-1)
    if yflip:
        ref = ref.flip(-2)
    quarter = {(0, 0): 0, (-1, 1): 1, (-2, 0): 2, (-1, -1): 3}[(round(cos_m1), round(sin))]
    ref = torch.rot90(ref, quarter, dims=(-2, -1))
    dy, dx = round(ty * h), round(tx * w)
    pad = (h // 8, w // 8)
    padded = F.pad(ref[None], (pad[1], pad[1], pad[0], pad[0]), mode="reflect")[0]
    ref = padded[:, pad[0] - dy:pad[0] - dy + h, pad[1] - dx:pad[1] - dx + w]
    return torch.equal(ref, img)


def test_net_takes_labels_that_add_nothing_at_zero_and_saves_the_plain_unet(tmp_path):
    from diffusers import UNet2DModel

    net = make_net(NET, 1, 1, 16, seed=0, augment_dim=AUGMENT_DIM)
    plain_same_seed = make_net(NET, 1, 1, 16, seed=0)
    assert torch.equal(net.unet.conv_in.weight, plain_same_seed.unet.conv_in.weight)  # the U-Net's draws unchanged
    x, c = torch.randn(3, 1, 16, 16), torch.tensor([0.1, -0.3, 0.5])
    with torch.no_grad():
        base = net(x, c)
        assert torch.equal(base, net(x, c, torch.zeros(3, AUGMENT_DIM)))
        labels = torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 1, -1, 1, 0, 0], [0, 0, 0, 0, 0.125, -0.0625]])
        moved = net(x, c, labels)
    assert (moved - base).abs().flatten(1).amax(1).min() > 1e-6  # each label changes the output
    net.save_pretrained(str(tmp_path / "net"))
    plain = UNet2DModel.from_pretrained(str(tmp_path / "net"))
    assert plain.config.class_embed_type is None and plain.class_embedding is None
    with torch.no_grad():
        torch.testing.assert_close(plain(x, net.time_scale * c).sample, base)
    with pytest.raises(ValueError, match="built without augment_dim"):
        plain_same_seed(x, c, labels)
    with pytest.raises(ValueError, match="clip model"):
        make_net(NetConfig(channels=[8, 16], attention=[False, False], norm_groups=4, kind="video"), 1, 1, 16,
                 video=True, augment_dim=AUGMENT_DIM)


def test_edm_loss_trains_on_the_augmented_image_with_its_labels():
    cfg = LossConfig()
    x = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    want_x, want_labels = augment(x, 0.7, g)
    want_sigma, want_noisy = noisy_batch(want_x, cfg, g)
    seen = {}

    def D(x_noisy, sigma, augment_labels=None):
        seen.update(x=x_noisy, sigma=sigma, labels=augment_labels)
        return torch.zeros_like(x_noisy)

    loss = EDMLoss(cfg, 0.5, augment=0.7)(D, x, torch.Generator().manual_seed(4))
    assert torch.equal(seen["x"], want_noisy) and torch.equal(seen["labels"], want_labels)
    assert seen["labels"].any()
    lam = (want_sigma ** 2 + 0.25) / (want_sigma * 0.5) ** 2
    torch.testing.assert_close(loss, lam * want_x.flatten(1).pow(2).mean(1))
    # off: D is called as before, without labels
    EDMLoss(cfg, 0.5)(lambda xn, s: torch.zeros_like(xn), x, torch.Generator().manual_seed(4))

    # a real EDM-preconditioned net with the augmentation input: gradients reach its label map
    model = EDMPrecond(make_net(NET, 1, 1, 16, seed=0, augment_dim=AUGMENT_DIM), 0.5)
    EDMLoss(cfg, 0.5, augment=1.0)(model, x, torch.Generator().manual_seed(5)).mean().backward()
    assert model.net.augment_map.weight.grad.abs().sum() > 0


class _Combined(nn.Module):
    def forward(self, x, sigma):
        return 0.5 * x


def test_residual_loss_augments_the_full_res_rows_only():
    model = BootstrapDenoiser(_Combined(), ResidualPrecond(make_net(NET, 2, 1, 16, seed=0, augment_dim=AUGMENT_DIM), 0.5))
    seen = []
    inner = model.residual.forward

    def spy(x, sigma, d_comb, augment_labels=None):
        seen.append(augment_labels)
        return inner(x, sigma, d_comb, augment_labels)

    model.residual.forward = spy
    full = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(6))
    low = torch.randn(4, 1, 8, 8)
    lift = lambda y: torch.nn.functional.interpolate(y, scale_factor=2)  # noqa: E731
    loss = ResidualLoss(LossConfig(), 0.5, mu_var=1.0, lift=lift, sigma_tn=0.5, augment=1.0)
    out = loss(model, (full, low), torch.Generator().manual_seed(7))
    assert out.shape == (12,) and len(seen) == 2
    assert seen[0] is not None and seen[0].shape == (8, AUGMENT_DIM) and seen[0].any()
    assert seen[1] is None  # the lifted low-res rows: not augmented
    out.mean().backward()
    assert model.residual.net.augment_map.weight.grad.abs().sum() > 0


def test_config_refuses_augmentation_where_it_cannot_apply():
    qs = os.path.join(REPO, "configs", "quickstart.yaml")
    cfg = load_config(qs, ["full_res.train.augment=0.15", "residual.train.augment=0.15"])
    assert cfg.full_res.train.augment == 0.15
    with pytest.raises(ConfigError, match=r"full_res.train.augment=1.5.*in \[0, 1\]"):
        load_config(qs, ["full_res.train.augment=1.5"])
    with pytest.raises(ConfigError, match=r"views.patch.train.augment=0.2.*where their location says"):
        load_config(qs, ["views.patch.coords=true", "views.patch.train.patience=0", "views.patch.train.augment=0.2"])
    with pytest.raises(ConfigError, match=r"distill.train.augment"):
        load_config(qs, ["distill.enabled=true", "distill.train.augment=0.1"])
