"""Train → Tune reports (`ray_jobs.tune_report`), on a real local Ray cluster and Ray Tune.

Each trial's "Train run" is `ForwardReports` called the way Train's controller calls it — from
another thread, each put returning once the Ray queue holds it — and the run ends right after its
last report: the moment at which Ray 2.60's own bridge (``TuneReportCallback``) can lose that
report or hang the trial (docs/RAY.md §7). Every report must reach Tune, in order, the last one
with its checkpoint's path, before the trial ends; a run's error must reach Tune after the reports
made before it."""

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]  # with Ray's own bridge this test hangs

REPORTS = 6


class _Checkpoint:
    path = "bucket/run/checkpoint_000005"


def trial(config):
    config = config["cfg"]
    from ray_jobs.tune_report import fit_reporting

    def fit(callbacks):
        forward = callbacks[0]
        for step in range(1, REPORTS + 1):
            if config["fail"] and step == 3:
                raise ValueError(f"trial {config['i']}: the Train run failed at step 3")
            forward.after_report(None, [{"step": step, "i": config["i"]}], _Checkpoint() if step == REPORTS else None)
        return f"result of {config['i']}"  # ends at once after its last report

    assert fit_reporting(fit, poll_s=0.05) == f"result of {config['i']}"


def test_every_report_reaches_tune_in_order_before_the_trial_ends(local_ray, tmp_path):
    from ray import tune

    grid = [{"i": i, "fail": i == 0} for i in range(5)]
    tuner = tune.Tuner(trial, param_space={"cfg": tune.grid_search(grid)}, tune_config=tune.TuneConfig(max_concurrent_trials=2),
                       run_config=tune.RunConfig(storage_path=str(tmp_path), name="reports", verbose=0))
    results = tuner.fit()
    assert len(results) == len(grid)
    for r in results:
        steps = list(r.metrics_dataframe["step"])
        if r.config["cfg"]["fail"]:  # the error, after the two reports made before it
            assert "the Train run failed at step 3" in str(r.error), r.error
            assert steps == [1, 2], steps
        else:
            assert r.error is None, r.error
            assert steps == list(range(1, REPORTS + 1)), (r.config, steps)
            assert r.metrics["checkpoint_path"] == _Checkpoint.path and r.metrics["i"] == r.config["cfg"]["i"]
