"""virtio-net (virtio 1.2 section 5.1): frames between a guest's rings and a tap's queues.

The broker creates the tap (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, vnet header size 12) and hands
over open, non-blocking FDs: one, or one per queue pair of a multi-queue tap (IFF_MULTI_QUEUE);
the device never names an interface. The 12-byte
`virtio_net_hdr_v1` in front of every frame is passed straight through to the tap's vnet
header, so checksum and segmentation offloads reach the host stack without being redone here.

Queue pair i is virtqueues 2i (RX) and 2i+1 (TX), served on tap FD i (virtio 1.2 5.1.2). With
more than one pair the device offers VIRTIO_NET_F_MQ and GET_QUEUE_NUM answers the number of
pairs. The control virtqueue is not ours: QEMU keeps it (VIRTIO_NET_F_CTRL_VQ is not a feature
vhost-user back-ends are asked about) and turns the driver's VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET into
SET_VRING_ENABLE of the pairs it enables or disables. A pair that the driver does not use has
its tap queue detached (TUNSETQUEUE), so the kernel spreads the host's frames over the queues
that are read, as QEMU's own tap back-end does; pair 0's queue always stays attached.

TX (odd queues, guest -> tap): `check_tx_chain` (sans-IO) decides whether a chain may become a
frame; one that may not (a device-writable descriptor, header only, shorter than an Ethernet
header, over MAX_FRAME, a header asking for an offload that was not negotiated or pointing
outside the frame) is dropped with a counter and completed with length 0. The rest go out
with one writev(): the header as it was checked (a 12-byte host copy, so a guest that rewrites
it after the check cannot hand the tap an offload that was not agreed: the tap takes any) and
views of the frame in guest memory. The tap validates what it accepts; a frame it refuses is
dropped and counted too.

RX (even queues, tap -> guest): readv() from the tap straight into the guest's writable buffers,
with a host overflow buffer behind them. A frame that fits the first chain costs no copy; a
larger one (GSO) spills into the overflow and is copied into as many more chains as it needs
(VIRTIO_NET_F_MRG_RXBUF; num_buffers says how many). While the guest has no buffers the tap is
not read: its queue holds the frames (and the kernel drops beyond it, as for any slow NIC).

Each tap queue is polled by the loop's epoll: readable marks RX work and wakes its RX ring in
the shared dispatcher, which serves it on the same thread and under the same scheduler as every
other queue. `RxQueue.pending()` reports the ring's buffers only while the tap has frames (or a
frame waits in the stash), so an RX ring with buffers but no traffic is idle, not busy.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import select
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from backend.vhost_user import ProtocolFeature
from backend.virtqueue import (
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_VERSION_1,
    RingError,
    SplitQueue,
)

if TYPE_CHECKING:
    from backend.memory import GuestMemory
    from backend.server import Ring
    from backend.vhost_user import VringAddr

log = logging.getLogger(__name__)

# Feature bits (virtio 1.2 section 5.1.3)
F_CSUM = 1 << 0
F_GUEST_CSUM = 1 << 1
F_MTU = 1 << 3
F_MAC = 1 << 5
F_GUEST_TSO4 = 1 << 7
F_GUEST_TSO6 = 1 << 8
F_GUEST_ECN = 1 << 9
F_GUEST_UFO = 1 << 10
F_HOST_TSO4 = 1 << 11
F_HOST_TSO6 = 1 << 12
F_HOST_ECN = 1 << 13
F_HOST_UFO = 1 << 14
F_MRG_RXBUF = 1 << 15
F_STATUS = 1 << 16
F_CTRL_VQ = 1 << 17
F_MQ = 1 << 22

# virtio_net_hdr_v1 (always 12 bytes with VERSION_1): flags, gso_type, hdr_len, gso_size,
# csum_start, csum_offset, num_buffers; little-endian.
HEADER = struct.Struct("<BBHHHHH")
HEADER_SIZE = HEADER.size
NUM_BUFFERS_OFFSET = 10
HDR_F_NEEDS_CSUM = 1
HDR_F_DATA_VALID = 2
HDR_F_RSC_INFO = 4
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

ETH_HLEN = 14
# The largest Ethernet frame (after the virtio-net header) a guest may send or receive: a
# 64 KiB GSO super-frame plus its Ethernet and VLAN headers.
MAX_FRAME = 65550
STATUS_LINK_UP = 1
CONFIG = struct.Struct("<6sHHH")  # mac, status, max_virtqueue_pairs, mtu
_U16 = struct.Struct("<H")

# <linux/if_tun.h>
TUNSETOFFLOAD = 0x400454D0
TUNSETQUEUE = 0x400454D9
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
_IFREQ = struct.Struct("16sH22x")

RX_QUEUE = 0
TX_QUEUE = 1
# Queue pairs of one device (broker.taps.MAX_QUEUES: one tap queue FD each).
MAX_QUEUE_PAIRS = 8

# Why frames were dropped: a fixed set of names, so that the counters stay bounded however a
# guest varies its frames (the log line says exactly what was wrong, once per message).
DROP_SHORT = "short"  # shorter than the header, header only, or a runt Ethernet frame
DROP_OVERSIZED = "oversized"  # over MAX_FRAME
DROP_WRITABLE = "writable_descriptor"  # a TX chain with device-writable descriptors
DROP_BAD_HEADER = "bad_header"  # flags, offloads or offsets that were not agreed
DROP_TAP_REFUSED = "tap_refused"  # the tap's writev() failed
DROP_RX_TOO_LARGE = "rx_too_large"  # a received frame larger than the guest's buffers
DROP_REASONS = (DROP_SHORT, DROP_OVERSIZED, DROP_WRITABLE, DROP_BAD_HEADER, DROP_TAP_REFUSED,
                DROP_RX_TOO_LARGE)


class NetHeaderError(ValueError):
    """A TX chain cannot become a frame; the message names what is wrong with it, `reason`
    which of DROP_REASONS it counts as."""

    def __init__(self, message: str, reason: str = DROP_BAD_HEADER) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class NetHeader:
    flags: int
    gso_type: int
    hdr_len: int
    gso_size: int
    csum_start: int
    csum_offset: int
    num_buffers: int

    def pack(self) -> bytes:
        """The header's 12 bytes, as parsed: what goes to the tap in front of the frame."""
        return HEADER.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size,
                           self.csum_start, self.csum_offset, self.num_buffers)


def parse_tx_header(data: bytes | memoryview, frame_len: int, features: int) -> NetHeader:
    """Validate the header a driver put in front of a `frame_len`-byte frame.

    Accepts only what the negotiated `features` allow and what stays inside the frame: a
    checksum request needs VIRTIO_NET_F_CSUM and must lie in the frame; hdr_len must not pass
    the frame's end (the tap refuses such a frame); segmentation must be TCPv4 / TCPv6 with
    HOST_TSO4 / HOST_TSO6, a checksum request and a non-zero segment size. The tap re-checks
    lengths and offsets but not the features (it takes UFO, ECN and DATA_VALID from anyone):
    this keeps what the backend writes to what was agreed.
    """
    if len(data) < HEADER_SIZE:
        raise NetHeaderError(f"header is {len(data)} bytes, need {HEADER_SIZE}")
    hdr = NetHeader(*HEADER.unpack_from(data))
    if hdr.flags & ~HDR_F_NEEDS_CSUM:
        raise NetHeaderError(f"header flags {hdr.flags:#x} are not for transmit")
    if hdr.flags & HDR_F_NEEDS_CSUM:
        if not features & F_CSUM:
            raise NetHeaderError("checksum offload requested but not negotiated")
        if hdr.csum_start + hdr.csum_offset + 2 > frame_len:
            raise NetHeaderError(f"checksum at {hdr.csum_start}+{hdr.csum_offset} is outside "
                                 f"the {frame_len}-byte frame")
    if hdr.hdr_len > frame_len:
        raise NetHeaderError(f"header length {hdr.hdr_len} exceeds the {frame_len}-byte frame")
    gso = hdr.gso_type
    if gso == GSO_NONE:
        return hdr
    if gso & GSO_ECN:
        raise NetHeaderError("segmentation with ECN requested but not negotiated")
    needed = {GSO_TCPV4: F_HOST_TSO4, GSO_TCPV6: F_HOST_TSO6}.get(gso)
    if needed is None:
        raise NetHeaderError(f"segmentation type {gso} is not supported")
    if not features & needed:
        raise NetHeaderError(f"segmentation type {gso} requested but not negotiated")
    if not hdr.flags & HDR_F_NEEDS_CSUM:
        raise NetHeaderError("segmentation requested without a checksum request")
    if hdr.gso_size == 0:
        raise NetHeaderError("segmentation requested with a segment size of 0")
    return hdr


def check_tx_chain(readable: list[memoryview], writable: list[memoryview],
                   features: int) -> NetHeader:
    """A walked TX chain as (header, frame): NetHeaderError says why it is not a frame."""
    if writable:
        raise NetHeaderError("transmit chain has device-writable descriptors", DROP_WRITABLE)
    total = sum(map(len, readable))
    if total < HEADER_SIZE:
        raise NetHeaderError(f"chain of {total} bytes is shorter than the header", DROP_SHORT)
    frame_len = total - HEADER_SIZE
    if frame_len == 0:
        raise NetHeaderError("chain holds a header and no frame", DROP_SHORT)
    if frame_len < ETH_HLEN:
        raise NetHeaderError(f"frame of {frame_len} bytes is shorter than an Ethernet header",
                             DROP_SHORT)
    if frame_len > MAX_FRAME:
        raise NetHeaderError(f"frame of {frame_len} bytes exceeds {MAX_FRAME}", DROP_OVERSIZED)
    first = readable[0]
    head = first if len(first) >= HEADER_SIZE else b"".join(readable)[:HEADER_SIZE]
    return parse_tx_header(head, frame_len, features)


def _skip(views: list[memoryview], nbytes: int) -> list[memoryview]:
    """`views` without their first `nbytes` bytes (no copy)."""
    for i, view in enumerate(views):
        if nbytes < len(view):
            return [view[nbytes:], *views[i + 1 :]] if nbytes else views[i:]
        nbytes -= len(view)
    return []


def _put_u16(views: list[memoryview], offset: int, value: int) -> None:
    """Store a little-endian u16 at byte `offset` of the concatenation of `views`."""
    first = views[0]
    if len(first) >= offset + 2:
        _U16.pack_into(first, offset, value)
        return
    data = memoryview(value.to_bytes(2, "little"))
    for view in views:
        if offset >= len(view):
            offset -= len(view)
            continue
        take = min(len(data), len(view) - offset)
        view[offset : offset + take] = data[:take]
        data = data[take:]
        offset = 0
        if not data:
            return


def _copy_into(views: list[memoryview], src: memoryview) -> int:
    """Copy as much of `src` as fits into `views`; the bytes copied."""
    pos = 0
    end = len(src)
    for view in views:
        if pos >= end:
            break
        take = min(len(view), end - pos)
        view[:take] = src[pos : pos + take]
        pos += take
    return pos


def tap_offloads(features: int) -> int:
    """The tap offloads (TUNSETOFFLOAD) that match what the guest accepts on receive."""
    offloads = 0
    if features & F_GUEST_CSUM:
        offloads |= TUN_F_CSUM
        if features & F_GUEST_TSO4:
            offloads |= TUN_F_TSO4
        if features & F_GUEST_TSO6:
            offloads |= TUN_F_TSO6
    return offloads


class QueuePair:
    """Virtqueues 2i (RX) and 2i+1 (TX) and the tap queue FD they are served on."""

    __slots__ = ("attached", "index", "rx_frames", "rx_ready", "rx_ring", "stash", "tap_fd",
                 "tx_frames")

    def __init__(self, index: int, tap_fd: int) -> None:
        self.index = index
        self.tap_fd = tap_fd
        self.rx_ring: Ring | None = None
        self.rx_ready = False  # the tap queue may have frames: not polled until drained
        self.stash: bytes | None = None  # a frame read from the tap that awaits buffers
        self.attached = True  # the tap queue gets frames (TUNSETQUEUE)
        self.rx_frames = 0
        self.tx_frames = 0

    def rx_waiting(self) -> bool:
        return self.rx_ready or self.stash is not None


class RxQueue(SplitQueue):
    """An RX ring: its buffers count as pending work only while there are frames for them."""

    __slots__ = ("pair",)
    pair: QueuePair

    def pending(self) -> int:
        if not self.pair.rx_waiting():
            return 0
        return SplitQueue.pending(self)

    def buffers(self) -> int:
        """Available heads regardless of traffic (raises RingError like pending())."""
        return SplitQueue.pending(self)


class TxQueue(SplitQueue):
    """A TX ring, and the queue pair (tap queue) its frames go out on."""

    __slots__ = ("pair",)
    pair: QueuePair


@dataclass
class NetCounters:
    tx_frames: int = 0
    tx_bytes: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0
    tx_dropped: int = 0
    rx_dropped: int = 0
    drop_reasons: collections.Counter[str] = field(default_factory=collections.Counter)


class NetDevice:
    """A virtio-net device over a tap's queue FDs (not owned: the caller closes them).

    Queue pair i (RX virtqueue 2i, TX 2i+1) is served on `tap_fds[i]`; one FD, one pair. Served
    by the shared dispatcher only: each tap queue's readiness reaches its RX ring through the
    loop's epoll.
    """

    def __init__(self, tap_fds: int | Sequence[int], *, mac: bytes, mtu: int = 1500,
                 name: str = "net", tap: str = "tap") -> None:
        if len(mac) != 6:
            raise ValueError(f"MAC address must be 6 bytes, not {len(mac)}")
        fds = [tap_fds] if isinstance(tap_fds, int) else list(tap_fds)
        if not 1 <= len(fds) <= MAX_QUEUE_PAIRS:
            raise ValueError(f"{len(fds)} tap queues given; a NIC has 1 to {MAX_QUEUE_PAIRS}")
        self.pairs = [QueuePair(index, fd) for index, fd in enumerate(fds)]
        self.tap_fd = fds[0]  # offloads are the tap's, whichever queue sets them
        self.mac = bytes(mac)
        self.mtu = mtu
        self.name = name
        self.tap_name = tap  # the interface, for status and log lines only
        self.num_queues = 2 * len(fds)
        self.vhost_queue_num = len(fds)  # GET_QUEUE_NUM counts queue pairs for net
        # No CONFIG: QEMU serves virtio-net's config space itself (MAC, MTU from its options).
        self.offered_protocol_features = int(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK)
        self.moved = 0
        self.counters = NetCounters()
        self.features = 0
        for fd in fds:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            if not flags & os.O_NONBLOCK:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        self.guest_offloads = self._probe_offloads()
        self.device_features = (
            F_VERSION_1 | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX | F_MAC | F_STATUS | F_MTU
            | F_MRG_RXBUF | F_CSUM | F_HOST_TSO4 | F_HOST_TSO6 | self.guest_offloads
            | (F_MQ if len(fds) > 1 else 0)
        )
        # One thread serves every pair, and a frame is copied out of it before the next read.
        self.overflow = memoryview(bytearray(HEADER_SIZE + MAX_FRAME))
        self._logged: set[str] = set()

    # --- negotiation and config --------------------------------------------------------------

    def _probe_offloads(self) -> int:
        """Guest offload features the tap can provide, found by asking it (then turned off)."""
        found = 0
        for offloads, features in (
            (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
             F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6),
            (TUN_F_CSUM, F_GUEST_CSUM),
        ):
            try:
                fcntl.ioctl(self.tap_fd, TUNSETOFFLOAD, offloads)
            except OSError:
                continue
            found = features
            break
        try:
            fcntl.ioctl(self.tap_fd, TUNSETOFFLOAD, 0)
        except OSError as exc:
            raise ValueError(f"the tap FD refuses TUNSETOFFLOAD: {exc.strerror}") from None
        return found

    def set_features(self, features: int) -> None:
        """The front-end's SET_FEATURES: the tap hands us only what the guest can take."""
        if not features & F_VERSION_1:
            raise ValueError("virtio-net is served only to VIRTIO_F_VERSION_1 drivers")
        try:
            fcntl.ioctl(self.tap_fd, TUNSETOFFLOAD, tap_offloads(features))
        except OSError as exc:
            raise ValueError(f"tap refused offloads: {exc.strerror}") from None
        self.features = features

    def config(self) -> bytes:
        """struct virtio_net_config up to mtu (12 bytes)."""
        return CONFIG.pack(self.mac, STATUS_LINK_UP, len(self.pairs), self.mtu)

    # --- rings (hooks the connection calls) --------------------------------------------------

    def open_queue(self, index: int, mem: GuestMemory, num: int, addr: VringAddr, base: int,
                   event_idx: bool) -> SplitQueue:
        """The queue object for virtqueue `index`: RX rings get the traffic-aware pending(),
        and each knows its queue pair."""
        cls = RxQueue if index % 2 == RX_QUEUE else TxQueue
        queue = cls(mem, num, addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr,
                    base, event_idx=event_idx)
        queue.pair = self.pairs[index // 2]
        return queue

    def ring_started(self, ring: Ring) -> None:
        if ring.index % 2 != RX_QUEUE:
            return
        pair = self.pairs[ring.index // 2]
        loop = ring.conn.loop
        if not loop.shared:
            raise ValueError("virtio-net is served by the shared I/O thread only")
        pair.rx_ring = ring
        events = 0 if pair.rx_ready else select.EPOLLIN
        try:
            loop.register(pair.tap_fd, events, lambda ev: self._on_tap(pair, ev))
        except OSError as exc:
            pair.rx_ring = None
            raise ValueError(f"tap FD cannot be polled: {exc}") from None
        self._steer(pair, ring.enabled)

    def ring_stopped(self, ring: Ring) -> None:
        pair = self.pairs[ring.index // 2]
        if ring.index % 2 == RX_QUEUE and pair.rx_ring is ring:
            ring.conn.loop.unregister(pair.tap_fd)
            pair.rx_ring = None
            self._steer(pair, True)  # whoever connects next finds every queue attached

    def ring_enabled_changed(self, ring: Ring) -> None:
        """SET_VRING_ENABLE of a running ring: the driver starts or stops using its pair."""
        if ring.index % 2 == RX_QUEUE:
            self._steer(self.pairs[ring.index // 2], ring.enabled)

    def _steer(self, pair: QueuePair, attached: bool) -> None:
        """Attach or detach a pair's tap queue, so that the kernel sends the host's frames
        only to queues the driver reads. Pair 0 (and a single-queue tap) always stays."""
        if pair.index == 0 or pair.attached == attached:
            return
        flags = IFF_ATTACH_QUEUE if attached else IFF_DETACH_QUEUE
        try:
            fcntl.ioctl(pair.tap_fd, TUNSETQUEUE, _IFREQ.pack(b"", flags))
        except OSError as exc:
            self._note(f"steer-{attached}", f"{self.name}: cannot "
                       f"{'attach' if attached else 'detach'} queue {pair.index} of tap "
                       f"{self.tap_name}: {exc.strerror}")
            return
        pair.attached = attached
        log.info("%s: queue %d of tap %s %s (queue pair %d %s by the driver)", self.name,
                 pair.index, self.tap_name, "attached" if attached else "detached", pair.index,
                 "enabled" if attached else "disabled")

    def _on_tap(self, pair: QueuePair, events: int) -> None:
        ring = pair.rx_ring
        if ring is None:
            return
        loop = ring.conn.loop
        if events & (select.EPOLLERR | select.EPOLLHUP):
            # A deleted tap stays readable-with-error for ever; stop polling it.
            self._note(f"tap{pair.index}", f"{self.name}: tap FD reports an error or hang-up "
                       f"(tap {self.tap_name} queue {pair.index}); RX stops")
            loop.unregister(pair.tap_fd)
            return
        pair.rx_ready = True
        loop.modify(pair.tap_fd, 0)  # no more wake-ups until RX has drained the tap queue
        loop.dispatcher.kicked(ring)

    def _rx_drained(self, pair: QueuePair) -> None:
        pair.rx_ready = False
        ring = pair.rx_ring
        if ring is not None and pair.tap_fd in ring.conn.loop.handlers:
            # Level-triggered: a frame that came after the last read wakes us at once.
            ring.conn.loop.modify(pair.tap_fd, select.EPOLLIN)

    # --- serving ------------------------------------------------------------------------------

    def serve_batch(self, queue: SplitQueue, budget: int) -> int:
        """Serve up to `budget` heads of `queue` (RX or TX, of any pair); the heads used."""
        if type(queue) is RxQueue:
            return self._serve_rx(queue, budget)
        return self._serve_tx(queue, budget)  # type: ignore[arg-type]

    def process(self, queue: SplitQueue, budget: int) -> int:
        """The per-ring-thread model's entry point: TX only (RX needs the shared loop)."""
        return self.serve_batch(queue, budget)

    def _serve_tx(self, queue: TxQueue, budget: int) -> int:
        count = queue.pending()
        if count > budget:
            count = budget
        pair = queue.pair
        for _ in range(count):
            head = queue.next_head()
            readable, writable = queue.chain(head)
            self._transmit(pair, readable, writable)
            queue.put_used(head, 0)
        return count

    def _transmit(self, pair: QueuePair, readable: list[memoryview],
                  writable: list[memoryview]) -> None:
        counters = self.counters
        try:
            header = check_tx_chain(readable, writable, self.features)
        except NetHeaderError as exc:
            self._drop_tx(exc.reason, str(exc))
            return
        try:
            # The header as checked, not as guest memory holds it now: see the module docstring.
            sent = os.writev(pair.tap_fd, [header.pack(), *_skip(readable, HEADER_SIZE)])
        except OSError as exc:
            self._drop_tx(DROP_TAP_REFUSED, "tap refused the frame: "
                          f"{errno.errorcode.get(exc.errno or 0, exc)}")
            return
        nbytes = sent - HEADER_SIZE
        counters.tx_frames += 1
        counters.tx_bytes += nbytes
        pair.tx_frames += 1
        self.moved += nbytes

    def _drop_tx(self, reason: str, message: str) -> None:
        self.counters.tx_dropped += 1
        self.counters.drop_reasons[reason] += 1
        self._note(message, f"{self.name}: dropped a transmitted frame: {message}")

    def _note(self, key: str, message: str) -> None:
        # Once per message: a guest must not be able to flood the log.
        if key not in self._logged and len(self._logged) < 64:
            self._logged.add(key)
            log.warning("%s (further ones are only counted)", message)

    def _take_rx_chain(self, queue: RxQueue) -> tuple[int, list[memoryview], int]:
        head = queue.next_head()
        readable, writable = queue.chain(head)
        if readable:
            raise RingError(f"receive chain at head {head} has device-readable descriptors")
        capacity = len(writable[0]) if len(writable) == 1 else sum(map(len, writable))
        if capacity < HEADER_SIZE:
            raise RingError(f"receive chain at head {head} holds {capacity} bytes, less than "
                            f"the {HEADER_SIZE}-byte header")
        return head, writable, capacity

    def _serve_rx(self, queue: RxQueue, budget: int) -> int:
        pair = queue.pair
        used = 0
        if pair.stash is not None:
            used = self._deliver_stash(queue)
            if not used:
                return 0
        tap = pair.tap_fd
        overflow = self.overflow
        mergeable = self.features & F_MRG_RXBUF
        # A tap marks DATA_VALID whatever offloads it has; a guest without GUEST_CSUM must see
        # flags 0 (virtio 1.2, 5.1.6.4.1). A chain's first descriptor holds at least 1 byte.
        keep_flags = self.features & F_GUEST_CSUM
        while used < budget:
            if not queue.buffers():
                return used  # wait for the guest's buffers; the tap keeps the frames
            head, writable, capacity = self._take_rx_chain(queue)
            writable.append(overflow)
            try:
                got = os.readv(tap, writable)
            except BlockingIOError:
                queue.unget(1)
                self._rx_drained(pair)
                return used
            except OSError as exc:
                queue.unget(1)
                self._note("rx-error", f"{self.name}: reading queue {pair.index} of tap "
                           f"{self.tap_name} failed: {exc}")
                self._rx_drained(pair)
                return used
            writable.pop()
            if not keep_flags:
                writable[0][0] = 0
            if got <= capacity:
                _put_u16(writable, NUM_BUFFERS_OFFSET, 1)
                queue.put_used(head, got)
                used += 1
            else:
                extra = got - capacity
                if not mergeable or extra > len(overflow):
                    queue.unget(1)  # too large for the guest's buffers: drop it, keep them
                    self._drop_rx("received frame larger than the buffers")
                    continue
                chains = self._spread(queue, head, writable, capacity, overflow[:extra])
                if chains is None:
                    return used  # stashed until the guest adds buffers
                used += chains
            self._count_rx(pair, got)
        return used

    def _spread(self, queue: RxQueue, head: int, writable: list[memoryview], capacity: int,
                rest: memoryview) -> int | None:
        """A frame larger than its first chain: copy the rest into more chains and complete
        them all; None (and the frame stashed, the chains given back) if there are too few."""
        filled = [(head, capacity)]
        pos = 0
        while pos < len(rest):
            if not queue.buffers():
                queue.unget(len(filled))
                queue.pair.stash = b"".join(writable)[:capacity] + bytes(rest)
                return None
            next_head, views, _cap = self._take_rx_chain(queue)
            copied = _copy_into(views, rest[pos:])
            filled.append((next_head, copied))
            pos += copied
        for used_head, length in filled:
            queue.put_used(used_head, length)
        _put_u16(writable, NUM_BUFFERS_OFFSET, len(filled))
        return len(filled)

    def _deliver_stash(self, queue: RxQueue) -> int:
        """Copy the stashed frame into as many chains as it needs: the heads used, or 0 if
        the guest has too few buffers yet."""
        pair = queue.pair
        frame = memoryview(pair.stash or b"")
        mergeable = self.features & F_MRG_RXBUF
        taken: list[tuple[int, list[memoryview], int]] = []
        room = 0
        while room < len(frame):
            if taken and not mergeable:
                queue.unget(len(taken))  # it can never fit one buffer: drop it
                pair.stash = None
                self._drop_rx("received frame larger than the buffers")
                return 0
            if not queue.buffers():
                queue.unget(len(taken))
                return 0
            taken.append(self._take_rx_chain(queue))
            room += taken[-1][2]
        pos = 0
        for used_head, views, _cap in taken:
            copied = _copy_into(views, frame[pos:])
            queue.put_used(used_head, copied)
            pos += copied
        _put_u16(taken[0][1], NUM_BUFFERS_OFFSET, len(taken))
        pair.stash = None
        self._count_rx(pair, len(frame))
        return len(taken)

    def _count_rx(self, pair: QueuePair, got: int) -> None:
        nbytes = got - HEADER_SIZE
        self.counters.rx_frames += 1
        self.counters.rx_bytes += nbytes
        pair.rx_frames += 1
        self.moved += nbytes

    def _drop_rx(self, message: str) -> None:
        self.counters.rx_dropped += 1
        self.counters.drop_reasons[DROP_RX_TOO_LARGE] += 1
        self._note(message, f"{self.name}: dropped a received frame: {message}")

    def snapshot(self) -> dict[str, object]:
        """Frame and byte totals, drops by reason (DROP_REASONS) and frames per queue pair."""
        c = self.counters
        return {"queues": len(self.pairs),
                "tx_frames": c.tx_frames, "tx_bytes": c.tx_bytes, "tx_dropped": c.tx_dropped,
                "rx_frames": c.rx_frames, "rx_bytes": c.rx_bytes, "rx_dropped": c.rx_dropped,
                "drop_reasons": dict(c.drop_reasons),
                "pairs": [{"rx_frames": p.rx_frames, "tx_frames": p.tx_frames}
                          for p in self.pairs]}
