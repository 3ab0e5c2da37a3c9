"""The test front-end itself, checked against a reference back-end (qemu-storage-daemon).

If these pass, a failure elsewhere that uses tests/frontend.py points at the back-end
under test, not at the front-end.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.frontend import (
    FLAG_NEED_REPLY,
    HIGH_GPA,
    UADDR_BASE,
    VERSION,
    BlkFrontend,
    BlkLoad,
    FrontendError,
    GuestMemory,
    need_event,
    run_load,
)

IMAGE_SIZE = 16 << 20

needs_qsd = pytest.mark.skipif(
    shutil.which("qemu-storage-daemon") is None, reason="qemu-storage-daemon not installed"
)


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[str]:
    """A qemu-storage-daemon exporting a fresh image with 2 queues; yields its socket."""
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(IMAGE_SIZE))
    sock = str(tmp_path / "blk.sock")
    proc = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=f,filename={image}",
            "--blockdev", "driver=raw,node-name=d,file=f",
            "--export", "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,"
            f"addr.path={sock},writable=on,num-queues=2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield sock  # BlkFrontend's connect retries until the socket exists
    finally:
        proc.terminate()
        proc.wait(10)


def test_need_event_matches_virtio_definition() -> None:
    assert need_event(event=5, new=6, old=5)  # crossed exactly the event index
    assert not need_event(event=7, new=6, old=5)  # not there yet
    assert need_event(event=0xFFFF, new=1, old=0xFFFE)  # across the 16-bit wrap
    assert not need_event(event=3, new=5, old=5)  # nothing new


def test_guest_memory_is_sealed_split_and_translated_by_region() -> None:
    mem = GuestMemory(4 << 20, regions=2, shared_fd=True)
    try:
        low, high = mem.regions
        assert (low.gpa, high.gpa) == (0, HIGH_GPA)
        assert low.fd == high.fd and high.mmap_offset == low.size
        seals = fcntl.fcntl(low.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        assert mem.uaddr(HIGH_GPA + 8) == UADDR_BASE + HIGH_GPA + 8
        # Allocations alternate between regions, so both are exercised by default.
        assert {mem.region_of(mem.alloc(4096)).gpa for _ in range(2)} == {0, HIGH_GPA}
        mem.write(HIGH_GPA + 100, b"xyz")
        assert mem.read(HIGH_GPA + 100, 3) == b"xyz"
        with pytest.raises(FrontendError):
            mem.view(low.size - 4, 8)  # runs off the low region into the hole
    finally:
        mem.close()


@needs_qsd
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"event_idx": False, "indirect": False},
        {"regions": 2},
        {"regions": 2, "shared_fd": True},
    ],
    ids=["default", "no-event-idx", "two-memfds", "one-memfd-two-regions"],
)
def test_write_then_read_returns_the_data_on_every_queue(
    qsd: str, options: dict[str, bool | int]
) -> None:
    data = os.urandom(64 << 10)
    with BlkFrontend.open(qsd, num_queues=2, **options) as dev:
        assert dev.config is not None and dev.config.capacity == IMAGE_SIZE // 512
        for queue in (0, 1):
            assert dev.write(128, data, queue=queue, seg_size=4096, indirect=True) == 0
            assert dev.read(128, len(data), queue=queue, seg_size=8192) == (0, data)


@needs_qsd
def test_flush_get_id_discard_and_write_zeroes_complete(qsd: str) -> None:
    with BlkFrontend.open(qsd) as dev:
        assert dev.write(0, b"\xaa" * 4096) == 0
        assert dev.flush() == 0
        status, ident = dev.get_id()
        assert status == 0 and ident.startswith(b"vhost_user_blk")
        assert dev.write_zeroes(0, 4) == 0
        assert dev.read(0, 4096) == (0, bytes(2048) + b"\xaa" * 2048)
        assert dev.discard(0, 8) == 0


@needs_qsd
def test_stop_reports_how_far_the_backend_consumed_the_ring(qsd: str) -> None:
    with BlkFrontend.open(qsd) as dev:
        for _ in range(3):
            dev.read(0, 512)
        assert dev.stop() == [3]


@needs_qsd
def test_load_keeps_queue_depth_and_hands_the_ring_back(qsd: str) -> None:
    with BlkFrontend.open(qsd) as dev:
        load = BlkLoad(dev, qd=8)
        try:
            result = run_load([load], 0.3)
        finally:
            load.close()
        assert result.ios > 8 and result.errors == 0
        assert result.latency_us(50) <= result.latency_us(99)
        assert dev.read(0, 512)[0] == 0  # the synchronous path still works afterwards


@needs_qsd
def test_raw_descriptor_loop_makes_qsd_drop_the_connection(qsd: str) -> None:
    with BlkFrontend.open(qsd) as dev:
        q = dev.queues[0]
        buf = dev.mem.alloc(64)
        q.write_desc(0, buf, 16, flags=1, next_=1)  # 0 -> 1 -> 0 -> ...
        q.write_desc(1, buf + 16, 16, flags=1, next_=0)
        q.write_avail(0, 0)
        q.set_avail_idx(1)
        q.kick(force=True)
        assert dev.conn.wait_closed(5.0)


@needs_qsd
def test_send_raw_delivers_malformed_messages(qsd: str) -> None:
    with BlkFrontend(qsd) as dev:
        dev.conn.send_raw(9999, b"xyz", flags=VERSION | FLAG_NEED_REPLY)
        assert dev.conn.wait_closed(5.0)  # QSD's libvhost-user rejects unknown requests
