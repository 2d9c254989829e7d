"""The data-efficiency benchmark's outputs (`bootdiff.efficiency`): per N and model the scores,
``gap_closed`` for test G and SWD against the all-data oracle, ``efficiency.json``, the plots of
test G and SWD against N (log x; the oracle a horizontal line) and a Markdown summary."""

from __future__ import annotations

import json
import math
from typing import Dict, Optional

from bootdiff import util
from bootdiff.efficiency.models import PEER_NAMES, best_val_G, gap_closed, worth_in_images

MODELS = ("baseline", "combined", "bootstrap")
PEERS = PEER_NAMES  # `bootdiff.efficiency.models.peers`: the rows a config's views allow


def summarize(results: Dict[str, dict], plan: dict, b: dict) -> dict:
    """Per N: each model's scores and gap_closed for test G and SWD (against the oracle)."""
    oracle = results.get("oracle", {})
    oracle_stop = early_stopped(results, None, "oracle")
    o_best = _oracle_G(oracle, oracle_stop)
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
                row[key] = gap_closed(early["baseline"]["test_G"], early[m]["test_G"], o_best)
        per_n[str(n)] = row
    _add_worth(per_n, plan, oracle, o_best)
    _near_oracle(per_n, o_best)
    wall = sum(r.get("wall_s", 0.0) for r in results.values())
    return {"ns": plan["ns"], "budgets": b, "g_sigma_data": plan["g_sigma_data"],
            "g_sigma_data_from": "the test split (fixed for every N and the oracle)",
            "num_pool": len(plan["pool"]), "num_partial": len(plan["partial"]), "num_test": len(plan["test"]),
            "oracle": {k: oracle.get(k) for k in keys if k in oracle}, "oracle_early_stopped": oracle_stop,
            "oracle_best_test_G": o_best, "per_n": per_n,
            "views": {v: {k: results.get(f"view-{v}", {}).get(k) for k in ("kimg", "wall_s")} for v in plan["views"]},
            "model_wall_s": wall}


def _stopped_G(row: dict, m: str):
    e = row.get(f"{m}_early_stopped")
    return e["test_G"] if e else (row.get(m) or {}).get("test_G")


def _add_worth(per_n: dict, plan: dict, oracle: dict, oracle_G: Optional[float] = None) -> None:
    """Each N's ``worth``: what every model's test G (at its validation minimum when stopped) is
    worth in full-resolution images (`bootdiff.efficiency.models.worth_in_images`) on the curve of
    the full-res-only models — the baselines at their validation minima, and the oracle at the
    whole pool (``oracle_G``: at its validation minimum when stopped) — and ``partial_pool_worth``
    = that minus N, the images the partial pool stood in for."""
    curve = {int(n): _stopped_G(row, "baseline") for n, row in per_n.items()}
    og = oracle_G if oracle_G is not None else oracle.get("test_G")
    if og is not None and math.isfinite(float(og)):
        curve[len(plan["pool"]) + len(plan["partial"])] = og
    for n, row in per_n.items():
        row["worth"] = {}
        for m in ("combined", "bootstrap", *PEERS):
            w = worth_in_images(_stopped_G(row, m), curve)
            if w["images"] is not None:
                w["partial_pool_worth"] = w["images"] - int(n)
                row["worth"][m] = w


def early_stopped(results: Dict[str, dict], n: Optional[int], model: str = "bootstrap") -> Optional[dict]:
    """N's ``baseline``, ``bootstrap`` or a peer (or, with ``n`` None and ``model="oracle"``, the
    oracle) stopped where its validation G was lowest, one rule for all: the kimg of the minimum
    of its selection run's curve (the same model and setting trained on N − v images, G on the v
    carved out — never the test split: ``select-baseline``, ``select-<peer>``, ``select-oracle``,
    or the selected residual's ``select-<label>``), and the model's own checkpoint nearest to it —
    ``{"kimg", "test_G", "train_G", "val_kimg", "val_G", "still_improving"}`` — or None without
    both curves. ``still_improving``: the selection run reached its cap with its best G at its last
    checkpoint (only said when it ran with patience, or for the oracle, which trains to its cap)."""
    prefix = "" if n is None else f"N{n}/"
    own_row = results.get(f"{prefix}{model}") or {}
    label = model if model != "bootstrap" else (own_row.get("trial") or {}).get("label")
    sel = results.get(own_row.get("select") or f"{prefix}select-{label}") or {}  # the run it was stopped by
    val = [p for p in sel.get("curve") or [] if p.get("test_G") is not None]
    own = [p for p in own_row.get("curve") or [] if p.get("test_G") is not None]
    if not (val and own):
        return None
    best = min(val, key=lambda p: p["test_G"])
    point = min(own, key=lambda p: abs(p["kimg"] - best["kimg"]))
    out = {"kimg": point["kimg"], "test_G": point["test_G"], "train_G": point.get("train_G"),
           "val_kimg": best["kimg"], "val_G": best["test_G"]}
    if "stopped_early" in sel and (sel.get("patience") or model == "oracle"):  # capped while its last checkpoint was its best
        out["still_improving"] = not sel["stopped_early"] and best is val[-1]
    return out


def _oracle_G(summary_oracle: dict, stopped: Optional[dict]) -> float:
    """The oracle's test G at its best: at its validation minimum when it was stopped, else its last."""
    if stopped:
        return stopped["test_G"]
    return summary_oracle.get("test_G", float("nan"))


def _near_oracle(per_n: dict, oracle_G: float, tol: float = 0.01) -> None:
    """Each N's ``vs_oracle``: per stopped model ``"within noise"`` when its test G is within
    ``tol`` (relative, G's checkpoint-to-checkpoint noise) of the oracle's, ``"beats"`` when lower
    by more — a sign that the oracle was cut short, not that partial data beats all the data."""
    if oracle_G is None or not math.isfinite(oracle_G):
        return
    for row in per_n.values():
        row["vs_oracle"] = {}
        for m in ("baseline", "combined", "bootstrap", *PEERS):
            g = _stopped_G(row, m)
            if g is None or not math.isfinite(float(g)):
                continue
            if abs(g - oracle_G) <= tol * abs(oracle_G):
                row["vs_oracle"][m] = "within noise"
            elif g < oracle_G:
                row["vs_oracle"][m] = "beats"


def _plot(summary: dict, metric: str, ylabel: str, url: str) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = summary["ns"]
    fig, ax = plt.subplots(figsize=(8, 4))
    def shown(ys):  # a model without a row at any N gets no line and no legend entry
        return any(isinstance(y, (int, float)) and math.isfinite(y) for y in ys)

    for m, style in (("baseline", "o-"), ("combined", "s--"), ("bootstrap", "^-"), ("ambient", "d-"), ("finetune", "v-"),
                     ("patchdiff", "P-")):
        ys = [summary["per_n"][str(n)].get(m, {}).get(metric, float("nan")) for n in ns]
        if shown(ys):
            ax.plot(ns, ys, style, label=m)
    if metric == "test_G":  # each model at its validation minimum (`early_stopped`)
        for m, style, colour in (("baseline", "o:", "C0"), ("bootstrap", "^:", "C2"), ("ambient", "d:", "C3"),
                                 ("finetune", "v:", "C4"), ("patchdiff", "P:", "C5")):
            ys = [(summary["per_n"][str(n)].get(f"{m}_early_stopped") or {}).get("test_G", float("nan")) for n in ns]
            if shown(ys):
                ax.plot(ns, ys, style, color=colour, mfc="none", label=f"{m}, stopped at validation minimum")
    o = summary["oracle"].get(metric)
    if o is not None:
        ax.axhline(o, color="k", ls=":", label=f"oracle (all {summary['num_pool'] + summary['num_partial']} at full res)")
    ax.set_xscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()  # log-scale minor labels would overprint the N labels
    ax.set_xlabel("N full-resolution training images")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    # The legend beside the axes: over them it hid the points of one N.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    util.atomic_write_bytes(url, buf.getvalue())


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4g}"


def markdown(summary: dict) -> str:
    b = summary["budgets"]
    peers_txt = "".join(f"; {p} {b[p + '_kimg']:g} kimg (the bootstrap's training FLOPs)" for p in PEERS if p + "_kimg" in b)
    if b.get("patience"):
        budget_txt = (f"Every model but the oracle stopped when its validation G had not improved for {b['patience']} "
                      f"checkpoints, up to a cap: baselines {b['full_res_kimg']:g} kimg (the bootstrap's training FLOPs), "
                      f"residual {b['residual_kimg']:g} kimg, view models {b['view_kimg']:g} kimg; the oracle trained to "
                      f"its cap, {b['oracle_kimg']:g} kimg, and is taken at its validation minimum")
    else:
        budget_txt = (f"Budgets: baseline and residual {b['full_res_kimg']:g} kimg each; view models and oracle "
                      f"{b['view_kimg']:g} kimg")
    lines = ["# Data efficiency — test G and SWD vs N", "",
             budget_txt + peers_txt + f". G weighting σ_data = {summary['g_sigma_data']:.4f}, "
             f"{summary['g_sigma_data_from']}. Partial pool {summary['num_partial']} samples, test "
             f"{summary['num_test']}.", "",
             "| N | model | test G | train G | SWD | memorised | NN dist | μ (selected) | classifier FD | share ≥ 0.9 confident |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    o = summary["oracle"]
    lines.append(f"| all | oracle | {_fmt(o.get('test_G'))} | {_fmt(o.get('train_G'))} | {_fmt(o.get('swd'))} | "
                 f"{_fmt(o.get('memorization_rate'))} | {_fmt(o.get('nn_distance_train'))} | | "
                 f"{_fmt(o.get('classifier_fd'))} | {_fmt(o.get('confident_share'))} |")
    oe = summary.get("oracle_early_stopped")
    if oe:
        lines.append(f"| all | oracle, stopped at {oe['kimg']:g} kimg (validation minimum"
                     f"{'; still improving at its cap' if oe.get('still_improving') else ''}) | {_fmt(oe['test_G'])} | "
                     f"{_fmt(oe.get('train_G'))} | | | | | | |")
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
                note = "; still improving at its cap" if e.get("still_improving") else ""
                lines.append(f"| {n} | {m}, stopped at {e['kimg']:g} kimg (validation minimum{note}) | "
                             f"{_fmt(e['test_G'])} | {_fmt(e.get('train_G'))} | | | | | | |")
    ran = [p for p in PEERS if any(p in summary["per_n"][str(n)] for n in summary["ns"])]  # the peers with rows
    lines += ["", "| N | gap closed (test G) | gap closed (SWD) | gap closed (test G), both stopped at validation minimum |"
              + "".join(f" {p}: gap closed, stopped |" for p in ran),
              "|---|---|---|---|" + "---|" * len(ran)]
    for n in summary["ns"]:
        row = summary["per_n"][str(n)]
        lines.append(f"| {n} | {_fmt(row['gap_closed_test_G'])} | {_fmt(row['gap_closed_swd'])} | "
                     f"{_fmt(row.get('gap_closed_test_G_early_stopped'))} |"
                     + "".join(f" {_fmt(row.get('gap_closed_test_G_early_stopped_' + p))} |" for p in ran))
    lines += ["", "| N | model | worth (full-res images, log-interpolated on the baselines' curve) | the partial pool stood in for |",
              "|---|---|---|---|"]
    for n in summary["ns"]:
        for m, w in summary["per_n"][str(n)].get("worth", {}).items():
            lines.append(f"| {n} | {m} | {w['bound'] if w['bound'] != '=' else '≈'} {w['images']:.0f} | "
                         f"{w['partial_pool_worth']:+.0f} images |")
    near = [f"N = {n}: {m} {'is within noise (1 %) of' if v == 'within noise' else 'beats'} the oracle"
            for n in summary["ns"] for m, v in summary["per_n"][str(n)].get("vs_oracle", {}).items()]
    if near:
        lines += ["", "Against the oracle at its best (test G " + _fmt(summary.get("oracle_best_test_G")) + "): "
                  + "; ".join(near) + "." + (" A row that beats the oracle means the oracle was cut short."
                                            if any("beats" in x for x in near) else "")]
    lines += ["", "gap closed = (baseline − bootstrap) / (baseline − oracle): 1 = as good as all the data at "
              "full resolution, 0 = no better than the N images alone; – = the baseline is within 1 % of the "
              "oracle (no gap to close at this budget), or a row the gap needs was not run here (`--rows`).", ""]
    return "\n".join(lines)


def write_outputs(out: str, summary: dict) -> None:
    """``efficiency.json``, ``g_vs_n.png``, ``swd_vs_n.png`` and ``summary.md`` under ``out``."""
    util.atomic_write_bytes(util.join(out, "efficiency.json"), json.dumps(summary, indent=1, default=float).encode())
    _plot(summary, "test_G", "test G (fixed σ_data weighting)", util.join(out, "g_vs_n.png"))
    _plot(summary, "swd", "SWD to the test split", util.join(out, "swd_vs_n.png"))
    util.atomic_write_bytes(util.join(out, "summary.md"), markdown(summary).encode())
