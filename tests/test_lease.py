"""The run lease (bootdiff/run/lease.py) on local disk and on the moto S3 server: two processes at once,
waiting, stale takeover after SIGKILL, heartbeat, and a release after a takeover.

Contenders are forked processes (``multiprocessing`` "fork": no re-import, so the races are tight).
"""

import multiprocessing as mp
import os
import signal
import threading
import time
import uuid

import pytest

from bootdiff.run.lease import LeaseHeld, LeaseLost, RunLease, read_lease

FORK = mp.get_context("fork")
TTL = 2.0  # S3 measures heartbeat age in whole seconds (HTTP dates): keep ttl >= 2


@pytest.fixture(params=["local", "s3"])
def lease_url(request, tmp_path, monkeypatch):
    """A fresh lease URL on local disk or on the moto S3 server."""
    if request.param == "local":
        return str(tmp_path / "run" / "lease.json")
    bucket, _ = request.getfixturevalue("s3")
    # moto checks If-None-Match / If-Match and then writes without a lock; AWS does both atomically.
    # Serialise moto's PutObject / DeleteObject handlers so the fake server matches AWS here.
    from moto.s3.responses import S3Response

    lock = threading.Lock()
    for name in ("put_object", "delete_object"):
        handler = getattr(S3Response, name)
        monkeypatch.setattr(S3Response, name, lambda self, _h=handler: _locked(lock, _h, self))
    url = f"{bucket}/lease-{uuid.uuid4().hex[:8]}/lease.json"
    assert read_lease(url) is None  # imports and connects s3fs here, before any fork
    return url


def _locked(lock, handler, self):
    with lock:
        return handler(self)


def _contender(url, i, start_at, results, release):
    """Process ``i``: acquire at ``start_at`` (no wait); report; hold until ``release`` is set."""
    read_lease(url)  # connect first (an S3 client per process), so both start the race together
    time.sleep(max(0.0, start_at - time.time() - 0.02))
    while time.time() < start_at:
        pass
    try:
        lease = RunLease(url, owner=f"contender-{i}", job_id=f"raysubmit_{i}", ttl_s=TTL,
                         heartbeat_s=0.4).acquire()
    except LeaseHeld as e:
        results.put(("held", i, str(e), e.holder))
        return
    results.put(("won", i, os.getpid(), None))
    release.wait(30)
    results.put(("released", i, lease.release(), None))


@pytest.mark.parametrize("round_", range(3))
def test_two_processes_at_once_exactly_one_wins(lease_url, round_):
    winner, pid, message, holder = _race(lease_url, time.time() + 0.5)
    assert f"'contender-{winner}'" in message and f"pid {pid}" in message, message
    assert f"Ray job raysubmit_{winner}" in message and lease_url in message, message
    assert holder["pid"] == pid
    assert read_lease(lease_url) is None


def test_wait_mode_acquires_after_release(lease_url, capsys):
    first = RunLease(lease_url, owner="first", ttl_s=TTL, heartbeat_s=0.4).acquire()
    with pytest.raises(LeaseHeld, match="'first'"):
        RunLease(lease_url, owner="impatient", ttl_s=TTL, wait_s=0.6, poll_s=0.2).acquire()
    got = {}

    def second():
        got["lease"] = RunLease(lease_url, owner="second", ttl_s=TTL, wait_s=20, poll_s=0.1).acquire()
        got["at"] = time.monotonic()

    t = threading.Thread(target=second)
    t.start()
    time.sleep(1.0)
    assert "lease" not in got  # still waiting: the first holder is alive
    released_at = time.monotonic()
    assert first.release()
    t.join(20)
    assert got["at"] >= released_at
    assert read_lease(lease_url)[0]["owner"] == "second"
    assert "waiting: run lease" in capsys.readouterr().out
    assert got["lease"].release()


def _holder(url, results, go, hold_s, host=None):
    """Acquire, report, hold ``hold_s`` s (killed or stopped meanwhile by the test); after ``go``
    wait for the heartbeat to notice a takeover, then report lost / check() / release().
    ``host`` pretends the holder runs on another machine (its pid cannot be checked from here)."""
    lease = RunLease(url, owner="holder", ttl_s=TTL, heartbeat_s=0.4)
    if host:
        lease.record["host"] = host
    lease.acquire()
    results.put(("acquired", os.getpid()))
    go.wait(hold_s)
    deadline = time.time() + 5
    while not lease.lost and time.time() < deadline:
        time.sleep(0.05)
    try:
        lease.check()
        checked = "ok"
    except LeaseLost as e:
        checked = str(e)
    results.put(("after", lease.lost, checked, lease.release()))


def _race(url, start_at):
    """Two forked `_contender` processes acquiring at ``start_at``: (winner index, winner pid,
    loser's LeaseHeld message, loser's holder record); both have ended when it returns."""
    results, release = FORK.Queue(), FORK.Event()
    procs = [FORK.Process(target=_contender, args=(url, i, start_at, results, release)) for i in range(2)]
    for p in procs:
        p.start()
    first = [results.get(timeout=30) for _ in procs]
    won = [r for r in first if r[0] == "won"]
    held = [r for r in first if r[0] == "held"]
    assert len(won) == 1 and len(held) == 1, first
    assert read_lease(url)[0]["owner"] == f"contender-{won[0][1]}"
    release.set()
    last = results.get(timeout=30)
    for p in procs:
        p.join(30)
    assert last == ("released", won[0][1], True, None)
    return won[0][1], won[0][2], held[0][2], held[0][3]


def test_lease_of_a_sigkilled_holder_on_this_host_is_taken_over_at_once(lease_url):
    results, go = FORK.Queue(), FORK.Event()
    proc = FORK.Process(target=_holder, args=(lease_url, results, go, 60))
    proc.start()
    assert results.get(timeout=30)[0] == "acquired"
    with pytest.raises(LeaseHeld, match="'holder'"):  # alive: held
        RunLease(lease_url, owner="next", ttl_s=TTL).acquire()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    lease = RunLease(lease_url, owner="next", ttl_s=TTL).acquire()  # heartbeat fresh, pid gone
    assert read_lease(lease_url)[0]["owner"] == "next"
    assert lease.release()


def test_stale_lease_of_sigkilled_holder_is_taken_over_by_one(lease_url):
    results, go = FORK.Queue(), FORK.Event()
    proc = FORK.Process(target=_holder, args=(lease_url, results, go, 60, "another-host"))
    proc.start()
    assert results.get(timeout=30)[0] == "acquired"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    with pytest.raises(LeaseHeld, match="'holder'"):  # fresh heartbeat: not yet stale
        RunLease(lease_url, owner="next", ttl_s=TTL).acquire()
    # once stale, two contenders take it over at once: exactly one wins
    winner, pid, message, holder = _race(lease_url, time.time() + TTL + 1.2)
    assert f"'contender-{winner}'" in message and f"pid {pid}" in message, message
    assert read_lease(lease_url) is None


def test_heartbeat_keeps_a_long_holder_alive(lease_url):
    lease = RunLease(lease_url, owner="long", ttl_s=TTL, heartbeat_s=0.4).acquire()
    time.sleep(2 * TTL)
    with pytest.raises(LeaseHeld, match="'long'") as e:
        RunLease(lease_url, owner="other", ttl_s=TTL).acquire()
    assert e.value.age_s <= TTL
    assert not lease.lost and read_lease(lease_url)[0]["seq"] > 5
    assert lease.release()
    assert read_lease(lease_url) is None


def test_release_after_takeover_keeps_new_owners_lease(lease_url, capsys):
    """A frozen holder (SIGSTOP, as in a long GC pause or a suspended VM) goes stale, is taken
    over, resumes: its heartbeat finds the lease lost and its release leaves the new owner's."""
    results, go = FORK.Queue(), FORK.Event()
    proc = FORK.Process(target=_holder, args=(lease_url, results, go, 60))
    proc.start()
    assert results.get(timeout=30)[0] == "acquired"
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        new = RunLease(lease_url, owner="new", ttl_s=TTL, heartbeat_s=0.4, wait_s=15, poll_s=0.1).acquire()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert "took over stale run lease" in capsys.readouterr().out
    go.set()
    _, lost, checked, released = results.get(timeout=30)
    proc.join(10)
    assert lost and "was taken over or removed" in checked and released is False
    assert read_lease(lease_url)[0]["token"] == new.record["token"]
    assert not new.lost
    assert new.release()
    assert read_lease(lease_url) is None


def test_lease_held_pickles_with_its_message():
    """A LeaseHeld raised in a Ray task or a child process reaches the caller intact."""
    import pickle

    err = LeaseHeld("s3://b/run/lease.json", {"owner": "ray_jobs.pipeline (q)", "host": "h", "pid": 7}, 3.0, 120.0)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is LeaseHeld and str(back) == str(err) and back.holder == err.holder
