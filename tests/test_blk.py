"""Unit tests for virtio-blk request parsing and execution (backend/blk.py) on a temp image."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Iterator

import pytest

from backend import blk
from backend.blk import (
    CONFIG,
    F_DISCARD,
    F_FLUSH,
    F_RO,
    F_WRITE_ZEROES,
    MAX_DISCARD_SECTORS,
    MAX_DISCARD_SEGMENTS,
    S_IOERR,
    S_OK,
    S_UNSUPP,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    WRITE_ZEROES_UNMAP,
    BlkDevice,
    RequestError,
    parse_ranges,
    parse_request,
)
from backend.memory import GuestMemory
from backend.vhost_user import MemRegion
from backend.virtqueue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, RingError, SplitQueue

SECTOR = 512
SECTORS = 128
IMAGE_SIZE = SECTORS * SECTOR
STATUS_UNTOUCHED = 0xEE


def image_bytes(size: int = IMAGE_SIZE) -> bytes:
    return bytes((i // SECTOR * 31 + i) % 251 + 1 for i in range(size))  # never zero


@pytest.fixture
def image(tmp_path) -> Iterator[int]:
    path = tmp_path / "disk.raw"
    path.write_bytes(image_bytes())
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    yield fd
    os.close(fd)


@pytest.fixture
def dev(image) -> BlkDevice:
    return BlkDevice(image, readonly=False)


@pytest.fixture
def ro_dev(image) -> BlkDevice:
    return BlkDevice(image, readonly=True)


def hdr(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def ranges(*segments: tuple[int, int, int]) -> bytes:
    return b"".join(struct.pack("<QII", *seg) for seg in segments)


def views(*chunks: bytes) -> list[memoryview]:
    return [memoryview(bytearray(c)) for c in chunks]


def out_bufs(*sizes: int) -> list[memoryview]:
    """Device-writable buffers, pre-filled so untouched bytes are recognisable."""
    return [memoryview(bytearray([STATUS_UNTOUCHED]) * n) for n in sizes]


def run(dev: BlkDevice, readable: list[bytes], writable: list[int]):
    """Execute one request; return (bytes reported written, status byte, writable buffers)."""
    rbufs, wbufs = views(*readable), out_bufs(*writable)
    written = dev.execute(rbufs, wbufs)
    return written, wbufs[-1][-1] if wbufs else None, wbufs


def disk(fd: int, offset: int = 0, size: int = IMAGE_SIZE) -> bytes:
    return os.pread(fd, size, offset)


# --- config space and features ----------------------------------------------------------------


def test_config_reports_capacity_and_limits(image):
    dev = BlkDevice(image, readonly=False, num_queues=4, queue_size_hint=256)
    raw = dev.config()
    assert len(raw) == 60 == CONFIG.size
    capacity, size_max, seg_max = struct.unpack_from("<QII", raw, 0)
    assert (capacity, size_max, seg_max) == (SECTORS, 0, 254)
    blk_size, phys_exp, align_off, min_io, opt_io = struct.unpack_from("<IBBHI", raw, 20)
    assert (blk_size, phys_exp, align_off, min_io, opt_io) == (512, 3, 0, 8, 0)
    writeback, num_queues = struct.unpack_from("<BxH", raw, 32)
    assert (writeback, num_queues) == (0, 4)
    assert struct.unpack_from("<IIIIIB", raw, 36) == (
        MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, 8, MAX_DISCARD_SECTORS,
        MAX_DISCARD_SEGMENTS, 1,
    )


def test_capacity_rounds_a_partial_last_sector_down(tmp_path):
    path = tmp_path / "odd.raw"
    path.write_bytes(bytes(10 * SECTOR + 100))
    fd = os.open(path, os.O_RDONLY)
    try:
        dev = BlkDevice(fd, readonly=True)
        assert dev.capacity == 10
        assert struct.unpack_from("<Q", dev.config())[0] == 10
        written, status, _ = run(dev, [hdr(T_IN, 9)], [SECTOR, 1])
        assert (written, status) == (SECTOR + 1, S_OK)
        assert run(dev, [hdr(T_IN, 10)], [SECTOR, 1])[1] == S_IOERR
    finally:
        os.close(fd)


def test_read_write_device_offers_discard_and_write_zeroes_not_ro(dev):
    assert dev.device_features & (F_DISCARD | F_WRITE_ZEROES | F_FLUSH) == (
        F_DISCARD | F_WRITE_ZEROES | F_FLUSH)
    assert not dev.device_features & F_RO


def test_read_only_device_offers_ro_not_discard(ro_dev):
    assert ro_dev.device_features & F_RO
    assert not ro_dev.device_features & (F_DISCARD | F_WRITE_ZEROES)


# --- parse_request ----------------------------------------------------------------------------


def test_parse_request_splits_header_data_and_status():
    req = parse_request(views(hdr(T_OUT, 7), b"d" * 512), out_bufs(1))
    assert (req.type, req.sector) == (T_OUT, 7)
    assert [bytes(v) for v in req.data] == [b"d" * 512]
    assert len(req.status) == 1


def test_parse_request_takes_data_after_the_header_in_the_same_descriptor():
    req = parse_request(views(hdr(T_OUT, 1) + b"x" * 512), out_bufs(1))
    assert [bytes(v) for v in req.data] == [b"x" * 512]


def test_parse_request_takes_status_from_the_last_writable_byte():
    req = parse_request(views(hdr(T_IN, 3)), out_bufs(512, 513))
    assert [len(v) for v in req.data] == [512, 512]
    req.status[0] = 0x42
    assert req.data[1].obj[-1] == 0x42


def test_header_split_across_descriptors_is_joined():
    raw = hdr(T_OUT, 0x0102_0304_0506)
    req = parse_request(views(raw[:4], raw[4:10], raw[10:] + b"tail", b"more"), out_bufs(1))
    assert (req.type, req.sector) == (T_OUT, 0x0102_0304_0506)
    assert [bytes(v) for v in req.data] == [b"tail", b"more"]


def test_header_shorter_than_sixteen_bytes_is_a_request_error():
    with pytest.raises(RequestError, match="header is 12 bytes") as info:
        parse_request(views(hdr(T_IN)[:8], hdr(T_IN)[8:12]), out_bufs(1))
    assert info.value.status == S_IOERR


def test_request_without_readable_header_is_a_request_error():
    with pytest.raises(RequestError, match="header is 0 bytes") as info:
        parse_request([], out_bufs(512, 1))
    assert info.value.status == S_IOERR


def test_request_without_writable_status_byte_is_a_request_error():
    with pytest.raises(RequestError, match="no device-writable byte") as info:
        parse_request(views(hdr(T_OUT), b"d" * 512), [])
    assert info.value.status == S_IOERR


@pytest.mark.parametrize("rtype", [T_IN, T_GET_ID])
def test_device_readable_data_on_a_read_type_request_is_a_request_error(rtype):
    with pytest.raises(RequestError, match="carries device-readable data"):
        parse_request(views(hdr(rtype), b"d" * 512), out_bufs(512, 1))


@pytest.mark.parametrize("rtype", [T_OUT, T_FLUSH, T_DISCARD, T_WRITE_ZEROES])
def test_device_writable_data_on_a_write_type_request_is_a_request_error(rtype):
    with pytest.raises(RequestError, match="carries device-writable data"):
        parse_request(views(hdr(rtype), b"d" * 16), out_bufs(512, 1))


# --- parse_ranges -----------------------------------------------------------------------------


def test_parse_ranges_decodes_segments_across_buffers():
    raw = ranges((1, 2, 0), (10, 20, 1))
    assert parse_ranges(views(raw[:5], raw[5:])) == [(1, 2, 0), (10, 20, 1)]


def test_parse_ranges_accepts_the_segment_limit():
    raw = ranges(*[(i, 1, 0) for i in range(MAX_DISCARD_SEGMENTS)])
    assert len(parse_ranges(views(raw))) == MAX_DISCARD_SEGMENTS


def test_empty_range_payload_is_a_request_error():
    with pytest.raises(RequestError, match="range payload is 0 bytes") as info:
        parse_ranges([])
    assert info.value.status == S_IOERR


@pytest.mark.parametrize("size", [1, 15, 17, 31])
def test_range_payload_not_a_multiple_of_16_is_a_request_error(size):
    with pytest.raises(RequestError, match=f"range payload is {size} bytes"):
        parse_ranges(views(bytes(size)))


def test_more_ranges_than_the_device_limit_is_a_request_error():
    raw = ranges(*[(i, 1, 0) for i in range(MAX_DISCARD_SEGMENTS + 1)])
    with pytest.raises(RequestError, match="33 ranges exceed"):
        parse_ranges(views(raw))


# --- IN / OUT ---------------------------------------------------------------------------------


def test_read_returns_image_sectors_and_ok(dev):
    written, status, bufs = run(dev, [hdr(T_IN, 2)], [2 * SECTOR, 1])
    assert (written, status) == (2 * SECTOR + 1, S_OK)
    assert bytes(bufs[0]) == image_bytes()[2 * SECTOR : 4 * SECTOR]


def test_read_scatters_into_several_buffers_and_shares_the_status_descriptor(dev):
    written, status, bufs = run(dev, [hdr(T_IN, 5)], [100, 412, SECTOR + 1])
    assert (written, status) == (2 * SECTOR + 1, S_OK)
    got = bytes(bufs[0]) + bytes(bufs[1]) + bytes(bufs[2][:-1])
    assert got == image_bytes()[5 * SECTOR : 7 * SECTOR]


def test_read_of_the_last_sector_is_accepted(dev):
    written, status, bufs = run(dev, [hdr(T_IN, SECTORS - 1)], [SECTOR, 1])
    assert (written, status) == (SECTOR + 1, S_OK)
    assert bytes(bufs[0]) == image_bytes()[-SECTOR:]


def test_read_with_no_data_buffers_completes_ok(dev):
    assert run(dev, [hdr(T_IN, 0)], [1])[:2] == (1, S_OK)


@pytest.mark.parametrize(
    ("sector", "nbytes"),
    [(SECTORS, SECTOR), (SECTORS - 1, 2 * SECTOR), ((1 << 64) - 1, SECTOR), (1 << 55, SECTOR)],
)
def test_read_past_capacity_is_an_io_error(dev, sector, nbytes):
    written, status, bufs = run(dev, [hdr(T_IN, sector)], [nbytes, 1])
    assert (written, status) == (1, S_IOERR)
    assert bytes(bufs[0]) == bytes([STATUS_UNTOUCHED]) * nbytes


@pytest.mark.parametrize("nbytes", [1, 511, 513, 1000])
def test_read_of_partial_sectors_is_an_io_error(dev, nbytes):
    written, status, bufs = run(dev, [hdr(T_IN, 0)], [nbytes, 1])
    assert (written, status) == (1, S_IOERR)
    assert bytes(bufs[0]) == bytes([STATUS_UNTOUCHED]) * nbytes


def test_short_read_of_a_shrunk_image_is_an_io_error(dev, image):
    os.ftruncate(image, IMAGE_SIZE - SECTOR)
    written, status, _ = run(dev, [hdr(T_IN, SECTORS - 2)], [2 * SECTOR, 1])
    assert (written, status) == (1, S_IOERR)


def test_write_lands_in_the_image(dev, image):
    payload = os.urandom(2 * SECTOR)
    written, status, _ = run(dev, [hdr(T_OUT, 3), payload[:700], payload[700:]], [1])
    assert (written, status) == (1, S_OK)
    assert disk(image, 3 * SECTOR, 2 * SECTOR) == payload
    assert disk(image, 0, 3 * SECTOR) == image_bytes()[: 3 * SECTOR]
    assert disk(image, 5 * SECTOR) == image_bytes()[5 * SECTOR :]


def test_write_with_data_in_the_header_descriptor(dev, image):
    payload = b"\x77" * SECTOR
    assert run(dev, [hdr(T_OUT, 1) + payload], [1])[1] == S_OK
    assert disk(image, SECTOR, SECTOR) == payload


def test_write_then_read_round_trips(dev):
    payload = os.urandom(4 * SECTOR)
    assert run(dev, [hdr(T_OUT, 60), payload], [1])[1] == S_OK
    _, status, bufs = run(dev, [hdr(T_IN, 60)], [4 * SECTOR, 1])
    assert status == S_OK
    assert bytes(bufs[0]) == payload


def test_write_to_a_read_only_device_is_an_io_error(ro_dev, image):
    written, status, _ = run(ro_dev, [hdr(T_OUT, 0), b"\0" * SECTOR], [1])
    assert (written, status) == (1, S_IOERR)
    assert disk(image) == image_bytes()


def test_write_past_capacity_is_an_io_error(dev, image):
    written, status, _ = run(dev, [hdr(T_OUT, SECTORS - 1), b"\0" * 2 * SECTOR], [1])
    assert (written, status) == (1, S_IOERR)
    assert disk(image) == image_bytes()
    assert os.fstat(image).st_size == IMAGE_SIZE


def test_write_of_partial_sectors_is_an_io_error(dev, image):
    assert run(dev, [hdr(T_OUT, 0), b"\0" * 100], [1])[1] == S_IOERR
    assert disk(image) == image_bytes()


def test_write_failing_in_the_kernel_is_an_io_error(tmp_path):
    path = tmp_path / "ro.raw"
    path.write_bytes(bytes(IMAGE_SIZE))
    fd = os.open(path, os.O_RDONLY)
    try:
        dev = BlkDevice(fd, readonly=False)  # the FD cannot write: pwritev raises EBADF
        assert run(dev, [hdr(T_OUT, 0), b"\1" * SECTOR], [1])[:2] == (1, S_IOERR)
    finally:
        os.close(fd)


# --- direction and framing errors complete with IOERR ------------------------------------------


def test_read_with_device_readable_data_completes_with_io_error(dev):
    written, status, bufs = run(dev, [hdr(T_IN, 0), b"x" * SECTOR], [SECTOR, 1])
    assert (written, status) == (1, S_IOERR)
    assert bytes(bufs[0]) == bytes([STATUS_UNTOUCHED]) * SECTOR


def test_write_with_device_writable_data_completes_with_io_error(dev, image):
    written, status, _ = run(dev, [hdr(T_OUT, 0), b"x" * SECTOR], [SECTOR, 1])
    assert (written, status) == (1, S_IOERR)
    assert disk(image) == image_bytes()


def test_header_split_across_descriptors_executes(dev, image):
    raw = hdr(T_OUT, 4)
    payload = b"\x55" * SECTOR
    assert run(dev, [raw[:3], raw[3:] + payload[:10], payload[10:]], [1])[1] == S_OK
    assert disk(image, 4 * SECTOR, SECTOR) == payload


def test_short_header_completes_with_io_error(dev):
    assert run(dev, [hdr(T_IN)[:15]], [SECTOR, 1])[:2] == (1, S_IOERR)


def test_request_without_a_status_byte_is_returned_untouched(dev, image):
    readable = views(hdr(T_OUT, 0), b"\1" * SECTOR)
    assert dev.execute(readable, []) == 0
    assert disk(image) == image_bytes()


# --- FLUSH / GET_ID / unknown -----------------------------------------------------------------


def test_flush_completes_ok(dev, ro_dev):
    assert run(dev, [hdr(T_FLUSH)], [1])[:2] == (1, S_OK)
    assert run(ro_dev, [hdr(T_FLUSH)], [1])[:2] == (1, S_OK)


def test_get_id_writes_the_serial_padded_to_twenty_bytes(image):
    dev = BlkDevice(image, readonly=False, serial="disk-7")
    written, status, bufs = run(dev, [hdr(T_GET_ID)], [20, 1])
    assert (written, status) == (21, S_OK)
    assert bytes(bufs[0]) == b"disk-7".ljust(20, b"\0")


def test_get_id_fills_only_twenty_bytes_of_a_larger_buffer(dev):
    written, status, bufs = run(dev, [hdr(T_GET_ID)], [32, 1])
    assert (written, status) == (21, S_OK)
    assert bytes(bufs[0][:20]) == b"ringfence".ljust(20, b"\0")
    assert bytes(bufs[0][20:]) == bytes([STATUS_UNTOUCHED]) * 12


def test_get_id_truncates_to_a_smaller_buffer_across_descriptors(dev):
    written, status, bufs = run(dev, [hdr(T_GET_ID)], [3, 2, 1])
    assert (written, status) == (6, S_OK)
    assert bytes(bufs[0]) + bytes(bufs[1]) == b"ringf"


def test_get_id_serial_longer_than_twenty_bytes_is_truncated(image):
    dev = BlkDevice(image, readonly=True, serial="s" * 30)
    _, status, bufs = run(dev, [hdr(T_GET_ID)], [20, 1])
    assert status == S_OK
    assert bytes(bufs[0]) == b"s" * 20


def test_get_id_with_device_readable_data_completes_with_io_error(dev):
    assert run(dev, [hdr(T_GET_ID), b"x" * 20], [20, 1])[:2] == (1, S_IOERR)


@pytest.mark.parametrize("rtype", [2, 3, 7, 99, 0xFFFF_FFFF])
def test_unknown_request_type_completes_unsupported(dev, image, rtype):
    assert run(dev, [hdr(rtype, 0)], [1])[:2] == (1, S_UNSUPP)
    assert run(dev, [hdr(rtype, 0), b"\0" * SECTOR], [1])[:2] == (1, S_UNSUPP)
    assert disk(image) == image_bytes()


def test_unknown_request_type_with_writable_data_completes_unsupported(dev):
    assert run(dev, [hdr(10, 0)], [12, 1])[:2] == (1, S_UNSUPP)


# --- DISCARD / WRITE_ZEROES -------------------------------------------------------------------


def test_discard_punches_a_hole_that_reads_back_as_zeros(dev, image):
    written, status, _ = run(dev, [hdr(T_DISCARD), ranges((8, 16, 0))], [1])
    assert (written, status) == (1, S_OK)
    expected = bytearray(image_bytes())
    expected[8 * SECTOR : 24 * SECTOR] = bytes(16 * SECTOR)
    assert disk(image) == bytes(expected)
    assert os.fstat(image).st_size == IMAGE_SIZE  # KEEP_SIZE


def test_discard_of_several_ranges_and_zero_sectors(dev, image):
    payload = ranges((0, 8, 0), (SECTORS - 8, 8, 0), (40, 0, 0))
    assert run(dev, [hdr(T_DISCARD), payload], [1])[1] == S_OK
    data = disk(image)
    assert data[: 8 * SECTOR] == bytes(8 * SECTOR)
    assert data[-8 * SECTOR :] == bytes(8 * SECTOR)
    assert data[8 * SECTOR : -8 * SECTOR] == image_bytes()[8 * SECTOR : -8 * SECTOR]


@pytest.mark.parametrize("flags", [0, WRITE_ZEROES_UNMAP])
def test_write_zeroes_zeroes_the_range(dev, image, flags):
    assert run(dev, [hdr(T_WRITE_ZEROES), ranges((1, 2, flags))], [1])[:2] == (1, S_OK)
    data = disk(image)
    assert data[SECTOR : 3 * SECTOR] == bytes(2 * SECTOR)
    assert data[:SECTOR] == image_bytes()[:SECTOR]
    assert data[3 * SECTOR :] == image_bytes()[3 * SECTOR :]
    assert os.fstat(image).st_size == IMAGE_SIZE


@pytest.mark.parametrize("flags", [WRITE_ZEROES_UNMAP, 2, 0x8000_0000])
def test_discard_with_flags_is_unsupported(dev, image, flags):
    assert run(dev, [hdr(T_DISCARD), ranges((0, 8, flags))], [1])[:2] == (1, S_UNSUPP)
    assert disk(image) == image_bytes()


@pytest.mark.parametrize("flags", [2, 3, 0x8000_0000])
def test_write_zeroes_with_unknown_flags_is_unsupported(dev, image, flags):
    assert run(dev, [hdr(T_WRITE_ZEROES), ranges((0, 8, flags))], [1])[:2] == (1, S_UNSUPP)
    assert disk(image) == image_bytes()


@pytest.mark.parametrize("rtype", [T_DISCARD, T_WRITE_ZEROES])
@pytest.mark.parametrize(
    "segment", [(SECTORS, 1, 0), (SECTORS - 1, 2, 0), ((1 << 64) - 1, 1, 0)]
)
def test_discard_or_write_zeroes_past_capacity_is_an_io_error(dev, image, rtype, segment):
    assert run(dev, [hdr(rtype), ranges(segment)], [1])[:2] == (1, S_IOERR)
    assert disk(image) == image_bytes()
    assert os.fstat(image).st_size == IMAGE_SIZE


@pytest.mark.parametrize("rtype", [T_DISCARD, T_WRITE_ZEROES])
def test_discard_or_write_zeroes_on_a_read_only_device_is_an_io_error(ro_dev, image, rtype):
    assert run(ro_dev, [hdr(rtype), ranges((0, 8, 0))], [1])[:2] == (1, S_IOERR)
    assert disk(image) == image_bytes()


@pytest.mark.parametrize("payload", [b"", b"\0" * 15])
def test_discard_with_a_malformed_range_payload_is_an_io_error(dev, payload):
    readable = [hdr(T_DISCARD), payload] if payload else [hdr(T_DISCARD)]
    assert run(dev, readable, [1])[:2] == (1, S_IOERR)


@pytest.mark.parametrize(
    ("rtype", "bad", "status"),
    [
        (T_DISCARD, (16, 8, WRITE_ZEROES_UNMAP), S_UNSUPP),
        (T_WRITE_ZEROES, (16, 8, 2), S_UNSUPP),
        (T_WRITE_ZEROES, (SECTORS, 8, 0), S_IOERR),
    ],
)
def test_refused_multi_segment_request_changes_nothing(dev, image, rtype, bad, status):
    assert run(dev, [hdr(rtype), ranges((0, 8, 0), bad)], [1])[:2] == (1, status)
    assert disk(image) == image_bytes()


def _fallocate_fails(err: int):
    def fail(fd, mode, offset, length):
        raise OSError(err, os.strerror(err))

    return fail


def test_write_zeroes_falls_back_to_writing_zeros_when_unsupported(dev, image, monkeypatch):
    monkeypatch.setattr(blk, "fallocate", _fallocate_fails(errno.EOPNOTSUPP))
    assert run(dev, [hdr(T_WRITE_ZEROES), ranges((2, 4, 0))], [1])[1] == S_OK
    assert disk(image, 2 * SECTOR, 4 * SECTOR) == bytes(4 * SECTOR)
    assert disk(image, 6 * SECTOR) == image_bytes()[6 * SECTOR :]


def test_discard_the_file_system_cannot_honour_is_dropped(dev, image, monkeypatch):
    monkeypatch.setattr(blk, "fallocate", _fallocate_fails(errno.EOPNOTSUPP))
    assert run(dev, [hdr(T_DISCARD), ranges((2, 4, 0))], [1])[1] == S_OK
    assert disk(image) == image_bytes()


def test_discard_failing_with_a_real_error_is_an_io_error(dev, monkeypatch):
    monkeypatch.setattr(blk, "fallocate", _fallocate_fails(errno.EIO))
    assert run(dev, [hdr(T_DISCARD), ranges((2, 4, 0))], [1])[1] == S_IOERR


# --- through a real virtqueue -----------------------------------------------------------------

GPA = 0x4000_0000
UVA = 0x7F55_0000_0000
MEM_SIZE = 1 << 20
NUM = 16
DESC, AVAIL, USED, TABLE, DATA = 0x0, 0x1000, 0x2000, 0x3000, 0x10000


class Driver:
    """A minimal driver writing requests into a memfd-backed ring."""

    def __init__(self) -> None:
        fd = os.memfd_create("rf-blk-test", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        os.ftruncate(fd, MEM_SIZE)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        self.mem = GuestMemory([MemRegion(GPA, MEM_SIZE, UVA, 0)], [fd])
        os.close(fd)
        self.raw = self.mem.gpa(GPA, MEM_SIZE)
        self.queue = SplitQueue(self.mem, NUM, UVA + DESC, UVA + AVAIL, UVA + USED, 0,
                                event_idx=False)
        self.next_desc = 0
        self.next_data = DATA
        self.avail_idx = 0

    def close(self) -> None:
        self.queue.release()
        self.raw.release()
        self.mem.close()

    def buffer(self, content: bytes | int) -> tuple[int, int]:
        size = content if isinstance(content, int) else len(content)
        off = self.next_data
        if not isinstance(content, int):
            self.raw[off : off + size] = content
        self.next_data += (size + 15) & ~15
        return GPA + off, size

    def submit(self, readable: list[bytes], writable: list[int], *, indirect=False):
        """Lay out a chain; return its head and the guest addresses of its writable buffers."""
        parts = [(*self.buffer(c), 0) for c in readable]
        outs = [self.buffer(n) for n in writable]
        parts += [(addr, size, DESC_F_WRITE) for addr, size in outs]
        table = TABLE + 0x100 * self.next_desc if indirect else DESC
        first = 0 if indirect else self.next_desc
        for i, (addr, size, flags) in enumerate(parts):
            more = i < len(parts) - 1
            flags |= DESC_F_NEXT if more else 0
            struct.pack_into("<QIHH", self.raw, table + 16 * (first + i), addr, size, flags,
                             first + i + 1 if more else 0)
        if indirect:
            head = self.next_desc
            struct.pack_into("<QIHH", self.raw, DESC + 16 * head, GPA + table, 16 * len(parts),
                             DESC_F_INDIRECT, 0)
            self.next_desc += 1
        else:
            head = first
            self.next_desc += len(parts)
        struct.pack_into("<H", self.raw, AVAIL + 4 + 2 * (self.avail_idx % NUM), head)
        self.avail_idx += 1
        struct.pack_into("<H", self.raw, AVAIL + 2, self.avail_idx)
        return head, [addr for addr, _ in outs]

    def used(self, slot: int) -> tuple[int, int]:
        return struct.unpack_from("<II", self.raw, USED + 4 + 8 * slot)

    def used_flags(self) -> int:
        return struct.unpack_from("<H", self.raw, USED)[0]

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.raw[gpa - GPA : gpa - GPA + size])


@pytest.fixture
def driver() -> Iterator[Driver]:
    d = Driver()
    yield d
    d.close()


def test_process_serves_a_write_then_a_read_through_the_ring(dev, driver, image):
    payload = os.urandom(2 * SECTOR)
    w_head, (w_status,) = driver.submit([hdr(T_OUT, 10), payload], [1])
    r_head, (r_data, r_status) = driver.submit([hdr(T_IN, 10)], [2 * SECTOR, 1], indirect=True)
    assert dev.process(driver.queue, budget=64) == 2
    assert driver.queue.publish_used() is True
    assert driver.used(0) == (w_head, 1)
    assert driver.used(1) == (r_head, 2 * SECTOR + 1)
    assert driver.read(w_status, 1) == bytes([S_OK])
    assert driver.read(r_status, 1) == bytes([S_OK])
    assert driver.read(r_data, 2 * SECTOR) == payload
    assert disk(image, 10 * SECTOR, 2 * SECTOR) == payload


def test_process_completes_bad_requests_with_a_status_and_carries_on(dev, driver):
    _, (_, bad_status) = driver.submit([hdr(T_IN, SECTORS)], [SECTOR, 1])
    _, (unsupp_status,) = driver.submit([hdr(99)], [1])
    _, (ok_status,) = driver.submit([hdr(T_FLUSH)], [1])
    assert dev.process(driver.queue, budget=64) == 3
    assert driver.read(bad_status, 1) == bytes([S_IOERR])
    assert driver.read(unsupp_status, 1) == bytes([S_UNSUPP])
    assert driver.read(ok_status, 1) == bytes([S_OK])
    assert [driver.used(i)[1] for i in range(3)] == [1, 1, 1]


def test_process_reenables_kicks_when_the_queue_runs_dry(dev, driver):
    assert dev.process(driver.queue, budget=8) == 0
    assert driver.used_flags() == 0
    driver.submit([hdr(T_FLUSH)], [1])
    assert dev.process(driver.queue, budget=8) == 1
    assert driver.used_flags() == 0


def test_process_leaves_kicks_off_when_the_budget_runs_out(dev, driver):
    for _ in range(3):
        driver.submit([hdr(T_FLUSH)], [1])
    done = dev.process(driver.queue, budget=2)
    assert done >= 2
    assert driver.used_flags() == 1  # NO_NOTIFY: the caller must come back
    driver.queue.publish_used()
    assert dev.process(driver.queue, budget=2) == 3 - done


def test_process_propagates_a_broken_ring(dev, driver):
    struct.pack_into("<H", driver.raw, AVAIL + 4, NUM)  # head out of range
    struct.pack_into("<H", driver.raw, AVAIL + 2, 1)
    with pytest.raises(RingError, match="names head"):
        dev.process(driver.queue, budget=8)
