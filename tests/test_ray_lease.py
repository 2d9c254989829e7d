"""Two submissions of one run at once, exactly one runs: two ``python -m ray_jobs.ingest``
drivers of the same run, started together from terminals joined to a running Ray cluster
(``RAY_ADDRESS``, storage a local path: ``ray.shared_storage``), each with the job submission id
Ray gives a submitted job's driver. One takes the run's lease (`bootdiff.lease`) and ingests; the
other fails at once naming the first and touches nothing. On the local Ray cluster the
`local_ray` tests share: the lease lives in storage, so the number of nodes changes nothing."""

import json
import os
import subprocess

import pytest

from raycluster import stage_command
from rayhead import REPO

pytestmark = pytest.mark.ray


def test_two_submissions_at_once_exactly_one_runs(local_ray, mnist_wheel, tmp_path):
    """The loser exits 75 naming the winner (pid, Ray job submission id, stage) and writes
    nothing; the winner ingests and releases the lease."""
    root, procs = tmp_path / "quickstart", []
    env = dict(os.environ, RAY_ADDRESS=local_ray.get_runtime_context().gcs_address)
    for i in range(2):
        cmd = stage_command("ingest", str(tmp_path), "ray.shared_storage=true")
        job = json.dumps({"runtime_env": {}, "metadata": {"job_submission_id": f"raysubmit_fault{i}"}})
        procs.append(subprocess.Popen(cmd, env=dict(env, RAY_JOB_CONFIG_JSON_ENV_VAR=job), cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=170)[0] for p in procs]
    rcs = [p.returncode for p in procs]
    assert sorted(rcs) == [0, 75], (rcs, [o[-3000:] for o in outs])
    win, lose = (0, 1) if rcs[0] == 0 else (1, 0)
    msg = outs[lose]
    assert f"pid {procs[win].pid}" in msg and f"raysubmit_fault{win}" in msg and "ray_jobs.ingest" in msg, msg
    assert "ingested" in outs[win] and "ingested" not in msg
    assert (root / "data" / "manifest.json").exists()
    assert not (root / "lease.json").exists()  # released by the winner
