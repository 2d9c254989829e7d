"""Stream view shards as float32 batches: a webdataset ``DataPipeline`` over fsspec URLs.

``make_loader(urls, batch_size, mode=...)`` yields ``[B, C, H, W]`` (or ``[B, C, T, H, W]``)
float32 tensors: uint8 pixels mapped to [-1, 1] (``x/127.5 − 1``), float16 latents unchanged.

Splitting: the reading *consumers* are ``world_size × num_workers`` (rank from the arguments or
the ``RANK``/``WORLD_SIZE`` environment that Ray Train and torchrun set; workers = DataLoader
workers). Consumer ``rank·num_workers + worker`` reads:

* ``mode="train"`` — an endless stream of shards resampled in seeded random order (a fresh
  permutation of all shards per pass, different per consumer), through a seeded shuffle buffer,
  batched; ``epoch_samples`` fixes an epoch at ``epoch_samples // (world_size·batch_size)``
  batches per rank, so DDP ranks always step together (no hang on uneven shards).
* ``mode="eval"`` — every sample exactly once across all ranks × workers, in order: whole
  shards round-robin when there are at least as many shards as consumers, else every consumer
  reads all shards and keeps every n-th sample. The last batch may be partial.

Everything is deterministic for a seed. webdataset 1.0.2 has no ``s3://`` opener: importing
this module registers an fsspec-backed ``gopen`` handler (`gopen_fsspec`), so
``wds.WebDataset("s3://...")`` works too. A shard's URLs come from `view_urls`, which first
checks each shard's sha256 against the manifest (once per shard per process), so bytes changed
after ingest raise `bootdiff.data.shards.ChecksumError` before any sample is read. Reading plain
URLs, a corrupt shard or sample raises `ShardError` naming the shard URL and the sample key
(``on_error="raise"``); ``on_error="skip"`` logs a warning, skips the sample (or the rest of
the shard) and counts it in ``loader.skipped``.
"""

from __future__ import annotations

import importlib
import io
import json
import functools
import logging
import multiprocessing
import os
import random
import tarfile
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import braceexpand
import numpy as np
import torch
import webdataset as wds

from bootdiff.data.shards import read_manifest, read_npy, shard_urls, to_model_units
from bootdiff.util import url_fs

wds_gopen = importlib.import_module("webdataset.gopen")  # the module (wds.gopen is the function)

log = logging.getLogger(__name__)

# DataLoader workers start with forkserver, never fork: forking a process that runs Ray's (or
# any) background threads can deadlock the child, so Ray's data-loading guide asks for it.
# forkserver forks from a clean server process; spawn where forkserver does not exist (Windows).
WORKER_START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class ShardError(RuntimeError):
    """A shard or one of its samples cannot be read; names the shard URL and the sample key."""

    def __init__(self, url: str, key: Optional[str], cause: str):
        self.url, self.key, self.cause = url, key, cause
        where = f"sample key {key!r}" if key else "before its first sample"
        super().__init__(f"corrupt shard {url} ({where}): {cause}")

    def __reduce__(self):  # rebuilt from its own arguments when Ray ships it between processes
        return type(self), (self.url, self.key, self.cause)


# ----------------------------------------------------------------------------- URLs


def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """webdataset ``gopen`` handler for any fsspec URL (s3:// through `bootdiff.util.url_fs`)."""
    fs, path = url_fs(url)
    return fs.open(path, mode)


def register_fsspec_opener(schemes: Sequence[str] = ("s3", "s3a", "gcs", "az", "abfs", "memory")) -> None:
    for scheme in schemes:
        wds_gopen.gopen_schemes[scheme] = gopen_fsspec


register_fsspec_opener()


def expand_urls(urls: Union[str, Sequence[str]]) -> List[str]:
    """Brace notation (``root/patch/patch-{000000..000003}.tar``) or a list of URLs → list."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out = [u for item in items for u in braceexpand.braceexpand(str(item))]
    if not out:
        raise ValueError("make_loader: no shard URLs given")
    return out


def view_urls(manifest: Union[str, Dict[str, Any]], view: str, verify: bool = True) -> List[str]:
    """The shard URLs of one view/split of a dataset (manifest dict, or its / its root's URL).
    With ``verify`` every shard's sha256 is checked against the manifest first, once per shard
    per process (`bootdiff.data.shards.shard_urls`): a shard whose bytes changed raises
    `bootdiff.data.shards.ChecksumError` naming it and both hashes."""
    if isinstance(manifest, str):
        manifest = read_manifest(manifest)
    return shard_urls(manifest, view, verify=verify)


# ----------------------------------------------------------------------------- pipeline stages


class _Stages:
    """The per-consumer stages of the pipeline (picklable; one copy per DataLoader worker)."""

    def __init__(self, urls, batch_size, mode, seed, rank, world_size, shuffle_buffer, on_error,
                 with_meta):
        self.urls, self.batch_size, self.mode, self.seed = urls, batch_size, mode, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.on_error, self.with_meta = shuffle_buffer, on_error, with_meta
        self.epoch = 0
        self.sample_split = None  # eval with fewer shards than consumers: (me, n)
        self.skipped = 0  # in this process since the last batch handed out

    def consumer(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * num_workers + worker, self.world_size * num_workers, worker

    def rng(self, what: str) -> random.Random:
        _, _, worker = self.consumer()
        return random.Random(f"{what}-{self.seed}-{self.epoch}-{self.rank}-{worker}")

    def shards(self) -> Iterator[Dict[str, Any]]:
        """Stage 1: the shard URLs this consumer reads."""
        me, n, _ = self.consumer()
        self.sample_split = None
        if self.mode == "eval":
            if len(self.urls) >= n:
                yield from (dict(url=u) for u in self.urls[me::n])
            else:
                self.sample_split = (me, n)
                yield from (dict(url=u) for u in self.urls)
            return
        rng = self.rng("shards")
        while True:  # resampled: endless seeded permutations of all shards
            order = list(self.urls)
            rng.shuffle(order)
            yield from (dict(url=u) for u in order)

    def fail(self, err: ShardError) -> None:
        if self.on_error == "raise":
            raise err
        self.skipped += 1
        log.warning("skipping: %s", err)

    def samples(self, src) -> Iterator[tuple]:
        """Stage 2: read each tar (fsspec), group members by key, decode; errors name url + key."""
        count = 0

        def emit(url, key, group):  # decode one sample; keep every n-th when sample-splitting
            nonlocal count
            out = self._finish(url, key, group)
            if out is not None:
                if self.sample_split is None or count % self.sample_split[1] == self.sample_split[0]:
                    yield out
                count += 1

        for item in src:
            url, key = item["url"], None
            try:
                fs, path = url_fs(url)
                with fs.open(path, "rb") as f:  # one read (a single GET on S3); shards are MBs
                    data = f.read()
                with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                    group: Dict[str, bytes] = {}
                    for m in tar:
                        if not m.isreg():
                            continue
                        k, _, ext = m.name.partition(".")
                        if group and k != key:
                            yield from emit(url, key, group)
                            group = {}
                        key = k
                        if m.offset_data + m.size > len(data):
                            raise tarfile.ReadError("unexpected end of data")
                        group[ext] = data[m.offset_data:m.offset_data + m.size]
                    if data[tar.offset:].strip(b"\0"):
                        raise tarfile.ReadError(f"invalid tar header at byte {tar.offset} "
                                                f"({len(data) - tar.offset} unread bytes)")
                    if group:
                        yield from emit(url, key, group)
            except ShardError:
                raise
            except Exception as exc:  # unreadable / truncated tar: the rest of this shard is lost
                self.fail(ShardError(url, key, f"{type(exc).__name__}: {exc}"))

    def _finish(self, url: str, key: str, group: Dict[str, bytes]):
        try:
            if "npy" not in group:
                raise ValueError(f"no .npy member (has {sorted(group)})")
            x = read_npy(group["npy"])
            if x.dtype not in (np.uint8, np.float16, np.float32):
                raise ValueError(f"unsupported array dtype {x.dtype} (expected uint8 or float16)")
            meta = None
            if self.with_meta:
                meta = json.loads(group["json"]) if "json" in group else {}
                meta.update(__key__=key, __url__=url)
            return x, meta
        except Exception as exc:
            self.fail(ShardError(url, key, f"{type(exc).__name__}: {exc}"))
            return None

    def shuffle(self, src):
        """Stage 3 (train): seeded shuffle buffer."""
        if self.mode != "train" or self.shuffle_buffer <= 1:
            return src
        return wds.filters._shuffle(src, self.shuffle_buffer, min(self.shuffle_buffer, 100),
                                    rng=self.rng("shuffle"))

    def batches(self, src):
        """Stage 4: stack into batches; each item carries the skip count since the last one."""
        xs, metas = [], []
        for x, meta in src:
            if xs and (x.shape != xs[0].shape or x.dtype != xs[0].dtype):
                raise ShardError(meta["__url__"] if meta else "?", meta["__key__"] if meta else None,
                                 f"sample {tuple(x.shape)} {x.dtype} differs from {tuple(xs[0].shape)} {xs[0].dtype}")
            xs.append(x)
            metas.append(meta)
            if len(xs) == self.batch_size:
                yield self._batch(xs, metas)
                xs, metas = [], []
        if xs and self.mode == "eval":
            yield self._batch(xs, metas)
        if self.skipped:
            yield None, None, self._take_skipped()

    def _batch(self, xs, metas):
        x = torch.from_numpy(to_model_units(np.stack(xs), np.float32))
        return x, (metas if self.with_meta else None), self._take_skipped()

    def _take_skipped(self) -> int:
        n, self.skipped = self.skipped, 0
        return n


STORAGE_ENV_PREFIXES = ("AWS_", "FSSPEC_", "BOOTDIFF_")  # what fsspec/s3fs read in a worker


def _set_env(env: dict, worker_id: int) -> None:
    os.environ.update(env)


class ShardLoader:
    """Iterable of batches (see module docstring). ``len()`` is the batches per rank per epoch
    when known; ``skipped`` counts samples/shards skipped under ``on_error="skip"``."""

    def __init__(self, stages: _Stages, num_workers: int, num_batches: Optional[int]):
        self.stages, self.num_workers, self.num_batches = stages, num_workers, num_batches
        self.dataset = wds.DataPipeline(stages.shards, stages.samples, stages.shuffle, stages.batches)
        self.skipped = 0
        self.epoch = 0

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("this loader has no fixed length (train mode without epoch_samples)")
        return self.num_batches

    def __iter__(self):
        self.stages.epoch = self.epoch
        self.epoch += 1
        if self.num_workers > 0:
            # forkserver workers inherit the environment the fork server started with, which may
            # predate this loader (e.g. S3 settings exported later): hand them today's storage env.
            env = {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV_PREFIXES)}
            it = iter(torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                                                  multiprocessing_context=WORKER_START_METHOD,
                                                  worker_init_fn=functools.partial(_set_env, env)))
        else:
            it = iter(self.dataset)
        n = 0
        for x, metas, skipped in it:
            self.skipped += skipped
            if x is None:
                continue
            yield (x, metas) if self.stages.with_meta else x
            n += 1
            if self.num_batches is not None and n >= self.num_batches:
                break


def make_loader(urls: Union[str, Sequence[str]], batch_size: int, mode: str = "train", seed: int = 0,
                rank: Optional[int] = None, world_size: Optional[int] = None, num_workers: int = 0,
                shuffle_buffer: int = 1000, on_error: str = "raise", epoch_samples: Optional[int] = None,
                with_meta: bool = False) -> ShardLoader:
    """A `ShardLoader` over shard ``urls`` (brace pattern or list; see module docstring).

    ``with_meta=True`` yields ``(x, metas)``, ``metas`` a list of each sample's JSON metadata
    plus ``__key__`` and ``__url__``.
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"make_loader: mode must be 'train' or 'eval', got {mode!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"make_loader: on_error must be 'raise' or 'skip', got {on_error!r}")
    if batch_size <= 0:
        raise ValueError(f"make_loader: batch_size must be positive, got {batch_size}")
    if rank is None or world_size is None:
        env_rank, env_world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if "RANK" not in os.environ and torch.distributed.is_available() and torch.distributed.is_initialized():
            env_rank, env_world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        rank = env_rank if rank is None else rank
        world_size = env_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"make_loader: rank {rank} not in [0, world_size={world_size})")
    num_batches = None
    if mode == "train" and epoch_samples is not None:
        num_batches = max(1, int(epoch_samples) // (world_size * batch_size))
    stages = _Stages(expand_urls(urls), int(batch_size), mode, int(seed), int(rank), int(world_size),
                     int(shuffle_buffer), on_error, with_meta)
    return ShardLoader(stages, int(num_workers), num_batches)
