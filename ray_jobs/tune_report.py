"""A Train run's reports forwarded to its Tune trial, without Ray 2.60's race that can hang a trial.

Ray's own bridge, ``ray.tune.integration.ray_train.TuneReportCallback``, puts each Train report
on a one-slot Ray queue that the trial actor's *main* thread polls; that thread then puts the
report on the session's one-slot ``result_queue`` — the queue it alone empties. When the Train
run's last report and the end of the trial function come close together (a loaded machine makes
this likely), the trial function's thread can end first and put Tune's end-of-trial marker
(``RESULT_DUPLICATE``) on ``result_queue``; the main thread, holding the last report it just
took from the Ray queue, then blocks on ``result_queue.put`` forever, and the sweep never ends
(seen here: a full-res baseline at 0.256 of 0.32 kimg for 10 minutes, its actor's main thread in
``_TrainSession._report_training_result`` → ``Queue.put``; docs/RAY.md §7). Had the marker won the
race the other way, the last report would have been lost instead.

`fit_reporting` takes the reports through the trial function's own thread, the way Tune's
function API expects: Train runs in a helper thread with `ForwardReports` as its callback, and
the trial's thread hands each report to ``tune.report`` in order; it returns only after the Train
run ended and every report it made was handed over, so the end-of-trial marker always comes last.
"""

from __future__ import annotations

import threading
from typing import Callable, List

from ray.train.v2.api.callback import UserCallback

CHECKPOINT_PATH_KEY = "checkpoint_path"  # as Ray's TuneReportCallback names it (bootdiff.sweep reads it)


class ForwardReports(UserCallback):
    """Train callback (it runs in the Train controller): each report's rank-0 metrics, with the
    path of the checkpoint it registered, put on ``queue`` (a ``ray.util.queue.Queue``); the put
    returns once the queue holds it, so a report is queued before the run can end."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics: List[dict], checkpoint) -> None:
        item = dict(metrics[0])
        if checkpoint:
            item[CHECKPOINT_PATH_KEY] = checkpoint.path
        self.queue.put(item)


def fit_reporting(fit: Callable[[list], object], poll_s: float = 0.5):
    """``fit(callbacks)`` (a Train run's fit, given the callbacks to add) in a helper thread, each of
    its reports handed to ``tune.report`` from this thread, in order; returns what ``fit``
    returned, or raises what it raised, after every report was handed over."""
    from ray import tune
    from ray.util.queue import Empty, Queue

    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})  # one slot: Train waits for Tune, as with Ray's bridge
    done: dict = {}

    def run():
        try:
            done["result"] = fit([ForwardReports(queue)])
        except BaseException as exc:  # raised below, in the trial's thread
            done["error"] = exc

    worker = threading.Thread(target=run, name="bootdiff-train-fit", daemon=True)
    worker.start()
    try:
        while True:
            try:
                tune.report(queue.get(timeout=poll_s))
            except Empty:
                # every put returned before fit did: once the thread ended, an empty queue is final
                if not worker.is_alive() and queue.empty():
                    break
    finally:
        if not worker.is_alive():
            queue.shutdown()
    if "error" in done:
        raise done["error"]
    return done.get("result")
