"""Ingest robustness: resumable ingest, corrupt and changed shards (verify / repair), manifest
validation, errors that name the view and key; and ingest in a VAE's latent space."""

import json
import tarfile

import numpy as np
import pytest
import torch

from bootdiff.data.ingest import ingest, main, plan_ingest, run_shard_task, finalize_manifest
from bootdiff.data.loader import ShardError, make_loader, view_urls
from bootdiff.data.shards import ManifestError, read_manifest, sha256_url, validate_manifest
from tests.datagen import FlakySource, RandomSource, collect, image_folder, rand_data, small_cfg  # noqa: F401 (rand_data: a fixture)

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- robustness


def test_interrupted_ingest_resumes_to_the_same_result(tmp_path):
    cfg = small_cfg(tmp_path / "a")
    with pytest.raises(RuntimeError, match="simulated crash"):
        ingest(cfg, progress=False, source=FlakySource(fail_at=150, n=120))
    tars = sorted((tmp_path / "a").rglob("*.tar"))
    assert tars and not list((tmp_path / "a").rglob("*.tmp-*"))  # only whole, committed shards
    for t in tars:
        side = json.loads(open(str(t) + ".json").read())
        assert side["sha256"] == sha256_url(str(t))
    # a crash between shard and sidecar: an orphan shard without sidecar is rewritten
    orphan = tmp_path / "a/t/data/low/low-000001.tar"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"partial garbage")
    tasks = plan_ingest(cfg, source=RandomSource(n=120))
    infos = [run_shard_task(t, source=RandomSource(n=120)) for t in tasks]
    reused = sum(bool(i.meta.get("reused")) for i in infos)
    assert 0 < reused == len(tars) < len(tasks)
    resumed = finalize_manifest(cfg, infos)
    validate_manifest(read_manifest(resumed["root"]))
    # reference: a clean ingest, its tasks run in reverse order (order-independent randomness)
    ref_cfg = small_cfg(tmp_path / "b")
    ref = finalize_manifest(ref_cfg, [run_shard_task(t, source=RandomSource(n=120))
                                      for t in reversed(plan_ingest(ref_cfg, source=RandomSource(n=120)))])
    assert resumed["splits"] == ref["splits"]
    keys = [mm["__key__"] for mm in collect(make_loader(view_urls(resumed, "patch"), 50, mode="eval",
                                                        with_meta=True))[1]]
    assert len(keys) == len(set(keys)) == resumed["splits"]["patch"]["count"]


def _rewrite_member(url, which, mutate):
    """Rewrite the bytes of the ``which``-th .npy member in place (same size; tar stays valid)."""
    with tarfile.open(url) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".npy")][which]
        offset, size = member.offset_data, member.size
    with open(url, "r+b") as f:
        f.seek(offset)
        data = f.read(size)
        f.seek(offset)
        f.write(mutate(data))
    return member.name.split(".")[0]


def test_corrupt_shard_and_sample_raise_or_skip(tmp_path):
    m = ingest(small_cfg(tmp_path), progress=False, source=RandomSource(n=120))
    urls = view_urls(m, "low")
    bad_sample = urls[1]
    key = _rewrite_member(bad_sample, 3, lambda d: b"NOTNUMPY" + d[8:])
    with pytest.raises(ShardError) as err:
        list(make_loader(urls, 8, mode="eval"))
    assert bad_sample in str(err.value) and key in str(err.value)
    truncated = urls[2]
    data = open(truncated, "rb").read()
    open(truncated, "wb").write(data[:len(data) // 2 + 100])
    loader = make_loader(urls[2:], 8, mode="eval")
    with pytest.raises(ShardError, match=truncated) as err:
        list(loader)
    assert "sample key 'low_" in str(err.value)
    with tarfile.open(urls[3]) as tar:  # a garbled tar header in the middle of a shard
        header = tar.getmembers()[10].offset
    with open(urls[3], "r+b") as f:
        f.seek(header)
        f.write(b"\xff" * 512)
    with pytest.raises(ShardError, match="low-000003.tar.*invalid tar header"):
        list(make_loader(urls[3:], 8, mode="eval"))
    skip = make_loader(urls[:3], 8, mode="eval", on_error="skip", num_workers=2)
    n = sum(len(x) for x in skip)
    total = sum(s["count"] for s in m["splits"]["low"]["shards"][:3])
    assert skip.skipped == 2 and total - 25 <= n <= total - 2  # 1 sample + the rest of a shard
    with pytest.raises(ManifestError, match="checksum mismatch"):
        validate_manifest(read_manifest(m["root"]))


def test_manifest_mismatch_is_a_clear_error(rand_data, tmp_path):
    import shutil

    cfg, m, _ = rand_data
    root = tmp_path / "copy"
    shutil.copytree(m["root"], root)
    man = read_manifest(str(root))
    validate_manifest(man)
    entry = json.loads(json.dumps(man))
    entry["splits"]["patch"]["shards"][0]["count"] += 1
    with pytest.raises(ManifestError, match="patch-000000.tar holds .* samples, the manifest says"):
        validate_manifest(entry)
    victim = root / "low" / "low-000002.tar"
    victim.write_bytes(victim.read_bytes()[:-512] + b"\1" * 512)
    with pytest.raises(ManifestError, match="low-000002.tar checksum mismatch"):
        validate_manifest(man)
    victim.unlink()
    with pytest.raises(ManifestError, match="low-000002.tar is listed in the manifest but missing"):
        validate_manifest(man)
    with pytest.raises(ManifestError, match="no split/view 'nope'"):
        view_urls(man, "nope")
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(str(tmp_path / "nowhere"))


def test_shards_are_verified_once_per_process(rand_data, monkeypatch):
    import bootdiff.data.shards as shards

    _, m, _ = rand_data
    hashed = []
    real = shards.sha256_url
    monkeypatch.setattr(shards, "sha256_url", lambda url: hashed.append(url) or real(url))
    monkeypatch.setattr(shards, "_VERIFIED", set())
    urls = view_urls(m, "patch")
    assert hashed == urls  # every shard hashed before its URL is handed out ...
    assert view_urls(m["root"], "patch") == urls and len(hashed) == len(urls)  # ... once per process
    assert view_urls(m, "low", verify=False) and len(hashed) == len(urls)


def test_changed_shard_is_caught_before_use_then_verified_and_repaired(tmp_path, capsys):
    import hashlib


    from bootdiff.data.shards import ChecksumError

    folder = image_folder(tmp_path / "imgs", seed=2)
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("name: ver\ndata:\n  source: {kind: images, path: %s}\n  resolution: 16\n"
                        "  channels: 3\n  num_full: 4\n  num_test: 6\n  num_val: 2\n  shard_size: 8\n"
                        "views:\n  low: {kind: downsample, factor: 4}\n" % folder)
    args = [str(cfg_file), f"storage={tmp_path / 'runs'}", "--no-progress"]
    assert main(args) == 0
    root = tmp_path / "runs" / "ver" / "data"
    manifest = read_manifest(str(root))
    urls = view_urls(manifest, "low", verify=False)
    assert len(urls) == 4
    original = collect(make_loader(urls, 64, mode="eval", with_meta=True))
    victim = urls[2]
    clean_bytes = open(victim, "rb").read()
    expected = manifest["splits"]["low"]["shards"][2]["sha256"]
    # one byte of one sample's pixels changed in place: the tar stays valid, the size is kept
    _rewrite_member(victim, 1, lambda d: d[:-1] + bytes([d[-1] ^ 0x01]))
    changed = open(victim, "rb").read()
    assert len(changed) == len(clean_bytes) and changed != clean_bytes
    actual = hashlib.sha256(changed).hexdigest()
    silent = collect(make_loader(urls, 64, mode="eval", with_meta=True))  # unchecked: wrong data flows
    assert [mm["__key__"] for mm in silent[1]] == [mm["__key__"] for mm in original[1]]
    assert not torch.equal(silent[0], original[0])
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}

    def stream(view):  # what every stage does: a view's URLs from the manifest, then a loader
        yield from make_loader(view_urls(read_manifest(str(root)), view), 8, mode="eval")

    batches = stream("low")
    with pytest.raises(ChecksumError) as err:
        next(batches)
    assert victim in str(err.value) and expected in str(err.value) and actual in str(err.value)
    assert err.value.url == victim and (err.value.expected, err.value.actual) == (expected, actual)
    assert sum(len(x) for x in stream("full")) == 4  # the other splits still load

    capsys.readouterr()
    assert main(args + ["--verify"]) == 1
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["checked"] == 7 and [b["url"] for b in report["bad"]] == [victim]  # full, test, val, 4 view shards
    assert expected in report["bad"][0]["problem"] and actual in report["bad"][0]["problem"]
    assert victim in out.err and report["repaired"] == []
    assert open(victim, "rb").read() == changed  # verifying alone changes nothing

    assert main(args + ["--verify", "--repair"]) == 0
    assert json.loads(capsys.readouterr().out)["repaired"] == ["low/low-000002.tar"]
    rewritten = {victim, victim + ".json", str(root / "manifest.json")}
    assert {str(p) for p, t in mtimes.items() if p.stat().st_mtime_ns != t} == rewritten
    assert open(victim, "rb").read() == clean_bytes
    assert read_manifest(str(root))["splits"] == manifest["splits"]
    again = collect(make_loader(view_urls(read_manifest(str(root)), "low"), 64, mode="eval", with_meta=True))
    assert torch.equal(again[0], original[0]) and again[1] == original[1]
    assert main(args + ["--verify"]) == 0 and json.loads(capsys.readouterr().out)["bad"] == []


def test_cli_with_image_folder(tmp_path, capsys):

    folder = image_folder(tmp_path / "imgs", seed=1)
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("name: cli\ndata:\n  source: {kind: images, path: %s}\n  resolution: 16\n"
                        "  channels: 3\n  num_full: 4\n  num_test: 6\n  num_val: 2\nviews:\n  low: {kind: downsample, factor: 4}\n"
                        % folder)
    assert main([str(cfg_file), f"storage={tmp_path / 'runs'}", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["splits"]["low"]["count"] == 40 - 4 - 6 - 2 and out["splits"]["val"]["count"] == 2 and out["splits"]["low"]["shape"] == [3, 4, 4]
    validate_manifest(read_manifest(out["manifest"]))
    with pytest.raises(ValueError, match="reserved"):
        main([str(cfg_file), f"storage={tmp_path / 'runs'}", "views.full.kind=full", "--no-progress"])


class BadMaskSource(RandomSource):
    def mask(self, i):
        return [[True]]  # not an array: the clean-patch cut cannot use it


def test_ingest_errors_name_the_view_and_key(tmp_path):
    """What the check at load cannot see (the source's real sample size, a value set after
    load, a broken mask) fails at ingest naming ``views.<name>`` and the key, before any shard of
    that view is written."""
    cfg = small_cfg(tmp_path, extra=["views.patch.patch_size=12"])  # fits the 16² of the config ...
    with pytest.raises(ValueError, match=r"^views\.patch\.patch_size=12: larger than the data's 8x8 samples"):
        ingest(cfg, progress=False, source=RandomSource(n=60, res=8))  # ... not the source's 8²
    assert not list((tmp_path / "t" / "data").rglob("patch-*.tar"))
    cfg = small_cfg(tmp_path, name="t2", extra=["views.low.factor=8"])
    with pytest.raises(ValueError, match=r"^views\.low\.factor=8: does not divide the data's sample size 12x12"):
        ingest(cfg, progress=False, source=RandomSource(n=60, res=12))
    cfg = small_cfg(tmp_path, name="t3")
    cfg.views.low.factor = 0  # after the load-time check (a bare ZeroDivisionError before)
    with pytest.raises(ValueError, match=r"^views\.low\.factor=0: must be an integer ≥ 1"):
        ingest(cfg, progress=False, source=RandomSource(n=60))
    cfg = small_cfg(tmp_path, name="t4", extra=["views.clean.kind=clean_patch", "views.clean.patch_size=4"])
    with pytest.raises(ValueError, match=r"^views\.clean \(kind clean_patch\): cutting source sample \d+ of "
                                         r"shape \(1, 16, 16\) failed: AttributeError"):
        ingest(cfg, progress=False, source=BadMaskSource(n=60))


# ----------------------------------------------------------------------------- latent space


def test_latent_ingest_with_tiny_vae(tmp_path):
    from diffusers import AutoencoderKL

    from bootdiff.data.latent import decode, encode, load_vae

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16],
                        latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    src = RandomSource(n=60)
    cfg = small_cfg(tmp_path, extra=["data.latent.enabled=true", f"data.latent.vae_path={tmp_path / 'vae'}",
                                     "data.latent.batch_size=7", "views.patch.patch_size=4"])
    m = ingest(cfg, progress=False, source=src)
    sp = m["splits"]
    assert sp["full"]["dtype"] == "float16" and sp["full"]["shape"] == [4, 8, 8]
    assert sp["patch"]["shape"] == [4, 4, 4] and sp["low"]["shape"] == [4, 4, 4]
    assert m["latent"]["vae_path"] == str(tmp_path / "vae")
    x, metas = collect(make_loader(view_urls(m, "full"), 8, mode="eval", with_meta=True))
    imgs = torch.from_numpy(np.stack([src[mm["source_index"]] for mm in metas])).permute(0, 3, 1, 2)
    z = encode(load_vae(str(tmp_path / "vae")), imgs.float() / 127.5 - 1)
    expect = (vae.encode(imgs.float() / 127.5 - 1).latent_dist.mean * 0.5).detach()
    assert x.dtype == torch.float32 and torch.allclose(z, expect, atol=1e-5)
    assert torch.allclose(x, z, atol=2e-3, rtol=2e-3) and x.std() > 0.05  # float16 storage
    xp, mp = collect(make_loader(view_urls(m, "patch"), 8, mode="eval", with_meta=True))
    full_z = encode(load_vae(str(tmp_path / "vae")), torch.from_numpy(
        np.stack([src[mm["source_index"]] for mm in mp])).permute(0, 3, 1, 2).float() / 127.5 - 1)
    for xi, zi, mm in zip(xp, full_z, mp):
        r, c = mm["location"]
        assert torch.allclose(xi, zi[:, r:r + 4, c:c + 4], atol=2e-3, rtol=2e-3)
    out = decode(load_vae(str(tmp_path / "vae")), x[:3])
    assert out.shape == (3, 1, 16, 16) and out.abs().max() <= 1
    with pytest.raises(FileNotFoundError, match="no VAE folder"):
        load_vae(str(tmp_path / "missing"))


def test_data_errors_cross_processes_intact():
    """Ray pickles a worker's exception to its controller: the shard errors must arrive as
    themselves (same class, message and fields), not as a TypeError from their constructor."""
    import pickle

    from bootdiff.data.shards import ChecksumError
    from bootdiff.errors import deterministic

    for err in (ChecksumError("s3://b/full/full-000000.tar", "a" * 64, "b" * 64),
                ShardError("/d/patch-000001.tar", "mnist-train-00042", "truncated tar"),
                ShardError("/d/patch-000002.tar", None, "not a tar file")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and back.url == err.url
        assert deterministic(back)
