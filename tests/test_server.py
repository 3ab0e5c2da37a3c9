"""The event loop's defences against one front-end hogging the shared I/O thread.

In process: a `Loop` with two blk endpoints, driven from the test (`run_once`) once the
front-ends are set up, so the order of events is the test's, not the scheduler's. A front-end
flooding control messages gets MSG_BUDGET of them handled per loop iteration and, while rings
are busy, its device's share of the loop's time; a device's accepts are a token bucket.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backend import eventfds, server
from backend.blk import BlkDevice
from backend.server import MSG_BUDGET, Endpoint, Loop, TokenBucket
from tests.frontend import (
    BLK_REQ_HEADER,
    S_OK,
    T_IN,
    VERSION,
    BlkFrontend,
    Req,
    VhostUserConnection,
)

IMAGE_SIZE = 1 << 20
FLOOD = 10_000
REPLY = 20  # a u64 reply: header and 8 bytes


@dataclass
class Pair:
    loop: Loop
    a: Endpoint
    b: Endpoint
    a_sock: str
    b_sock: str


def _endpoint(loop: Loop, path: Path, **kwargs: object) -> tuple[Endpoint, int]:
    image = path.with_suffix(".img")
    image.write_bytes(bytes(IMAGE_SIZE))
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    listener.bind(str(path))
    listener.listen(16)
    return Endpoint(str(path), listener, BlkDevice(fd, readonly=False), loop, **kwargs), fd


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    loop = Loop()
    a, a_fd = _endpoint(loop, tmp_path / "a.sock")
    b, b_fd = _endpoint(loop, tmp_path / "b.sock")
    try:
        yield Pair(loop, a, b, a.name, b.name)
    finally:
        a.close()
        b.close()
        os.close(a_fd)
        os.close(b_fd)
        loop.epoll.close()


@contextlib.contextmanager
def loop_running(loop: Loop) -> Iterator[None]:
    """Run the loop in a thread (front-end set-up waits for replies), then hand it back."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            loop.run_once(0.01)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        assert not thread.is_alive()


def run_until(loop: Loop, done: object, timeout: float = 20.0, step: float = 1.0) -> int:
    """Iterate the loop until `done()`; return the iterations it took."""
    deadline = time.monotonic() + timeout
    turns = 0
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, "the loop did not get there"
        loop.run_once(step)
        turns += 1
    return turns


def post_read(dev: BlkFrontend) -> tuple[int, int]:
    """Put a 4 KiB read on ring 0 and kick, without waiting; return (status GPA, data GPA)."""
    q = dev.queues[0]
    hdr = dev.mem.alloc(16, 64)
    status = dev.mem.alloc(1, 64)
    data = dev.mem.alloc(4096, 4096)
    dev.mem.write(hdr, BLK_REQ_HEADER.pack(T_IN, 0, 0))
    dev.mem.write(status, b"\xff")
    q.post([(hdr, 16, False), (data, 4096, True), (status, 1, True)])
    q.kick(force=True)
    return status, data


class Flooder:
    """A front-end writing `count` copies of one message as fast as its socket takes them."""

    def __init__(self, path: str, request: int, count: int) -> None:
        self.conn = VhostUserConnection.connect(path)
        self.sock = self.conn.sock
        self.sock.setblocking(False)
        self.data = memoryview(struct.pack("<III", request, VERSION, 0) * count)
        self.sent = 0
        self.received = 0

    def pump(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self.sent < len(self.data):
                self.sent += self.sock.send(self.data[self.sent:])
        with contextlib.suppress(BlockingIOError):
            while chunk := self.sock.recv(1 << 20):
                self.received += len(chunk)

    def close(self) -> None:
        self.conn.close()


def throttle_lines(caplog: pytest.LogCaptureFixture, sock: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if "throttled" in r.getMessage() and r.getMessage().startswith(sock)]


# ------------------------------------------------------------------------------ the budget


def test_message_flood_does_not_hold_up_another_devices_ring(pair: Pair) -> None:
    with loop_running(pair.loop):
        b = BlkFrontend.open(pair.b_sock)
        flood = Flooder(pair.a_sock, Req.GET_FEATURES, FLOOD)
        run_until(pair.loop, lambda: pair.a.connection is not None, step=0.01)
    session = pair.a.connection.session  # type: ignore[union-attr]
    handled = [0]
    handle = session.handle

    def counting(msg: object) -> tuple[bytes, str | None]:
        handled[0] += 1
        return handle(msg)  # type: ignore[arg-type]

    session.handle = counting  # type: ignore[method-assign]
    try:
        flood.pump()  # A's messages are in the backend's socket before B's request
        status, _data = post_read(b)
        q = b.queues[0]
        turns = 0
        while q.used_idx == 0:
            assert turns < 3, "B's request waited for A's messages"
            pair.loop.run_once(1.0)
            turns += 1
            flood.pump()
        assert b.mem.read(status, 1)[0] == S_OK
        # B was served within `turns` iterations, and A had that many budgets handled at most:
        # a few dozen of its 10,000 messages, not the 5,461 of the backend's first recv.
        assert handled[0] <= turns * MSG_BUDGET
        assert handled[0] < 100
        # The rest of the flood is handled without new input: deferred work keeps the loop
        # from sleeping in epoll (a sleep would cost the 1 s step per iteration).
        start = time.monotonic()
        run_until(pair.loop, lambda: (flood.pump(), flood.received == FLOOD * REPLY)[1])
        assert time.monotonic() - start < 15
        assert pair.a.connection is not None and not pair.a.connection.closed
        with loop_running(pair.loop):
            assert b.read(0, 4096)[0] == S_OK
    finally:
        b.close()
        flood.close()


def test_front_end_hanging_up_mid_flood_is_closed_cleanly(
        pair: Pair, caplog: pytest.LogCaptureFixture) -> None:
    with loop_running(pair.loop):
        flood = Flooder(pair.a_sock, Req.SET_OWNER, FLOOD)
        run_until(pair.loop, lambda: pair.a.connection is not None, step=0.01)
    conn = pair.a.connection
    flood.pump()
    pair.loop.run_once(1.0)
    assert conn is not None and conn.deferred  # messages wait in its reader
    flood.close()
    run_until(pair.loop, lambda: pair.a.connection is None)
    assert conn.closed
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]


def test_device_over_its_share_waits_while_rings_are_busy(
        pair: Pair, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    with loop_running(pair.loop):
        conn = VhostUserConnection.connect(pair.a_sock)
        assert conn.get_features()  # accepted and served while it has its share
    try:
        monkeypatch.setattr(pair.loop, "rings_busy", lambda: True)
        bucket = pair.a.control_time
        bucket.refill()
        bucket.tokens = -0.001  # a flood used more than its share
        wait = bucket.wait(server.CONTROL_RESUME)
        for _ in range(3):
            conn.send_raw(Req.GET_FEATURES)
        start = time.monotonic()
        for _ in range(5):
            pair.loop.run_once(0)
        assert not _readable(conn.sock), "A's messages were handled over its share"
        turns = run_until(pair.loop, lambda: _readable(conn.sock), timeout=10)
        assert time.monotonic() - start >= wait * 0.9
        assert turns <= 5, "the loop spun instead of waiting for the device's time"
        for _ in range(3):
            assert conn.recv_reply(Req.GET_FEATURES)
        lines = throttle_lines(caplog, pair.a_sock)
        assert len(lines) == 1 and "control messages" in lines[0], lines
        # Still over: held back again, and not logged again within the interval.
        bucket.tokens = -0.001
        conn.send_raw(Req.GET_FEATURES)
        run_until(pair.loop, lambda: _readable(conn.sock), timeout=10)
        assert len(throttle_lines(caplog, pair.a_sock)) == 1
    finally:
        conn.close()
        monkeypatch.undo()
        with loop_running(pair.loop):
            run_until(pair.loop, lambda: pair.a.connection is None, step=0.01)


def test_hang_up_while_held_back_does_not_spin_the_loop(
        pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """epoll reports a hang-up even for a socket watched for nothing; the held-back connection
    must hear of it once, not on every iteration until its resume timer."""
    with loop_running(pair.loop):
        conn = VhostUserConnection.connect(pair.a_sock)
        assert conn.get_features()
    monkeypatch.setattr(pair.loop, "rings_busy", lambda: True)
    bucket = pair.a.control_time
    bucket.refill()
    bucket.tokens = -0.05  # held back for about 50 ms
    conn.send_raw(Req.GET_FEATURES)
    pair.loop.run_once(0.1)
    held = pair.a.connection
    assert held is not None and held.deferred
    conn.close()
    try:
        turns = run_until(pair.loop, lambda: pair.a.connection is None, timeout=10)
        assert held.closed
        assert turns <= 10, f"the loop spun {turns} times on a hang-up it could not act on"
    finally:
        monkeypatch.undo()


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


# ------------------------------------------------------------------------------- accepts


def test_accept_beyond_the_burst_waits_for_a_token(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    loop = Loop()
    ep, fd = _endpoint(loop, tmp_path / "a.sock", accept_rate=20.0, accept_burst=3)
    clients = []
    try:
        for _ in range(4):  # connect() completes in the listen backlog
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            c.connect(ep.name)
            clients.append(c)
        for _ in range(10):
            loop.run_once(0)
        assert ep.accepted == 3  # the first as the front-end, two refused as second ones
        assert ep.accept_paused
        third = time.monotonic()
        turns = run_until(loop, lambda: ep.accepted == 4, timeout=10)
        assert time.monotonic() - third >= 0.5 / 20  # waited for the bucket to refill
        assert turns <= 5, "the loop spun instead of waiting for the token"
        assert not ep.accept_paused
        lines = throttle_lines(caplog, ep.name)
        assert len(lines) == 1 and "front-ends connect faster than 20 a second" in lines[0]
    finally:
        for c in clients:
            c.close()
        ep.close()
        os.close(fd)
        loop.epoll.close()


def test_accepts_within_the_burst_are_not_delayed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    loop = Loop()
    ep, fd = _endpoint(loop, tmp_path / "a.sock", accept_rate=20.0, accept_burst=3)
    try:
        for _ in range(3):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            c.connect(ep.name)
            run_until(loop, lambda: ep.connection is not None, timeout=5, step=0.5)
            c.close()
            run_until(loop, lambda: ep.connection is None, timeout=5, step=0.5)
        assert ep.accepted == 3 and not ep.accept_paused
        assert not throttle_lines(caplog, ep.name)
    finally:
        ep.close()
        os.close(fd)
        loop.epoll.close()


def test_token_bucket_refills_up_to_its_burst_and_tells_the_wait() -> None:
    now = [100.0]
    bucket = TokenBucket(rate=10.0, burst=2.0, clock=lambda: now[0])
    assert bucket.refill() == 2.0
    bucket.tokens -= 2.5  # spending may run into debt
    assert bucket.wait(1.0) == pytest.approx(0.15)
    now[0] += 0.1
    assert bucket.refill() == pytest.approx(0.5)
    now[0] += 60
    assert bucket.refill() == 2.0  # never more than the burst
    assert bucket.wait(1.0) == 0.0


def test_loop_runs_timers_when_due_and_deferred_calls_next_iteration() -> None:
    loop = Loop()
    calls: list[str] = []
    try:
        loop.call_later(0.05, lambda: calls.append("timer"))

        def deferred() -> None:
            calls.append("deferred")
            loop.defer(lambda: calls.append("again"))  # the next iteration, not this one

        loop.defer(deferred)
        start = time.monotonic()
        loop.run_once(5)
        assert calls == ["deferred"]
        assert time.monotonic() - start < 0.04  # deferred work: no sleep in epoll
        loop.run_once(5)
        assert calls == ["deferred", "again"]
        loop.run_once(5)  # sleeps until the timer, not the 5 s
        assert calls == ["deferred", "again", "timer"]
        assert 0.045 <= time.monotonic() - start < 4
    finally:
        loop.epoll.close()


@pytest.fixture(autouse=True)
def _warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="backend.server")


# ---------------------------------------------------------------- eventfds the front-end blocks


@pytest.fixture
def guard() -> Iterator[None]:
    try:
        with eventfds.eventfd_guard(0.02):
            yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def _make_blocking(fd: int) -> None:
    """What a hostile front-end can do to the eventfd it shares with the backend."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)


@pytest.mark.parametrize("syscall", ["write", "read"])
def test_guard_interrupts_a_syscall_the_front_end_made_block(
        guard: None, monkeypatch: pytest.MonkeyPatch, syscall: str) -> None:
    """A write blocks on a full counter (the front-end filled it after our select() said
    writable: the race that check leaves); a read blocks on an empty one (the front-end read it
    between epoll and us). Both FDs are blocking, as the front-end can make them."""
    fd = os.eventfd(0)
    try:
        if syscall == "write":
            os.eventfd_write(fd, 0xFFFF_FFFF_FFFF_FFFE)
            monkeypatch.setattr(eventfds.select, "select", lambda r, w, x, t: ([], w, []))
        start = time.monotonic()
        with pytest.raises(eventfds.FrontendBlocked):
            (eventfds.signal_eventfd if syscall == "write" else eventfds.drain_eventfd)(fd)
        assert time.monotonic() - start < 0.5
    finally:
        os.close(fd)


def test_guard_leaves_quick_eventfd_syscalls_alone(guard: None) -> None:
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        deadline = time.monotonic() + 0.2  # ten alarms
        count = 0
        while time.monotonic() < deadline:
            eventfds.signal_eventfd(fd)
            eventfds.drain_eventfd(fd)
            count += 1
        assert count > 1000
    finally:
        os.close(fd)


def test_front_end_blocking_its_call_fd_is_dropped_and_held_off_while_others_go_on(
        pair: Pair, guard: None, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    with loop_running(pair.loop):
        a = BlkFrontend.open(pair.a_sock)
        b = BlkFrontend.open(pair.b_sock)
        assert a.read(0, 4096)[0] == S_OK
    conn = pair.a.connection
    try:
        callfd = a.queues[0].callfd
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(callfd)  # the read's interrupt, if the front-end left it there
        os.eventfd_write(callfd, 0xFFFF_FFFF_FFFF_FFFE)  # full: the next +1 would block...
        _make_blocking(callfd)  # ...as the front-end lets it
        monkeypatch.setattr(eventfds.select, "select", lambda r, w, x, t: ([], w, []))
        post_read(a)
        start = time.monotonic()
        run_until(pair.loop, lambda: pair.a.connection is None, timeout=5, step=0.01)
        assert time.monotonic() - start < 1.0, "the loop stayed blocked"
        assert conn is not None and conn.closed
        assert any("made the backend block on its call FD of vring 0" in r.getMessage()
                   for r in caplog.records)
        monkeypatch.undo()
        with loop_running(pair.loop):
            assert b.read(0, 4096)[0] == S_OK  # the other device is served on
            # The blocked device takes no new front-end for a while: it waits in the backlog.
            late = VhostUserConnection.connect(pair.a_sock)
            time.sleep(0.2)  # long enough for an accept that should not happen
            assert pair.a.connection is None
            late.close()
    finally:
        a.close()
        b.close()
