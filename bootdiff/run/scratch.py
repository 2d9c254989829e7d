"""Local scratch folders a killed process does not leave behind.

A Train worker writes its checkpoints, and a run on remote storage its TensorBoard events, in a
local temp folder before they are copied to storage, and removes it when it ends. A process Ray
kills never runs its ``finally`` — a trial Tune stops (Ctrl-C on the sweep), a retried worker group, a lost node's run —
so its folder, last checkpoint and all, would stay on the node. `scratch_dir` names each folder
after its maker (pid namespace and pid) and, before making one, removes the folders of the same
kind whose maker is no longer alive: the next worker on the node cleans up after the killed one.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from typing import Optional


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # no /proc (macOS): one namespace
        return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def scratch_dir(kind: str, root: Optional[str] = None) -> str:
    """A fresh folder ``{root}/{kind}-{pid namespace}-{pid}-{mkdtemp's random suffix}`` (``root``: the temp dir),
    after removing every ``{kind}-…`` folder there whose maker in this pid namespace is dead.
    Folders of another namespace (another container sharing the disk) are left alone."""
    root = root or tempfile.gettempdir()
    ns = _pid_namespace()
    mine = re.compile(rf"{re.escape(kind)}-(\d+)-(\d+)-[^-]+")
    for name in os.listdir(root):
        m = mine.fullmatch(name)
        if m and int(m.group(1)) == ns and not _alive(int(m.group(2))):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{kind}-{ns}-{os.getpid()}-", dir=root)
