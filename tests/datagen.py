"""Data for the ingest / loader tests (tests/test_data.py, tests/test_data_robustness.py): tiny
in-memory sources, a small config, and one module-scoped ingest of random images with masks."""

import numpy as np
import pytest
import torch

from bootdiff.config import load_config
from bootdiff.data.ingest import ingest


class RandomSource:
    """A tiny in-memory Source: random uint8 images (HWC) or videos (THWC), optional masks."""

    def __init__(self, n=120, res=16, channels=1, frames=0, masks=False, seed=0, fixed_test=None):
        rng = np.random.default_rng(seed)
        shape = (n, frames, res, res, channels) if frames else (n, res, res, channels)
        self.x = rng.integers(0, 256, shape, dtype=np.uint8)
        self.kind = "video" if frames else "image"
        self.description = f"random {shape}"
        self.ids = [f"rand-{i:05d}" for i in range(n)]
        self.fixed_test = fixed_test
        self.masks = None
        if masks:  # a band of random height at the bottom, like a subtitle
            self.masks = np.zeros((n, res, res), bool)
            for i in range(n):
                self.masks[i, res - 1 - int(rng.integers(0, res // 2)):] = True

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.x[i]

    def mask(self, i):
        return None if self.masks is None else self.masks[i]


class FlakySource(RandomSource):
    """Fails on the ``fail_at``-th read: an ingest interrupted mid-way."""

    def __init__(self, fail_at, **kw):
        super().__init__(**kw)
        self.reads, self.fail_at = 0, fail_at

    def __getitem__(self, i):
        self.reads += 1
        if self.reads == self.fail_at:
            raise RuntimeError("simulated crash")
        return super().__getitem__(i)


def small_cfg(storage, name="t", extra=()):
    return load_config(None, [f"storage={storage}", f"name={name}", "data.resolution=16",
                              "data.num_full=10", "data.num_test=20", "data.num_val=4", "data.shard_size=24",
                              "views.patch.kind=patch", "views.patch.patch_size=8",
                              "views.patch.per_sample=3", "views.low.kind=downsample",
                              "views.low.factor=2", *extra])


def collect(loader):
    xs, metas = [], []
    for x, m in loader:
        xs.append(x)
        metas.extend(m)
    return torch.cat(xs), metas


def block_mean(img_chw, f):
    c, h, w = img_chw.shape
    return img_chw.astype(np.float64).reshape(c, h // f, f, w // f, f).mean(axis=(2, 4))


@pytest.fixture(scope="module")
def rand_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rand")
    src = RandomSource(n=120, masks=True)
    cfg = small_cfg(root, extra=["views.clean.kind=clean_patch", "views.clean.patch_size=6",
                                 "views.clean.per_sample=2"])
    return cfg, ingest(cfg, progress=False, source=src), src


def image_folder(folder, seed: int, n: int = 40):
    """``n`` random 16×16 RGB PNGs in a new ``folder`` (a user's image-folder source)."""
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"im{i:03d}.png")
    return folder


def bench_overrides(tmp) -> list:
    """The data-efficiency benchmark's tiny config (the `bench` fixture, tests/conftest.py): 16×16,
    a patch and a low-res view, two residual settings."""
    return [f"storage={tmp}/unused", "name=t", "data.resolution=16", "data.num_test=20",
            "data.shard_size=24", "views.patch.kind=patch", "views.patch.patch_size=8", "views.patch.per_sample=2",
            "views.low.kind=downsample", "views.low.factor=2", "sweep.mu_var=[0.0,1.0]", "sweep.mu_l1=[0.0]",
            "sweep.range_adapter=[true]", "eval.max_samples=20", "eval.num_sigma=3"]
