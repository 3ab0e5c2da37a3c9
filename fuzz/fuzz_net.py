"""Fuzz virtio-net (backend/net.py): TX chains through the checks to the tap, tap frames into RX.

The real NetDevice serves real SplitQueue rings through serve_batch, as the shared dispatcher
does. Guest memory is one 512 KiB sealed memfd region at GPA 0 (front-end address
0x7F00_0000_0000 + GPA): a 128-entry ring at its start, buffers after it with guard bytes
between. The device has two queue pairs; each tap queue is one end of an AF_UNIX datagram
socketpair, which behaves like one for the device: a write is one frame, a read returns one
frame (the rest is lost if the buffers are too small). The tap ioctls are the only part left
out: the offloads the device "probes" are fixed and the negotiated features are stored as
set_features stores them once the tap took them.

Input (numbers little-endian; past the end everything reads as zero):

    <B  mode: bit 0 set for RX, clear for TX; bit 1: queue pair 1, else pair 0
    <H  features: bit i negotiates FEATURES[i] (VIRTIO_F_VERSION_1 always)
  TX
    <BB chains (1..4), serve_batch budget (1..4)
    per chain:
      <B nseg (1..8), then per segment <HB: length, flags (bit 0: device-writable)
      <H n, n bytes: the chain's bytes, header first, repeated to fill its readable buffers
      <B bit 7: the tap refuses the frame (EINVAL); bits 0-6: n, then if n: <H offset, n bytes:
         what the guest writes over the chain's readable bytes after the device checked it and
         before the tap reads it (a racing vCPU)
  RX
    <B  chains (0..32); per chain <B nseg (1..4), then per segment <HB: length, flags (bit 0:
        device-readable, which makes it no receive chain)
    <B  chains made available for the first round; the rest come in the second
    <B  frames (0..6); per frame: 3 bytes length (ETH_HLEN..MAX_FRAME), 10 bytes of the tap's
        vnet header, <H n + n bytes repeated as the frame
    <B  frames queued on the tap for the first round; the rest come before the second
    <B  serve_batch budget (1..8)

TX invariants:
  * check_tx_chain raises only NetHeaderError, with a one-line reason, and accepts exactly the
    chains the reference below accepts (written from virtio 1.2 5.1.6.2): no device-writable
    buffer; ETH_HLEN <= frame <= MAX_FRAME; flags only NEEDS_CSUM, and that only with
    VIRTIO_NET_F_CSUM and csum_start + csum_offset + 2 inside the frame; hdr_len inside the
    frame; a GSO type only TCPv4/TCPv6 with HOST_TSO4/HOST_TSO6 negotiated, NEEDS_CSUM and a
    non-zero gso_size (the device offers neither HOST_UFO nor HOST_ECN); an accepted header
    comes back with the fields it was given;
  * the tap gets one write per accepted chain, in order, and nothing else: the header the
    device checked, then the frame as guest memory holds it when the tap reads it; whatever the
    guest writes meanwhile, every header the tap gets obeys the rules above for the negotiated
    features (the tap checks lengths and offsets, not features: it takes UFO, ECN and
    DATA_VALID from anyone);
  * a frame the tap refuses is dropped and counted, nothing else;
  * every chain completes with used length 0, in avail order; a chain the ring code refuses
    (readable after writable) raises RingError and nothing after it is served;
  * the frames go to the ring's own tap queue, never the other pair's;
  * counters (the device's and the pair's) add up; drops are counted under DROP_REASONS; guest
    memory changes only in the used ring.
  Left to the tap, which refuses them itself (EINVAL, a counted drop): gso_size 0xFFFF
  (GSO_BY_FRAGS), a TCP header that does not fit after csum_start, a GSO type that does not
  match the frame's IP version.

RX invariants:
  * serve_batch raises only RingError, and only naming a chain that is no receive chain (a
    device-readable buffer, or fewer than 12 bytes);
  * heads are used in avail order, each once, each with 1 <= used length <= its capacity;
  * the used entries decode as frames: the first buffer's num_buffers counts the frame's entries
    (1 without MRG_RXBUF), and their bytes joined are the tap's frame with num_buffers put in
    and, for a guest without GUEST_CSUM, flags zero (a tap sets DATA_VALID regardless);
  * the delivered frames are the tap's frames in order; one is missing only if, without
    MRG_RXBUF, it was larger than the buffer it was offered (and counted as dropped); a frame
    the device holds back for more buffers (stash) is the last it took off the tap, byte for
    byte, and is the first delivered once there are enough;
  * the tap is not read ahead of the guest's buffers, and the device stops only when the next
    frame cannot fit the buffers left; the other pair's tap queue is not read;
  * counters (the device's and the pair's) match; guest memory changes only in the writable
    buffers and the used ring.

    python -m fuzz net --seconds 60
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import socket
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz._harness import Invariant, Reader, instrumented, one_line, require, time_limit

with instrumented(__name__, "backend"):
    import backend.net as net_module
    from backend.memory import GuestMemory
    from backend.net import (
        DROP_REASONS,
        DROP_TAP_REFUSED,
        ETH_HLEN,
        F_CSUM,
        F_GUEST_CSUM,
        F_GUEST_ECN,
        F_GUEST_TSO4,
        F_GUEST_TSO6,
        F_GUEST_UFO,
        F_HOST_ECN,
        F_HOST_TSO4,
        F_HOST_TSO6,
        F_HOST_UFO,
        F_MRG_RXBUF,
        F_RING_EVENT_IDX,
        F_VERSION_1,
        GSO_ECN,
        GSO_NONE,
        GSO_TCPV4,
        GSO_TCPV6,
        GSO_UDP,
        HDR_F_NEEDS_CSUM,
        HEADER,
        HEADER_SIZE,
        MAX_FRAME,
        NetDevice,
        NetHeader,
        NetHeaderError,
        RxQueue,
        check_tx_chain,
    )
    from backend.vhost_user import MemRegion, VringAddr
    from backend.virtqueue import DESC_F_NEXT, DESC_F_WRITE, RingError, ring_sizes

FEATURES = (F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_HOST_TSO4, F_HOST_TSO6,
            F_HOST_ECN, F_HOST_UFO, F_MRG_RXBUF, F_GUEST_ECN, F_GUEST_UFO, F_RING_EVENT_IDX)
MODE_RX = 1
MODE_PAIR_1 = 2
PAIRS = 2
UADDR_BASE = 0x7F00_0000_0000
REGION = 0x80000
QUEUE_SIZE = 128
DESC_AT, AVAIL_AT, USED_AT = 0x0, 0x800, 0x1000
BUF_BASE = 0x2000
GUARD = 8
MARKER = 0xA5
MAX_TX_CHAINS, MAX_TX_SEGS = 4, 8
MAX_RX_CHAINS, MAX_RX_SEGS = 32, 4
MAX_RX_FRAMES = 6
MAX_RX_BYTES = 256 << 10  # what the socketpair queues for sure (SO_SNDBUF below)
TAP_NUM_BUFFERS = b"\xee\xee"  # a tap leaves the last 2 header bytes alone: the device fills them
MAC = bytes.fromhex("525400123456")
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
_HEAD_RE = re.compile(r"\bhead (\d+)\b")

Segment = tuple[int, int, bool]  # (GPA, length, flag: TX device-writable / RX device-readable)


class _Device(NetDevice):
    """NetDevice over a socket instead of a tap: the offloads it would probe are given."""

    def _probe_offloads(self) -> int:
        return F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6


class _World:
    """The process-wide guest memory and the tap stand-in, set up once."""

    def __init__(self) -> None:
        fd = os.memfd_create("fuzz-net-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, REGION)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.fd = fd
        self.mem = GuestMemory([MemRegion(0, REGION, UADDR_BASE, 0)], [fd])
        self.view = self.mem.regions[0].view
        # Per queue pair: (the device's end, the host's end) of its stand-in tap queue.
        self.taps = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(PAIRS)]
        for pair in self.taps:
            for sock in pair:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                sock.setblocking(False)
        self.marker = bytes([MARKER]) * REGION
        self.zero = bytes(BUF_BASE)

    def drain(self, sock: socket.socket) -> list[bytes]:
        """Every datagram waiting on `sock`."""
        got = []
        while True:
            try:
                got.append(sock.recv(HEADER_SIZE + MAX_FRAME + 4096))
            except BlockingIOError:
                return got

    def read(self, segments: list[Segment]) -> bytes:
        return b"".join(bytes(self.view[gpa : gpa + n]) for gpa, n, _ in segments)

    def write(self, segments: list[Segment], data: bytes, offset: int = 0) -> None:
        scatter(self.view, segments, data, offset)


def scatter(memory: memoryview | bytearray, segments: list[Segment], data: bytes,
            offset: int) -> None:
    """Write `data` at byte `offset` of the concatenation of `segments` in `memory`."""
    for gpa, n, _ in segments:
        if offset >= n:
            offset -= n
            continue
        take = min(n - offset, len(data))
        memory[gpa + offset : gpa + offset + take] = data[:take]
        data = data[take:]
        offset = 0
        if not data:
            return


_world: _World | None = None


def world() -> _World:
    global _world
    if _world is None:
        _world = _World()
    return _world


def repeat(pattern: bytes, n: int) -> bytes:
    if not pattern:
        return bytes(n)
    return (pattern * (n // len(pattern) + 1))[:n]


# --- the reference: what virtio 1.2 (5.1.6.2) lets a driver send ------------------------------


def header_violation(features: int, fields: tuple[int, ...], frame_len: int) -> str | None:
    """Why a TX header may not go to the tap with `features` negotiated, or None."""
    flags, gso, hdr_len, gso_size, csum_start, csum_offset, _num_buffers = fields
    if flags & ~HDR_F_NEEDS_CSUM:
        return f"flags {flags:#x} are not for transmit"
    if flags & HDR_F_NEEDS_CSUM:
        if not features & F_CSUM:
            return "NEEDS_CSUM without VIRTIO_NET_F_CSUM"
        if csum_start + csum_offset + 2 > frame_len:
            return f"checksum at {csum_start}+{csum_offset} outside a {frame_len}-byte frame"
    if hdr_len > frame_len:
        return f"hdr_len {hdr_len} outside a {frame_len}-byte frame"
    if gso == GSO_NONE:
        return None
    if gso & GSO_ECN and not features & F_HOST_ECN:
        return "GSO ECN without VIRTIO_NET_F_HOST_ECN"
    needed = {GSO_TCPV4: F_HOST_TSO4, GSO_TCPV6: F_HOST_TSO6, GSO_UDP: F_HOST_UFO}.get(
        gso & ~GSO_ECN)
    if needed is None:
        return f"GSO type {gso:#x} is not one a driver may send"
    if not features & needed:
        return f"GSO type {gso:#x} without its HOST feature"
    if not flags & HDR_F_NEEDS_CSUM:
        return "GSO without NEEDS_CSUM"
    if gso_size == 0:
        return "GSO with gso_size 0"
    return None


def tx_reference(features: int, readable: bytes, has_writable: bool) -> str | None:
    """Why the device must refuse a TX chain, or None if it must send it."""
    if has_writable:
        return "device-writable buffer"
    if len(readable) < HEADER_SIZE:
        return "shorter than the header"
    frame_len = len(readable) - HEADER_SIZE
    if not ETH_HLEN <= frame_len <= MAX_FRAME:
        return f"a {frame_len}-byte frame"
    fields = HEADER.unpack_from(readable)
    if fields[1] not in (GSO_NONE, GSO_TCPV4, GSO_TCPV6):
        return f"GSO type {fields[1]:#x}"  # the device offers neither HOST_UFO nor HOST_ECN
    return header_violation(features, fields, frame_len)


# --- driving the device -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Write:
    """What happens when a sendable chain is written to the tap: first the guest writes `data`
    at `offset` of its readable bytes (a vCPU storing into a buffer the device already checked,
    at the last moment it can: when the tap reads guest memory); then the tap takes the frame,
    or refuses it."""

    segments: list[Segment]
    offset: int
    data: bytes
    refused: bool


class _RacingOs:
    """backend.net's `os` while an input runs: the n-th writev does the n-th _Write first."""

    def __init__(self, writes: list[_Write]) -> None:
        self.writes = writes
        self.calls = 0

    def __getattr__(self, name: str) -> object:
        return getattr(os, name)

    def writev(self, fd: int, buffers: object) -> int:
        write = self.writes[self.calls] if self.calls < len(self.writes) else None
        self.calls += 1
        if write is not None:
            world().write(write.segments, write.data, write.offset)
            if write.refused:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return os.writev(fd, buffers)


@contextlib.contextmanager
def racing_os(writes: list[_Write]) -> Iterator[_RacingOs]:
    racing = _RacingOs(writes)
    real = net_module.os
    net_module.os = racing
    try:
        yield racing
    finally:
        net_module.os = real


def layout(r: Reader, nchains: int, max_segs: int, pos: int) -> tuple[list[list[Segment]], int]:
    """Read `nchains` chains of segments; place them from `pos` with guards between."""
    chains = []
    for _ in range(nchains):
        segments = []
        for _ in range(1 + r.u8() % max_segs):
            length, flags = r.u16(), r.u8()
            length = max(0, min(length, REGION - GUARD - pos))
            segments.append((pos, length, bool(flags & 1)))
            pos = min(pos + length + GUARD, REGION - GUARD)
        chains.append(segments)
    return chains, pos


def build_ring(chains: list[list[Segment]], writable_flag: bool) -> list[int]:
    """Descriptors and avail entries for `chains` (avail idx left at 0); their heads.

    `writable_flag`: a segment's flag marks it device-writable (TX) or device-readable (RX).
    """
    view = world().view
    heads = []
    index = 0
    for avail_slot, segments in enumerate(chains):
        heads.append(index)
        for i, (gpa, length, flag) in enumerate(segments):
            writable = flag if writable_flag else not flag
            flags = (DESC_F_WRITE if writable else 0) | (
                DESC_F_NEXT if i < len(segments) - 1 else 0)
            _DESC.pack_into(view, DESC_AT + 16 * index, gpa, length, flags, index + 1)
            index += 1
        _U16.pack_into(view, AVAIL_AT + 4 + 2 * avail_slot, heads[-1])
    return heads


def set_avail_idx(count: int) -> None:
    _U16.pack_into(world().view, AVAIL_AT + 2, count)


def used_entries(queue_used_idx: int) -> list[tuple[int, int]]:
    view = world().view
    idx = _U16.unpack_from(view, USED_AT + 2)[0]
    require(idx == queue_used_idx, f"used->idx is {idx}, the device counted {queue_used_idx}")
    return [_USED_ELEM.unpack_from(view, USED_AT + 4 + 8 * i) for i in range(idx)]


def open_queue(device: NetDevice, index: int, event_idx: bool):
    addr = VringAddr(index=index, flags=0, desc_user_addr=UADDR_BASE + DESC_AT,
                     used_user_addr=UADDR_BASE + USED_AT, avail_user_addr=UADDR_BASE + AVAIL_AT,
                     log_guest_addr=0)
    return device.open_queue(index, world().mem, QUEUE_SIZE, addr, 0, event_idx)


def only_changed(before: bytes, after: bytes, allowed: list[tuple[int, int]], what: str) -> None:
    """`after` equals `before` outside the [start, stop) ranges in `allowed`."""
    pos = 0
    for start, stop in [*sorted(allowed), (len(before), len(before))]:
        if start > pos and before[pos:start] != after[pos:start]:
            first = next(i for i in range(pos, start) if before[i] != after[i])
            raise Invariant(f"the device wrote guest memory at GPA {first:#x}, {what}")
        pos = max(pos, stop)


def check(data: bytes) -> None:
    with time_limit(2.0):
        _check(data)


def _check(data: bytes) -> None:
    w = world()
    for pair in w.taps:
        for sock in pair:
            w.drain(sock)
    r = Reader(data)
    mode = r.u8()
    selector = r.u16()
    features = F_VERSION_1
    for bit, feature in enumerate(FEATURES):
        if selector >> bit & 1:
            features |= feature
    device = _Device([tap.fileno() for tap, _host in w.taps], mac=MAC)
    device.features = features  # what set_features keeps once the tap took the offloads
    pair = 1 if mode & MODE_PAIR_1 else 0
    tap, host = w.taps[pair]
    other_tap, other_host = w.taps[1 - pair]
    other_tap_frame = b"\0" * HEADER_SIZE + b"for the other queue pair"
    other_host.send(other_tap_frame)
    if mode & MODE_RX:
        _check_rx(r, device, features, pair, tap, host)
    else:
        _check_tx(r, device, features, pair, tap, host)
    require(w.drain(other_tap) == [other_tap_frame], "the other pair's tap queue was read")
    require(not w.drain(other_host), "a frame went out on the other pair's tap queue")
    other = device.pairs[1 - pair]
    require(other.stash is None and not other.rx_frames and not other.tx_frames,
            "the other queue pair was used")


# --- TX -----------------------------------------------------------------------------------------


def _check_tx(r: Reader, device: NetDevice, features: int, pair: int, tap: socket.socket,
              host: socket.socket) -> None:
    w = world()
    nchains = 1 + r.u8() % MAX_TX_CHAINS
    budget = 1 + r.u8() % 4
    chains: list[list[Segment]] = []
    contents: list[bytes] = []
    races: list[tuple[int, bytes, bool]] = []
    pos = BUF_BASE
    for _ in range(nchains):
        (segments,), pos = layout(r, 1, MAX_TX_SEGS, pos)
        chains.append(segments)
        contents.append(r.bytes(r.u16()))
        n = r.u8()
        races.append((r.u16(), r.bytes(n & 0x7F), bool(n & 0x80)) if n & 0x7F
                     else (0, b"", bool(n & 0x80)))
    view = w.view
    view[:BUF_BASE] = w.zero
    view[BUF_BASE:pos] = w.marker[: pos - BUF_BASE]
    heads = build_ring(chains, writable_flag=True)

    # What the reference says of each chain, and the device's own check, before serving.
    readables: list[list[Segment]] = []
    expected: list[str | None] = []
    well_formed: list[bool] = []
    for segments, content in zip(chains, contents, strict=True):
        readable = [s for s in segments if s[1] and not s[2]]
        writable = [s for s in segments if s[1] and s[2]]
        total = sum(n for _, n, _ in readable)
        w.write(readable, repeat(content, total))
        readables.append(readable)
        seen_writable = False
        ok = True
        for _gpa, n, flag in segments:
            if n and flag:
                seen_writable = True
            elif n and seen_writable:
                ok = False
        well_formed.append(ok)
        reason = tx_reference(features, w.read(readable), bool(writable))
        expected.append(reason)
        if not ok:
            continue
        views = [w.mem.gpa(g, n) for g, n, _ in readable]
        wviews = [w.mem.gpa(g, n) for g, n, _ in writable]
        try:
            hdr = check_tx_chain(views, wviews, features)
        except NetHeaderError as exc:
            one_line(str(exc), "NetHeaderError")
            require(reason is not None, f"a valid TX chain was refused: {exc} "
                    f"(features {features:#x})")
        else:
            require(reason is None, f"a TX chain was accepted though {reason} "
                    f"(features {features:#x})")
            require(isinstance(hdr, NetHeader)
                    and (hdr.flags, hdr.gso_type, hdr.hdr_len, hdr.gso_size, hdr.csum_start,
                         hdr.csum_offset, hdr.num_buffers)
                    == HEADER.unpack_from(w.read(readable)), f"header came back as {hdr}")
        finally:
            for v in (*views, *wviews):
                v.release()

    checked = [w.read(readable) for readable in readables]
    writes = [_Write(readables[i], offset % len(checked[i]), data, refused)
              for i, (offset, data, refused) in enumerate(races) if expected[i] is None]
    set_avail_idx(nchains)
    before = bytes(view)
    event_idx = bool(features & F_RING_EVENT_IDX)
    queue = open_queue(device, 2 * pair + 1, event_idx)
    broken = None
    try:
        with racing_os(writes) as racing:
            for _ in range(nchains + 1):
                try:
                    if not device.serve_batch(queue, budget):
                        break
                except RingError as exc:
                    broken = exc
                    break
        queue.publish_used()
        entries = used_entries(queue.used_idx)
    finally:
        queue.release()
    after = bytes(view)

    served = len(entries)
    if broken is not None:
        one_line(str(broken), "RingError")
        require(served < nchains and not well_formed[served],
                f"RingError on TX chain {served}, which is well formed: {broken}")
    else:
        require(served == nchains, f"{served} of {nchains} TX chains served")
        require(all(well_formed), "a TX chain with a readable after a writable was served")
    require(entries == [(heads[i], 0) for i in range(served)],
            f"TX used entries {entries}, heads {heads[:served]}")

    # The tap: one write per accepted chain, the checked header, then the frame as it is now.
    sent = w.drain(host)
    sendable = [i for i in range(served) if expected[i] is None]
    accepted = [i for k, i in enumerate(sendable) if not writes[k].refused]
    require(len(sent) == len(accepted),
            f"the tap got {len(sent)} frames for {len(accepted)} sendable chains it takes")
    for i, got in zip(accepted, sent, strict=True):
        now = w.read(readables[i])
        require(len(got) == len(now), f"the tap got {len(got)} bytes of a {len(now)}-byte chain")
        require(got[:HEADER_SIZE] == checked[i][:HEADER_SIZE],
                f"the tap got header {got[:HEADER_SIZE].hex()}, the device checked "
                f"{checked[i][:HEADER_SIZE].hex()}")
        require(got[HEADER_SIZE:] == now[HEADER_SIZE:], "the tap got other frame bytes")
        violation = header_violation(features, HEADER.unpack_from(got), len(got) - HEADER_SIZE)
        require(violation is None, f"the tap got a header with {violation} "
                f"(features {features:#x})")
    require(racing.calls == len(sendable), f"{racing.calls} writes for {len(sendable)} frames")

    c = device.counters
    dropped = served - len(accepted)
    require(c.tx_frames == len(sent) and c.tx_dropped == dropped,
            f"counters say {c.tx_frames} sent, {c.tx_dropped} dropped; the tap got "
            f"{len(sent)}, {dropped} were refused")
    require(c.drop_reasons[DROP_TAP_REFUSED] == len(sendable) - len(accepted),
            f"{c.drop_reasons[DROP_TAP_REFUSED]} counted as refused by the tap, "
            f"{len(sendable) - len(accepted)} were")
    require(c.tx_bytes == sum(len(s) - HEADER_SIZE for s in sent), "tx_bytes")
    require(device.pairs[pair].tx_frames == c.tx_frames, "the pair's tx_frames")
    require(sum(c.drop_reasons.values()) == dropped, "a drop without a reason")
    require(set(c.drop_reasons) <= set(DROP_REASONS), f"drop reasons {dict(c.drop_reasons)}")
    require(not c.rx_frames and not c.rx_dropped, "TX counted as RX")

    # Only the used ring changed (and what the racing guest wrote).
    expect = bytearray(before)
    for write in writes[: racing.calls]:
        scatter(expect, write.segments, write.data, write.offset)
    used_len = ring_sizes(QUEUE_SIZE, event_idx)[2]
    only_changed(bytes(expect), after, [(USED_AT, USED_AT + used_len)],
                 "outside the used ring on TX")


# --- RX -----------------------------------------------------------------------------------------


def same_frame(delivered: bytes, frame: bytes, keep_flags: bool) -> bool:
    """A delivered frame is the tap's frame with num_buffers (bytes 10..11) put in, and its
    flags (byte 0) cleared for a guest without GUEST_CSUM."""
    flags = frame[:1] if keep_flags else b"\0"
    return (len(delivered) == len(frame) and delivered[:1] == flags
            and delivered[1:10] == frame[1:10] and delivered[12:] == frame[12:])


class _RxLedger:
    """What the guest saw of RX so far, checked round by round against the tap's frames."""

    def __init__(self, queue: RxQueue, mergeable: bool, keep_flags: bool, heads: list[int],
                 writables: list[list[Segment]], capacity: list[int], bad: list[bool]) -> None:
        self.pair = queue.pair  # where a frame that waits for buffers is kept
        self.mergeable = mergeable
        self.keep_flags = keep_flags
        self.heads = heads
        self.writables = writables
        self.capacity = capacity
        self.bad = bad
        self.used = 0  # used entries checked so far
        self.delivered: list[bytes] = []
        self.dropped = 0
        self.stashed: bytes | None = None  # the tap frame the device holds back

    def round(self, entries: list[tuple[int, int]], avail: int, consumed: list[bytes],
              left: int, broken: RingError | None) -> None:
        """Check one round: `entries` all used entries so far, `consumed` the frames the device
        took off the tap in it, `left` how many it left there."""
        w = world()
        start = self.used
        for k in range(start, len(entries)):
            head, length = entries[k]
            require(k < avail and head == self.heads[k], f"used entry {k} is head {head}; "
                    f"{avail} chains are available, the next is {self.heads[k:k + 1]}")
            require(not self.bad[k], f"chain {k} is no receive chain, yet it was used")
            require(1 <= length <= self.capacity[k],
                    f"used length {length} of a {self.capacity[k]}-byte chain")
        decoded = []  # (first entry, frame bytes)
        k = start
        while k < len(entries):
            length = entries[k][1]
            require(length >= HEADER_SIZE, f"a frame's first buffer holds {length} bytes")
            count = _U16.unpack_from(w.read(self.writables[k]), 10)[0]
            require(1 <= count <= len(entries) - k,
                    f"num_buffers {count} with {len(entries) - k} used entries left")
            require(self.mergeable or count == 1, f"num_buffers {count} without MRG_RXBUF")
            decoded.append((k, b"".join(w.read(self.writables[j])[: entries[j][1]]
                                        for j in range(k, k + count))))
            k += count
        self.used = len(entries)

        pending = ([self.stashed] if self.stashed is not None else []) + consumed
        self.stashed = None
        unaccounted = []
        index = 0
        for frame in pending:
            if index < len(decoded):
                offered, got = decoded[index]
                if same_frame(got, frame, self.keep_flags):
                    self.delivered.append(got)
                    index += 1
                    continue
            else:
                offered = len(entries)
            if (not self.mergeable and offered < avail and not self.bad[offered]
                    and len(frame) > self.capacity[offered]):
                self.dropped += 1  # too large for the buffer it was offered: dropped
                continue
            unaccounted.append(frame)
        require(index == len(decoded),
                f"delivered frame {len(self.delivered)} is not the tap's next frame")
        stash = self.pair.stash
        if stash is not None:
            require(self.mergeable, "a frame held back without MRG_RXBUF")
            require(bool(unaccounted) and same_frame(stash, unaccounted[-1], self.keep_flags),
                    "the frame held back is not the last one taken off the tap")
            self.stashed = unaccounted.pop()
        if broken is not None:
            require(len(unaccounted) <= 1, f"{len(unaccounted)} frames lost with the ring")
            return
        require(not unaccounted, f"{len(unaccounted)} frames taken off the tap went nowhere "
                f"(MRG_RXBUF {self.mergeable})")
        rest = range(len(entries), avail)
        room = sum(self.capacity[i] for i in rest)
        if stash is not None:
            require(not any(self.bad[i] for i in rest) and room < len(stash),
                    f"a {len(stash)}-byte frame waits while the guest offers {room} bytes")
        elif left:
            require(not rest, f"{left} frames wait on the tap while the guest offers "
                    f"{len(rest)} buffers")


def _check_rx(r: Reader, device: NetDevice, features: int, pair: int, tap: socket.socket,
              host: socket.socket) -> None:
    w = world()
    mergeable = bool(features & F_MRG_RXBUF)
    nchains = r.u8() % (MAX_RX_CHAINS + 1)
    chains, pos = layout(r, nchains, MAX_RX_SEGS, BUF_BASE)
    first_chains = r.u8() % (nchains + 1)
    frames: list[bytes] = []
    queued = 0
    for _ in range(r.u8() % (MAX_RX_FRAMES + 1)):
        length = r.int_in_range(ETH_HLEN, MAX_FRAME)
        vnet = r.bytes(10).ljust(10, b"\0")
        pattern = r.bytes(r.u16())
        if queued + HEADER_SIZE + length <= MAX_RX_BYTES:
            frames.append(vnet + TAP_NUM_BUFFERS + repeat(pattern, length))
            queued += HEADER_SIZE + length
    first_frames = r.u8() % (len(frames) + 1)
    budget = 1 + r.u8() % 8

    view = w.view
    view[:BUF_BASE] = w.zero
    view[BUF_BASE:pos] = w.marker[: pos - BUF_BASE]
    heads = build_ring(chains, writable_flag=False)
    writables = [[s for s in segs if s[1] and not s[2]] for segs in chains]
    capacity = [sum(n for _, n, _ in ws) for ws in writables]
    bad = [any(n and flag for _, n, flag in segs) or cap < HEADER_SIZE
           for segs, cap in zip(chains, capacity, strict=True)]
    before = bytes(view)
    event_idx = bool(features & F_RING_EVENT_IDX)
    queue = open_queue(device, 2 * pair, event_idx)
    ledger = _RxLedger(queue, mergeable, bool(features & F_GUEST_CSUM), heads, writables,
                       capacity, bad)
    waiting: list[bytes] = []  # frames the device left on the tap, in order
    try:
        for avail, batch in ((first_chains, frames[:first_frames]),
                             (nchains, frames[first_frames:])):
            set_avail_idx(avail)
            on_tap = []
            for frame in waiting + batch:  # what the last round left goes back first
                try:
                    host.send(frame)
                except OSError:
                    break  # the stand-in tap is full: like a full tap, it loses the rest
                on_tap.append(frame)
            broken = None
            for _ in range(MAX_RX_CHAINS + 2):
                try:
                    got = device.serve_batch(queue, budget)
                except RingError as exc:
                    one_line(str(exc), "RingError")
                    found = _HEAD_RE.search(str(exc))
                    head = int(found.group(1)) if found else -1
                    require(head in heads and bad[heads.index(head)],
                            f"RingError names no bad receive chain: {exc}")
                    broken = exc
                    break
                require(got >= 0, f"serve_batch returned {got}")
                if not got:
                    break
            else:
                raise Invariant("RX serve_batch keeps reporting work")
            queue.publish_used()
            waiting = w.drain(tap)
            require(waiting == on_tap[len(on_tap) - len(waiting) :], "the tap's queue changed")
            ledger.round(used_entries(queue.used_idx), avail,
                         on_tap[: len(on_tap) - len(waiting)], len(waiting), broken)
            if broken is not None:
                break
    finally:
        queue.release()
    after = bytes(view)

    c = device.counters
    require(c.rx_frames == len(ledger.delivered) and c.rx_dropped == ledger.dropped,
            f"counters say {c.rx_frames} received, {c.rx_dropped} dropped; "
            f"{len(ledger.delivered)} were delivered, {ledger.dropped} dropped")
    require(c.rx_bytes == sum(len(f) - HEADER_SIZE for f in ledger.delivered), "rx_bytes")
    require(device.pairs[pair].rx_frames == c.rx_frames, "the pair's rx_frames")
    require(sum(c.drop_reasons.values()) == ledger.dropped
            and set(c.drop_reasons) <= set(DROP_REASONS), f"drop reasons {dict(c.drop_reasons)}")
    require(not c.tx_frames and not c.tx_dropped, "RX counted as TX")

    used_len = ring_sizes(QUEUE_SIZE, event_idx)[2]
    allowed = [(USED_AT, USED_AT + used_len), (AVAIL_AT + 2, AVAIL_AT + 4)]  # avail->idx: ours
    allowed += [(gpa, gpa + n) for ws in writables for gpa, n, _ in ws]
    only_changed(before, after, allowed, "outside the writable buffers and the used ring")


if __name__ == "__main__":
    import logging

    from fuzz._harness import fuzz

    logging.getLogger("backend.net").setLevel(logging.ERROR)  # one warning per drop reason
    fuzz(check, "net")
