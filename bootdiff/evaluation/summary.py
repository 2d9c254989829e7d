"""The report's summary: which model to use and how each model did, as table rows, sentences and
cards — the same numbers in each.

The recommended model (`bootdiff.sweep.recommend`: the lowest validation G of every model, each at
its own validation minimum) is said first, then the best bootstrapped trial (docs/METHOD.md §6:
chosen on validation G, never on test) with its train–test gap, then every baseline and peer
against it. Pure data in, text out; `bootdiff.evaluation.report` lays it out.
"""

from __future__ import annotations

import math

from bootdiff.evaluation.plots import _fmt, _ok
from bootdiff.evaluation.quality import _change
from bootdiff.sweep import num as _num

KIND_LABEL = {"residual": "bootstrapped (residual)", "combined": "combined denoiser (baseline)",
              "full_res": "full-res only (baseline)", "ambient": "Ambient Omni peer (baseline)",
              "finetune": "pre-train + fine-tune peer (baseline)", "patchdiff": "Patch Diffusion peer (baseline)"}


def _settings(t) -> str:
    if t["kind"] != "residual":
        setting = t.get("setting") or {}
        return KIND_LABEL[t["kind"]] + ("" if not setting else
                                        " at " + ", ".join(f"{k} = {_fmt(v)}" for k, v in sorted(setting.items())))
    return (f"μ_var = {_fmt(t['mu_var'])}, μ_L1 = {_fmt(t['mu_l1'])}, range adapter "
            f"{'on' if t['range_adapter'] else 'off'}")


def _taken(t) -> str:
    """Where a trained trial was taken (`bootdiff.sweep.chosen_report`), when not at its end."""
    ck, k = _num(t.get("chosen_kimg")), _num(t.get("kimg"))
    if math.isfinite(ck) and math.isfinite(k) and ck < k - 1e-9:
        return f" (taken at {_fmt(ck)} of {_fmt(k)} kimg, its validation minimum)"
    return ""


def _recommendation(trials, best, rec):
    """The report's first sentence and card: the model the sweep recommends (`bootdiff.sweep.recommend`:
    the lowest validation G of every model) and why, with the numbers."""
    if rec is None:
        return [], []
    v, g = _num(rec.get("val_G")), _num(rec.get("test_G"))
    others = sorted((t for t in trials if t is not rec and math.isfinite(_num(t.get("val_G")))),
                    key=lambda t: _num(t["val_G"]))
    n = 1 + len(others)
    line = (f"Recommended model: {rec['trial_id']} — {_settings(rec)} — the lowest validation G of all {n} "
            f"trials (validation G {_fmt(v)}; test G {_fmt(g)}{_taken(rec)})")
    if best is not None and rec is not best and best["kind"] == "residual":
        bv, bg = _num(best.get("val_G")), _num(best["test_G"])
        line += (f". It is better on validation than the best bootstrapped trial {best['trial_id']} (validation G "
                 f"{_fmt(bv)}, test G {_fmt(bg)}; the recommended model's test G is {_change(g, bg)}): "
                 f"use it rather than the bootstrapped model.")
    elif others:
        nxt = others[0]
        line += (f"; next: {nxt['trial_id']} ({KIND_LABEL[nxt['kind']]}), validation G {_fmt(_num(nxt['val_G']))}"
                 f", test G {_fmt(_num(nxt['test_G']))}.")
    else:
        line += "."
    return [line], [("recommended model", rec["trial_id"], f"validation G {_fmt(v)}, test G {_fmt(g)}")]


def summarize(trials, best, rec=None):
    """The summary: table rows (best, then baselines), headline sentences and the page's cards
    ``(label, value, note)`` — the same numbers in each; ``rec``: the recommended model's row,
    said first."""
    rec_lines, cards = _recommendation(trials, best, rec)
    rows = []
    bg, btr = (_num(best["test_G"]), _num(best["train_G"])) if best else (math.nan, math.nan)
    n_ok, n_res = sum(_ok(t) for t in trials), sum(t["kind"] == "residual" for t in trials)
    lines = [f"{len(trials)} trials ({n_res} residual, {len(trials) - n_res} baseline(s)); {n_ok} "
             f"completed" + "".join(f", {sum(t.get('status') == st for t in trials)} {st.replace('_', ' ')}"
                                    for st in ("stopped_early", "interrupted", "error")
                                    if any(t.get("status") == st for t in trials)) + "."] + rec_lines
    if best is None:
        lines.append("No trial has a finite validation G: no best trial.")
    else:
        bv = _num(best.get("val_G"))
        how = (f"chosen on validation G = {_fmt(bv)} (the held-out val split; the test split is never "
               "used to choose)" if math.isfinite(bv) else "the only residual trial (no val split to choose on)")
        lines.append(f"Best trial: {best['trial_id']} ({_settings(best)}), {how}; test G = {_fmt(bg)}, "
                     f"train G = {_fmt(btr)}, train–test gap = {_fmt(bg - btr)}{_taken(best)}.")
        cards += [("best trial", best["trial_id"], _settings(best)),
                  ("best test G", _fmt(bg), f"train G {_fmt(btr)}"),
                  ("train–test gap", _fmt(bg - btr),
                   f"{(bg - btr) / btr * 100:.1f}% of train G" if btr > 0 and math.isfinite(bg) else "")]
    baselines = [t for t in trials if t["kind"] != "residual" and t is not best]
    for t in ([best] if best else []) + baselines:
        g, tr = _num(t["test_G"]), _num(t["train_G"])
        label = "best trial" if t is best else KIND_LABEL[t["kind"]]
        rows.append({"model": label + (" — recommended" if t is rec else ""),
                     "trial": t["trial_id"], "settings": _settings(t) if t is best else None,
                     "val G": _num(t.get("val_G")), "test G": g, "train G": tr, "gap (test − train)": g - tr,
                     "test G / best": g / bg if bg > 0 else math.nan, "status": t["status"]})
        if t is not best and best is not None:
            lines.append(f"{KIND_LABEL[t['kind']][0].upper() + KIND_LABEL[t['kind']][1:]}: {t['trial_id']}, test G = "
                         f"{_fmt(g)}{_taken(t)}; the best trial's is {_change(bg, g)}.")
            cards.append((KIND_LABEL[t["kind"]], _fmt(g), f"{t['trial_id']}: best is {_change(bg, g)}"))
    return rows, lines, cards
