"""The sweep report's reading of sample quality and budgets (docs/METHOD.md §8): Figure 1 of the
paper as numbers — the sliced Wasserstein distance of each model's samples to the test split per
pyramid level (low-res only, patches only, combined, bootstrapped, full-res only), FD beside it when
measured — with the sentence that reads it, and the summary's sentences on training budgets
(the bootstrapped model's, the full-res baseline's and the peers' side by side; whether the partial
data helped is `bootdiff.evaluation.summary.verdict`'s). Pure data in, tables ``(columns, rows)`` and text out; `bootdiff.evaluation.report` lays them out.
"""

from __future__ import annotations

import math

import numpy as np

from bootdiff.evaluation.plots import _fmt
from bootdiff.sweep import how_it_stopped, num as _num


def _change(g, ref) -> str:
    if not (math.isfinite(g) and math.isfinite(ref) and ref > 0):
        return "no finite G"
    return f"{abs(g - ref) / ref * 100:.1f}% {'lower' if g < ref else 'higher'}"


MODEL_LABEL = {"bootstrapped": "bootstrapped", "combined": "combined", "full_res": "full-res only", "ensemble": "ensemble",
               "ambient": "Ambient Omni", "finetune": "pre-train + fine-tune", "patchdiff": "Patch Diffusion"}


def _model(name) -> str:
    """A sample set's label; a peer at a grid setting keeps its setting (``Ambient Omni sigma_tn0.5``)."""
    kind, _, setting = str(name).partition("-")
    if name not in MODEL_LABEL and kind in ("ambient", "finetune", "patchdiff"):
        return f"{MODEL_LABEL[kind]} {setting}"
    return MODEL_LABEL.get(name, str(name))


def _figure1_order(quality) -> list:
    """Views alone first, then combined, bootstrapped, full-res only, the peers (Figure 1's order)."""
    rank = {"combined": 1, "bootstrapped": 2, "full_res": 3}
    return sorted(quality, key=lambda n: (rank.get(n, 0 if str(n).endswith(" only") else 4), str(n)))


def figure1_table(quality, roles=None):
    """Figure 1 of the paper as numbers (docs/METHOD.md §8): ``(columns, rows)``, one row per
    sample set of ``quality`` (`bootdiff.evaluation.evaluate.sample_quality`): what it was trained on, its
    SWD to the test split per pyramid level (finest first), their mean, FD when measured, the
    classifier FD and confidently classified share for labelled sources, memorisation rate and
    nearest-neighbour distance."""
    order = _figure1_order(quality)
    res = next((q["swd_resolutions"] for q in quality.values() if q.get("swd_resolutions")), [])
    levels = [f"SWD {r} px" + (" (fine)" if i == 0 and len(res) > 1 else
                               " (coarse)" if i == len(res) - 1 and len(res) > 1 else "")
              for i, r in enumerate(res)]
    has_fd = any("fd" in q for q in quality.values())
    has_cls = any("classifier_fd" in q for q in quality.values())  # labelled sources (`bootdiff.evaluation.classifier`)
    cols = ["model", "trained on", *levels, "SWD mean", *(["FD"] if has_fd else []),
            *(["classifier FD", "confident ≥ 0.9"] if has_cls else []), "memorised", "NN distance"]
    rows = []
    for n in order:
        q = quality[n]
        lv = list(q.get("swd_levels") or [])
        lv += [None] * (len(levels) - len(lv))
        rows.append([_model(n), (roles or {}).get(n), *lv[:len(levels)],
                     float(np.mean(q["swd_levels"])) if q.get("swd_levels") else q.get("swd_test"),
                     *([q.get("fd")] if has_fd else []),
                     *([q.get("classifier_fd"), q.get("confident_share")] if has_cls else []),
                     q.get("memorization_rate"), q.get("nn_distance_train")])
    return cols, rows


def _furthest(q, key):
    """(furthest model, closest model, their SWDs) at one scale; the furthest is None when no
    model stands out (within 10% of the closest)."""
    ranked = sorted(q, key=lambda n: q[n][key])
    far, near = ranked[-1], ranked[0]
    a, b = q[far][key], q[near][key]
    return (far if b > 0 and a / b >= 1.1 else None), near, a, b


def figure1_sentence(quality) -> str:
    """The sentence that reads `figure1_table`: which model's samples lack fine detail (largest SWD
    at the finest pyramid level, at least 10% above the closest), which lack coarse structure
    (the same at the coarsest level), which is closest over all scales — generated from the
    numbers."""
    q = {n: v for n, v in quality.items()
         if v.get("swd_levels") and all(math.isfinite(_num(x)) for x in v["swd_levels"])}
    if len(q) < 2:
        return "Fewer than two models have finite SWDs per pyramid level: there is nothing to compare."
    res = next(iter(q.values()))["swd_resolutions"]
    close = min(q, key=lambda n: float(np.mean(q[n]["swd_levels"])))
    tail = f"{_model(close)} is closest over all scales (mean SWD {_fmt(float(np.mean(q[close]['swd_levels'])))})."
    if len(res) < 2:
        return f"With one pyramid level ({res[0]} px) fine and coarse scales coincide: {tail}"
    clauses = []
    for key, scale, px, what in (("swd_fine", "fine", res[0], "detail"), ("swd_coarse", "coarse", res[-1], "structure")):
        far, near, a, b = _furthest(q, key)
        if far is None:
            clauses.append(f"at the {scale} scale ({px} px) the models are within 10% of each other "
                           f"(SWD {_fmt(b)} to {_fmt(a)})")
        else:
            clauses.append(f"at the {scale} scale ({px} px) {_model(far)} is furthest from the test set (SWD "
                           f"{_fmt(a)} vs {_fmt(b)} for {_model(near)}): it lacks {what}")
    text = f"{clauses[0]}; {clauses[1]}; {tail}"
    return text[0].upper() + text[1:]


def _peer_stop(row, patience: int) -> str:
    """How a peer's row ended under the baseline's patience, said as for the baseline: stopped by
    patience, or at the cap still improving (its last checkpoint its best: the comparison may then
    favour the bootstrapped model), or at the cap, taken at its validation minimum."""
    if not patience or not row:
        return ""
    at, how = _num(row.get("chosen_kimg")), how_it_stopped(row)
    if how == "patience":
        return f", stopped by patience, taken at its validation minimum ({_fmt(at)} kimg)"
    if how == "cap_improving":
        return (" and reached the cap still improving (its last checkpoint was its best): a longer cap "
                "(full_res.train.total_kimg) could lower its G, so a comparison with it may favour the bootstrap")
    return f", to the cap, taken at its validation minimum ({_fmt(at)} kimg)" if math.isfinite(at) else ""


def budget_lines(budget, trials) -> list:
    """The training budgets of the bootstrapped model and of the full-res baseline side by side
    (kimg; ``budget`` as `bootdiff.evaluation.evaluate.budgets` returns it) — with patience the
    baseline's budget is a cap and the sentence says so — and, with peers, theirs and where each
    stopped (`_peer_stop`)."""
    b, n = budget, budget["n_full"]
    boot = b["bootstrapped"]
    full = b["full_res_trained"] if b.get("full_res_trained") is not None else b["full_res"]
    stopped = set(b.get("views_early_stopped") or ())  # views early-stopped on held-out view samples
    every = bool(stopped) and stopped >= set(b["views"])
    mark = " (early-stopped on its held-out view samples)"
    views = " + ".join(f"{k} {_fmt(v)}{mark if k in stopped and not every else ''}" for k, v in b["views"].items())
    views += ", each early-stopped on its held-out view samples" if every else ""
    pat = int(b.get("patience") or 0)
    # equal within 1 %: a run stops on the whole batch that reaches its kimg (14.016 of 14 at batch 32)
    equal = abs(boot - full) <= 0.01 * max(boot, full, 1e-9)
    planned = (f" (of {_fmt(b['full_res'])} {'kimg cap' if pat else 'planned'})"
               if abs(full - b["full_res"]) > 0.01 * b["full_res"] else "")
    ran = any(t["kind"] == "full_res" for t in trials)
    if pat:
        tail = (f" — early-stopped on validation G (patience {pat} checkpoints), so its budget is a cap "
                f"({b['full_res'] / boot:.2g}× the bootstrapped model's), not a match.")
    else:
        tail = " — the same budget." if equal else f" — {full / boot:.2g}× the bootstrapped model's, unequal budgets."
    lines = [f"Training budgets: the bootstrapped model stands on {_fmt(boot)} kimg (view models {views}, "
             f"residual {_fmt(b['residual'])}); the full-res-only baseline "
             + (f"trained {_fmt(full)} kimg{planned}" if ran else
                f"(not in this sweep: sweep.baseline_full_res) would train {_fmt(full)} kimg")
             + f" on the {n} full-res samples" + tail]
    if b.get("peers"):
        rows = {t["trial_id"]: t for t in trials}
        lines.append("The peers train with the full-res baseline's network, budget cap "
                     f"({_fmt(b['full_res'])} kimg){' and patience' if pat else ''} on the same full-res samples "
                     "and partial views: " + "; ".join(f"{k} trained {_fmt(v)} kimg{_peer_stop(rows.get(k), pat)}"
                                                       for k, v in b["peers"].items() if v is not None) + ".")
    ens = next((t for t in trials if t["kind"] == "ensemble"), None)
    if ens is not None:  # bootdiff.ensemble: no training of its own, both members' compute
        peer = (b.get("peers") or {}).get(ens["members"][1])
        lines.append(f"The ensemble trains nothing of its own: it stands on both of its members, the bootstrapped "
                     f"model's {_fmt(boot)} kimg and {ens['members'][1]}'s"
                     + (f" {_fmt(peer)} kimg" if peer is not None else "") + ", and samples at the cost of both.")
    return lines
