"""Unit tests for guest memory mapping and translation (backend/memory.py), on real memfds."""

from __future__ import annotations

import fcntl
import mmap
import os
import tempfile
from collections.abc import Iterator

import pytest

from backend.memory import GuestMemory, GuestMemoryError, check_region_fd
from backend.vhost_user import MemRegion

PAGE = mmap.PAGESIZE
MiB = 1 << 20
GPA = 0x1_0000_0000
UVA = 0x7F12_3400_0000


class FdBox:
    """Creates FDs for a test and closes them all afterwards."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def memfd(self, size: int, *, seals: int = fcntl.F_SEAL_SHRINK, name: str = "rf-test",
              fill: bytes = b"") -> int:
        fd = os.memfd_create(name, os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        self.fds.append(fd)
        os.ftruncate(fd, size)
        if fill:
            os.pwrite(fd, fill, 0)
        if seals:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        return fd

    def tempfile(self, size: int) -> int:
        fd, path = tempfile.mkstemp(prefix="rf-mem-")
        os.unlink(path)
        self.fds.append(fd)
        os.ftruncate(fd, size)
        return fd

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


@pytest.fixture
def fds() -> Iterator[FdBox]:
    box = FdBox()
    yield box
    box.close()


def pattern(size: int) -> bytes:
    return bytes(i * 7 % 251 for i in range(size))


def mapped_names() -> str:
    with open("/proc/self/maps") as f:
        return f.read()


# --- mapping ----------------------------------------------------------------------------------


def test_sealed_memfd_maps_and_gpa_view_aliases_the_file(fds):
    fd = fds.memfd(MiB, fill=pattern(PAGE))
    mem = GuestMemory([MemRegion(GPA, MiB, UVA, 0)], [fd])
    try:
        view = mem.gpa(GPA + 10, 20)
        assert bytes(view) == pattern(PAGE)[10:30]
        view[:4] = b"ABCD"
        assert os.pread(fd, 4, 10) == b"ABCD"
        assert mem.total_size == MiB
        view.release()
    finally:
        mem.close()


def test_uva_translation_uses_the_front_end_virtual_address(fds):
    fd = fds.memfd(MiB, fill=pattern(PAGE))
    mem = GuestMemory([MemRegion(GPA, MiB, UVA, 0)], [fd])
    try:
        assert bytes(mem.uva(UVA + 100, 8)) == pattern(PAGE)[100:108]
        with pytest.raises(GuestMemoryError, match="front-end virtual"):
            mem.uva(GPA, 8)
        with pytest.raises(GuestMemoryError, match="guest-physical"):
            mem.gpa(UVA, 8)
    finally:
        mem.close()


def test_page_aligned_mmap_offset_maps_from_that_offset(fds):
    data = pattern(4 * PAGE)
    fd = fds.memfd(4 * PAGE, fill=data)
    mem = GuestMemory([MemRegion(0, 2 * PAGE, UVA, PAGE)], [fd])
    try:
        assert bytes(mem.gpa(0, 16)) == data[PAGE : PAGE + 16]
        assert bytes(mem.gpa(2 * PAGE - 16, 16)) == data[3 * PAGE - 16 : 3 * PAGE]
    finally:
        mem.close()


def test_mmap_offset_that_is_not_page_aligned_maps_the_right_bytes(fds):
    data = pattern(4 * PAGE)
    fd = fds.memfd(4 * PAGE, fill=data)
    offset = PAGE + 100
    size = 2 * PAGE
    mem = GuestMemory([MemRegion(GPA, size, UVA, offset)], [fd])
    try:
        assert bytes(mem.gpa(GPA, 8)) == data[offset : offset + 8]
        assert bytes(mem.gpa(GPA + size - 8, 8)) == data[offset + size - 8 : offset + size]
        with pytest.raises(GuestMemoryError, match="not inside one region"):
            mem.gpa(GPA + size - 8, 9)
    finally:
        mem.close()


def test_two_regions_translate_to_their_own_fds(fds):
    fd_a = fds.memfd(MiB, fill=b"A" * 16)
    fd_b = fds.memfd(MiB, fill=b"B" * 16)
    mem = GuestMemory(
        [MemRegion(0, MiB, UVA, 0), MemRegion(GPA, MiB, UVA + 2 * MiB, 0)], [fd_a, fd_b]
    )
    try:
        assert bytes(mem.gpa(0, 4)) == b"AAAA"
        assert bytes(mem.gpa(GPA, 4)) == b"BBBB"
        assert bytes(mem.uva(UVA + 2 * MiB, 4)) == b"BBBB"
        assert mem.total_size == 2 * MiB
        with pytest.raises(GuestMemoryError, match="not inside one region"):
            mem.gpa(MiB, 1)  # the gap between the regions
    finally:
        mem.close()


def test_memory_with_all_seals_is_accepted(fds):
    seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    fd = fds.memfd(MiB, seals=seals)
    GuestMemory([MemRegion(0, MiB, UVA, 0)], [fd]).close()


# --- refusals ---------------------------------------------------------------------------------


def test_unsealed_memfd_is_refused(fds):
    fd = fds.memfd(MiB, seals=0)
    with pytest.raises(GuestMemoryError, match="F_SEAL_SHRINK"):
        GuestMemory([MemRegion(0, MiB, UVA, 0)], [fd])


def test_memfd_sealed_only_against_growth_is_refused(fds):
    fd = fds.memfd(MiB, seals=fcntl.F_SEAL_GROW)
    with pytest.raises(GuestMemoryError, match="can still shrink"):
        GuestMemory([MemRegion(0, MiB, UVA, 0)], [fd])


def test_regular_file_is_refused_when_seals_are_required(fds):
    fd = fds.tempfile(MiB)
    with pytest.raises(GuestMemoryError, match="F_SEAL_SHRINK"):
        GuestMemory([MemRegion(0, MiB, UVA, 0)], [fd])


def test_regular_file_is_accepted_when_seals_are_not_required(fds):
    fd = fds.tempfile(MiB)
    os.pwrite(fd, b"plain", 0)
    mem = GuestMemory([MemRegion(0, MiB, UVA, 0)], [fd], require_seal=False)
    try:
        assert bytes(mem.gpa(0, 5)) == b"plain"
    finally:
        mem.close()


def test_fd_that_is_not_a_regular_file_is_refused(fds):
    r, w = os.pipe()
    fds.fds += [r, w]
    with pytest.raises(GuestMemoryError, match="not a regular file"):
        GuestMemory([MemRegion(0, PAGE, UVA, 0)], [r], require_seal=False)


def test_fd_shorter_than_the_region_is_refused(fds):
    fd = fds.memfd(MiB - PAGE)
    with pytest.raises(GuestMemoryError, match="smaller than mmap_offset \\+ size"):
        GuestMemory([MemRegion(0, MiB, UVA, 0)], [fd])


def test_fd_shorter_than_offset_plus_size_is_refused(fds):
    fd = fds.memfd(MiB)
    with pytest.raises(GuestMemoryError, match=f"= {MiB + 1}"):
        GuestMemory([MemRegion(0, MiB - PAGE, UVA, PAGE + 1)], [fd])


def test_short_fd_is_refused_even_without_seals_required(fds):
    fd = fds.tempfile(PAGE)
    with pytest.raises(GuestMemoryError, match="smaller"):
        GuestMemory([MemRegion(0, 2 * PAGE, UVA, 0)], [fd], require_seal=False)


def test_check_region_fd_accepts_an_exactly_sized_sealed_memfd(fds):
    fd = fds.memfd(2 * PAGE)
    check_region_fd(fd, MemRegion(0, PAGE, 0, PAGE), require_seal=True)


def test_memory_table_over_the_per_front_end_bound_is_refused(fds):
    size = 1 << 46  # 64 TiB, sparse: it would cost only address space, which VMs share
    fd = fds.memfd(size)
    with pytest.raises(GuestMemoryError, match="a front-end may map"):
        GuestMemory([MemRegion(0, size, UVA, 0)], [fd])


def test_refused_second_region_unmaps_the_first(fds):
    good = fds.memfd(MiB, name="rf-test-first-region")
    bad = fds.memfd(MiB, seals=0)
    assert "rf-test-first-region" not in mapped_names()
    with pytest.raises(GuestMemoryError, match="F_SEAL_SHRINK"):
        GuestMemory([MemRegion(0, MiB, UVA, 0), MemRegion(MiB, MiB, UVA + MiB, 0)],
                    [good, bad])
    assert "rf-test-first-region" not in mapped_names()


def test_region_and_fd_counts_must_match(fds):
    fd = fds.memfd(MiB)
    with pytest.raises(ValueError):
        GuestMemory([MemRegion(0, PAGE, UVA, 0), MemRegion(PAGE, PAGE, UVA + PAGE, 0)], [fd])


# --- translation ------------------------------------------------------------------------------


@pytest.fixture
def mem(fds) -> Iterator[GuestMemory]:
    fd_a = fds.memfd(MiB)
    fd_b = fds.memfd(MiB)
    # Two regions that touch in both address spaces: a range crossing the seam is refused.
    memory = GuestMemory(
        [MemRegion(GPA, MiB, UVA, 0), MemRegion(GPA + MiB, MiB, UVA + MiB, 0)], [fd_a, fd_b]
    )
    yield memory
    memory.close()


def test_range_covering_a_whole_region_is_accepted(mem):
    assert len(mem.gpa(GPA, MiB)) == MiB
    assert len(mem.gpa(GPA + MiB, MiB)) == MiB


def test_range_ending_exactly_at_region_end_is_accepted(mem):
    assert len(mem.gpa(GPA + MiB - 1, 1)) == 1


def test_range_across_a_region_boundary_is_refused(mem):
    with pytest.raises(GuestMemoryError, match="not inside one region"):
        mem.gpa(GPA + MiB - 4, 8)
    with pytest.raises(GuestMemoryError, match="not inside one region"):
        mem.uva(UVA + MiB - 4, 8)


def test_range_past_the_last_region_is_refused(mem):
    with pytest.raises(GuestMemoryError, match="not inside one region"):
        mem.gpa(GPA + 2 * MiB - 1, 2)


def test_range_before_the_first_region_is_refused(mem):
    with pytest.raises(GuestMemoryError, match="not inside one region"):
        mem.gpa(GPA - 1, 2)


def test_zero_length_range_is_refused(mem):
    with pytest.raises(GuestMemoryError, match="zero-length guest-physical range"):
        mem.gpa(GPA, 0)
    with pytest.raises(GuestMemoryError, match="zero-length front-end virtual range"):
        mem.uva(UVA, 0)


def test_negative_length_is_refused(mem):
    with pytest.raises(GuestMemoryError, match="zero-length"):
        mem.gpa(GPA + 8, -8)


def test_range_wrapping_past_two_pow_64_is_refused(mem):
    with pytest.raises(GuestMemoryError, match="wraps past 2\\*\\*64"):
        mem.gpa((1 << 64) - 8, 16)
    with pytest.raises(GuestMemoryError, match="wraps past 2\\*\\*64"):
        mem.uva(UVA, (1 << 64))


def test_range_ending_at_two_pow_64_is_checked_for_containment_not_wrap(mem):
    with pytest.raises(GuestMemoryError, match="not inside one region"):
        mem.gpa((1 << 64) - 8, 8)


def test_close_drops_all_regions(fds):
    fd = fds.memfd(MiB, name="rf-test-close")
    memory = GuestMemory([MemRegion(0, MiB, UVA, 0)], [fd])
    assert "rf-test-close" in mapped_names()
    memory.close()
    assert memory.total_size == 0
    assert "rf-test-close" not in mapped_names()
    with pytest.raises(GuestMemoryError, match="not inside one region"):
        memory.gpa(0, 1)


def test_close_with_a_view_still_held_does_not_raise(fds):
    fd = fds.memfd(MiB, fill=b"kept")
    memory = GuestMemory([MemRegion(0, MiB, UVA, 0)], [fd])
    held = memory.gpa(0, 4)
    memory.close()
    # The held view keeps its mapping alive until released.
    assert bytes(held) == b"kept"
    held.release()
