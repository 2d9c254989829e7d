"""The sweep report: a self-contained HTML page, its Markdown twin and a CSV of all trials.

Shows the quantities of DESIGN.md §1 "What we measure" for a stage-2 sweep: the generalization
error G on held-out full-resolution data (total, and per σ next to the training-set figure, whose
gap is over-fitting), the per-σ (1−δ) quantile of the per-sample error, a heatmap of test G over
(μ_var, μ_L1) per range-adapter setting, and sample grids per model. Pure data in, files out
through fsspec URLs (`bootdiff.util`); plots are drawn with matplotlib's Agg canvas.
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import io
import json
import math
import re

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from PIL import Image

from bootdiff.util import atomic_write_bytes, join

KINDS = ("residual", "combined", "full_res")
REQUIRED = ("trial_id", "kind", "mu_var", "mu_l1", "range_adapter", "test_G", "train_G", "step",
            "status", "checkpoint")
OK_STATUS = {"completed", "complete", "terminated", "done", "finished", "ok", "success"}
KIND_LABEL = {"residual": "bootstrapped (residual)", "combined": "combined denoiser (baseline)",
              "full_res": "full-res only (baseline)"}

# ----------------------------------------------------------------------------- images


def to_uint8_images(x, name: str = "samples") -> np.ndarray:
    """Samples as uint8 channels-last: ``[N, H, W, C]`` (images) or ``[N, T, H, W, C]`` (videos).

    uint8 input is channels-last already (``[N,H,W]``, ``[N,H,W,C]``, ``[N,T,H,W,C]``); float
    input (torch tensor or numpy) is the library convention, channels-first in ``[-1, 1]``:
    ``[N,C,H,W]`` or ``[N,C,T,H,W]``, mapped by ``round((x + 1) · 127.5)``.
    """
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    x = np.asarray(x)
    if x.dtype == np.uint8:
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim not in (4, 5) or x.shape[-1] not in (1, 3, 4):
            raise ValueError(f"samples {name!r}: uint8 samples must be [N,H,W,C] or [N,T,H,W,C] "
                             f"with C in 1/3/4, got shape {tuple(x.shape)}")
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"samples {name!r}: expected uint8 or float, got dtype {x.dtype}")
    if x.ndim not in (4, 5) or x.shape[1] not in (1, 3, 4):
        raise ValueError(f"samples {name!r}: float samples must be [N,C,H,W] or [N,C,T,H,W] in "
                         f"[-1,1] with C in 1/3/4, got shape {tuple(x.shape)}")
    x = np.moveaxis(np.nan_to_num(x), 1, -1)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images, nrow: int = 8, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile images into one uint8 ``[H, W, C]`` array, ``nrow`` images per row (as torchvision's
    ``make_grid``), with ``pad`` pixels of ``pad_value`` around and between them."""
    x = to_uint8_images(images, "image_grid")
    if x.ndim != 4:
        raise ValueError(f"image_grid takes images [N,H,W,C], got shape {tuple(x.shape)}")
    if nrow < 1:
        raise ValueError(f"image_grid: nrow must be >= 1, got {nrow}")
    n, h, w, c = x.shape
    cols, rows = min(nrow, max(n, 1)), max(1, math.ceil(n / nrow))
    grid = np.full((pad + rows * (h + pad), pad + cols * (w + pad), c), pad_value, np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top:top + h, left:left + w] = x[i]
    return grid


def sample_grid(samples, name: str = "samples", max_images: int = 64, max_frames: int = 16):
    """The report's grid of one model's samples (unscaled) and a one-line description.

    Images: up to 8 per row. Videos: one row per sample, its frames left to right (a frame strip,
    at most ``max_frames`` evenly spaced frames)."""
    x = to_uint8_images(samples, name)
    if x.shape[0] == 0:
        raise ValueError(f"samples {name!r}: no samples")
    x = x[:max_images]
    if x.ndim == 5:
        n, t = x.shape[:2]
        keep = np.unique(np.linspace(0, t - 1, min(t, max_frames)).round().astype(int))
        grid = image_grid(x[:, keep].reshape(-1, *x.shape[2:]), nrow=len(keep))
        text = f"{n} clips × {t} frames ({len(keep)} shown), {x.shape[2]}×{x.shape[3]}, one row per clip"
    else:
        grid = image_grid(x, nrow=min(8, x.shape[0]))
        text = f"{x.shape[0]} samples, {x.shape[1]}×{x.shape[2]}, {x.shape[3]} channel(s)"
    return grid, text


def grid_scale(grid: np.ndarray, target: int = 480) -> int:
    """Integer nearest-neighbour upscale factor used for a sample grid in the report (1..8)."""
    return int(max(1, min(8, target // max(grid.shape[:2]))))


def _png(arr: np.ndarray, scale: int = 1) -> bytes:
    if scale > 1:
        arr = arr.repeat(scale, axis=0).repeat(scale, axis=1)
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _fig_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


# ----------------------------------------------------------------------------- numbers


def _num(v) -> float:
    if v is None or isinstance(v, bool):
        return float("nan")
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _fmt(v) -> str:
    """Cell text: 4 significant digits for floats, '—' for None/NaN."""
    if getattr(v, "ndim", None) == 0:  # numpy / torch scalars
        v = v.item()
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return "—" if not math.isfinite(v) else f"{float(v):.4g}"
    if isinstance(v, (list, tuple)):
        if len(v) <= 6 and all(isinstance(e, (int, float, np.number)) for e in v):
            return "×".join(_fmt(e) for e in v)
        return f"[{len(v)} item{'s' if len(v) != 1 else ''}]"
    if isinstance(v, dict):
        return f"{{{len(v)} keys}}"
    return str(v)


def _ok(trial) -> bool:
    return str(trial.get("status", "")).lower() in OK_STATUS


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


def select_best(trials, best_trial_id=None):
    """The named trial, else the residual trial (else any trial) with the lowest finite test G."""
    if best_trial_id is not None:
        for t in trials:
            if t["trial_id"] == best_trial_id:
                return t
        raise ValueError(f"best_trial_id {best_trial_id!r} is not among the trials")
    for pool in ([t for t in trials if t["kind"] == "residual"], trials):
        scored = [t for t in pool if math.isfinite(_num(t["test_G"]))]
        if scored:
            return min(scored, key=lambda t: _num(t["test_G"]))
    return None


def _columns(trials) -> list:
    cols = list(REQUIRED)
    extra = sorted({k for t in trials for k in t} - set(cols), key=str)
    return cols[:-1] + extra + ["checkpoint"]


def _settings(t) -> str:
    if t["kind"] != "residual":
        return KIND_LABEL[t["kind"]]
    return (f"μ_var = {_fmt(t['mu_var'])}, μ_L1 = {_fmt(t['mu_l1'])}, range adapter "
            f"{'on' if t['range_adapter'] else 'off'}")


def _change(g, ref) -> str:
    if not (math.isfinite(g) and math.isfinite(ref) and ref > 0):
        return "no finite G"
    return f"{abs(g - ref) / ref * 100:.1f}% {'lower' if g < ref else 'higher'}"


def _summary(trials, best):
    """The summary: table rows (best, then baselines), headline sentences and the page's cards
    ``(label, value, note)`` — the same numbers in each."""
    rows, cards = [], []
    bg, btr = (_num(best["test_G"]), _num(best["train_G"])) if best else (math.nan, math.nan)
    n_ok, n_res = sum(_ok(t) for t in trials), sum(t["kind"] == "residual" for t in trials)
    lines = [f"{len(trials)} trials ({n_res} residual, {len(trials) - n_res} baseline(s)); {n_ok} "
             f"completed, {len(trials) - n_ok} stopped early or failed."]
    if best is None:
        lines.append("No trial has a finite test G: no best trial.")
    else:
        lines.append(f"Best trial: {best['trial_id']} ({_settings(best)}), test G = {_fmt(bg)}, "
                     f"train G = {_fmt(btr)}, train–test gap = {_fmt(bg - btr)}.")
        cards += [("best trial", best["trial_id"], _settings(best)),
                  ("best test G", _fmt(bg), f"train G {_fmt(btr)}"),
                  ("train–test gap", _fmt(bg - btr),
                   f"{(bg - btr) / btr * 100:.1f}% of train G" if btr > 0 and math.isfinite(bg) else "")]
    baselines = [t for t in trials if t["kind"] != "residual" and t is not best]
    for t in ([best] if best else []) + baselines:
        g, tr = _num(t["test_G"]), _num(t["train_G"])
        rows.append({"model": "best trial" if t is best else KIND_LABEL[t["kind"]],
                     "trial": t["trial_id"], "settings": _settings(t) if t is best else None,
                     "test G": g, "train G": tr, "gap (test − train)": g - tr,
                     "test G / best": g / bg if bg > 0 else math.nan, "status": t["status"]})
        if t is not best and best is not None:
            lines.append(f"{KIND_LABEL[t['kind']].capitalize()}: {t['trial_id']}, test G = "
                         f"{_fmt(g)}; the best trial's is {_change(bg, g)}.")
            cards.append((KIND_LABEL[t["kind"]], _fmt(g), f"{t['trial_id']}: best is {_change(bg, g)}"))
    return rows, lines, cards


# ----------------------------------------------------------------------------- plots


def plot_heatmap(trials, best=None):
    """PNG of test G over (μ_var, μ_L1), one panel per range-adapter setting, or None."""
    res = [t for t in trials if t["kind"] == "residual"
           and math.isfinite(_num(t["mu_var"])) and math.isfinite(_num(t["mu_l1"]))]
    if not res:
        return None
    xs = sorted({_num(t["mu_var"]) for t in res})
    ys = sorted({_num(t["mu_l1"]) for t in res})
    panels = sorted({bool(t["range_adapter"]) for t in res})
    vals = [_num(t["test_G"]) for t in res if math.isfinite(_num(t["test_G"]))]
    lo, hi = (min(vals), max(vals)) if vals else (1.0, 2.0)
    log = vals and lo > 0 and hi / lo > 10  # a log colour scale once G spans a decade
    norm = LogNorm(lo, hi) if log else Normalize(lo, hi if hi > lo else lo + 1e-12)
    cw, ch = max(1.0, 4.4 / len(xs)), max(0.7, 3.0 / len(ys))
    fig = Figure(figsize=(len(panels) * (1.6 + cw * len(xs)) + 1.2, 1.6 + ch * len(ys)), dpi=100,
                 layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    cmap = "viridis_r"
    for ax, ra in zip(axes, panels):
        grid = np.full((len(ys), len(xs)), np.nan)
        note = np.full(grid.shape, "", dtype=object)
        for j, y in enumerate(ys):
            for i, x in enumerate(xs):
                cell = [t for t in res if bool(t["range_adapter"]) == ra and _num(t["mu_var"]) == x
                        and _num(t["mu_l1"]) == y]
                if not cell:
                    note[j, i] = "no trial"
                    continue
                g = [_num(t["test_G"]) for t in cell if math.isfinite(_num(t["test_G"]))]
                grid[j, i] = min(g) if g else np.nan
                txt = _fmt(grid[j, i]) if g else "no G"
                if any(not _ok(t) for t in cell):
                    txt += "\n(" + ", ".join(sorted({str(t["status"]) for t in cell if not _ok(t)})) + ")"
                if len(cell) > 1:
                    txt += f"\nmin of {len(cell)}"
                note[j, i] = txt
        ax.set_facecolor("#e8e8e8")
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto",
                       origin="lower")
        for j in range(len(ys)):
            for i in range(len(xs)):
                if np.isfinite(grid[j, i]):
                    r, g_, b, _ = im.cmap(norm(grid[j, i]))
                    color = "black" if 0.299 * r + 0.587 * g_ + 0.114 * b > 0.5 else "white"
                else:
                    color = "#555555"
                    ax.add_patch(Rectangle((i - 0.5, j - 0.5), 1, 1, fill=False, hatch="//",
                                           edgecolor="#bbbbbb", linewidth=0))
                ax.text(i, j, note[j, i], ha="center", va="center", fontsize=10, color=color)
        if any(t is best for t in res) and bool(best["range_adapter"]) == ra:
            i, j = xs.index(_num(best["mu_var"])), ys.index(_num(best["mu_l1"]))
            ax.add_patch(Rectangle((i - 0.5, j - 0.5), 1, 1, fill=False, edgecolor="#e4002b",
                                   linewidth=3))
        ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
        ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])
        ax.set_xlabel("μ_var (variance penalty)")
        ax.set_ylabel("μ_L1 (ℓ1 penalty)")
        ax.set_title(f"range adapter {'on' if ra else 'off'}")
    if vals:
        cb = fig.colorbar(im, ax=list(axes), label="test G (lower is better)", shrink=0.9)
        if isinstance(norm, LogNorm):  # 1-2-5 ticks: plain numbers are easier to read than 10^k
            ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                     for m in (1, 2, 5) if lo <= m * 10.0 ** e <= hi]
            cb.set_ticks(ticks, labels=[f"{v:g}" for v in ticks])
            cb.ax.minorticks_off()
    return _fig_png(fig)


def plot_curves(curves, pairs, ylabel, title, best_name=None):
    """PNG of per-σ curves on log-log axes, or None. ``pairs``: ``(key, linestyle, label)``; one
    colour per model, the line style says which quantity (a second legend explains it)."""
    fig = Figure(figsize=(6.4, 4.4), dpi=100, layout="constrained")
    ax = fig.subplots()
    colours = [f"C{i}" for i in range(10)]
    drawn, styles = [], {}
    for k, (name, c) in enumerate(curves.items()):
        if not isinstance(c, dict) or c.get("sigma") is None or c.get("test_mean") is None:
            raise ValueError(f"curves[{name!r}] must be a dict with 'sigma' and 'test_mean' lists")
        sigma = np.asarray(c["sigma"], dtype=float)
        for key, ls, label in pairs:
            if c.get(key) is None:
                continue
            y = np.asarray([_num(v) for v in c[key]], dtype=float)
            if y.shape != sigma.shape:
                raise ValueError(f"curves[{name!r}]: {key!r} has {y.size} values but 'sigma' has "
                                 f"{sigma.size}")
            ok = np.isfinite(y) & (y > 0) & np.isfinite(sigma) & (sigma > 0)
            if not ok.any():
                continue
            lw = 2.6 if name == best_name else 1.5
            ax.plot(sigma[ok], y[ok], ls, color=colours[k % 10], lw=lw, marker="o", ms=3)
            styles[ls] = label
            if name not in drawn:
                drawn.append(name)
    if not drawn:
        return None
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("σ")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.25)
    names = list(curves)
    handles = [Line2D([], [], color=colours[names.index(n) % 10], lw=2.6 if n == best_name else 1.5,
                      label=f"{n} (best)" if n == best_name else str(n)) for n in drawn]
    handles += [Line2D([], [], color="black", ls=ls, label=lab) for ls, lab in styles.items()]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles) if len(handles) <= 5 else 4,
               fontsize=8,
               frameon=False)
    return _fig_png(fig)


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
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:14px}
figure{margin:0;background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:10px;text-align:center}
figure img{max-width:100%;height:auto}figcaption{font-size:13px;color:#3b4357;margin-top:6px}
figcaption b{display:block;font-size:15px;color:#1d2330}img.px{image-rendering:pixelated}
.tbl{overflow-x:auto;background:#fff;border:1px solid #dde1e8;border-radius:8px;margin:8px 0}
.tbl.kv{width:fit-content;min-width:min(420px,100%);max-width:100%}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{padding:5px 8px;border-bottom:1px solid #eceef2;text-align:right;white-space:nowrap}
th{background:#eef1f6;position:sticky;top:0}td.t,th.t{text-align:left}
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

GROUPS = (("heatmap", "Sweep heatmap", ""), ("curves", "Error per σ", "grid2"),
          ("samples", "Samples", "grid2"))


def _markdown(d) -> str:
    md = [f"# {_md(d['title'])}", "", f"_Generated {d['stamp']}._", "", "## Summary", ""]
    md += [f"- {_md(line)}" for line in d["lines"]] + ["", _md_table(*d["summary"], d["best_row"])]
    for group, heading, _ in GROUPS:
        figs = [f for f in d["figures"] if f[5] == group]
        md += ["", f"## {heading}", ""] if figs else []
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
        src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
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
        if figs:
            h.append(f"<section><h2>{heading}</h2><div class='{cls}'>{''.join(map(fig, figs))}"
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
    """``[(file name, title, caption, png, pixel-art?, group)]`` of the report's images."""
    figures = []
    hm = plot_heatmap(trials, best)
    if hm is not None:
        figures.append(("heatmap.png", "Test generalization error over (μ_var, μ_L1)",
                        "Lower is better; the best trial is outlined in red; hatched cells have no "
                        "trial or no finite G.", hm, False, "heatmap"))
    # the best trial's curve: keyed by its id, or "bootstrapped" (as ray_jobs/evaluate.py does)
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
    return figures


def write_report(out_url, trials, curves, samples, config_yaml, manifest, best_trial_id=None,
                 title="bootdiff sweep report", extra=None) -> dict:
    """Write ``report.html`` (self-contained), ``report.md`` (+ ``report_files/*.png``) and
    ``trials.csv`` into the folder ``out_url``; returns their URLs (``html``, ``markdown``,
    ``csv``, ``images``: {file name: URL}).

    ``trials``: dicts with at least `REQUIRED` keys (kind in `KINDS`; baselines have None μ's);
    any other keys are extra CSV/table columns. ``curves``: {model: {"sigma", "test_mean",
    "train_mean"?, "test_quantile"?, "delta"?}}. ``samples``: {model: uint8 ``[N,H,W,C]`` /
    ``[N,T,H,W,C]`` or float ``[N,C,H,W]`` / ``[N,C,T,H,W]`` in [-1,1]}. ``best_trial_id``:
    default the residual trial with the lowest test G. ``extra``: {section title: str | dict |
    dict of dicts | list of dicts}, shown as text or tables after the trials.
    """
    trials = validate_trials(trials)
    curves, samples, extra = dict(curves or {}), dict(samples or {}), dict(extra or {})
    best = select_best(trials, best_trial_id)
    figures = _figures(trials, curves, samples, best)
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
    summary_rows, lines, cards = _summary(trials, best)
    sum_cols = list(summary_rows[0]) if summary_rows else ["model"]
    d = {"title": str(title), "lines": lines, "cards": cards, "figures": figures, "extra": extra,
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
