"""Write the hand-made seed corpora: one small input per rejection reason, plus valid inputs.

    python fuzz/make_seeds.py            # (re)writes accept-*, reject-* and bug-* seeds

Every harness gets an input that reaches each of its parser's refusals (so the fuzzer starts
past them) and valid inputs to mutate from. The chain seeds are the rings the test front-end
(tests/frontend.py) builds for its requests, in the fuzz layout. Seeds recorded from a real
QEMU guest come from fuzz/record_traffic.py (qemu-* files). Existing files of other names are
left alone: reproducers of bugs found by fuzzing are kept as they are.
"""

from __future__ import annotations

import json
import random
import re
import struct
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from backend import net as bnet  # noqa: E402
from fuzz import fuzz_blk_request as blkh  # noqa: E402
from fuzz import fuzz_chain as chainh  # noqa: E402
from fuzz import fuzz_net as neth  # noqa: E402
from fuzz import fuzz_vhost_user as vuh  # noqa: E402

CORPUS = REPO / "fuzz" / "corpus"
Seeds = dict[str, bytes]


def write(harness: str, seeds: Seeds) -> None:
    directory = CORPUS / harness
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in seeds.items():
        (directory / name).write_bytes(data)
    print(f"{harness}: {len(seeds)} seeds")


# --- chain: rings in the fuzz layout, built by the test front-end -----------------------------


def chain_seeds() -> Seeds:
    from tests import frontend as fe

    # Fixed places: rings from 0x0 (or 0x8000 for the big queue), buffers above; the bump
    # allocator (indirect tables) starts past them, at 0xB000.
    hdr, status, data_lo, data_hi, table = 0x1000, 0x1010, 0x2000, 0xA000, 0x3000

    def ring(build: Callable[[fe.GuestMemory, fe.SplitQueue], None], *, size: int = 16,
             event_idx: bool = True, desc: int = 0x0, avail: int = 0x100, used: int = 0x200,
             last_avail: int = 0, kicks_on: bool = False) -> bytes:
        mem = fe.GuestMemory(32 << 10, regions=2, high_gpa=0x8000)
        try:
            mem.alloc(0x3800, region=0)
            mem.alloc(0x3000, region=1)
            try:
                q = fe.SplitQueue(mem, 0, size, event_idx=event_idx, desc_gpa=desc,
                                  avail_gpa=avail, used_gpa=used)
            except (ValueError, fe.FrontendError):
                # The ring under test is misplaced: build its contents where a good one would be.
                q = fe.SplitQueue(mem, 0, 16, event_idx=event_idx, desc_gpa=0, avail_gpa=0x100,
                                  used_gpa=0x200)
            try:
                mem.write(hdr, fe.BLK_REQ_HEADER.pack(fe.T_IN, 0, 8))
                mem.write(status, b"\xff")
                build(mem, q)
            finally:
                q.close()
            flags = (chainh.F_EVENT_IDX if event_idx else 0) | (
                chainh.F_KICKS_ON if kicks_on else 0)
            out = chainh.HEADER.pack(size, flags, 0, last_avail, desc, avail, used)
            for region in mem.regions:
                raw = bytes(region.view)
                pos = 0
                while pos < len(raw):  # one patch per run of non-zero bytes
                    start = next((i for i in range(pos, len(raw)) if raw[i]), None)
                    if start is None:
                        break
                    stop = raw.find(bytes(8), start)
                    stop = len(raw) if stop < 0 else stop
                    out += chainh.PATCH.pack(region.gpa + start, stop - start) + raw[start:stop]
                    pos = stop
            return out
        finally:
            mem.close()

    def post(*chains: list[tuple[int, int, bool]], indirect: bool = False):
        def build(mem: fe.GuestMemory, q: fe.SplitQueue) -> None:
            for chain in chains:
                q.post(chain, indirect=indirect)
        return build

    def raw(descs: list[tuple[int, int, int, int]], heads: list[int] = (0,),
            avail_idx: int | None = None, extra: Callable | None = None):
        def build(mem: fe.GuestMemory, q: fe.SplitQueue) -> None:
            for i, d in enumerate(descs):
                q.write_desc(i, *d)
            for slot, head in enumerate(heads):
                q.write_avail(slot, head)
            q.set_avail_idx(len(heads) if avail_idx is None else avail_idx)
            if extra:
                extra(mem, q)
        return build

    def table_at(entries: list[tuple[int, int, int, int]]):
        def extra(mem: fe.GuestMemory, q: fe.SplitQueue) -> None:
            for i, e in enumerate(entries):
                mem.write(table + 16 * i, fe.DESC.pack(*e))
        return extra

    N, W, I = fe.DESC_F_NEXT, fe.DESC_F_WRITE, fe.DESC_F_INDIRECT  # noqa: E741
    read_4k = [(hdr, 16, False), (data_lo, 2048, True), (data_hi, 2048, True), (status, 1, True)]
    write_3 = [(hdr, 16, False), (data_lo, 1536, False), (data_lo + 1536, 1536, False),
               (data_hi, 1024, False), (status, 1, True)]
    seeds = {
        "accept-read-4k-across-regions": ring(post(read_4k)),
        "accept-write-3-segments": ring(post(write_3)),
        "accept-indirect-read": ring(post(read_4k, indirect=True)),
        "accept-four-requests": ring(post(read_4k, [(hdr, 16, False), (status, 1, True)],
                                          write_3, [(hdr, 16, False), (status, 1, True)])),
        "accept-no-event-idx-kicks-on": ring(post(read_4k), event_idx=False, kicks_on=True),
        "accept-queue-size-256": ring(post(read_4k), size=256, desc=0x8000, avail=0x9000,
                                      used=0x9400),
        "accept-queue-size-1": ring(post([(status, 1, True)]), size=1),
        "accept-zero-length-descriptor-skipped": ring(raw([(hdr, 16, N, 1), (1 << 60, 0, N, 2),
                                                           (status, 1, W, 0)])),
        "accept-wrapped-avail-index": ring(raw([(hdr, 16, N, 1), (status, 1, W, 0)],
                                               heads=[0, 0, 0], avail_idx=1),
                                           last_avail=0xFFFE),
        "reject-rings-overlap-used-on-desc": ring(post(read_4k), used=0x0),
        "reject-ring-size-not-power-of-2": ring(post(read_4k), size=12),
        "reject-ring-size-0": ring(post(read_4k), size=0),
        "reject-desc-misaligned": ring(post(read_4k), desc=0x8),
        "reject-avail-misaligned": ring(post(read_4k), avail=0x101),
        "reject-used-misaligned": ring(post(read_4k), used=0x202),
        "reject-desc-in-the-hole": ring(post(read_4k), desc=0x4000),
        "reject-used-straddles-region-end": ring(post(read_4k), used=0x3FF0),
        "reject-desc-beyond-memory": ring(post(read_4k), desc=0x10000),
        "reject-avail-index-too-far-ahead": ring(raw([(status, 1, W, 0)], avail_idx=17)),
        "reject-avail-index-backwards": ring(raw([(status, 1, W, 0)], avail_idx=0xFFFF)),
        "reject-head-out-of-range": ring(raw([(status, 1, W, 0)], heads=[16])),
        "reject-descriptor-loop": ring(raw([(hdr, 16, N, 1), (data_lo, 512, N, 0)])),
        "reject-self-loop": ring(raw([(hdr, 16, N, 0)])),
        "reject-next-out-of-range": ring(raw([(hdr, 16, N, 16)])),
        "reject-readable-after-writable": ring(raw([(hdr, 16, N, 1), (data_lo, 512, W | N, 2),
                                                    (data_lo + 512, 512, N, 3),
                                                    (status, 1, W, 0)])),
        "reject-buffer-beyond-memory": ring(raw([(1 << 44, 16, N, 1), (status, 1, W, 0)])),
        "reject-buffer-in-the-hole": ring(raw([(hdr, 16, N, 1), (0x5000, 512, N, 2),
                                               (status, 1, W, 0)])),
        "reject-buffer-straddles-region-end": ring(raw([(hdr, 16, N, 1), (0x3F00, 512, N, 2),
                                                        (status, 1, W, 0)])),
        "reject-buffer-wraps-2-64": ring(raw([((1 << 64) - 8, 16, 0, 0)])),
        "reject-indirect-loop": ring(raw([(table, 32, I, 0)],
                                         extra=table_at([(hdr, 16, N, 1), (data_lo, 512, N, 0)]))),
        "reject-indirect-not-16n": ring(raw([(table, 20, I, 0)],
                                            extra=table_at([(hdr, 16, N, 1), (status, 1, W, 0)]))),
        "reject-indirect-empty": ring(raw([(table, 0, I, 0)])),
        "reject-indirect-over-queue-size": ring(raw([(table, 16 * 17, I, 0)])),
        "reject-indirect-nested": ring(raw([(table, 16, I, 0)],
                                           extra=table_at([(table + 32, 32, I, 0)]))),
        "reject-indirect-with-next": ring(raw([(table, 32, I | N, 1), (status, 1, W, 0)],
                                              extra=table_at([(hdr, 16, N, 1),
                                                              (status, 1, W, 0)]))),
        "reject-indirect-after-head": ring(raw([(hdr, 16, N, 1), (table, 32, I, 0)],
                                               extra=table_at([(data_lo, 512, N, 1),
                                                               (status, 1, W, 0)]))),
        "reject-indirect-table-outside-memory": ring(raw([(1 << 44, 32, I, 0)])),
        "reject-indirect-next-out-of-range": ring(raw([(table, 32, I, 0)],
                                                      extra=table_at([(hdr, 16, N, 2)]))),
    }
    return seeds


# --- vhost_user: messages and whole sessions --------------------------------------------------

F_PROTOCOL_FEATURES = 1 << 30
PROTOCOL = (1 << 0) | (1 << 3) | (1 << 9)  # MQ, REPLY_ACK, CONFIG
UADDR = 0x7F00_0000_0000


def msg(request: int, payload: bytes = b"", *, flags: int = 0x1, size: int | None = None) -> bytes:
    return struct.pack("<III", request, flags, len(payload) if size is None else size) + payload


def need(request: int, payload: bytes = b"") -> bytes:
    return msg(request, payload, flags=0x1 | 0x8)


def chunk(data: bytes, nfds: int = 0, control: int = 0) -> bytes:
    return struct.pack("<BH", nfds | control, len(data)) + data


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def state(index: int, num: int) -> bytes:
    return struct.pack("<II", index, num)


def vring_addr(index: int, desc: int, used: int, avail: int, flags: int = 0) -> bytes:
    return struct.pack("<IIQQQQ", index, flags, desc, used, avail, 0)


def mem_table(regions: list[tuple[int, int, int, int]], padded: bool = True) -> bytes:
    body = b"".join(struct.pack("<QQQQ", *r) for r in regions)
    if padded:
        body = body.ljust(8 * 32, b"\0")
    return struct.pack("<II", len(regions), 0) + body


def config(offset: int, size: int, data: bytes = b"") -> bytes:
    return struct.pack("<III", offset, size, 0) + data


REGION = (0, 32 << 20, UADDR, 0)
RING = vring_addr(0, UADDR + 0x1000, UADDR + 0x3000, UADDR + 0x2000)
FEATURES = vuh.DEVICE_FEATURES | F_PROTOCOL_FEATURES


def handshake() -> list[bytes]:
    """What QEMU sends when vhost-user-blk realizes and the guest driver starts, as chunks."""
    return [
        chunk(msg(1)),  # GET_FEATURES
        chunk(msg(15)),  # GET_PROTOCOL_FEATURES
        chunk(msg(16, u64(PROTOCOL))),
        chunk(need(17)),  # GET_QUEUE_NUM
        chunk(need(3)),  # SET_OWNER
        chunk(msg(24, config(0, 60, bytes(60)))),  # GET_CONFIG
        chunk(need(2, u64(FEATURES))),
        chunk(need(5, mem_table([REGION])), 1),
        chunk(need(8, state(0, 256))),
        chunk(need(10, state(0, 0))),
        chunk(need(9, RING)),
        chunk(need(12, u64(0)), 1),  # SET_VRING_KICK
        chunk(need(13, u64(0)), 1),  # SET_VRING_CALL
        chunk(need(18, state(0, 1))),  # SET_VRING_ENABLE
    ]


def session(*extra: bytes, prefix: list[bytes] | None = None) -> bytes:
    return b"".join((handshake() if prefix is None else prefix) + list(extra))


def vhost_user_seeds() -> Seeds:
    hs = handshake()
    realized = hs[:6]
    stop = [chunk(need(11, state(0, 0)))]  # GET_VRING_BASE
    seeds = {
        "accept-handshake": session(),
        "accept-handshake-stop-restart": session(*stop, *hs[8:]),
        "accept-handshake-in-one-chunk": chunk(b"".join(c[3:] for c in hs[:7])),
        "accept-message-split-over-chunks": b"".join(chunk(c[3:][i : i + 5]) for c in hs[:7]
                                                     for i in range(0, len(c) - 3, 5)),
        "accept-two-regions-and-mem-hotplug": session(
            chunk(need(5, mem_table([REGION, (1 << 32, 1 << 20, UADDR + (1 << 32), 0)])), 2)),
        "accept-vring-nofd-kick-call-err": session(chunk(need(12, u64(0x100))),
                                                   chunk(need(13, u64(0x100))),
                                                   chunk(need(14, u64(0x100)))),
        "accept-err-fd-then-replaced": session(chunk(need(14, u64(0)), 1),
                                               chunk(need(14, u64(0)), 1)),
        "accept-second-ring": session(chunk(need(8, state(1, 128))), chunk(need(10, state(1, 5))),
                                      chunk(need(9, vring_addr(1, UADDR + 0x8000,
                                                               UADDR + 0xA000,
                                                               UADDR + 0x9000))),
                                      chunk(need(12, u64(1)), 1), chunk(need(18, state(1, 1)))),
        "accept-set-features-without-protocol-features": b"".join(
            [chunk(msg(1)), chunk(msg(3)), chunk(msg(2, u64(vuh.DEVICE_FEATURES))),
             chunk(msg(5, mem_table([REGION])), 1), chunk(msg(8, state(0, 64))),
             chunk(msg(9, RING)), chunk(msg(13, u64(0)), 1), chunk(msg(12, u64(0)), 1)]),
        "bug-reset-owner-after-stop": session(*stop, chunk(need(4))),
        "accept-eof": session(chunk(b"")),
        "accept-eof-with-fds": session(chunk(b"", 2)),
        "reject-header-version-0": chunk(msg(1, flags=0)),
        "reject-header-version-2": chunk(msg(1, flags=2)),
        "reject-header-reply-flag": chunk(msg(1, flags=0x5)),
        "reject-header-unknown-flag": chunk(msg(1, flags=0x11)),
        "reject-payload-over-4096": chunk(msg(8, state(0, 256), size=4097)),
        "reject-unknown-request": chunk(need(9999, state(0, 0))),
        "reject-unknown-request-no-reply": chunk(msg(9999, b"xyz")),
        "reject-unsupported-request": chunk(need(6, u64(0))),  # SET_LOG_BASE
        "reject-fds-on-set-owner": chunk(need(3), 2),
        "reject-nine-fds": chunk(need(13, u64(0)), 9),
        "reject-fds-over-two-chunks": chunk(need(13, u64(0))[:6], 5)
        + chunk(need(13, u64(0))[6:], 5),
        "reject-u64-wrong-size": session(chunk(need(2, b"\0" * 4))),
        "reject-get-features-with-payload": chunk(msg(1, b"\0" * 3)),
        "reject-vring-file-reserved-bits": session(chunk(need(13, u64(0x200)), 1)),
        "reject-vring-file-nofd-with-fd": session(chunk(need(13, u64(0x100)), 1)),
        "reject-vring-file-missing-fd": session(chunk(need(13, u64(0)))),
        "reject-vring-file-two-fds": session(chunk(need(13, u64(0)), 2)),
        "reject-vring-index-out-of-range": session(chunk(need(13, u64(5)), 1)),
        "reject-mem-table-no-regions": chunk(need(5, mem_table([])), 0),
        "reject-mem-table-nine-regions": chunk(need(5, struct.pack("<II", 9, 0) + bytes(9 * 32)),
                                               8),
        "reject-mem-table-short": chunk(need(5, b"\1\0\0")),
        "reject-mem-table-wrong-length": chunk(need(5, mem_table([REGION], padded=False)[:-8]), 1),
        "reject-mem-table-fd-count": chunk(need(5, mem_table([REGION, (1 << 32, 4096, 0, 0)])), 1),
        "reject-mem-table-zero-size": chunk(need(5, mem_table([(0, 0, UADDR, 0)])), 1),
        "reject-mem-table-wraps": chunk(need(5, mem_table([((1 << 64) - 4096, 8192, UADDR, 0)])),
                                        1),
        "reject-mem-table-overlap-gpa": chunk(need(5, mem_table([(0, 8192, UADDR, 0),
                                                                 (4096, 8192, UADDR + 65536, 0)])),
                                              2),
        "reject-mem-table-overlap-uva": chunk(need(5, mem_table([(0, 8192, UADDR, 0),
                                                                 (65536, 8192, UADDR + 4096, 0)])),
                                              2),
        "reject-mem-table-unmappable": session(chunk(need(5, mem_table([REGION])), 1,
                                                     vuh.NOT_MAPPABLE)),
        "reject-mem-table-larger-than-fd": chunk(need(5, mem_table([(0, 1 << 40, UADDR, 0)])), 1),
        "reject-mem-table-strands-running-ring": session(
            chunk(need(5, mem_table([(0, 0x2000, UADDR, 0)])), 1)),
        "reject-config-short": session(chunk(msg(24, b"\0" * 8)), prefix=realized),
        "reject-config-out-of-range": session(chunk(msg(24, config(250, 10, bytes(10)))),
                                              prefix=realized),
        "reject-config-wrong-size": session(chunk(msg(24, config(0, 60, bytes(20)))),
                                            prefix=realized),
        "reject-set-config": session(chunk(need(25, config(0, 4, b"abcd"))), prefix=realized),
        "reject-get-config-without-protocol": chunk(msg(24, config(0, 60, bytes(60)))),
        "reject-features-not-offered": chunk(need(2, u64(1 << 63))),
        "reject-protocol-features-not-offered": chunk(need(16, u64(1 << 20))),
        "reject-features-change-while-running": session(chunk(need(2, u64(F_PROTOCOL_FEATURES)))),
        "reject-vring-num-while-running": session(chunk(need(8, state(0, 128)))),
        "reject-vring-num-not-power-of-2": chunk(need(8, state(0, 100))),
        "reject-vring-num-zero": chunk(need(8, state(0, 0))),
        "reject-vring-base-over-16-bits": chunk(need(10, state(0, 1 << 16))),
        "reject-vring-addr-log-flag": chunk(need(9, vring_addr(0, 0, 0, 0, flags=1))),
        "reject-kick-before-memory": chunk(need(8, state(0, 256))) + chunk(need(9, RING))
        + chunk(need(12, u64(0)), 1),
        "reject-kick-not-eventfd": session(*stop, chunk(need(12, u64(0)), 1, vuh.NOT_EVENTFD)),
        "reject-call-not-eventfd": session(chunk(need(13, u64(0)), 1, vuh.NOT_EVENTFD)),
        "reject-kick-ring-outside-memory": session(
            *stop, chunk(need(9, vring_addr(0, UADDR + (1 << 30), UADDR + 0x3000,
                                            UADDR + 0x2000))),
            chunk(need(12, u64(0)), 1)),
        "reject-enable-without-protocol-features": chunk(need(18, state(0, 1))),
        "reject-enable-value-2": session(chunk(need(18, state(0, 2)))),
        "reject-get-vring-base-bad-index": session(chunk(need(11, state(7, 0)))),
        "bug-reset-owner-stale-call-fd": b"".join(
            [chunk(msg(1)), chunk(msg(3)), chunk(msg(13, u64(0)), 1), chunk(msg(4))]),
    }
    return seeds


# --- blk_request ------------------------------------------------------------------------------


def blk(readable: list[bytes], writable: list[int], *, readonly: bool = False) -> bytes:
    lengths = [len(b) for b in readable] + writable
    return (bytes([int(readonly), len(readable), len(writable)])
            + b"".join(struct.pack("<H", n - 1) for n in lengths) + b"".join(readable))


def hdr(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def ranges(*r: tuple[int, int, int]) -> bytes:
    return b"".join(struct.pack("<QII", *x) for x in r)


def blk_request_seeds() -> Seeds:
    sectors = blkh.IMAGE_SIZE // 512
    return {
        "accept-read-4k": blk([hdr(0, 8)], [2048, 2048, 1]),
        "accept-read-status-in-data-buffer": blk([hdr(0, 8)], [513]),
        "accept-write-3-segments": blk([hdr(1, 16), b"a" * 1536, b"b" * 1536, b"c" * 1024], [1]),
        "accept-header-and-data-in-one-buffer": blk([hdr(1, 2) + b"d" * 512], [1]),
        "accept-header-split": blk([hdr(0, 1)[:5], hdr(0, 1)[5:]], [512, 1]),
        "accept-flush": blk([hdr(4)], [1]),
        "accept-get-id": blk([hdr(8)], [20, 1]),
        "accept-get-id-short-buffer": blk([hdr(8)], [7, 1]),
        "accept-discard": blk([hdr(11), ranges((8, 16, 0))], [1]),
        "accept-write-zeroes-unmap": blk([hdr(13), ranges((8, 16, 1), (64, 8, 0))], [1]),
        "accept-unknown-type": blk([hdr(99)], [1]),
        "accept-read-last-sector": blk([hdr(0, sectors - 1)], [512, 1]),
        "reject-no-writable": blk([hdr(0)], []),
        "reject-header-short": blk([hdr(0)[:8]], [1]),
        "reject-no-header": blk([], [512, 1]),
        "reject-read-with-readable-data": blk([hdr(0), b"x" * 512], [512, 1]),
        "reject-write-with-writable-data": blk([hdr(1), b"x" * 512], [512, 1]),
        "reject-read-past-capacity": blk([hdr(0, sectors)], [512, 1]),
        "reject-read-huge-sector": blk([hdr(0, (1 << 64) - 1)], [512, 1]),
        "reject-read-not-whole-sectors": blk([hdr(0)], [100, 1]),
        "reject-write-read-only": blk([hdr(1), b"x" * 512], [1], readonly=True),
        "reject-discard-read-only": blk([hdr(11), ranges((0, 1, 0))], [1], readonly=True),
        "reject-discard-flags": blk([hdr(11), ranges((0, 1, 1))], [1]),
        "reject-write-zeroes-flags": blk([hdr(13), ranges((0, 1, 2))], [1]),
        "reject-ranges-not-16n": blk([hdr(11), ranges((0, 1, 0))[:12]], [1]),
        "reject-ranges-empty": blk([hdr(11)], [1]),
        "reject-ranges-33": blk([hdr(11), ranges(*[(i, 1, 0) for i in range(33)])], [1]),
        "reject-range-over-limit": blk([hdr(13), ranges((0, (1 << 22) + 1, 0))], [1]),
        "reject-range-past-capacity": blk([hdr(11), ranges((sectors - 1, 2, 0))], [1]),
    }


# --- fdpass -----------------------------------------------------------------------------------


def frame(kind: int, fields: object, *, nfds: int = 0, direction: int = 0,
          raw: bytes | None = None, magic: int = 0x5246, version: int = 1,
          length: int | None = None) -> bytes:
    payload = raw if raw is not None else json.dumps(fields).encode()
    header = struct.pack("<HBBI", magic, version, kind,
                         len(payload) if length is None else length)
    return bytes([nfds | direction << 2]) + header + payload


def fdpass_seeds() -> Seeds:
    add = {"vm": "web1", "disk": 0, "socket": "/run/rf/vms/web1/disk0.sock", "readonly": False,
           "num_queues": 2, "serial": "web1-0"}
    device = {"vm": "web1", "disk": 0, "socket": "/s", "connected": True, "requests": 10,
              "bytes": 4096, "kicks": 3, "interrupts": 2, "p50_us": 10, "p99_us": 50,
              "p999_us": 90, "throttled_ms": 0}
    nic = {"vm": "web1", "nic": 0, "socket": "/n", "tap": "rf-web1-0", "connected": True,
           "queues": 2, "tx_frames": 5, "tx_bytes": 300, "rx_frames": 6, "rx_bytes": 400,
           "tx_dropped": 1, "rx_dropped": 0, "kicks": 4, "interrupts": 3,
           "drops": [{"reason": "short", "count": 1}],
           "pairs": [{"rx_frames": 4, "tx_frames": 3}, {"rx_frames": 2, "tx_frames": 2}]}
    qos = {"vm": "web1", "weight": 2, "priority": "high", "iops_limit": 0, "bps_limit": 0,
           "burst_milli": 1000}
    return {
        "accept-add-blk": frame(1, add, nfds=2, direction=1),
        "accept-add-net": frame(6, {"vm": "web1", "nic": 0, "socket": "/run/rf/n.sock",
                                    "tap": "rf-web1-0", "mac": "52:54:00:12:34:56", "mtu": 1500,
                                    "queues": 1}, nfds=2, direction=1),
        "accept-remove-vm": frame(2, {"vm": "web1"}, direction=1),
        "accept-status": frame(3, {}),
        "accept-stop": frame(4, {}),
        "accept-set-qos": frame(5, qos),
        "accept-ready": frame(65, {"devices": 3}, direction=2),
        "accept-add-net-mq": frame(6, {"vm": "web1", "nic": 0, "socket": "/run/rf/n.sock",
                                       "tap": "rf-web1-0", "mac": "52:54:00:12:34:56",
                                       "mtu": 1500, "queues": 2}, nfds=3, direction=1),
        "accept-status-reply": frame(66, {"devices": [device, device], "nics": [nic]},
                                     direction=2),
        "accept-error": frame(67, {"vm": "web1", "message": "disk0: image is gone"}),
        "accept-unicode": frame(67, {"vm": "\u00e9\u4e2d", "message": "\U0001f600"}),
        "reject-short": b"\0" + b"RF\1",
        "reject-bad-magic": frame(3, {}, magic=0x1234),
        "reject-bad-version": frame(3, {}, version=2),
        "reject-length-mismatch": frame(3, {}, length=7),
        "reject-unknown-kind": frame(99, {}),
        "reject-wrong-direction": frame(65, {"devices": 1}, direction=1),
        "reject-wrong-fd-count": frame(1, add, nfds=1),
        "reject-not-utf8": frame(2, None, raw=b'{"vm": "\xff"}'),
        "reject-not-json": frame(2, None, raw=b'{"vm": '),
        "reject-not-object": frame(3, [], raw=b"[]"),
        "reject-duplicate-key": frame(2, None, raw=b'{"vm": "a", "vm": "b"}'),
        "reject-missing-field": frame(2, {}),
        "reject-extra-field": frame(2, {"vm": "a", "x": 1}),
        "reject-wrong-type": frame(2, {"vm": 1}),
        "reject-negative-int": frame(65, {"devices": -1}),
        "reject-bool-as-int": frame(65, {"devices": True}),
        "reject-float": frame(65, None, raw=b'{"devices": 1.5}'),
        "reject-huge-int": frame(65, None, raw=b'{"devices": ' + b"9" * 5000 + b"}"),
        "reject-list-element": frame(66, {"devices": [{"vm": 1}]}),
        "reject-deep-nesting": frame(66, None, raw=b'{"devices": ' + b"[" * 3000 + b"]" * 3000
                                     + b"}"),
        "reject-oversized": frame(67, {"vm": "a", "message": "x" * 70000}),
        "bug-lone-surrogate": frame(2, None, raw=b'{"vm": "\\ud800"}'),
    }


# --- admin ------------------------------------------------------------------------------------


def admin_seeds() -> Seeds:
    return {
        "accept-status": b'{"cmd": "status"}\n',
        "accept-reload": b'{"cmd":"reload"}',
        "accept-stop": b'  {"cmd" : "stop"}  \n',
        "reject-too-long": b'{"cmd": "status", "x": "' + b"a" * 5000 + b'"}\n',
        "reject-not-json": b"status\n",
        "reject-not-utf8": b'{"cmd": "\xff"}\n',
        "reject-not-object": b'["status"]\n',
        "reject-extra-key": b'{"cmd": "status", "vm": "web1"}\n',
        "reject-cmd-not-string": b'{"cmd": 1}\n',
        "reject-unknown-command": b'{"cmd": "shutdown\\nnow"}\n',
        "reject-two-lines": b'{"cmd": "status"}\n{"cmd": "stop"}\n',
        "reject-deep-nesting": b"[" * 5000,
    }


# --- policy -----------------------------------------------------------------------------------

BROKER = """\
[broker]
image_roots = ["/srv/images", "/srv/more"]
run_dir = "/run/rf"
backend_user = "ringfence"
admin_group = "ringfence-admin"
trusted_keys = ["/etc/rf/ops.pub"]
"""
VM = '[groups.g]\n[vms.v]\ngroup = "g"\nuser = "vm-v"\n'


def policy_seeds() -> Seeds:
    example = (REPO / "policies" / "example-vms.toml").read_bytes()
    base = BROKER + VM

    def p(text: str) -> bytes:
        return text.encode()

    return {
        "accept-example-vms": example,
        "accept-minimal": p(base),
        "accept-full-vm": p(BROKER + 'seccomp = "log"\n[groups.g]\n[vms.v]\ngroup = "g"\n'
                            'user = 2001\nmemory = "1G"\nkernel = "/boot/k"\ninitrd = "/boot/i"\n'
                            'append = "console=ttyS0"\nnum_queues = 4\n'
                            'qos = { weight = 10, priority = "low", iops_limit = 100, '
                            'bps_limit = "10M", burst = "1.5x" }\n'
                            'disks = [ { image = "a.raw" }, { image = "/srv/more/b.iso", '
                            'readonly = true } ]\n'),
        "accept-vm-with-nic": p(base + 'nics = [ { tap = "rf-v0", bridge = "br0", '
                                'mac = "52:54:00:12:34:56", mtu = 9000 } ]\n'),
        "reject-nic-mac-shared": p(BROKER + '[groups.g]\n[vms.a]\ngroup = "g"\nuser = "u"\n'
                                   'nics = [ { tap = "t1", bridge = "br0", '
                                   'mac = "52:54:00:00:00:01" } ]\n[vms.b]\ngroup = "g"\n'
                                   'user = "u"\nnics = [ { tap = "t2", bridge = "br0", '
                                   'mac = "52:54:00:00:00:01" } ]\n'),
        "accept-unsigned": p(BROKER.replace('["/etc/rf/ops.pub"]', "[]")
                             + "allow_unsigned = true\n"),
        "reject-not-utf8": BROKER.encode() + b"# \xff\n",
        "reject-toml-syntax": p(BROKER + "[vms.v]\ngroup = \n"),
        "reject-unterminated": p(BROKER + 'seccomp = "kill'),
        "reject-no-broker": p("[groups.g]\n"),
        "reject-unknown-key": p(base + "nics = []\n"),
        "reject-unknown-table": p(base + "[networks]\n"),
        "reject-empty-roots": p(base.replace('["/srv/images", "/srv/more"]', "[]")),
        "reject-root-is-slash": p(base.replace('"/srv/more"', '"/"')),
        "reject-relative-root": p(base.replace('"/srv/more"', '"srv"')),
        "reject-unnormal-path": p(base.replace('"/run/rf"', '"/run//rf/"')),
        "reject-no-keys": p(base.replace('["/etc/rf/ops.pub"]', "[]")),
        "reject-root-backend-user": p(base.replace('"ringfence"', '"root"')),
        "reject-bad-account": p(base.replace('"ringfence"', '"Ring Fence"')),
        "reject-bad-seccomp": p(BROKER + 'seccomp = "allow"\n' + VM),
        "reject-bad-vm-name": p(BROKER + '[groups.g]\n[vms."Web 1"]\ngroup = "g"\nuser = "u"\n'),
        "reject-undeclared-group": p(BROKER + '[vms.v]\ngroup = "g"\nuser = "u"\n'),
        "reject-memory-not-mib": p(base + 'memory = "1000K"\n'),
        "reject-bad-size": p(base + 'memory = "lots"\n'),
        "reject-initrd-without-kernel": p(base + 'initrd = "/boot/i"\n'),
        "reject-queues": p(base + "num_queues = 65\n"),
        "reject-bool-queues": p(base + "num_queues = true\n"),
        "reject-weight": p(base + "qos = { weight = 0 }\n"),
        "reject-priority": p(base + 'qos = { priority = "urgent" }\n'),
        "reject-iops": p(base + "qos = { iops_limit = 0 }\n"),
        "reject-burst": p(base + 'qos = { burst = "200x" }\n'),
        "reject-image-dotdot": p(base + 'disks = [ { image = "../etc/shadow" } ]\n'),
        "reject-image-outside-roots": p(base + 'disks = [ { image = "/etc/shadow" } ]\n'),
        "reject-image-shared-rw": p(BROKER + '[groups.g]\n[vms.a]\ngroup = "g"\nuser = "u"\n'
                                    'disks = [ { image = "x.raw" } ]\n[vms.b]\ngroup = "g"\n'
                                    'user = "u"\ndisks = [ { image = "x.raw", readonly = true } ]'
                                    "\n"),
        "reject-socket-path-too-long": p(base.replace('"/run/rf"', '"/run/' + "r" * 100 + '"')),
        "reject-disk-not-table": p(base + 'disks = [ "x.raw" ]\n'),
        "bug-newline-in-key": p(BROKER + '"a\\nb" = 1\n' + VM),
        "bug-newline-in-image": p(base + 'disks = [ { image = "/etc/x\\ny" } ]\n'),
        "bug-escape-in-run-dir": p(base.replace('"/run/rf"',
                                               '"/run/\\u001b[31m' + "r" * 100 + '"')),
        "bug-long-blank-line": p(BROKER + " " * 2000 + "#\n" + VM),
    }


# --- seccomp_policy ---------------------------------------------------------------------------


def seccomp_policy_seeds() -> Seeds:
    def p(*lines: str) -> bytes:
        return ("@default kill\n" + "".join(line + "\n" for line in lines)).encode()

    return {
        "accept-all-forms": p("read: 1", "mmap: arg2 & PROT_EXEC == 0",
                              "fcntl: arg1 == F_GETFL || arg1 == F_SETFL",
                              "openat: return EPERM", "ioctl: arg1 == FIONBIO && arg0 >= 3",
                              "write: arg0 != 0x10 || arg2 <= 4096"),
        "reject-unknown-directive": p("@include other.policy"),
        "reject-default-twice": p("@default log"),
        "reject-bad-default": b"@default allow\n",
        "reject-no-default": b"read: 1\n",
        "reject-no-colon": p("read"),
        "reject-not-a-name": p("Read!: 1"),
        "reject-unknown-syscall": p("frobnicate: 1"),
        "reject-unknown-errno": p("openat: return NOPE"),
        "reject-arg-twice": p("read: arg0 == 1 && arg0 == 2"),
        "reject-bad-condition": p("read: arg0 ~ 1"),
        "reject-arg6": p("read: arg6 == 1"),
        "reject-masked-not-eq": p("mmap: arg2 & PROT_EXEC != 0"),
        "reject-never-holds": p("mmap: arg2 & 0x1 == 0x3"),
        "reject-unknown-constant": p("read: arg0 == STDIN"),
        "reject-too-big": p("read: arg0 == 0x10000000000000000"),
        "reject-duplicate-rule": p("read: 1", "read: arg0 == 0"),
    }


# --- scheduler --------------------------------------------------------------------------------


def scheduler_seeds() -> Seeds:
    rng = random.Random(6)
    return {f"accept-random-{n}": rng.randbytes(n) for n in (16, 64, 256, 1024, 2048)}


# --- net: TX chains and RX buffers + tap frames, with real frames ------------------------------


def inet_sum(data: bytes) -> int:
    """The Internet checksum's one's-complement sum (not yet inverted)."""
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ether(ethertype: int) -> bytes:
    return bytes.fromhex("525400abcdef525400123456") + struct.pack("!H", ethertype)


def ip4(proto: int, l4: bytes, l4_len: int | None = None) -> bytes:
    """IPv4 around `l4`; `l4_len` if the datagram is longer than the bytes given (TSO)."""
    total = 20 + (len(l4) if l4_len is None else l4_len)
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, 64, proto, 0,
                       bytes([10, 99, 0, 2]), bytes([10, 99, 0, 1]))
    return head[:10] + struct.pack("!H", ~inet_sum(head) & 0xFFFF) + head[12:] + l4


def l4_checksummed(l4: bytes, at: int, pseudo: bytes, partial: bool) -> bytes:
    """Fill the checksum at `at`: complete, or (offload) the pseudo-header sum a driver leaves."""
    csum = inet_sum(pseudo) if partial else ~inet_sum(pseudo + l4) & 0xFFFF
    return l4[:at] + struct.pack("!H", csum) + l4[at + 2 :]


def tcp_segment(payload: bytes) -> bytes:
    return struct.pack("!HHIIBBHHH", 40000, 80, 1, 1, 5 << 4, 0x18, 65535, 0, 0) + payload


def tcp4(payload_len: int, *, partial: bool = False, upto: int | None = None) -> bytes:
    """Ethernet + IPv4 + TCP; NEEDS_CSUM for it is csum_start 34, csum_offset 16. With `upto`,
    a TSO super-frame's first bytes only (its headers say `payload_len`; partial sum only)."""
    l4 = tcp_segment(bytes(i & 0xFF for i in range(payload_len if upto is None else upto)))
    pseudo = bytes([10, 99, 0, 2, 10, 99, 0, 1, 0, 6]) + struct.pack("!H", 20 + payload_len)
    return ether(0x0800) + ip4(6, l4_checksummed(l4, 16, pseudo, partial), 20 + payload_len)


def udp4(payload: bytes, *, partial: bool = False) -> bytes:
    """Ethernet + IPv4 + UDP; NEEDS_CSUM for it is csum_start 34, csum_offset 6."""
    l4 = struct.pack("!HHHH", 7000, 7001, 8 + len(payload), 0) + payload
    pseudo = bytes([10, 99, 0, 2, 10, 99, 0, 1, 0, 17]) + struct.pack("!H", len(l4))
    return ether(0x0800) + ip4(17, l4_checksummed(l4, 6, pseudo, partial))


def icmp4_echo() -> bytes:
    body = struct.pack("!BBHHH", 8, 0, 0, 0x1234, 1) + bytes(range(56))
    return ether(0x0800) + ip4(1, body[:2] + struct.pack("!H", ~inet_sum(body) & 0xFFFF)
                                + body[4:])


def tcp6(payload_len: int, *, partial: bool = False, upto: int | None = None) -> bytes:
    """Ethernet + IPv6 + TCP; NEEDS_CSUM for it is csum_start 54, csum_offset 16; `upto` as
    for tcp4."""
    src, dst = bytes.fromhex("fd000000000000000000000000000002"), bytes.fromhex(
        "fd000000000000000000000000000001")
    l4 = tcp_segment(bytes(i & 0xFF for i in range(payload_len if upto is None else upto)))
    pseudo = src + dst + struct.pack("!I3xB", 20 + payload_len, 6)
    l4 = l4_checksummed(l4, 16, pseudo, partial)
    return ether(0x86DD) + struct.pack("!IHBB", 6 << 28, 20 + payload_len, 6, 64) + src + dst + l4


def vnet(flags: int = 0, gso: int = 0, hdr_len: int = 0, gso_size: int = 0,
         csum_start: int = 0, csum_offset: int = 0, num_buffers: int = 0) -> bytes:
    return bnet.HEADER.pack(flags, gso, hdr_len, gso_size, csum_start, csum_offset, num_buffers)


def net_features(*features: int) -> bytes:
    selector = sum(1 << neth.FEATURES.index(f) for f in features)
    return struct.pack("<H", selector)


def tx_chain(content: bytes, segments: list[int] | None = None, *, writable: tuple[int, ...] = (),
             race: tuple[int, bytes] | None = None, tap_refuses: bool = False) -> bytes:
    """One TX chain: readable segments (default: one holding all of `content`), then
    device-writable ones of the lengths in `writable`; `race`: (offset, bytes) the guest
    writes after the device's check; `tap_refuses`: the tap's writev fails (EINVAL)."""
    lengths = [(n, 0) for n in (segments or [len(content)])] + [(n, 1) for n in writable]
    out = bytes([len(lengths) - 1]) + b"".join(struct.pack("<HB", n, f) for n, f in lengths)
    out += struct.pack("<H", len(content)) + content
    refused = 0x80 if tap_refuses else 0
    if race is None:
        return out + bytes([refused])
    return out + bytes([refused | len(race[1])]) + struct.pack("<H", race[0]) + race[1]


def net_tx(*chains: bytes, features: tuple[int, ...] = (), budget: int = 4,
           pair: int = 0) -> bytes:
    return bytes([pair << 1]) + net_features(*features) + bytes(
        [len(chains) - 1, budget - 1]) + b"".join(chains)


def split(total: int, *sizes: int) -> list[int]:
    """Segment lengths: `sizes`, then what is left of `total`."""
    return [*sizes, total - sum(sizes)]


def net_rx(chains: list[list[int]], frames: list[bytes], *, features: tuple[int, ...] = (),
           first_chains: int | None = None, first_frames: int | None = None,
           readable: tuple[int, ...] = (), pattern_len: int | None = None,
           budget: int = 8, pair: int = 0) -> bytes:
    """RX: chains of writable segments (`readable`: indices of chains whose first segment is
    device-readable instead); frames as the tap delivers them after its 12-byte header."""
    out = bytes([1 | pair << 1]) + net_features(*features) + bytes([len(chains)])
    for i, segs in enumerate(chains):
        out += bytes([len(segs) - 1]) + b"".join(
            struct.pack("<HB", n, int(i in readable and k == 0)) for k, n in enumerate(segs))
    out += bytes([len(chains) if first_chains is None else first_chains, len(frames)])
    for frame in frames:
        pattern = frame[: pattern_len or len(frame)]
        out += (len(frame) - bnet.ETH_HLEN).to_bytes(3, "little") + vnet()[:10]
        out += struct.pack("<H", len(pattern)) + pattern
    return out + bytes([len(frames) if first_frames is None else first_frames, budget - 1])


def net_seeds() -> Seeds:
    csum, tso4, tso6 = bnet.F_CSUM, bnet.F_HOST_TSO4, bnet.F_HOST_TSO6
    mrg, ufo, ecn = bnet.F_MRG_RXBUF, bnet.F_HOST_UFO, bnet.F_HOST_ECN
    offloads = (csum, tso4, tso6)
    needs = bnet.HDR_F_NEEDS_CSUM
    plain, small = vnet(), tcp4(6)
    full_tcp = tcp4(1460)
    # TSO super-frames: real headers and the first segment's payload, repeated to their length.
    tso4_hdr = vnet(needs, bnet.GSO_TCPV4, 54, 1448, 34, 16)
    tso4_len = 65514  # 54 bytes of headers + 45 segments of 1448 + 300
    tso4_start = tcp4(tso4_len - 54, partial=True, upto=1448)
    tso6_len = 32768
    tso6_start = tcp6(tso6_len - 74, partial=True, upto=1428)
    pattern = tcp4(1448)  # an RX super-frame's first bytes, repeated likewise
    seeds = {
        "accept-tcp4": net_tx(tx_chain(plain + full_tcp)),
        "accept-tcp4-csum-offload": net_tx(
            tx_chain(vnet(needs, 0, 0, 0, 34, 16) + tcp4(1460, partial=True),
                     split(12 + 1514, 12, 54)), features=offloads),
        "accept-udp4-csum-header-split": net_tx(
            tx_chain(vnet(needs, 0, 0, 0, 34, 6) + udp4(b"ringfence" * 20, partial=True),
                     split(12 + 222, 5, 7, 100)), features=(csum,)),
        "accept-icmp4-ping": net_tx(tx_chain(plain + icmp4_echo())),
        "accept-udp4-csum-on-pair-1": net_tx(
            tx_chain(vnet(needs, 0, 0, 0, 34, 6) + udp4(b"second pair", partial=True)),
            features=(csum,), pair=1),
        "accept-tcp6-csum": net_tx(tx_chain(vnet(needs, 0, 0, 0, 54, 16) + tcp6(1000, partial=True),
                                            split(12 + 1074, 12)), features=(csum,)),
        "accept-tso4-64k": net_tx(tx_chain(tso4_hdr + tso4_start,
                                           split(12 + tso4_len, 12, 54, 16384, 16384, 16384)),
                                  features=offloads),
        "accept-tso6-32k": net_tx(tx_chain(vnet(needs, bnet.GSO_TCPV6, 74, 1428, 54, 16)
                                           + tso6_start, split(12 + tso6_len, 12, 74)),
                                  features=offloads),
        "accept-largest-frame": net_tx(tx_chain(plain + small, split(12 + bnet.MAX_FRAME,
                                                                     12, 32768))),
        "accept-four-chains-budget-1": net_tx(
            tx_chain(plain + small), tx_chain(vnet(2) + small), tx_chain(plain + icmp4_echo()),
            tx_chain(plain + small, writable=(16,)), budget=1),
        "accept-second-chain-rewritten-after-check": net_tx(
            tx_chain(plain + small), tx_chain(plain + small, race=(0, vnet(0x48)))),
        "accept-frame-bytes-rewritten-after-check": net_tx(
            tx_chain(plain + full_tcp, race=(12 + 54, b"changed by the guest"))),
        "reject-tap-refuses-the-frame": net_tx(
            tx_chain(plain + small), tx_chain(plain + full_tcp, tap_refuses=True),
            tx_chain(plain + icmp4_echo())),
        "reject-writable-descriptor": net_tx(tx_chain(plain + small, writable=(16,))),
        "reject-only-writable": net_tx(tx_chain(b"", [0], writable=(12 + 60,))),
        "reject-empty-chain": net_tx(tx_chain(b"", [0])),
        "reject-shorter-than-header": net_tx(tx_chain(plain[:8])),
        "reject-header-only": net_tx(tx_chain(plain)),
        "reject-runt-frame": net_tx(tx_chain(plain + small[: bnet.ETH_HLEN - 1])),
        "reject-oversized": net_tx(tx_chain(plain + small, split(12 + bnet.MAX_FRAME + 1, 12,
                                                                 32768))),
        "reject-flags-data-valid": net_tx(tx_chain(vnet(bnet.HDR_F_DATA_VALID) + small),
                                          features=offloads),
        "reject-flags-unknown": net_tx(tx_chain(vnet(0x80) + small), features=offloads),
        "reject-csum-not-negotiated": net_tx(tx_chain(vnet(needs, 0, 0, 0, 34, 16) + small)),
        "reject-csum-outside-frame": net_tx(tx_chain(vnet(needs, 0, 0, 0, 50, 16) + small),
                                            features=offloads),
        "reject-csum-offsets-overflow": net_tx(
            tx_chain(vnet(needs, 0, 0, 0, 0xFFFF, 0xFFFF) + small), features=offloads),
        "reject-hdr-len-outside-frame": net_tx(tx_chain(vnet(0, 0, 61) + small)),
        "reject-gso-ecn": net_tx(tx_chain(vnet(needs, bnet.GSO_TCPV4 | bnet.GSO_ECN, 54, 1448,
                                               34, 16) + full_tcp),
                                 features=(*offloads, ecn)),
        "reject-gso-udp": net_tx(tx_chain(vnet(needs, bnet.GSO_UDP, 42, 1000, 34, 6)
                                          + udp4(bytes(3000), partial=True)),
                                 features=(*offloads, ufo)),
        "reject-gso-unknown-type": net_tx(tx_chain(vnet(needs, 9, 54, 1448, 34, 16) + full_tcp),
                                          features=offloads),
        "reject-tso4-not-negotiated": net_tx(tx_chain(tso4_hdr + tso4_start,
                                                      split(12 + tso4_len, 12, 54, 32768)),
                                             features=(csum, tso6)),
        "reject-tso6-not-negotiated": net_tx(
            tx_chain(vnet(needs, bnet.GSO_TCPV6, 74, 1428, 54, 16) + tso6_start,
                     split(12 + tso6_len, 12, 74)),
            features=(csum, tso4)),
        "reject-gso-without-csum": net_tx(tx_chain(vnet(0, bnet.GSO_TCPV4, 54, 1448) + full_tcp),
                                          features=offloads),
        "reject-gso-size-0": net_tx(tx_chain(vnet(needs, bnet.GSO_TCPV4, 54, 0, 34, 16)
                                             + full_tcp), features=offloads),
        "reject-gso-hdr-len-outside-frame": net_tx(
            tx_chain(vnet(needs, bnet.GSO_TCPV4, 1515, 1448, 34, 16) + full_tcp),
            features=offloads),
        "bug-tx-header-rewritten-after-check": net_tx(
            tx_chain(plain + full_tcp, race=(0, vnet(needs, bnet.GSO_UDP, 42, 1000, 34, 6))),
            tx_chain(vnet(needs, 0, 0, 0, 34, 16) + tcp4(1460, partial=True),
                     race=(0, vnet(needs | bnet.HDR_F_DATA_VALID, bnet.GSO_TCPV4 | bnet.GSO_ECN,
                                   0xFFFF, 0, 0xFFF0, 0xFF))),
            features=(csum,)),
    }
    # A TX chain whose second descriptor is readable after a writable one: the ring is broken.
    bad = bytes([1]) + struct.pack("<HBHB", 16, 1, 12 + 60, 0) + struct.pack("<H", 72) + (
        plain + small) + b"\0"
    seeds["reject-readable-after-writable"] = net_tx(tx_chain(plain + small), bad, budget=1)

    mtu_frame = tcp4(1460)
    seeds.update({
        "accept-rx-one-frame": net_rx([[1536]], [mtu_frame]),
        "accept-rx-header-split-over-segments": net_rx([[5, 7, 1514]], [mtu_frame]),
        "accept-rx-several-frames-mergeable": net_rx(
            [[2048]] * 8, [udp4(b"a" * 100), icmp4_echo(), mtu_frame, tcp6(200)],
            features=(mrg,)),
        "accept-rx-gso-frame-spans-buffers": net_rx(
            [[4096]] * 16, [pattern * 41], features=(mrg, bnet.F_GUEST_CSUM,
                                                         bnet.F_GUEST_TSO4),
            pattern_len=len(pattern)),
        "accept-rx-big-chain-without-mergeable": net_rx(
            [[16400] * 4], [pattern * 43], features=(bnet.F_GUEST_CSUM, bnet.F_GUEST_TSO4),
            pattern_len=len(pattern)),
        "accept-rx-no-buffers-in-first-round": net_rx(
            [[1536]] * 4, [mtu_frame, udp4(b"b" * 10)], first_chains=0, features=(mrg,)),
        "accept-rx-frame-waits-for-buffers": net_rx(
            [[4096]] * 8, [pattern * 13, udp4(b"c")], first_chains=2, features=(mrg,),
            pattern_len=len(pattern)),
        "accept-rx-too-large-dropped-without-mergeable": net_rx(
            [[1536]] * 2, [pattern * 3, udp4(b"d" * 20)], pattern_len=len(pattern)),
        "accept-rx-mergeable-on-pair-1": net_rx(
            [[1536]] * 4, [pattern * 2, udp4(b"e")], features=(mrg,), pair=1,
            pattern_len=len(pattern)),
        "accept-rx-event-idx-budget-1": net_rx(
            [[1536]] * 4, [mtu_frame] * 3, features=(mrg, bnet.F_RING_EVENT_IDX), budget=1),
        "reject-rx-readable-descriptor": net_rx([[1536]], [mtu_frame], readable=(0,)),
        "reject-rx-chain-shorter-than-header": net_rx([[8]], [mtu_frame]),
        "reject-rx-bad-chain-while-spreading": net_rx(
            [[1536], [1536]], [pattern * 2], readable=(1,), features=(mrg,),
            pattern_len=len(pattern)),
    })
    return seeds


# --- libFuzzer dictionaries: tokens the fuzzer cannot learn from comparisons ------------------


def dictionaries() -> dict[str, list[bytes]]:
    from backend.vhost_user import Request
    from broker import policy

    headers = [struct.pack("<III", r, flags, size) for r in [*Request, 9999]
               for flags, size in ((0x1, 0), (0x9, 8))]
    keys = sorted(set(re.findall(rb'"([a-z_]+)"', Path(policy.__file__).read_bytes())))
    return {
        "vhost_user": headers + [struct.pack("<BH", n, 12) for n in range(3)],
        "policy": [b"[broker]", b"[groups.", b"[vms.", b"[[", b'"""', b"'" * 3, b"\\u00",
                   *(k + b" = " for k in keys)],
    }


def write_dictionaries() -> None:
    directory = REPO / "fuzz" / "dict"
    directory.mkdir(exist_ok=True)
    for harness, tokens in dictionaries().items():
        lines = ['"' + "".join(f"\\x{b:02x}" for b in token) + '"' for token in tokens]
        (directory / f"{harness}.dict").write_text("\n".join(lines) + "\n")
        print(f"{harness}: dictionary of {len(tokens)} tokens")


def main() -> None:
    write_dictionaries()
    write("chain", chain_seeds())
    write("vhost_user", vhost_user_seeds())
    write("blk_request", blk_request_seeds())
    write("fdpass", fdpass_seeds())
    write("admin", admin_seeds())
    write("policy", policy_seeds())
    write("seccomp_policy", seccomp_policy_seeds())
    write("scheduler", scheduler_seeds())
    write("net", net_seeds())


if __name__ == "__main__":
    main()
