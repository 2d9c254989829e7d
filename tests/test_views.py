"""Views, fusion and the combined denoiser: the identities of docs/METHOD.md §1 and §3 checked numerically."""

import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bootdiff.config import ViewConfig
from bootdiff.fusion import (CombinedDenoiser, FusionWeights, ViewModel, clip_average, fit_fusion_weights,
                             frequency_split, mosaic)
from bootdiff.residual import BootstrapDenoiser
from bootdiff.views import (ClipView, DownsampleView, FullView, MaskedPatchView, PatchView,
                            make_view)
from bootdiff.views import VIEW_CLASSES, View, check_view_config, view_class, view_from_json

torch.set_num_threads(1)
F64 = torch.float64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def all_views():
    """(name, view, sample shape) for every view kind, with overlapping and ragged grids."""
    mask = torch.zeros(12, 12, dtype=torch.bool)
    mask[9:, :] = True  # a subtitle band over the bottom rows
    return [
        ("patch_tiles", PatchView(12, 4), (2, 12, 12)),
        ("patch_overlap", PatchView(12, 5, stride=3), (2, 12, 12)),  # last row/col snapped
        ("patch_explicit", PatchView((12, 10), (3, 4), locations=[[0, 0], [9, 6], [4, 3]]), (2, 12, 10)),
        ("downsample2", DownsampleView(2), (2, 12, 12)),
        ("downsample3", DownsampleView(3), (2, 12, 12)),
        ("clip", ClipView(10, 4, stride=3), (2, 10, 6, 6)),
        ("masked", MaskedPatchView(12, 4, mask, stride=2), (2, 12, 12)),
        ("full", FullView(), (2, 12, 12)),
    ]


def single_locations(view):
    """One sub-view per location (a view with a single location is its own sub-view)."""
    if isinstance(view, PatchView):
        return [PatchView(view.image_size, view.patch_size, locations=[loc]) for loc in view.locations.tolist()]
    if isinstance(view, ClipView):
        return [ClipView(view.num_frames, view.clip_len, starts=[s]) for s in view.starts.tolist()]
    return [view]


@pytest.mark.parametrize("name,view,shape", all_views(), ids=[v[0] for v in all_views()])
def test_projected_noise_level_is_sigma_map(name, view, shape):
    """A(σn) is white noise of std σ_k = sigma_map(σ) (per output sample, i.e. per patch / clip)."""
    N = 400
    sigma = torch.linspace(0.5, 3.0, N, dtype=F64)
    n = torch.randn((N, *shape), generator=_gen(1), dtype=F64)
    y = view.project(sigma.reshape(-1, *[1] * len(shape)) * n)
    s_k = view.sigma_map(sigma)
    assert s_k.shape == (y.shape[0],)
    z = y / s_k.reshape(-1, *[1] * (y.ndim - 1))  # should be N(0, 1) elementwise
    assert abs(z.std().item() - 1.0) < 0.03, (name, z.std().item())
    assert abs(z.mean().item()) < 0.03
    # sample-major: the first L outputs belong to sample 0
    L = y.shape[0] // N
    assert torch.allclose(s_k[:L], sigma[0] * math.sqrt(view.c) * torch.ones(L, dtype=F64))
    # a scalar σ broadcasts
    assert abs(float(view.sigma_map(2.0)) - 2.0 * math.sqrt(view.c)) < 1e-6 and view.sigma_map(2.0).ndim == 0


@pytest.mark.parametrize("name,view,shape", all_views(), ids=[v[0] for v in all_views()])
def test_project_lift_is_identity_and_lift_is_adjoint(name, view, shape):
    """A_ℓ·A_ℓ⁺ = I (project(lift(y)) == y) at every location ℓ, for the whole stack of a view
    whose locations do not overlap, and lift = Aᵀ/c (⟨Ax, y⟩ = c·⟨x, lift(y)⟩) always."""
    x = torch.randn((3, *shape), generator=_gen(2), dtype=F64)
    y = torch.randn(view.project(x).shape, generator=_gen(3), dtype=F64)
    for sub in single_locations(view):
        ys = torch.randn(sub.project(x).shape, generator=_gen(4), dtype=F64)
        assert torch.allclose(sub.project(sub.lift(ys)), ys, atol=1e-12)
    if view.coverage(x).max() <= 1:
        assert torch.allclose(view.project(view.lift(y)), y, atol=1e-12)
    else:  # overlapping locations: A A⁺ is not I, but A⁺ then averaging is consistent
        assert torch.allclose(view.project(mosaic(view, view.project(x))), view.project(x), atol=1e-12)
    lhs = (view.project(x) * y).sum()
    rhs = view.c * (x * view.lift(y)).sum()
    assert torch.allclose(lhs, rhs, atol=1e-10)
    cov = view.coverage(x)
    assert cov.shape == x.shape
    assert torch.allclose(cov, view.lift(view.project(torch.ones_like(x))))


def test_patch_grid_tiles_back_exactly_and_overlap_mosaic_is_exact():
    x = torch.randn(2, 3, 16, 16, generator=_gen(4), dtype=F64)
    tiles = PatchView(16, 4)
    assert tiles.num_locations == 16
    assert torch.equal(tiles.lift(tiles.project(x)), x)
    assert torch.equal(tiles.coverage(x), torch.ones_like(x))
    over = PatchView(16, 6, stride=4)  # starts 0, 4, 8, 10 (snapped)
    assert over.locations[:, 0].unique().tolist() == [0, 4, 8, 10]
    assert over.coverage(x).max() > 1
    assert torch.allclose(mosaic(over, over.project(x)), x, atol=1e-14)
    # sample-major layout: patch l of sample n is y[n*L + l]
    y = over.project(x)
    L = over.num_locations
    r, c = over.locations[5].tolist()
    assert torch.equal(y[1 * L + 5], x[1, :, r:r + 6, c:c + 6])


def test_random_locations_and_bad_input():
    v = PatchView(10, 4).random_locations(7, _gen(5))
    assert v.num_locations == 7 and (v.locations >= 0).all() and (v.locations <= 6).all()
    x = torch.randn(2, 1, 10, 10, generator=_gen(6))
    assert v.project(x).shape == (14, 1, 4, 4)
    with pytest.raises(ValueError, match="outside"):
        PatchView(10, 4, locations=[[7, 0]])
    with pytest.raises(ValueError, match="expected images"):
        v.project(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="not divisible"):
        DownsampleView(3).project(torch.zeros(1, 1, 8, 8))


def test_downsample_is_block_mean_and_lift_is_block_replicate():
    x = torch.arange(16, dtype=F64).reshape(1, 1, 4, 4)
    v = DownsampleView(2)
    assert v.c == 0.25
    assert torch.equal(v.project(x), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]], dtype=F64))
    assert torch.equal(v.lift(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=F64))[0, 0],
                       torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]], dtype=F64))
    assert torch.equal(v.coverage(x), torch.ones_like(x))
    video = torch.randn(2, 1, 3, 8, 8, generator=_gen(7), dtype=F64)  # spatial downsample of videos
    assert v.project(video).shape == (2, 1, 3, 4, 4)


def test_frequency_split_of_exact_inputs_is_exact():
    x = torch.randn(3, 2, 12, 12, generator=_gen(8), dtype=F64)
    low = DownsampleView(3)
    patches = PatchView(12, 5, stride=4)
    out = frequency_split(low, low.project(x), mosaic(patches, patches.project(x)))
    assert torch.allclose(out, x, atol=1e-12)
    # and the block means of the result are exactly the low-res estimate, whatever the detail
    est = torch.randn(3, 2, 4, 4, generator=_gen(9), dtype=F64)
    out = frequency_split(low, est, torch.randn_like(x))
    assert torch.allclose(low.project(out), est, atol=1e-12)


def test_clip_sliding_average_of_exact_clips_is_the_video():
    video = torch.randn(2, 3, 11, 4, 4, generator=_gen(10), dtype=F64)
    view = ClipView(11, 4)  # default stride clip_len // 2 = 2: starts 0, 2, 4, 6, 7
    assert view.starts.tolist() == [0, 2, 4, 6, 7]
    clips = view.project(video)
    assert clips.shape == (2 * 5, 3, 4, 4, 4)
    assert torch.equal(clips[1 * 5 + 3], video[1, :, 6:10])
    assert torch.allclose(clip_average(view, clips), video, atol=1e-14)


def test_masked_patch_view_only_returns_clean_patches():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[6, 1] = True  # one corrupted pixel in the bottom-left region
    view = MaskedPatchView(8, 4, mask, stride=2)  # grid 3x3 of 4x4 patches
    locs = {tuple(l) for l in view.locations.tolist()}
    assert locs == {(r, c) for r in (0, 2, 4) for c in (0, 2, 4)} - {(4, 0)}
    x = torch.randn(2, 1, 8, 8, generator=_gen(11))
    x[:, :, mask] = float("nan")  # corrupted pixels must never reach a projected patch
    y = view.project(x)
    assert y.shape[0] == 2 * 8 and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="touches the mask"):
        MaskedPatchView(8, 4, torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        MaskedPatchView(8, 4, torch.zeros(4, 4, dtype=torch.bool))


def test_make_view_from_config():
    v = make_view(ViewConfig(kind="patch", patch_size=4), (1, 12, 12))
    assert isinstance(v, PatchView) and v.num_locations == 9
    v = make_view(ViewConfig(kind="patch", patch_size=4, stride=2), (1, 12, 12))
    assert v.num_locations == 25
    v = make_view(ViewConfig(kind="downsample", factor=4), (3, 16, 16))
    assert isinstance(v, DownsampleView) and v.c == 1 / 16
    v = make_view(ViewConfig(kind="clip", clip_len=8), (1, 20, 8, 8))
    assert isinstance(v, ClipView) and v.starts.tolist() == [0, 4, 8, 12]
    v = make_view(ViewConfig(kind="clip", clip_len=8, clip_stride=8), (1, 20, 8, 8))
    assert v.starts.tolist() == [0, 8, 12]
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:2] = True
    v = make_view(ViewConfig(kind="clean_patch", patch_size=4), (1, 8, 8), mask=mask)
    assert isinstance(v, MaskedPatchView) and v.num_locations == 2
    v = make_view(ViewConfig(kind="clean_patch", patch_size=4), (1, 8, 8))
    assert type(v) is PatchView and v.num_locations == 4
    assert isinstance(make_view(ViewConfig(kind="full"), (1, 8, 8)), FullView)
    with pytest.raises(ValueError, match="unknown view kind 'tile'"):
        make_view(ViewConfig(kind="tile"), (1, 8, 8))
    with pytest.raises(ValueError, match="does not divide"):
        make_view(ViewConfig(kind="downsample", factor=3), (1, 8, 8))


# ----------------------------------------------------------------------------- a view kind is one class


def test_every_kind_is_one_registered_class_and_a_config_choice():
    from bootdiff.config import ViewKind

    assert set(VIEW_CLASSES) == {k.value for k in ViewKind}
    assert all(issubclass(cls, View) and cls.kind == kind for kind, cls in VIEW_CLASSES.items())
    interface = ("project", "lift", "sigma_map", "coverage", "check_config", "from_config", "config",
                 "cut", "samples_per_source", "min_frames", "to_json", "from_json")
    assert all(callable(getattr(cls, a, None)) for cls in VIEW_CLASSES.values() for a in interface)
    assert {type(v) for _, v, _ in all_views()} == set(VIEW_CLASSES.values())  # all_views covers every kind
    assert view_class(ViewKind.clip) is ClipView and view_class("clip") is ClipView


@pytest.mark.parametrize("name,view,shape", all_views(), ids=[v[0] for v in all_views()])
def test_view_json_round_trip(name, view, shape):
    """to_json -> JSON text -> view_from_json rebuilds the same operator; config() names the kind."""
    d = json.loads(json.dumps(view.to_json()))
    back = view_from_json(d, "here")
    assert type(back) is type(view) and back.to_json() == d and back.c == view.c
    x = torch.randn((2, *shape), generator=_gen(50), dtype=F64)
    assert torch.equal(back.project(x), view.project(x))
    assert torch.equal(back.lift(view.project(x)), view.lift(view.project(x)))
    assert torch.equal(back.sigma_map(torch.tensor([0.5, 2.0])), view.sigma_map(torch.tensor([0.5, 2.0])))
    cfg = view.config()
    assert cfg["kind"] == view.kind and view_class(cfg["kind"]) is type(view)
    with pytest.raises(ValueError, match="here: unknown view class 'Tile'"):
        view_from_json({"class": "Tile"}, "here")


def _cut_cases():
    mask = np.zeros((12, 12), bool)
    mask[9:] = True  # a subtitle band
    return [("patch", (2, 12, 12), None), ("clean_patch", (2, 12, 12), mask),
            ("clean_patch", (2, 6, 6), mask),  # a latent sample under a 12x12 pixel mask
            ("clean_patch", (2, 12, 12), None), ("downsample", (2, 12, 12), None),
            ("downsample", (1, 5, 12, 12), None), ("clip", (2, 9, 6, 6), None), ("full", (2, 12, 12), None)]


@pytest.mark.parametrize("dtype", [np.uint8, np.float16])
@pytest.mark.parametrize("kind,shape,mask", _cut_cases())
def test_cut_equals_project_at_the_same_locations(kind, shape, mask, dtype):
    """What ingest stores for a view is the operator's ``project`` at the recorded locations
    (uint8 block means rounded), drawn reproducibly from the task's numpy rng."""
    x = np.random.default_rng(0).integers(0, 256, shape).astype(dtype)
    spec = View.ingest_spec(ViewConfig(kind=kind, patch_size=4, per_sample=5, factor=3, clip_len=4))
    cls = VIEW_CLASSES[kind]
    out = cls.cut(x, spec, np.random.default_rng(1), mask)
    again = cls.cut(x, spec, np.random.default_rng(1), mask)
    assert [m for _, m in out] == [m for _, m in again]
    assert len(out) == cls.samples_per_source(spec) == (5 if kind in ("patch", "clean_patch", "clip") else 1)
    assert all(y.dtype == x.dtype for y, _ in out)
    if kind in ("patch", "clean_patch"):
        view = PatchView(shape[-2:], 4, locations=[m["location"] for _, m in out])
    elif kind == "clip":
        view = ClipView(shape[1], 4, starts=[m["frames"][0] for _, m in out])
        assert all(m["frames"][1] - m["frames"][0] == 4 for _, m in out)
    else:
        view = make_view(ViewConfig(kind=kind, factor=3), shape)
    expect = view.project(torch.from_numpy(x.astype(np.float64))[None])
    got = torch.from_numpy(np.stack([y for y, _ in out]).astype(np.float64))
    if dtype == np.uint8:
        assert torch.equal(got, expect.round())
    else:
        assert torch.allclose(got, expect, rtol=1e-3, atol=0)  # float16 storage
    if mask is not None:  # clean patches miss the mask (reduced to the latent grid for latents)
        f = mask.shape[0] // shape[-1]
        coarse = mask.reshape(shape[-2], f, shape[-1], f).any(axis=(1, 3))
        assert not any(coarse[r:r + 4, c:c + 4].any() for r, c in view.locations.tolist())
        assert cls.cut(x, spec, np.random.default_rng(1), np.ones_like(mask)) == []  # nothing clean


CHECKS = [  # (ViewConfig fields, full sample shape, start of the message)
    ({"kind": "patch", "patch_size": 40}, (1, 32, 32), "views.v.patch_size=40: larger than the data's 32x32"),
    ({"kind": "clean_patch", "patch_size": 0}, (1, 32, 32), "views.v.patch_size=0: must be"),
    ({"kind": "patch", "per_sample": 0}, (1, 32, 32), "views.v.per_sample=0: must be"),
    ({"kind": "patch", "stride": 0}, (1, 32, 32), "views.v.stride=0: must be"),
    ({"kind": "patch"}, (1, 8, 32, 32), "views.v.kind=patch: needs image samples"),
    ({"kind": "clean_patch"}, (1, 8, 32, 32), "views.v.kind=clean_patch: needs image samples"),
    ({"kind": "downsample", "factor": 0}, (1, 32, 32), "views.v.factor=0: must be"),
    ({"kind": "downsample", "factor": 3}, (1, 32, 32), "views.v.factor=3: does not divide the data's sample size 32x32"),
    ({"kind": "downsample", "factor": 3}, (1, 9, 32, 32), "views.v.factor=3: does not divide"),
    ({"kind": "clip", "clip_len": 12}, (1, 8, 32, 32), "views.v.clip_len=12: longer than the data's videos (8 frames)"),
    ({"kind": "clip", "clip_len": 0}, (1, 8, 32, 32), "views.v.clip_len=0: must be"),
    ({"kind": "clip", "per_sample": 0}, (1, 8, 32, 32), "views.v.per_sample=0: must be"),
    ({"kind": "clip", "clip_stride": 0}, (1, 8, 32, 32), "views.v.clip_stride=0: must be"),
    ({"kind": "clip"}, (1, 32, 32), "views.v.kind=clip: needs video samples"),
]


@pytest.mark.parametrize("fields,shape,message", CHECKS, ids=[c[2].split(":")[0] for c in CHECKS])
def test_check_view_config_names_view_key_and_value(fields, shape, message):
    vcfg = ViewConfig(**fields)
    forms = [vcfg, OmegaConf.structured(vcfg)]  # dataclass, typed DictConfig (kind a ViewKind)
    if "stride" not in message:
        forms.append(View.ingest_spec(vcfg))  # the dict an ingest task carries
    for form in forms:
        with pytest.raises(ValueError) as err:
            check_view_config("v", form, shape)
        assert str(err.value).startswith(message), str(err.value)
    with pytest.raises(ValueError, match="^" + message.split(":")[0].replace(".", r"\.")):
        make_view(vcfg, shape, name="v")


def test_check_view_config_accepts_fitting_views_and_rejects_names_and_kinds():
    for kind, shape in [("patch", (3, 32, 32)), ("clean_patch", (3, 32, 32)), ("downsample", (1, 32, 32)),
                        ("downsample", (1, 8, 32, 32)), ("clip", (1, 8, 32, 32)), ("full", (1, 32, 32)),
                        ("full", (1, 8, 32, 32))]:
        check_view_config("v", ViewConfig(kind=kind, patch_size=32, factor=4, clip_len=8, stride=3), shape)
    with pytest.raises(ValueError, match=r"^views\.v\.kind=tile: unknown view kind 'tile' \(known: patch"):
        check_view_config("v", ViewConfig(kind="tile"), (1, 8, 8))
    with pytest.raises(ValueError, match=r"^views\.test: .*reserved"):
        check_view_config("test", ViewConfig(kind="patch", patch_size=4), (1, 8, 8))
    with pytest.raises(ValueError, match="sample_shape must be"):
        check_view_config("v", ViewConfig(kind="patch"), (8, 8))


def test_fusion_weights_interpolate_in_log_sigma():
    fw = FusionWeights([0.1, 1.0, 10.0], 2, weights=torch.tensor([[0.0, 1.0], [1.0, 3.0], [2.0, 5.0]]))
    w = fw(torch.tensor([0.01, 0.1, math.sqrt(0.1), 1.0, math.sqrt(10.0), 100.0], dtype=F64))
    expect = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.5, 2.0], [1.0, 3.0], [1.5, 4.0], [2.0, 5.0]], dtype=F64)
    assert torch.allclose(w, expect, atol=1e-12)
    assert set(dict(fw.named_buffers())) == {"log_sigma", "weights"}


def test_fit_fusion_weights_recovers_known_weights():
    """Components built so that x = Σ_k w_k(σ) comp_k exactly: the fit must return w_k(σ)."""
    grid = [0.1, 0.5, 2.0]
    true_w = torch.tensor([[0.7, 0.2, 0.1], [0.3, 1.1, -0.4], [1.5, -0.25, 0.0]], dtype=F64)
    clean, g, seen = {}, _gen(22), []

    def components(x_sigma, sigma):
        s = float(sigma[0])
        seen.append(s)
        w = true_w[grid.index(s)]
        a = torch.randn(x_sigma.shape, generator=g, dtype=x_sigma.dtype)
        b = torch.randn(x_sigma.shape, generator=g, dtype=x_sigma.dtype)
        return [(clean["x"] - w[1] * a - w[2] * b) / w[0], a, b]

    def batches():
        for i in range(3):
            clean["x"] = torch.randn(4, 1, 6, 6, generator=_gen(20 + i), dtype=F64)
            yield clean["x"]

    fw = fit_fusion_weights(components, batches(), grid, generator=_gen(21), ridge=1e-12)
    assert seen == grid * 3
    assert torch.allclose(fw(torch.tensor(grid, dtype=F64)), true_w, atol=1e-6)


def test_fit_fusion_weights_on_noisy_components():
    """Least squares with noisy components: x_σ itself and a zero map → weight = shrinkage 1/(1+σ²)."""
    grid = [0.5, 1.0, 2.0]
    data = [torch.randn(256, 1, 8, 8, generator=_gen(30 + i), dtype=F64) for i in range(4)]
    fw = fit_fusion_weights(lambda xs, s: [xs], data, grid, generator=_gen(31))
    w = fw(torch.tensor(grid, dtype=F64))[:, 0]
    expect = 1 / (1 + torch.tensor(grid, dtype=F64) ** 2)
    assert torch.allclose(w, expect, rtol=0.03)


class CountingDenoiser(torch.nn.Module):
    """A linear shrinkage denoiser y/(1+σ²) that records its calls (and has a parameter)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones((), dtype=F64))
        self.calls = []

    def forward(self, y, sigma):
        self.calls.append((tuple(y.shape), sigma.detach().clone()))
        return self.scale * y / (1 + sigma.reshape(-1, *[1] * (y.ndim - 1)) ** 2)


def test_combined_denoiser_calls_each_view_once_with_sigma_k():
    low, patch, patch2 = CountingDenoiser(), CountingDenoiser(), CountingDenoiser()
    comb = CombinedDenoiser([
        ViewModel("low", DownsampleView(2), low),
        ViewModel("patch", PatchView(8, 4), patch),
        ViewModel("patch_shift", PatchView(8, 4, locations=[[2, 2]]), patch2),
    ])
    assert comb.fusion == "split" and comb.num_components == 2
    assert not any(p.requires_grad for p in comb.parameters())
    x = torch.randn(3, 1, 8, 8, generator=_gen(40), dtype=F64)
    sigma = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    d = comb(x, sigma)
    assert d.shape == x.shape and not d.requires_grad
    assert len(low.calls) == len(patch.calls) == len(patch2.calls) == 1
    assert low.calls[0][0] == (3, 1, 4, 4) and torch.allclose(low.calls[0][1], sigma / 2)
    assert patch.calls[0][0] == (12, 1, 4, 4)
    assert torch.allclose(patch.calls[0][1], sigma.repeat_interleave(4))
    assert patch2.calls[0][0] == (3, 1, 4, 4) and torch.allclose(patch2.calls[0][1], sigma)
    # the split: block means from the low-res model, detail from the coverage-averaged mosaic
    lv = DownsampleView(2)
    s4 = sigma.reshape(-1, 1, 1, 1)
    local = PatchView(8, 4).lift(PatchView(8, 4).project(x)) / (1 + s4**2)
    cov = torch.ones_like(x)
    cov[:, :, 2:6, 2:6] += 1
    local = (local + PatchView(8, 4, locations=[[2, 2]]).lift(x[:, :, 2:6, 2:6] / (1 + s4**2))) / cov
    expect = frequency_split(lv, lv.project(x) / (1 + (s4 / 2) ** 2), local)
    assert torch.allclose(d, expect, atol=1e-12)
    # a scalar σ broadcasts to the batch
    assert torch.allclose(comb(x, 1.0), comb(x, torch.ones(3, dtype=F64)))


def test_combined_average_weights_and_bootstrap_parts():
    a, b = CountingDenoiser(), CountingDenoiser()
    views = [ViewModel("a", PatchView(8, 4, stride=2), a), ViewModel("b", DownsampleView(2), b),
             ViewModel("c", FullView(), lambda y, s: torch.zeros_like(y))]
    comb = CombinedDenoiser(views)  # one downsample view but two local views -> still split
    assert comb.fusion == "split"
    comb = CombinedDenoiser(views, fusion="average")
    x = torch.randn(2, 1, 8, 8, generator=_gen(41), dtype=F64)
    comps = comb.components(x, 0.5)
    assert len(comps) == 3
    assert torch.allclose(comps[2], torch.zeros_like(x))
    cov = PatchView(8, 4, stride=2).coverage(x) + 2  # + downsample + full
    lv = DownsampleView(2)
    expect = ((cov - 2) * x / 1.25 + lv.lift(lv.project(x)) / (1 + 0.0625)) / cov
    assert torch.allclose(sum(comps), expect, atol=1e-12)
    assert torch.allclose(comb(x, 0.5), expect, atol=1e-12)
    # per-σ weights: (1, 0, 0) at every σ keeps only the first component
    fw = FusionWeights([0.1, 10.0], 3, weights=torch.tensor([[1.0, 0, 0], [1.0, 0, 0]]))
    wcomb = CombinedDenoiser(views, fusion="average", weights=fw)
    assert torch.allclose(wcomb(x, 0.5), comps[0], atol=1e-12)
    with pytest.raises(ValueError, match="components"):
        CombinedDenoiser(views, fusion="split", weights=fw)
    with pytest.raises(ValueError, match="exactly one downsample"):
        CombinedDenoiser(views[:1], fusion="split")

    class Res(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(2.0, dtype=F64))

        def forward(self, x, sigma, d_comb):
            return self.w * (x - d_comb)

    boot = BootstrapDenoiser(comb, Res(), range_adapter=lambda s: 3 * s)
    assert [n for n, p in boot.named_parameters() if p.requires_grad] == ["residual.w"]
    sigma = torch.tensor([0.5, 2.0], dtype=F64)
    d, r, R = boot.forward_parts(x, sigma)
    assert r.shape == (2, 1, 1, 1) and torch.allclose(r.flatten(), 3 * sigma)
    out = boot(x, sigma)
    assert torch.allclose(out, d + r * R)
    out.sum().backward()  # gradients reach the residual only
    assert boot.residual.w.grad is not None and a.scale.grad is None
    boot.train()
    assert boot.residual.training and not comb.denoisers["a"].training
