"""What the partial pool is worth in full-resolution images, in the sweep report: quoted from a
data-efficiency benchmark of the same data (``benchmarks/data_efficiency.py --out <folder>``,
named by ``eval.benchmark``).

The benchmark measures, at each N, every model's test G at its validation minimum and what it is
worth in full-resolution images: the N at which the full-res-only baselines' curve reaches it,
log-interpolated between the measured N (`bootdiff.efficiency.models.worth_in_images`). A
pipeline run cannot place its own test G on that curve — its test split and G weighting are its
own, not the benchmark's — so the report quotes the benchmark's figures for the pipeline's N and
says where they come from. "Same data" is checked, at config load: the benchmark's config
(its ``plan.json``) has the same ``data.source``, resolution, channels, corruption, latent
setting and views (each view's kind and geometry; their training may differ). A benchmark that
did not measure the pipeline's N gives no number, only the N it measured.
"""

from __future__ import annotations

import dataclasses
import json
from typing import List, Optional

import yaml

from bootdiff import util

DATA_KEYS = ("source", "resolution", "channels", "corruption", "latent")
VIEW_SKIP = ("net", "train", "scaling")  # a view's training may differ; its geometry may not


def _plain(x):
    """A config (dataclass, DictConfig or dict) as plain JSON-like data, enums as their values."""
    if dataclasses.is_dataclass(x):
        x = dataclasses.asdict(x)
    elif not isinstance(x, (dict, list, tuple, str, int, float, bool, type(None))):
        from omegaconf import OmegaConf

        x = OmegaConf.to_container(x, resolve=True)
    return json.loads(json.dumps(x, default=lambda v: getattr(v, "value", str(v))))


def benchmark_config(url: str) -> dict:
    """The config a benchmark ran with (``plan.json``'s ``config``, written by
    `bootdiff.efficiency.run.run_benchmark`), as plain data; ValueError naming the file when the
    folder has none."""
    plan = util.join(url, "plan.json")
    if not util.exists(util.join(url, "efficiency.json")) or not util.exists(plan):
        raise ValueError(f"eval.benchmark={url!r}: no finished data-efficiency benchmark there (it needs "
                         f"efficiency.json and plan.json: benchmarks/data_efficiency.py --out {url})")
    text = json.loads(util.read_bytes(plan)).get("config")
    if not text:
        raise ValueError(f"eval.benchmark={url!r}: {plan} records no config (a benchmark older than this "
                         "check); run the benchmark again to quote it")
    return yaml.safe_load(text)


def data_differences(cfg, bench: dict) -> List[str]:
    """The keys in which a pipeline config ``cfg`` and a benchmark's config ``bench`` (plain data)
    describe different data: ``data.<key>`` for `DATA_KEYS`, ``views`` when the view names differ,
    ``views.<v>.<key>`` for a view's geometry (all but `VIEW_SKIP`). Empty: the same data."""
    mine = _plain(cfg)
    out = [f"data.{k}" for k in DATA_KEYS if mine["data"].get(k) != bench.get("data", {}).get(k)]
    views, other = mine.get("views") or {}, bench.get("views") or {}
    if set(views) != set(other):
        return out + ["views"]
    for v in views:
        out += [f"views.{v}.{k}" for k in views[v] if k not in VIEW_SKIP and views[v][k] != other[v].get(k)]
    return out


def check_benchmark(cfg, url: str) -> None:
    """``eval.benchmark`` at config load: a finished benchmark of this config's data, else ValueError."""
    diff = data_differences(cfg, benchmark_config(url))
    if diff:
        raise ValueError(f"eval.benchmark={url!r}: that benchmark measured other data than this config's "
                         f"({', '.join(diff)} differ): its worth in full-res images would not be this run's")


def benchmark_worth(url: str, n: int) -> Optional[dict]:
    """The benchmark's figures for N = ``n`` full-res images: ``{"url", "n", "measured_ns",
    "worth": {model: {"images", "bound", "partial_pool_worth"}}, "test_G": {model: test G}}``
    (models: combined, bootstrap, the peers; ``worth`` empty when the benchmark did not measure
    ``n``); None without ``url``."""
    if not url:
        return None
    summary = json.loads(util.read_bytes(util.join(url, "efficiency.json")))
    row = (summary.get("per_n") or {}).get(str(int(n))) or {}
    worth = row.get("worth") or {}
    test = {}
    for m in worth:
        e = row.get(f"{m}_early_stopped")
        test[m] = e["test_G"] if e else (row.get(m) or {}).get("test_G")
    base = row.get("baseline_early_stopped") or row.get("baseline") or {}
    return {"url": url, "n": int(n), "measured_ns": [int(x) for x in summary.get("ns", [])], "worth": worth,
            "test_G": test, "baseline_test_G": base.get("test_G")}


LABEL = {"combined": "the combined denoiser", "bootstrap": "the bootstrapped model", "ambient": "Ambient Omni",
         "finetune": "pre-train + fine-tune", "patchdiff": "Patch Diffusion"}


def worth_line(w: Optional[dict]) -> Optional[str]:
    """The report's sentence on `benchmark_worth`'s figures (None without a benchmark)."""
    if not w:
        return None
    if not w["worth"]:
        return (f"The data-efficiency benchmark of this data ({w['url']}) measured N = "
                f"{', '.join(map(str, w['measured_ns'])) or 'none'}, not N = {w['n']}: no worth in full-res "
                "images to quote for this run.")

    def one(m, v):
        k = v.get("images")
        bound = {"<": "fewer than ", ">": "more than "}.get(v.get("bound"), "≈ ")
        g = w["test_G"].get(m)
        return (f"{LABEL.get(m, m)} {bound}{k:.0f} images ({v['partial_pool_worth']:+.0f}"
                + (f"; test G {g:.4f}" if isinstance(g, (int, float)) else "") + ")")

    ranked = sorted(w["worth"].items(), key=lambda kv: -(kv[1].get("images") or 0))
    base = w.get("baseline_test_G")
    return (f"Worth in full-resolution images, from the data-efficiency benchmark of this data ({w['url']}; "
            f"its own splits, every model at its validation minimum) at N = {w['n']}"
            + (f" (the full-res-only baseline: test G {base:.4f})" if isinstance(base, (int, float)) else "")
            + ": " + "; ".join(one(m, v) for m, v in ranked) + ".")
