"""Fuzz one vhost-user connection: MessageReader + Session (backend/vhost_user.py, session.py).

The input is what arrives on the socket, one recvmsg at a time:

    chunk  <BH + data: control byte, data length, data
           control bits 0-3: how many FDs came with the chunk (fake FD numbers)
                   bit 4:    those FDs are not eventfds (the host refuses them as kick/call/err)
                   bit 5:    those FDs cannot be mapped (the host refuses them as memory)
    a chunk with no data is the front-end hanging up (as recvmsg returning b"").

A fake SessionHost stands in for backend.server.Connection and checks the session's side of
the contract: it validates rings against the memory table like SplitQueue does and refuses a
table that would strand a running ring, like Connection.set_memory. Invariants:
  * ProtocolError is the only exception, and it ends the connection;
  * every FD handed in is closed exactly once, or kept by the session (kick/call/err) until the
    connection ends; none is closed twice, none leaks, a running ring's kick FD is never closed;
  * the host's idea of each ring (running or not, its call FD) always matches the session's;
  * every reply is a well-formed reply header for the request it answers; a NEED_REPLY ack is 0
    exactly when the request succeeded;
  * a refused request leaves the session as it was (SET_VRING_KICK excepted: it stops the ring
    and takes the new kick FD before it can know whether the ring will start).

Seeds include whole sessions recorded from QEMU (fuzz/record_traffic.py).

    python -m fuzz vhost_user --seconds 60
"""

from __future__ import annotations

import copy
import itertools
import struct
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz._harness import Reader, instrumented, require, time_limit

with instrumented(__name__, "backend"):
    from backend.session import ANSWERED_REQUESTS, Session
    from backend.vhost_user import (
        FLAG_REPLY,
        HEADER,
        HEADER_SIZE,
        MAX_PAYLOAD,
        VERSION,
        MessageReader,
        ProtocolError,
        Request,
    )
    from backend.virtqueue import ring_sizes

CHUNK = struct.Struct("<BH")
NFDS_MASK = 0x0F
NOT_EVENTFD = 0x10
NOT_MAPPABLE = 0x20
FAKE_FD_SIZE = 1 << 30  # every fake memory FD is a sealed 1 GiB memfd
FIRST_FD = 1000
# What BlkDevice offers (VERSION_1, INDIRECT_DESC, EVENT_IDX, SEG_MAX, BLK_SIZE, FLUSH,
# TOPOLOGY, MQ, DISCARD, WRITE_ZEROES).
DEVICE_FEATURES = (1 << 32) | (1 << 28) | (1 << 29) | (1 << 2) | (1 << 6) | (1 << 9) \
    | (1 << 10) | (1 << 12) | (1 << 13) | (1 << 14)
CONFIG = bytes(range(60))


class FakeHost:
    """A SessionHost that keeps the books on FDs and rings, refusing what the server refuses."""

    device_features = DEVICE_FEATURES
    num_queues = 2

    def __init__(self) -> None:
        self.next_fd = FIRST_FD
        self.open: set[int] = set()  # handed to the session, not yet closed
        self.not_eventfd: set[int] = set()
        self.not_mappable: set[int] = set()
        self.regions: tuple = ()
        self.started: dict[int, tuple[int, int, object, bool]] = {}  # index -> kick, num, addr
        self.calls: dict[int, int | None] = {}

    def new_fds(self, count: int, control: int) -> list[int]:
        fds = list(range(self.next_fd, self.next_fd + count))
        self.next_fd += count
        self.open.update(fds)
        if control & NOT_EVENTFD:
            self.not_eventfd.update(fds)
        if control & NOT_MAPPABLE:
            self.not_mappable.update(fds)
        return fds

    # --- SessionHost ---------------------------------------------------------------------------

    def read_config(self, offset: int, size: int) -> bytes:
        require(offset >= 0 and size > 0 and offset + size <= 256,
                f"config read at {offset}+{size} reached the host")
        return CONFIG.ljust(offset + size, b"\0")[offset : offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        raise ValueError("the config space is read-only")

    def set_features(self, features: int) -> None:
        require(not features & ~(DEVICE_FEATURES | 1 << 30), f"features {features:#x} not offered")

    def set_memory(self, regions: tuple, fds: tuple[int, ...]) -> None:
        require(len(regions) == len(fds) > 0, "memory table and its FDs disagree")
        for fd in fds:  # the host owns them now and closes them, refused or not
            self.close_fd(fd)
        if any(fd in self.not_mappable for fd in fds):
            raise ValueError("memory region FD can still shrink")
        for region in regions:
            if region.mmap_offset + region.memory_size > FAKE_FD_SIZE:
                raise ValueError("memory region FD is smaller than mmap_offset + size")
        for index, (_kick, num, addr, event_idx) in self.started.items():
            if not ring_fits(regions, num, addr, event_idx):
                raise ValueError(f"new memory table does not hold vring {index}")
        self.regions = regions

    def start_ring(self, index: int, setup, event_idx: bool) -> None:
        require(index not in self.started, f"vring {index} started twice")
        require(setup.kick in self.open, f"vring {index} started with kick FD {setup.kick} "
                "that is not open")
        require(self.calls.get(index) == setup.call,
                f"vring {index} starts with call FD {self.calls.get(index)} on the host but "
                f"{setup.call} in the session")
        if not ring_fits(self.regions, setup.num, setup.addr, event_idx):
            raise ValueError("ring outside guest memory")
        self.started[index] = (setup.kick, setup.num, setup.addr, event_idx)

    def stop_ring(self, index: int) -> int:
        require(index in self.started, f"vring {index} stopped but not running")
        del self.started[index]
        return 7

    def ring_enabled(self, index: int, enabled: bool) -> None:
        require(0 <= index < self.num_queues, f"vring {index} enabled but does not exist")

    def call_fd_changed(self, index: int, fd: int | None) -> None:
        require(fd is None or fd in self.open, f"call FD {fd} is not open")
        self.calls[index] = fd

    def accept_eventfd(self, fd: int) -> None:
        require(fd in self.open, f"FD {fd} checked but not open")
        if fd in self.not_eventfd:
            raise ValueError("the FD is not an eventfd")

    def close_fd(self, fd: int) -> None:
        require(fd in self.open, f"FD {fd} closed twice, or never handed in")
        require(all(fd != kick for kick, *_ in self.started.values()),
                f"kick FD {fd} closed while its ring runs")
        self.open.remove(fd)


def ring_fits(regions: tuple, num: int, addr, event_idx: bool) -> bool:
    """What SplitQueue checks at start: size, alignment, no overlap, each ring in one region."""
    if addr is None or num == 0 or num & (num - 1) or num > 32768:
        return False
    places = (addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr)
    if places[0] % 16 or places[1] % 2 or places[2] % 4:
        return False
    areas = sorted(zip(places, ring_sizes(num, event_idx), strict=True))
    if any(start + size > later for (start, size), (later, _) in itertools.pairwise(areas)):
        return False
    return all(
        any(r.userspace_addr <= start and start + size <= r.userspace_addr + r.memory_size
            for r in regions)
        for start, size in areas
    )


def snapshot(session: Session, host: FakeHost) -> tuple:
    return (session.features, session.protocol_features, session.owner, session.memory_set,
            copy.deepcopy(session.rings), host.regions, dict(host.started), dict(host.calls))


def request_name(request: int) -> str:
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


def check_reply(request: int, need_reply: bool, reply: bytes, failure: str | None) -> None:
    name = request_name(request)
    if reply:
        require(len(reply) >= HEADER_SIZE, f"{name} reply shorter than a header")
        code, flags, size = HEADER.unpack_from(reply)
        require(code == request, f"{name} answered as request {code}")
        require(flags == VERSION | FLAG_REPLY, f"{name} reply flags {flags:#x}")
        require(size == len(reply) - HEADER_SIZE <= MAX_PAYLOAD,
                f"{name} reply says {size} bytes and has {len(reply) - HEADER_SIZE}")
    if need_reply and request not in ANSWERED_REQUESTS:
        require(len(reply) == HEADER_SIZE + 8, f"{name} with NEED_REPLY got no u64 ack")
        ack = int.from_bytes(reply[HEADER_SIZE:], "little")
        require((ack == 0) == (failure is None), f"{name} acked {ack} but failure is {failure!r}")
    elif failure is None:
        require(bool(reply) == (request in ANSWERED_REQUESTS),
                f"{name} reply of {len(reply)} bytes")


def check(data: bytes) -> None:
    with time_limit(2.0):
        _check(data)


def _check(data: bytes) -> None:
    host = FakeHost()
    session = Session(host)
    reader = MessageReader()
    r = Reader(data)
    try:
        while r.remaining() >= CHUNK.size:
            control, length = CHUNK.unpack(r.bytes(CHUNK.size))
            chunk = r.bytes(length)
            fds = host.new_fds(control & NFDS_MASK, control)
            if not chunk:  # EOF: the server closes what came with it and the connection
                for fd in fds:
                    host.close_fd(fd)
                break
            reader.feed(chunk, fds)
            while (msg := reader.next_message()) is not None:
                before = snapshot(session, host)
                reply, failure = session.handle(msg)
                check_reply(msg.request, msg.need_reply, reply, failure)
                if failure is not None and msg.request != Request.SET_VRING_KICK:
                    require(snapshot(session, host) == before,
                            f"refused {request_name(msg.request)} changed the session")
                check_books(session, host)
    except ProtocolError:
        pass  # the connection ends
    session.close()
    for fd in reader.take_fds():
        host.close_fd(fd)
    require(not host.started, f"rings {sorted(host.started)} still run after the connection")
    require(not host.open, f"FDs {sorted(host.open)} leaked")


def check_books(session: Session, host: FakeHost) -> None:
    kept: list[int] = []
    for index, ring in enumerate(session.rings):
        require(ring.started == (index in host.started),
                f"vring {index}: session says started={ring.started}, host disagrees")
        kept += [fd for fd in (ring.kick, ring.call, ring.err) if fd is not None]
        if index in host.calls:
            require(host.calls[index] == ring.call,
                    f"vring {index}: host would signal call FD {host.calls[index]}, the session "
                    f"holds {ring.call}")
    require(len(kept) == len(set(kept)), f"one FD kept twice: {kept}")
    require(set(kept) <= host.open, f"kept FDs {sorted(set(kept) - host.open)} are closed")


if __name__ == "__main__":
    from fuzz._harness import fuzz

    fuzz(check, "vhost_user")
