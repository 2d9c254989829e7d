"""A run lease: one small JSON object (``{storage}/{name}/lease.json``) that says which process owns
a run, renewed by a heartbeat, so a second submission of the same run waits or fails naming the
first instead of duplicating its work.

Every change of the object is atomic and conditional, so of two contenders exactly one wins:

* local disk (or a shared POSIX filesystem): created with ``link()`` of a complete temporary file
  (fails if the lease exists); heartbeat, takeover and release compare-and-swap the content under an
  ``flock`` on the sibling guard file ``lease.json.lock`` (an empty file that is never removed).
* S3: conditional requests — create ``PutObject If-None-Match: *``; heartbeat and takeover
  ``PutObject If-Match: <ETag read>``; release ``DeleteObject If-Match: <our ETag>``. AWS S3 and
  moto honour these; a server that ignores ``If-Match`` on DELETE leaves one race: a release that
  reads its own ETag can delete a takeover made in the next instant (the lease is stale then).

A lease is stale when its heartbeat is older than its ``ttl_s``, measured on the storage's clock
(file mtime; S3 ``Date`` minus ``Last-Modified``, 1 s resolution), so hosts' clocks need not agree.
A holder that is SIGKILLed stops renewing, and its lease may be taken over ``ttl_s`` later — at
once from the same host, where the holder's pid is seen to be gone.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import email.utils
import fcntl
import getpass
import json
import os
import socket
import threading
import time
import uuid
from typing import Optional, Tuple

from fsspec.asyn import sync

from bootdiff.util import url_fs

__all__ = ["RunLease", "LeaseHeld", "LeaseLost", "read_lease"]


class LeaseHeld(RuntimeError):
    """The run's lease is held by another live owner (``holder``: its record; ``age_s``: seconds
    since its last heartbeat)."""

    def __init__(self, url: str, holder: dict, age_s: float, ttl_s: float):
        self.url, self.holder, self.age_s, self.ttl_s = url, holder, age_s, ttl_s
        super().__init__(
            f"{describe_holder(url, holder, age_s, ttl_s)}. Another submission of this run is active: "
            f"wait for it to finish, or submit with a wait to queue behind it. If it is dead (killed, "
            f"host gone), the next submission takes its lease over once its heartbeat is older than "
            f"{ttl_s:.0f} s (in about {max(0.0, ttl_s - age_s):.0f} s); only if you are sure it is dead, "
            f"remove {url} by hand to take over at once.")

    def __reduce__(self):  # rebuilt from its own arguments when pickled (Ray, multiprocessing)
        return type(self), (self.url, self.holder, self.age_s, self.ttl_s)


class LeaseLost(RuntimeError):
    """Our lease was taken over (or removed) by someone else while we held it."""


def describe_holder(url: str, holder: dict, age_s: float, ttl_s: float) -> str:
    """One line naming the holder of the lease at ``url``."""
    job = holder.get("job_id")
    return (f"run lease {url} is held by {holder.get('owner', '?')!r} (host {holder.get('host', '?')}, "
            f"pid {holder.get('pid', '?')}" + (f", Ray job {job}" if job else "") +
            f", started {holder.get('started', '?')}); last heartbeat {age_s:.1f} s ago, "
            f"stale after {ttl_s:.0f} s")


def read_lease(url: str) -> Optional[Tuple[dict, float]]:
    """The lease record at ``url`` and the age of its heartbeat in seconds, or None if absent."""
    got = _store(url).read()
    return None if got is None else (_parse(url, got[0]), got[2])


class RunLease:
    """The lease of one run at ``url`` (a local path or fsspec URL), as a context manager.

    ``acquire()`` creates the lease, or takes over a stale one (heartbeat older than the holder's
    ``ttl_s``); if a live owner holds it, it waits up to ``wait_s`` seconds (printing who holds it,
    ``float('inf')``: forever), then raises `LeaseHeld` naming the holder. While held, a daemon
    thread renews the heartbeat every ``heartbeat_s`` (default ``ttl_s / 4``); if it finds the lease
    taken over it stops and sets ``lost`` (`check` raises `LeaseLost`). ``release()`` deletes the
    object only if it is still ours. ``owner`` is a free text (e.g. ``"pipeline"``); host, user,
    pid, ``job_id`` (the Ray job id, if the caller has one) and the start time are recorded.
    """

    def __init__(self, url: str, *, owner: str = "bootdiff", job_id: Optional[str] = None,
                 ttl_s: float = 120.0, heartbeat_s: Optional[float] = None, wait_s: float = 0.0,
                 poll_s: Optional[float] = None):
        self.url = str(url)
        self.ttl_s = float(ttl_s)
        self.heartbeat_s = float(heartbeat_s) if heartbeat_s is not None else self.ttl_s / 4
        if not (self.ttl_s > 0 and 0 < self.heartbeat_s <= self.ttl_s / 2):
            raise ValueError(f"run lease {self.url}: need ttl_s > 0 and 0 < heartbeat_s <= ttl_s/2, got "
                             f"ttl_s={ttl_s}, heartbeat_s={heartbeat_s}")
        if wait_s < 0:
            raise ValueError(f"run lease {self.url}: wait_s={wait_s} must be >= 0")
        self.wait_s = float(wait_s)
        self.poll_s = float(poll_s) if poll_s is not None else min(5.0, self.heartbeat_s)
        self.record = {"owner": str(owner), "host": socket.gethostname(), "user": _user(),
                       "pid": os.getpid(), "job_id": job_id, "token": uuid.uuid4().hex,
                       "ttl_s": self.ttl_s, "heartbeat_s": self.heartbeat_s, "seq": 0}
        self._store = _store(self.url)
        self._version = None  # what the store compares against: our last written content / ETag
        self._lock = threading.Lock()  # orders heartbeat writes against release
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.lost = False

    # --------------------------------------------------------------------------- acquire / release

    def acquire(self) -> "RunLease":
        """Take the lease (see the class docstring); returns ``self``."""
        if self._version is not None:
            raise RuntimeError(f"run lease {self.url} is already held by this RunLease")
        self.record.update(started=_now_iso(), token=uuid.uuid4().hex)
        deadline = time.monotonic() + self.wait_s
        shown = None
        while True:
            held = self._try_take()
            if held is None:
                break
            holder, age, ttl = held
            if time.monotonic() >= deadline:
                raise LeaseHeld(self.url, holder, age, ttl)
            if shown != holder.get("token"):
                shown = holder.get("token")
                print(f"[bootdiff] waiting: {describe_holder(self.url, holder, age, ttl)}", flush=True)
            time.sleep(max(0.0, min(self.poll_s, deadline - time.monotonic())))
        self.lost = False
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-heartbeat {self.url}",
                                        daemon=True)
        self._thread.start()
        return self

    def release(self) -> bool:
        """Stop the heartbeat and delete the lease if it is still ours; True if it was deleted."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            version, self._version = self._version, None
            if version is None or self.lost:
                return False
            return self._store.delete(version)

    def check(self) -> None:
        """Raise `LeaseLost` if the heartbeat found the lease taken over or removed."""
        if self.lost:
            raise LeaseLost(f"run lease {self.url} was taken over or removed while {self.record['owner']!r} "
                            f"(pid {self.record['pid']}) held it: another submission now owns this run")

    def __enter__(self) -> "RunLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ----------------------------------------------------------------------------------- internals

    def _payload(self) -> bytes:
        self.record["seq"] += 1  # every write differs, so every write has a new ETag
        self.record["heartbeat"] = _now_iso()
        return json.dumps(self.record, indent=1).encode()

    def _try_take(self):
        """Create or take over the lease: None on success, else (holder, age_s, ttl_s) of the holder."""
        holder, age, ttl = {"owner": "<changing too fast to read>"}, 0.0, self.ttl_s
        for _ in range(10):  # retry at once when the object changed under us
            version = self._store.create(self._payload())
            if version is not None:
                self._version = version
                return None
            got = self._store.read()
            if got is None:  # released in between
                continue
            raw, current, age = got
            holder = _parse(self.url, raw)
            if holder.get("token") == self.record["token"]:  # our write landed, its reply was lost
                self._version = current
                return None
            ttl = float(holder.get("ttl_s") or self.ttl_s)
            if age <= ttl and not _dead_on_this_host(holder):
                return holder, age, ttl
            version = self._store.replace(self._payload(), current)
            if version is not None:
                self._version = version
                print(f"[bootdiff] took over stale {describe_holder(self.url, holder, age, ttl)}", flush=True)
                return None
        return holder, age, ttl

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._lock:
                if self._version is None:
                    return
                try:
                    version = self._store.replace(self._payload(), self._version)
                except Exception as e:  # storage hiccup: try again next beat; stale only after ttl
                    print(f"[bootdiff] warning: run lease {self.url} heartbeat failed: {e!r}", flush=True)
                    continue
                if version is None:  # unless our own write landed and only its reply was lost
                    got = self._store.read()
                    if got is not None and _parse(self.url, got[0]).get("token") == self.record["token"]:
                        self._version = got[1]
                        continue
                    self.lost = True
                    print(f"[bootdiff] warning: run lease {self.url} was taken over or removed; "
                          f"this process no longer owns the run", flush=True)
                    return
                self._version = version


def _dead_on_this_host(holder: dict) -> bool:
    """The holder ran on this host and its process is gone (e.g. SIGKILLed): its lease is stale
    now, not ``ttl_s`` later. Holders on other hosts are judged by their heartbeat alone."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _user() -> str:
    with contextlib.suppress(Exception):
        return getpass.getuser()
    return "?"


def _parse(url: str, raw: bytes) -> dict:
    """A lease record; an unreadable object becomes a record naming only that (it still ages)."""
    try:
        record = json.loads(raw)
        if isinstance(record, dict):
            return record
    except ValueError:
        pass
    return {"owner": f"<unreadable lease object at {url}>"}


def _store(url: str):
    fs, path = url_fs(url)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return _LocalStore(path)
    if protocol in ("s3", "s3a"):
        return _S3Store(fs, path)
    raise ValueError(f"run lease {url}: storage protocol {protocol!r} has no atomic conditional write "
                     f"here (supported: local paths, s3://)")


class _LocalStore:
    """Local / POSIX: the version is the object's bytes; CAS under ``flock`` of ``<path>.lock``."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.guard = self.path + ".lock"

    def _write_tmp(self, data: bytes) -> str:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    @contextlib.contextmanager
    def _locked(self, timeout_s: float = 60.0):
        """Hold the guard's flock (each holder keeps it for one read + rename, microseconds)."""
        fd = os.open(self.guard, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"run lease guard {self.guard} stayed locked for {timeout_s:.0f} s "
                                           f"(is a process holding it stopped?)") from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)  # releases the flock

    def create(self, data: bytes):
        tmp = self._write_tmp(data)
        try:
            os.link(tmp, self.path)  # atomic; EEXIST if the lease exists
            return data
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)

    def read(self):
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
                mtime = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return raw, raw, max(0.0, time.time() - mtime)

    def replace(self, data: bytes, expected: bytes):
        tmp = self._write_tmp(data)
        try:
            with self._locked():
                got = self.read()
                if got is None or got[0] != expected:
                    return None
                os.replace(tmp, self.path)
                tmp = None
                return data
        finally:
            if tmp is not None:
                os.unlink(tmp)

    def delete(self, expected: bytes) -> bool:
        with self._locked():
            got = self.read()
            if got is None or got[0] != expected:
                return False
            os.unlink(self.path)
            return True


class _S3Store:
    """S3: the version is the ETag; conditional PutObject / DeleteObject through s3fs's client."""

    LOST = ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409", "404")

    def __init__(self, fs, path: str):
        self.fs = fs
        self.bucket, _, self.key = path.partition("/")
        if not self.key:
            raise ValueError(f"run lease s3://{path}: need a key inside the bucket")

    def _call(self, method: str, **kw):
        return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kw)

    def _conditional(self, method: str, **kw):
        """The response, or None if the condition failed (412), lost a race (409) or the key is gone."""
        try:
            return self._call(method, **kw)
        except Exception as e:
            if _s3_error_code(e) in self.LOST:
                return None
            raise

    def create(self, data: bytes):
        out = self._conditional("put_object", Body=data, IfNoneMatch="*")
        return None if out is None else out["ETag"]

    def read(self):
        async def get():
            out = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            async with out["Body"] as body:
                return out, await body.read()

        try:
            out, raw = sync(self.fs.loop, get)
        except Exception as e:
            if isinstance(e, FileNotFoundError) or _s3_error_code(e) in ("NoSuchKey", "404"):
                return None
            raise
        date = out.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = email.utils.parsedate_to_datetime(date).timestamp() if date else time.time()
        return raw, out["ETag"], max(0.0, now - out["LastModified"].timestamp())

    def replace(self, data: bytes, etag: str):
        out = self._conditional("put_object", Body=data, IfMatch=etag)
        return None if out is None else out["ETag"]

    def delete(self, etag: str) -> bool:
        got = self.read()  # also covers servers that ignore If-Match on DELETE (see module docstring)
        if got is None or got[1] != etag:
            return False
        return self._conditional("delete_object", IfMatch=etag) is not None


def _s3_error_code(exc: BaseException) -> Optional[str]:
    """The S3 error code (or HTTP status) of a botocore error, also when s3fs wrapped it."""
    seen = 0
    while exc is not None and seen < 5:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            return str(code or response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None
