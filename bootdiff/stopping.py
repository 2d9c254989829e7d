"""Early stopping on a held-out metric with patience, for `bootdiff.train.train`'s
``hooks.should_stop()``.

The rule (as in ``keras.callbacks.EarlyStopping`` with ``restore_best_weights`` left to the
caller): at every checkpoint report carrying ``key`` (e.g. ``val_G``, the validation G of the
EMA weights), the run has improved when the value is below the best so far by more than
``min_delta`` (relative); after ``patience`` checkpoints in a row without improvement the run
stops. Reports before ``start_kimg`` do not count (a pre-training phase on other data, whose
held-out G says nothing of the model it becomes: ``train.patience_from_kimg``). The model is
then taken at its validation minimum — which checkpoint that is, is the caller's (the sweep keeps it, `ray_jobs.common.checkpoint_config`; the data-efficiency benchmark
reads it off the curve). A run that reaches its ``total_kimg`` cap first was still improving, and
`Patience.summary` says so. ``patience = 0`` never stops a run.

On rank 0 only: the metric is computed there (`bootdiff.train` makes every rank agree on the
decision). A resumed run restores the state from the curve it had reported (`Patience.replay`).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional


class Patience:
    """``update(metrics)`` at each report, ``should_stop()`` polled by `bootdiff.train.train`."""

    def __init__(self, patience: int, key: str, min_delta: float = 0.0, start_kimg: float = 0.0):
        if int(patience) < 0:
            raise ValueError(f"patience={patience}: must be >= 0 checkpoints (0: never stop early)")
        if not min_delta >= 0:
            raise ValueError(f"min_delta={min_delta}: must be >= 0 (a relative improvement)")
        self.patience, self.key, self.min_delta = int(patience), str(key), float(min_delta)
        self.start_kimg = float(start_kimg)
        self.best = math.inf
        self.best_kimg: Optional[float] = None
        self.since_best = 0  # checkpoints since the best one
        self.last_kimg: Optional[float] = None

    def update(self, metrics: dict) -> None:
        """One report; only those carrying a finite ``key`` (checkpoint reports) at or after
        ``start_kimg`` count."""
        v = metrics.get(self.key)
        if v is None or not math.isfinite(float(v)):
            return
        if float(metrics.get("kimg", math.inf)) < self.start_kimg - 1e-9:
            return
        v = float(v)
        self.last_kimg = float(metrics["kimg"]) if "kimg" in metrics else None
        if v < self.best - self.min_delta * abs(self.best if math.isfinite(self.best) else v):
            self.best, self.best_kimg, self.since_best = v, self.last_kimg, 0
        else:
            self.since_best += 1

    def on_report(self, metrics: dict, checkpoint_url: Optional[str] = None) -> None:
        """As `bootdiff.train` hooks (e.g. inside `ray_jobs.common.RayReportHooks`): `update`."""
        self.update(metrics)

    def replay(self, points: Iterable[dict]) -> None:
        """Restore the state from the reports a run made before it was resumed (in kimg order)."""
        for p in sorted(points, key=lambda p: p.get("kimg", 0.0)):
            self.update(p)

    def should_stop(self) -> bool:
        return self.patience > 0 and self.since_best >= self.patience

    def summary(self) -> dict:
        """``{"key", "patience", "best", "best_kimg", "last_kimg", "stopped"}``: ``stopped`` False
        means the run ended at its cap while still improving (or within ``patience`` of its best)."""
        return {"key": self.key, "patience": self.patience, "best": self.best if math.isfinite(self.best) else None,
                "best_kimg": self.best_kimg, "last_kimg": self.last_kimg, "stopped": self.should_stop()}


def early_stopped_view(cfg, view: str) -> bool:
    """Whether view ``view`` is early-stopped: ``views.<view>.train.patience`` > 0 and held-out
    view samples to score it on (``data.num_view_val`` > 0, their split ``<view>-val``); such a view
    is scored at each checkpoint (`bootdiff.evaluation.scores.view_validation_G`), stopped by
    `Patience` on that score, and exported at its minimum."""
    return int(cfg.views[view].train.patience) > 0 and int(cfg.data.num_view_val) > 0
