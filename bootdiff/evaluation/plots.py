"""The sweep report's pictures: sample grids (numpy → uint8 tiles → PNG) and matplotlib plots.

Draws the figures of docs/METHOD.md §6 and §8 for `bootdiff.evaluation.report`: the heatmap of test G
over (μ_var, μ_L1) per range-adapter setting, per-σ curves (mean error test vs train, and the
(1−δ) quantile of the per-sample error) on log-log axes, and the unscaled sample grids (images:
a tile grid; videos: one frame strip per video, and an animated GIF). Pure data in, PNG bytes out; plots are drawn on
matplotlib's Agg canvas (no pyplot, no global state). Also holds the small value helpers
(`_fmt`, `_ok`) that the plots and the report's tables share (numbers: `bootdiff.sweep.num`).
"""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from PIL import Image

from bootdiff.sweep import num as _num

OK_STATUS = {"completed", "complete", "terminated", "done", "finished", "ok", "success"}


# ----------------------------------------------------------------------------- numbers


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
        if 0 < len(v) <= 3 and all(isinstance(e, str) for e in v):
            return ", ".join(v)
        return f"[{len(v)} item{'s' if len(v) != 1 else ''}]"
    if isinstance(v, dict):
        if 0 < len(v) <= 6 and all(isinstance(e, (int, float, np.number)) for e in v.values()):
            return "; ".join(f"{k}: {_fmt(e)}" for k, e in v.items())
        return f"{{{len(v)} keys}}"
    return str(v)


def _ok(trial) -> bool:
    return str(trial.get("status", "")).lower() in OK_STATUS


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
        text = (f"{n} videos × {t} frames ({len(keep)} shown), {x.shape[2]}×{x.shape[3]}, one row per "
                f"video, frames left to right")
    else:
        grid = image_grid(x, nrow=min(8, x.shape[0]))
        text = f"{x.shape[0]} samples, {x.shape[1]}×{x.shape[2]}, {x.shape[3]} channel(s)"
    return grid, text


def video_animation(samples, name: str = "samples", max_videos: int = 8, fps: float = 4.0):
    """An animated GIF of sampled videos, or None for images: the first ``max_videos`` videos
    side by side (as one row of `image_grid`), all at frame t in GIF frame t, looping at ``fps``
    frames per second, nearest-upscaled as the frame strip (`grid_scale`). Returns
    ``(gif bytes, one-line description)``; PIL writes the GIF (an adaptive palette per frame)."""
    x = to_uint8_images(samples, name)
    if x.ndim != 5:
        return None
    if x.shape[0] == 0:
        raise ValueError(f"samples {name!r}: no samples")
    if fps <= 0:
        raise ValueError(f"video_animation: fps must be positive, got {fps}")
    x = x[:max_videos]
    n, t = x.shape[:2]
    grids = [image_grid(x[:, i], nrow=n) for i in range(t)]
    k = grid_scale(grids[0])
    frames = [Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g[..., :3])
              for g in (g.repeat(k, axis=0).repeat(k, axis=1) for g in grids)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], loop=0,
                   duration=int(round(1000 / fps)), disposal=1)
    text = f"{n} videos × {t} frames, {x.shape[2]}×{x.shape[3]}, side by side, looping at {fps:g} frames/s"
    return buf.getvalue(), text


def grid_scale(grid: np.ndarray, target: int = 820) -> int:
    """Integer nearest-neighbour upscale factor used for a sample grid in the report (1..8): the
    largest that keeps the grid within ``target`` pixels (one grid per row of the page), so a
    row of eight 32² samples is shown at 3×, of 16² ones at 6×."""
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


# ----------------------------------------------------------------------------- training curves


def _log_if_wide(ax, values) -> None:
    """Log y axis once the positive values span more than a decade."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    v = np.asarray([x for x in values if math.isfinite(x) and x > 0])
    if v.size and v.max() / v.min() > 10:
        ax.set_yscale("log")  # 1-2-5 ticks as plain numbers: easier to read than 10^k
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())


def plot_training_loss(runs):
    """PNG of the training loss vs kimg, one line per run, or None. ``runs``: {label: (kimg,
    loss)} as the TensorBoard event files hold them (`bootdiff.run.tb.read_runs`)."""
    runs = {k: v for k, v in runs.items() if len(v[0])}
    if not runs:
        return None
    fig = Figure(figsize=(6.4, 4.4), dpi=100, layout="constrained")
    ax = fig.subplots()
    for k, (label, (kimg, loss)) in enumerate(runs.items()):
        ax.plot(kimg, loss, color=f"C{k % 10}", lw=1.6, label=label)
    _log_if_wide(ax, [x for _, y in runs.values() for x in y])
    ax.set_xlabel("kimg (thousands of training images)")
    ax.set_ylabel("training loss (EDM-weighted, per report)")
    ax.set_title("Training loss")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, frameon=False)
    return _fig_png(fig)


def plot_training_G(series, references=None, held_out: str = "validation"):
    """PNG of held-out (left: the ``held_out`` split's) and training (right) G vs kimg for every
    trial, or None.

    ``series``: [{"name", "held_out": (kimg, G), "train": (kimg, G), "stopped": bool, "best": bool}];
    a stopped trial (ASHA) ends in a large ×, a finished one in a dot, the best is drawn thick.
    ``references``: {name: (held-out G, train G)} of untrained baselines, drawn as dashed lines."""
    series = [s for s in series if len(s["held_out"][0]) or len(s["train"][0])]
    if not series:
        return None
    references = references or {}
    fig = Figure(figsize=(11.5, 4.9), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    if len(series) <= 10:
        colours = [f"C{i}" for i in range(10)]
    else:
        from matplotlib import colormaps

        colours = [colormaps["tab20"](i) for i in range(20)]
    values = []
    for k, s in enumerate(series):
        c, lw = colours[k % len(colours)], 2.8 if s.get("best") else 1.5
        for ax, key in zip(axes, ("held_out", "train")):
            kimg, g = (np.asarray(a, dtype=float) for a in s[key])
            if not kimg.size:
                continue
            values += list(g)
            ax.plot(kimg, g, color=c, lw=lw, marker="o" if kimg.size < 30 else None, ms=3)
            ax.plot(kimg[-1:], g[-1:], color=c, marker="X" if s.get("stopped") else "o",
                    ms=11 if s.get("stopped") else 5, mec="black" if s.get("stopped") else c, mew=0.8)
    for j, (name, pair) in enumerate(references.items()):
        for ax, g in zip(axes, pair):
            if math.isfinite(_num(g)):
                ax.axhline(_num(g), color="0.35", ls=(0, (5, 3 + 2 * j)), lw=1.2)
                values.append(_num(g))
    _log_if_wide(axes[0], values)
    for ax, what in zip(axes, (f"held-out ({held_out}) G", "training G")):
        ax.set_xlabel("kimg (thousands of training images)")
        ax.set_title(what)
        ax.grid(True, which="both", alpha=0.25)
    axes[0].set_ylabel("generalization error G (lower is better)")
    handles = [Line2D([], [], color=colours[k % len(colours)], lw=2.8 if s.get("best") else 1.5,
                      marker="X" if s.get("stopped") else None, ms=8, mec="black",
                      label=s["name"] + (" (best)" if s.get("best") else "") + s.get("note", "")
                      + (" — stopped early" if s.get("stopped") else ""))
               for k, s in enumerate(series)]
    handles += [Line2D([], [], color="0.35", ls=(0, (5, 3 + 2 * j)), label=f"{name} (not trained)")
                for j, name in enumerate(references)]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(3, len(handles)), fontsize=8,
               frameon=False)
    return _fig_png(fig)


def training_figures(trials, training, best=None) -> list:
    """The report's training-curve figures ``[(file name, title, caption, png, False, "training")]``
    from the runs of a ``tb`` tree (`bootdiff.run.tb.read_runs`: ``view-<v>`` runs and one
    ``trial-<trial_id>`` run per trained trial): the loss of each view model and of the full-res
    baseline, and held-out/train G of every trial: validation G, what the sweep chose on, when the
    runs report it (a sweep meets the test split only at the checkpoint it chose), else test G.
    Nothing is re-computed."""
    training = training or {}
    figures = []

    def xy(run, tag):
        c = training.get(run, {}).get(tag)
        return (np.asarray(c["kimg"]), np.asarray(c["value"])) if c else (np.zeros(0), np.zeros(0))

    loss = {f"view {r[len('view-'):]}": xy(r, "loss") for r in sorted(training) if r.startswith("view-")}
    loss.update({f"full-res baseline ({t['trial_id']})": xy(f"trial-{t['trial_id']}", "loss")
                 for t in trials if t["kind"] == "full_res"})
    png = plot_training_loss(loss)
    if png:
        figures.append(("training_loss.png", "Training loss of the view models and the full-res baseline",
                        "Read from each run's TensorBoard event files (tb/<run>/); the mean loss of each "
                        "report window.", png, False, "training"))
    trained = [t for t in trials if t["kind"] not in ("combined", "ensemble")]  # no training curve of their own
    key = "val_G" if any(len(xy(f"trial-{t['trial_id']}", "val_G")[0]) for t in trained) else "test_G"
    series = [{"name": str(t["trial_id"]), "held_out": xy(f"trial-{t['trial_id']}", key),
               "train": xy(f"trial-{t['trial_id']}", "train_G"),
               "stopped": str(t.get("status", "")).lower() in ("stopped_early", "stopped"), "best": t is best,
               "note": " (full-res baseline)" if t["kind"] == "full_res" else ""}
              for t in trained]
    refs = {str(t["trial_id"]): (t.get(key), t["train_G"]) for t in trials if t["kind"] == "combined"}
    png = plot_training_G(series, refs, "validation" if key == "val_G" else "test")
    if png:
        figures.append(("training_G.png", "Generalization error G of every trial during training",
                        f"Held-out ({'validation' if key == 'val_G' else 'test'} split, left) and training (right) G "
                        "at each checkpoint, from the event files. "
                        "Trials stopped early by ASHA end in ×; the best trial is drawn thick.",
                        png, False, "training"))
    return figures
