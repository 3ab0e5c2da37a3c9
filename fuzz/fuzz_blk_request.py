"""Fuzz virtio-blk requests (backend/blk.py): parse_request, parse_ranges, BlkDevice.execute.

The input is a walked chain, as SplitQueue.chain would hand it over:

    <BBB  flags (bit 0 read-only device), readable count (0..4), writable count (0..4)
    <H per buffer: its length (1..4096), readable buffers first
    then the readable buffers' contents (header first), zero-padded

Buffers are views of one anonymous mapping, apart from each other with guard bytes between;
the image is a 64 KiB file in /dev/shm (tmpfs: fallocate and fdatasync are cheap there).
Invariants:
  * parse_request / parse_ranges raise only RequestError (with an IOERR or UNSUPP status);
    at most MAX_DISCARD_SEGMENTS ranges come back;
  * execute never raises; its used length is at most the writable total;
  * with a writable byte, the last one (the status) ends up OK, IOERR or UNSUPP, and used >= 1;
    without one, used is 0 and nothing is written;
  * the device never writes device-readable buffers or the guard bytes between buffers;
  * the image never grows; a read-only device never changes it;
  * an OK read returns the image's bytes, an OK write puts the data in the image, an OK
    GET_ID returns the serial.

    python -m fuzz blk_request --seconds 60
"""

from __future__ import annotations

import hashlib
import mmap
import os
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz._harness import Reader, instrumented, require, time_limit

with instrumented(__name__, "backend"):
    from backend.blk import (
        ID_BYTES,
        MAX_DISCARD_SEGMENTS,
        S_IOERR,
        S_OK,
        S_UNSUPP,
        SECTOR_SHIFT,
        T_DISCARD,
        T_GET_ID,
        T_IN,
        T_OUT,
        T_WRITE_ZEROES,
        BlkDevice,
        RequestError,
        parse_ranges,
        parse_request,
    )

IMAGE_SIZE = 64 << 10
MAX_BUFFERS = 4
MAX_BUFFER = 4096
GUARD = 16
ARENA = 2 * MAX_BUFFERS * (MAX_BUFFER + GUARD) + GUARD
SERIAL = "fuzz-serial"
STATUSES = (S_OK, S_IOERR, S_UNSUPP)


class _World:
    """The process-wide image and buffer arena, set up once."""

    def __init__(self) -> None:
        directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(prefix="fuzz-blk-", dir=directory)
        os.unlink(path)
        os.pwrite(fd, bytes(range(256)) * (IMAGE_SIZE // 256), 0)
        self.fd = fd
        self.devices = {ro: BlkDevice(fd, readonly=ro, serial=SERIAL) for ro in (False, True)}
        self.arena = mmap.mmap(-1, ARENA)
        self.view = memoryview(self.arena)


_world: _World | None = None


def world() -> _World:
    global _world
    if _world is None:
        _world = _World()
    return _world


def image_bytes(offset: int, length: int) -> bytes:
    return os.pread(world().fd, length, offset)


def check(data: bytes) -> None:
    with time_limit(2.0):
        _check(data)


def _check(data: bytes) -> None:
    w = world()
    r = Reader(data)
    readonly = bool(r.u8() & 1)
    nread, nwrite = r.u8() % (MAX_BUFFERS + 1), r.u8() % (MAX_BUFFERS + 1)
    lengths = [1 + r.u16() % MAX_BUFFER for _ in range(nread + nwrite)]

    # Lay the buffers out with guards between them, fill the arena with a marker first.
    w.arena[:] = b"\xa5" * ARENA
    spans = []
    pos = GUARD
    for length in lengths:
        spans.append((pos, length))
        pos += length + GUARD
    readable = [w.view[p : p + n] for p, n in spans[:nread]]
    writable = [w.view[p : p + n] for p, n in spans[nread:]]
    for view in readable:
        view[:] = r.bytes(len(view)).ljust(len(view), b"\0")
    if writable:
        writable[-1][-1] = 0xFF  # where the status goes: no valid status has this value
    arena_before = bytes(w.arena)
    device = w.devices[readonly]
    size_before = os.fstat(w.fd).st_size
    digest_before = hashlib.sha256(image_bytes(0, IMAGE_SIZE)).digest() if readonly else b""

    # The sans-IO parsers on their own.
    try:
        req = parse_request(list(readable), list(writable))
    except RequestError as exc:
        require(exc.status in (S_IOERR, S_UNSUPP), f"parse_request status {exc.status}")
        req = None
    if req is not None:
        require(bool(writable) and len(req.status) == 1, "status is not one writable byte")
        if req.type in (T_DISCARD, T_WRITE_ZEROES):
            try:
                ranges = parse_ranges(req.data)
            except RequestError as exc:
                require(exc.status in (S_IOERR, S_UNSUPP), f"parse_ranges status {exc.status}")
            else:
                require(0 < len(ranges) <= MAX_DISCARD_SEGMENTS, f"{len(ranges)} ranges")
                require(all(len(t) == 3 and all(type(v) is int for v in t) for t in ranges),
                        "a range is not three integers")
        w.arena[:] = arena_before  # parsing alone writes nothing (checked below for execute)

    used = device.execute(list(readable), list(writable))
    wtotal = sum(map(len, writable))
    require(0 <= used <= wtotal, f"used length {used} with {wtotal} writable bytes")
    after = bytes(w.arena)
    if writable:
        status = writable[-1][-1]
        require(status in STATUSES, f"status byte left at {status:#x}")
        require(used >= 1, "status written but used length 0")
    else:
        require(used == 0 and after == arena_before, "no writable byte, yet used or written")
    # Only device-writable bytes may change.
    for pos, length in spans[:nread]:
        require(after[pos : pos + length] == arena_before[pos : pos + length],
                "the device wrote into a device-readable buffer")
    edges = [0, *[x for p, n in spans for x in (p, p + n)], ARENA]
    for start, stop in zip(edges[::2], edges[1::2], strict=True):
        require(after[start:stop] == arena_before[start:stop], "the device wrote a guard byte")
    require(os.fstat(w.fd).st_size == size_before, "the image grew or shrank")
    if readonly:
        require(hashlib.sha256(image_bytes(0, IMAGE_SIZE)).digest() == digest_before,
                "a read-only image changed")
    if req is None or not writable or writable[-1][-1] != S_OK:
        return
    # What an OK status promises.
    data_views = req.data
    if req.type == T_IN:
        nbytes = sum(map(len, data_views))
        require(used == nbytes + 1, f"OK read of {nbytes} bytes used {used}")
        got = b"".join(bytes(v) for v in data_views)
        require(got == image_bytes(req.sector << SECTOR_SHIFT, nbytes), "read wrong bytes")
    elif req.type == T_OUT:
        require(not readonly, "OK write on a read-only device")
        sent = b"".join(bytes(v) for v in data_views)
        require(image_bytes(req.sector << SECTOR_SHIFT, len(sent)) == sent,
                "OK write is not in the image")
        require(used == 1, f"OK write used {used}")
    elif req.type == T_GET_ID:
        got = b"".join(bytes(v) for v in data_views)[:ID_BYTES]
        require(got == SERIAL.encode().ljust(ID_BYTES, b"\0")[: len(got)], "GET_ID wrong serial")
    elif req.type in (T_DISCARD, T_WRITE_ZEROES):
        require(not readonly, "OK discard/write-zeroes on a read-only device")
        if req.type == T_WRITE_ZEROES:
            for sector, count, _flags in parse_ranges(req.data):
                zeroed = image_bytes(sector << SECTOR_SHIFT, count << SECTOR_SHIFT)
                require(zeroed == bytes(len(zeroed)), "OK write-zeroes left data behind")


if __name__ == "__main__":
    from fuzz._harness import fuzz

    fuzz(check, "blk_request")
