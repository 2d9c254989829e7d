"""The sweep report: a self-contained HTML page, its Markdown twin and a CSV of all trials.

Shows what docs/METHOD.md §6 and §8 measure for a stage-2 sweep: the generalization error G on
held-out full-resolution data (total, and per σ next to the training-set figure, whose gap is
over-fitting), the per-σ (1−δ) quantile of the per-sample error, a heatmap of test G over
(μ_var, μ_L1) per range-adapter setting, and sample grids per model (videos: frame strips and an
animated GIF each), and training curves read from the runs' TensorBoard event files (loss of the
view models and the full-res baseline, test/train G of every trial). Pure data in, files out
through fsspec URLs (`bootdiff.util`). The pictures themselves (sample grids, heatmap, per-σ
curves) are drawn in `bootdiff.evaluation.plots`; their public names are re-exported here.
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import io
import json
import re

import numpy as np
from PIL import Image

from bootdiff.evaluation.plots import (OK_STATUS, _fmt, _png, grid_scale, image_grid, plot_curves,
                                   plot_heatmap, sample_grid, to_uint8_images, training_figures, video_animation)
from bootdiff.evaluation.quality import budget_lines, figure1_sentence, figure1_table
from bootdiff.evaluation.summary import KIND_LABEL, summarize, verdict
from bootdiff.evaluation.worth import worth_line
from bootdiff.sweep import KINDS, recommend, select_best
from bootdiff.sweep import num as _num
from bootdiff.util import atomic_write_bytes, join

__all__ = ["KINDS", "REQUIRED", "OK_STATUS", "KIND_LABEL", "to_uint8_images", "image_grid",
           "sample_grid", "video_animation", "grid_scale", "plot_heatmap", "plot_curves", "validate_trials",
           "select_best", "manifest_tables", "figure1_table", "figure1_sentence", "budget_lines",
           "write_report"]

REQUIRED = ("trial_id", "kind", "mu_var", "mu_l1", "range_adapter", "test_G", "train_G", "step",
            "status", "checkpoint")



# ----------------------------------------------------------------------------- trials


def validate_trials(trials) -> list:
    """Check the trial dicts; a missing key, unknown kind or duplicate id raises ValueError."""
    seen = set()
    for i, t in enumerate(trials):
        if not isinstance(t, dict):
            raise ValueError(f"trials[{i}] must be a dict, got {type(t).__name__}")
        missing = [k for k in REQUIRED if k not in t]
        if missing:
            raise ValueError(f"trials[{i}] (trial_id={t.get('trial_id')!r}) lacks key(s) {missing}")
        if t["kind"] not in KINDS:
            raise ValueError(f"trials[{i}] (trial_id={t['trial_id']!r}): kind {t['kind']!r} "
                             f"is not one of {KINDS}")
        if t["trial_id"] in seen:
            raise ValueError(f"trials[{i}]: duplicate trial_id {t['trial_id']!r}")
        seen.add(t["trial_id"])
    return list(trials)


def _columns(trials) -> list:
    cols = list(REQUIRED)
    if any("val_G" in t for t in trials):  # the score the sweep chose on, beside the test G
        cols.insert(cols.index("test_G"), "val_G")
    # a row's test-split G curve (``test_curve``, kept for evaluation to reuse) is drawn, not tabled
    extra = sorted({k for t in trials for k in t} - set(cols) - {"test_curve"}, key=str)
    return cols[:-1] + extra + ["checkpoint"]


# ----------------------------------------------------------------------------- tables


def _records(named):
    """(columns, rows) of ``[(name, dict), ...]``: a name column, then the union of the keys."""
    keys = []
    for _, d in named:
        keys += [k for k in d if k not in keys]
    return ["name"] + keys, [[n] + [d.get(k) for k in keys] for n, d in named]


def manifest_tables(manifest):
    """The data manifest as two tables ``(columns, rows)``: one row per split/view (the ingest
    manifest's ``splits`` or ``views``: count, shape, σ_data, …, nested dicts flattened one level),
    and the dataset's other top-level facts as key/value rows (``config`` is left to the JSON)."""
    manifest = manifest if isinstance(manifest, dict) else {}
    key = next((k for k in ("splits", "views") if isinstance(manifest.get(k), dict)), None)
    entries = []
    for name, e in (manifest[key].items() if key else []):
        flat = {}
        for k, v in (e.items() if isinstance(e, dict) else [("value", e)]):
            flat.update({f"{k}.{k2}": v2 for k2, v2 in v.items()} if isinstance(v, dict) else {k: v})
        entries.append((name, flat))
    first = ("count", "shape", "sigma_data", "mean", "dtype")
    cols, rows = _records(entries)
    order = ["name"] + [c for c in first if c in cols] + [c for c in cols[1:] if c not in first]
    rows = [[r[cols.index(c)] for c in order] for r in rows]
    facts = []
    for k, v in manifest.items():
        if k in (key, "config"):
            continue
        facts += [[f"{k}.{k2}", v2] for k2, v2 in v.items()] if isinstance(v, dict) else [[k, v]]
    return (order, rows), (["key", "value"], facts)


def _extra_table(value):
    """(columns, rows) for an `extra` section value, or None to show it as JSON/text."""
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        return _records(list(value.items()))
    if isinstance(value, dict):
        return ["key", "value"], [[k, v] for k, v in value.items()]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        cols, rows = _records([(None, v) for v in value])
        return cols[1:], [r[1:] for r in rows]
    return None


def _csv_value(v):
    if getattr(v, "ndim", None) == 0:
        v = v.item()
    if v is None:
        return ""
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str)
    return repr(float(v)) if isinstance(v, (float, np.floating)) else v


# ----------------------------------------------------------------------------- Markdown / HTML


def _md(text) -> str:
    """Markdown-escape user text: backslash-escape the characters that make links, tags,
    emphasis, code or table cells (intraword underscores are left alone, as GFM ignores them)."""
    out = re.sub(r"([\\`*\[\]<>|])", r"\\\1", str(text)).replace("\n", " ")
    return "\\" + out if out.startswith("#") else out


def _md_table(cols, rows, best_index=None):
    out = ["| " + " | ".join(_md(_fmt(c)) for c in cols) + " |", "|" + "---|" * len(cols)]
    for r, row in enumerate(rows):
        cells = [_md(_fmt(v)) for v in row]
        out.append("| " + " | ".join(f"**{c}**" if r == best_index and c else c for c in cells) + " |")
    return "\n".join(out)


def _fence(text, lang=""):
    ticks = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return f"{ticks}{lang}\n{text.rstrip()}\n{ticks}"


def _e(v) -> str:
    return html.escape(str(v), quote=True)


def _html_table(cols, rows, best_index=None, path_cols=()):
    text_col = [i == 0 or c in path_cols or all(isinstance(r[i], str) or r[i] is None for r in rows)
                for i, c in enumerate(cols)]
    head = "".join(f'<th class="{"t" if text_col[i] else ""}">{_e(c)}</th>' for i, c in enumerate(cols))
    body = []
    for r, row in enumerate(rows):
        cells = []
        for i, (c, v) in enumerate(zip(cols, row)):
            text = _e(_fmt(v))
            if c == "status" and v is not None:
                text = f'<span class="badge{"" if str(v).lower() in OK_STATUS else " warn"}">{text}</span>'
            cls = "path" if c in path_cols else ("t" if text_col[i] else "")
            cells.append(f'<td class="{cls}">{text}</td>')
        body.append(f'<tr{" class=best" if r == best_index else ""}>{"".join(cells)}</tr>')
    return (f'<div class="tbl{" kv" if len(cols) <= 3 else ""}"><table><thead><tr>{head}</tr>'
            f'</thead><tbody>{"".join(body)}'
            f'</tbody></table></div>')


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;
 color:#1d2330;background:#f5f6f8;font-size:15px;line-height:1.45}
main{max-width:1240px;margin:0 auto;padding:18px 24px 48px}
header{background:#1d2a44;color:#fff;padding:18px 24px}header h1{margin:0;font-size:24px}
header p{margin:4px 0 0;color:#c7d0e0;font-size:13px}
h2{font-size:19px;margin:30px 0 10px;border-bottom:2px solid #d9dde5;padding-bottom:4px}
h3{font-size:15px;margin:14px 0 6px;color:#3b4357}
section p{margin:6px 0}.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(230px,1fr));gap:12px}
.card{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:12px 14px}
.card .k{font-size:12px;color:#5b6478;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:22px;font-weight:600;margin:2px 0}.card .s{font-size:13px;color:#3b4357}
.grid1{display:grid;gap:14px}.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:14px}
figure{margin:0;background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:10px;text-align:center}
figure img{max-width:100%;height:auto}figcaption{font-size:13px;color:#3b4357;margin-top:6px}
figcaption b{display:block;font-size:15px;color:#1d2330}img.px{image-rendering:pixelated}
.tbl{overflow-x:auto;background:#fff;border:1px solid #dde1e8;border-radius:8px;margin:8px 0}
.tbl.kv{width:fit-content;min-width:min(420px,100%);max-width:100%}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:5px 8px;border-bottom:1px solid #eceef2;text-align:right;white-space:nowrap}
th{background:#eef1f6;position:sticky;top:0;white-space:normal}td.t,th.t{text-align:left}
td.t{white-space:normal;min-width:6em}
td.path{white-space:normal;word-break:break-all;min-width:180px;text-align:left;
 font-family:monospace;font-size:12px}
tr.best td{background:#fff4c2;font-weight:600}tr:nth-child(even) td{background:#fafbfc}
tr.best:nth-child(even) td{background:#fff4c2}
.badge{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;background:#e1f3e5;color:#1d6b33}
.badge.warn{background:#fde8d7;color:#9a4a0c}
pre{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:12px;overflow-x:auto;
 font-size:12.5px;max-height:520px}details summary{cursor:pointer;margin:8px 0}
"""

# marks <body data-images-loaded="k" data-images-total="n"> once the page has loaded (tests)
SCRIPT = """<script>
(function(){function mark(){var im=document.images,n=0;for(var i=0;i<im.length;i++){
if(im[i].complete&&im[i].naturalWidth>0)n++;}document.body.dataset.imagesLoaded=n;
document.body.dataset.imagesTotal=im.length;}window.addEventListener('load',mark);mark();})();
</script>"""

FIGURE1_TITLE = ("Figure 1 as numbers: sliced Wasserstein distance to the test split per pyramid "
                 "level (lower is closer)")
GROUPS = (("heatmap", "Sweep heatmap", ""), ("curves", "Error per σ", "grid2"),
          ("training", "Training curves", "grid2"),
          ("samples", "Samples", "grid1"), ("animations", "Sampled videos, animated", "grid2"))


def _markdown(d) -> str:
    md = [f"# {_md(d['title'])}", "", f"_Generated {d['stamp']}._", "", "## Summary", ""]
    md += [f"- {_md(line)}" for line in d["lines"]] + ["", _md_table(*d["summary"], d["best_row"])]
    for group, heading, _ in GROUPS:
        figs = [f for f in d["figures"] if f[5] == group]
        fig1 = d.get("figure1") if group == "samples" else None
        md += ["", f"## {heading}", ""] if figs or fig1 else []
        if fig1:
            md += [f"### {FIGURE1_TITLE}", "", _md_table(fig1[0], fig1[1]), ""]
            md += [f"{_md(line)}" for line in fig1[2]] + [""]
        for fname, ftitle, cap, *_ in figs:
            md += [f"### {_md(ftitle)}", "", f"![{_md(ftitle)}](report_files/{fname})", "",
                   f"*{_md(cap)}*", ""]
    md += ["", "## Trials", "", _md_table(*d["trials"], d["best_index"])]
    for sec, value in d["extra"].items():
        tab = _extra_table(value)
        md += ["", f"## {_md(sec)}", "", _md_table(*tab) if tab else _md(value) if isinstance(value, str)
               else _fence(json.dumps(value, indent=2, default=str), "json")]
    md += ["", "## Resolved config", "", _fence(d["config"], "yaml"), "", "## Data manifest", "",
           _md_table(*d["manifest"][0]), "", _md_table(*d["manifest"][1]), "",
           _fence(d["manifest_json"], "json"), ""]
    return "\n".join(md)


def _html(d) -> str:
    def fig(f):
        fname, ftitle, cap, png, pixel, _ = f
        wd, ht = Image.open(io.BytesIO(png)).size
        mime = "image/gif" if fname.endswith(".gif") else "image/png"
        src = f"data:{mime};base64," + base64.b64encode(png).decode("ascii")
        return (f'<figure><img src="{src}" width="{wd}" height="{ht}" alt="{_e(ftitle)}"'
                f'{" class=px" if pixel else ""}><figcaption><b>{_e(ftitle)}</b>{_e(cap)}'
                f'</figcaption></figure>')

    h = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_e(d['title'])}</title>"
         f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{CSS}</style>"
         f"</head><body><header><h1>{_e(d['title'])}</h1><p>Generated {_e(d['stamp'])} · "
         f"bootstrapped diffusion sweep: generalization error G = E λ(σ)‖D(x+σn;σ) − x‖² on "
         f"held-out full-resolution data</p></header><main><section><h2>Summary</h2><div class=cards>"]
    h += [f"<div class=card><div class=k>{_e(k)}</div><div class=v>{_e(v)}</div><div class=s>"
          f"{_e(s)}</div></div>" for k, v, s in d["cards"]]
    h.append("</div>" + "".join(f"<p>{_e(line)}</p>" for line in d["lines"]))
    h.append(_html_table(*d["summary"], d["best_row"]) + "</section>")
    for group, heading, cls in GROUPS:
        figs = [f for f in d["figures"] if f[5] == group]
        fig1 = d.get("figure1") if group == "samples" else None
        pre = (f"<h3>{_e(FIGURE1_TITLE)}</h3>{_html_table(fig1[0], fig1[1])}"
               + "".join(f"<p>{_e(line)}</p>" for line in fig1[2])) if fig1 else ""
        if figs or fig1:
            h.append(f"<section><h2>{heading}</h2>{pre}<div class='{cls}'>{''.join(map(fig, figs))}"
                     f"</div></section>")
    h.append(f"<section><h2>Trials</h2>{_html_table(*d['trials'], d['best_index'], ('checkpoint',))}"
             f"</section>")
    for sec, value in d["extra"].items():
        tab = _extra_table(value)
        body = (_html_table(*tab) if tab else f"<p>{_e(value)}</p>" if isinstance(value, str)
                else f"<pre>{_e(json.dumps(value, indent=2, default=str))}</pre>")
        h.append(f"<section><h2>{_e(sec)}</h2>{body}</section>")
    h.append(f"<section><h2>Resolved config</h2><pre>{_e(d['config'])}</pre></section>")
    h.append(f"<section><h2>Data manifest</h2>{_html_table(*d['manifest'][0])}<h3>Dataset</h3>"
             f"{_html_table(*d['manifest'][1])}<details><summary>manifest.json</summary><pre>"
             f"{_e(d['manifest_json'])}</pre></details></section>")
    h.append(f"</main>{SCRIPT}</body></html>")
    return "\n".join(h)


# ----------------------------------------------------------------------------- the report


def _figures(trials, curves, samples, best):
    """``[(file name, title, caption, png, pixel-art?, group)]`` of the report's images (a video's
    animation: GIF bytes, its file name ending in ``.gif``)."""
    figures = []
    hm = plot_heatmap(trials, best)
    if hm is not None:
        figures.append(("heatmap.png", "Test generalization error over (μ_var, μ_L1)",
                        "Lower is better; the best trial is outlined in red; hatched cells have no "
                        "trial or no finite G.", hm, False, "heatmap"))
    # the best trial's curve: keyed by its id, or "bootstrapped" (as bootdiff/evaluation/evaluate.py does)
    best_name = next((n for n in ((best or {}).get("trial_id"), "bootstrapped") if n in curves), None)
    if curves:
        png = plot_curves(curves, [("test_mean", "-", "test (held-out)"), ("train_mean", "--", "train")],
                          "weighted error  λ(σ)‖D − x‖²", "Generalization error per σ", best_name)
        if png:
            figures.append(("error_per_sigma.png", "Generalization error per σ",
                            "Test solid, train dashed; the gap between them is over-fitting.",
                            png, False, "curves"))
        deltas = {c.get("delta") for c in curves.values() if c.get("delta") is not None}
        q = f"{1 - deltas.pop():g} quantile" if len(deltas) == 1 else "1−δ quantile"
        png = plot_curves(curves, [("test_quantile", "-", q), ("test_mean", ":", "mean")],
                          "per-sample error", f"{q} of the per-sample test error", best_name)
        if png:
            figures.append(("quantile_per_sigma.png", f"{q} of the per-sample test error per σ",
                            "Quantile solid, mean dotted, both on held-out data.", png, False,
                            "curves"))
    for k, (name, s) in enumerate(samples.items()):
        grid, text = sample_grid(s, str(name))
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_")[:40] or "model"
        figures.append((f"samples_{k:02d}_{slug}.png", str(name), text,
                        _png(grid, grid_scale(grid)), True, "samples"))
    for k, (name, s) in enumerate(samples.items()):  # videos: also an animated GIF each
        anim = video_animation(s, str(name))
        if anim is not None:
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_")[:40] or "model"
            figures.append((f"video_{k:02d}_{slug}.gif", str(name), anim[1], anim[0], True, "animations"))
    return figures


def write_report(out_url, trials, curves, samples, config_yaml, manifest, best_trial_id=None,
                 title="bootdiff sweep report", extra=None, quality=None, roles=None, fd_note=None,
                 budget=None, training=None, recommended=None, worth=None) -> dict:
    """Write ``report.html`` (self-contained), ``report.md`` (+ ``report_files/*.png``, ``*.gif``) and
    ``trials.csv`` into the folder ``out_url``; returns their URLs (``html``, ``markdown``,
    ``csv``, ``images``: {file name: URL}) and ``verdict``: the summary's answer sentences
    (`bootdiff.evaluation.summary.verdict`; empty without ``budget``).

    ``trials``: dicts with at least `REQUIRED` keys (kind in `KINDS`; baselines have None μ's);
    any other keys are extra CSV/table columns. ``curves``: {model: {"sigma", "test_mean",
    "train_mean"?, "test_quantile"?, "delta"?}}. ``samples``: {model: uint8 ``[N,H,W,C]`` /
    ``[N,T,H,W,C]`` or float ``[N,C,H,W]`` / ``[N,C,T,H,W]`` in [-1,1]}. ``best_trial_id``:
    default as `bootdiff.sweep.select_best` picks it (lowest finite validation G, residual
    trials first). ``recommended``: the trial id of the model the sweep recommends (default as
    `bootdiff.sweep.recommend` picks it: the lowest validation G of all), said first. ``worth``: a benchmark's figures for this N
    (`bootdiff.evaluation.worth.benchmark_worth`), said after it (`worth_line`). ``extra``: {section title: str | dict | dict of dicts | list of dicts}, shown as text
    or tables after the trials. ``quality``: {sample set: metrics} (`bootdiff.evaluation.evaluate.sample_quality`),
    shown beside the sample grids as Figure 1 (`figure1_table`, `figure1_sentence`), with
    ``roles`` ({sample set: what it was trained on}) and ``fd_note`` (one line: FD skipped, or how it
    was measured). ``budget`` (`bootdiff.evaluation.evaluate.budgets`): the budget sentences of the summary
    (`budget_lines`). ``training``: the runs of the TensorBoard tree (`bootdiff.run.tb.read_runs`),
    drawn as training curves (`bootdiff.evaluation.plots.training_figures`).
    """
    trials = validate_trials(trials)
    curves, samples, extra = dict(curves or {}), dict(samples or {}), dict(extra or {})
    best = select_best(trials, best_trial_id, baselines=True)
    rec = next((t for t in trials if t["trial_id"] == recommended), None) if recommended else recommend(trials)
    figures = _figures(trials, curves, samples, best) + training_figures(trials, training, best)
    written = {"images": {}}
    for fname, _title, _cap, png, _pixel, _group in figures:
        written["images"][fname] = join(out_url, "report_files", fname)
        atomic_write_bytes(written["images"][fname], png)

    cols = _columns(trials)
    buf = io.StringIO()
    csv.writer(buf).writerows([cols] + [[_csv_value(t.get(c)) for c in cols] for t in trials])
    written["csv"] = join(out_url, "trials.csv")
    atomic_write_bytes(written["csv"], buf.getvalue().encode("utf-8"))

    gap_at = cols.index("train_G") + 1
    table_cols = cols[:gap_at] + ["gap"] + cols[gap_at:]
    answer = verdict(budget, trials, best, rec) if budget else None
    summary_rows, lines, cards = summarize(trials, best, rec, answer, worth_line(worth))
    written["verdict"] = answer[0] if answer else []  # the report's answer, for the console too
    if budget:
        lines += budget_lines(budget, trials)
        cards.append(("budgets (kimg)", f"{_fmt(budget['bootstrapped'])} vs {_fmt(budget['full_res'])}",
                      "bootstrapped (views + residual) vs full-res only"))
    sum_cols = list(summary_rows[0]) if summary_rows else ["model"]
    fig1 = None
    if quality:
        fig1 = (*figure1_table(quality, roles), [figure1_sentence(quality)] + ([fd_note] if fd_note else []))
    d = {"title": str(title), "lines": lines, "cards": cards, "figures": figures, "extra": extra,
         "figure1": fig1,
         "stamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
         "summary": (sum_cols, [[r[c] for c in sum_cols] for r in summary_rows]),
         "best_row": 0 if best else None,
         "trials": (table_cols, [[t.get(c) if c != "gap" else _num(t["test_G"]) - _num(t["train_G"])
                                  for c in table_cols] for t in trials]),
         "best_index": next((i for i, t in enumerate(trials) if t is best), None),
         "config": str(config_yaml or ""), "manifest": manifest_tables(manifest),
         "manifest_json": json.dumps(manifest, indent=2, default=str)}
    written["markdown"] = join(out_url, "report.md")
    atomic_write_bytes(written["markdown"], _markdown(d).encode("utf-8"))
    written["html"] = join(out_url, "report.html")
    atomic_write_bytes(written["html"], _html(d).encode("utf-8"))
    return written
