"""In-process vhost-user-blk front-end: the test suite's stand-in for QEMU.

It owns "guest RAM" (sealed memfds), drives the vhost-user control protocol and is
the driver side of split virtqueues, so tests and benchmarks can talk to any
vhost-user-blk back-end (ringfence, qemu-storage-daemon) without a VM.

Layers, each usable on its own so hostile-guest tests can break any of them:

* `GuestMemory`, `VhostUserConnection`, `SplitQueue`: building blocks with raw
  access (`send_raw`, descriptor writes, avail index jumps, ...).
* `BlkFrontend`: QEMU's realize + start sequence and synchronous virtio-blk requests.
* `BlkLoad` / `run_load`: the benchmark driver, keeping QD requests in flight on many
  queues of many devices from one epoll loop.

Standard library only. Assumes a little-endian host (virtio 1.x rings are LE and
the hot paths use native memoryview casts).
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import mmap
import os
import random
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Self

if sys.byteorder != "little":  # the memoryview casts below read rings natively
    raise ImportError("tests.frontend needs a little-endian host")

# --------------------------------------------------------------------------- constants

PAGE = mmap.PAGESIZE

#: Front-end virtual address of GPA 0. Deliberately unlike any GPA so that a back-end
#: mixing up SET_VRING_ADDR's front-end VAs and descriptor GPAs fails loudly.
UADDR_BASE = 0x7F00_0000_0000
#: Where the second RAM region starts in a split layout (like x86's RAM above 4 GiB).
HIGH_GPA = 1 << 32

VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
HEADER = struct.Struct("<III")
MAX_REPLY_PAYLOAD = 1 << 16  # larger than any legitimate reply; guards against garbage sizes
VRING_NOFD = 1 << 8  # SET_VRING_KICK/CALL: no fd attached, poll instead


class Req(enum.IntEnum):
    """vhost-user front-end requests (QEMU docs/interop/vhost-user.rst)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    RESET_DEVICE = 34
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntEnum):
    """vhost-user protocol feature bit numbers."""

    MQ = 0
    LOG_SHMFD = 1
    REPLY_ACK = 3
    BACKEND_REQ = 5
    CONFIG = 9
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


#: Protocol features this front-end implements and therefore accepts when offered.
WANTED_PROTOCOL_FEATURES = (
    (1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.REPLY_ACK) | (1 << ProtocolFeature.CONFIG)
)

# Virtio feature bits.
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_PROTOCOL_FEATURES = 30  # vhost-user: protocol features are negotiable
F_VERSION_1 = 32

BLK_F_SIZE_MAX = 1
BLK_F_SEG_MAX = 2
BLK_F_GEOMETRY = 4
BLK_F_RO = 5
BLK_F_BLK_SIZE = 6
BLK_F_FLUSH = 9
BLK_F_TOPOLOGY = 10
BLK_F_CONFIG_WCE = 11
BLK_F_MQ = 12
BLK_F_DISCARD = 13
BLK_F_WRITE_ZEROES = 14

#: virtio-blk feature bits the front-end understands; any of them the device offers is accepted.
BLK_FEATURES = sum(
    1 << b
    for b in (
        BLK_F_SIZE_MAX,
        BLK_F_SEG_MAX,
        BLK_F_GEOMETRY,
        BLK_F_RO,
        BLK_F_BLK_SIZE,
        BLK_F_FLUSH,
        BLK_F_TOPOLOGY,
        BLK_F_CONFIG_WCE,
        BLK_F_MQ,
        BLK_F_DISCARD,
        BLK_F_WRITE_ZEROES,
    )
)

# Split virtqueue flags.
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
USED_F_NO_NOTIFY = 1
AVAIL_F_NO_INTERRUPT = 1
DESC = struct.Struct("<QIHH")

# virtio-blk request types and status values.
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2
BLK_REQ_HEADER = struct.Struct("<IIQ")
BLK_DISCARD_WZ = struct.Struct("<QII")
WZ_F_UNMAP = 1
BLK_ID_BYTES = 20
SECTOR = 512

#: How long the wait loops sleep on a call eventfd before re-reading the used ring
#: anyway; bounds the cost of a lost or suppressed notification to this much.
POLL_SLICE = 0.05


# ------------------------------------------------------------------------------ errors


class FrontendError(Exception):
    """The back-end misbehaved or the front-end was used wrongly."""


class ProtocolError(FrontendError):
    """A reply from the back-end does not follow the vhost-user protocol."""


class BackendClosed(FrontendError):
    """The back-end closed the connection (how a back-end fails a device closed)."""


class NackError(FrontendError):
    """The back-end answered a REPLY_ACK request with a non-zero status."""

    def __init__(self, request: int, status: int) -> None:
        super().__init__(f"back-end rejected {_req_name(request)} with status {status:#x}")
        self.request = request
        self.status = status


def _req_name(request: int) -> str:
    try:
        return Req(request).name
    except ValueError:
        return f"request {request}"


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & -alignment


_fence_lock = threading.Lock()


def full_fence() -> None:
    """Order earlier stores before later loads, as virtio's "mb()" requires.

    x86 may let a load pass an earlier store, e.g. reading avail_event before our
    avail idx store is visible, which loses a kick. Python has no fence, but an
    uncontended lock acquire runs one locked read-modify-write (a full barrier).
    """
    _fence_lock.acquire()
    _fence_lock.release()


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event(): did the index move past `event` going old -> new?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def _drain_eventfd(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):  # another reader got there first
        os.eventfd_read(fd)


def _new_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


# -------------------------------------------------------------------------- guest RAM


@dataclass
class MemRegion:
    """One guest RAM region as announced in SET_MEM_TABLE."""

    gpa: int
    size: int
    uaddr: int
    fd: int
    mmap_offset: int
    view: memoryview


class GuestMemory:
    """Guest RAM in sealed memfds with a bump allocator addressed by GPA.

    `regions=2` splits RAM into a low region at GPA 0 and a high one at `high_gpa`,
    leaving a hole between them; `shared_fd=True` backs both with one memfd, the high
    region at a non-zero mmap_offset, to exercise every field of the memory table.
    `sealed=False` leaves the memfds unsealed (a front-end a careful back-end refuses).
    """

    def __init__(
        self,
        size: int = 32 << 20,
        *,
        regions: int = 1,
        shared_fd: bool = False,
        high_gpa: int = HIGH_GPA,
        sealed: bool = True,
    ) -> None:
        if regions not in (1, 2):
            raise ValueError("regions must be 1 or 2")
        size = _align(size, PAGE)
        if regions == 1:
            layout = [(0, size)]
        else:
            low = _align(size // 2, PAGE)
            if high_gpa < low or high_gpa % PAGE:
                raise ValueError("high_gpa must be page aligned and above the low region")
            layout = [(0, low), (high_gpa, size - low)]
        self.regions: list[MemRegion] = []
        self._maps: list[mmap.mmap] = []
        self._fds: list[int] = []
        self.sealed = sealed
        shared = self._memfd(size) if shared_fd else -1
        if shared >= 0:
            self._fds.append(shared)
        offset = 0
        for gpa, length in layout:
            if shared >= 0:
                fd, mmap_offset = shared, offset
            else:
                fd, mmap_offset = self._memfd(length), 0
                self._fds.append(fd)
            m = mmap.mmap(
                fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=mmap_offset
            )
            self._maps.append(m)
            self.regions.append(
                MemRegion(gpa, length, UADDR_BASE + gpa, fd, mmap_offset, memoryview(m))
            )
            offset += length
        self._next = [r.gpa for r in self.regions]

    def _memfd(self, size: int) -> int:
        fd = os.memfd_create("ringfence-guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        # Sealed like QEMU's memory-backend-memfd, so a back-end may rely on the size
        # never changing under its mapping (no SIGBUS from a shrinking file).
        if self.sealed:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        return fd

    def alloc(self, size: int, align: int = 64, *, region: int | None = None) -> int:
        """Reserve `size` zeroed bytes inside one region and return their GPA.

        Without `region`, the region with the most room wins, so a split layout spreads
        rings and buffers over both regions and every translation path gets exercised.
        """
        if region is None:
            candidates = sorted(range(len(self.regions)), key=self._room, reverse=True)
        else:
            candidates = [region]
        for i in candidates:
            r = self.regions[i]
            gpa = _align(self._next[i], align)
            if gpa + size <= r.gpa + r.size:
                self._next[i] = gpa + size
                return gpa
        raise FrontendError(f"guest memory exhausted allocating {size} bytes")

    def _room(self, i: int) -> int:
        r = self.regions[i]
        return r.gpa + r.size - self._next[i]

    def region_of(self, gpa: int, length: int = 1) -> MemRegion:
        """The region that wholly contains [gpa, gpa + length)."""
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.gpa + r.size:
                return r
        raise FrontendError(f"GPA range {gpa:#x}+{length:#x} is not inside one region")

    def view(self, gpa: int, length: int) -> memoryview:
        """Writable view of guest RAM at `gpa` (no copy)."""
        r = self.region_of(gpa, length)
        start = gpa - r.gpa
        return r.view[start : start + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def uaddr(self, gpa: int) -> int:
        """The front-end virtual address of `gpa`, as SET_VRING_ADDR carries it."""
        r = self.region_of(gpa)
        return r.uaddr + (gpa - r.gpa)

    def close(self) -> None:
        for r in self.regions:
            r.view.release()
        for m in self._maps:
            # BufferError: a caller still holds a view; the mapping goes away with it.
            with contextlib.suppress(BufferError):
                m.close()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


# ------------------------------------------------------------------- message payloads


def pack_u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def pack_vring_state(index: int, num: int) -> bytes:
    return struct.pack("<II", index, num)


def pack_vring_addr(
    index: int, desc: int, used: int, avail: int, log: int = 0, flags: int = 0
) -> bytes:
    return struct.pack("<IIQQQQ", index, flags, desc, used, avail, log)


def pack_mem_table(entries: Sequence[tuple[int, int, int, int]]) -> bytes:
    """SET_MEM_TABLE payload from (gpa, size, uaddr, mmap_offset) tuples; fds go alongside."""
    body = b"".join(struct.pack("<QQQQ", *e) for e in entries)
    return struct.pack("<II", len(entries), 0) + body


def pack_config_request(offset: int, size: int, flags: int = 0, data: bytes = b"") -> bytes:
    """GET_CONFIG / SET_CONFIG payload: header then `size` bytes of config space."""
    return struct.pack("<III", offset, size, flags) + data.ljust(size, b"\0")


# ------------------------------------------------------------------------- connection


@dataclass(frozen=True)
class Message:
    """A message received from the back-end."""

    request: int
    flags: int
    payload: bytes
    fds: list[int]


class VhostUserConnection:
    """The front-end end of one vhost-user socket.

    Typed methods follow the spec; `send_raw` and `recv_reply` exist so tests can send
    anything at all. `reply_ack` (set once REPLY_ACK is negotiated) makes every SET_*
    method ask for and check the back-end's u64 acknowledgement, like QEMU does.
    """

    def __init__(self, sock: socket.socket, timeout: float = 5.0) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        self.reply_ack = False

    @classmethod
    def connect(cls, path: str, timeout: float = 5.0) -> VhostUserConnection:
        """Connect, retrying while the back-end is still creating its socket."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(path)
                return cls(sock, timeout)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)

    def close(self) -> None:
        self.sock.close()

    # -- raw transport

    def send_raw(
        self,
        request: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        flags: int = VERSION,
        size: int | None = None,
    ) -> None:
        """Send one message as given; `size` overrides the header's payload size."""
        header = HEADER.pack(request, flags, len(payload) if size is None else size)
        data = header + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
        sent = self.sock.sendmsg([data], anc if fds else [])
        if sent < len(data):  # fds travel with the first byte only
            self.sock.sendall(data[sent:])

    def _recv_exact(self, n: int, fds: list[int]) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            data, fds_in, _flags, _addr = socket.recv_fds(self.sock, n - len(buf), 8)
            fds.extend(fds_in)
            if not data:
                raise BackendClosed("back-end closed the vhost-user connection")
            buf += data
        return bytes(buf)

    def recv_message(self) -> Message:
        """Receive one message without interpreting it (socket timeout applies)."""
        fds: list[int] = []
        request, flags, size = HEADER.unpack(self._recv_exact(HEADER.size, fds))
        if size > MAX_REPLY_PAYLOAD:
            raise ProtocolError(f"reply payload size {size} is absurd")
        payload = self._recv_exact(size, fds) if size else b""
        return Message(request, flags, payload, fds)

    def recv_reply(self, request: int | None = None) -> Message:
        """Receive a reply, checking its flags and (if given) its request code."""
        msg = self.recv_message()
        if msg.flags & 0x3 != VERSION or not msg.flags & FLAG_REPLY:
            raise ProtocolError(f"reply has bad flags {msg.flags:#x}")
        if request is not None and msg.request != request:
            raise ProtocolError(
                f"reply to {_req_name(msg.request)} while waiting for {_req_name(request)}"
            )
        return msg

    def wait_closed(self, timeout: float) -> bool:
        """True once the back-end has closed the connection (data received is discarded)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return False
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 4096, 8)
            except ConnectionResetError:
                return True
            for fd in fds:
                os.close(fd)
            if not data:
                return True
        return False

    # -- request helpers

    def get_u64(self, request: int) -> int:
        self.send_raw(request)
        payload = self.recv_reply(request).payload
        if len(payload) != 8:
            raise ProtocolError(f"{_req_name(request)} reply has {len(payload)} bytes, not 8")
        return struct.unpack("<Q", payload)[0]

    def set(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """Send a request that has no reply of its own; with REPLY_ACK, check the ack."""
        if not self.reply_ack:
            self.send_raw(request, payload, fds)
            return
        self.send_raw(request, payload, fds, flags=VERSION | FLAG_NEED_REPLY)
        status = self.get_ack(request)
        if status:
            raise NackError(request, status)

    def get_ack(self, request: int) -> int:
        payload = self.recv_reply(request).payload
        if len(payload) != 8:
            raise ProtocolError(f"ack for {_req_name(request)} has {len(payload)} bytes")
        return struct.unpack("<Q", payload)[0]

    # -- typed requests

    def get_features(self) -> int:
        return self.get_u64(Req.GET_FEATURES)

    def set_features(self, features: int) -> None:
        self.set(Req.SET_FEATURES, pack_u64(features))

    def get_protocol_features(self) -> int:
        return self.get_u64(Req.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        # Never acked: REPLY_ACK is not in force until this very message is processed.
        self.send_raw(Req.SET_PROTOCOL_FEATURES, pack_u64(features))

    def get_queue_num(self) -> int:
        return self.get_u64(Req.GET_QUEUE_NUM)

    def set_owner(self) -> None:
        self.set(Req.SET_OWNER)

    def get_config(self, offset: int, size: int) -> bytes:
        self.send_raw(Req.GET_CONFIG, pack_config_request(offset, size))
        payload = self.recv_reply(Req.GET_CONFIG).payload
        if len(payload) != 12 + size:
            raise ProtocolError(f"GET_CONFIG reply has {len(payload)} bytes, wanted {12 + size}")
        return payload[12:]

    def set_mem_table(self, regions: Sequence[MemRegion]) -> None:
        entries = [(r.gpa, r.size, r.uaddr, r.mmap_offset) for r in regions]
        self.set(Req.SET_MEM_TABLE, pack_mem_table(entries), [r.fd for r in regions])

    def set_vring_num(self, index: int, num: int) -> None:
        self.set(Req.SET_VRING_NUM, pack_vring_state(index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        self.set(Req.SET_VRING_BASE, pack_vring_state(index, base))

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int, log: int = 0) -> None:
        """Ring addresses are front-end virtual addresses (see GuestMemory.uaddr)."""
        self.set(Req.SET_VRING_ADDR, pack_vring_addr(index, desc, used, avail, log))

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._set_vring_fd(Req.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._set_vring_fd(Req.SET_VRING_CALL, index, fd)

    def _set_vring_fd(self, request: Req, index: int, fd: int | None) -> None:
        if fd is None:
            self.set(request, pack_u64(index | VRING_NOFD))
        else:
            self.set(request, pack_u64(index), [fd])

    def set_vring_err(self, index: int, fd: int | None) -> None:
        """The eventfd the back-end signals when it stops ring `index` as broken."""
        self._set_vring_fd(Req.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.set(Req.SET_VRING_ENABLE, pack_vring_state(index, int(enable)))

    def get_vring_base(self, index: int) -> int:
        """Stop ring `index`; returns the back-end's next avail index."""
        self.send_raw(Req.GET_VRING_BASE, pack_vring_state(index, 0))
        payload = self.recv_reply(Req.GET_VRING_BASE).payload
        if len(payload) != 8:
            raise ProtocolError(f"GET_VRING_BASE reply has {len(payload)} bytes")
        return struct.unpack("<II", payload)[1]


# ------------------------------------------------------------------ split virtqueue


class SplitQueue:
    """Driver side of one split virtqueue living in guest RAM.

    `post`/`kick`/`reap` are the normal driver; `write_desc`, `write_avail`,
    `set_avail_idx` and friends write ring memory verbatim for hostile-guest tests.
    Ring addresses may be given to place (or misplace) the rings on purpose.
    """

    def __init__(
        self,
        mem: GuestMemory,
        index: int,
        size: int = 256,
        *,
        event_idx: bool = False,
        desc_gpa: int | None = None,
        avail_gpa: int | None = None,
        used_gpa: int | None = None,
    ) -> None:
        if size < 1 or size > 32768 or size & (size - 1):
            raise ValueError("queue size must be a power of two <= 32768")
        self.mem = mem
        self.index = index
        self.size = size
        self.event_idx = event_idx
        avail_len = 6 + 2 * size  # flags, idx, ring[size], used_event
        used_len = 6 + 8 * size  # flags, idx, ring[size] of (id, len), avail_event
        # Page-aligned rings, well beyond the spec's 16/2/4 minimum, like Linux does.
        self.desc_gpa = mem.alloc(16 * size, PAGE) if desc_gpa is None else desc_gpa
        self.avail_gpa = mem.alloc(avail_len, PAGE) if avail_gpa is None else avail_gpa
        self.used_gpa = mem.alloc(used_len, PAGE) if used_gpa is None else used_gpa
        self.desc = mem.view(self.desc_gpa, 16 * size)
        self.avail = mem.view(self.avail_gpa, avail_len)
        self.used = mem.view(self.used_gpa, used_len)
        # The 16-bit fields the back-end reads or writes concurrently (flags, idx, used_event,
        # avail_event) go through native casts: one aligned 2-byte load or store each.
        # struct.pack_into zeroes its target before writing it, so a back-end polling avail.idx
        # could read a transient 0 ("65000 entries ahead"); unpack_from reads byte by byte.
        self._avail16 = self.avail.cast("H")
        self._used16 = self.used.cast("H")
        self.kickfd = _new_eventfd()
        self.callfd = _new_eventfd()
        self.avail_idx = 0  # shadow of avail.idx (next slot to fill)
        self.last_used = 0  # next used ring slot to reap
        self._kick_old = 0  # avail idx at the previous kick decision (event idx)
        self._free = list(range(size - 1, -1, -1))  # pop() hands out descriptor 0 first
        self._chains: dict[int, list[int]] = {}  # head -> descriptor ids, while in flight
        self._tables: dict[int, tuple[int, int]] = {}  # head -> (indirect table GPA, entries)
        #: completions `wait_for` reaped while waiting for a different head
        self.stray: list[tuple[int, int]] = []

    def close(self) -> None:
        for v in (self._avail16, self._used16, self.desc, self.avail, self.used):
            v.release()
        os.close(self.kickfd)
        os.close(self.callfd)

    # -- raw ring access

    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, next_: int = 0) -> None:
        DESC.pack_into(self.desc, 16 * i, addr, length, flags, next_)

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        return DESC.unpack_from(self.desc, 16 * i)

    def write_avail(self, slot: int, head: int) -> None:
        """Write avail.ring[slot] (no index update)."""
        struct.pack_into("<H", self.avail, 4 + 2 * slot, head)

    def set_avail_idx(self, idx: int) -> None:
        """Publish avail.idx = idx verbatim (a test may jump it arbitrarily)."""
        self.avail_idx = idx & 0xFFFF
        self._avail16[1] = self.avail_idx

    def set_avail_flags(self, flags: int) -> None:
        self._avail16[0] = flags

    def set_used_event(self, idx: int) -> None:
        self._avail16[2 + self.size] = idx & 0xFFFF

    @property
    def used_flags(self) -> int:
        return self._used16[0]

    @property
    def used_idx(self) -> int:
        return self._used16[1]

    @property
    def avail_event(self) -> int:
        return self._used16[2 + 4 * self.size]

    def read_used(self, slot: int) -> tuple[int, int]:
        """(id, len) of used.ring[slot]."""
        return struct.unpack_from("<II", self.used, 4 + 8 * slot)

    def adopt_indexes(self, avail_idx: int, last_used: int) -> None:
        """Continue from indexes someone else (BlkLoad) advanced the ring to."""
        self.avail_idx = self._kick_old = avail_idx & 0xFFFF
        self.last_used = last_used & 0xFFFF
        if self.event_idx:
            self.set_used_event(self.last_used)

    # -- driver

    @property
    def in_flight(self) -> int:
        return len(self._chains)

    def post(
        self,
        chain: Sequence[tuple[int, int, bool]],
        *,
        indirect: bool = False,
        publish: bool = True,
    ) -> int:
        """Make a chain of (gpa, len, device_writable) segments available; returns its head.

        With `publish=False` the ring entry is written but avail.idx is not, so several
        chains can be published at once with `publish()`.
        """
        if not chain:
            raise ValueError("empty chain")
        need = 1 if indirect else len(chain)
        if need > len(self._free):
            raise FrontendError(f"queue {self.index} has no {need} free descriptors")
        ids = [self._free.pop() for _ in range(need)]
        head = ids[0]
        if indirect:
            table = self._indirect_table(head, len(chain))
            for j, (gpa, length, writable) in enumerate(chain):
                last = j == len(chain) - 1
                flags = (DESC_F_WRITE if writable else 0) | (0 if last else DESC_F_NEXT)
                DESC.pack_into(
                    self.mem.view(table + 16 * j, 16), 0, gpa, length, flags, 0 if last else j + 1
                )
            self.write_desc(head, table, 16 * len(chain), DESC_F_INDIRECT)
        else:
            for j, (gpa, length, writable) in enumerate(chain):
                last = j == len(chain) - 1
                flags = (DESC_F_WRITE if writable else 0) | (0 if last else DESC_F_NEXT)
                self.write_desc(ids[j], gpa, length, flags, 0 if last else ids[j + 1])
        self._chains[head] = ids
        # A completion of an earlier chain with this head that nobody waited for (its
        # wait timed out) must not be mistaken for this chain's.
        self.stray = [s for s in self.stray if s[0] != head]
        self.write_avail(self.avail_idx & (self.size - 1), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()
        return head

    def _indirect_table(self, head: int, entries: int) -> int:
        # One reusable table per head descriptor, regrown when a longer chain needs it.
        gpa, cap = self._tables.get(head, (0, 0))
        if cap < entries:
            cap = max(entries, 16)
            gpa = self.mem.alloc(16 * cap, 16)
            self._tables[head] = (gpa, cap)
        return gpa

    def publish(self) -> None:
        """Store the shadow avail index, making every posted chain visible."""
        self._avail16[1] = self.avail_idx

    def kick(self, force: bool = False) -> bool:
        """Notify the back-end if it asked to be (event idx / NO_NOTIFY); True if kicked."""
        new, old = self.avail_idx, self._kick_old
        self._kick_old = new
        if not force:
            if new == old:
                return False
            full_fence()  # the avail idx store must be visible before reading the suppression
            if self.event_idx:
                if not need_event(self.avail_event, new, old):
                    return False
            elif self.used_flags & USED_F_NO_NOTIFY:
                return False
        os.eventfd_write(self.kickfd, 1)
        return True

    def reap(self) -> list[tuple[int, int]]:
        """Collect new used entries as (head id, written length) and free their chains."""
        done: list[tuple[int, int]] = []
        mask = self.size - 1
        while True:
            idx = self.used_idx
            while self.last_used != idx:
                head, length = self.read_used(self.last_used & mask)
                self.last_used = (self.last_used + 1) & 0xFFFF
                ids = self._chains.pop(head, None)
                if ids is not None:
                    self._free.extend(ids)
                done.append((head, length))
            if not self.event_idx:
                return done
            # Ask for a call on the next completion, then re-check: one that landed
            # before used_event was visible would otherwise never be signalled.
            self.set_used_event(self.last_used)
            full_fence()
            if self.used_idx == self.last_used:
                return done

    def wait_used(self, timeout: float = 5.0) -> list[tuple[int, int]]:
        """Reap, waiting up to `timeout` s for the call eventfd; [] if nothing completed."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.reap()
            if done:
                return done
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            select.select([self.callfd], [], [], min(left, POLL_SLICE))
            _drain_eventfd(self.callfd)

    def wait_for(self, head: int, timeout: float = 5.0) -> int:
        """Wait for chain `head` to complete and return its used length."""
        deadline = time.monotonic() + timeout
        while True:
            for i, (h, length) in enumerate(self.stray):
                if h == head:
                    del self.stray[i]
                    return length
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"queue {self.index}: head {head} did not complete")
            self.stray.extend(self.wait_used(left))


# ------------------------------------------------------------------------ virtio-blk

BLK_CONFIG = struct.Struct("<QIIHBBIBBHIBxHIIIIIB3x")
BLK_CONFIG_SIZE = BLK_CONFIG.size  # 60: everything up to write_zeroes_may_unmap


@dataclass(frozen=True)
class BlkConfig:
    """virtio-blk device configuration space (the first 60 bytes)."""

    capacity: int  # in 512-byte sectors
    size_max: int
    seg_max: int
    cylinders: int
    heads: int
    sectors: int
    blk_size: int
    physical_block_exp: int
    alignment_offset: int
    min_io_size: int
    opt_io_size: int
    writeback: int
    num_queues: int
    max_discard_sectors: int
    max_discard_seg: int
    discard_sector_alignment: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int
    write_zeroes_may_unmap: int

    @classmethod
    def parse(cls, data: bytes) -> BlkConfig:
        if len(data) < BLK_CONFIG_SIZE:
            raise ProtocolError(f"virtio-blk config is {len(data)} bytes, need {BLK_CONFIG_SIZE}")
        return cls(*BLK_CONFIG.unpack_from(data))


@dataclass(frozen=True)
class BlkResult:
    """Outcome of one virtio-blk request."""

    status: int  # 0xFF means the back-end never wrote the status byte
    used_len: int
    data: bytes  # the device-writable data segment(s), as the device left them


def _segments(
    gpa: int, length: int, writable: bool, seg_size: int | None
) -> list[tuple[int, int, bool]]:
    step = seg_size or length
    return [(gpa + off, min(step, length - off), writable) for off in range(0, length, step)]


class _Frontend:
    """What QEMU does the same for every vhost-user device: connect, negotiate the protocol,
    and program the rings; the device classes add their features, queues and config."""

    def __init__(self, path: str, mem: GuestMemory, queue_size: int, timeout: float) -> None:
        self.path = path
        self.queue_size = queue_size
        self.timeout = timeout
        self.mem = mem
        try:
            self.conn = VhostUserConnection.connect(path, timeout)
        except BaseException:
            self.mem.close()
            raise
        self.device_features = 0
        self.protocol_features = 0
        self.features = 0
        self.queues: list[SplitQueue] = []

    @classmethod
    def open(cls, path: str, **kwargs: Any) -> Self:
        """Connect, realize and start: a ready device."""
        dev = cls(path, **kwargs)
        try:
            dev.realize()
            dev.start()
        except BaseException:
            dev.close()
            raise
        return dev

    def realize(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()
        for q in self.queues:
            q.close()
        self.queues = []
        self.mem.close()

    def _negotiate_protocol(self) -> None:
        """GET_FEATURES, then the protocol features we want of those offered."""
        c = self.conn
        self.device_features = c.get_features()
        if not self.device_features & (1 << F_PROTOCOL_FEATURES):
            raise FrontendError("back-end does not offer VHOST_USER_F_PROTOCOL_FEATURES")
        self.protocol_features = c.get_protocol_features() & WANTED_PROTOCOL_FEATURES
        c.set_protocol_features(self.protocol_features)
        c.reply_ack = bool(self.protocol_features & (1 << ProtocolFeature.REPLY_ACK))

    def _start_rings(self, count: int) -> None:
        """SET_FEATURES (self.features), the memory table, and `count` fresh rings (a restart
        gets fresh rings, as after a guest reset), programmed but not enabled."""
        c = self.conn
        for q in self.queues:
            q.close()
        c.set_features(self.features)
        c.set_mem_table(self.mem.regions)
        event_idx = bool(self.features & (1 << F_EVENT_IDX))
        self.queues = [SplitQueue(self.mem, i, self.queue_size, event_idx=event_idx)
                       for i in range(count)]
        for q in self.queues:
            c.set_vring_num(q.index, q.size)
            c.set_vring_base(q.index, 0)
            c.set_vring_addr(q.index, self.mem.uaddr(q.desc_gpa), self.mem.uaddr(q.used_gpa),
                             self.mem.uaddr(q.avail_gpa))
            c.set_vring_kick(q.index, q.kickfd)
            c.set_vring_call(q.index, q.callfd)


class BlkFrontend(_Frontend):
    """A vhost-user-blk device as QEMU drives it, with synchronous request helpers.

    Construction only connects; `realize()` and `start()` replay QEMU's sequence so a
    test can interpose anything between (or instead of) the steps. `open()` does all.
    `features=None` negotiates what the device offers of VERSION_1, PROTOCOL_FEATURES,
    the blk bits and (if enabled) EVENT_IDX / INDIRECT_DESC; an int is sent verbatim.
    `sealed=False` gives the guest RAM memfds without F_SEAL_SHRINK/F_SEAL_GROW.
    """

    def __init__(
        self,
        path: str,
        *,
        mem_size: int = 32 << 20,
        regions: int = 1,
        shared_fd: bool = False,
        queue_size: int = 256,
        num_queues: int = 1,
        event_idx: bool = True,
        indirect: bool = True,
        features: int | None = None,
        timeout: float = 5.0,
        sealed: bool = True,
    ) -> None:
        self.num_queues = num_queues
        self._want_event_idx = event_idx
        self._want_indirect = indirect
        self._explicit_features = features
        super().__init__(path, GuestMemory(mem_size, regions=regions, shared_fd=shared_fd,
                                           sealed=sealed), queue_size, timeout)
        self.max_queues = 1
        self.config: BlkConfig | None = None
        self._scratch: dict[int, tuple[int, int, int]] = {}  # queue -> (hdr, data, capacity)

    # -- QEMU's sequence

    def realize(self) -> None:
        """What QEMU does at device realize: features, protocol features, owner, config."""
        c = self.conn
        self._negotiate_protocol()
        if self.protocol_features & (1 << ProtocolFeature.MQ):
            self.max_queues = c.get_queue_num()
        if self.num_queues > self.max_queues:
            raise FrontendError(f"{self.num_queues} queues wanted, back-end has {self.max_queues}")
        c.set_owner()
        # QEMU's vhost-user-blk refuses a back-end without CONFIG; so do we.
        if not self.protocol_features & (1 << ProtocolFeature.CONFIG):
            raise FrontendError("back-end does not offer VHOST_USER_PROTOCOL_F_CONFIG")
        self.config = BlkConfig.parse(c.get_config(0, BLK_CONFIG_SIZE))

    def negotiated_features(self) -> int:
        want = (1 << F_VERSION_1) | (1 << F_PROTOCOL_FEATURES) | BLK_FEATURES
        if self._want_event_idx:
            want |= 1 << F_EVENT_IDX
        if self._want_indirect:
            want |= 1 << F_INDIRECT_DESC
        if not self.device_features & (1 << F_VERSION_1):
            raise FrontendError("back-end does not offer VIRTIO_F_VERSION_1")
        return self.device_features & want

    def start(self) -> None:
        """What QEMU does when the guest driver sets DRIVER_OK: features, memory, rings."""
        self.features = (
            self.negotiated_features()
            if self._explicit_features is None
            else self._explicit_features
        )
        self._start_rings(self.num_queues)
        if self.features & (1 << F_PROTOCOL_FEATURES):
            # With PROTOCOL_FEATURES rings start disabled until explicitly enabled.
            for q in self.queues:
                self.conn.set_vring_enable(q.index, True)

    def stop(self) -> list[int]:
        """Stop every ring (GET_VRING_BASE) and return the back-end's avail indexes."""
        return [self.conn.get_vring_base(q.index) for q in self.queues]

    # -- requests

    def _buffers(self, queue: int, data_len: int) -> tuple[int, int]:
        # One header+status block and one data buffer per queue, reused by every
        # synchronous request so long tests don't exhaust the bump allocator.
        hdr, data, cap = self._scratch.get(queue, (0, 0, 0))
        if not hdr:
            hdr = self.mem.alloc(32, 64)
        if cap < data_len:
            cap = max(_align(data_len, PAGE), 64 << 10)
            data = self.mem.alloc(cap, PAGE)
        self._scratch[queue] = (hdr, data, cap)
        return hdr, data

    def request(
        self,
        rtype: int,
        sector: int = 0,
        *,
        out: bytes = b"",
        in_len: int = 0,
        queue: int = 0,
        seg_size: int | None = None,
        indirect: bool = False,
        timeout: float | None = None,
    ) -> BlkResult:
        """One request: header, `out` as device-readable data, `in_len` device-writable
        bytes, status; data split into `seg_size`-byte segments if given."""
        q = self.queues[queue]
        hdr, data = self._buffers(queue, len(out) + in_len)
        status = hdr + 16
        self.mem.write(hdr, BLK_REQ_HEADER.pack(rtype, 0, sector))
        self.mem.write(status, b"\xff")
        chain = [(hdr, BLK_REQ_HEADER.size, False)]
        if out:
            self.mem.write(data, out)
            chain += _segments(data, len(out), False, seg_size)
        if in_len:
            self.mem.view(data + len(out), in_len)[:] = bytes(in_len)
            chain += _segments(data + len(out), in_len, True, seg_size)
        chain.append((status, 1, True))
        head = q.post(chain, indirect=indirect)
        q.kick()
        used_len = q.wait_for(head, self.timeout if timeout is None else timeout)
        return BlkResult(
            self.mem.read(status, 1)[0], used_len, self.mem.read(data + len(out), in_len)
        )

    # The helpers below take request()'s keyword options (queue, seg_size, indirect, timeout).

    def read(self, sector: int, nbytes: int, **kwargs: Any) -> tuple[int, bytes]:
        r = self.request(T_IN, sector, in_len=nbytes, **kwargs)
        return r.status, r.data

    def write(self, sector: int, data: bytes, **kwargs: Any) -> int:
        return self.request(T_OUT, sector, out=data, **kwargs).status

    def flush(self, **kwargs: Any) -> int:
        return self.request(T_FLUSH, **kwargs).status

    def discard(self, sector: int, num_sectors: int, *, flags: int = 0, **kwargs: Any) -> int:
        return self.request(
            T_DISCARD, out=BLK_DISCARD_WZ.pack(sector, num_sectors, flags), **kwargs
        ).status

    def write_zeroes(
        self, sector: int, num_sectors: int, *, unmap: bool = False, **kwargs: Any
    ) -> int:
        payload = BLK_DISCARD_WZ.pack(sector, num_sectors, WZ_F_UNMAP if unmap else 0)
        return self.request(T_WRITE_ZEROES, out=payload, **kwargs).status

    def get_id(self, **kwargs: Any) -> tuple[int, bytes]:
        r = self.request(T_GET_ID, in_len=BLK_ID_BYTES, **kwargs)
        return r.status, r.data


# ------------------------------------------------------------------------ load driver


class BlkLoad:
    """Keeps `qd` random reads or writes in flight on one queue, for benchmarks.

    Each of the `qd` slots owns a fixed 3-descriptor chain (descriptors 3k..3k+2) and
    fixed buffers, built once; re-issuing a slot only rewrites its header's sector,
    its status byte and one avail ring entry. Takes over the queue's ring indexes while
    running (the queue must be idle) and hands them back when drained.
    """

    #: Random block numbers are drawn up front, from a table this big, cycled through.
    SECTOR_TABLE = 1 << 16

    def __init__(
        self,
        dev: BlkFrontend,
        *,
        queue: int = 0,
        qd: int = 32,
        block_size: int = 4096,
        write: bool = False,
        seed: int = 0,
    ) -> None:
        q = dev.queues[queue]
        if q.in_flight:
            raise FrontendError("BlkLoad needs an idle queue")
        if 3 * qd > q.size:
            raise ValueError(f"qd {qd} needs a queue of at least {3 * qd} descriptors")
        if dev.config is None:
            raise FrontendError("device not realized")
        nblocks = dev.config.capacity * SECTOR // block_size
        if block_size % SECTOR or nblocks < 1:
            raise ValueError("block size must be a sector multiple no larger than the disk")
        mem = dev.mem
        self.queue = q
        self.qd = qd
        self.callfd = q.callfd
        hdr_gpa = mem.alloc(16 * qd, 64)
        status_gpa = mem.alloc(qd, 64)
        data_gpa = mem.alloc(block_size * qd, PAGE)
        self._hdr = mem.view(hdr_gpa, 16 * qd).cast("Q")  # [2k] = type, [2k+1] = sector
        self._status = mem.view(status_gpa, qd)
        data_flag = 0 if write else DESC_F_WRITE
        for k in range(qd):
            self._hdr[2 * k] = T_OUT if write else T_IN  # type in the low half, reserved = 0
            q.write_desc(3 * k, hdr_gpa + 16 * k, 16, DESC_F_NEXT, 3 * k + 1)
            q.write_desc(
                3 * k + 1, data_gpa + block_size * k, block_size, DESC_F_NEXT | data_flag, 3 * k + 2
            )
            q.write_desc(3 * k + 2, status_gpa + k, 1, DESC_F_WRITE)
        if write:
            mem.write(data_gpa, random.Random(seed).randbytes(block_size * qd))
        rng = random.Random(seed)
        spb = block_size // SECTOR
        self._sectors = [rng.randrange(nblocks) * spb for _ in range(self.SECTOR_TABLE)]
        self._next_sector = 0
        self._avail16 = q.avail.cast("H")  # [1] = idx, [2 + slot] = ring, [2 + size] = used_event
        self._used16 = q.used.cast("H")  # [1] = idx, [2 + 4 * size] = avail_event
        self._used32 = q.used[: 4 + 8 * q.size].cast("I")  # [1 + 2 * slot] = id
        self._t_post = [0] * qd
        self._mask = q.size - 1
        self._avail_idx = 0
        self._last_used = 0
        self._kick_old = 0
        self.in_flight = 0
        self.latencies: list[int] = []  # ns, one per completion while running
        self.errors = 0  # completions whose status was not OK

    def close(self) -> None:
        for v in (self._hdr, self._status, self._avail16, self._used16, self._used32):
            v.release()

    def start(self) -> None:
        """Post every slot and kick."""
        q = self.queue
        self._avail_idx, self._last_used, self._kick_old = q.avail_idx, q.last_used, q.avail_idx
        now = time.perf_counter_ns()
        for k in range(self.qd):
            self._issue(k, now)
        self._avail16[1] = self._avail_idx
        self.in_flight = self.qd
        self.kick(force=True)

    def _issue(self, k: int, now: int) -> None:
        self._status[k] = 0xFF
        self._hdr[2 * k + 1] = self._sectors[self._next_sector & (self.SECTOR_TABLE - 1)]
        self._next_sector += 1
        self._t_post[k] = now
        self._avail16[2 + (self._avail_idx & self._mask)] = 3 * k
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF

    def service(self, running: bool) -> None:
        """Reap completions; while `running`, re-issue each slot at once and kick."""
        used16 = self._used16
        last = self._last_used
        used_idx = used16[1]
        if used_idx == last:
            return
        # The hot loop: everything in locals, one timestamp per batch. A completion's
        # latency runs from its slot's previous post to the moment this batch is seen.
        used32 = self._used32
        mask = self._mask
        t_post = self._t_post
        lat = self.latencies
        status = self._status
        hdr = self._hdr
        avail16 = self._avail16
        sectors = self._sectors
        smask = self.SECTOR_TABLE - 1
        si = self._next_sector
        aidx = self._avail_idx
        event_slot = 2 + self.queue.size
        event_idx = self.queue.event_idx
        while True:
            now = time.perf_counter_ns()
            while last != used_idx:
                head = used32[1 + 2 * (last & mask)]
                last = (last + 1) & 0xFFFF
                k = head // 3
                if status[k]:
                    self.errors += 1
                if running:
                    lat.append(now - t_post[k])
                    status[k] = 0xFF
                    hdr[2 * k + 1] = sectors[si & smask]
                    si += 1
                    t_post[k] = now
                    avail16[2 + (aidx & mask)] = head
                    aidx = (aidx + 1) & 0xFFFF
                else:
                    self.in_flight -= 1
            if not event_idx:
                break
            avail16[event_slot] = last  # call us on the next completion ...
            full_fence()
            used_idx = used16[1]  # ... and catch any that raced with that store
            if used_idx == last:
                break
        self._last_used = last
        self._next_sector = si
        if aidx != self._avail_idx:
            self._avail_idx = aidx
            avail16[1] = aidx
            self.kick()

    def kick(self, force: bool = False) -> None:
        new, old = self._avail_idx, self._kick_old
        self._kick_old = new
        if not force:
            full_fence()  # publish avail idx before reading avail_event / used flags
            if self.queue.event_idx:
                if not need_event(self._used16[2 + 4 * self.queue.size], new, old):
                    return
            elif self._used16[0] & USED_F_NO_NOTIFY:
                return
        os.eventfd_write(self.queue.kickfd, 1)

    def finish(self) -> None:
        """Hand the ring indexes back to the queue (after a drained run)."""
        self.queue.adopt_indexes(self._avail_idx, self._last_used)


@dataclass
class LoadResult:
    """Aggregate of one `run_load` over all its loads."""

    ios: int
    errors: int
    seconds: float
    latencies_ns: list[int]  # sorted
    frontend_cpu_s: float  # this process's user+system CPU during the run

    @property
    def iops(self) -> float:
        return self.ios / self.seconds if self.seconds else 0.0

    def latency_us(self, pct: float) -> float:
        """Latency percentile (0..100) in microseconds."""
        if not self.latencies_ns:
            return float("nan")
        i = min(len(self.latencies_ns) - 1, int(len(self.latencies_ns) * pct / 100))
        return self.latencies_ns[i] / 1000


def run_load(
    loads: Sequence[BlkLoad], seconds: float, *, drain_timeout: float = 10.0
) -> LoadResult:
    """Drive `loads` for `seconds` from one epoll loop, then drain them.

    Only completions observed before the deadline count. If epoll stays quiet for
    POLL_SLICE every queue is polled and kicked anyway, so a lost notification costs
    a stall, not a hang.
    """
    ep = select.epoll()
    by_fd = {ld.callfd: ld for ld in loads}
    for fd in by_fd:
        ep.register(fd, select.EPOLLIN)
    for ld in loads:
        ld.latencies = []
        ld.errors = 0
    cpu0 = os.times()
    t0 = time.perf_counter()
    deadline = t0 + seconds
    try:
        for ld in loads:
            ld.start()
        running = True
        drain_deadline = 0.0
        while True:
            events = ep.poll(POLL_SLICE)
            if running and time.perf_counter() >= deadline:
                running = False
                drain_deadline = time.perf_counter() + drain_timeout
            for fd, _ in events:
                _drain_eventfd(fd)
                by_fd[fd].service(running)
            if not events:
                for ld in loads:
                    ld.service(running)
                    ld.kick(force=True)
            if not running:
                if not any(ld.in_flight for ld in loads):
                    break
                if time.perf_counter() > drain_deadline:
                    raise FrontendError("back-end did not complete in-flight requests")
    finally:
        ep.close()
    for ld in loads:
        ld.finish()
    cpu1 = os.times()
    lat = sorted(x for ld in loads for x in ld.latencies)
    return LoadResult(
        ios=len(lat),
        errors=sum(ld.errors for ld in loads),
        seconds=seconds,
        latencies_ns=lat,
        frontend_cpu_s=(cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
    )


# ------------------------------------------------------------------------ virtio-net

NET_F_CSUM = 0
NET_F_GUEST_CSUM = 1
NET_F_MTU = 3
NET_F_MAC = 5
NET_F_GUEST_TSO4 = 7
NET_F_GUEST_TSO6 = 8
NET_F_HOST_TSO4 = 11
NET_F_HOST_TSO6 = 12
NET_F_MRG_RXBUF = 15
NET_F_STATUS = 16
NET_F_MQ = 22
#: virtio-net bits this front-end understands; any of them the device offers is accepted.
NET_FEATURES = sum(1 << b for b in (
    NET_F_CSUM, NET_F_GUEST_CSUM, NET_F_MTU, NET_F_MAC, NET_F_GUEST_TSO4, NET_F_GUEST_TSO6,
    NET_F_HOST_TSO4, NET_F_HOST_TSO6, NET_F_MRG_RXBUF, NET_F_STATUS, NET_F_MQ,
))
#: virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers
NET_HDR = struct.Struct("<BBHHHHH")
NET_CONFIG = struct.Struct("<6sHHH")  # mac, status, max_virtqueue_pairs, mtu
NET_RX, NET_TX = 0, 1


@dataclass
class _NetPair:
    """The guest driver's state of one queue pair: buffers posted and frames half received."""

    rx_free: list[int] = field(default_factory=list)
    rx_bufs: dict[int, int] = field(default_factory=dict)  # head -> buffer GPA
    tx_free: list[int] = field(default_factory=list)
    tx_bufs: dict[int, int] = field(default_factory=dict)
    partial: list[bytes] = field(default_factory=list)  # a frame's buffers, not all in yet
    partial_need: int = 0
    tx_done: list[tuple[int, int]] = field(default_factory=list)  # (head, used len) reaped


@dataclass(frozen=True)
class NetConfig:
    mac: bytes
    status: int
    max_virtqueue_pairs: int
    mtu: int


class NetFrontend(_Frontend):
    """A vhost-user-net device as QEMU drives it, with the guest driver's RX/TX in Python.

    RX buffers come from a pool of `rx_buf_size`-byte buffers and are re-posted as frames are
    received (`receive`); TX frames are copied into a pool of 64 KiB buffers (`send`), or a
    test posts any chain it likes on `tx` (`queue.post`). `features=None` negotiates what the
    device offers of VERSION_1, PROTOCOL_FEATURES, EVENT_IDX, INDIRECT and NET_FEATURES.

    With `queue_pairs` > 1 it sets up that many pairs (RX 2i, TX 2i+1), as QEMU does for
    `-netdev vhost-user,queues=N`, and enables the first `enabled_pairs` of them (default all);
    `set_pairs` then does what QEMU does for the driver's VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET. The
    RX/TX methods take the pair they act on (default 0).
    """

    def __init__(
        self,
        path: str,
        *,
        mem_size: int = 32 << 20,
        queue_size: int = 256,
        rx_buf_size: int = 2048,
        features: int | None = None,
        event_idx: bool = True,
        timeout: float = 5.0,
        queue_pairs: int = 1,
        enabled_pairs: int | None = None,
    ) -> None:
        self.rx_buf_size = rx_buf_size
        self.queue_pairs = queue_pairs
        self.enabled_pairs = queue_pairs if enabled_pairs is None else enabled_pairs
        self._explicit_features = features
        self._want_event_idx = event_idx
        super().__init__(path, GuestMemory(mem_size), queue_size, timeout)
        self._pairs = [_NetPair() for _ in range(queue_pairs)]

    @property
    def rx(self) -> SplitQueue:
        return self.queues[NET_RX]

    @property
    def tx(self) -> SplitQueue:
        return self.queues[NET_TX]

    def rx_of(self, pair: int) -> SplitQueue:
        return self.queues[2 * pair + NET_RX]

    def tx_of(self, pair: int) -> SplitQueue:
        return self.queues[2 * pair + NET_TX]

    @property
    def tx_done(self) -> list[tuple[int, int]]:
        """(head, used len) of reaped TX chains of pair 0 (see `tx_done_of`)."""
        return self._pairs[0].tx_done

    def tx_done_of(self, pair: int) -> list[tuple[int, int]]:
        return self._pairs[pair].tx_done

    def realize(self) -> None:
        c = self.conn
        self._negotiate_protocol()
        if self.protocol_features & (1 << ProtocolFeature.MQ):
            pairs = c.get_queue_num()
            if pairs < self.queue_pairs:  # QEMU: "you are asking more queues than supported"
                raise FrontendError(f"back-end offers {pairs} queue pairs, "
                                    f"{self.queue_pairs} wanted")
        elif self.queue_pairs > 1:
            raise FrontendError("back-end does not offer the MQ protocol feature")
        c.set_owner()

    def read_config(self) -> NetConfig:
        return NetConfig(*NET_CONFIG.unpack(self.conn.get_config(0, NET_CONFIG.size)))

    def start(self) -> None:
        want = (1 << F_VERSION_1) | (1 << F_PROTOCOL_FEATURES) | (1 << F_INDIRECT_DESC) \
            | NET_FEATURES | ((1 << F_EVENT_IDX) if self._want_event_idx else 0)
        self.features = (self.device_features & want if self._explicit_features is None
                         else self._explicit_features)
        self._start_rings(2 * self.queue_pairs)
        self.set_pairs(self.enabled_pairs)

    def set_pairs(self, count: int) -> None:
        """Enable the first `count` queue pairs and disable the rest (SET_VRING_ENABLE)."""
        for q in self.queues:
            self.conn.set_vring_enable(q.index, q.index // 2 < count)
        self.enabled_pairs = count

    # -- RX

    def post_rx(self, count: int | None = None, size: int | None = None, *,
                pair: int = 0) -> int:
        """Post `count` RX buffers (default: fill the ring) and kick; how many were posted."""
        q = self.rx_of(pair)
        st = self._pairs[pair]
        size = size or self.rx_buf_size
        room = self.queue_size - q.in_flight
        count = room if count is None else min(count, room)
        for _ in range(count):
            gpa = st.rx_free.pop() if st.rx_free and size == self.rx_buf_size \
                else self.mem.alloc(size, 64)
            head = q.post([(gpa, size, True)], publish=False)
            st.rx_bufs[head] = gpa
        q.publish()
        q.kick()
        return count

    def reap_rx(self, *, pair: int = 0) -> list[tuple[bytes, bytes]]:
        """Frames completed so far as (12-byte header, frame); buffers are not re-posted."""
        st = self._pairs[pair]
        frames = []
        for head, length in self.rx_of(pair).reap():
            gpa = st.rx_bufs.pop(head)
            data = self.mem.read(gpa, length)
            st.rx_free.append(gpa)
            if not st.partial:
                if length < NET_HDR.size:
                    raise FrontendError(f"RX buffer with {length} bytes, less than a header")
                st.partial_need = NET_HDR.unpack_from(data)[6]
                if st.partial_need < 1:
                    raise FrontendError("RX header with num_buffers 0")
            st.partial.append(data)
            if len(st.partial) == st.partial_need:
                whole = b"".join(st.partial)
                st.partial = []
                frames.append((whole[: NET_HDR.size], whole[NET_HDR.size :]))
        return frames

    def receive(self, count: int = 1, timeout: float | None = None,
                refill: bool = True, *, pair: int = 0) -> list[tuple[bytes, bytes]]:
        """Wait for `count` frames (re-posting RX buffers as they are used)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        rx = self.rx_of(pair)
        frames: list[tuple[bytes, bytes]] = []
        while len(frames) < count:
            got = self.reap_rx(pair=pair)
            frames += got
            if got and refill:
                self.post_rx(pair=pair)
            if len(frames) >= count:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"received {len(frames)} of {count} frames")
            select.select([rx.callfd], [], [], min(left, POLL_SLICE))
            _drain_eventfd(rx.callfd)
        return frames

    # -- TX

    def _tx_buffer(self, st: _NetPair) -> int:
        return st.tx_free.pop() if st.tx_free else self.mem.alloc(NET_HDR.size + 65550, 64)

    def send(self, frame: bytes, header: bytes = bytes(NET_HDR.size), *,
             kick: bool = True, pair: int = 0) -> int:
        """Post one frame behind `header` in one readable descriptor; returns its head."""
        self.reap_tx(pair=pair)
        st = self._pairs[pair]
        tx = self.tx_of(pair)
        gpa = self._tx_buffer(st)
        self.mem.write(gpa, header + frame)
        head = tx.post([(gpa, len(header) + len(frame), False)])
        st.tx_bufs[head] = gpa
        if kick:
            tx.kick()
        return head

    def reap_tx(self, *, pair: int = 0) -> list[tuple[int, int]]:
        st = self._pairs[pair]
        done = self.tx_of(pair).reap()
        for head, _length in done:
            gpa = st.tx_bufs.pop(head, None)
            if gpa is not None:
                st.tx_free.append(gpa)
        st.tx_done += done
        return done

    def wait_tx(self, head: int, timeout: float | None = None, *, pair: int = 0) -> int:
        """Wait for TX chain `head` to complete; its used length."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        st = self._pairs[pair]
        tx = self.tx_of(pair)
        while True:
            for i, (h, length) in enumerate(st.tx_done):
                if h == head:
                    del st.tx_done[i]
                    return length
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"TX head {head} did not complete")
            if not self.reap_tx(pair=pair):
                select.select([tx.callfd], [], [], min(left, POLL_SLICE))
                _drain_eventfd(tx.callfd)
