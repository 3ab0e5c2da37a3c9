"""Guest memory: map the front-end's memory FDs and translate guest addresses to memoryviews.

A Python process cannot survive SIGBUS, so a region is only mapped when touching any byte of it
can never fault: the FD must be a regular file at least `mmap_offset + size` long, and it must
be sealed against shrinking (F_SEAL_SHRINK, which QEMU's memory-backend-memfd sets by default).
Translation accepts a range only when it lies wholly inside one region.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from backend.vhost_user import MemRegion

ADDRESS_LIMIT = 1 << 64
# One front-end may not map more than this: a huge sparse memfd costs the backend address
# space that every other VM it serves shares (Linux gives a process 128 TiB).
MAX_GUEST_MEMORY = 1 << 40


class GuestMemoryError(ValueError):
    """A memory region cannot be mapped safely, or a guest address range is invalid."""


@dataclass(frozen=True, slots=True)
class MappedRegion:
    gpa: int
    uva: int
    size: int
    view: memoryview


def check_region_fd(fd: int, region: MemRegion, *, require_seal: bool) -> None:
    """Refuse an FD whose mapping could fault (SIGBUS) when the guest range is touched."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise GuestMemoryError("memory region FD is not a regular file or memfd")
    end = region.mmap_offset + region.memory_size
    if st.st_size < end:
        raise GuestMemoryError(
            f"memory region FD is {st.st_size} bytes, smaller than mmap_offset + size = {end}"
        )
    if not require_seal:
        return
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0
    if not seals & fcntl.F_SEAL_SHRINK:
        raise GuestMemoryError(
            "memory region FD can still shrink (no F_SEAL_SHRINK); use a sealed memfd "
            "(memory-backend-memfd) or allow unsealed memory explicitly"
        )


def _map_region(fd: int, region: MemRegion) -> tuple[mmap.mmap, memoryview]:
    aligned = region.mmap_offset - region.mmap_offset % mmap.ALLOCATIONGRANULARITY
    delta = region.mmap_offset - aligned
    try:
        mapping = mmap.mmap(
            fd,
            region.memory_size + delta,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=aligned,
        )
    except (OSError, OverflowError, ValueError) as exc:
        raise GuestMemoryError(f"cannot map memory region: {exc}") from None
    return mapping, memoryview(mapping)[delta : delta + region.memory_size]


class GuestMemory:
    """The guest's memory table. Translation returns views into the shared mappings."""

    def __init__(
        self, regions: Sequence[MemRegion], fds: Sequence[int], *, require_seal: bool = True
    ) -> None:
        self._mappings: list[mmap.mmap] = []
        self.regions: list[MappedRegion] = []
        total = sum(region.memory_size for region in regions)
        if total > MAX_GUEST_MEMORY:
            raise GuestMemoryError(f"memory table maps {total >> 30} GiB, over the "
                                   f"{MAX_GUEST_MEMORY >> 30} GiB a front-end may map")
        try:
            for region, fd in zip(regions, fds, strict=True):
                check_region_fd(fd, region, require_seal=require_seal)
                mapping, view = _map_region(fd, region)
                self._mappings.append(mapping)
                self.regions.append(
                    MappedRegion(region.guest_phys_addr, region.userspace_addr,
                                 region.memory_size, view)
                )
        except BaseException:
            self.close()
            raise
        # Flat tuples keep the per-descriptor lookup to one loop over a few ints; the chain
        # walker loops over gpa_ranges itself (see SplitQueue.chain), saving two calls a
        # descriptor, and calls gpa() only for the error.
        self.gpa_ranges = tuple((r.gpa, r.gpa + r.size, r.view) for r in self.regions)
        self._by_uva = tuple((r.uva, r.uva + r.size, r.view) for r in self.regions)

    def gpa(self, addr: int, length: int) -> memoryview:
        """View of guest-physical [addr, addr+length); raises unless inside one region."""
        return _translate(self.gpa_ranges, addr, length, "guest-physical")

    def uva(self, addr: int, length: int) -> memoryview:
        """View of front-end virtual [addr, addr+length) (vring addresses use these)."""
        return _translate(self._by_uva, addr, length, "front-end virtual")

    @property
    def total_size(self) -> int:
        return sum(r.size for r in self.regions)

    def close(self) -> None:
        """Drop the mappings; views still held elsewhere keep theirs alive until released."""
        for region in self.regions:
            region.view.release()
        self.regions = []
        self.gpa_ranges = self._by_uva = ()
        for mapping in self._mappings:
            # A ring may still hold a view; the mapping then goes with its last reference.
            with contextlib.suppress(BufferError):
                mapping.close()
        self._mappings = []


def _translate(
    table: tuple[tuple[int, int, memoryview], ...], addr: int, length: int, space: str
) -> memoryview:
    if length <= 0:
        raise GuestMemoryError(f"zero-length {space} range at {addr:#x}")
    end = addr + length
    if end > ADDRESS_LIMIT:
        raise GuestMemoryError(f"{space} range {addr:#x}+{length:#x} wraps past 2**64")
    for start, stop, view in table:
        if start <= addr and end <= stop:
            return view[addr - start : end - start]
    raise GuestMemoryError(f"{space} range {addr:#x}+{length:#x} is not inside one region")
