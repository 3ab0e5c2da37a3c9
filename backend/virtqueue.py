"""Split virtqueue (virtio 1.2 section 2.7), device side: avail/used rings and chain walking.

Everything in the rings and descriptor tables is written by the guest and is validated before
use: head and next indices in range, chain length bounded by the queue size (so loops end),
total length under 2**32, indirect tables a non-zero multiple of 16, not nested and never
combined with NEXT, device-readable descriptors before device-writable ones, and every buffer
inside one guest memory region. A violation raises `RingError`; the caller then stops the device.
"""

from __future__ import annotations

import itertools
import struct
import threading

from backend.memory import GuestMemory, GuestMemoryError

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
DESC_SIZE = 16
CHAIN_LENGTH_LIMIT = 1 << 32
# Transport feature bits every device offers (virtio 1.2 section 6).
F_RING_INDIRECT_DESC = 1 << 28
F_RING_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
_unpack_desc = _DESC.unpack_from
_unpack_u16 = _U16.unpack_from
_pack_used = _USED_ELEM.pack_into

# Acquiring a lock executes a locked instruction: a full memory barrier on x86, which orders
# our store of avail_event/flags before the re-read of avail->idx (no lost wake-ups).
_fence_lock = threading.Lock()


def memory_fence() -> None:
    with _fence_lock:
        pass


class RingError(ValueError):
    """The guest's ring or descriptor chain cannot be trusted; the device must stop."""


def ring_sizes(num: int, event_idx: bool) -> tuple[int, int, int]:
    """Byte sizes of the descriptor table, avail ring and used ring for `num` entries."""
    extra = 2 if event_idx else 0
    return DESC_SIZE * num, 4 + 2 * num + extra, 4 + 8 * num + extra


class SplitQueue:
    """One split virtqueue over guest memory. Not thread-safe: one I/O thread owns it."""

    __slots__ = (
        "avail",
        "desc",
        "event_idx",
        "last_avail",
        "mask",
        "mem",
        "signalled_used",
        "size",
        "used",
        "used16",
        "used_idx",
    )

    def __init__(
        self,
        mem: GuestMemory,
        num: int,
        desc_uva: int,
        avail_uva: int,
        used_uva: int,
        last_avail: int,
        *,
        event_idx: bool,
    ) -> None:
        if num == 0 or num & (num - 1) or num > 32768:
            raise RingError(f"queue size {num} is not a power of 2 <= 32768")
        for name, addr, align in (("descriptor table", desc_uva, 16),
                                  ("avail ring", avail_uva, 2), ("used ring", used_uva, 4)):
            if addr % align:
                raise RingError(f"{name} address {addr:#x} is not {align}-byte aligned")
        desc_len, avail_len, used_len = ring_sizes(num, event_idx)
        areas = sorted([(desc_uva, desc_len, "descriptor table"), (avail_uva, avail_len,
                        "avail ring"), (used_uva, used_len, "used ring")])
        for (start, length, name), (next_start, _, next_name) in itertools.pairwise(areas):
            if start + length > next_start:
                # The device writes the used ring: overlapping it with what it reads would let
                # completions rewrite descriptors and avail entries under the walker.
                raise RingError(f"{name} and {next_name} overlap")
        try:
            self.desc = mem.uva(desc_uva, desc_len)
            self.avail = mem.uva(avail_uva, avail_len)
            self.used = mem.uva(used_uva, used_len)
        except GuestMemoryError as exc:
            raise RingError(f"ring outside guest memory: {exc}") from None
        # The guest reads these 16-bit fields while we write them: store each with one 16-bit
        # write (struct.pack_into zeroes the field first, so the guest could see idx == 0).
        self.used16 = self.used.cast("H")
        self.mem = mem
        self.size = num
        self.mask = num - 1
        self.event_idx = event_idx
        self.last_avail = last_avail & 0xFFFF
        # The used index in guest memory is authoritative (reconnects resume from it).
        self.used_idx = _unpack_u16(self.used, 2)[0]
        self.signalled_used = self.used_idx

    def release(self) -> None:
        """Drop the ring views so the guest memory mapping can be closed."""
        for view in (self.used16, self.desc, self.avail, self.used):
            view.release()

    # --- avail side ------------------------------------------------------------------------

    def pending(self) -> int:
        """Number of heads the driver has made available that we have not taken yet."""
        count = (_unpack_u16(self.avail, 2)[0] - self.last_avail) & 0xFFFF
        if count > self.size:
            raise RingError(f"avail index is {count} entries ahead of a {self.size}-entry queue")
        return count

    def next_head(self) -> int:
        """Take the next available head index (call only after `pending()` counted it)."""
        head = _unpack_u16(self.avail, 4 + 2 * (self.last_avail & self.mask))[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if head >= self.size:
            raise RingError(f"avail ring names head {head} of a {self.size}-entry queue")
        return head

    def unget(self, count: int) -> None:
        """Give back the last `count` heads taken and not used: they are taken again next."""
        self.last_avail = (self.last_avail - count) & 0xFFFF

    def chain(self, head: int) -> tuple[list[memoryview], list[memoryview]]:
        """Walk and validate the chain at `head`: (device-readable, device-writable) buffers."""
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        table = self.desc
        limit = self.size
        index = head
        seen = 0
        total = 0
        ranges = self.mem.gpa_ranges
        try:
            while True:
                seen += 1
                if seen > limit:
                    raise RingError(f"descriptor chain at head {head} loops or exceeds {limit}")
                addr, length, flags, nxt = _unpack_desc(table, DESC_SIZE * index)
                if flags & DESC_F_INDIRECT:
                    table, limit = self._indirect_table(head, table, seen, addr, length, flags)
                    index = 0
                    seen = 0
                    continue
                if length:
                    total += length
                    # GuestMemory.gpa inlined: [addr, end) inside one region (end cannot wrap
                    # past 2**64 and still end inside one); gpa() raises with the reason.
                    end = addr + length
                    for start, stop, view in ranges:
                        if start <= addr and end <= stop:
                            buf = view[addr - start : end - start]
                            break
                    else:
                        buf = self.mem.gpa(addr, length)
                    if flags & DESC_F_WRITE:
                        writable.append(buf)
                    elif writable:
                        raise RingError(f"chain at head {head} has a readable after a writable")
                    else:
                        readable.append(buf)
                if not flags & DESC_F_NEXT:
                    break
                if nxt >= limit:
                    raise RingError(f"chain at head {head} links to descriptor {nxt} of {limit}")
                index = nxt
        except GuestMemoryError as exc:
            raise RingError(f"chain at head {head}: {exc}") from None
        if total >= CHAIN_LENGTH_LIMIT:
            raise RingError(f"chain at head {head} totals {total} bytes, over 2**32")
        return readable, writable

    def _indirect_table(
        self, head: int, table: memoryview, seen: int, addr: int, length: int, flags: int
    ) -> tuple[memoryview, int]:
        if table is not self.desc:
            raise RingError(f"chain at head {head} nests an indirect table")
        if seen != 1:
            raise RingError(f"chain at head {head} has an indirect descriptor after its head")
        if flags & DESC_F_NEXT:
            raise RingError(f"chain at head {head} sets both INDIRECT and NEXT")
        if length == 0 or length % DESC_SIZE:
            raise RingError(f"indirect table at head {head} is {length} bytes, not 16*n > 0")
        count = length // DESC_SIZE
        if count > self.size:
            raise RingError(f"indirect table at head {head} has {count} entries, over queue size")
        return self.mem.gpa(addr, length), count

    # --- used side -------------------------------------------------------------------------

    def put_used(self, head: int, written: int) -> None:
        """Return a chain to the driver; visible once `publish_used()` moves the index."""
        _pack_used(self.used, 4 + 8 * (self.used_idx & self.mask), head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF

    def publish_used(self) -> bool:
        """Make the completed entries visible; True when the driver wants an interrupt."""
        self.used16[1] = self.used_idx
        new = self.used_idx
        old = self.signalled_used
        if new == old:
            return False
        memory_fence()
        if self.event_idx:
            used_event = _unpack_u16(self.avail, 4 + 2 * self.size)[0]
            notify = (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
        else:
            notify = not _unpack_u16(self.avail, 0)[0] & AVAIL_F_NO_INTERRUPT
        self.signalled_used = new
        return notify

    def set_kicks(self, enabled: bool) -> None:
        """Ask the driver to kick (or not) when it adds buffers."""
        if self.event_idx:
            if enabled:
                self.used16[2 + 4 * self.size] = self.last_avail
        else:
            self.used16[0] = 0 if enabled else USED_F_NO_NOTIFY
        if enabled:
            memory_fence()
