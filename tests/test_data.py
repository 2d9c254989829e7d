"""Ingest → shards → loaders: real MNIST / Moving MNIST, S3 (moto server), worker splitting.
Resumable ingest, corruption, manifest validation and latent space: tests/test_data_robustness.py."""

import json

import numpy as np
import pytest
import torch

from bootdiff.config import load_config
from bootdiff.data.ingest import ingest
from bootdiff.data.loader import make_loader, view_urls
from bootdiff.data.shards import read_manifest, validate_manifest
from tests.datagen import RandomSource, block_mean, collect, rand_data, small_cfg  # noqa: F401 (rand_data: a fixture)

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- real MNIST


@pytest.fixture(scope="module")
def mnist_data(mnist_wheel, tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    cfg = load_config(None, [f"storage={root}", "name=mnist", "data.source.kind=mnist",
                             f"data.source.path={mnist_wheel}", "data.source.limit=2000",
                             "data.resolution=32", "data.num_full=64", "data.num_test=128",
                             "data.shard_size=500", "views.patch.kind=patch",
                             "views.patch.patch_size=16", "views.patch.per_sample=2",
                             "views.low.kind=downsample", "views.low.factor=2"])
    manifest = ingest(cfg, progress=False)
    from bootdiff.data.ingest import _data_cfg, get_source

    return cfg, manifest, get_source(_data_cfg(cfg))


def test_mnist_ingest_counts_splits_and_geometry(mnist_data):
    from bootdiff.views import DownsampleView, PatchView

    cfg, manifest, source = mnist_data
    m = read_manifest(manifest["root"])
    validate_manifest(m)
    sp = m["splits"]
    n_pool = len(source) - len(source.fixed_test)
    assert (sp["full"]["count"], sp["test"]["count"], sp["val"]["count"]) == (64, 128, 32)  # num_val: default
    assert sp["patch"]["count"] == 2 * (n_pool - 64 - 32) and sp["low"]["count"] == n_pool - 64 - 32
    assert sp["patch"]["shape"] == [1, 16, 16] and sp["low"]["shape"] == [1, 16, 16]
    assert sp["full"]["shape"] == [1, 32, 32] and sp["full"]["dtype"] == "uint8"
    assert "MNIST" in m["source"]["description"] and m["split_seed"] == 0

    ids = {}
    for split in ("full", "test", "val", "patch", "low"):
        x, metas = collect(make_loader(view_urls(m, split), 256, mode="eval", with_meta=True))
        assert len(x) == sp[split]["count"] and list(x.shape[1:]) == sp[split]["shape"]
        assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1 and x.max() > 0.9
        assert abs(x.std().item() - sp[split]["sigma_data"]) < 1e-3
        ids[split] = {mm["source_id"] for mm in metas}
        if split == "patch":  # a patch equals the crop of its source image at its location
            for xi, mm in list(zip(x, metas))[:300]:
                img = torch.from_numpy(source[mm["source_index"]]).permute(2, 0, 1)[None].float() / 127.5 - 1
                pv = PatchView(32, 16, locations=torch.tensor([mm["location"]]))
                assert torch.equal(pv.project(img)[0], xi), mm
        if split == "low":  # low-res equals the block mean (area downsample) up to uint8 rounding
            for xi, mm in list(zip(x, metas))[:300]:
                img = source[mm["source_index"]].transpose(2, 0, 1)
                expect = np.rint(block_mean(img, 2)) / 127.5 - 1
                assert np.allclose(xi.numpy(), expect, atol=1e-6), mm
                low = DownsampleView(2).project(torch.from_numpy(img)[None].float() / 127.5 - 1)[0]
                assert (low - xi).abs().max() <= 0.5 / 127.5 + 1e-6
    assert ids["patch"] == ids["low"]
    assert not ids["full"] & ids["test"] and not ids["full"] & ids["patch"] and not ids["test"] & ids["patch"]
    assert not ids["val"] & (ids["full"] | ids["test"] | ids["patch"])  # the sweep chooses on unseen samples
    assert all(i.startswith("mnist-test") for i in ids["test"])
    assert not any(i.startswith("mnist-test") for i in ids["val"])  # validation comes from the training pool
    assert len(ids["full"] | ids["val"] | ids["patch"]) == n_pool


def test_train_loader_deterministic_and_equal_epochs(mnist_data):
    _, m, _ = mnist_data
    urls = view_urls(m, "patch")
    a = [b for b in make_loader(urls, 32, seed=3, rank=0, world_size=2, epoch_samples=640)]
    b = [b for b in make_loader(urls, 32, seed=3, rank=0, world_size=2, epoch_samples=640)]
    c = [b for b in make_loader(urls, 32, seed=4, rank=0, world_size=2, epoch_samples=640)]
    r1 = make_loader(urls, 32, seed=3, rank=1, world_size=2, epoch_samples=640, num_workers=2)
    assert len(a) == len(r1) == len(list(r1)) == 10
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    loader = make_loader(urls, 32, seed=3, rank=0, world_size=2, epoch_samples=640)
    e1, e2 = next(iter(loader)), next(iter(loader))  # epochs differ
    assert not torch.equal(e1, e2)


def test_moving_mnist_clips_are_frame_windows(mnist_wheel, tmp_path):
    cfg = load_config(None, [f"storage={tmp_path}", "name=mm", "data.source.kind=moving_mnist",
                             f"data.source.path={mnist_wheel}", "data.source.num_videos=12",
                             "data.source.num_frames=12", "data.resolution=32", "data.resize=resize",
                             "data.num_full=2", "data.num_test=1", "data.num_val=1", "data.shard_size=8",
                             "views.clip.kind=clip", "views.clip.clip_len=5", "views.clip.per_sample=2"])
    m = ingest(cfg, progress=False)
    from bootdiff.data.ingest import _data_cfg, get_source

    src = get_source(_data_cfg(cfg), min_frames=5)
    assert m["splits"]["clip"]["shape"] == [1, 5, 32, 32] and m["splits"]["test"]["shape"] == [1, 12, 32, 32]
    x, metas = collect(make_loader(view_urls(m, "clip"), 4, mode="eval", with_meta=True))
    assert len(x) == 2 * (12 - 2 - 1)  # 12 videos less 2 full-res and 1 validation (the test video is MNIST-test)
    for xi, mm in zip(x, metas):
        t0, t1 = mm["frames"]
        video = torch.from_numpy(src[mm["source_index"]]).permute(3, 0, 1, 2).float() / 127.5 - 1
        assert t1 - t0 == 5 and torch.equal(video[:, t0:t1], xi)


# ----------------------------------------------------------------------------- S3 (moto)


def test_s3_ingest_and_load_round_trip(s3, tmp_path):
    bucket, _ = s3
    src = RandomSource(n=80)
    cfg = small_cfg(f"{bucket}/runs", name="s3t")
    m = ingest(cfg, progress=False, source=src)
    assert m["root"] == f"{bucket}/runs/s3t/data"
    m2 = read_manifest(f"{bucket}/runs/s3t/data/manifest.json")
    validate_manifest(m2)
    assert m2["splits"] == json.loads(json.dumps(m["splits"]))
    # the same config on local disk gives byte-identical shards
    local = ingest(small_cfg(tmp_path, name="s3t"), progress=False, source=src)
    for split, entry in m2["splits"].items():
        assert [s["sha256"] for s in entry["shards"]] == [s["sha256"] for s in local["splits"][split]["shards"]]
    x, metas = collect(make_loader(view_urls(m2, "patch"), 16, mode="eval", with_meta=True, num_workers=2))
    assert len(x) == m2["splits"]["patch"]["count"] and metas[0]["__url__"].startswith("s3://")
    for xi, mm in zip(x, metas):
        r, c = mm["location"]
        expect = src[mm["source_index"]][r:r + 8, c:c + 8].transpose(2, 0, 1) / 127.5 - 1
        assert np.allclose(xi.numpy(), expect, atol=1e-6)
    # brace-notation URL on s3 through webdataset's own pipeline (the registered fsspec opener)
    import webdataset as wds

    n = len(m2["splits"]["low"]["shards"])
    pattern = f"{bucket}/runs/s3t/data/low/low-{{000000..{n - 1:06d}}}.tar"
    assert sum(1 for _ in wds.WebDataset(pattern, shardshuffle=False)) == m2["splits"]["low"]["count"]
    assert len(collect(make_loader(pattern, 7, mode="eval", with_meta=True))[0]) == m2["splits"]["low"]["count"]


# ----------------------------------------------------------------------------- splitting


@pytest.mark.parametrize("split", ["patch", "full"])  # many shards / fewer shards than consumers
def test_ranks_times_workers_exactly_once(rand_data, split):
    _, m, _ = rand_data
    keys = []
    for rank in range(2):
        loader = make_loader(view_urls(m, split), 5, mode="eval", rank=rank, world_size=2,
                             num_workers=2, with_meta=True)
        keys.append([mm["__key__"] for mm in collect(loader)[1]])
    assert keys[0] and keys[1] and not set(keys[0]) & set(keys[1])
    everything = [mm["__key__"] for mm in collect(make_loader(view_urls(m, split), 64, mode="eval",
                                                              with_meta=True))[1]]
    assert sorted(keys[0] + keys[1]) == sorted(everything)
    assert len(everything) == len(set(everything)) == m["splits"][split]["count"]


def test_clean_patches_miss_the_mask(rand_data):
    _, m, src = rand_data
    x, metas = collect(make_loader(view_urls(m, "clean"), 32, mode="eval", with_meta=True))
    assert len(x) == m["splits"]["clean"]["count"] > 0
    for xi, mm in zip(x, metas):
        r, c = mm["location"]
        assert not src.mask(mm["source_index"])[r:r + 6, c:c + 6].any()
        assert np.allclose(xi.numpy(), src[mm["source_index"]][r:r + 6, c:c + 6].transpose(2, 0, 1) / 127.5 - 1,
                           atol=1e-6)
