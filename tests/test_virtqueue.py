"""Unit tests for the split virtqueue (backend/virtqueue.py) over real memfd-backed memory."""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Iterator

import pytest

from backend.memory import GuestMemory
from backend.vhost_user import MemRegion
from backend.virtqueue import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    USED_F_NO_NOTIFY,
    RingError,
    SplitQueue,
    ring_sizes,
)

NEXT, WRITE, INDIRECT = DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT
GPA = 0x10_0000
UVA = 0x7F00_0000_0000
SIZE = 1 << 20
DESC_OFF = 0x0000
AVAIL_OFF = 0x4000
USED_OFF = 0x8000
TABLE_OFF = 0xC000  # indirect tables
DATA_OFF = 0x10000


def sealed_memfd(size: int) -> int:
    fd = os.memfd_create("rf-vq-test", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


def data(offset: int) -> int:
    """Guest-physical address of a data buffer `offset` bytes into the data area."""
    return GPA + DATA_OFF + offset


class Rig:
    """Plays the driver: writes descriptors and ring entries into guest memory."""

    def __init__(self, mem: GuestMemory, gpa: int, uva: int, size: int, num: int,
                 event_idx: bool) -> None:
        self.mem = mem
        self.raw = mem.gpa(gpa, size)
        self.uva = uva
        self.num = num
        self.event_idx = event_idx
        self.avail_idx = 0

    def desc(self, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
             table: int = DESC_OFF) -> None:
        struct.pack_into("<QIHH", self.raw, table + 16 * index, addr, length, flags, nxt)

    def offer(self, *heads: int) -> None:
        for head in heads:
            struct.pack_into("<H", self.raw, AVAIL_OFF + 4 + 2 * (self.avail_idx % self.num),
                             head)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, idx: int) -> None:
        struct.pack_into("<H", self.raw, AVAIL_OFF + 2, idx)

    def set_avail_flags(self, flags: int) -> None:
        struct.pack_into("<H", self.raw, AVAIL_OFF, flags)

    def set_used_event(self, value: int) -> None:
        struct.pack_into("<H", self.raw, AVAIL_OFF + 4 + 2 * self.num, value)

    def set_used_idx(self, value: int) -> None:
        struct.pack_into("<H", self.raw, USED_OFF + 2, value)

    def used_flags(self) -> int:
        return struct.unpack_from("<H", self.raw, USED_OFF)[0]

    def used_idx(self) -> int:
        return struct.unpack_from("<H", self.raw, USED_OFF + 2)[0]

    def used_elem(self, slot: int) -> tuple[int, int]:
        return struct.unpack_from("<II", self.raw, USED_OFF + 4 + 8 * slot)

    def avail_event(self) -> int:
        return struct.unpack_from("<H", self.raw, USED_OFF + 4 + 8 * self.num)[0]

    def queue(self, last_avail: int = 0, **overrides: int) -> SplitQueue:
        return SplitQueue(
            self.mem,
            overrides.get("num", self.num),
            overrides.get("desc", self.uva + DESC_OFF),
            overrides.get("avail", self.uva + AVAIL_OFF),
            overrides.get("used", self.uva + USED_OFF),
            last_avail,
            event_idx=self.event_idx,
        )

    def take(self, queue: SplitQueue):
        assert queue.pending() >= 1
        return queue.chain(queue.next_head())


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    fd = sealed_memfd(SIZE)
    memory = GuestMemory([MemRegion(GPA, SIZE, UVA, 0)], [fd])
    os.close(fd)
    yield memory
    memory.close()


def make_rig(mem: GuestMemory, num: int = 8, event_idx: bool = False) -> Rig:
    return Rig(mem, GPA, UVA, SIZE, num, event_idx)


@pytest.fixture
def rig(mem) -> Rig:
    return make_rig(mem)


# --- construction -----------------------------------------------------------------------------


def test_ring_sizes_follow_the_split_ring_layout():
    assert ring_sizes(256, False) == (4096, 4 + 512, 4 + 2048)
    assert ring_sizes(256, True) == (4096, 4 + 512 + 2, 4 + 2048 + 2)


@pytest.mark.parametrize("num", [0, 3, 6, 65536])
def test_queue_size_not_a_power_of_two_up_to_32768_is_a_ring_error(rig, num):
    with pytest.raises(RingError, match=f"queue size {num}"):
        rig.queue(num=num)


@pytest.mark.parametrize(
    ("ring", "offset", "name"),
    [("desc", 8, "descriptor table"), ("avail", 1, "avail ring"), ("used", 2, "used ring")],
)
def test_misaligned_ring_is_a_ring_error(rig, ring, offset, name):
    base = {"desc": DESC_OFF, "avail": AVAIL_OFF, "used": USED_OFF}[ring]
    with pytest.raises(RingError, match=f"{name} address .* is not"):
        rig.queue(**{ring: UVA + base + offset})


@pytest.mark.parametrize("ring,other", [("used", "desc"), ("avail", "used"), ("desc", "avail")])
def test_vring_areas_that_overlap_are_a_ring_error(rig, ring, other):
    # The device writes the used ring; overlap would let completions rewrite what it reads.
    base = {"desc": DESC_OFF, "avail": AVAIL_OFF, "used": USED_OFF}[other]
    with pytest.raises(RingError, match="overlap"):
        rig.queue(**{ring: UVA + base})


@pytest.mark.parametrize("ring", ["desc", "avail", "used"])
def test_ring_outside_guest_memory_is_a_ring_error(rig, ring):
    # Starts inside the region but runs past its end.
    with pytest.raises(RingError, match="ring outside guest memory"):
        rig.queue(**{ring: UVA + SIZE - 16})


def test_ring_addresses_are_front_end_virtual_not_guest_physical(rig):
    with pytest.raises(RingError, match="front-end virtual"):
        rig.queue(desc=GPA + DESC_OFF)


def test_used_index_is_resumed_from_guest_memory(rig):
    rig.set_used_idx(41)
    queue = rig.queue()
    assert queue.used_idx == 41
    queue.put_used(0, 0)
    assert rig.used_elem(41 % rig.num) == (0, 0)


# --- avail side -------------------------------------------------------------------------------


def test_pending_counts_heads_offered_and_next_head_takes_them_in_order(rig):
    for i in range(3):
        rig.desc(i, data(0), 16)
    rig.offer(2, 0, 1)
    queue = rig.queue()
    assert queue.pending() == 3
    assert [queue.next_head() for _ in range(3)] == [2, 0, 1]
    assert queue.pending() == 0
    assert queue.last_avail == 3


def test_avail_index_wraps_at_sixteen_bits(rig):
    rig.set_avail_idx(2)
    queue = rig.queue(last_avail=0xFFFE)
    assert queue.pending() == 4


def test_avail_index_exactly_queue_size_ahead_is_accepted(rig):
    rig.set_avail_idx(rig.num)
    assert rig.queue().pending() == rig.num


def test_avail_index_more_than_queue_size_ahead_is_a_ring_error(rig):
    rig.set_avail_idx(rig.num + 1)
    with pytest.raises(RingError, match="9 entries ahead of a 8-entry queue"):
        rig.queue().pending()


def test_avail_index_moving_backwards_is_a_ring_error(rig):
    rig.set_avail_idx(4)
    queue = rig.queue(last_avail=5)
    with pytest.raises(RingError, match="entries ahead"):
        queue.pending()


def test_head_out_of_range_is_a_ring_error(rig):
    rig.offer(rig.num)
    queue = rig.queue()
    assert queue.pending() == 1
    with pytest.raises(RingError, match="names head 8 of a 8-entry queue"):
        queue.next_head()


# --- chains -----------------------------------------------------------------------------------


def test_single_readable_descriptor_chain(rig, mem):
    mem.gpa(data(0), 5)[:] = b"hello"
    rig.desc(3, data(0), 5)
    rig.offer(3)
    readable, writable = rig.take(rig.queue())
    assert [bytes(v) for v in readable] == [b"hello"]
    assert writable == []


def test_chain_splits_readable_then_writable_buffers_that_alias_guest_memory(rig, mem):
    mem.gpa(data(0), 16)[:] = b"H" * 16
    rig.desc(0, data(0), 16, NEXT, 5)
    rig.desc(5, data(0x100), 512, WRITE | NEXT, 2)
    rig.desc(2, data(0x400), 1, WRITE)
    rig.offer(0)
    readable, writable = rig.take(rig.queue())
    assert [len(v) for v in readable] == [16]
    assert [len(v) for v in writable] == [512, 1]
    assert bytes(readable[0]) == b"H" * 16
    writable[1][0] = 0x5A
    assert bytes(mem.gpa(data(0x400), 1)) == b"\x5a"


def test_chain_of_exactly_queue_size_is_accepted(rig):
    for i in range(rig.num):
        last = i == rig.num - 1
        rig.desc(i, data(16 * i), 16, 0 if last else NEXT, i + 1)
    rig.offer(0)
    readable, writable = rig.take(rig.queue())
    assert len(readable) == rig.num
    assert writable == []


def test_next_out_of_range_is_a_ring_error(rig):
    rig.desc(0, data(0), 16, NEXT, rig.num)
    rig.offer(0)
    with pytest.raises(RingError, match="links to descriptor 8 of 8"):
        rig.take(rig.queue())


def test_descriptor_loop_is_a_ring_error(rig):
    rig.desc(0, data(0), 16, NEXT, 1)
    rig.desc(1, data(16), 16, NEXT, 0)
    rig.offer(0)
    with pytest.raises(RingError, match="loops or exceeds 8"):
        rig.take(rig.queue())


def test_descriptor_pointing_to_itself_is_a_ring_error(rig):
    rig.desc(4, data(0), 16, WRITE | NEXT, 4)
    rig.offer(4)
    with pytest.raises(RingError, match="loops"):
        rig.take(rig.queue())


def test_chain_longer_than_queue_size_is_a_ring_error(rig):
    # Every descriptor is visited once, then the tail links back to the second one.
    for i in range(rig.num):
        rig.desc(i, data(16 * i), 16, NEXT, (i + 1) % rig.num or 1)
    rig.offer(0)
    with pytest.raises(RingError, match="loops or exceeds 8"):
        rig.take(rig.queue())


def test_readable_after_writable_is_a_ring_error(rig):
    rig.desc(0, data(0), 16, WRITE | NEXT, 1)
    rig.desc(1, data(16), 16)
    rig.offer(0)
    with pytest.raises(RingError, match="readable after a writable"):
        rig.take(rig.queue())


def test_buffer_outside_guest_memory_is_a_ring_error(rig):
    rig.desc(0, GPA + SIZE, 16)
    rig.offer(0)
    with pytest.raises(RingError, match="chain at head 0: guest-physical range"):
        rig.take(rig.queue())


def test_buffer_running_past_the_region_end_is_a_ring_error(rig):
    rig.desc(0, GPA + SIZE - 8, 16, WRITE)
    rig.offer(0)
    with pytest.raises(RingError, match="not inside one region"):
        rig.take(rig.queue())


def test_buffer_address_near_two_pow_64_is_a_ring_error(rig):
    rig.desc(0, (1 << 64) - 8, 16)
    rig.offer(0)
    with pytest.raises(RingError, match="wraps past 2\\*\\*64"):
        rig.take(rig.queue())


# --- indirect tables --------------------------------------------------------------------------


def test_indirect_table_chain_is_walked(rig, mem):
    mem.gpa(data(0), 4)[:] = b"head"
    rig.desc(0, data(0), 16, NEXT, 2, table=TABLE_OFF)
    rig.desc(2, data(0x100), 8, WRITE | NEXT, 1, table=TABLE_OFF)
    rig.desc(1, data(0x200), 1, WRITE, table=TABLE_OFF)
    # The WRITE flag on the indirect descriptor itself is ignored.
    rig.desc(6, GPA + TABLE_OFF, 3 * 16, INDIRECT | WRITE)
    rig.offer(6)
    readable, writable = rig.take(rig.queue())
    assert [len(v) for v in readable] == [16]
    assert bytes(readable[0][:4]) == b"head"
    assert [len(v) for v in writable] == [8, 1]


def test_indirect_table_of_queue_size_entries_is_accepted(rig):
    for i in range(rig.num):
        rig.desc(i, data(16 * i), 16, NEXT if i < rig.num - 1 else 0, i + 1, table=TABLE_OFF)
    rig.desc(0, GPA + TABLE_OFF, 16 * rig.num, INDIRECT)
    rig.offer(0)
    readable, _ = rig.take(rig.queue())
    assert len(readable) == rig.num


def test_indirect_table_of_zero_length_is_a_ring_error(rig):
    rig.desc(0, GPA + TABLE_OFF, 0, INDIRECT)
    rig.offer(0)
    with pytest.raises(RingError, match="is 0 bytes, not 16\\*n > 0"):
        rig.take(rig.queue())


@pytest.mark.parametrize("length", [8, 17, 40])
def test_indirect_table_not_a_multiple_of_16_is_a_ring_error(rig, length):
    rig.desc(0, GPA + TABLE_OFF, length, INDIRECT)
    rig.offer(0)
    with pytest.raises(RingError, match=f"is {length} bytes"):
        rig.take(rig.queue())


def test_nested_indirect_table_is_a_ring_error(rig):
    rig.desc(0, GPA + TABLE_OFF + 0x100, 16, INDIRECT, table=TABLE_OFF)
    rig.desc(0, GPA + TABLE_OFF, 16, INDIRECT)
    rig.offer(0)
    with pytest.raises(RingError, match="nests an indirect table"):
        rig.take(rig.queue())


def test_indirect_with_next_is_a_ring_error(rig):
    rig.desc(0, data(0), 16, table=TABLE_OFF)
    rig.desc(0, GPA + TABLE_OFF, 16, INDIRECT | NEXT, 1)
    rig.desc(1, data(16), 16)
    rig.offer(0)
    with pytest.raises(RingError, match="both INDIRECT and NEXT"):
        rig.take(rig.queue())


def test_indirect_not_at_head_is_a_ring_error(rig):
    rig.desc(0, data(0), 16, table=TABLE_OFF)
    rig.desc(0, data(0), 16, NEXT, 1)
    rig.desc(1, GPA + TABLE_OFF, 16, INDIRECT)
    rig.offer(0)
    with pytest.raises(RingError, match="indirect descriptor after its head"):
        rig.take(rig.queue())


def test_indirect_table_with_more_entries_than_queue_size_is_a_ring_error(rig):
    rig.desc(0, GPA + TABLE_OFF, 16 * (rig.num + 1), INDIRECT)
    rig.offer(0)
    with pytest.raises(RingError, match="has 9 entries, over queue size"):
        rig.take(rig.queue())


def test_indirect_table_outside_guest_memory_is_a_ring_error(rig):
    rig.desc(0, GPA + SIZE - 16, 32, INDIRECT)
    rig.offer(0)
    with pytest.raises(RingError, match="not inside one region"):
        rig.take(rig.queue())


def test_indirect_next_out_of_table_is_a_ring_error(rig):
    rig.desc(0, data(0), 16, NEXT, 2, table=TABLE_OFF)
    rig.desc(1, data(0), 16, table=TABLE_OFF)
    rig.desc(0, GPA + TABLE_OFF, 32, INDIRECT)
    rig.offer(0)
    # Entry 2 exists in the queue's table but not in this 2-entry indirect table.
    with pytest.raises(RingError, match="links to descriptor 2 of 2"):
        rig.take(rig.queue())


def test_indirect_table_loop_is_a_ring_error(rig):
    rig.desc(0, data(0), 16, NEXT, 1, table=TABLE_OFF)
    rig.desc(1, data(16), 16, NEXT, 0, table=TABLE_OFF)
    rig.desc(0, GPA + TABLE_OFF, 32, INDIRECT)
    rig.offer(0)
    with pytest.raises(RingError, match="loops or exceeds 2"):
        rig.take(rig.queue())


def test_readable_after_writable_in_indirect_table_is_a_ring_error(rig):
    rig.desc(0, data(0), 16, WRITE | NEXT, 1, table=TABLE_OFF)
    rig.desc(1, data(16), 16, table=TABLE_OFF)
    rig.desc(0, GPA + TABLE_OFF, 32, INDIRECT)
    rig.offer(0)
    with pytest.raises(RingError, match="readable after a writable"):
        rig.take(rig.queue())


def test_indirect_buffer_outside_guest_memory_is_a_ring_error(rig):
    rig.desc(0, GPA - 16, 16, table=TABLE_OFF)
    rig.desc(0, GPA + TABLE_OFF, 16, INDIRECT)
    rig.offer(0)
    with pytest.raises(RingError, match="not inside one region"):
        rig.take(rig.queue())


# --- total chain length -----------------------------------------------------------------------

BIG = 1 << 31


@pytest.fixture
def big_rig() -> Iterator[Rig]:
    """A 2 GiB + 1 MiB region (sparse memfd): room for descriptors of 2**31 bytes."""
    fd = sealed_memfd(BIG + SIZE)
    memory = GuestMemory([MemRegion(0, BIG + SIZE, UVA, 0)], [fd])
    os.close(fd)
    rig = Rig(memory, BIG, UVA + BIG, SIZE, 8, False)
    yield rig
    memory.close()


def test_chain_totalling_two_pow_32_bytes_is_a_ring_error(big_rig):
    big_rig.desc(0, 0, BIG, NEXT, 1)
    big_rig.desc(1, 0, BIG)
    big_rig.offer(0)
    with pytest.raises(RingError, match="totals 4294967296 bytes"):
        big_rig.take(big_rig.queue())


def test_chain_totalling_just_under_two_pow_32_bytes_is_accepted(big_rig):
    big_rig.desc(0, 0, BIG, NEXT, 1)
    big_rig.desc(1, 0, BIG - 1)
    big_rig.offer(0)
    readable, _ = big_rig.take(big_rig.queue())
    assert sum(map(len, readable)) == (1 << 32) - 1


# --- used side and notifications --------------------------------------------------------------


def test_put_used_and_publish_writes_element_and_index(rig):
    queue = rig.queue()
    queue.put_used(5, 513)
    queue.put_used(2, 1)
    assert rig.used_idx() == 0  # not visible before publishing
    assert queue.publish_used() is True
    assert rig.used_idx() == 2
    assert rig.used_elem(0) == (5, 513)
    assert rig.used_elem(1) == (2, 1)


def test_used_ring_slot_wraps_with_the_queue_mask(rig):
    rig.set_used_idx(rig.num - 1)
    queue = rig.queue()
    queue.put_used(1, 10)
    queue.put_used(2, 20)
    queue.publish_used()
    assert rig.used_elem(rig.num - 1) == (1, 10)
    assert rig.used_elem(0) == (2, 20)
    assert rig.used_idx() == rig.num + 1


def test_publish_with_nothing_new_does_not_notify(rig):
    queue = rig.queue()
    assert queue.publish_used() is False
    queue.put_used(0, 0)
    assert queue.publish_used() is True
    assert queue.publish_used() is False


def test_no_interrupt_flag_suppresses_notification_without_event_idx(rig):
    rig.set_avail_flags(AVAIL_F_NO_INTERRUPT)
    queue = rig.queue()
    queue.put_used(0, 0)
    assert queue.publish_used() is False
    assert rig.used_idx() == 1  # the entry is still published
    rig.set_avail_flags(0)
    queue.put_used(1, 0)
    assert queue.publish_used() is True


@pytest.mark.parametrize(
    ("start", "completed", "used_event", "notify"),
    [
        (0, 1, 0, True),  # driver wants to hear when entry 0 is used
        (0, 1, 1, False),  # ... only once entry 1 is used
        (0, 3, 1, True),  # a batch that crosses used_event notifies
        (0, 3, 2, True),
        (0, 3, 3, False),
        (0, 3, 5, False),
        (0xFFFF, 2, 0xFFFF, True),  # crossing the 16-bit wrap
        (0xFFFF, 2, 0, True),
        (0xFFFF, 2, 1, False),
    ],
)
def test_event_idx_notifies_only_when_used_event_is_crossed(
    mem, start, completed, used_event, notify
):
    rig = make_rig(mem, event_idx=True)
    rig.set_used_idx(start)
    rig.set_used_event(used_event)
    queue = rig.queue()
    for head in range(completed):
        queue.put_used(head, 0)
    assert queue.publish_used() is notify
    assert rig.used_idx() == (start + completed) & 0xFFFF


def test_event_idx_counts_from_the_last_publish(mem):
    rig = make_rig(mem, event_idx=True)
    rig.set_used_event(1)
    queue = rig.queue()
    queue.put_used(0, 0)
    assert queue.publish_used() is False  # used idx 1: event 1 not yet passed
    queue.put_used(1, 0)
    assert queue.publish_used() is True  # used idx 2: passed event 1


def test_event_idx_ignores_the_no_interrupt_flag(mem):
    rig = make_rig(mem, event_idx=True)
    rig.set_avail_flags(AVAIL_F_NO_INTERRUPT)
    rig.set_used_event(0)
    queue = rig.queue()
    queue.put_used(0, 0)
    assert queue.publish_used() is True


def test_set_kicks_without_event_idx_toggles_no_notify(rig):
    queue = rig.queue()
    queue.set_kicks(False)
    assert rig.used_flags() == USED_F_NO_NOTIFY
    queue.set_kicks(True)
    assert rig.used_flags() == 0


def test_set_kicks_with_event_idx_writes_avail_event(mem):
    rig = make_rig(mem, event_idx=True)
    rig.offer(0, 1, 2)
    queue = rig.queue()
    for _ in range(queue.pending()):
        queue.next_head()
    queue.set_kicks(True)
    assert rig.avail_event() == 3
    assert rig.used_flags() == 0  # the flag is not used with event idx
    rig.offer(3)
    queue.next_head()
    queue.set_kicks(False)
    assert rig.avail_event() == 3  # left behind: the driver will not kick again


def test_release_drops_the_ring_views(rig):
    queue = rig.queue()
    queue.release()
    with pytest.raises(ValueError):
        queue.pending()
