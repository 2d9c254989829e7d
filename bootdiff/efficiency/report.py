"""The data-efficiency benchmark's outputs (`bootdiff.efficiency`): per N and model the scores,
``gap_closed`` for test G and SWD against the all-data oracle, ``efficiency.json``, the plots of
test G and SWD against N (log x; the oracle a horizontal line) and a Markdown summary."""

from __future__ import annotations

import json
import math
from typing import Dict, Optional

from bootdiff import util
from bootdiff.efficiency.models import best_val_G, gap_closed, worth_in_images

MODELS = ("baseline", "combined", "bootstrap")
PEERS = ("ambient",)  # `bootdiff.efficiency.models.peers`: the rows a config's views allow


def summarize(results: Dict[str, dict], plan: dict, b: dict) -> dict:
    """Per N: each model's scores and gap_closed for test G and SWD (against the oracle)."""
    oracle = results.get("oracle", {})
    keys = ("test_G", "train_G", "swd", "swd_levels", "memorization_rate", "nn_distance_train", "fd",
            "classifier_fd", "confident_share",
            "curve", "kimg", "wall_s", "trial")
    per_n = {}
    for n in plan["ns"]:
        row = {m: {k: results[f"N{n}/{m}"].get(k) for k in keys if k in results.get(f"N{n}/{m}", {})}
               for m in MODELS + PEERS if f"N{n}/{m}" in results}
        row["selection"] = {k.split("/select-")[1]: best_val_G(r) for k, r in results.items()
                            if k.startswith(f"N{n}/select-")}
        for metric in ("test_G", "swd"):
            vals = [row.get(m, {}).get(metric, float("nan")) for m in ("baseline", "bootstrap")]
            row[f"gap_closed_{metric}"] = gap_closed(vals[0], vals[1], oracle.get(metric, float("nan")))
        early = {m: early_stopped(results, n, m) for m in ("baseline", "bootstrap", *PEERS)}
        for m, e in early.items():
            if e:
                row[f"{m}_early_stopped"] = e
        for m in ("bootstrap", *PEERS):  # both stopped by the same rule
            if early["baseline"] and early[m]:
                key = "gap_closed_test_G_early_stopped" + ("" if m == "bootstrap" else f"_{m}")
                row[key] = gap_closed(early["baseline"]["test_G"], early[m]["test_G"], oracle.get("test_G", float("nan")))
        per_n[str(n)] = row
    _add_worth(per_n, plan, oracle)
    wall = sum(r.get("wall_s", 0.0) for r in results.values())
    return {"ns": plan["ns"], "budgets": b, "g_sigma_data": plan["g_sigma_data"],
            "g_sigma_data_from": "the test split (fixed for every N and the oracle)",
            "num_pool": len(plan["pool"]), "num_partial": len(plan["partial"]), "num_test": len(plan["test"]),
            "oracle": {k: oracle.get(k) for k in keys if k in oracle}, "per_n": per_n,
            "views": {v: {k: results.get(f"view-{v}", {}).get(k) for k in ("kimg", "wall_s")} for v in plan["views"]},
            "model_wall_s": wall}


def _stopped_G(row: dict, m: str):
    e = row.get(f"{m}_early_stopped")
    return e["test_G"] if e else (row.get(m) or {}).get("test_G")


def _add_worth(per_n: dict, plan: dict, oracle: dict) -> None:
    """Each N's ``worth``: what every model's test G (at its validation minimum when stopped) is
    worth in full-resolution images (`bootdiff.efficiency.models.worth_in_images`) on the curve of
    the full-res-only models — the baselines at their validation minima, and the oracle at the
    whole pool — and ``partial_pool_worth`` = that minus N, the images the partial pool stood in for."""
    curve = {int(n): _stopped_G(row, "baseline") for n, row in per_n.items()}
    if oracle.get("test_G") is not None:
        curve[len(plan["pool"]) + len(plan["partial"])] = oracle["test_G"]
    for n, row in per_n.items():
        row["worth"] = {}
        for m in ("combined", "bootstrap", *PEERS):
            w = worth_in_images(_stopped_G(row, m), curve)
            if w["images"] is not None:
                w["partial_pool_worth"] = w["images"] - int(n)
                row["worth"][m] = w


def early_stopped(results: Dict[str, dict], n: int, model: str = "bootstrap") -> Optional[dict]:
    """N's ``baseline``, ``bootstrap`` or a peer stopped where its validation G was lowest, one
    rule for all: the kimg of the minimum of its selection run's curve (the same model and setting
    trained on N − v images, G on the v carved out — never the test split: ``select-baseline``,
    ``select-<peer>``, or the selected residual's ``select-<label>``), and the model's own checkpoint nearest to it —
    ``{"kimg", "test_G", "train_G", "val_kimg", "val_G"}`` — or None without both curves."""
    own_row = results.get(f"N{n}/{model}") or {}
    label = model if model != "bootstrap" else (own_row.get("trial") or {}).get("label")
    sel = results.get(f"N{n}/select-{label}") or {}
    val = [p for p in sel.get("curve") or [] if p.get("test_G") is not None]
    own = [p for p in own_row.get("curve") or [] if p.get("test_G") is not None]
    if not (val and own):
        return None
    best = min(val, key=lambda p: p["test_G"])
    point = min(own, key=lambda p: abs(p["kimg"] - best["kimg"]))
    return {"kimg": point["kimg"], "test_G": point["test_G"], "train_G": point.get("train_G"),
            "val_kimg": best["kimg"], "val_G": best["test_G"]}


def _plot(summary: dict, metric: str, ylabel: str, url: str) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = summary["ns"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for m, style in (("baseline", "o-"), ("combined", "s--"), ("bootstrap", "^-"), ("ambient", "d-")):
        ax.plot(ns, [summary["per_n"][str(n)].get(m, {}).get(metric, float("nan")) for n in ns], style, label=m)
    if metric == "test_G":  # baseline and bootstrap at their validation minima (`early_stopped`)
        for m, style, colour in (("baseline", "o:", "C0"), ("bootstrap", "^:", "C2"), ("ambient", "d:", "C3")):
            ax.plot(ns, [(summary["per_n"][str(n)].get(f"{m}_early_stopped") or {}).get("test_G", float("nan"))
                         for n in ns], style, color=colour, mfc="none", label=f"{m}, stopped at validation minimum")
    o = summary["oracle"].get(metric)
    if o is not None:
        ax.axhline(o, color="k", ls=":", label=f"oracle (all {summary['num_pool'] + summary['num_partial']} at full res)")
    ax.set_xscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()  # log-scale minor labels would overprint the N labels
    ax.set_xlabel("N full-resolution training images")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    util.atomic_write_bytes(url, buf.getvalue())


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"


def markdown(summary: dict) -> str:
    b = summary["budgets"]
    lines = ["# Data efficiency — test G and SWD vs N", "",
             f"Budgets: baseline and residual {b['full_res_kimg']:g} kimg each; view models and oracle "
             f"{b['view_kimg']:g} kimg" + "".join(f"; {p} {b[p + '_kimg']:g} kimg (the bootstrap's training FLOPs)"
                                                  for p in PEERS if p + "_kimg" in b) + ". G weighting σ_data = {summary['g_sigma_data']:.4f}, "
             f"{summary['g_sigma_data_from']}. Partial pool {summary['num_partial']} samples, test "
             f"{summary['num_test']}.", "",
             "| N | model | test G | train G | SWD | memorised | NN dist | μ (selected) | classifier FD | share ≥ 0.9 confident |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    o = summary["oracle"]
    lines.append(f"| all | oracle | {_fmt(o.get('test_G'))} | {_fmt(o.get('train_G'))} | {_fmt(o.get('swd'))} | "
                 f"{_fmt(o.get('memorization_rate'))} | {_fmt(o.get('nn_distance_train'))} | | "
                 f"{_fmt(o.get('classifier_fd'))} | {_fmt(o.get('confident_share'))} |")
    for n in summary["ns"]:
        row = summary["per_n"][str(n)]
        for m in MODELS + tuple(p for p in PEERS if p in row):
            r = row.get(m, {})
            mu = r.get("trial", {}).get("label", "") if m == "bootstrap" else ""
            lines.append(f"| {n} | {m} | {_fmt(r.get('test_G'))} | {_fmt(r.get('train_G'))} | {_fmt(r.get('swd'))} | "
                         f"{_fmt(r.get('memorization_rate'))} | {_fmt(r.get('nn_distance_train'))} | {mu} | "
                         f"{_fmt(r.get('classifier_fd'))} | {_fmt(r.get('confident_share'))} |")
        for m in ("baseline", "bootstrap", *PEERS):
            e = row.get(f"{m}_early_stopped")
            if e:
                lines.append(f"| {n} | {m}, stopped at {e['kimg']:g} kimg (validation minimum) | {_fmt(e['test_G'])} | "
                             f"{_fmt(e.get('train_G'))} | | | | |")
    lines += ["", "| N | gap closed (test G) | gap closed (SWD) | gap closed (test G), both stopped at validation minimum |"
              + "".join(f" {p}: gap closed, stopped |" for p in PEERS),
              "|---|---|---|---|" + "---|" * len(PEERS)]
    for n in summary["ns"]:
        row = summary["per_n"][str(n)]
        lines.append(f"| {n} | {_fmt(row['gap_closed_test_G'])} | {_fmt(row['gap_closed_swd'])} | "
                     f"{_fmt(row.get('gap_closed_test_G_early_stopped'))} |"
                     + "".join(f" {_fmt(row.get('gap_closed_test_G_early_stopped_' + p))} |" for p in PEERS))
    lines += ["", "| N | model | worth (full-res images, log-interpolated on the baselines' curve) | the partial pool stood in for |",
              "|---|---|---|---|"]
    for n in summary["ns"]:
        for m, w in summary["per_n"][str(n)].get("worth", {}).items():
            lines.append(f"| {n} | {m} | {w['bound'] if w['bound'] != '=' else '≈'} {w['images']:.0f} | "
                         f"{w['partial_pool_worth']:+.0f} images |")
    lines += ["", "gap closed = (baseline − bootstrap) / (baseline − oracle): 1 = as good as all the data at "
              "full resolution, 0 = no better than the N images alone; – = the baseline is within 1 % of the "
              "oracle (no gap to close at this budget).", ""]
    return "\n".join(lines)


def write_outputs(out: str, summary: dict) -> None:
    """``efficiency.json``, ``g_vs_n.png``, ``swd_vs_n.png`` and ``summary.md`` under ``out``."""
    util.atomic_write_bytes(util.join(out, "efficiency.json"), json.dumps(summary, indent=1, default=float).encode())
    _plot(summary, "test_G", "test G (fixed σ_data weighting)", util.join(out, "g_vs_n.png"))
    _plot(summary, "swd", "SWD to the test split", util.join(out, "swd_vs_n.png"))
    util.atomic_write_bytes(util.join(out, "summary.md"), markdown(summary).encode())
