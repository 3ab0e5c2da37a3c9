"""Fuzz split-virtqueue chain walking (backend/virtqueue.py) over real guest memory mappings.

Guest memory is the layout the test front-end builds with `GuestMemory(32 KiB, regions=2,
high_gpa=0x8000)`: a 16 KiB region at GPA 0 and another at GPA 0x8000 with a hole between,
front-end virtual address = 0x7F00_0000_0000 + GPA, both mapped by backend.memory.GuestMemory
from one sealed memfd. The input places the rings and writes the memory:

    header  <HBBHIII  queue size, flags (bit 0 EVENT_IDX, bit 1 leave kicks on), reserved,
                      last_avail, then desc / avail / used offsets from 0x7F00_0000_0000
    patches <IH + data, repeated: write data at that GPA (clipped to its region)

The device then serves up to MAX_HEADS chains twice over, as BlkDevice.serve_batch would,
completing each with its writable byte count. Invariants:
  * RingError is the only exception;
  * every buffer a walked chain yields lies inside one mapping (its memoryview's address range
    is checked against the mmap) and is the buffer its descriptor names;
  * a chain has at most queue-size buffers and totals under 2**32 bytes;
  * the outcome (ring refused, avail count refused, head refused, chain refused or the exact
    buffer list) matches a plain reference walk written from the virtio spec + DESIGN rules;
  * the device writes guest memory only inside the used ring.

    python -m fuzz chain --seconds 60
"""

from __future__ import annotations

import ctypes
import fcntl
import itertools
import os
import struct
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz._harness import Reader, instrumented, require, time_limit

with instrumented(__name__, "backend"):
    from backend.memory import GuestMemory
    from backend.vhost_user import MemRegion
    from backend.virtqueue import (
        CHAIN_LENGTH_LIMIT,
        DESC_F_INDIRECT,
        DESC_F_NEXT,
        DESC_F_WRITE,
        RingError,
        SplitQueue,
        ring_sizes,
    )

UADDR_BASE = 0x7F00_0000_0000
REGION_SIZE = 0x4000
LAYOUT = ((0x0, 0), (0x8000, REGION_SIZE))  # (GPA, memfd offset) of each region
HEADER = struct.Struct("<HBBHIII")
PATCH = struct.Struct("<IH")
F_EVENT_IDX = 1
F_KICKS_ON = 2
MAX_HEADS = 16  # per round; the real device's turn budget bounds it the same way
ROUNDS = 2
_DESC = struct.Struct("<QIHH")
_ZERO = bytes(REGION_SIZE)


class _Memory:
    """The process-wide guest memory: one memfd, two mappings, their addresses."""

    def __init__(self) -> None:
        fd = os.memfd_create("fuzz-guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, 2 * REGION_SIZE)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        regions = [MemRegion(gpa, REGION_SIZE, UADDR_BASE + gpa, off) for gpa, off in LAYOUT]
        self.fd = fd
        self.mem = GuestMemory(regions, [fd, fd])
        self.views = [r.view for r in self.mem.regions]
        # (GPA, first byte's address in this process, size) of each mapping.
        self.spans = [(r.gpa, address_of(r.view), r.size) for r in self.mem.regions]

    def reset(self) -> None:
        for view in self.views:
            view[:] = _ZERO

    def region_of(self, gpa: int, length: int) -> memoryview | None:
        """The region view holding all of [gpa, gpa + length), sliced to it (or None)."""
        for (start, _off), view in zip(LAYOUT, self.views, strict=True):
            if start <= gpa and gpa + length <= start + REGION_SIZE:
                return view[gpa - start : gpa - start + length]
        return None

    def patch(self, gpa: int, data: bytes) -> None:
        for (start, _off), view in zip(LAYOUT, self.views, strict=True):
            if start <= gpa < start + REGION_SIZE:
                room = start + REGION_SIZE - gpa
                view[gpa - start : gpa - start + min(room, len(data))] = data[:room]

    def snapshot(self) -> list[bytes]:
        return [bytes(v) for v in self.views]

    def gpa_of(self, view: memoryview) -> int:
        """The GPA a buffer view starts at, proving the view lies inside one mapping."""
        addr = address_of(view)
        for gpa, base, size in self.spans:
            if base <= addr and addr + len(view) <= base + size:
                return gpa + (addr - base)
        raise AssertionError(f"buffer at {addr:#x}+{len(view):#x} is outside guest memory")


def address_of(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


_memory: _Memory | None = None


def memory() -> _Memory:
    global _memory
    if _memory is None:
        _memory = _Memory()
    return _memory


# --- the reference: the same rules, written straight from the spec ----------------------------


class Refused(Exception):
    pass


def ref_ring_ok(num: int, desc: int, avail: int, used: int, event_idx: bool) -> bool:
    if not 1 <= num <= 32768 or num & (num - 1):
        return False
    if desc % 16 or avail % 2 or used % 4:
        return False
    sizes = ring_sizes(num, event_idx)
    areas = sorted(zip((desc, avail, used), sizes, strict=True))
    if any(start + n > next_start for (start, n), (next_start, _) in itertools.pairwise(areas)):
        return False  # the device writes the used ring: no area may overlap another
    return all(memory().region_of(off, n) is not None for off, n in areas)


def ref_u16(gpa: int) -> int:
    return int.from_bytes(memory().region_of(gpa, 2), "little")


def ref_chain(num: int, desc: int, head: int) -> list[tuple[int, int, bool]]:
    mem = memory()
    table, limit, index, seen, indirect = desc, num, head, 0, False
    buffers: list[tuple[int, int, bool]] = []
    total = 0
    while True:
        seen += 1
        if seen > limit:
            raise Refused("too long or a loop")
        addr, length, flags, nxt = _DESC.unpack(mem.region_of(table + 16 * index, 16))
        if flags & DESC_F_INDIRECT:
            if indirect or seen != 1 or flags & DESC_F_NEXT:
                raise Refused("misplaced indirect")
            if length == 0 or length % 16 or length // 16 > num:
                raise Refused("bad indirect size")
            if mem.region_of(addr, length) is None:
                raise Refused("indirect table outside memory")
            table, limit, index, seen, indirect = addr, length // 16, 0, 0, True
            continue
        if length:
            total += length
            if mem.region_of(addr, length) is None:
                raise Refused("buffer outside memory")
            writable = bool(flags & DESC_F_WRITE)
            if buffers and buffers[-1][2] and not writable:
                raise Refused("readable after writable")
            buffers.append((addr, length, writable))
        if not flags & DESC_F_NEXT:
            break
        if nxt >= limit:
            raise Refused("next out of range")
        index = nxt
    if total >= CHAIN_LENGTH_LIMIT:
        raise Refused("over 4 GiB")
    return buffers


# --- the harness ------------------------------------------------------------------------------


def check(data: bytes) -> None:
    with time_limit(2.0):
        _check(data)


def _check(data: bytes) -> None:
    mem = memory()
    mem.reset()
    r = Reader(data)
    num, flags, _reserved, last_avail, desc, avail, used = HEADER.unpack(
        r.bytes(HEADER.size).ljust(HEADER.size, b"\0"))
    while r.remaining() >= PATCH.size:
        gpa, n = PATCH.unpack(r.bytes(PATCH.size))
        mem.patch(gpa, r.bytes(n))
    event_idx = bool(flags & F_EVENT_IDX)
    before = mem.snapshot()

    expect_ring = ref_ring_ok(num, desc, avail, used, event_idx)
    try:
        queue = SplitQueue(mem.mem, num, UADDR_BASE + desc, UADDR_BASE + avail,
                           UADDR_BASE + used, last_avail, event_idx=event_idx)
    except RingError:
        require(not expect_ring, "a ring inside guest memory was refused")
        return
    require(expect_ring, "a ring outside guest memory (or misaligned) was accepted")
    try:
        _serve(queue, num, desc, avail, flags)
    finally:
        queue.release()

    used_len = ring_sizes(num, event_idx)[2]
    after = mem.snapshot()
    for (start, _off), old, new in zip(LAYOUT, before, after, strict=True):
        if old != new:
            diff = int.from_bytes(old, "little") ^ int.from_bytes(new, "little")
            first = start + ((diff & -diff).bit_length() - 1) // 8
            last = start + (diff.bit_length() - 1) // 8
            require(used <= first and last < used + used_len,
                    f"device wrote GPA {first:#x}..{last:#x} outside the used ring "
                    f"{used:#x}+{used_len:#x}")


def _serve(queue: SplitQueue, num: int, desc: int, avail: int, flags: int) -> None:
    mem = memory()
    last = queue.last_avail
    for _ in range(ROUNDS):
        ahead = (ref_u16(avail + 2) - last) & 0xFFFF
        try:
            count = queue.pending()
        except RingError:
            require(ahead > num, f"avail index {ahead} ahead of a {num}-entry queue was refused")
            return
        require(ahead <= num and count == ahead, f"pending() said {count}, the ring {ahead}")
        if not count:
            queue.set_kicks(True)
            return
        queue.set_kicks(bool(flags & F_KICKS_ON))
        for _ in range(min(count, MAX_HEADS)):
            head_ref = ref_u16(avail + 4 + 2 * (last % num))
            last = (last + 1) & 0xFFFF
            try:
                head = queue.next_head()
            except RingError:
                require(head_ref >= num, f"head {head_ref} of a {num}-entry queue was refused")
                return
            require(head == head_ref < num, f"next_head() gave {head}, the ring {head_ref}")
            try:
                expected: list[tuple[int, int, bool]] | None = ref_chain(num, desc, head)
            except Refused:
                expected = None
            try:
                readable, writable = queue.chain(head)
            except RingError as exc:
                require(expected is None, f"a valid chain at head {head} was refused: {exc}")
                return
            require(expected is not None, f"an invalid chain at head {head} was accepted")
            got = [(mem.gpa_of(v), len(v), False) for v in readable]
            got += [(mem.gpa_of(v), len(v), True) for v in writable]
            require(len(got) <= num, f"chain of {len(got)} buffers in a {num}-entry queue")
            total = sum(n for _, n, _ in got)
            require(total < CHAIN_LENGTH_LIMIT, f"chain totals {total} bytes")
            require(got == expected, f"chain at head {head} walked to {got}, spec says {expected}")
            queue.put_used(head, sum(len(v) for v in writable))
        queue.publish_used()


if __name__ == "__main__":
    from fuzz._harness import fuzz

    fuzz(check, "chain")
