"""The report's summary: which model to use and how each model did, as table rows, sentences and
cards — the same numbers in each.

Whether the partial data helped at this N comes first (`verdict`: the model trained on it that the
sweep stands behind against the strongest full-res-only baseline), then the recommended model
(`bootdiff.sweep.recommend`: the lowest validation G of every model, each at its own validation
minimum), then the best bootstrapped trial (docs/METHOD.md §6:
chosen on validation G, never on test) with its train–test gap, then every baseline and peer
against it. Pure data in, text out; `bootdiff.evaluation.report` lays it out.
"""

from __future__ import annotations

import math

from bootdiff.evaluation.plots import _fmt, _ok
from bootdiff.evaluation.quality import _change
from bootdiff.sweep import how_it_stopped, num as _num

KIND_LABEL = {"residual": "bootstrapped (residual)", "combined": "combined denoiser (baseline)",
              "full_res": "full-res only (baseline)", "ambient": "Ambient Omni peer (baseline)",
              "finetune": "pre-train + fine-tune peer (baseline)", "patchdiff": "Patch Diffusion peer (baseline)",
              "ensemble": "ensemble of the bootstrapped model and a peer"}


# each kind by name, in a sentence (the verdict's)
KIND_NAME = {"residual": "bootstrapped model", "combined": "combined denoiser", "ambient": "Ambient Omni peer",
             "finetune": "pre-train + fine-tune peer", "patchdiff": "Patch Diffusion peer",
             "ensemble": "ensemble of the bootstrapped model and a peer"}


def _settings(t) -> str:
    if t["kind"] == "ensemble":
        (a, b), (wa, wb) = t["members"], t["weights"]
        return f"{KIND_LABEL['ensemble']}: {_fmt(wa)} × {a} + {_fmt(wb)} × {b}"
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
    return [line] + _fd_disagrees(trials, rec), \
        [("recommended model", rec["trial_id"], f"validation G {_fmt(v)}, test G {_fmt(g)}")]


# FD of 256 samples moves by a few % between seeds (benchmarks/RESULTS.md): a smaller lead is not a disagreement
FD_MARGIN = 0.05


def _fd_disagrees(trials, rec) -> list:
    """A sentence when the samples' classifier FD (labelled sources) ranks another model clearly
    (> `FD_MARGIN`) better than the recommended one: G chose, on validation; FD is measured against
    the test split, so it is reported, never used to choose — the reader compares the grids."""
    fd = _num(rec.get("classifier_fd"))
    if not math.isfinite(fd):
        return []
    other = min((t for t in trials if t is not rec and math.isfinite(_num(t.get("classifier_fd")))),
                key=lambda t: _num(t["classifier_fd"]), default=None)
    if other is None or _num(other["classifier_fd"]) >= (1 - FD_MARGIN) * fd:
        return []
    return [f"The samples' classifier FD ranks them the other way: {other['trial_id']} ({KIND_LABEL[other['kind']]}) "
            f"has FD {_fmt(_num(other['classifier_fd']))} against the recommended model's {_fmt(fd)} "
            f"({_change(_num(other['classifier_fd']), fd)}). G, measured on validation, chose; FD, measured "
            f"against the test split, is never used to choose — compare their sample grids below."]


def _baseline_stop(fr, b) -> tuple:
    """(how the full-res baseline ended, whether it is the strongest baseline this run can give):
    with patience (``full_res.train.patience``) it is, taken at its validation minimum — stopped
    by patience, or at its cap (then said "still improving" when its last checkpoint was its best:
    a longer cap could lower its G); without patience only at the bootstrapped model's budget.
    Then whether it trained with non-leaking augmentation (`_augmented`)."""
    said, fair = _stopped(fr, b)
    return said + _augmented(b), fair


def _augmented(b) -> str:
    """Whether the baseline had non-leaking augmentation (``full_res.train.augment``; `bootdiff.augment`):
    on a few images it over-fits without it, so a baseline without it flatters the partial data.
    Nothing when the budgets do not say (``augment`` absent) or the data takes none (video)."""
    p = b.get("augment")
    if p is None or not b.get("augmentable", True):
        return ""
    if p > 0:
        return f" It trained with non-leaking augmentation (full_res.train.augment = {_fmt(p)})."
    return (" It trained without augmentation (full_res.train.augment = 0): on a few full-res images non-leaking "
            "augmentation usually makes it stronger, so the comparison may favour the partial data.")


def _stopped(fr, b) -> tuple:
    """`_baseline_stop`'s first sentence and its verdict on fairness."""
    pat, cap = int(b.get("patience") or 0), _num(b["full_res"])
    ran, at = _num(fr.get("kimg")), _num(fr.get("chosen_kimg"))
    taken = f"taken at its validation minimum ({_fmt(at)} kimg)"
    if pat > 0:
        how = how_it_stopped(fr)
        if how == "patience":
            return (f"The full-res-only baseline stopped when its validation G had not improved for {pat} "
                    f"checkpoint{'s' if pat > 1 else ''}, at {_fmt(ran)} of its {_fmt(cap)}-kimg cap, {taken}."), True
        if how == "cap_improving":
            return (f"The full-res-only baseline reached its {_fmt(cap)}-kimg cap still improving (its last "
                    f"checkpoint was its best): a longer cap (full_res.train.total_kimg) could lower its G, so "
                    f"the comparison may favour the partial data."), True
        return f"The full-res-only baseline trained to its {_fmt(cap)}-kimg cap, {taken}.", True
    equal = abs(b["bootstrapped"] - ran) <= 0.01 * max(b["bootstrapped"], ran, 1e-9)
    if equal:
        return (f"The full-res-only baseline trained the bootstrapped model's budget ({_fmt(b['bootstrapped'])} "
                f"kimg), {taken}."), True
    return (f"The full-res-only baseline trained {_fmt(ran)} kimg against the bootstrapped model's "
            f"{_fmt(b['bootstrapped'])} without early stopping, so this run cannot say whether the partial "
            f"data helped; set full_res.train.patience for the strongest baseline, or leave "
            f"full_res.train.total_kimg unset for equal budgets."), False


def _vs(t, fr) -> str:
    """Test G of ``t`` against the baseline's, then the labelled-source metrics when both have them."""
    g, gf = _num(t["test_G"]), _num(fr["test_G"])
    out = f"test G {_fmt(g)} against {_fmt(gf)} for the full-res-only baseline ({_change(g, gf)})"
    if math.isfinite(_num(t.get("classifier_fd"))) and math.isfinite(_num(fr.get("classifier_fd"))):
        out += (f"; classifier FD {_fmt(_num(t['classifier_fd']))} vs {_fmt(_num(fr['classifier_fd']))}, "
                f"confidently classified {_num(t.get('confident_share')) * 100:.0f}% vs "
                f"{_num(fr.get('confident_share')) * 100:.0f}% of the samples")
    return out


def verdict(budget, trials, best=None, rec=None) -> tuple:
    """The report's answer, said first: did the partial data help at this N, and by how much?
    ``(sentences, card)``. The model trained on it that the sweep stands behind — the recommended
    model (`bootdiff.sweep.recommend`) when it is not the full-res baseline, else the lowest
    validation G of every other kind — against the full-res-only baseline at its validation
    minimum, by test G and, for labelled sources, the classifier FD and confidently classified
    share; the best bootstrapped trial's own result beside it when that model is a peer or the
    combined denoiser. Fair only against the strongest baseline (`_baseline_stop`), else it says
    why it cannot answer. Neither choice reads the test split."""
    n = budget["n_full"]
    fr = next((t for t in trials if t["kind"] == "full_res" and math.isfinite(_num(t["test_G"]))), None)
    cands = [t for t in trials if t["kind"] != "full_res" and math.isfinite(_num(t.get("val_G")))
             and math.isfinite(_num(t["test_G"])) and (t.get("checkpoint") or t["kind"] in ("combined", "ensemble"))]
    pd = rec if rec is not None and rec["kind"] != "full_res" and rec in cands else \
        min(cands, key=lambda t: _num(t["val_G"]), default=None)
    if fr is None or pd is None:
        why = ("no full-res-only baseline with a finite test G (sweep.baseline_full_res)" if fr is None else
               "no model trained on the partial data with a finite validation and test G")
        return [f"Whether the partial data helped at N = {n} cannot be said: {why}."], \
            (f"partial data at N = {n}", "cannot say", why)
    stop, fair = _baseline_stop(fr, budget)
    if not fair:
        return [stop], (f"partial data at N = {n}", "cannot say", "baseline neither early-stopped nor at equal budget")
    g, gf, kind = _num(pd["test_G"]), _num(fr["test_G"]), KIND_NAME.get(pd["kind"], pd["kind"])
    helped = g < gf
    lines = [f"At N = {n} full-res samples the partial data {'helped' if helped else 'did not help'}: "
             f"the {kind}{'' if pd['trial_id'] == pd['kind'] else ' ' + pd['trial_id']}, the model trained on it with "
             "the lowest validation G, reaches "
             f"{_vs(pd, fr)}. {stop}"]
    bt = best if best is not None and best["kind"] == "residual" and best is not pd else None
    if bt is not None and math.isfinite(_num(bt["test_G"])):
        lines.append(f"The bootstrapped model itself (best residual trial {bt['trial_id']}) reaches {_vs(bt, fr)}.")
    return lines, (f"partial data at N = {n}", "helped" if helped else "did not help",
                   f"{pd['trial_id']}: test G {_change(g, gf)} than full-res only")


def summarize(trials, best, rec=None, answer=None, worth=None):
    """The summary: table rows (best, then baselines), headline sentences and the page's cards
    ``(label, value, note)`` — the same numbers in each. ``answer`` (`verdict`'s ``(sentences,
    card)``: whether the partial data helped) comes first; then ``rec``, the recommended model's
    row, and ``worth`` (a sentence: `bootdiff.evaluation.worth.worth_line`)."""
    rec_lines, cards = _recommendation(trials, best, rec)
    rec_lines += [worth] if worth else []
    if answer is not None:
        rec_lines, cards = answer[0] + rec_lines, [answer[1]] + cards
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
