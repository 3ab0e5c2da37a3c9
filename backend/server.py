"""The backend's event loop: one thread, one epoll, every device's sockets and eventfds.

A `Endpoint` is one vhost-user device: a listening socket and the device model behind it. It
accepts one front-end `Connection` at a time. A connection parses messages with the sans-IO
codec and session, maps guest memory, and serves its rings when their kick eventfds fire.
Anything a front-end or guest does wrong ends that connection (and only it) with a log line.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from backend.blk import BlkDevice
from backend.dispatch import PerRingThreads, RingRuntime, SharedDispatcher
from backend.eventfds import FrontendBlocked, check_eventfd, drain_eventfd, signal_eventfd
from backend.memory import GuestMemory
from backend.net import NetDevice
from backend.scheduler import Qos, Scheduler
from backend.session import RingSetup, Session
from backend.vhost_user import (
    HEADER_SIZE,
    MAX_FDS_PER_MESSAGE,
    MemRegion,
    MessageReader,
    ProtocolError,
    VringAddr,
)
from backend.virtqueue import RingError, SplitQueue

log = logging.getLogger(__name__)

RECV_BYTES = 65536
MAX_PENDING_OUTPUT = 1 << 20
# A front-end's control messages are handled at most MSG_BUDGET per loop iteration; the rest
# wait in its reader (one recv's worth at most: nothing more is read until they are handled)
# for the next iteration, so a ring waits for at most that many messages of any front-end.
# Over time, handling one device's messages may take CONTROL_SHARE of the loop's time, after a
# burst of CONTROL_BURST seconds (far more than setting up a device takes); a device over its
# share is not read again until CONTROL_RESUME seconds of handling are due to it once more.
MSG_BUDGET = 8
CONTROL_SHARE = 0.03
CONTROL_BURST = 0.01
CONTROL_RESUME = 0.001
# Front-ends a device accepts (including those refused as a second front-end), as a token
# bucket: ACCEPT_BURST at once, then ACCEPT_RATE a second. QEMU reconnects within seconds;
# a front-end reconnecting in a tight loop waits in the listen backlog instead of costing
# the other devices the loop's time.
ACCEPT_RATE = 20.0
ACCEPT_BURST = 20
# A throttled device is logged at most this often (seconds).
THROTTLE_LOG_INTERVAL = 10.0
# A device whose front-end blocked the I/O thread on an eventfd accepts no front-end this long.
BLOCKED_PENALTY_S = 10.0
_PEERCRED = struct.Struct("3i")

Handler = Callable[[int], None]


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return _PEERCRED.unpack(raw)


def _open_queue(
    memory: GuestMemory, num: int, addr: VringAddr, base: int, event_idx: bool
) -> SplitQueue:
    return SplitQueue(memory, num, addr.desc_user_addr, addr.avail_user_addr,
                      addr.used_user_addr, base, event_idx=event_idx)


class TokenBucket:
    """`rate` tokens a second accumulate up to `burst`; spending may run into debt."""

    __slots__ = ("at", "burst", "clock", "rate", "tokens")

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = burst
        self.at = clock()

    def refill(self) -> float:
        """The tokens available now."""
        now = self.clock()
        tokens = self.tokens + (now - self.at) * self.rate
        self.tokens = tokens if tokens < self.burst else self.burst
        self.at = now
        return self.tokens

    def wait(self, need: float) -> float:
        """Seconds until `need` tokens are available (as of the last refill)."""
        return max(need - self.tokens, 0.0) / self.rate


@dataclass(eq=False)
class Ring:
    """A started vring: the queue over guest memory, its eventfds and its dispatch state."""

    conn: Connection
    index: int
    addr: VringAddr
    queue: SplitQueue
    kick: int
    call: int | None
    enabled: bool
    runtime: RingRuntime

    def notify(self) -> None:
        if self.call is not None:
            try:
                signal_eventfd(self.call)
            except FrontendBlocked:
                # Mid-batch: the dispatcher still holds the ring; drop the front-end next.
                self.conn.loop.defer(lambda: self.conn.blocked_loop(f"call FD of vring "
                                                                    f"{self.index}"))
                return
            self.runtime.stats.interrupts += 1


class Connection:
    """One front-end on one endpoint; implements the session's side effects."""

    def __init__(self, endpoint: Endpoint, sock: socket.socket, loop: Loop) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.loop = loop
        self.reader = MessageReader()
        self.memory: GuestMemory | None = None
        self.rings: dict[int, Ring] = {}
        self.call_fds: dict[int, int | None] = {}
        self.output = bytearray()
        self.closed = False
        # Messages wait in the reader (beyond this iteration's budget, or the device's share
        # of the loop's time): the socket is not watched for input until a deferred or timed
        # call of the loop has handled them.
        self.deferred = False
        self._resume_call = self._resume
        self.events = select.EPOLLIN
        self.device_features = endpoint.device.device_features
        self.num_queues = endpoint.device.num_queues
        # Device-specific answers to GET_QUEUE_NUM / GET_PROTOCOL_FEATURES, where they differ.
        for name in ("vhost_queue_num", "offered_protocol_features"):
            if hasattr(endpoint.device, name):
                setattr(self, name, getattr(endpoint.device, name))
        self.session = Session(self)
        sock.setblocking(False)
        loop.register(sock.fileno(), select.EPOLLIN, self.on_socket)

    # --- socket side -----------------------------------------------------------------------

    def on_socket(self, events: int) -> None:
        if events & select.EPOLLOUT:
            self._flush()
        if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and not (
                self.deferred or self.closed):
            # (While deferred, a hang-up is found by the next recv, after the resume.)
            self._receive()

    def _receive(self) -> None:
        if self.endpoint.control_time.refill() <= 0 and self.loop.rings_busy():
            self._hold_back()  # the device used up its share of the loop: read nothing now
            return
        try:
            data, fds, msg_flags, _addr = socket.recv_fds(
                self.sock, RECV_BYTES, MAX_FDS_PER_MESSAGE, socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            return
        except OSError as exc:
            self.close(f"receive failed: {exc}")
            return
        if msg_flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            self.close("front-end sent more FDs than any message carries")
            return
        if not data:
            for fd in fds:
                os.close(fd)
            self.close("front-end disconnected", level=logging.INFO)
            return
        try:
            self.reader.feed(data, fds)
        except ProtocolError as exc:
            self.close(f"protocol error: {exc}")
            return
        self._work()

    def _resume(self) -> None:
        """The loop's deferred or timed call: go on with the buffered messages."""
        if self.closed:
            return
        if self.endpoint.control_time.refill() <= 0 and self.loop.rings_busy():
            self._hold_back()
            return
        self._work()

    def _work(self) -> None:
        """Handle a budget of messages, charge their time to the device while rings wait for
        the loop, and arrange for the rest: next iteration, once the device is due more time,
        or when more bytes arrive."""
        bucket = self.endpoint.control_time
        start = bucket.clock()
        more = self._handle_messages()
        if self.loop.rings_busy():
            bucket.tokens -= bucket.clock() - start
        if self.closed:
            return
        if not more:
            if self.deferred:
                self.deferred = False
                self._watch()  # every buffered message handled: read the socket again
            return
        if not self.deferred:
            self.deferred = True
            self._watch()  # no more input until the buffered messages are handled
        if bucket.tokens > 0 or not self.loop.rings_busy():
            self.loop.defer(self._resume_call)
        else:
            self._hold_back()

    def _hold_back(self) -> None:
        """Stop reading until the device is due CONTROL_RESUME seconds of handling again."""
        if not self.deferred:
            self.deferred = True
            self._watch()
        bucket = self.endpoint.control_time
        self.loop.call_later(bucket.wait(CONTROL_RESUME), self._resume_call)
        self.endpoint.throttled("messages")

    def _handle_messages(self) -> bool:
        """Handle up to MSG_BUDGET buffered messages; True if more may wait in the reader."""
        budget = MSG_BUDGET
        reader = self.reader
        try:
            while not self.closed and (msg := reader.next_message()) is not None:
                reply, failure = self.session.handle(msg)
                if failure:
                    log.warning("%s: refused %s: %s", self.endpoint.name, msg.request_name(),
                                failure)
                if reply:
                    self._send(reply)
                budget -= 1
                if not budget:
                    return not self.closed and len(reader.buffer) >= HEADER_SIZE
        except (ProtocolError, RingError) as exc:
            self.close(f"protocol error: {exc}")
        except Exception:
            # A bug reached by front-end input must cost this connection only, not the process.
            log.exception("%s: internal error while handling the front-end", self.endpoint.name)
            self.close("internal error")
        return False

    def _watch(self) -> None:
        """Watch for input unless messages are deferred, and for output while replies wait.

        epoll reports a hang-up whatever a socket is watched for; while deferred the socket is
        edge-triggered, so a hang-up is reported once instead of on every iteration until the
        resume (the resume's recv finds it). _flush writes until EAGAIN, as edges need."""
        events = (select.EPOLLET if self.deferred else select.EPOLLIN) | (
            select.EPOLLOUT if self.output else 0)
        if events != self.events:
            self.events = events
            self.loop.modify(self.sock.fileno(), events)

    def _send(self, data: bytes) -> None:
        if self.output:  # replies are waiting for the socket to drain (EPOLLOUT is watched)
            self.output += data
            if len(self.output) > MAX_PENDING_OUTPUT:
                self.close("front-end does not read its replies")
            return
        self.output += data
        self._flush()

    def _flush(self) -> None:
        try:
            while self.output:
                sent = self.sock.send(self.output)
                del self.output[:sent]
        except BlockingIOError:
            pass
        except OSError as exc:
            self.close(f"send failed: {exc}")
            return
        if len(self.output) > MAX_PENDING_OUTPUT:
            self.close("front-end does not read its replies")
            return
        self._watch()

    # --- SessionHost -------------------------------------------------------------------------

    def read_config(self, offset: int, size: int) -> bytes:
        return self.endpoint.device.config().ljust(offset + size, b"\0")[offset : offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        raise ValueError("the device's config space is read-only")

    def set_features(self, features: int) -> None:
        hook = getattr(self.endpoint.device, "set_features", None)
        if hook is not None:
            hook(features)

    def _open_queue(self, index: int, memory: GuestMemory, num: int, addr: VringAddr,
                    base: int, event_idx: bool) -> SplitQueue:
        hook = getattr(self.endpoint.device, "open_queue", None)
        if hook is None:
            return _open_queue(memory, num, addr, base, event_idx)
        return hook(index, memory, num, addr, base, event_idx)

    def set_memory(self, regions: tuple[MemRegion, ...], fds: tuple[int, ...]) -> None:
        try:
            memory = GuestMemory(regions, fds, require_seal=self.endpoint.require_sealed_memory)
        finally:
            for fd in fds:
                os.close(fd)
        # Running rings move to the new table (QEMU resends it on memory hotplug): all of them
        # or, if one cannot, none, and the table in force stays the old one.
        moved: dict[int, SplitQueue] = {}
        try:
            for index, ring in self.rings.items():
                queue = ring.queue
                moved[index] = self._open_queue(index, memory, queue.size, ring.addr,
                                                queue.last_avail, queue.event_idx)
        except RingError as exc:
            for queue in moved.values():
                queue.release()
            memory.close()
            raise ValueError(f"new memory table does not hold vring {index}: {exc}") from None
        dispatcher = self.loop.dispatcher
        for index, queue in moved.items():
            ring = self.rings[index]
            dispatcher.detach(ring)  # a per-ring thread must let go of the old queue first
            ring.queue.release()
            ring.queue = queue
            if ring.enabled:
                dispatcher.attach(ring)
        if self.memory is not None:
            self.memory.close()
        self.memory = memory

    def start_ring(self, index: int, setup: RingSetup, event_idx: bool) -> None:
        if self.memory is None or setup.addr is None or setup.kick is None:
            raise ValueError("ring has no memory, address or kick FD")
        queue = self._open_queue(index, self.memory, setup.num, setup.addr, setup.base,
                                 event_idx)
        runtime = self.endpoint.runtime(index)
        ring = Ring(self, index, setup.addr, queue, setup.kick, self.call_fds.get(index),
                    setup.enabled, runtime)
        if self.loop.shared:
            try:
                self.loop.register(setup.kick, select.EPOLLIN,
                                   lambda ev: self.on_kick(ring, ev))
            except OSError as exc:
                queue.release()
                raise ValueError(f"kick FD cannot be polled: {exc}") from None
        started = getattr(self.endpoint.device, "ring_started", None)
        if started is not None:
            try:
                started(ring)  # e.g. virtio-net polls its tap while the RX ring runs
            except ValueError:
                self.loop.unregister(setup.kick)
                queue.release()
                raise
        self.rings[index] = ring
        log.debug("%s: vring %d started (size %d, base %d)", self.endpoint.name, index,
                  setup.num, setup.base)
        if ring.enabled:
            self.loop.dispatcher.attach(ring)

    def stop_ring(self, index: int) -> int:
        ring = self.rings.pop(index)
        self.loop.dispatcher.detach(ring)
        stopped = getattr(self.endpoint.device, "ring_stopped", None)
        if stopped is not None:
            stopped(ring)
        self.loop.unregister(ring.kick)
        last_avail = ring.queue.last_avail
        ring.queue.release()
        return last_avail

    def ring_enabled(self, index: int, enabled: bool) -> None:
        ring = self.rings.get(index)
        if ring is not None:
            ring.enabled = enabled
            if enabled:
                self.loop.dispatcher.attach(ring)
            else:
                self.loop.dispatcher.detach(ring)
            changed = getattr(self.endpoint.device, "ring_enabled_changed", None)
            if changed is not None:
                changed(ring)  # e.g. virtio-net detaches the tap queue of a pair not in use

    def accept_eventfd(self, fd: int) -> None:
        check_eventfd(fd)

    def call_fd_changed(self, index: int, fd: int | None) -> None:
        self.call_fds[index] = fd
        ring = self.rings.get(index)
        if ring is not None:
            ring.call = fd

    def close_fd(self, fd: int) -> None:
        os.close(fd)


    # --- data path -------------------------------------------------------------------------

    def on_kick(self, ring: Ring, events: int) -> None:
        if events & (select.EPOLLHUP | select.EPOLLERR):
            # Level-triggered: a hung-up FD would fire forever. Eventfds never hang up.
            self.fail_ring(ring, "kick FD hung up")
            return
        try:
            drain_eventfd(ring.kick)
        except FrontendBlocked:
            self.blocked_loop(f"kick FD of vring {ring.index}")
            return
        self.loop.dispatcher.kicked(ring)

    def fail_ring(self, ring: Ring, reason: str) -> None:
        """The guest broke this ring's structure: stop the device, tell the front-end."""
        if self.rings.get(ring.index) is not ring:
            return  # already stopped (a per-ring thread's report can arrive late)
        err = self.session.rings[ring.index].err
        if err is not None:
            with contextlib.suppress(FrontendBlocked):  # it is being dropped anyway
                signal_eventfd(err)
        self.close(f"vring {ring.index} broken: {reason}")

    def blocked_loop(self, what: str) -> None:
        """The front-end made a syscall on its eventfd block the I/O thread (it cleared
        O_NONBLOCK on the FD it shares with us): drop it, and keep its device from taking a
        new front-end for a while, so it cannot do it again at once."""
        if self.closed:
            return
        self.close(f"the front-end made the backend block on its {what}; dropped, and the "
                   f"device takes no front-end for {BLOCKED_PENALTY_S:g} s",
                   level=logging.ERROR)
        self.endpoint.hold_off(BLOCKED_PENALTY_S)

    # --- teardown --------------------------------------------------------------------------

    def close(self, reason: str, *, level: int = logging.WARNING) -> None:
        if self.closed:
            return
        self.closed = True
        log.log(level, "%s: connection closed: %s", self.endpoint.name, reason)
        try:
            self.session.close()
        finally:
            self.loop.unregister(self.sock.fileno())
            self.sock.close()
            for fd in self.reader.take_fds():
                os.close(fd)
            if self.memory is not None:
                self.memory.close()
                self.memory = None
            self.endpoint.connection_closed(self)


@dataclass(eq=False)
class Endpoint:
    """A vhost-user device listening on a socket; one front-end at a time."""

    name: str
    listener: socket.socket
    device: BlkDevice | NetDevice
    loop: Loop
    require_sealed_memory: bool = True
    vm: str = ""  # whose QoS applies; several devices of one VM share it (default: name)
    qos: Qos = field(default_factory=Qos)
    connection: Connection | None = None
    connections_served: int = 0
    # Per virtqueue index, kept across reconnects so statistics add up over the device's life.
    runtimes: dict[int, RingRuntime] = field(default_factory=dict)
    accept_rate: float = ACCEPT_RATE  # front-ends accepted a second, after a burst of
    accept_burst: int = ACCEPT_BURST
    accepted: int = 0  # sockets accepted, refused second front-ends included
    accept_paused: bool = False  # the listener is not watched until a token returns
    held_until: float = 0.0  # nor before this (loop clock), after its front-end blocked us

    def __post_init__(self) -> None:
        self.vm = self.vm or self.name
        self.listener.setblocking(False)
        clock = self.loop.clock
        self.accepts = TokenBucket(self.accept_rate, self.accept_burst, clock)
        # Seconds of the loop's time this device's front-ends may spend on control messages.
        self.control_time = TokenBucket(CONTROL_SHARE, CONTROL_BURST, clock)
        # kind -> (throttled occasions not yet logged, when the next log line may be written)
        self._throttle_log: dict[str, tuple[int, float]] = {}
        self.loop.dispatcher.add_vm(self.vm, self.qos)
        self.loop.register(self.listener.fileno(), select.EPOLLIN, self.on_accept)

    def _pause_accepting(self) -> None:
        """Stop watching the listener until the bucket holds a token again; front-ends
        connecting meanwhile wait in the listen backlog."""
        self.hold_off(self.accepts.wait(1.0))
        self.throttled("accepts")

    def hold_off(self, seconds: float) -> None:
        """Accept no front-end for `seconds` (they wait in the listen backlog)."""
        if self.listener.fileno() < 0:
            return
        self.accept_paused = True
        self.held_until = self.loop.clock() + seconds
        self.loop.modify(self.listener.fileno(), 0)
        self.loop.call_later(seconds, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self.loop.clock() < self.held_until:
            return  # an earlier, shorter hold-off's timer: the latest one's timer resumes
        if self.accept_paused and self.listener.fileno() >= 0:
            self.accept_paused = False
            self.loop.modify(self.listener.fileno(), select.EPOLLIN)

    def throttled(self, kind: str) -> None:
        """Log that this device's front-end is being throttled: at most once per
        THROTTLE_LOG_INTERVAL for each kind, counting the occasions in between."""
        now = self.loop.clock()
        count, next_at = self._throttle_log.get(kind, (0, 0.0))
        count += 1
        if now >= next_at:
            if kind == "accepts":
                what = (f"front-ends connect faster than {self.accept_rate:g} a second; "
                        "further ones wait in the listen backlog")
            else:
                what = ("its front-end's control messages took more than "
                        f"{CONTROL_SHARE:.0%} of the I/O thread; the rest wait")
            log.warning("%s: throttled: %s (%d time%s since the last report)", self.name, what,
                        count, "" if count == 1 else "s")
            count = 0
            next_at = now + THROTTLE_LOG_INTERVAL
        self._throttle_log[kind] = (count, next_at)

    def on_accept(self, _events: int) -> None:
        if self.accept_paused:
            return
        if self.accepts.refill() < 1.0:
            self._pause_accepting()
            return
        try:
            sock, _addr = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.error("%s: accept failed: %s", self.name, exc)
            return
        self.accepts.tokens -= 1.0
        self.accepted += 1
        pid, uid, gid = peer_credentials(sock)
        if self.connection is not None:
            log.warning("%s: refused a second front-end (pid %d uid %d): device already in use",
                        self.name, pid, uid)
            sock.close()
            return
        self.connections_served += 1
        log.info("%s: front-end connected (pid %d uid %d gid %d)", self.name, pid, uid, gid)
        self.connection = Connection(self, sock, self.loop)

    def connection_closed(self, conn: Connection) -> None:
        if self.connection is conn:
            self.connection = None

    def runtime(self, index: int) -> RingRuntime:
        """The dispatch state and statistics of virtqueue `index`, new or carried over."""
        runtime = self.runtimes.get(index)
        if runtime is None:
            runtime = self.runtimes[index] = RingRuntime()
        else:
            runtime.restart()
        return runtime

    def requests_served(self) -> int:
        return sum(r.stats.requests for r in self.runtimes.values())

    def snapshot(self) -> dict[str, object]:
        """Counters and latency percentiles per virtqueue, plus time throttled."""
        return {
            "queues": {str(i): r.stats.snapshot() for i, r in sorted(self.runtimes.items())},
            "throttled_ms": self.loop.dispatcher.throttled_ns(self.vm) // 1_000_000,
        }

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close("backend shutting down", level=logging.INFO)
        self.loop.unregister(self.listener.fileno())
        self.listener.close()
        self.loop.dispatcher.remove_vm(self.vm)


class Loop:
    """epoll plus the dispatcher that decides which ring is served (see backend.dispatch)."""

    def __init__(self, model: str = "shared", scheduler: Scheduler | None = None) -> None:
        self.epoll = select.epoll()
        self.handlers: dict[int, Handler] = {}
        self.clock: Callable[[], float] = time.monotonic
        # Work put off to the next iteration (a connection's messages beyond its budget): the
        # loop does not sleep in epoll while there is some.
        self.deferred: list[Callable[[], None]] = []
        # (when, sequence, callback): a heap of calls the loop makes once their time comes.
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self.stopping = False
        self.signal_pair: tuple[socket.socket, ...] = ()
        self.shared = model == "shared"
        self.dispatcher: SharedDispatcher | PerRingThreads
        if self.shared:
            self.dispatcher = SharedDispatcher(scheduler)
        elif model == "per-device":
            # Broken rings found by the ring threads are failed here, on the loop's thread.
            self._broken: list[tuple[Ring, str]] = []
            self._broken_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.register(self._broken_efd, select.EPOLLIN, self._fail_reported)
            self.dispatcher = PerRingThreads(self._report_broken)
        else:
            raise ValueError(f"unknown model {model!r}: use shared or per-device")

    def register(self, fd: int, events: int, handler: Handler) -> None:
        self.epoll.register(fd, events)
        self.handlers[fd] = handler

    def modify(self, fd: int, events: int) -> None:
        self.epoll.modify(fd, events)

    def unregister(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self.epoll.unregister(fd)

    def rings_busy(self) -> bool:
        """Whether rings are being polled: work that the loop does besides serving them is
        then taken from them (the shared model only; ring threads have their own time)."""
        return self.dispatcher.busy()

    def defer(self, callback: Callable[[], None]) -> None:
        """Call `callback` in the next iteration, which will not sleep in epoll."""
        self.deferred.append(callback)

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        """Call `callback` in the first iteration at least `delay` seconds from now."""
        heapq.heappush(self.timers, (self.clock() + delay, next(self._timer_seq), callback))

    def run_once(self, timeout: float = -1) -> None:
        wait = self.dispatcher.timeout()
        if timeout >= 0 and (wait < 0 or timeout < wait):
            wait = timeout
        deferred: list[Callable[[], None]] | None = self.deferred
        if deferred:
            self.deferred = []  # what is deferred during this iteration waits for the next
            wait = 0
        else:
            deferred = None
            if self.timers and wait != 0:
                due = max(self.timers[0][0] - self.clock(), 0.0)
                if wait < 0 or due < wait:
                    wait = due
        events = self.epoll.poll(wait)
        handlers = self.handlers
        for fd, mask in events:
            handler = handlers.get(fd)
            if handler is not None:
                try:
                    handler(mask)
                except Exception:
                    # Last line of defence: a bug must not take down every VM's device.
                    log.exception("internal error handling FD %d; dropping it", fd)
                    self.unregister(fd)
        if self.timers:
            self._run_timers()
        if deferred is not None:
            for callback in deferred:
                self._call(callback)
        self.dispatcher.run()

    def _run_timers(self) -> None:
        timers = self.timers
        now = self.clock()
        while timers and timers[0][0] <= now:
            self._call(heapq.heappop(timers)[2])

    def _call(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            log.exception("internal error in %r", callback)

    def _report_broken(self, ring: Ring, reason: str) -> None:
        self._broken.append((ring, reason))
        os.eventfd_write(self._broken_efd, 1)

    def _fail_reported(self, _events: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._broken_efd)
        while self._broken:
            ring, reason = self._broken.pop()
            ring.conn.fail_ring(ring, reason)

    def run(self) -> None:
        while not self.stopping:
            self.run_once()

    def stop_on_signals(self, signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """Wake the loop and end `run()` when one of these signals arrives."""
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        self.signal_pair = (reader, writer)
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)

        def on_wakeup(_events: int) -> None:
            with contextlib.suppress(BlockingIOError):
                reader.recv(64)

        def on_signal(signum: int, _frame: object) -> None:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            self.stopping = True

        for signum in signums:
            signal.signal(signum, on_signal)
        self.register(reader.fileno(), select.EPOLLIN, on_wakeup)

    def signal_fds(self) -> list[int]:
        """The wakeup socketpair's FDs (a confined process must keep them open)."""
        return [s.fileno() for s in self.signal_pair]
