"""Fréchet distance (bootdiff/evaluation/fd.py, docs/METHOD.md §8): randomly initialised feature networks saved
the way a user has them (a state-dict .pth for Inception-v3, a save_pretrained folder for DINOv2),
FD of a set with itself, FD growing with a mean shift, the statistics against scipy, the errors."""

import types

import numpy as np
import pytest
import scipy.linalg
import torch

from bootdiff.evaluation import fd
from bootdiff.evaluation.inception import InceptionV3FID


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(InceptionV3FID().state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       patch_size=14, image_size=224)
    path = tmp_path_factory.mktemp("dinov2") / "dinov2-tiny"
    Dinov2Model(cfg).save_pretrained(path)
    return str(path)


def _images(n, channels, seed=0):
    """[-1, 1] images whose values stay inside [-1, 1] after a shift of up to +0.5."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, 32, 32, generator=g) * 0.8 - 0.4


def _scipy_fd(f1, f2):
    """The textbook computation (pytorch-fid / NVlabs/edm): scipy's matrix square root."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_matches_scipy_and_closed_form():
    rng = np.random.default_rng(0)
    f1 = rng.normal(size=(60, 5)) @ rng.normal(size=(5, 5))
    f2 = rng.normal(size=(50, 5)) * 2.0 + 0.7
    expected = _scipy_fd(f1, f2)
    assert fd.frechet_distance(*fd.statistics(f1), *fd.statistics(f2)) == pytest.approx(expected, rel=1e-9)
    assert fd.fd_features(f1, f2) == pytest.approx(expected, rel=1e-9)
    # Diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    assert fd.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(5.0 + 4.0 + 1.0, rel=1e-12)
    with pytest.raises(ValueError, match="shapes do not match"):
        fd.frechet_distance(mu1, np.diag(a), mu2[:2], np.diag(b[:2]))


def test_fd_features_fewer_samples_than_dimensions():
    # The D x D-free path (N < D) against the textbook formula on the same singular covariances.
    rng = np.random.default_rng(1)
    f1 = rng.normal(size=(6, 40))
    f2 = rng.normal(size=(8, 40)) * 1.5 + 0.3
    expected = fd.frechet_distance(*fd.statistics(f1), *fd.statistics(f2))
    assert fd.fd_features(f1, f2) == pytest.approx(expected, rel=1e-9)
    assert abs(fd.fd_features(f1, f1)) < 1e-9 * expected


def test_inception_fd_self_zero_and_grows_with_mean_shift(inception_file):
    net = fd.load_feature_network("inception", inception_file, "cpu")
    assert net.dim == 2048
    base = _images(2, 3)  # 2 images: the network is 5.7 GFLOP per image at 299 x 299
    f0 = fd.features(net, base, batch_size=1)
    assert f0.shape == (2, 2048) and f0.dtype == np.float64 and np.isfinite(f0).all()
    values = [fd.fd_features(fd.features(net, base + s, batch_size=2), f0) for s in (0.1, 0.25, 0.5)]
    self_fd = fd.fd_features(f0, f0)
    assert abs(self_fd) < 1e-6 * values[0], (self_fd, values)
    assert values[0] < values[1] < values[2], values


def test_dinov2_fd_self_zero_and_grows_with_mean_shift(dinov2_dir):
    net = fd.load_feature_network("dinov2", dinov2_dir, "cpu")
    assert net.dim == 32
    base = _images(8, 1, seed=1)  # grey: repeated to 3 channels
    f0 = fd.features(net, base, batch_size=3)
    assert f0.shape == (8, 32) and f0.dtype == np.float64
    np.testing.assert_allclose(fd.features(net, base.repeat(1, 3, 1, 1), batch_size=8), f0, rtol=1e-5, atol=1e-6)
    values = [fd.fd(base + s, base, net, batch_size=4) for s in (0.1, 0.25, 0.5)]
    self_fd = fd.fd(base, base, net, batch_size=4)
    assert abs(self_fd) < 1e-6 * values[0], (self_fd, values)
    assert values[0] < values[1] < values[2], values


def test_missing_and_wrong_weights_are_clear_errors(tmp_path, inception_file, dinov2_dir):
    missing = str(tmp_path / "nowhere.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.pth.*does not exist.*pt_inception-2015-12-05"):
        fd.load_feature_network("inception", missing)
    with pytest.raises(FileNotFoundError, match="nowhere.pth.*does not exist.*save_pretrained"):
        fd.load_feature_network("dinov2", missing)
    text = tmp_path / "weights.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="weights.pth.*could not be read as a PyTorch state dict"):
        fd.load_feature_network("inception", str(text))
    other = tmp_path / "linear.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), other)
    with pytest.raises(ValueError, match="linear.pth.*is not a PyTorch state dict.*missing keys"):
        fd.load_feature_network("inception", str(other))
    with pytest.raises(FileNotFoundError, match="is a folder"):
        fd.load_feature_network("inception", dinov2_dir)
    with pytest.raises(FileNotFoundError, match="is a file.*save_pretrained"):
        fd.load_feature_network("dinov2", inception_file)
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_folder.*cannot read.*config.json"):
        fd.load_feature_network("dinov2", str(empty))
    (empty / "config.json").write_text('{"model_type": "vit"}')
    with pytest.raises(ValueError, match="model_type='vit', not 'dinov2'"):
        fd.load_feature_network("dinov2", str(empty))
    with pytest.raises(ValueError, match="eval.features.kind='clip'"):
        fd.load_feature_network("clip", inception_file)
    with pytest.raises(ValueError, match="eval.features.path is not set"):
        fd.load_feature_network("inception", None)


def test_check_features_config(inception_file):
    off = fd.check_features_config(types.SimpleNamespace(kind="none", path=None, batch_size=64))
    assert off.startswith("FD skipped")
    assert fd.check_features_config(types.SimpleNamespace(kind="inception", path=inception_file,
                                                          batch_size=8)) is None
    with pytest.raises(ValueError, match="batch_size=0"):
        fd.check_features_config(types.SimpleNamespace(kind="inception", path=inception_file, batch_size=0))
    with pytest.raises(ValueError, match="3 channels|C = 1 or 3"):
        fd.to_uint8_rgb(torch.zeros(2, 4, 8, 8))
