"""Training checkpoints on any fsspec URL (local path, ``file://``, ``s3://``).

Layout: ``{run_dir}/checkpoint-{step:08d}/`` holding ``state.pt`` (``torch.save`` of a dict of
tensors / plain Python values) and ``config.yaml``. A checkpoint directory is written with
`bootdiff.util.atomic_dir` (every file first, the ``COMPLETE`` marker last; locally a rename),
so a crash mid-write never leaves a checkpoint that `latest_checkpoint` would pick up: readers
only ever see directories carrying the marker.
"""

from __future__ import annotations

import io
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import torch

from bootdiff.util import _is_local, atomic_dir, is_complete, join, url_fs

_NAME = re.compile(r"^checkpoint-(\d{8})$")


def checkpoint_url(run_dir: str, step: int) -> str:
    """The URL of the checkpoint of ``step`` in ``run_dir``."""
    return join(run_dir, f"checkpoint-{int(step):08d}")


def _list(run_dir: str) -> List[Tuple[int, str, bool]]:
    """``(step, url, complete)`` for every ``checkpoint-<8-digit step>`` entry of ``run_dir``, by step."""
    fs, path = url_fs(run_dir)
    fs.invalidate_cache()  # object stores cache listings; we must see fresh writes
    if not fs.exists(path):
        return []
    out = []
    for entry in fs.ls(path, detail=False):
        m = _NAME.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if m:
            url = checkpoint_url(run_dir, int(m.group(1)))
            out.append((int(m.group(1)), url, is_complete(url)))
    return sorted(out)


def list_checkpoints(run_dir: str) -> List[str]:
    """URLs of the complete checkpoints in ``run_dir``, oldest first."""
    return [url for _, url, complete in _list(run_dir) if complete]


def latest_checkpoint(run_dir: Optional[str]) -> Optional[str]:
    """URL of the highest-step *complete* checkpoint in ``run_dir``, or None.

    Partial directories (no ``COMPLETE`` marker) and staging directories are ignored.
    """
    if not run_dir:
        return None
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: str, step: int, state: Dict[str, Any], config_yaml: str = "",
                    keep: int = 2) -> str:
    """Write ``state`` (and ``config_yaml``) as ``{run_dir}/checkpoint-{step:08d}/``; return its URL.

    The directory appears atomically (see module docstring). Afterwards only the newest ``keep``
    complete checkpoints are kept (``keep <= 0`` keeps all), and incomplete leftovers older than
    the newest complete checkpoint are removed.
    """
    url = checkpoint_url(run_dir, step)
    buf = io.BytesIO()
    torch.save(state, buf)
    fs, path = url_fs(url)
    if not _is_local(fs) and fs.exists(path):  # remote: never mix old and new files
        fs.rm(path, recursive=True)
    with atomic_dir(url) as stage:
        with open(os.path.join(stage, "state.pt"), "wb") as f:
            f.write(buf.getbuffer())
        with open(os.path.join(stage, "config.yaml"), "w") as f:
            f.write(config_yaml)
    prune_checkpoints(run_dir, keep)
    return url


def prune_checkpoints(run_dir: str, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (and dead partial ones)."""
    entries = _list(run_dir)
    complete = [(s, u) for s, u, c in entries if c]
    if not complete:
        return
    doomed = complete[:-keep] if keep > 0 else []
    doomed += [(s, u) for s, u, c in entries if not c and s < complete[-1][0]]
    for _, url in doomed:
        fs, path = url_fs(url)
        fs.rm(path, recursive=True)


def load_checkpoint(url: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load the ``state`` dict of a checkpoint directory URL (or of a ``state.pt`` URL).

    Raises FileNotFoundError naming the URL if it is missing or incomplete.
    """
    url = str(url).rstrip("/")
    if url.endswith(".pt"):
        ckpt_dir, file_url = url.rsplit("/", 1)[0], url
    else:
        ckpt_dir, file_url = url, join(url, "state.pt")
    if not is_complete(ckpt_dir):
        raise FileNotFoundError(f"checkpoint {ckpt_dir} is missing or incomplete (no COMPLETE marker)")
    fs, path = url_fs(file_url)
    with fs.open(path, "rb") as f:
        data = f.read()
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
