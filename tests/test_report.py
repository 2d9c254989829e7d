"""The sweep report (bootdiff.evaluation.report): CSV, Markdown, self-contained HTML, rendered in Chromium."""

from __future__ import annotations

import base64
import csv
import io
import math
import os
import re
import subprocess

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from bootdiff.evaluation import report
from bootdiff.evaluation.summary import verdict

CHROMIUM = "/usr/bin/chromium"
SIGMA = np.geomspace(0.002, 80.0, 8)


def _curve(scale, gap, rng):
    """A realistic per-σ error curve: bell-shaped λ-weighted error, test above train."""
    base = scale * (1.0 + 0.5 * np.log(SIGMA / 0.5) ** 2 / 10) * (1 + 0.05 * rng.random(8))
    return {"sigma": SIGMA.tolist(), "test_mean": (base * (1 + gap)).tolist(),
            "train_mean": base.tolist(), "test_quantile": (base * (1 + gap) * 2.2).tolist(),
            "delta": 0.1}


def _inputs():
    rng = np.random.default_rng(0)
    trials, k = [], 0
    for mu_var in (0.0, 1.0):
        for mu_l1 in (0.0, 0.01):
            k += 1
            test_g = 0.21 + 0.03 * k + 0.001 * k * k
            trials.append({"trial_id": f"res_{k:05d}", "kind": "residual", "mu_var": mu_var,
                           "mu_l1": mu_l1, "range_adapter": True, "val_G": test_g + 0.01, "test_G": test_g,
                           "train_G": test_g * 0.8, "step": 400, "status": "completed",
                           "checkpoint": f"s3://bucket/sweep/res_{k:05d}/checkpoint-00000400",
                           "loss": 0.1 * k, "img_per_s": 123.0 + k})
    trials[1]["loss"] = torch.tensor(0.2)  # 0-d tensors are read as numbers
    trials[0]["test_G"] = 0.1875  # the best (chosen on its validation G)
    trials[0]["val_G"] = 0.2
    trials[0]["train_G"] = 0.15
    trials[3].update(val_G=float("nan"), test_G=float("nan"), train_G=None, step=50, status="stopped_early")
    trials.append({"trial_id": "combined", "kind": "combined", "mu_var": None, "mu_l1": None,
                   "range_adapter": False, "val_G": 0.32, "test_G": 0.3125, "train_G": 0.3, "step": 0,
                   "status": "completed", "checkpoint": "s3://bucket/views", "fusion": "split"})
    trials.append({"trial_id": "full_res_only", "kind": "full_res", "mu_var": None,
                   "mu_l1": None, "range_adapter": False, "val_G": 0.57, "test_G": 0.5625, "train_G": 0.0625,
                   "kimg": 14.0, "chosen_kimg": 10.0,
                   "step": 400, "status": "completed", "checkpoint": "s3://bucket/full/ck",
                   "loss": 0.05})
    curves = {"res_00001": _curve(0.18, 0.25, rng), "combined": _curve(0.3, 0.04, rng),
              "full_res_only": _curve(0.5, 8.0, rng)}
    yy, xx = np.mgrid[0:16, 0:16]
    grey = ((xx * 16 + rng.integers(0, 16, (8, 16, 16))) % 256).astype(np.uint8)[..., None]
    rgb = np.stack([xx * 16, yy * 16, np.full_like(xx, 128)], -1)[None].repeat(8, 0)
    rgb = (rgb + rng.integers(0, 30, rgb.shape)).clip(0, 255).astype(np.uint8)
    samples = {"low-res only (8×8 → 16)": grey,
               "patches only": rgb,
               "combined": torch.tanh(torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))),
               "bootstrapped <best>": torch.linspace(-1, 1, 8 * 16 * 16).reshape(8, 1, 16, 16),
               "video clips": rng.integers(0, 256, (3, 5, 16, 16, 1), dtype=np.uint8)}
    shard = {"name": "x-000000.tar", "count": 64, "sha256": "ab12", "bytes": 9000}
    manifest = {"format": 1, "name": "cats64", "split_seed": 0, "layout": "CHW",
                "source": {"kind": "images", "size": 9303},
                "splits": {"full": {"count": 64, "shape": [3, 16, 16], "sigma_data": 0.51,
                                    "dtype": "uint8", "shards": [shard], "view": {"kind": "full"}},
                           "patch": {"count": 8147, "shape": [3, 8, 8], "sigma_data": 0.48,
                                     "dtype": "uint8", "shards": [shard] * 3,
                                     "view": {"kind": "patch", "patch_size": 8}}},
                "config": {"data": {"source": "s3://bucket/raw"}}}
    config = "name: <demo & co>\nsweep:\n  mu_var: [0.0, 1.0]\n  mu_l1: [0.0, 0.01]\n"
    return trials, curves, samples, config, manifest


def _data_pngs(text):
    out = []
    for m in re.finditer(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" width="(\d+)" '
                         r'height="(\d+)"', text):
        img = Image.open(io.BytesIO(base64.b64decode(m.group(1))))
        img.load()  # fully decodes: a truncated or corrupt PNG raises here
        out.append((img, int(m.group(2)), int(m.group(3))))
    return out


def test_image_grid_layout_and_conversion():
    x = torch.full((5, 1, 4, 6), -1.0)
    x[2] = 1.0
    g = report.image_grid(x, nrow=3, pad=1, pad_value=7)
    assert g.dtype == np.uint8 and g.shape == (1 + 2 * 5, 1 + 3 * 7, 1)
    assert (g[1:5, 15:21] == 255).all() and (g[1:5, 1:7] == 0).all() and g[0, 0, 0] == 7
    assert (g[6:10, 15:21] == 7).all()  # 6th cell is empty padding
    with pytest.raises(ValueError, match="samples 'bad'"):
        report.to_uint8_images(np.zeros((2, 5, 4, 4), np.float32), "bad")


def test_report_files_and_chromium_render(tmp_path):
    trials, curves, samples, config, manifest = _inputs()
    out = tmp_path / "report"
    written = report.write_report(str(out), trials, curves, samples, config, manifest,
                                  title="Sweep <cats>", extra={"sample quality": {
                                      "res_00001": {"swd": 0.0123, "memorization": 0.0}}})
    assert written["html"] == f"{out}/report.html" and os.path.exists(written["html"])

    # CSV: one row per trial, the union of all columns, values round-trip
    with open(out / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    assert set(rows[0]) == set(report.REQUIRED) | {"val_G", "loss", "img_per_s", "fusion", "kimg", "chosen_kimg"}
    assert list(rows[0])[list(rows[0]).index("test_G") - 1] == "val_G"  # the chosen-on score beside test G
    by_id = {r["trial_id"]: r for r in rows}
    assert float(by_id["res_00001"]["test_G"]) == 0.1875
    assert math.isnan(float(by_id["res_00004"]["test_G"])) and by_id["res_00004"]["train_G"] == ""
    assert by_id["combined"]["fusion"] == "split" and by_id["res_00002"]["fusion"] == ""
    assert float(by_id["res_00002"]["loss"]) == pytest.approx(0.2)

    # Markdown: names the best trial, links PNGs that exist beside it, same numbers
    md = (out / "report.md").read_text()
    assert "Best trial: res_00001" in md and "**res_00001**" in md
    assert "chosen on validation G = 0.2 (the held-out val split; the test split is never used to choose)" in md
    assert "full_res_only, test G = 0.5625 (taken at 10 of 14 kimg, its validation minimum)" in md
    links = re.findall(r"!\[[^\]]*\]\((report_files/[^)]+\.png)\)", md)
    assert len(links) == 3 + len(samples)
    for link in links:
        Image.open(out / link).verify()
    for v in ("0.1875", "0.3125", "0.5625", "0.0375"):  # best, baselines, best train–test gap
        assert v in md
    assert "stopped_early" in md and "<demo & co>" in md

    # HTML: self-contained, escaped, the numbers, valid inline PNGs of the stated sizes
    text = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert not re.search(r"""url\(\s*["']?\s*(https?:)?//|@import""", text, re.I)
    assert "&lt;demo &amp; co&gt;" in text and "<demo" not in text and "Sweep &lt;cats&gt;" in text
    assert "bootstrapped &lt;best&gt;" in text and "tensor(" not in text
    for v in ("0.1875", "0.3125", "0.5625", "0.0375", "0.0123", "8147", "3×8×8", "0.48",
              "source.size", "9303", "view.patch_size"):
        assert v in text, v
    assert re.search(r"<tr class=best><td[^>]*>res_00001</td>", text)
    assert re.search(r'class="badge warn">stopped_early<', text)
    pngs = _data_pngs(text)
    gifs = text.count('<img src="data:image/gif;base64,')  # the video's animation
    assert len(pngs) == 3 + len(samples) == text.count("<img ") - gifs and gifs == 1
    for img, w, h in pngs:
        assert img.size == (w, h) and w >= 100 and h >= 20
    for (img, _, _), s in zip(pngs[3:], samples.values()):  # nearest upscale of image_grid
        grid, _ = report.sample_grid(s)
        k = report.grid_scale(grid)
        assert img.size == (grid.shape[1] * k, grid.shape[0] * k) and k >= 2
        assert np.array_equal(np.asarray(img)[::k, ::k].reshape(grid.shape), grid)
    grey, video = np.asarray(pngs[3][0]), pngs[7][0]
    assert grey.ndim == 2 and np.asarray(pngs[4][0]).shape[-1] == 3
    assert video.size[1] > video.size[0] / 5 * 2  # 3 clips stacked as rows of 5-frame strips

    # Chromium: every image decodes in the browser, and the page paints something colourful
    assert os.path.exists(CHROMIUM), (
        f"{CHROMIUM} is missing: the report render test needs Debian's chromium (apt-get install "
        "chromium); CI installs it")
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-dev-shm-usage"]
    url, shot = (out / "report.html").as_uri(), tmp_path / "shot.png"
    runs = [subprocess.Popen(flags + [f"--user-data-dir={tmp_path / name}"] + args + [url],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name, args in (("chrome-dom", ["--virtual-time-budget=3000", "--dump-dom"]),
                               ("chrome-shot", [f"--screenshot={shot}", "--window-size=1200,2000",
                                                "--hide-scrollbars"]))]
    (dom, dom_err), _ = [r.communicate(timeout=60) for r in runs]
    m = re.search(r'data-images-loaded="(\d+)" data-images-total="(\d+)"', dom)
    assert m, f"no image marker in the dumped DOM; chromium stderr:\n{dom_err[-2000:]}"
    assert int(m.group(1)) == int(m.group(2)) == len(pngs) + gifs
    assert shot.exists(), "chromium wrote no screenshot"
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape == (2000, 1200, 3)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 500


def test_report_edge_cases(tmp_path):
    # a single value on each sweep axis, no baselines, no curves/samples, no finite G at all
    t = {"trial_id": "only", "kind": "residual", "mu_var": 0.5, "mu_l1": 0.0,
         "range_adapter": False, "test_G": None, "train_G": None, "step": 3, "status": "ERROR",
         "checkpoint": None}
    w = report.write_report(str(tmp_path), [t], {}, {}, "", {"count": 3})
    text = open(w["html"]).read()
    assert "No trial has a finite validation G: no best trial." in text and "ERROR" in text
    assert len(_data_pngs(text)) == 1  # the 1×1 heatmap still draws (cell marked "no G")
    # any fsspec URL works: an in-memory filesystem stands in for s3://
    w = report.write_report("memory://bootdiff-report-test", [t], {}, {}, "", {})
    fs = fsspec.filesystem("memory")
    assert fs.cat(w["csv"]).decode().startswith("trial_id,kind,")
    assert fs.exists(w["images"]["heatmap.png"]) and b"<img " in fs.cat(w["html"])
    # an explicit best trial wins; unknown ids, kinds and missing keys are named
    t2 = dict(t, trial_id="b", test_G=0.4, mu_l1=0.1)
    w = report.write_report(str(tmp_path / "r2"), [t, t2], {}, {}, "", {}, best_trial_id="b")
    assert "Best trial: b " in open(w["markdown"]).read()
    with pytest.raises(ValueError, match="'nope'"):
        report.write_report(str(tmp_path / "r3"), [t], {}, {}, "", {}, best_trial_id="nope")
    with pytest.raises(ValueError, match=r"trials\[0\].*kind 'weird'"):
        report.write_report(str(tmp_path / "r4"), [dict(t, kind="weird")], {}, {}, "", {})
    with pytest.raises(ValueError, match=r"lacks key\(s\) \['test_G'\]"):
        report.write_report(str(tmp_path / "r5"), [{k: v for k, v in t.items() if k != "test_G"}],
                            {}, {}, "", {})
    with pytest.raises(ValueError, match=r"curves\['m'\]: 'test_mean' has 2 values"):
        report.write_report(str(tmp_path / "r6"), [t], {"m": {"sigma": [1, 2, 3],
                                                            "test_mean": [1, 2]}}, {}, "", {})


# ----------------------------------------------------------------------------- Figure 1, FD, budgets


def _scales(n, seed):
    """Coarse structure (a bicubic 4×4 field) and fine detail (pixel noise) of 32×32 images."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.nn.functional.interpolate(torch.randn(n, 1, 4, 4, generator=g), size=32, mode="bicubic")
    return coarse, torch.randn(n, 1, 32, 32, generator=g) * 0.5


def _figure1_samples():
    """Test images = structure + detail; one model's samples lack detail, another's structure."""
    c, f = _scales(48, 0)
    c1, f1 = _scales(16, 1)
    c2, f2 = _scales(16, 2)
    samples = {"low only": c1.tanh(),  # structure without detail: a lifted low-res model
               "patch only": (f1 + c1.mean()).tanh(),  # detail on a flat field: patches without layout
               "combined": (c1 + 0.6 * f1).tanh(), "bootstrapped": (c1 + f1).tanh(),
               "full_res": (c2 + f2).tanh()}
    return samples, (c + f).tanh(), (c2 + f2).tanh()


def _budget(full_res, n=64):
    return {"n_full": n, "views": {"patch": 6.0, "low": 6.0}, "residual": 2.0, "bootstrapped": 14.0,
            "full_res": full_res, "full_res_trained": full_res, "residual_trained": 2.0}


def test_figure1_table_sentence_and_budgets_in_report(tmp_path):
    from types import SimpleNamespace

    from bootdiff.config import EvalConfig
    from bootdiff.evaluation.evaluate import fd_note, sample_quality

    samples, test_x, train_x = _figure1_samples()
    cfg = SimpleNamespace(eval=EvalConfig())  # eval.features.kind none: FD skipped
    quality = sample_quality(cfg, samples, test_x, train_x)
    q = {k: (v["swd_fine"], v["swd_coarse"]) for k, v in quality.items()}
    assert q["low only"][0] > 2 * q["bootstrapped"][0] and q["patch only"][1] > 1.5 * q["bootstrapped"][1], q
    assert quality["bootstrapped"]["swd_levels"] == [q["bootstrapped"][0], q["bootstrapped"][1]]
    assert quality["bootstrapped"]["swd_resolutions"] == [32, 16] and "fd" not in quality["bootstrapped"]

    sentence = report.figure1_sentence(quality)
    assert re.match(r"At the fine scale \(32 px\) low only is furthest from the test set \(SWD [0-9.]+ vs "
                    r"[0-9.]+ for \S+\): it lacks detail; at the coarse scale \(16 px\) patch only is furthest "
                    r"from the test set \(SWD [0-9.]+ vs [0-9.]+ for [^)]+\): it lacks structure; [a-z -]+ is closest "
                    r"over all scales \(mean SWD [0-9.]+\)\.$", sentence), sentence
    # the sentence reads the numbers: swap the two views' numbers and it names them the other way
    swapped = dict(quality, **{"low only": quality["patch only"], "patch only": quality["low only"]})
    assert "fine scale (32 px) patch only" in report.figure1_sentence(swapped)
    close = {k: dict(v, swd_levels=[1.0, 1.0], swd_fine=1.0, swd_coarse=1.0) for k, v in quality.items()}
    assert "within 10% of each other" in report.figure1_sentence(close)

    trials, curves, _, config, manifest = _inputs()
    trials[-1]["test_G"] = 0.25  # full-res only: the best residual (0.1875) is 25% lower
    roles = {"low only": "×2 downsampled copies alone", "bootstrapped": "the view models + a residual"}
    note = fd_note(cfg.eval.features, 16, 48)
    assert note.startswith("FD skipped") and "\n" not in note
    out = tmp_path / "report"
    w = report.write_report(str(out), trials, curves, samples, config, manifest, quality=quality,
                            roles=roles, fd_note=note, budget=_budget(14.0))
    md, text = (out / "report.md").read_text(), (out / "report.html").read_text()
    for doc, esc in ((md, report._md), (text, report._e)):
        samples_part = doc.split("Samples")[1]
        assert samples_part.index(esc(report.FIGURE1_TITLE)) < samples_part.index(esc("low only"))
        for s in (sentence, note, "SWD 32 px (fine)", "SWD 16 px (coarse)", "×2 downsampled copies alone",
                  "full-res only", f"{quality['low only']['swd_fine']:.4g}",
                  f"{quality['patch only']['swd_coarse']:.4g}"):
            assert esc(s) in samples_part, s
        assert esc("Training budgets: the bootstrapped model stands on 14 kimg (view models patch 6 + low 6, "
                   "residual 2); the full-res-only baseline trained 14 kimg on the 64 full-res samples — the "
                   "same budget.") in doc
    # the answer is the summary's first sentence after the trial count, and the first card
    first = [line for line in md.splitlines() if line.startswith("- ")][1]
    assert first == ("- At N = 64 full-res samples the partial data helped: the bootstrapped model res_00001, the "
                     "model trained on it with the lowest validation G, reaches test G 0.1875 against 0.25 for the "
                     "full-res-only baseline (25.0% lower). The full-res-only baseline trained the bootstrapped "
                     "model's budget (14 kimg), taken at its validation minimum (10 kimg)."), first
    assert text.index("partial data at N = 64") < text.index("best trial")
    assert "FD" not in report.figure1_table(quality)[0]
    labelled = {k: dict(v, classifier_fd=1.5 + i, confident_share=0.25 * i) for i, (k, v) in enumerate(quality.items())}
    from bootdiff.evaluation.quality import _model as _model_label

    cols, rows = report.figure1_table(labelled)
    i, j = cols.index("classifier FD"), cols.index("confident ≥ 0.9")
    by_model = {r[0]: (r[i], r[j]) for r in rows}
    assert by_model[_model_label("bootstrapped")] == (labelled["bootstrapped"]["classifier_fd"],
                                                       labelled["bootstrapped"]["confident_share"])
    assert re.search(r"<h3>Figure 1 as numbers[^<]*</h3><div class=\"tbl\"><table>", text)

    # unequal budgets without early stopping: stated, and no verdict on the partial data
    lines = report.budget_lines(_budget(2.0), trials)
    assert "trained 2 kimg on the 64 full-res samples — 0.14× the bootstrapped model's, unequal budgets." in lines[0]
    stopped = report.budget_lines({**_budget(2.0), "views": {"patch": 6.0, "low": 4.5}, "views_early_stopped": ["low"]},
                                  trials)  # a view early-stopped on its held-out samples: what it trained
    assert "(view models patch 6 + low 4.5 (early-stopped on its held-out view samples), residual 2)" in stopped[0]
    both = report.budget_lines({**_budget(2.0), "views_early_stopped": ["patch", "low"]}, trials)
    assert "(view models patch 6 + low 6, each early-stopped on its held-out view samples, residual 2)" in both[0]
    short = [dict(t, kimg=2.0, chosen_kimg=2.0) if t["kind"] == "full_res" else t for t in trials]
    said, card = verdict(_budget(2.0), short, trials[0])
    assert said == ["The full-res-only baseline trained 2 kimg against the bootstrapped model's 14 without early "
                    "stopping, so this run cannot say whether the partial data helped; set full_res.train.patience "
                    "for the strongest baseline, or leave full_res.train.total_kimg unset for equal budgets."]
    assert card[1] == "cannot say"
    trials[-1]["test_G"] = 0.15  # at equal budgets and a better baseline: it did not help
    said, card = verdict(_budget(14.0), trials, trials[0])
    assert said[0].startswith("At N = 64 full-res samples the partial data did not help: the bootstrapped model "
                              "res_00001, the model trained on it with the lowest validation G, reaches test G 0.1875 "
                              "against 0.15 for the full-res-only baseline (25.0% higher).") and card[1] == "did not help"
    # a run ends on the whole batch that reaches its budget: 14.016 of 14 kimg is still equal
    overshoot = report.budget_lines({**_budget(14.0), "full_res_trained": 14.016}, trials)
    assert overshoot[0].endswith("— the same budget.") and "planned" not in overshoot[0]
    over = [dict(t, kimg=14.016) if t["kind"] == "full_res" else t for t in trials]
    assert "trained the bootstrapped model's budget (14 kimg)" in verdict(_budget(14.0), over, trials[0])[0][0]
    no_base = verdict(_budget(14.0), trials[:-1], trials[0])[0]
    assert no_base == ["Whether the partial data helped at N = 64 cannot be said: no full-res-only baseline with a "
                       "finite test G (sweep.baseline_full_res)."]
    assert w["html"].endswith("report.html")
    no_run = report.budget_lines(_budget(14.0), trials[:-1])[0]
    assert "the full-res-only baseline (not in this sweep: sweep.baseline_full_res) would train 14 kimg" in no_run


def test_the_verdict_stands_on_the_strongest_baseline_early_stopped_with_patience():
    """With patience the baseline's budget is a cap: the verdict is said whether it stopped there or
    early, and it names a capped baseline that was still improving; the model it names is the
    recommended one when that is not the baseline, with the bootstrapped model beside it, and the
    labelled-source metrics when both have them."""
    trials = _inputs()[0]
    b = {**_budget(34.0, n=16), "patience": 3}
    base = trials[-1]
    base.update(test_G=0.25, kimg=12.0, chosen_kimg=6.0, status="stopped_early", classifier_fd=120.0,
                confident_share=0.3)
    said, card = verdict(b, trials, trials[0])
    assert said[0].endswith("The full-res-only baseline stopped when its validation G had not improved for 3 "
                            "checkpoints, at 12 of its 34-kimg cap, taken at its validation minimum (6 kimg)."), said
    assert "partial data helped" in said[0] and len(said) == 1 and card == (
        "partial data at N = 16", "helped", "res_00001: test G 25.0% lower than full-res only")
    # at its cap with its last checkpoint its best: the baseline might do better, and the report says so
    base.update(kimg=34.016, chosen_kimg=34.016, status="complete")
    said, _ = verdict(b, trials, trials[0])
    assert said[0].endswith("The full-res-only baseline reached its 34-kimg cap still improving (its last checkpoint "
                            "was its best): a longer cap (full_res.train.total_kimg) could lower its G, so the "
                            "comparison may favour the partial data."), said
    base.update(chosen_kimg=20.0)
    assert verdict(b, trials, trials[0])[0][0].endswith("trained to its 34-kimg cap, taken at its validation minimum "
                                                        "(20 kimg).")
    # the baseline's non-leaking augmentation said after how it stopped; without it, that it may be weaker than it can be
    said = verdict({**b, "augment": 0.25, "augmentable": True}, trials, trials[0])[0][0]
    assert said.endswith("(20 kimg). It trained with non-leaking augmentation (full_res.train.augment = 0.25)."), said
    said = verdict({**b, "augment": 0.0, "augmentable": True}, trials, trials[0])[0][0]
    assert said.endswith("(20 kimg). It trained without augmentation (full_res.train.augment = 0): on a few full-res "
                         "images non-leaking augmentation usually makes it stronger, so the comparison may favour the "
                         "partial data."), said
    assert verdict({**b, "augment": 0.0, "augmentable": False}, trials, trials[0])[0][0].endswith("(20 kimg).")  # video
    # a peer recommended: it is the answer, the bootstrapped model beside it; classifier metrics when both have them
    peer = {"trial_id": "ambient-sigma_tn0.5", "kind": "ambient", "val_G": 0.15, "test_G": 0.2, "train_G": 0.1,
            "kimg": 34.0, "chosen_kimg": 30.0, "status": "complete", "checkpoint": "s3://b/amb",
            "classifier_fd": 90.0, "confident_share": 0.45}
    said, card = verdict(b, trials + [peer], trials[0], rec=peer)
    assert said[0].startswith("At N = 16 full-res samples the partial data helped: the Ambient Omni peer "
                              "ambient-sigma_tn0.5, the model trained on it with the lowest validation G, reaches test "
                              "G 0.2 against 0.25 for the full-res-only baseline (20.0% lower); classifier FD 90 vs "
                              "120, confidently classified 45% vs 30% of the samples."), said
    assert said[1] == ("The bootstrapped model itself (best residual trial res_00001) reaches test G 0.1875 against "
                       "0.25 for the full-res-only baseline (25.0% lower).")
    # the baseline recommended: the answer is the best other model on validation, and it did not help
    base.update(val_G=0.1, test_G=0.15)
    said, card = verdict(b, trials + [peer], trials[0], rec=base)
    assert said[0].startswith("At N = 16 full-res samples the partial data did not help: the Ambient Omni peer") \
        and card[1] == "did not help"
    lines = report.budget_lines({**b, "peers": {"ambient-sigma_tn0.5": 34.0}}, trials)
    assert lines[0].endswith("on the 16 full-res samples — early-stopped on validation G (patience 3 checkpoints), "
                             "so its budget is a cap (2.4× the bootstrapped model's), not a match."), lines
    assert lines[1].startswith("The peers train with the full-res baseline's network, budget cap (34 kimg) and "
                               "patience on the same")
    # where each peer stopped, said as for the baseline: here at the cap, taken at its minimum (30 of 34 kimg)
    line = report.budget_lines({**b, "peers": {"ambient-sigma_tn0.5": 34.0}}, trials + [peer])[1]
    assert line.endswith("ambient-sigma_tn0.5 trained 34 kimg, to the cap, taken at its validation minimum "
                         "(30 kimg)."), line
    peer.update(chosen_kimg=34.0)  # its last checkpoint its best: it might do better, and the report says so
    line = report.budget_lines({**b, "peers": {"ambient-sigma_tn0.5": 34.0}}, trials + [peer])[1]
    assert line.endswith("ambient-sigma_tn0.5 trained 34 kimg and reached the cap still improving (its last "
                         "checkpoint was its best): a longer cap (full_res.train.total_kimg) could lower its G, so a "
                         "comparison with it may favour the bootstrap."), line
    peer.update(kimg=12.0, chosen_kimg=8.0, status="stopped_early")
    line = report.budget_lines({**b, "peers": {"ambient-sigma_tn0.5": 12.0}}, trials + [peer])[1]
    assert line.endswith("ambient-sigma_tn0.5 trained 12 kimg, stopped by patience, taken at its validation minimum "
                         "(8 kimg)."), line


def test_report_recommends_the_lowest_validation_G_a_peer_included(tmp_path):
    from bootdiff.evaluation.quality import _model

    trials, curves, samples, config, manifest = _inputs()
    peer = {"trial_id": "ambient-sigma_tn1", "kind": "ambient", "mu_var": None, "mu_l1": None, "range_adapter": None,
            "setting": {"sigma_tn": 1.0}, "val_G": 0.15, "test_G": 0.17, "train_G": 0.12, "kimg": 14.0,
            "chosen_kimg": 8.0, "step": 400, "status": "stopped_early", "checkpoint": "s3://bucket/amb/ck"}
    w = report.write_report(str(tmp_path / "a"), trials + [peer], curves, {}, config, manifest, best_trial_id="res_00001")
    md = open(w["markdown"]).read()
    # said first, after the trial count: which model, why (validation G), and against the bootstrapped model
    lines = [line for line in md.splitlines() if line.startswith("- ")]
    assert lines[1].startswith("- Recommended model: ambient-sigma_tn1 — Ambient Omni peer (baseline) at "
                               "sigma_tn = 1 — the lowest validation G of all 6 trials (validation G 0.15; "
                               "test G 0.17 (taken at 8 of 14 kimg, its validation minimum)). It is better on "
                               "validation than the best bootstrapped trial res_00001 (validation G 0.2, test G "
                               "0.1875; the recommended model's test G is 9.3% lower): use it rather than the "
                               "bootstrapped model."), lines[:3]
    assert "Ambient Omni peer (baseline) — recommended" in md and "Best trial: res_00001" in md
    html = open(w["html"]).read()
    assert "recommended model" in html and "ambient-sigma_tn1" in html
    # without a winning peer the bootstrapped trial is recommended, with the runner-up named
    w = report.write_report(str(tmp_path / "b"), trials, curves, {}, config, manifest)
    md = open(w["markdown"]).read()
    assert "- Recommended model: res_00001 — μ_var = 0, μ_L1 = 0, range adapter on — the lowest validation G of " \
           "all 5 trials (validation G 0.2; test G 0.1875); next: res_00002" in md
    assert "best trial — recommended" in md
    assert "classifier FD ranks" not in md  # no labelled metrics: nothing to disagree
    # the samples' classifier FD ranks another model clearly better: said beside the recommendation
    from bootdiff.evaluation.summary import _recommendation
    rec = {**peer, "classifier_fd": 230.0}
    others = [{**t, "classifier_fd": 200.0 if t["trial_id"] == "res_00001" else 300.0} for t in trials]
    said, _ = _recommendation(others + [rec], others[0], rec)
    assert said[1] == ("The samples' classifier FD ranks them the other way: res_00001 (bootstrapped (residual)) has "
                       "FD 200 against the recommended model's 230 (13.0% lower). G, measured on validation, chose; "
                       "FD, measured against the test split, is never used to choose — compare their sample grids "
                       "below."), said
    others[0]["classifier_fd"] = 220.0  # within 5 %: noise, not a disagreement
    assert len(_recommendation(others + [rec], others[0], rec)[0]) == 1
    assert _model("ambient") == "Ambient Omni" and _model("patchdiff-full_share0.5") == "Patch Diffusion full_share0.5"
