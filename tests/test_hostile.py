"""A hostile guest and a hostile front-end against a real `ringfence dev` process.

One backend process serves devices A and B for the whole module, and B keeps one open
connection throughout: each test attacks A, then proves that B's connection still
completes I/O with the right data (in guest memory and in its image file), that the
backend process is alive, and that A's socket serves a new front-end again. The few tests
that need another command line start a backend of their own.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.devproc import DevBackend, wait_until
from tests.frontend import (
    BLK_REQ_HEADER,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    F_EVENT_IDX,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    PAGE,
    S_OK,
    SECTOR,
    T_IN,
    T_OUT,
    UADDR_BASE,
    VERSION,
    BackendClosed,
    BlkFrontend,
    GuestMemory,
    NackError,
    Req,
    SplitQueue,
    VhostUserConnection,
    pack_mem_table,
    pack_vring_state,
)

IMAGE_SIZE = 4 << 20
CLOSE_TIMEOUT = 5.0


def make_image(path: Path, seed: int) -> Path:
    path.write_bytes(random.Random(seed).randbytes(IMAGE_SIZE))
    return path


def backend_fd_count(backend: DevBackend) -> int:
    return len(os.listdir(f"/proc/{backend.pid}/fd"))


def backend_guest_ram_mappings(backend: DevBackend) -> int:
    with open(f"/proc/{backend.pid}/maps") as f:
        return sum("ringfence-guest-ram" in line for line in f)


def backend_cpu_seconds(backend: DevBackend) -> float:
    with open(f"/proc/{backend.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def eventfd_fired(fd: int, timeout: float = CLOSE_TIMEOUT) -> bool:
    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready) and os.eventfd_read(fd) >= 1


@dataclass
class Pair:
    """Devices A (the victim of each attack) and B (an innocent bystander) on one backend."""

    backend: DevBackend
    a_sock: str
    a_image: Path
    b_sock: str
    b_image: Path
    b: BlkFrontend
    rng: random.Random

    def b_still_serves(self) -> None:
        """B's existing connection completes a write and a read with the right data."""
        assert self.backend.alive(), self.backend.log()
        data = self.rng.randbytes(16 << 10)
        sector = self.rng.randrange((IMAGE_SIZE - len(data)) // SECTOR // 8 + 1) * 8
        assert self.b.write(sector, data, seg_size=1536, indirect=True) == S_OK
        assert self.b.read(sector, len(data), seg_size=4096) == (S_OK, data)
        with open(self.b_image, "rb") as f:
            assert os.pread(f.fileno(), len(data), sector * SECTOR) == data

    def reconnect_a(self) -> BlkFrontend:
        """A new front-end on A, once the backend has dropped the previous one."""
        self.backend.wait_until_free(self.a_sock)
        return BlkFrontend.open(self.a_sock, regions=2)

    def a_serves_again(self, expect: tuple[int, bytes] | None = None) -> None:
        """A new front-end on A's socket is accepted and does I/O (and sees `expect`)."""
        with self.reconnect_a() as dev:
            if expect is not None:
                sector, data = expect
                assert dev.read(sector, len(data)) == (S_OK, data)
            data = self.rng.randbytes(8192)
            assert dev.write(64, data, seg_size=700) == S_OK
            assert dev.read(64, len(data)) == (S_OK, data)
        with open(self.a_image, "rb") as f:
            assert os.pread(f.fileno(), len(data), 64 * SECTOR) == data
        assert self.backend.alive(), self.backend.log()


@pytest.fixture(scope="module")
def shared_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    directory = tmp_path_factory.mktemp("pair")
    a_image, b_image = make_image(directory / "a.img", 1), make_image(directory / "b.img", 2)
    a_sock, b_sock = str(directory / "a.sock"), str(directory / "b.sock")
    with DevBackend({a_sock: a_image, b_sock: b_image}) as backend, BlkFrontend.open(b_sock) as b:
        yield Pair(backend, a_sock, a_image, b_sock, b_image, b, random.Random(5))


@pytest.fixture
def pair(shared_pair: Pair) -> Iterator[Pair]:
    shared_pair.b_still_serves()
    yield shared_pair
    shared_pair.backend.wait_until_free(shared_pair.a_sock)  # A is free for the next test
    shared_pair.b_still_serves()


# ------------------------------------------------------------------- hostile chains


@dataclass
class Guest:
    """Scratch space in A's memory for building broken chains by hand."""

    dev: BlkFrontend
    q: SplitQueue
    hdr: int  # a valid 16-byte T_OUT header for sector 0, then a status byte at +16
    buf: int  # 4 KiB of data

    def publish(self, head: int) -> None:
        q = self.q
        q.write_avail(q.avail_idx & (q.size - 1), head)
        q.set_avail_idx(q.avail_idx + 1)

    @property
    def status(self) -> int:
        return self.hdr + 16

    def table(self, entries: list[tuple[int, int, int, int]]) -> int:
        """An indirect table in guest memory holding `entries` (addr, len, flags, next)."""
        gpa = self.dev.mem.alloc(16 * max(len(entries), 1), 16)
        for i, entry in enumerate(entries):
            self.dev.mem.write(gpa + 16 * i, struct.pack("<QIHH", *entry))
        return gpa


def outside_all_memory(g: Guest) -> str:
    g.q.write_desc(0, 1 << 44, 16, DESC_F_NEXT, 1)
    g.q.write_desc(1, g.status, 1, DESC_F_WRITE)
    g.publish(0)
    return "not inside one region"


def in_the_hole_between_regions(g: Guest) -> str:
    low = g.dev.mem.regions[0]
    g.q.write_desc(0, g.hdr, 16, DESC_F_NEXT, 1)
    g.q.write_desc(1, low.gpa + low.size + PAGE, 4096, DESC_F_NEXT, 2)
    g.q.write_desc(2, g.status, 1, DESC_F_WRITE)
    g.publish(0)
    return "not inside one region"


def straddling_the_end_of_a_region(g: Guest) -> str:
    low = g.dev.mem.regions[0]
    g.q.write_desc(0, g.hdr, 16, DESC_F_NEXT, 1)
    g.q.write_desc(1, low.gpa + low.size - 512, 1024, DESC_F_NEXT, 2)
    g.q.write_desc(2, g.status, 1, DESC_F_WRITE)
    g.publish(0)
    return "not inside one region"


def descriptor_loop(g: Guest) -> str:
    g.q.write_desc(0, g.hdr, 16, DESC_F_NEXT, 1)
    g.q.write_desc(1, g.buf, 512, DESC_F_NEXT, 0)  # 0 -> 1 -> 0 -> ...
    g.publish(0)
    return "loops"


def loop_inside_an_indirect_table(g: Guest) -> str:
    table = g.table([(g.hdr, 16, DESC_F_NEXT, 1), (g.buf, 512, DESC_F_NEXT, 0)])
    g.q.write_desc(0, table, 32, DESC_F_INDIRECT)
    g.publish(0)
    return "loops"


def indirect_table_length_not_multiple_of_16(g: Guest) -> str:
    table = g.table([(g.hdr, 16, DESC_F_NEXT, 1), (g.status, 1, DESC_F_WRITE, 0)])
    g.q.write_desc(0, table, 20, DESC_F_INDIRECT)
    g.publish(0)
    return "not 16*n"


def nested_indirect_table(g: Guest) -> str:
    inner = g.table([(g.hdr, 16, DESC_F_NEXT, 1), (g.status, 1, DESC_F_WRITE, 0)])
    outer = g.table([(inner, 32, DESC_F_INDIRECT, 0)])
    g.q.write_desc(0, outer, 16, DESC_F_INDIRECT)
    g.publish(0)
    return "nests an indirect table"


def indirect_with_next(g: Guest) -> str:
    table = g.table([(g.hdr, 16, DESC_F_NEXT, 1), (g.status, 1, DESC_F_WRITE, 0)])
    g.q.write_desc(0, table, 32, DESC_F_INDIRECT | DESC_F_NEXT, 1)
    g.q.write_desc(1, g.status, 1, DESC_F_WRITE)
    g.publish(0)
    return "both INDIRECT and NEXT"


def indirect_after_the_head(g: Guest) -> str:
    table = g.table([(g.buf, 512, DESC_F_NEXT, 1), (g.status, 1, DESC_F_WRITE, 0)])
    g.q.write_desc(0, g.hdr, 16, DESC_F_NEXT, 1)
    g.q.write_desc(1, table, 32, DESC_F_INDIRECT)
    g.publish(0)
    return "indirect descriptor after its head"


def indirect_table_outside_memory(g: Guest) -> str:
    g.q.write_desc(0, 1 << 44, 32, DESC_F_INDIRECT)
    g.publish(0)
    return "not inside one region"


def avail_index_jumps_past_queue_size(g: Guest) -> str:
    g.q.write_desc(0, g.hdr, 16, DESC_F_NEXT, 1)
    g.q.write_desc(1, g.status, 1, DESC_F_WRITE)
    g.q.set_avail_idx(g.q.avail_idx + g.q.size + 1)
    return "entries ahead"


def avail_head_out_of_range(g: Guest) -> str:
    g.publish(g.q.size + 3)
    return "names head"


def next_index_out_of_range(g: Guest) -> str:
    g.q.write_desc(0, g.hdr, 16, DESC_F_NEXT, g.q.size)
    g.publish(0)
    return "links to descriptor"


def readable_after_writable(g: Guest) -> str:
    g.q.write_desc(0, g.hdr, 16, DESC_F_NEXT, 1)
    g.q.write_desc(1, g.buf, 512, DESC_F_WRITE | DESC_F_NEXT, 2)
    g.q.write_desc(2, g.buf + 512, 512, DESC_F_NEXT, 3)
    g.q.write_desc(3, g.status, 1, DESC_F_WRITE)
    g.publish(0)
    return "readable after a writable"


HOSTILE_CHAINS: dict[str, Callable[[Guest], str]] = {
    f.__name__.replace("_", "-"): f
    for f in (
        outside_all_memory,
        in_the_hole_between_regions,
        straddling_the_end_of_a_region,
        descriptor_loop,
        loop_inside_an_indirect_table,
        indirect_table_length_not_multiple_of_16,
        nested_indirect_table,
        indirect_with_next,
        indirect_after_the_head,
        indirect_table_outside_memory,
        avail_index_jumps_past_queue_size,
        avail_head_out_of_range,
        next_index_out_of_range,
        readable_after_writable,
    )
}


@pytest.mark.parametrize("attack", list(HOSTILE_CHAINS.values()), ids=list(HOSTILE_CHAINS))
def test_broken_ring_stops_only_its_device_signals_err_and_socket_reconnects(
    pair: Pair, attack: Callable[[Guest], str]
) -> None:
    errfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    fds, mappings = backend_fd_count(pair.backend), backend_guest_ram_mappings(pair.backend)
    try:
        with BlkFrontend.open(pair.a_sock, regions=2) as a:
            a.conn.set_vring_err(0, errfd)
            before = pair.rng.randbytes(4096)
            assert a.write(8, before) == S_OK  # the ring is in use before it breaks
            q = a.queues[0]
            hdr = a.mem.alloc(32, 64)
            a.mem.write(hdr, BLK_REQ_HEADER.pack(T_OUT, 0, 0))
            a.mem.write(hdr + 16, b"\xff")
            guest = Guest(a, q, hdr, a.mem.alloc(4096, PAGE))
            mark = pair.backend.log_mark()
            reason = attack(guest)
            q.kick(force=True)
            assert a.conn.wait_closed(CLOSE_TIMEOUT), "backend kept A's connection open"
            assert eventfd_fired(errfd), "A's vring err eventfd was not signalled"
            line = pair.backend.wait_for_line(pair.a_sock, "vring 0", reason, since=mark)
            assert "broken" in line
            assert a.mem.read(hdr + 16, 1) == b"\xff"  # the broken request was not executed
        # A's eventfds, memfds and mappings are all released with its connection (the
        # socket closes first, so wait for the rest).
        wait_until(lambda: backend_fd_count(pair.backend) == fds, CLOSE_TIMEOUT,
                   "A's FDs closed")
        wait_until(lambda: backend_guest_ram_mappings(pair.backend) == mappings,
                   CLOSE_TIMEOUT, "A's guest memory unmapped")
        pair.b_still_serves()
        pair.a_serves_again(expect=(8, before))
    finally:
        os.close(errfd)


def test_broken_ring_without_err_eventfd_still_closes_only_that_device(pair: Pair) -> None:
    with BlkFrontend.open(pair.a_sock) as a:
        q = a.queues[0]
        buf = a.mem.alloc(64)
        q.write_desc(0, buf, 16, DESC_F_NEXT, 0)  # a descriptor that names itself
        q.write_avail(0, 0)
        q.set_avail_idx(1)
        mark = pair.backend.log_mark()
        q.kick(force=True)
        assert a.conn.wait_closed(CLOSE_TIMEOUT)
        pair.backend.wait_for_line(pair.a_sock, "vring 0", "loops", since=mark)
    pair.b_still_serves()
    pair.a_serves_again()


def test_request_without_a_status_byte_is_returned_unused_and_the_device_goes_on(
    pair: Pair,
) -> None:
    with BlkFrontend.open(pair.a_sock) as a:
        q = a.queues[0]
        hdr = a.mem.alloc(32, 64)
        a.mem.write(hdr, BLK_REQ_HEADER.pack(T_IN, 0, 0))
        head = q.post([(hdr, 16, False)])  # nothing device-writable
        q.kick()
        assert q.wait_for(head, CLOSE_TIMEOUT) == 0
        assert a.read(0, 512)[0] == S_OK
    pair.b_still_serves()


def test_second_front_end_on_a_busy_socket_is_refused_and_the_first_keeps_working(
    pair: Pair,
) -> None:
    with BlkFrontend.open(pair.a_sock) as a:
        mark = pair.backend.log_mark()
        intruder = VhostUserConnection.connect(pair.a_sock)
        try:
            assert intruder.wait_closed(CLOSE_TIMEOUT)
        finally:
            intruder.close()
        pair.backend.wait_for_line(pair.a_sock, "refused a second front-end", since=mark)
        data = pair.rng.randbytes(4096)
        assert a.write(0, data) == S_OK
        assert a.read(0, 4096) == (S_OK, data)
    pair.b_still_serves()


# ------------------------------------------------------------- malformed messages


def realized(pair: Pair, *, regions: int = 1) -> BlkFrontend:
    """A front-end on A that has negotiated (REPLY_ACK included) but not started."""
    dev = BlkFrontend(pair.a_sock, regions=regions)
    try:
        dev.realize()
    except BaseException:
        dev.close()
        raise
    assert dev.conn.reply_ack
    return dev


def start_and_do_io(pair: Pair, dev: BlkFrontend) -> None:
    """The connection is still usable: start the device on it and move data."""
    dev.start()
    data = pair.rng.randbytes(4096)
    assert dev.write(24, data) == S_OK
    assert dev.read(24, 4096) == (S_OK, data)


def assert_closed_with_log(pair: Pair, conn: VhostUserConnection, mark: int,
                           *needles: str) -> None:
    assert conn.wait_closed(CLOSE_TIMEOUT), "backend kept the connection open"
    pair.backend.wait_for_line(pair.a_sock, "connection closed", *needles, since=mark)
    pair.b_still_serves()
    pair.a_serves_again()


@pytest.mark.parametrize("size", [0, 4, 12, 4096], ids=lambda n: f"{n}-bytes")
def test_vring_num_with_wrong_payload_size_is_nacked_and_connection_stays_usable(
    pair: Pair, size: int
) -> None:
    with realized(pair) as dev:
        mark = pair.backend.log_mark()
        dev.conn.send_raw(Req.SET_VRING_NUM, pack_vring_state(0, 256).ljust(size, b"\0")[:size],
                          flags=VERSION | FLAG_NEED_REPLY)
        assert dev.conn.get_ack(Req.SET_VRING_NUM) != 0
        pair.backend.wait_for_line(pair.a_sock, "refused SET_VRING_NUM", f"is {size} bytes",
                                   since=mark)
        start_and_do_io(pair, dev)
    pair.b_still_serves()


def test_vring_num_with_wrong_payload_size_without_need_reply_closes_connection(
    pair: Pair,
) -> None:
    with realized(pair) as dev:
        mark = pair.backend.log_mark()
        dev.conn.send_raw(Req.SET_VRING_NUM, pack_vring_state(0, 256) + b"\0\0\0\0")
        assert_closed_with_log(pair, dev.conn, mark, "is 12 bytes")


@pytest.mark.parametrize(("regions", "fds"), [(2, 1), (1, 2), (1, 0), (3, 8)])
def test_mem_table_whose_region_count_disagrees_with_fds_is_nacked_and_fds_closed(
    pair: Pair, regions: int, fds: int
) -> None:
    mem = GuestMemory(1 << 20)
    try:
        with realized(pair) as dev:
            baseline = backend_fd_count(pair.backend)
            r = mem.regions[0]
            entries = [(r.gpa + i * r.size, r.size, r.uaddr + i * r.size, 0)
                       for i in range(regions)]
            mark = pair.backend.log_mark()
            for _ in range(5):
                dev.conn.send_raw(Req.SET_MEM_TABLE, pack_mem_table(entries), [r.fd] * fds,
                                  flags=VERSION | FLAG_NEED_REPLY)
                assert dev.conn.get_ack(Req.SET_MEM_TABLE) != 0
            pair.backend.wait_for_line(pair.a_sock, "refused SET_MEM_TABLE",
                                       f"{regions} regions but {fds} FDs", since=mark)
            assert backend_fd_count(pair.backend) == baseline, "refused FDs were kept open"
            start_and_do_io(pair, dev)
    finally:
        mem.close()
    pair.b_still_serves()


@pytest.mark.parametrize("size", [4097, 0xFFFF_FFFF])
def test_header_size_over_4096_closes_connection(pair: Pair, size: int) -> None:
    with realized(pair) as dev:
        mark = pair.backend.log_mark()
        dev.conn.send_raw(Req.SET_VRING_NUM, pack_vring_state(0, 256), size=size)
        assert_closed_with_log(pair, dev.conn, mark, f"{size} bytes exceeds")


@pytest.mark.parametrize("request_code", [9999, 0, Req.SET_LOG_BASE, Req.GET_INFLIGHT_FD])
def test_unknown_request_with_need_reply_gets_nonzero_ack_and_connection_stays_usable(
    pair: Pair, request_code: int
) -> None:
    with realized(pair) as dev:
        dev.conn.send_raw(request_code, pack_vring_state(0, 0), flags=VERSION | FLAG_NEED_REPLY)
        assert dev.conn.get_ack(request_code) != 0
        assert dev.conn.get_features() == dev.device_features
        start_and_do_io(pair, dev)
    pair.b_still_serves()


def test_unknown_request_without_need_reply_closes_connection(pair: Pair) -> None:
    with realized(pair) as dev:
        mark = pair.backend.log_mark()
        dev.conn.send_raw(9999, b"xyz")
        assert_closed_with_log(pair, dev.conn, mark, "unknown request 9999")


@pytest.mark.parametrize(
    ("flags", "reason"),
    [(0x0, "version 0"), (0x2, "version 2"), (0x3, "version 3"),
     (VERSION | FLAG_REPLY, "marked as a reply"), (VERSION | 0x10, "unknown header flags")],
    ids=["version-0", "version-2", "version-3", "reply-flag", "unknown-flag"],
)
def test_bad_header_version_or_flags_closes_connection(
    pair: Pair, flags: int, reason: str
) -> None:
    with realized(pair) as dev:
        mark = pair.backend.log_mark()
        dev.conn.send_raw(Req.GET_FEATURES, flags=flags)
        assert_closed_with_log(pair, dev.conn, mark, reason)


def test_unsealed_memfd_is_refused_naming_f_seal_shrink(pair: Pair) -> None:
    unsealed = GuestMemory(1 << 20, sealed=False)
    try:
        with realized(pair) as dev:
            baseline = backend_fd_count(pair.backend)
            mark = pair.backend.log_mark()
            with pytest.raises(NackError):
                dev.conn.set_mem_table(unsealed.regions)
            pair.backend.wait_for_line(pair.a_sock, "refused SET_MEM_TABLE", "F_SEAL_SHRINK",
                                       since=mark)
            assert backend_fd_count(pair.backend) == baseline
            # Had the backend mapped it, this would SIGBUS it on its next touch.
            os.ftruncate(unsealed.regions[0].fd, 0)
            assert pair.backend.alive()
            start_and_do_io(pair, dev)  # a sealed table on the same connection is accepted
    finally:
        unsealed.close()
    pair.b_still_serves()


def test_sealed_guest_memory_cannot_shrink_under_the_backend(pair: Pair) -> None:
    with BlkFrontend.open(pair.a_sock, regions=2, shared_fd=True) as a:
        for region in a.mem.regions:
            with pytest.raises(PermissionError):
                os.ftruncate(region.fd, 0)
            with pytest.raises(PermissionError):
                os.ftruncate(region.fd, region.mmap_offset + region.size - PAGE)
        data = pair.rng.randbytes(8192)
        assert a.write(0, data) == S_OK
        assert a.read(0, 8192) == (S_OK, data)
        assert pair.backend.alive()
    pair.b_still_serves()


@pytest.mark.parametrize(("extra_size", "offset"), [(PAGE, 0), (0, PAGE), (1 << 30, 0)],
                         ids=["size-past-eof", "offset-past-eof", "far-past-eof"])
def test_memfd_smaller_than_mmap_offset_plus_size_is_refused(
    pair: Pair, extra_size: int, offset: int
) -> None:
    mem = GuestMemory(1 << 20)
    try:
        with realized(pair) as dev:
            r = mem.regions[0]
            mark = pair.backend.log_mark()
            entries = [(r.gpa, r.size + extra_size, r.uaddr, offset)]
            dev.conn.send_raw(Req.SET_MEM_TABLE, pack_mem_table(entries), [r.fd],
                              flags=VERSION | FLAG_NEED_REPLY)
            assert dev.conn.get_ack(Req.SET_MEM_TABLE) != 0
            pair.backend.wait_for_line(pair.a_sock, "refused SET_MEM_TABLE",
                                       "smaller than mmap_offset + size", since=mark)
            assert pair.backend.alive()
            start_and_do_io(pair, dev)
    finally:
        mem.close()
    pair.b_still_serves()


def test_allow_unsealed_memory_flag_accepts_unsealed_memfds(tmp_path: Path) -> None:
    image = make_image(tmp_path / "u.img", 3)
    sock = str(tmp_path / "u.sock")
    with DevBackend({sock: image}, extra=["--allow-unsealed-memory"]) as backend, \
            BlkFrontend.open(sock, sealed=False, regions=2) as dev:
        assert not fcntl.fcntl(dev.mem.regions[0].fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        data = random.Random(3).randbytes(8192)
        assert dev.write(0, data, seg_size=1000) == S_OK
        assert dev.read(0, 8192) == (S_OK, data)
        assert backend.alive()
    assert image.read_bytes()[:8192] == data


# ----------------------------------------------------------- ring addresses at kick


def bad_ring_address(which: str, dev: BlkFrontend, q: SplitQueue) -> dict[str, int]:
    low = dev.mem.regions[0]
    good = {"desc": dev.mem.uaddr(q.desc_gpa), "avail": dev.mem.uaddr(q.avail_gpa),
            "used": dev.mem.uaddr(q.used_gpa)}
    ring, where = which.split("-", 1)
    good[ring] = {
        "beyond-memory": UADDR_BASE + (1 << 40),
        "in-the-hole": low.uaddr + low.size + PAGE,
        "straddling-region-end": low.uaddr + low.size - 64,
        "given-as-gpa": {"desc": q.desc_gpa, "avail": q.avail_gpa, "used": q.used_gpa}[ring],
        "misaligned": good[ring] + 1,
    }[where]
    return good


@pytest.mark.parametrize(
    "which",
    ["desc-beyond-memory", "avail-in-the-hole", "used-straddling-region-end",
     "used-given-as-gpa", "desc-misaligned"],
)
def test_ring_address_outside_memory_is_refused_at_kick(pair: Pair, which: str) -> None:
    with realized(pair, regions=2) as dev:
        c = dev.conn
        dev.features = dev.negotiated_features()
        c.set_features(dev.features)
        c.set_mem_table(dev.mem.regions)
        q = SplitQueue(dev.mem, 0, 256, event_idx=bool(dev.features & (1 << F_EVENT_IDX)))
        dev.queues = [q]
        c.set_vring_num(0, q.size)
        c.set_vring_base(0, 0)
        bad = bad_ring_address(which, dev, q)
        c.set_vring_addr(0, bad["desc"], bad["used"], bad["avail"])
        mark = pair.backend.log_mark()
        try:
            c.set_vring_kick(0, q.kickfd)
        except NackError:
            refused_by = "nack"
        except BackendClosed:
            refused_by = "close"
        else:
            raise AssertionError("SET_VRING_KICK with a bad ring address was accepted")
        pair.backend.wait_for_line(pair.a_sock, "vring 0", since=mark)
        assert pair.backend.alive()
        if refused_by == "nack":  # the connection recovers with good addresses
            c.set_vring_addr(0, dev.mem.uaddr(q.desc_gpa), dev.mem.uaddr(q.used_gpa),
                             dev.mem.uaddr(q.avail_gpa))
            c.set_vring_kick(0, q.kickfd)
            c.set_vring_call(0, q.callfd)
            c.set_vring_enable(0, True)
            data = pair.rng.randbytes(4096)
            assert dev.write(0, data) == S_OK
            assert dev.read(0, 4096) == (S_OK, data)
    pair.b_still_serves()
    pair.a_serves_again()


# -------------------------------------------------------- a raw socket that lies


def test_garbage_bytes_then_disconnect_leave_the_backend_serving(pair: Pair) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(pair.a_sock)
    mark = pair.backend.log_mark()
    sock.sendall(random.Random(11).randbytes(100))
    sock.close()
    pair.backend.wait_for_line(pair.a_sock, "connection closed", since=mark)
    pair.b_still_serves()
    pair.a_serves_again()


# ------------------------------------------------------------- FD and buffer hygiene


def test_more_fds_than_any_message_carries_close_the_connection_and_are_not_kept(
    pair: Pair,
) -> None:
    with realized(pair) as dev:
        baseline = backend_fd_count(pair.backend)
        fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(12)]
        try:
            mark = pair.backend.log_mark()
            dev.conn.send_raw(Req.SET_VRING_CALL, struct.pack("<Q", 0), fds,
                              flags=VERSION | FLAG_NEED_REPLY)
            assert dev.conn.wait_closed(CLOSE_TIMEOUT)
            pair.backend.wait_for_line(pair.a_sock, "connection closed", "FDs", since=mark)
            # None of the FDs was kept, and A's socket is gone too.
            assert backend_fd_count(pair.backend) == baseline - 1
        finally:
            for fd in fds:
                os.close(fd)
    pair.b_still_serves()
    pair.a_serves_again()


def test_fds_on_a_request_that_takes_none_are_nacked_and_closed(pair: Pair) -> None:
    with realized(pair) as dev:
        baseline = backend_fd_count(pair.backend)
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            for _ in range(5):
                dev.conn.send_raw(Req.SET_OWNER, b"", [fd, fd],
                                  flags=VERSION | FLAG_NEED_REPLY)
                assert dev.conn.get_ack(Req.SET_OWNER) != 0
        finally:
            os.close(fd)
        assert backend_fd_count(pair.backend) == baseline
        start_and_do_io(pair, dev)
    pair.b_still_serves()


def test_front_end_that_never_reads_its_replies_is_dropped(pair: Pair) -> None:
    conn = VhostUserConnection.connect(pair.a_sock)
    try:
        mark = pair.backend.log_mark()
        flood = struct.pack("<III", Req.GET_QUEUE_NUM, VERSION, 0) * 120_000  # 2.4 MB replies
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.sock.sendall(flood)  # may be dropped while we are still sending
        assert_closed_with_log(pair, conn, mark, "does not read its replies")
    finally:
        conn.close()


# ------------------------------------- FDs whose behaviour the front-end controls


def set_blocking(fd: int, blocking: bool) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK if blocking else flags | os.O_NONBLOCK)


def drain(fd: int) -> None:
    set_blocking(fd, False)
    with contextlib.suppress(BlockingIOError):
        os.eventfd_read(fd)


SATURATED = 0xFFFF_FFFF_FFFF_FFFE  # an eventfd at this count blocks every write of 1


def test_err_eventfd_that_would_block_does_not_hang_other_devices(pair: Pair) -> None:
    errfd = os.eventfd(0, os.EFD_CLOEXEC)  # blocking, as the front-end chose
    os.eventfd_write(errfd, SATURATED)
    try:
        with BlkFrontend.open(pair.a_sock) as a:
            a.conn.set_vring_err(0, errfd)
            q = a.queues[0]
            q.write_desc(0, 1 << 44, 16, DESC_F_NEXT, 1)
            q.write_desc(1, 1 << 44, 1, DESC_F_WRITE)
            q.write_avail(0, 0)
            q.set_avail_idx(1)
            q.kick(force=True)
            data = pair.rng.randbytes(4096)
            assert pair.b.write(0, data, timeout=1.0) == S_OK  # TimeoutError: backend hung
            assert a.conn.wait_closed(CLOSE_TIMEOUT)
    finally:
        drain(errfd)  # let a hung backend go on, so teardown works
        os.close(errfd)
    pair.b_still_serves()


def test_call_eventfd_made_blocking_by_the_front_end_does_not_hang_other_devices(
    pair: Pair,
) -> None:
    with BlkFrontend.open(pair.a_sock, event_idx=False) as a:
        q = a.queues[0]
        try:
            set_blocking(q.callfd, True)  # after SET_VRING_CALL: the backend's fd shares this
            os.eventfd_write(q.callfd, SATURATED)
            hdr = a.mem.alloc(32, 64)
            a.mem.write(hdr, BLK_REQ_HEADER.pack(T_IN, 0, 0))
            q.post([(hdr, 16, False), (hdr + 16, 1, True)])
            q.kick(force=True)
            data = pair.rng.randbytes(4096)
            assert pair.b.write(0, data, timeout=1.0) == S_OK  # TimeoutError: backend hung
            assert pair.backend.alive()
        finally:
            drain(q.callfd)
    pair.b_still_serves()


def test_kick_fd_that_hangs_up_does_not_make_the_backend_spin(pair: Pair) -> None:
    with realized(pair) as dev:
        c = dev.conn
        dev.features = dev.negotiated_features()
        c.set_features(dev.features)
        c.set_mem_table(dev.mem.regions)
        q = SplitQueue(dev.mem, 0, 256, event_idx=bool(dev.features & (1 << F_EVENT_IDX)))
        dev.queues = [q]
        c.set_vring_num(0, q.size)
        c.set_vring_base(0, 0)
        c.set_vring_addr(0, dev.mem.uaddr(q.desc_gpa), dev.mem.uaddr(q.used_gpa),
                         dev.mem.uaddr(q.avail_gpa))
        c.set_vring_call(0, q.callfd)
        r, w = os.pipe()
        try:
            c.set_vring_kick(0, r)
        except NackError:
            pass  # refusing a kick FD that is not an eventfd is a fix
        else:
            os.close(w)  # the pipe hangs up: its read end polls EPOLLHUP from now on
            cpu0, t0 = backend_cpu_seconds(pair.backend), time.monotonic()
            c.wait_closed(0.5)  # dropping the connection is a fix as well
            busy = backend_cpu_seconds(pair.backend) - cpu0
            assert busy < 0.1 * (time.monotonic() - t0), f"backend burnt {busy:.2f} s of CPU"
        finally:
            os.close(r)
            with contextlib.suppress(OSError):
                os.close(w)
    pair.b_still_serves()


def test_refused_mem_table_leaves_running_rings_on_the_previous_table(tmp_path: Path) -> None:
    image = make_image(tmp_path / "mq.img", 4)
    sock = str(tmp_path / "mq.sock")
    with DevBackend({sock: image}, num_queues=2) as backend, BlkFrontend.open(
        sock, num_queues=2
    ) as dev:
        q0, q1 = dev.queues
        assert dev.read(0, 512, queue=0)[0] == S_OK
        r = dev.mem.regions[0]
        assert q0.used_gpa < q1.desc_gpa
        # A table that still holds ring 0 but not ring 1: the backend refuses it.
        short = [(r.gpa, q1.desc_gpa, r.uaddr, 0)]
        with pytest.raises(NackError):
            dev.conn.set(Req.SET_MEM_TABLE, pack_mem_table(short), [r.fd])
        # The previous table is still in force for both rings.
        for queue in (0, 1):
            assert dev.read(0, 4096, queue=queue, timeout=1.0)[0] == S_OK
        assert backend.alive()
