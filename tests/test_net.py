"""virtio-net's sans-IO parts (backend/net.py): the TX header and chain checks, every rejection;
plus the device over a real tap in a namespace of its own (offload probing, features, config).
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from backend.memory import GuestMemory
from backend.net import (
    CONFIG,
    DROP_BAD_HEADER,
    DROP_OVERSIZED,
    DROP_REASONS,
    DROP_SHORT,
    DROP_WRITABLE,
    ETH_HLEN,
    F_CSUM,
    F_GUEST_CSUM,
    F_GUEST_TSO4,
    F_GUEST_TSO6,
    F_HOST_TSO4,
    F_HOST_TSO6,
    F_MAC,
    F_MQ,
    F_MRG_RXBUF,
    F_MTU,
    F_STATUS,
    F_VERSION_1,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    HDR_F_DATA_VALID,
    HDR_F_NEEDS_CSUM,
    HEADER,
    HEADER_SIZE,
    MAX_FRAME,
    MAX_QUEUE_PAIRS,
    STATUS_LINK_UP,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUNSETOFFLOAD,
    TX_QUEUE,
    NetDevice,
    NetHeader,
    NetHeaderError,
    _copy_into,
    _put_u16,
    _skip,
    check_tx_chain,
    parse_tx_header,
    tap_offloads,
)
from backend.vhost_user import MemRegion, VringAddr
from broker import taps
from tests.netns import inside, netns

ALL = F_VERSION_1 | F_CSUM | F_HOST_TSO4 | F_HOST_TSO6 | F_GUEST_CSUM | F_MRG_RXBUF


def hdr(flags: int = 0, gso: int = GSO_NONE, hdr_len: int = 0, gso_size: int = 0,
        csum_start: int = 0, csum_offset: int = 0, num_buffers: int = 0) -> bytes:
    return HEADER.pack(flags, gso, hdr_len, gso_size, csum_start, csum_offset, num_buffers)


def views(*chunks: bytes) -> list[memoryview]:
    return [memoryview(bytearray(c)) for c in chunks]


FRAME = bytes(60)


# --- parse_tx_header ------------------------------------------------------------------------


def test_plain_header_parses() -> None:
    assert parse_tx_header(hdr(), 60, 0) == NetHeader(0, 0, 0, 0, 0, 0, 0)


def test_checksum_request_inside_the_frame_parses() -> None:
    parsed = parse_tx_header(hdr(HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6), 60, ALL)
    assert parsed.csum_start == 34


def test_tso_header_parses() -> None:
    header = hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16)
    assert parse_tx_header(header, 9000, ALL).gso_size == 1448
    header6 = hdr(HDR_F_NEEDS_CSUM, GSO_TCPV6, 74, 1428, 54, 16)
    assert parse_tx_header(header6, 9000, ALL).gso_type == GSO_TCPV6


@pytest.mark.parametrize(("header", "frame_len", "features", "reason"), [
    (hdr()[:11], 60, ALL, "header is 11 bytes"),
    (hdr(HDR_F_DATA_VALID), 60, ALL, "flags 0x2 are not for transmit"),
    (hdr(0x80), 60, ALL, "flags 0x80 are not for transmit"),
    (hdr(HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6), 60, F_VERSION_1,
     "checksum offload requested but not negotiated"),
    (hdr(HDR_F_NEEDS_CSUM, csum_start=50, csum_offset=16), 60, ALL, "outside the 60-byte"),
    (hdr(HDR_F_NEEDS_CSUM, csum_start=0xFFFF, csum_offset=0xFFFF), 60, ALL, "outside"),
    (hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4 | GSO_ECN, 54, 1448, 34, 16), 9000, ALL, "ECN"),
    (hdr(HDR_F_NEEDS_CSUM, GSO_UDP, 42, 1448, 34, 6), 9000, ALL, "type 3 is not supported"),
    (hdr(HDR_F_NEEDS_CSUM, 9, 42, 1448, 34, 6), 9000, ALL, "type 9 is not supported"),
    (hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16), 9000, ALL & ~F_HOST_TSO4,
     "type 1 requested but not negotiated"),
    (hdr(HDR_F_NEEDS_CSUM, GSO_TCPV6, 74, 1448, 54, 16), 9000, ALL & ~F_HOST_TSO6,
     "type 4 requested but not negotiated"),
    (hdr(0, GSO_TCPV4, 54, 1448), 9000, ALL, "without a checksum request"),
    (hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 54, 0, 34, 16), 9000, ALL, "segment size of 0"),
    (hdr(HDR_F_NEEDS_CSUM, GSO_TCPV4, 9001, 1448, 34, 16), 9000, ALL, "header length 9001"),
    # Without segmentation too: the tap refuses (EINVAL) a hdr_len past the frame's end.
    (hdr(hdr_len=61), 60, ALL, "header length 61 exceeds the 60-byte frame"),
])
def test_header_rejections(header: bytes, frame_len: int, features: int, reason: str) -> None:
    with pytest.raises(NetHeaderError, match=reason):
        parse_tx_header(header, frame_len, features)


# --- check_tx_chain -------------------------------------------------------------------------


def test_chain_with_header_and_frame_in_one_descriptor_passes() -> None:
    assert check_tx_chain(views(hdr() + FRAME), [], ALL).flags == 0


def test_header_split_over_descriptors_is_joined() -> None:
    header = hdr(HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6)
    assert check_tx_chain(views(header[:5], header[5:], FRAME), [], ALL).csum_start == 34


@pytest.mark.parametrize(("readable", "writable", "reason", "counted_as"), [
    ([hdr() + FRAME], [b"x" * 16], "device-writable descriptors", DROP_WRITABLE),
    # the header in a write-only descriptor
    ([], [hdr() + FRAME], "device-writable descriptors", DROP_WRITABLE),
    ([], [], "chain of 0 bytes is shorter than the header", DROP_SHORT),
    ([hdr()[:8]], [], "chain of 8 bytes is shorter than the header", DROP_SHORT),
    ([hdr()], [], "a header and no frame", DROP_SHORT),
    ([hdr(), bytes(ETH_HLEN - 1)], [], "shorter than an Ethernet header", DROP_SHORT),
    ([hdr(), bytes(MAX_FRAME), b"x"], [], f"exceeds {MAX_FRAME}", DROP_OVERSIZED),
    ([hdr(HDR_F_DATA_VALID), FRAME], [], "not for transmit", DROP_BAD_HEADER),
    ([hdr(HDR_F_NEEDS_CSUM, csum_start=60), FRAME], [], "outside", DROP_BAD_HEADER),
])
def test_chain_rejections(readable: list[bytes], writable: list[bytes], reason: str,
                          counted_as: str) -> None:
    with pytest.raises(NetHeaderError, match=reason) as caught:
        check_tx_chain(views(*readable), views(*writable), ALL)
    assert caught.value.reason == counted_as in DROP_REASONS


def test_drop_reasons_stay_a_fixed_set_however_the_guest_varies_its_frames() -> None:
    """The counters are keyed by reason name, not by message: a guest that varies lengths and
    offsets cannot grow them (the message, with its numbers, is only logged)."""
    reasons = set()
    for n in range(1, 200):
        for chain in ([hdr(), bytes(n % ETH_HLEN)], [hdr()[: n % HEADER_SIZE]],
                      [hdr(HDR_F_NEEDS_CSUM, csum_start=59 + n), FRAME]):
            with pytest.raises(NetHeaderError) as caught:
                check_tx_chain(views(*chain), [], ALL)
            reasons.add(caught.value.reason)
    assert reasons == {DROP_SHORT, DROP_BAD_HEADER}


def test_largest_frame_passes() -> None:
    assert check_tx_chain(views(hdr(), bytes(MAX_FRAME)), [], ALL).gso_type == GSO_NONE


# --- helpers --------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [[12], [10, 2], [11, 1], [4, 6, 1, 1], [1] * 12])
def test_num_buffers_lands_at_offset_10_across_views(split: list[int]) -> None:
    bufs = views(*(bytes(n) for n in split))
    _put_u16(bufs, 10, 0x1234)
    assert b"".join(bufs)[10:12] == b"\x34\x12"
    assert b"".join(bufs)[:10] == bytes(10)


@pytest.mark.parametrize("split", [[72], [12, 60], [5, 7, 60], [4, 10, 58], [1] * 12 + [60],
                                   [12], [6, 6]])
def test_skip_leaves_the_views_after_the_header_however_it_is_split(split: list[int]) -> None:
    data = bytes(range(sum(split)))
    bufs = views(*(data[sum(split[:i]) : sum(split[: i + 1])] for i in range(len(split))))
    rest = _skip(bufs, HEADER_SIZE)
    assert b"".join(rest) == data[HEADER_SIZE:]
    assert all(len(v) for v in rest)
    if rest:  # views of the guest's buffers, not copies
        rest[-1][-1:] = b"\xff"
        assert bytes(bufs[-1])[-1:] == b"\xff"


def test_copy_into_fills_views_in_order_and_stops_at_the_end() -> None:
    bufs = views(bytes(3), bytes(4), bytes(5))
    assert _copy_into(bufs, memoryview(b"abcdefghi")) == 9
    assert b"".join(bufs) == b"abcdefghi\0\0\0"
    assert _copy_into(views(bytes(2)), memoryview(b"abc")) == 2


@pytest.mark.parametrize(("features", "offloads"), [
    (0, 0),
    (F_GUEST_CSUM, TUN_F_CSUM),
    (F_GUEST_CSUM | F_GUEST_TSO4, TUN_F_CSUM | TUN_F_TSO4),
    (F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6),
    (F_GUEST_TSO4 | F_GUEST_TSO6, 0),  # segmentation without checksumming is no offload
])
def test_tap_offloads_follow_the_guest_features(features: int, offloads: int) -> None:
    assert tap_offloads(features) == offloads


def test_tun_constants_agree_between_broker_and_backend() -> None:
    assert taps.TUNSETOFFLOAD == TUNSETOFFLOAD
    assert taps.VNET_HDR_SIZE == HEADER_SIZE
    assert taps.MAX_QUEUES == MAX_QUEUE_PAIRS


# --- the device over a real tap -------------------------------------------------------------


@pytest.fixture
def tap_fd() -> Iterator[int]:
    with netns() as ns:
        with inside(ns):
            fd = taps.open_tun("rft-unit0")
        try:
            yield fd
        finally:
            os.close(fd)


def test_device_offers_the_offloads_the_tap_supports(tap_fd: int) -> None:
    dev = NetDevice(tap_fd, mac=bytes.fromhex("525400123456"), mtu=1400)
    for bit in (F_VERSION_1, F_MAC, F_STATUS, F_MTU, F_MRG_RXBUF, F_CSUM, F_HOST_TSO4,
                F_HOST_TSO6, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6):
        assert dev.device_features & bit, hex(bit)
    assert CONFIG.unpack(dev.config()) == (bytes.fromhex("525400123456"), STATUS_LINK_UP, 1,
                                           1400)


def test_device_makes_the_tap_non_blocking(tap_fd: int) -> None:
    flags = fcntl.fcntl(tap_fd, fcntl.F_GETFL)
    fcntl.fcntl(tap_fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    NetDevice(tap_fd, mac=bytes.fromhex("525400123456"))
    assert fcntl.fcntl(tap_fd, fcntl.F_GETFL) & os.O_NONBLOCK


def test_set_features_refuses_a_driver_without_version_1(tap_fd: int) -> None:
    dev = NetDevice(tap_fd, mac=bytes.fromhex("525400123456"))
    with pytest.raises(ValueError, match="VERSION_1"):
        dev.set_features(F_MRG_RXBUF)


def test_device_refuses_an_fd_that_is_not_a_tap() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError, match="TUNSETOFFLOAD"):
            NetDevice(r, mac=bytes.fromhex("525400123456"))
    finally:
        os.close(r)
        os.close(w)


@pytest.fixture
def mq_tap_fds() -> Iterator[list[int]]:
    with netns() as ns:
        with inside(ns):
            fds = taps.open_tun_queues("rft-unit1", 2)
        try:
            yield fds
        finally:
            for fd in fds:
                os.close(fd)


def test_deleting_a_tap_that_vanishes_during_the_lookup_is_quiet(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A tap goes with its last FD: when the backend closes its copy as the broker removes the
    VM, the tap can vanish between the broker's lookup and its query. That is the outcome the
    broker wanted, not an error (it once escaped as a NetlinkError and took the broker down)."""
    real_iproute = taps.IPRoute

    class VanishingIPRoute:
        """IPRoute whose lookup sees the tap, which is then gone (the last FD closing)."""

        def __init__(self) -> None:
            self.ipr = real_iproute()

        def __enter__(self) -> VanishingIPRoute:
            return self

        def __exit__(self, *exc: object) -> None:
            self.ipr.close()

        def link_lookup(self, **kwargs: object) -> list[int]:
            found = self.ipr.link_lookup(**kwargs)
            if found:
                self.ipr.link("del", index=found[0])
            return found

        def __getattr__(self, name: str) -> object:
            return getattr(self.ipr, name)

    with netns() as ns, inside(ns):
        fd = taps.open_tun("rft-gone0")
        try:
            monkeypatch.setattr(taps, "IPRoute", VanishingIPRoute)
            taps.delete_tap("rft-gone0", vm="vm", nic=0)  # no exception
        finally:
            os.close(fd)


def test_single_queue_device_has_one_pair_and_no_mq(tap_fd: int) -> None:
    dev = NetDevice(tap_fd, mac=bytes.fromhex("525400123456"))
    assert (dev.num_queues, dev.vhost_queue_num, len(dev.pairs)) == (2, 1, 1)
    assert not dev.device_features & F_MQ


def test_multi_queue_device_offers_mq_and_a_pair_per_tap_queue(mq_tap_fds: list[int]) -> None:
    for fd in mq_tap_fds:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    dev = NetDevice(mq_tap_fds, mac=bytes.fromhex("525400123456"), mtu=1500)
    assert dev.device_features & F_MQ
    # virtqueues 0..3 = rx0, tx0, rx1, tx1; GET_QUEUE_NUM counts pairs (QEMU's queues=N)
    assert (dev.num_queues, dev.vhost_queue_num) == (4, 2)
    assert [p.tap_fd for p in dev.pairs] == mq_tap_fds
    assert CONFIG.unpack(dev.config())[2] == 2  # max_virtqueue_pairs
    for fd in mq_tap_fds:  # every tap queue is served by the loop: none may block it
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK


def test_device_refuses_more_queue_pairs_than_it_serves(mq_tap_fds: list[int]) -> None:
    with pytest.raises(ValueError, match=f"a NIC has 1 to {MAX_QUEUE_PAIRS}"):
        NetDevice(mq_tap_fds * 5, mac=bytes.fromhex("525400123456"))
    with pytest.raises(ValueError, match="0 tap queues"):
        NetDevice([], mac=bytes.fromhex("525400123456"))


def test_device_refuses_a_mac_of_the_wrong_length(tap_fd: int) -> None:
    with pytest.raises(ValueError, match="6 bytes"):
        NetDevice(tap_fd, mac=b"\x52\x54")


def test_rx_header_struct_is_twelve_bytes() -> None:
    assert HEADER_SIZE == 12 == struct.calcsize("<BBHHHHH")


# --- TX: what reaches the tap -------------------------------------------------------------------


class SocketTapDevice(NetDevice):
    """NetDevice over a datagram socket, which takes one frame per write as a tap does; it has
    no offloads to probe."""

    def _probe_offloads(self) -> int:
        return 0


GUEST_UADDR = 0x7F00_0000_0000
TX_BUFFER = 0x1000


@pytest.fixture
def tx_guest() -> Iterator[tuple[memoryview, GuestMemory]]:
    """8 KiB of sealed guest memory: a TX ring of 8 at GPA 0 and a buffer at TX_BUFFER."""
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, 0x2000)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        mem = GuestMemory([MemRegion(0, 0x2000, GUEST_UADDR, 0)], [fd])
    finally:
        os.close(fd)
    try:
        yield mem.regions[0].view, mem
    finally:
        mem.close()


def test_tap_gets_the_header_that_was_checked_though_the_guest_rewrites_it(
        tx_guest: tuple[memoryview, GuestMemory], monkeypatch: pytest.MonkeyPatch) -> None:
    """Another vCPU may rewrite the header between the check and the tap's read of guest
    memory. The tap checks lengths and offsets but not what was negotiated (it takes UFO, ECN
    and DATA_VALID from anyone), so the device must hand it the header it checked."""
    ram, mem = tx_guest
    frame = hdr() + FRAME
    ram[TX_BUFFER : TX_BUFFER + len(frame)] = frame
    struct.pack_into("<QIHH", ram, 0, TX_BUFFER, len(frame), 0, 0)  # one readable descriptor
    struct.pack_into("<HHH", ram, 0x100, 0, 1, 0)  # avail: flags, idx 1, ring[0] = head 0
    unagreed = hdr(HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID, GSO_UDP | GSO_ECN, 42, 1000, 34, 6)
    real_writev = os.writev

    def racing_writev(fd: int, buffers: list) -> int:
        ram[TX_BUFFER : TX_BUFFER + HEADER_SIZE] = unagreed  # as late as the guest can
        return real_writev(fd, buffers)

    tap, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with tap, peer:
        dev = SocketTapDevice(tap.fileno(), mac=bytes.fromhex("525400123456"))
        dev.features = F_VERSION_1  # no offload at all (set_features would need a tap)
        addr = VringAddr(index=TX_QUEUE, flags=0, desc_user_addr=GUEST_UADDR,
                         used_user_addr=GUEST_UADDR + 0x200,
                         avail_user_addr=GUEST_UADDR + 0x100, log_guest_addr=0)
        queue = dev.open_queue(TX_QUEUE, mem, 8, addr, 0, False)
        try:
            monkeypatch.setattr(os, "writev", racing_writev)
            assert dev.serve_batch(queue, 8) == 1
        finally:
            queue.release()
        assert bytes(ram[TX_BUFFER : TX_BUFFER + HEADER_SIZE]) == unagreed
        assert peer.recv(4096) == frame
        assert dev.counters.tx_frames == 1


@pytest.mark.parametrize("guest_csum", [False, True])
def test_received_frame_claims_a_valid_checksum_only_to_a_guest_that_accepts_it(
        tx_guest: tuple[memoryview, GuestMemory], guest_csum: bool) -> None:
    """A tap sets DATA_VALID on a frame whose checksum the host already checked, whatever
    offloads it was given; without VIRTIO_NET_F_GUEST_CSUM the header's flags must be zero
    (virtio 1.2, 5.1.6.4.1), so the device clears them."""
    ram, mem = tx_guest
    struct.pack_into("<QIHH", ram, 0, TX_BUFFER, 2048, 2, 0)  # one device-writable descriptor
    struct.pack_into("<HHH", ram, 0x100, 0, 1, 0)  # avail: flags, idx 1, ring[0] = head 0
    tap, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with tap, peer:
        dev = SocketTapDevice(tap.fileno(), mac=bytes.fromhex("525400123456"))
        dev.features = F_VERSION_1 | (F_GUEST_CSUM if guest_csum else 0)
        addr = VringAddr(index=0, flags=0, desc_user_addr=GUEST_UADDR,
                         used_user_addr=GUEST_UADDR + 0x200,
                         avail_user_addr=GUEST_UADDR + 0x100, log_guest_addr=0)
        queue = dev.open_queue(0, mem, 8, addr, 0, False)
        try:
            peer.send(hdr(HDR_F_DATA_VALID) + FRAME)
            assert dev.serve_batch(queue, 8) == 1
        finally:
            queue.release()
    flags = ram[TX_BUFFER]
    assert flags == (HDR_F_DATA_VALID if guest_csum else 0)
    assert bytes(ram[TX_BUFFER + HEADER_SIZE : TX_BUFFER + HEADER_SIZE + len(FRAME)]) == FRAME
