"""virtio-blk (virtio 1.2 section 5.2): request parsing and execution on an image FD.

`parse_request` is sans-IO: it takes a walked chain and returns where the header says to go,
where the data lives and where the status byte goes. `BlkDevice.execute` does the I/O with
preadv/pwritev straight between the image and views of guest memory, never copying the data.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass

from backend.virtqueue import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, SplitQueue

SECTOR_SIZE = 512
SECTOR_SHIFT = 9

T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13

KNOWN_TYPES = frozenset({T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES})

S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

F_SIZE_MAX = 1 << 1
F_SEG_MAX = 1 << 2
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9
F_TOPOLOGY = 1 << 10
F_MQ = 1 << 12
F_DISCARD = 1 << 13
F_WRITE_ZEROES = 1 << 14

ID_BYTES = 20
MAX_DISCARD_SEGMENTS = 32
# Per-range limit, in sectors (2 GiB), for discard and write-zeroes.
MAX_DISCARD_SECTORS = 1 << 22
WRITE_ZEROES_UNMAP = 1

HEADER = struct.Struct("<IIQ")
RANGE = struct.Struct("<QII")
CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class RequestError(ValueError):
    """A well-formed chain carries a request the device rejects (completed with a status)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(slots=True)
class BlkRequest:
    """A parsed request: header fields, data buffers, and the status byte's place."""

    type: int
    sector: int
    data: list[memoryview]
    status: memoryview


def parse_request(readable: list[memoryview], writable: list[memoryview]) -> BlkRequest:
    """Split a chain into header, data and status; RequestError if it cannot carry them.

    The header is the first 16 device-readable bytes (it may span descriptors); the status is
    the last device-writable byte. Data is whatever lies between, in the direction the request
    type implies; a type that disagrees with the direction of its buffers is rejected.
    """
    if not writable:
        raise RequestError(S_IOERR, "request has no device-writable byte for its status")
    last = writable[-1]
    first = readable[0] if readable else b""
    if len(last) == 1 and len(readable) == 1 and len(first) == HEADER.size:
        # The common shape: header, data buffers, status byte, each in its own descriptor.
        rtype, _reserved, sector = HEADER.unpack_from(first)
        if rtype == T_IN:
            return BlkRequest(rtype, sector, writable[:-1], last)
    status = last[-1:]
    tail = writable[:-1]
    if len(last) > 1:
        tail.append(last[:-1])
    if len(first) >= HEADER.size:
        rtype, _reserved, sector = HEADER.unpack_from(first)
        body = readable[1:]
        if len(first) > HEADER.size:
            body.insert(0, first[HEADER.size :])
    else:
        rtype, sector, body = _gather_header(readable)
    if rtype not in KNOWN_TYPES:
        return BlkRequest(rtype, sector, [], status)
    if rtype in (T_IN, T_GET_ID):
        if body:
            raise RequestError(S_IOERR, f"type {rtype} request carries device-readable data")
        return BlkRequest(rtype, sector, tail, status)
    if tail:
        raise RequestError(S_IOERR, f"type {rtype} request carries device-writable data")
    return BlkRequest(rtype, sector, body, status)


def _gather_header(readable: list[memoryview]) -> tuple[int, int, list[memoryview]]:
    """The rare header split over several descriptors: join it, keep the rest as data."""
    header = bytearray()
    rest: list[memoryview] = []
    for view in readable:
        need = HEADER.size - len(header)
        if need > 0:
            header += view[:need]
            if len(view) > need:
                rest.append(view[need:])
        else:
            rest.append(view)
    if len(header) < HEADER.size:
        raise RequestError(S_IOERR, f"request header is {len(header)} bytes, need 16")
    rtype, _reserved, sector = HEADER.unpack(header)
    return rtype, sector, rest


def parse_ranges(data: list[memoryview]) -> list[tuple[int, int, int]]:
    """DISCARD / WRITE_ZEROES payload: (sector, num_sectors, flags) segments."""
    raw = b"".join(data)
    if not raw or len(raw) % RANGE.size:
        raise RequestError(S_IOERR, f"range payload is {len(raw)} bytes, not 16*n > 0")
    if len(raw) // RANGE.size > MAX_DISCARD_SEGMENTS:
        raise RequestError(S_IOERR, f"{len(raw) // RANGE.size} ranges exceed the device limit")
    return [RANGE.unpack_from(raw, off) for off in range(0, len(raw), RANGE.size)]


def _total(views: list[memoryview]) -> int:
    return sum(map(len, views))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class BlkDevice:
    """A virtio-blk device over one open image FD (not owned: the caller closes it)."""

    def __init__(
        self,
        fd: int,
        *,
        readonly: bool,
        num_queues: int = 1,
        serial: str = "ringfence",
        queue_size_hint: int = 128,
    ) -> None:
        self.fd = fd
        self.moved = 0  # data bytes read or written for the guest, for stats and QoS
        self.readonly = readonly
        self.num_queues = num_queues
        self.serial = serial.encode()[:ID_BYTES]
        self.seg_max = max(queue_size_hint - 2, 1)
        size = _image_size(fd)
        self.capacity = size >> SECTOR_SHIFT
        self.size_bytes = self.capacity << SECTOR_SHIFT
        self.device_features = (
            F_VERSION_1
            | F_RING_INDIRECT_DESC
            | F_RING_EVENT_IDX
            | F_SEG_MAX
            | F_BLK_SIZE
            | F_FLUSH
            | F_TOPOLOGY
            | F_MQ
            | (F_RO if readonly else F_DISCARD | F_WRITE_ZEROES)
        )

    def config(self) -> bytes:
        """struct virtio_blk_config, up to write_zeroes_may_unmap (60 bytes)."""
        return CONFIG.pack(
            self.capacity,
            0,  # size_max: not offered
            self.seg_max,
            0, 0, 0,  # geometry: not offered
            SECTOR_SIZE,  # blk_size: logical block
            3, 0, 8, 0,  # topology: 4 KiB physical blocks (2**3 logical), min_io 4 KiB
            0, 0,  # writeback, unused
            self.num_queues,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, 8,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, 1,
        )

    def process(self, queue: SplitQueue, budget: int) -> int:
        """Serve available requests, at most about `budget`; return how many completed.

        Kicks stay suppressed while we work. When the queue runs dry they are re-enabled and
        the ring re-read, so a request that races with re-enabling is never missed. Returning
        with `done >= budget` means work may remain and kicks are still off: call again.
        RingError propagates to the caller, which stops the device.
        """
        done = 0
        while done < budget:
            count = queue.pending()
            if not count:
                queue.set_kicks(True)
                count = queue.pending()
                if not count:
                    return done
            queue.set_kicks(False)
            done += self.serve_batch(queue, count)
        return done

    def serve_batch(self, queue: SplitQueue, budget: int) -> int:
        """Serve up to `budget` available requests; the scheduler owns kick suppression and
        turns. Returns how many completed; `moved` counts their data bytes."""
        count = queue.pending()
        if count > budget:
            count = budget
        execute = self.execute
        for _ in range(count):
            head = queue.next_head()
            readable, writable = queue.chain(head)
            queue.put_used(head, execute(readable, writable))
        return count

    def execute(self, readable: list[memoryview], writable: list[memoryview]) -> int:
        """Run one request; write its status; return the bytes written into guest buffers."""
        try:
            req = parse_request(readable, writable)
        except RequestError as exc:
            if not writable:
                return 0  # nowhere to put a status: hand the buffers back untouched
            writable[-1][-1] = exc.status
            return 1
        rtype = req.type
        try:
            if rtype == T_IN:
                written = self._read(req)
            elif rtype == T_OUT:
                self._write(req)
                written = 0
            elif rtype == T_FLUSH:
                os.fdatasync(self.fd)
                written = 0
            elif rtype == T_GET_ID:
                written = self._get_id(req)
            elif rtype in (T_DISCARD, T_WRITE_ZEROES):
                self._discard_or_zero(req)
                written = 0
            else:
                req.status[0] = S_UNSUPP
                return 1
        except RequestError as exc:
            req.status[0] = exc.status
            return 1
        except OSError:
            req.status[0] = S_IOERR
            return 1
        req.status[0] = S_OK
        return written + 1

    def _check_range(self, sector: int, nbytes: int) -> int:
        if nbytes % SECTOR_SIZE:
            raise RequestError(S_IOERR, f"{nbytes}-byte transfer is not whole sectors")
        offset = sector << SECTOR_SHIFT
        if offset + nbytes > self.size_bytes:
            raise RequestError(S_IOERR, f"sector {sector} + {nbytes} bytes is past capacity")
        return offset

    def _read(self, req: BlkRequest) -> int:
        data = req.data
        nbytes = len(data[0]) if len(data) == 1 else _total(data)
        offset = self._check_range(req.sector, nbytes)
        got = os.preadv(self.fd, data, offset)
        if got != nbytes:
            raise RequestError(S_IOERR, f"short read of {got} of {nbytes} bytes")
        self.moved += nbytes
        return nbytes

    def _write(self, req: BlkRequest) -> None:
        if self.readonly:
            raise RequestError(S_IOERR, "write to a read-only device")
        data = req.data
        nbytes = len(data[0]) if len(data) == 1 else _total(data)
        offset = self._check_range(req.sector, nbytes)
        put = os.pwritev(self.fd, data, offset)
        if put != nbytes:
            raise RequestError(S_IOERR, f"short write of {put} of {nbytes} bytes")
        self.moved += nbytes

    def _get_id(self, req: BlkRequest) -> int:
        room = _total(req.data)
        ident = self.serial.ljust(ID_BYTES, b"\0")[: min(room, ID_BYTES)]
        pos = 0
        for view in req.data:
            take = min(len(view), len(ident) - pos)
            view[:take] = ident[pos : pos + take]
            pos += take
        return pos

    def _discard_or_zero(self, req: BlkRequest) -> None:
        if self.readonly:
            raise RequestError(S_IOERR, "discard or write-zeroes on a read-only device")
        # Validate every range before touching any, so a refused request changes nothing.
        extents = []
        for sector, num_sectors, flags in parse_ranges(req.data):
            if req.type == T_DISCARD and flags:
                raise RequestError(S_UNSUPP, f"discard flags {flags:#x}")
            if flags & ~WRITE_ZEROES_UNMAP:
                raise RequestError(S_UNSUPP, f"write-zeroes flags {flags:#x}")
            if num_sectors > MAX_DISCARD_SECTORS:
                # The advertised limit also bounds how long one request can hold the I/O thread.
                raise RequestError(S_IOERR, f"range of {num_sectors} sectors exceeds the limit")
            length = num_sectors << SECTOR_SHIFT
            extents.append((self._check_range(sector, length), length))
        for offset, length in extents:
            if length:
                self._deallocate(req.type, offset, length)

    def _deallocate(self, rtype: int, offset: int, length: int) -> None:
        mode = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
        if rtype == T_WRITE_ZEROES:
            mode = FALLOC_FL_KEEP_SIZE | FALLOC_FL_ZERO_RANGE
        try:
            fallocate(self.fd, mode, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENODEV):
                raise
            if rtype == T_WRITE_ZEROES:
                self._write_zeroes_slowly(offset, length)
            # A discard the file system cannot honour is a hint we may drop (virtio 5.2.6.2).

    def _write_zeroes_slowly(self, offset: int, length: int) -> None:
        chunk = bytes(min(length, 1 << 20))
        while length:
            step = min(length, len(chunk))
            os.pwrite(self.fd, chunk[:step], offset)
            offset += step
            length -= step


def _image_size(fd: int) -> int:
    size = os.lseek(fd, 0, os.SEEK_END)
    os.lseek(fd, 0, os.SEEK_SET)
    return size
