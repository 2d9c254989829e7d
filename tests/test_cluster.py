"""What a run asks of the cluster (`ray_jobs.cluster.check`), against node lists shaped as
`ray_jobs.cluster.live_nodes` reads them from ``ray.nodes()``: a local storage path refused on a
multi-node cluster unless declared shared, and placements (label selectors, per-worker bundles,
worker counts) no node can take refused naming the key. The same checks on a real three-node
cluster: tests/test_ray_multinode.py."""

import os

import pytest

from bootdiff.config import ConfigError, load_config, to_object
from ray_jobs.cluster import _selects, check, demands

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.path.join(REPO, "configs", "quickstart.yaml")


def _node(i, cpus, labels=None, **res):
    return {"id": f"{i:02d}" * 14, "address": f"10.0.0.{i}", "labels": {"ray.io/node-id": "x", **(labels or {})},
            "resources": {"CPU": cpus, "memory": 1e9, f"node:10.0.0.{i}": 1.0, **res}}


HEAD = _node(1, 0)  # the head takes no work
A, B = _node(2, 2, {"node": "a"}), _node(3, 2, {"node": "b"}, fake_gpu=1)


def _cfg(*overrides):
    return to_object(load_config(QUICK, ["storage=s3://bucket/runs", *overrides]))


def test_local_storage_is_refused_on_a_multi_node_cluster_unless_declared_shared(tmp_path):
    local = f"storage={tmp_path}/runs"
    check(_cfg(local), [_node(1, 2)])  # one node: every process sees its disk
    check(_cfg(), [HEAD, A, B])  # s3://: every node reads and writes it
    with pytest.raises(ConfigError) as e:
        check(_cfg(local), [HEAD, A, B])
    msg = str(e.value)
    assert msg.startswith(f"storage='{tmp_path}/runs' is a local path") and "3 nodes" in msg
    assert "s3://" in msg and "ray.shared_storage=true" in msg
    check(_cfg(local, "ray.shared_storage=true"), [HEAD, A, B])  # an NFS mount, said so


def test_every_problem_is_named_at_once_a_line_each(tmp_path):
    with pytest.raises(ConfigError) as e:
        check(_cfg(f"storage={tmp_path}/runs", "views.patch.scaling.label_selector={node: c}",
                   "views.low.scaling.num_workers=5"), [HEAD, A, B])
    lines = str(e.value).splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith(f"storage='{tmp_path}/runs' is a local path")
    assert lines[1].startswith("views.patch.scaling.label_selector={'node': 'c'} selects no node")
    assert lines[2].startswith("views.low.scaling.num_workers=5: the nodes hold only 4")


def test_every_run_of_the_config_is_a_demand_with_its_key():
    keys = [d[0] for d in demands(_cfg("distill.enabled=true"))]
    assert keys == ["views.patch.scaling", "views.low.scaling", "sweep.trial_resources", "full_res.scaling",
                    "distill.scaling", "eval.num_cpus"]  # the quickstart gives its evaluation task 2 CPUs
    keys = [d[0] for d in demands(_cfg("sweep.baseline_full_res=false", "sweep.peers=[]"))]
    assert "full_res.scaling" not in keys and "distill.scaling" not in keys
    key, bundle, selector, workers = demands(_cfg("views.low.scaling.num_workers=2",
                                                  "views.low.scaling.resources_per_worker={fake_gpu: 1}",
                                                  "views.low.scaling.label_selector={node: b}"))[1]
    assert (key, bundle, selector, workers) == ("views.low.scaling", {"CPU": 1.0, "fake_gpu": 1.0}, {"node": "b"}, 2)


def test_placements_no_node_can_take_fail_naming_the_key():
    nodes = [HEAD, A, B]
    check(_cfg("views.patch.scaling.label_selector={node: a}", "views.low.scaling.label_selector={node: b}",
               "sweep.trial_label_selector={node: 'in(a,b)'}"), nodes)
    with pytest.raises(ConfigError) as e:
        check(_cfg("views.patch.scaling.label_selector={node: c}"), nodes)
    msg = str(e.value)
    assert msg.startswith("views.patch.scaling.label_selector={'node': 'c'} selects no node"), msg
    assert "node=a" in msg and "node=b" in msg and "CPU 2" in msg  # what the cluster has instead
    with pytest.raises(ConfigError, match=r"^sweep.trial_label_selector=\{'node': 'gpu'\} selects no node"):
        check(_cfg("sweep.trial_label_selector={node: gpu}"), nodes)
    # a bundle must fit on one node: 3 CPUs per worker, 4 in the cluster, 2 per node
    with pytest.raises(ConfigError, match=r"^views.low.scaling.resources_per_worker: one worker of views.low.scaling "
                                          r"needs \{'CPU': 3.0\} on one node"):
        check(_cfg("views.low.scaling.cpus_per_worker=3"), nodes)
    # the custom resource only node b has, on a worker the selector sends to node a
    with pytest.raises(ConfigError, match=r"views.low.scaling \(label_selector \{'node': 'a'\}\) needs"):
        check(_cfg("views.low.scaling.resources_per_worker={fake_gpu: 1}", "views.low.scaling.label_selector={node: a}"),
              nodes)
    check(_cfg("views.low.scaling.resources_per_worker={fake_gpu: 1}"), nodes)  # node b has it
    # more workers than the selected nodes hold: 2 per node
    with pytest.raises(ConfigError, match=r"^views.patch.scaling.num_workers=3: the nodes it selects hold only 2"):
        check(_cfg("views.patch.scaling.num_workers=3", "views.patch.scaling.label_selector={node: a}"), nodes)
    check(_cfg("views.patch.scaling.num_workers=4"), nodes)  # 2 on each worker node
    with pytest.raises(ConfigError, match=r"^sweep.trial_resources: one worker"):
        check(_cfg("sweep.trial_gpus=1"), nodes)
    # the evaluation task's own CPUs (eval.num_cpus): 3 on nodes of 2; without them, a trial's
    with pytest.raises(ConfigError, match=r"^eval.num_cpus: the evaluation task of eval.num_cpus needs \{'CPU': 3.0\}"):
        check(_cfg("eval.num_cpus=3"), nodes)
    check(_cfg("eval.num_cpus=0"), nodes)
    assert "eval.num_cpus" not in [d[0] for d in demands(_cfg("eval.num_cpus=0"))]
    # the task is placed by its resources alone (trial_task_options), so no trial label selector limits it
    assert demands(_cfg("sweep.trial_label_selector={node: a}"))[-1] == ("eval.num_cpus", {"CPU": 2.0}, {}, 1)


def test_label_selector_semantics_follow_ray():
    labels = {"node": "a", "zone": "west"}
    assert _selects({}, labels) and _selects({"node": "a"}, labels) and not _selects({"node": "b"}, labels)
    assert _selects({"node": "!b"}, labels) and not _selects({"node": "!a"}, labels)
    assert _selects({"node": "in(a,b)"}, labels) and not _selects({"node": "in(b,c)"}, labels)
    assert _selects({"node": "!in(b,c)"}, labels) and not _selects({"node": "!in(a,c)"}, labels)
    assert not _selects({"gpu": "h100"}, labels) and _selects({"gpu": "!h100"}, labels)
    assert _selects({"node": "a", "zone": "west"}, labels) and not _selects({"node": "a", "zone": "east"}, labels)


def test_retry_after_a_lost_node_checks_placement_first():
    """`fit_retrying` after a lost worker: a run the nodes left can still hold is fitted again; one
    they cannot (the only node its label selector allowed is gone) fails at once with the key, no
    retry; a worker group that did not start is started again without counting a failure, until
    placement fails."""
    from ray.train import ControllerError, WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    from ray_jobs.train_views import fit_retrying

    nodes = [HEAD, A]  # node b, which views.low asked for, is gone
    cfg = _cfg("views.low.scaling.label_selector={node: b}")

    def placeable():
        check(cfg, nodes, keys=("views.low.scaling",))

    fits = []

    class Trainer:
        def __init__(self, failure):
            self.failure = failure

        def fit(self):
            fits.append(self.failure)
            if self.failure is not None:
                raise self.failure
            return "done"

    lost = WorkerGroupError("worker died", {0: RuntimeError("node lost")})
    with pytest.raises(ConfigError, match=r"views\.low\.scaling\.label_selector=\{'node': 'b'\} selects no node"):
        fit_retrying(lambda: Trainer(lost), max_failures=5, what="view 'low'", placeable=placeable)
    assert len(fits) == 1  # not retried: no node can take it

    nodes.append(B)  # placeable again: retried, and succeeds
    queue = [lost, None]
    fits.clear()
    assert fit_retrying(lambda: Trainer(queue.pop(0)), max_failures=1, what="view 'low'", placeable=placeable) == "done"
    assert len(fits) == 2

    timeout = ControllerError(WorkerGroupStartupTimeoutError(num_workers=1))
    queue = [timeout, timeout, timeout, None]  # a busy cluster: three start time-outs, then room
    fits.clear()
    assert fit_retrying(lambda: Trainer(queue.pop(0)), max_failures=0, what="view 'low'", placeable=placeable) == "done"
    assert len(fits) == 4  # start time-outs are not failures (max_failures=0 allowed none)
    nodes.pop()  # and once node b is gone, a start time-out ends in the placement error
    queue = [timeout]
    with pytest.raises(ConfigError, match="no node"):
        fit_retrying(lambda: Trainer(queue.pop(0)), max_failures=0, what="view 'low'", placeable=placeable)


def test_each_train_run_is_checked_under_the_key_it_is_placed_by():
    from ray_jobs.cluster import placement_key

    keys = {key for key, *_ in demands(_cfg("distill.enabled=true"))}
    for view, key in [("patch", "views.patch.scaling"), ("low", "views.low.scaling"), ("full_res", "full_res.scaling"),
                      ("ambient", "full_res.scaling"), ("residual", "sweep.trial_resources"),
                      ("distill", "distill.scaling")]:
        assert placement_key(view) == key and key in keys, view
