"""Metrics (`bootdiff.evaluation.metrics`: generalization error with fixed noise, sliced Wasserstein
distance, memorisation), the run's URLs (`bootdiff.run.layout`), FD wired into
`bootdiff.evaluation.evaluate.sample_quality` with a random local DINOv2, the `eval.features` check at
config load, and the full-res baseline's default budget. The sweep's bookkeeping is tested in
tests/test_sweep.py; the evaluation procedure itself runs end to end in tests/test_experiment.py."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from bootdiff.config import EvalConfig
from bootdiff.evaluation.metrics import (fixed_noise, generalization_error, laplacian_pyramid, memorization_rate,
                              nearest_neighbour_distance, sigma_grid, sliced_wasserstein,
                              sliced_wasserstein_levels)

try:
    from gmm import GaussianMixture
    from test_fd import dinov2_dir  # noqa: F401  (fixture: a random DINOv2 in a save_pretrained folder)
except ImportError:  # tests/ imported as a package
    from tests.gmm import GaussianMixture
    from tests.test_fd import dinov2_dir  # noqa: F401

torch.set_num_threads(1)

GM = GaussianMixture.two_blobs(d=16, sep=3.0, var=0.25, shape=(1, 4, 4))
SD = GM.sigma_data()
GRID = sigma_grid(EvalConfig(num_sigma=8, sigma_min=0.01, sigma_max=20.0))


def _batches(x, bs):
    return [x[i:i + bs] for i in range(0, len(x), bs)]


def _data(n=600, seed=0):
    return GM.sample(n, torch.Generator().manual_seed(seed)).float()


def test_sigma_grid():
    g = sigma_grid(EvalConfig(num_sigma=5, sigma_min=0.01, sigma_max=100.0))
    assert len(g) == 5 and abs(g[0] - 0.01) < 1e-12 and abs(g[-1] - 100.0) < 1e-9
    r = [b / a for a, b in zip(g[:-1], g[1:])]
    assert max(r) - min(r) < 1e-9   # log-spaced
    with pytest.raises(ValueError, match="sigma_min"):
        sigma_grid(EvalConfig(sigma_min=1.0, sigma_max=0.5))


def test_exact_denoiser_beats_baselines():
    x = _data()
    exact = generalization_error(GM, _batches(x, 128), GRID, SD, seed=0)
    identity = generalization_error(lambda x, s: x, _batches(x, 128), GRID, SD, seed=0)
    # the best linear (Wiener) shrink for the mixture's covariance ≈ scalar shrink to the mean
    mu = GM.mean().float().reshape(1, 1, 4, 4)
    shrink = lambda x, s: mu + (x - mu) * SD ** 2 / (SD ** 2 + s.reshape(-1, 1, 1, 1) ** 2)
    wiener = generalization_error(shrink, _batches(x, 128), GRID, SD, seed=0)
    assert exact["n"] == 600 and exact["sigma"] == GRID and len(exact["mean"]) == len(GRID)
    assert exact["total"] < wiener["total"] < identity["total"]
    # identity: λ(σ)σ²·E n² = (σ² + σd²)/σd² up to noise
    for s, m in zip(GRID, identity["mean"]):
        assert abs(m / ((s ** 2 + SD ** 2) / SD ** 2) - 1) < 0.05
    # per σ in the middle of the grid (where the mixture is far from linear) the exact one wins
    for j in range(2, 6):
        assert exact["mean"][j] < wiener["mean"][j]
    # vs D = x: clearly better once σ is not tiny; at σ → 0 both tend to λσ² ≈ 1 (within noise)
    for s, e, i in zip(GRID, exact["mean"], identity["mean"]):
        assert e < i if s > 0.05 else abs(e / i - 1) < 0.01


def test_fixed_noise_across_calls_batch_sizes_and_denoisers():
    x = _data(100)
    seen = {}

    def recorder(tag):
        def D(xn, s):
            seen.setdefault(tag, []).append((float(s[0]), xn.clone()))
            return GM(xn, s)
        return D

    a = generalization_error(recorder("a"), _batches(x, 100), GRID, SD, seed=7)
    b = generalization_error(recorder("b"), _batches(x, 13), GRID, SD, seed=7)
    c = generalization_error(GM, _batches(x, 37), GRID, SD, seed=7)
    for k in ("mean", "quantile"):
        torch.testing.assert_close(torch.tensor(a[k]), torch.tensor(b[k]), rtol=1e-6, atol=0)
        torch.testing.assert_close(torch.tensor(a[k]), torch.tensor(c[k]), rtol=1e-6, atol=0)
    # x_σ for every (sample, σ) identical regardless of batching
    def by_sigma(tag):
        out = {}
        for s, xn in seen[tag]:
            out.setdefault(s, []).append(xn)
        return {s: torch.cat(v) for s, v in out.items()}
    sa, sb = by_sigma("a"), by_sigma("b")
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[s], sb[s]) for s in sa)
    # a different seed changes the noise
    d = generalization_error(GM, _batches(x, 100), GRID, SD, seed=8)
    assert d["mean"] != a["mean"]
    # max_samples truncates in order
    e = generalization_error(GM, _batches(torch.cat([x, _data(200, 5)]), 64), GRID, SD, seed=7, max_samples=100)
    assert e["n"] == 100
    torch.testing.assert_close(torch.tensor(e["mean"]), torch.tensor(a["mean"]), rtol=1e-6, atol=0)


def test_fixed_noise_is_standard_normal_and_independent():
    n = fixed_noise(0, 0, 0, 500, (4, 4))
    m = fixed_noise(0, 1, 0, 500, (4, 4))
    assert abs(float(n.mean())) < 4 / math.sqrt(n.numel()) and abs(float(n.std()) - 1) < 0.03
    assert abs(float((n * m).mean())) < 4 / math.sqrt(n.numel())
    torch.testing.assert_close(fixed_noise(0, 0, 250, 10, (4, 4)), n[250:260], rtol=0, atol=0)


def test_quantiles_behave():
    x = _data(400)
    r = {d: generalization_error(GM, _batches(x, 100), GRID, SD, seed=1, delta=d, return_per_sample=True)
         for d in (0.0, 0.1, 0.5)}
    e = r[0.1]["per_sample"]
    assert e.shape == (400, len(GRID)) and (e >= 0).all()
    torch.testing.assert_close(torch.tensor(r[0.1]["quantile"], dtype=torch.float64), torch.quantile(e, 0.9, dim=0))
    torch.testing.assert_close(torch.tensor(r[0.0]["quantile"], dtype=torch.float64), e.max(0).values)
    for j in range(len(GRID)):
        q0, q1, q5 = r[0.0]["quantile"][j], r[0.1]["quantile"][j], r[0.5]["quantile"][j]
        assert q0 >= q1 >= q5
        # per-sample squared errors are right-skewed: median < mean < 0.9 quantile
        assert q5 < r[0.1]["mean"][j] < q1
    assert r[0.1]["mean"] == r[0.5]["mean"]


def test_generalization_error_bad_input():
    with pytest.raises(ValueError, match="delta"):
        generalization_error(GM, [_data(4)], GRID, SD, delta=1.0)
    with pytest.raises(ValueError, match="no samples"):
        generalization_error(GM, [], GRID, SD)
    with pytest.raises(ValueError, match="sigma_grid"):
        generalization_error(GM, [_data(4)], [0.0, 1.0], SD)


# ----------------------------------------------------------------------------- SWD


def _smooth_images(n, seed, width=1.5, size=32):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, size, size, generator=g)
    r = torch.arange(-6, 7, dtype=torch.float32)
    k = torch.exp(-0.5 * (r / width) ** 2)
    k = (k / k.sum())
    z = F.conv2d(F.pad(z, (6, 6, 0, 0), mode="circular"), k.reshape(1, 1, 1, -1).expand(3, 1, 1, 13), groups=3)
    z = F.conv2d(F.pad(z, (0, 0, 6, 6), mode="circular"), k.reshape(1, 1, -1, 1).expand(3, 1, 13, 1), groups=3)
    return z / z.std()


def test_laplacian_pyramid_levels():
    x = torch.randn(2, 3, 64, 64)
    p = laplacian_pyramid(x)
    assert [t.shape[-1] for t in p] == [64, 32, 16]
    const = torch.ones(1, 1, 32, 32)
    assert laplacian_pyramid(const)[0].abs().max() < 1e-5   # no detail in a constant image


def test_swd_same_vs_different_distribution():
    kw = dict(descriptors_per_image=48, dirs_per_repeat=64)   # smaller than ProGAN's: CPU test
    a = _smooth_images(150, 0)
    b = _smooth_images(150, 1)
    c = _smooth_images(150, 2) ** 3                 # heavy-tailed: other patch statistics
    same = sliced_wasserstein_levels(a, b, **kw)
    diff = sliced_wasserstein_levels(a, c, **kw)
    assert same["resolutions"] == [32, 16] and len(same["per_level"]) == 2
    assert same["swd"] * 4 < diff["swd"], (same, diff)
    assert all(s < d for s, d in zip(same["per_level"], diff["per_level"]))
    assert sliced_wasserstein(a, b, **kw) == same["swd"]             # seeded: reproducible
    assert sliced_wasserstein(a, b, seed=1, **kw) != same["swd"]
    # ProGAN normalises each set separately: a global shift is invisible ...
    assert abs(sliced_wasserstein(a, b + 0.5, **kw) - same["swd"]) < 1e-3
    # ... unless both are normalised by the reference set's statistics
    ref = sliced_wasserstein(a, b, normalize="reference", **kw)
    assert sliced_wasserstein(a, b + 0.5, normalize="reference", **kw) > 4 * ref  # coarsest level moves
    with pytest.raises(ValueError, match="shapes differ"):
        sliced_wasserstein(a, a[:, :1])


# ----------------------------------------------------------------------------- memorisation


def test_memorization_and_nearest_neighbour():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(500, 1, 8, 8, generator=g)
    fresh = torch.randn(200, 1, 8, 8, generator=g)
    copies = train[torch.randperm(500, generator=g)[:200]]
    assert memorization_rate(copies, train) == 1.0
    assert memorization_rate(fresh, train) < 0.02
    noisy_copies = copies + 0.05 * torch.randn(copies.shape, generator=g)
    assert memorization_rate(noisy_copies, train) == 1.0
    assert nearest_neighbour_distance(copies, train) < 1e-2
    nn_fresh = nearest_neighbour_distance(fresh, train, chunk=17)   # chunking gives the same result
    brute = torch.cdist(fresh.flatten(1).double(), train.flatten(1).double()).min(1).values.mean()
    assert abs(nn_fresh - float(brute)) < 1e-4 and nn_fresh > 5
    with pytest.raises(ValueError, match="2 training"):
        memorization_rate(fresh, train[:1])


# ----------------------------------------------------------------------------- run layout


def test_run_layout_urls(tmp_path, monkeypatch):
    from bootdiff.config import ExperimentConfig
    from bootdiff.run.layout import RunLayout

    monkeypatch.chdir(tmp_path)
    lay = RunLayout.of(ExperimentConfig(name="exp", storage="runs"))  # relative -> absolute, once
    root = f"{tmp_path}/runs/exp"
    assert lay.root == root and lay == RunLayout(f"file://{tmp_path}/runs", "exp")
    assert (lay.data, lay.manifest, lay.split_data("test")) == (
        f"{root}/data", f"{root}/data/manifest.json", f"{root}/data/test")
    assert (lay.view_runs, lay.view_run_info("low"), lay.model("bootstrap")) == (
        f"{root}/views", f"{root}/views/view-low.json", f"{root}/models/bootstrap")
    assert (lay.sweep, lay.tune, lay.sweep_json, lay.trial_runs) == (
        f"{root}/sweep", f"{root}/sweep/tune", f"{root}/sweep/sweep.json", f"{root}/sweep/runs")
    assert lay.trial_start_event("combined", 7) == f"{root}/sweep/events/combined.7.start"
    assert (lay.report, lay.summary, lay.config) == (
        f"{root}/sweep/report", f"{root}/sweep/report/summary.json", f"{root}/config.json")
    assert lay.url("/x/checkpoint_000001") == "/x/checkpoint_000001"
    s3 = RunLayout("s3://bucket/runs/", "exp")
    assert s3.root == "s3://bucket/runs/exp" and s3.model("low") == "s3://bucket/runs/exp/models/low"
    # Ray reports paths inside its (pyarrow) S3 filesystem without the scheme
    assert s3.url("bucket/runs/exp/sweep/runs/ck") == "s3://bucket/runs/exp/sweep/runs/ck"
    assert s3.url("s3://bucket/k") == "s3://bucket/k"


def test_ingest_writes_where_the_layout_says(tmp_path, monkeypatch):
    """Ingest and the experiment glue agree on the data folder (a relative storage included)."""
    from bootdiff import experiment
    from bootdiff.config import load_config
    from bootdiff.data.ingest import ingest
    from bootdiff.run.layout import RunLayout

    class Tiny:
        kind, description, fixed_test, ids = "image", "tiny", None, [str(i) for i in range(12)]

        def __len__(self):
            return 12

        def __getitem__(self, i):
            return np.full((8, 8, 1), 20 * i, np.uint8)

        def mask(self, i):
            return None

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["storage=rel", "name=lay", "data.resolution=8", "data.channels=1",
                             "data.num_full=4", "data.num_test=4", "data.num_val=2", "views.low.kind=downsample",
                             "views.low.factor=2"])
    manifest = ingest(cfg, progress=False, source=Tiny())
    assert manifest["root"] == RunLayout.of(cfg).data == f"{tmp_path}/rel/lay/data"
    assert os.path.exists(RunLayout.of(cfg).manifest)
    assert experiment.read_manifest(cfg)["splits"]["low"]["shape"] == [1, 4, 4]


# ----------------------------------------------------------------------------- FD, features config, budgets

QUICK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "quickstart.yaml")


def test_fd_for_every_model_with_a_local_network(tmp_path, dinov2_dir):
    from types import SimpleNamespace

    from bootdiff.evaluation import fd, report
    from bootdiff.config import FeatureKind, FeaturesConfig
    from bootdiff.evaluation.evaluate import fd_note, frechet_distances, sample_quality

    test_x = _smooth_images(24, 0).clamp(-1, 1)
    samples = {"combined": _smooth_images(12, 1).clamp(-1, 1), "bootstrapped": test_x[:12].clone(),
               "full_res": (_smooth_images(12, 2) + 0.5).clamp(-1, 1)}
    feats = FeaturesConfig(kind=FeatureKind.dinov2, path=dinov2_dir, batch_size=5)
    cfg = SimpleNamespace(eval=EvalConfig(features=feats))
    quality = sample_quality(cfg, samples, test_x, test_x)
    values = {k: q["fd"] for k, q in quality.items()}
    assert set(values) == set(samples) and all(v >= -1e-6 for v in values.values())
    # FD of the test split with itself is 0; a brightness shift raises it; videos are scored frame by frame
    clips = _smooth_images(12, 3).clamp(-1, 1).reshape(4, 3, 3, 32, 32).transpose(1, 2)  # [N, C, T, H, W]
    own = frechet_distances(feats, {"test": test_x, "clips": clips}, test_x)
    assert own["test"] == pytest.approx(0.0, abs=1e-6)
    assert values["full_res"] > values["combined"] > 0
    net = fd.load_feature_network("dinov2", dinov2_dir)
    frames = clips.transpose(1, 2).flatten(0, 1)
    assert own["clips"] == pytest.approx(fd.fd_features(fd.features(net, frames), fd.features(net, test_x)), rel=1e-6)

    note = fd_note(feats, 12, 24)
    trials = [{"trial_id": "r", "kind": "residual", "mu_var": 0.0, "mu_l1": 0.0, "range_adapter": True,
               "test_G": 0.2, "train_G": 0.1, "step": 1, "status": "complete", "checkpoint": "x"}]
    w = report.write_report(str(tmp_path / "rep"), trials, {}, samples, "", {}, quality=quality, fd_note=note)
    text = open(w["html"]).read()
    assert "<th class=\"\">FD</th>" in text and f"{values['full_res']:.4g}" in text
    assert report._e(note) in text and "dinov2 features" in note and "FD skipped" not in text

    off = SimpleNamespace(eval=EvalConfig())
    assert "fd" not in sample_quality(off, {"combined": samples["combined"]}, test_x, test_x)["combined"]
    assert fd_note(off.eval.features, 12, 24) == ("FD skipped: eval.features.kind is 'none' (set kind and path to "
                                                  "a local feature network)")


def test_features_config_checked_at_load(tmp_path, dinov2_dir, monkeypatch):
    from bootdiff.config import ConfigError, load_config

    missing = str(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(ConfigError) as e:
        load_config(QUICK, ["eval.features.kind=inception", f"eval.features.path={missing}"])
    assert str(e.value).startswith(f"command line: eval.features.path='{missing}' does not exist; kind "
                                   "'inception' expects a file")
    bad = tmp_path / "notes.pth"
    bad.write_text("not weights")
    with pytest.raises(ConfigError, match=r"eval.features.path=.*notes.pth.*could not be read as a PyTorch state"):
        load_config(QUICK, ["eval.features.kind=inception", f"eval.features.path={bad}"])
    with pytest.raises(ConfigError, match=r"eval.features.path=.*is a file; kind 'dinov2' expects a folder"):
        load_config(QUICK, ["eval.features.kind=dinov2", f"eval.features.path={bad}"])
    with pytest.raises(ConfigError, match="eval.features.path is not set"):
        load_config(QUICK, ["eval.features.kind=dinov2"])
    with pytest.raises(ConfigError, match="eval.features.batch_size=0: must be an integer >= 1"):
        load_config(QUICK, ["eval.features.kind=dinov2", f"eval.features.path={dinov2_dir}",
                            "eval.features.batch_size=0"])
    with pytest.raises(ConfigError, match="eval.features.kind"):
        load_config(QUICK, ["eval.features.kind=fid"])
    cfg = load_config(QUICK, ["eval.features.kind=dinov2", f"eval.features.path={dinov2_dir}"])
    assert cfg.eval.features.kind == "dinov2" and cfg.eval.features.batch_size == 64
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # the optional extra not installed
    with pytest.raises(ConfigError, match=r"eval.features.kind='dinov2' needs the optional dependency "
                                          r"transformers.*pip install 'bootdiff\[features\]'"):
        load_config(QUICK, ["eval.features.kind=dinov2", f"eval.features.path={dinov2_dir}"])


def test_full_res_budget_defaults_to_the_bootstrapped_models(tmp_path):
    from bootdiff.config import full_res_budget, load_config, to_object
    from bootdiff.evaluation.evaluate import budgets

    plain = yaml.safe_load(open(QUICK))
    plain["full_res"]["train"]["total_kimg"] = "???"  # unset (the quickstart caps its early-stopped baseline)
    (tmp_path / "unset.yaml").write_text(yaml.safe_dump(plain))
    unset = str(tmp_path / "unset.yaml")
    cfg = to_object(load_config(unset))
    views = sum(v.train.total_kimg for v in cfg.views.values())
    assert cfg.full_res.train.total_kimg == views + cfg.residual.train.total_kimg == full_res_budget(cfg)
    assert cfg.full_res.train.batch_size == 32  # the rest of the block is the config's
    cfg = to_object(load_config(unset, ["views.patch.train.total_kimg=1", "residual.train.total_kimg=0.5"]))
    assert cfg.full_res.train.total_kimg == 1 + cfg.views["low"].train.total_kimg + 0.5
    cfg = to_object(load_config(unset, ["full_res.train.total_kimg=3", "full_res.train.patience=2",  # set: kept
                                        f"storage={tmp_path}/none"]))  # no view records there: not a user's ./bootdiff_runs
    assert cfg.full_res.train.total_kimg == 3
    manifest = {"splits": {"full": {"count": 64, "shape": [1, 32, 32]}}}
    outcome = {"best": "r", "trials": [
        {"trial_id": "r", "kind": "residual", "kimg": 1.5, "checkpoint": "x"},
        {"trial_id": "full_res", "kind": "full_res", "kimg": float("nan"), "checkpoint": None},
        # peers: each at its best grid setting on validation, one without a checkpoint is not scored
        {"trial_id": "ambient-sigma_tn0.5", "kind": "ambient", "kimg": 2.0, "val_G": 0.6, "checkpoint": "a"},
        {"trial_id": "ambient-sigma_tn1", "kind": "ambient", "kimg": 2.5, "val_G": 0.5, "checkpoint": "b"},
        {"trial_id": "finetune", "kind": "finetune", "kimg": 1.0, "val_G": 0.1, "checkpoint": None}]}
    b = budgets(cfg, manifest, outcome)
    assert b == {"n_full": 64, "views": {n: v.train.total_kimg for n, v in cfg.views.items()},
                 "residual": cfg.residual.train.total_kimg, "bootstrapped": full_res_budget(cfg),
                 "full_res": 3.0, "full_res_trained": None, "residual_trained": 1.5, "patience": 2,
                 "peers": {"ambient-sigma_tn1": 2.5}, "views_early_stopped": [],  # no view-<v>.json: as planned
                 "augment": cfg.full_res.train.augment, "augmentable": True}  # the baseline's augmentation, said
