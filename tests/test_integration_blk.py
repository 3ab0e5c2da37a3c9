"""`ringfence dev` as a real process, driven through the test front-end (tests/frontend.py).

Most tests share one backend process and one read-write image per module (a backend that
outlives many front-ends is the normal case, and it keeps the suite fast); each test takes
its own snapshot of the image and checks only what it did. Tests that need another command
line (read-only, several devices, several queues) start their own backend. The host side of
each image is checked too: what the guest wrote must be in the file, and a refused request
must leave the file as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import random
import select
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.devproc import DevBackend, wait_until
from tests.frontend import (
    AVAIL_F_NO_INTERRUPT,
    BLK_F_DISCARD,
    BLK_F_MQ,
    BLK_F_RO,
    BLK_F_WRITE_ZEROES,
    BLK_ID_BYTES,
    BLK_REQ_HEADER,
    F_EVENT_IDX,
    HIGH_GPA,
    PAGE,
    S_IOERR,
    S_OK,
    S_UNSUPP,
    SECTOR,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    UADDR_BASE,
    BlkFrontend,
    GuestMemory,
    Req,
    SplitQueue,
    pack_mem_table,
)

IMAGE_SIZE = 8 << 20
CAPACITY = IMAGE_SIZE // SECTOR


def make_image(path: Path, size: int = IMAGE_SIZE, seed: int = 0) -> Path:
    """A fully allocated image of seeded random bytes (so unwritten areas are checked too)."""
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def shared_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevBackend, str, Path]]:
    directory = tmp_path_factory.mktemp("disk")
    image = make_image(directory / "disk.img")
    sock = str(directory / "disk.sock")
    with DevBackend({sock: image}) as backend:
        yield backend, sock, image


@pytest.fixture
def disk(shared_disk: tuple[DevBackend, str, Path]) -> Iterator[tuple[DevBackend, str, Path]]:
    """A read-write device on a random 8 MiB image: (backend, socket, image)."""
    backend, sock, _image = shared_disk
    assert backend.alive(), backend.log()
    yield shared_disk
    backend.wait_until_free(sock)  # the next test's front-end must not find it busy
    assert backend.alive(), backend.log()


# ------------------------------------------------------------------- scatter-gather chains


@dataclass
class Slot:
    """Buffers for one request in flight: a small block and a data arena in every region."""

    meta: list[int]  # per region: 64 bytes for header pieces and a status byte
    arena: list[int]  # per region: room for a whole transfer plus a status byte


@dataclass
class Pending:
    head: int
    write: bool
    sector: int
    segments: list[tuple[int, int]]  # (gpa, length) of the data, in order
    status_gpa: int
    data: bytes = b""


@dataclass
class ScatterIO:
    """Random chains laid out by the test: odd-sized data segments that alternate between
    the memory regions, a header sometimes split over two descriptors, a status byte
    sometimes sharing the last data descriptor, direct or indirect."""

    dev: BlkFrontend
    rng: random.Random
    max_bytes: int
    slots: list[Slot] = field(default_factory=list)

    def __post_init__(self) -> None:
        mem = self.dev.mem
        regions = range(len(mem.regions))
        for _ in range(8):
            self.slots.append(
                Slot(
                    meta=[mem.alloc(64, 64, region=r) for r in regions],
                    arena=[mem.alloc(self.max_bytes + 64, PAGE, region=r) for r in regions],
                )
            )

    def _split(self, nbytes: int, nsegs: int) -> list[int]:
        nsegs = min(nsegs, nbytes)
        cuts = sorted(self.rng.sample(range(1, nbytes), nsegs - 1)) if nsegs > 1 else []
        bounds = [0, *cuts, nbytes]
        return [b - a for a, b in itertools.pairwise(bounds)]

    def post(self, q: SplitQueue, slot: Slot, write: bool, sector: int, nbytes: int,
             max_segs: int, indirect: bool) -> Pending:
        mem, rng = self.dev.mem, self.rng
        nregions = len(mem.regions)
        first = rng.randrange(nregions)
        header = BLK_REQ_HEADER.pack(T_OUT if write else T_IN, 0, sector)
        chain: list[tuple[int, int, bool]] = []
        if rng.random() < 0.2:  # header split over two descriptors in different regions
            cut = rng.randrange(1, 16)
            a, b = slot.meta[first], slot.meta[(first + 1) % nregions] + 16
            mem.write(a, header[:cut])
            mem.write(b, header[cut:])
            chain += [(a, cut, False), (b, 16 - cut, False)]
        else:
            mem.write(slot.meta[first], header)
            chain.append((slot.meta[first], 16, False))
        used = [0] * nregions
        segments = []
        for i, size in enumerate(self._split(nbytes, rng.randint(1, max_segs))):
            r = (first + i) % nregions
            gpa = slot.arena[r] + used[r]
            used[r] += size
            segments.append((gpa, size))
            chain.append((gpa, size, not write))
        data = b""
        if write:
            data = rng.randbytes(nbytes)
            pos = 0
            for gpa, size in segments:
                mem.write(gpa, data[pos : pos + size])
                pos += size
        else:
            for gpa, size in segments:
                mem.write(gpa, b"\xee" * size)  # the device must overwrite every byte
        last_gpa, last_len = segments[-1]
        if not write and rng.random() < 0.3:  # status byte at the end of the last data buffer
            status = last_gpa + last_len
            chain[-1] = (last_gpa, last_len + 1, True)
        else:
            status = slot.meta[first] + 48
            chain.append((status, 1, True))
        mem.write(status, b"\xff")
        head = q.post(chain, indirect=indirect, publish=False)
        return Pending(head, write, sector, segments, status, data)

    def complete(self, q: SplitQueue, p: Pending) -> bytes:
        """Wait for `p`; check status and used length; return the data a read brought."""
        used_len = q.wait_for(p.head, 5.0)
        nbytes = sum(size for _, size in p.segments)
        assert self.dev.mem.read(p.status_gpa, 1) == bytes([S_OK])
        assert used_len == (1 if p.write else nbytes + 1)
        return b"".join(self.dev.mem.read(gpa, size) for gpa, size in p.segments)


LAYOUTS = {
    "one-region": {},
    "two-memfds": {"regions": 2},
    "one-memfd-two-regions-mmap-offset": {"regions": 2, "shared_fd": True},
    "no-event-idx-no-indirect": {"event_idx": False, "indirect": False},
}


@pytest.mark.parametrize("layout", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_random_scatter_gather_io_matches_a_model_and_the_image_file(
    disk: tuple[DevBackend, str, Path], layout: dict[str, bool | int]
) -> None:
    _backend, sock, image = disk
    model = bytearray(image.read_bytes())
    rng = random.Random(20240501)
    max_bytes = 128 << 10
    with BlkFrontend.open(sock, **layout) as dev:
        assert dev.config is not None
        if layout.get("shared_fd"):
            low, high = dev.mem.regions
            assert low.fd == high.fd and high.mmap_offset == low.size > 0
        indirect_ok = layout.get("indirect", True)
        q = dev.queues[0]
        io = ScatterIO(dev, rng, max_bytes)
        requests = 0
        for _ in range(90):
            batch: list[Pending] = []
            taken: list[tuple[int, int]] = []
            descriptors = 0
            for slot in io.slots[: rng.randint(1, 8)]:
                nsect = rng.choice([1, 1, 2, 3, 8, 8, 15, 64, max_bytes // SECTOR])
                sector = rng.randrange(CAPACITY - nsect + 1)
                if any(sector < e and s < sector + nsect for s, e in taken):
                    continue  # requests in flight together never overlap
                taken.append((sector, sector + nsect))
                indirect = indirect_ok and rng.random() < 0.5
                max_segs = min(dev.config.seg_max, 100 if indirect else 24)
                p = io.post(q, slot, rng.random() < 0.5, sector, nsect * SECTOR, max_segs,
                            indirect)
                descriptors += 1 if indirect else 2 + len(p.segments) + 1
                assert descriptors <= q.size
                batch.append(p)
            q.publish()
            q.kick()
            for p in batch:
                got = io.complete(q, p)
                start, end = p.sector * SECTOR, p.sector * SECTOR + sum(s for _, s in p.segments)
                if p.write:
                    model[start:end] = p.data
                else:
                    assert got == model[start:end], f"read of sector {p.sector} differs"
            requests += len(batch)
        assert requests > 300
        # Everything reads back through the device, and the file on the host agrees.
        assert dev.flush() == S_OK
        for off in range(0, IMAGE_SIZE, max_bytes):
            status, data = dev.read(off // SECTOR, max_bytes)
            assert status == S_OK and data == model[off : off + max_bytes]
    assert image.read_bytes() == model


def test_four_queue_device_reports_its_queues_and_serves_io_on_each(
    tmp_path: Path,
) -> None:
    image = make_image(tmp_path / "mq.img")
    sock = str(tmp_path / "mq.sock")
    rng = random.Random(7)
    with DevBackend({sock: image}, num_queues=4) as backend, BlkFrontend.open(
        sock, num_queues=4, regions=2
    ) as dev:
        assert dev.conn.get_queue_num() == 4
        assert dev.max_queues == 4
        assert dev.config is not None and dev.config.num_queues == 4
        assert dev.device_features & (1 << BLK_F_MQ)
        # Each queue writes its own area; the next queue reads it back.
        blobs = {q: rng.randbytes(64 << 10) for q in range(4)}
        for q, blob in blobs.items():
            assert dev.write(1024 * q, blob, queue=q, seg_size=4096, indirect=True) == S_OK
        for q, blob in blobs.items():
            assert dev.read(1024 * q, len(blob), queue=(q + 1) % 4, seg_size=3000) == (
                S_OK, blob)
        # All four queues with requests in flight at once.
        heads = []
        for q in dev.queues:
            buf = dev.mem.alloc(4096, PAGE)
            hdr = dev.mem.alloc(32, 64)
            dev.mem.write(hdr, BLK_REQ_HEADER.pack(T_IN, 0, 1024 * q.index))
            dev.mem.write(hdr + 16, b"\xff")
            heads.append((q, q.post([(hdr, 16, False), (buf, 4096, True), (hdr + 16, 1, True)]),
                          hdr, buf))
        for q, _head, _hdr, _buf in heads:
            q.kick(force=True)
        for q, head, hdr, buf in heads:
            assert q.wait_for(head, 5.0) == 4097
            assert dev.mem.read(hdr + 16, 1) == bytes([S_OK])
            assert dev.mem.read(buf, 4096) == blobs[q.index][:4096]
        assert backend.alive()
    data = image.read_bytes()
    for q, blob in blobs.items():
        assert data[1024 * q * SECTOR : 1024 * q * SECTOR + len(blob)] == blob


# ---------------------------------------------------------------------- request types


def test_flush_completes_ok_and_written_data_is_in_the_image(
    disk: tuple[DevBackend, str, Path],
) -> None:
    _backend, sock, image = disk
    data = os.urandom(8192)
    with BlkFrontend.open(sock) as dev:
        assert dev.write(100, data) == S_OK
        r = dev.request(T_FLUSH)  # header and status only
        assert (r.status, r.used_len) == (S_OK, 1)
    assert image.read_bytes()[100 * SECTOR : 100 * SECTOR + 8192] == data


def test_discard_reads_back_zero_and_punches_a_hole_in_the_image(
    disk: tuple[DevBackend, str, Path],
) -> None:
    _backend, sock, image = disk
    start, nsect = 2048, 512  # 1 MiB in, 256 KiB long: whole file-system blocks
    off, length = start * SECTOR, nsect * SECTOR
    with BlkFrontend.open(sock) as dev:
        assert dev.device_features & (1 << BLK_F_DISCARD)
        assert dev.write(start, os.urandom(length)) == S_OK  # allocated, whatever ran before
        assert dev.flush() == S_OK
        before = image.read_bytes()
        with open(image, "rb") as f:
            assert os.lseek(f.fileno(), off, os.SEEK_HOLE) >= off + length  # no hole yet
        blocks_before = os.stat(image).st_blocks
        assert dev.discard(start, nsect) == S_OK
        assert dev.read(start, length) == (S_OK, bytes(length))
        # The neighbours are untouched.
        assert dev.read(start - 8, 4096) == (S_OK, before[off - 4096 : off])
        assert dev.read(start + nsect, 4096) == (S_OK, before[off + length : off + length + 4096])
    with open(image, "rb") as f:
        assert os.lseek(f.fileno(), off, os.SEEK_HOLE) == off
        assert os.lseek(f.fileno(), off, os.SEEK_DATA) == off + length
    st = os.stat(image)
    assert st.st_size == IMAGE_SIZE
    assert blocks_before - st.st_blocks >= length // 512
    after = image.read_bytes()
    assert after[off : off + length] == bytes(length)
    assert after[:off] == before[:off] and after[off + length :] == before[off + length :]


def test_discard_with_several_ranges_deallocates_each(disk: tuple[DevBackend, str, Path]) -> None:
    _backend, sock, image = disk
    ranges = [(0, 8), (4096, 16), (CAPACITY - 8, 8)]
    payload = b"".join(struct.pack("<QII", s, n, 0) for s, n in ranges)
    with BlkFrontend.open(sock) as dev:
        assert dev.request(T_DISCARD, out=payload).status == S_OK
        for s, n in ranges:
            assert dev.read(s, n * SECTOR) == (S_OK, bytes(n * SECTOR))
    data = image.read_bytes()
    for s, n in ranges:
        assert data[s * SECTOR : (s + n) * SECTOR] == bytes(n * SECTOR)


@pytest.mark.parametrize("unmap", [False, True], ids=["plain", "unmap"])
def test_write_zeroes_reads_back_zero_and_leaves_neighbours(
    disk: tuple[DevBackend, str, Path], unmap: bool
) -> None:
    _backend, sock, image = disk
    before = image.read_bytes()
    start, nsect = 333, 77  # not block aligned on purpose
    off, length = start * SECTOR, nsect * SECTOR
    with BlkFrontend.open(sock) as dev:
        assert dev.device_features & (1 << BLK_F_WRITE_ZEROES)
        assert dev.write_zeroes(start, nsect, unmap=unmap) == S_OK
        expected = before[:off] + bytes(length) + before[off + length :]
        window = slice(off - SECTOR, off + length + SECTOR)  # with one neighbour each side
        assert dev.read(start - 1, length + 2 * SECTOR) == (S_OK, expected[window])
    assert image.read_bytes() == expected


def test_get_id_returns_the_image_name_padded_to_20_bytes(
    disk: tuple[DevBackend, str, Path],
) -> None:
    _backend, sock, image = disk
    with BlkFrontend.open(sock) as dev:
        r = dev.request(T_GET_ID, in_len=BLK_ID_BYTES)
        assert r.status == S_OK
        assert r.data == image.name.encode().ljust(BLK_ID_BYTES, b"\0")
        assert r.used_len == BLK_ID_BYTES + 1


def test_readonly_device_offers_ro_fails_writes_and_serves_reads(tmp_path: Path) -> None:
    image = make_image(tmp_path / "ro.img")
    sock = str(tmp_path / "ro.sock")
    before = digest(image)
    content = image.read_bytes()
    with DevBackend({sock: image}, readonly=[sock]) as backend, BlkFrontend.open(sock) as dev:
        assert dev.device_features & (1 << BLK_F_RO)
        assert dev.features & (1 << BLK_F_RO)
        assert not dev.device_features & ((1 << BLK_F_DISCARD) | (1 << BLK_F_WRITE_ZEROES))
        assert dev.write(0, b"\x55" * 4096) == S_IOERR
        assert dev.write(8, b"\x55" * 512, seg_size=100, indirect=True) == S_IOERR
        assert dev.discard(0, 8) == S_IOERR
        assert dev.write_zeroes(0, 8) == S_IOERR
        assert dev.read(0, 8192) == (S_OK, content[:8192])
        assert dev.read(CAPACITY - 16, 8192, seg_size=1000) == (S_OK, content[-8192:])
        assert dev.flush() == S_OK
        assert backend.alive()
    assert digest(image) == before


def test_two_devices_on_one_backend_each_land_on_their_own_image(tmp_path: Path) -> None:
    images = [make_image(tmp_path / f"d{i}.img", seed=i) for i in range(2)]
    socks = [str(tmp_path / f"d{i}.sock") for i in range(2)]
    models = [bytearray(p.read_bytes()) for p in images]
    rng = random.Random(99)
    with DevBackend(dict(zip(socks, images, strict=True))) as backend, BlkFrontend.open(
        socks[0], regions=2
    ) as a, BlkFrontend.open(socks[1]) as b:
        devs = [a, b]
        for i in range(120):
            d = i % 2  # strictly interleaved, same sectors on both devices
            sector = rng.randrange(0, 64) * 8
            data = rng.randbytes(4096)
            assert devs[d].write(sector, data, seg_size=rng.choice([None, 512, 1500])) == S_OK
            models[d][sector * SECTOR : sector * SECTOR + 4096] = data
            other = 1 - d
            assert devs[other].read(sector, 4096) == (
                S_OK, bytes(models[other][sector * SECTOR : sector * SECTOR + 4096]))
        assert backend.alive()
    for path, model in zip(images, models, strict=True):
        assert path.read_bytes() == model
    assert models[0] != models[1]


def test_config_capacity_matches_each_image_size(tmp_path: Path) -> None:
    sizes = [1 << 20, (3 << 20) + SECTOR, (1 << 20) + 100]  # the last ends in a partial sector
    images = [tmp_path / f"s{i}.img" for i in range(len(sizes))]
    for path, size in zip(images, sizes, strict=True):
        path.write_bytes(b"\x11" * size)
    socks = [str(tmp_path / f"s{i}.sock") for i in range(len(sizes))]
    with DevBackend(dict(zip(socks, images, strict=True))):
        for sock, size in zip(socks, sizes, strict=True):
            with BlkFrontend.open(sock) as dev:
                assert dev.config is not None
                assert dev.config.capacity == size // SECTOR
                last = size // SECTOR - 1
                assert dev.read(last, SECTOR) == (S_OK, b"\x11" * SECTOR)
                assert dev.read(last + 1, SECTOR)[0] == S_IOERR  # the partial tail is not disk
    for path, size in zip(images, sizes, strict=True):
        assert path.stat().st_size == size


# ------------------------------------------------------------------- refused requests


@pytest.mark.parametrize(
    ("sector", "nbytes"),
    [(CAPACITY, SECTOR), (CAPACITY - 1, 2 * SECTOR), (CAPACITY + 1000, 4096),
     ((1 << 64) - 1, SECTOR), ((1 << 55), SECTOR)],
    ids=["at-capacity", "straddling-the-end", "far-past", "max-u64-sector", "offset-overflows-u64"],
)
def test_request_past_capacity_fails_with_ioerr_and_does_not_grow_the_image(
    disk: tuple[DevBackend, str, Path], sector: int, nbytes: int
) -> None:
    _backend, sock, image = disk
    before = digest(image)
    with BlkFrontend.open(sock) as dev:
        assert dev.write(sector, b"\x77" * nbytes) == S_IOERR
        assert dev.read(sector, nbytes)[0] == S_IOERR
        assert dev.write_zeroes(sector, nbytes // SECTOR) == S_IOERR
        assert dev.discard(sector, nbytes // SECTOR) == S_IOERR
        assert dev.read(0, SECTOR)[0] == S_OK  # the device goes on serving
    assert image.stat().st_size == IMAGE_SIZE
    assert digest(image) == before


def test_discard_with_one_bad_range_fails_and_changes_nothing(
    disk: tuple[DevBackend, str, Path],
) -> None:
    _backend, sock, image = disk
    before = digest(image)
    payload = struct.pack("<QII", 0, 8, 0) + struct.pack("<QII", CAPACITY, 8, 0)
    with BlkFrontend.open(sock) as dev:
        assert dev.request(T_DISCARD, out=payload).status == S_IOERR
        assert dev.request(T_WRITE_ZEROES, out=payload).status == S_IOERR
    assert digest(image) == before


@pytest.mark.parametrize("rtype", [2, 3, 5, 99, 0xFFFFFFFF])
def test_unknown_request_type_completes_with_unsupp(
    disk: tuple[DevBackend, str, Path], rtype: int
) -> None:
    _backend, sock, image = disk
    before = digest(image)
    with BlkFrontend.open(sock) as dev:
        r = dev.request(rtype, 0, out=b"\x66" * SECTOR)
        assert (r.status, r.used_len) == (S_UNSUPP, 1)
        r = dev.request(rtype, 0, in_len=SECTOR)
        assert r.status == S_UNSUPP
        assert dev.read(0, SECTOR)[0] == S_OK
    assert digest(image) == before


def test_discard_flags_are_unsupported(disk: tuple[DevBackend, str, Path]) -> None:
    _backend, sock, image = disk
    before = digest(image)
    with BlkFrontend.open(sock) as dev:
        assert dev.discard(0, 8, flags=1) == S_UNSUPP
        assert dev.request(T_WRITE_ZEROES, out=struct.pack("<QII", 0, 8, 2)).status == S_UNSUPP
    assert digest(image) == before


@pytest.mark.parametrize("nbytes", [1, 100, 511, 513, 700, 4095])
def test_partial_sector_transfer_fails_with_ioerr(
    disk: tuple[DevBackend, str, Path], nbytes: int
) -> None:
    _backend, sock, image = disk
    before = digest(image)
    with BlkFrontend.open(sock) as dev:
        assert dev.write(16, b"\x42" * nbytes) == S_IOERR
        assert dev.read(16, nbytes)[0] == S_IOERR
        assert digest(image) == before
        data = os.urandom(SECTOR)
        assert dev.write(16, data) == S_OK  # whole sectors still work
    assert image.read_bytes()[16 * SECTOR : 17 * SECTOR] == data


def test_data_in_the_wrong_direction_fails_with_ioerr(
    disk: tuple[DevBackend, str, Path],
) -> None:
    _backend, sock, image = disk
    before = digest(image)
    with BlkFrontend.open(sock) as dev:
        q = dev.queues[0]
        hdr = dev.mem.alloc(32, 64)
        buf = dev.mem.alloc(SECTOR, PAGE)
        for rtype, writable in ((T_IN, False), (T_OUT, True)):
            dev.mem.write(hdr, BLK_REQ_HEADER.pack(rtype, 0, 0))
            dev.mem.write(hdr + 16, b"\xff")
            # T_IN with a device-readable data buffer, T_OUT with a device-writable one.
            chain = [(hdr, 16, False), (buf, SECTOR, writable), (hdr + 16, 1, True)]
            head = q.post(chain)
            q.kick()
            q.wait_for(head)
            assert dev.mem.read(hdr + 16, 1) == bytes([S_IOERR])
    assert digest(image) == before


# ------------------------------------------------------------------- ring stop/restart


def restart_ring(dev: BlkFrontend, q: SplitQueue, base: int) -> None:
    """What QEMU sends to start a stopped ring again (vhost_virtqueue_start)."""
    c = dev.conn
    c.set_vring_num(q.index, q.size)
    c.set_vring_base(q.index, base)
    c.set_vring_addr(q.index, dev.mem.uaddr(q.desc_gpa), dev.mem.uaddr(q.used_gpa),
                     dev.mem.uaddr(q.avail_gpa))
    c.set_vring_kick(q.index, q.kickfd)
    c.set_vring_call(q.index, q.callfd)
    c.set_vring_enable(q.index, True)


def test_stopped_ring_reports_consumed_avail_index_and_resumes_from_it(
    disk: tuple[DevBackend, str, Path],
) -> None:
    _backend, sock, image = disk
    with BlkFrontend.open(sock) as dev:
        q = dev.queues[0]
        for i in range(5):
            assert dev.write(8 * i, bytes([i]) * 4096) == S_OK
        assert dev.stop() == [5]
        # A request posted and kicked while stopped waits for the restart.
        hdr = dev.mem.alloc(32, 64)
        buf = dev.mem.alloc(4096, PAGE)
        dev.mem.write(hdr, BLK_REQ_HEADER.pack(T_IN, 0, 8 * 3))
        dev.mem.write(hdr + 16, b"\xff")
        head = q.post([(hdr, 16, False), (buf, 4096, True), (hdr + 16, 1, True)])
        q.kick(force=True)
        assert q.wait_used(0.2) == []
        assert dev.mem.read(hdr + 16, 1) == b"\xff"
        restart_ring(dev, q, 5)
        assert q.wait_for(head, 5.0) == 4097
        assert dev.mem.read(buf, 4096) == bytes([3]) * 4096
        for i in range(5, 9):
            assert dev.write(8 * i, bytes([i]) * 4096) == S_OK
        assert dev.read(0, 9 * 4096) == (S_OK, b"".join(bytes([i]) * 4096 for i in range(9)))
        assert dev.stop() == [11]
    assert image.read_bytes()[: 9 * 4096] == b"".join(bytes([i]) * 4096 for i in range(9))


def test_ring_indexes_wrap_past_65535(disk: tuple[DevBackend, str, Path]) -> None:
    _backend, sock, _image = disk
    base = 0xFFF0
    with BlkFrontend.open(sock) as dev:
        q = dev.queues[0]
        assert dev.stop() == [0]
        struct.pack_into("<H", q.used, 2, base)  # the used index the device resumes from
        q.adopt_indexes(base, base)
        q.publish()
        restart_ring(dev, q, base)
        for i in range(40):
            assert dev.write(i, bytes([i + 1]) * SECTOR) == S_OK
        assert q.used_idx == (base + 40) & 0xFFFF
        assert dev.read(0, 40 * SECTOR) == (
            S_OK, b"".join(bytes([i + 1]) * SECTOR for i in range(40)))
        assert dev.stop() == [(base + 41) & 0xFFFF]


def test_memory_table_resent_while_rings_run_keeps_io_working_and_adds_a_region(
    disk: tuple[DevBackend, str, Path],
) -> None:
    _backend, sock, image = disk
    extra = GuestMemory(1 << 20)  # hot-plugged RAM: a second memfd at HIGH_GPA
    try:
        with BlkFrontend.open(sock) as dev:
            q = dev.queues[0]
            assert dev.write(0, b"\x01" * 4096) == S_OK
            low = dev.mem.regions[0]
            plugged = extra.regions[0]
            entries = [(low.gpa, low.size, low.uaddr, 0),
                       (HIGH_GPA, plugged.size, UADDR_BASE + HIGH_GPA, 0)]
            dev.conn.set(Req.SET_MEM_TABLE, pack_mem_table(entries), [low.fd, plugged.fd])
            # A write whose data lives in the new region, and a read back into it.
            hdr = dev.mem.alloc(32, 64)
            data = os.urandom(8192)
            plugged.view[4096 : 4096 + 8192] = data
            for rtype in (T_OUT, T_IN):
                if rtype == T_IN:
                    plugged.view[4096 : 4096 + 8192] = bytes(8192)
                dev.mem.write(hdr, BLK_REQ_HEADER.pack(rtype, 0, 40))
                dev.mem.write(hdr + 16, b"\xff")
                head = q.post([(hdr, 16, False), (HIGH_GPA + 4096, 8192, rtype == T_IN),
                               (hdr + 16, 1, True)])
                q.kick()
                q.wait_for(head, 5.0)
                assert dev.mem.read(hdr + 16, 1) == bytes([S_OK])
            assert bytes(plugged.view[4096 : 4096 + 8192]) == data
            # Unplug again: the original table, and the rings keep going.
            dev.conn.set_mem_table(dev.mem.regions)
            assert dev.read(0, 4096) == (S_OK, b"\x01" * 4096)
            assert dev.read(40, 8192) == (S_OK, data)
    finally:
        extra.close()
    assert image.read_bytes()[40 * SECTOR : 40 * SECTOR + 8192] == data


# ------------------------------------------------------------------------ notifications


def post_read(dev: BlkFrontend, q: SplitQueue, sector: int) -> int:
    hdr = dev.mem.alloc(32, 64)
    buf = dev.mem.alloc(SECTOR, PAGE)
    dev.mem.write(hdr, BLK_REQ_HEADER.pack(T_IN, 0, sector))
    dev.mem.write(hdr + 16, b"\xff")
    return q.post([(hdr, 16, False), (buf, SECTOR, True), (hdr + 16, 1, True)])


def call_count(q: SplitQueue, timeout: float = 5.0) -> int:
    """Wait for the call eventfd and return how many signals it collected (0: none)."""
    ready, _, _ = select.select([q.callfd], [], [], timeout)
    return os.eventfd_read(q.callfd) if ready else 0


@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "avail-flags"])
def test_completion_is_signalled_only_when_the_driver_asks(
    disk: tuple[DevBackend, str, Path], event_idx: bool
) -> None:
    _backend, sock, _image = disk
    with BlkFrontend.open(sock, event_idx=event_idx) as dev:
        q = dev.queues[0]
        assert bool(dev.features & (1 << F_EVENT_IDX)) == event_idx
        assert dev.read(0, SECTOR)[0] == S_OK
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(q.callfd)
        # First completion: the driver asks not to be called.
        start = q.used_idx
        if event_idx:
            q.set_used_event(start + 1)  # call me once used idx passes start + 1
        else:
            q.set_avail_flags(AVAIL_F_NO_INTERRUPT)
        post_read(dev, q, 0)
        q.kick(force=True)
        wait_until(lambda: q.used_idx == (start + 1) & 0xFFFF, 5.0, "first completion")
        # Second completion: the driver wants the call.
        if not event_idx:
            q.set_avail_flags(0)
        post_read(dev, q, 1)
        q.kick(force=True)
        assert call_count(q) == 1  # exactly one signal: the first completion stayed quiet
        assert q.used_idx == (start + 2) & 0xFFFF
        assert len(q.reap()) == 2
