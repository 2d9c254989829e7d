"""`bootdiff.run.scratch.scratch_dir`: the local folder of a process that was killed (a Train
worker Ray stopped, a lost node's run) is removed by the next process that makes one of its kind,
and only the folders of makers no longer alive; the Train workers' run dirs and a remote
TensorBoard run's event folder are such folders."""

import os
import signal
import subprocess
import sys

from bootdiff.run.layout import RunLayout
from bootdiff.run.scratch import scratch_dir
from bootdiff.run.tb import TensorBoardRun

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NS = os.stat("/proc/self/ns/pid").st_ino


def test_a_killed_makers_folder_is_removed_by_the_next_one(tmp_path):
    code = ("import sys, os, time; from bootdiff.run.scratch import scratch_dir; d = scratch_dir('bootdiff-run', sys.argv[1]); "
            "open(os.path.join(d, 'state.pt'), 'wb').write(b'x' * 1000); print(d, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=REPO))
    killed = proc.stdout.readline().strip()
    mine = scratch_dir("bootdiff-run", str(tmp_path))  # a live maker's (this process)
    assert os.path.isdir(killed) and os.path.isdir(mine)  # its maker still alive: kept
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    other_ns = tmp_path / f"bootdiff-run-{NS + 1}-{proc.pid}-x"  # another container's, sharing the disk
    other_kind = tmp_path / f"bootdiff-tb-{NS}-{proc.pid}-x"  # another kind: left to its own kind
    notes = tmp_path / "bootdiff-run-notes"
    for d in (other_ns, other_kind, notes):
        d.mkdir()
    new = scratch_dir("bootdiff-run", str(tmp_path))
    assert not os.path.exists(killed)
    assert os.path.isdir(mine) and other_ns.is_dir() and other_kind.is_dir() and notes.is_dir()
    assert os.path.basename(new).startswith(f"bootdiff-run-{NS}-{os.getpid()}-")
    scratch_dir("bootdiff-tb", str(tmp_path))
    assert not other_kind.exists()


def test_a_remote_tensorboard_run_writes_in_a_scratch_folder_it_removes(s3):
    run = TensorBoardRun(RunLayout(f"{s3[0]}/scratch", "exp").tb_run("view-low")).open(0)
    folder = run._dir
    assert os.path.basename(folder).startswith(f"bootdiff-tb-{NS}-{os.getpid()}-")
    run.log({"step": 1, "kimg": 0.064, "loss": 0.5}, upload=True)
    run.close()
    assert not os.path.exists(folder)
