"""vhost-user wire format: bytes in, typed messages out (sans-IO).

The front-end (QEMU) is untrusted: every size, count and index is checked here before anything
acts on it. Nothing in this module touches a socket; `MessageReader` is fed bytes and file
descriptors and yields `Message`s, and the `parse_*` functions turn a payload into a frozen
dataclass or raise `ProtocolError`. The per-connection state machine lives in `session.py`.

Reference: QEMU docs/interop/vhost-user.rst.
"""

from __future__ import annotations

import enum
import itertools
import struct
from dataclasses import dataclass, field

HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size
VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
KNOWN_FLAGS = FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

# The largest payload any supported request carries is a memory table of 8 regions
# (8 + 8 * 32 bytes) or a 256-byte config plus its 12-byte header. Anything larger is hostile.
MAX_PAYLOAD = 4096
MAX_MEM_REGIONS = 8
MAX_CONFIG_SIZE = 256
MAX_FDS_PER_MESSAGE = MAX_MEM_REGIONS

VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
MEM_TABLE_HEAD = struct.Struct("<II")
MEM_REGION = struct.Struct("<QQQQ")
CONFIG_HEAD = struct.Struct("<III")


class ProtocolError(Exception):
    """A message from the front-end is malformed or out of order."""


class Request(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntFlag):
    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


# Virtio feature bit that announces the vhost-user protocol-feature negotiation.
F_PROTOCOL_FEATURES = 1 << 30


@dataclass(frozen=True, slots=True)
class Message:
    request: int
    flags: int
    payload: bytes
    fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def request_name(self) -> str:
        try:
            return Request(self.request).name
        except ValueError:
            return f"request {self.request}"


@dataclass(frozen=True, slots=True)
class VringState:
    index: int
    num: int


@dataclass(frozen=True, slots=True)
class VringAddr:
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int


@dataclass(frozen=True, slots=True)
class VringFile:
    index: int
    fd: int | None


@dataclass(frozen=True, slots=True)
class MemRegion:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class ConfigRequest:
    offset: int
    size: int
    flags: int
    data: bytes


def parse_header(buf: bytes | memoryview) -> tuple[int, int, int]:
    """Return (request, flags, size) of a 12-byte header; reject what cannot be resynced."""
    if len(buf) < HEADER_SIZE:
        raise ProtocolError(f"header is {len(buf)} bytes, need {HEADER_SIZE}")
    request, flags, size = HEADER.unpack_from(buf, 0)
    if flags & FLAG_VERSION_MASK != VERSION:
        raise ProtocolError(f"unsupported protocol version {flags & FLAG_VERSION_MASK}")
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError(f"unknown header flags {flags:#x}")
    if flags & FLAG_REPLY:
        raise ProtocolError("front-end sent a message marked as a reply")
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {size} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    return request, flags, size


def encode_reply(request: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload


def encode_u64_reply(request: int, value: int) -> bytes:
    return encode_reply(request, U64.pack(value))


def _expect_size(payload: bytes, size: int, what: str) -> None:
    if len(payload) != size:
        raise ProtocolError(f"{what} payload is {len(payload)} bytes, expected {size}")


def parse_u64(payload: bytes) -> int:
    _expect_size(payload, U64.size, "u64")
    return U64.unpack(payload)[0]


def parse_vring_state(payload: bytes) -> VringState:
    _expect_size(payload, VRING_STATE.size, "vring state")
    return VringState(*VRING_STATE.unpack(payload))


def parse_vring_addr(payload: bytes) -> VringAddr:
    _expect_size(payload, VRING_ADDR.size, "vring address")
    return VringAddr(*VRING_ADDR.unpack(payload))


def parse_vring_file(payload: bytes, fds: tuple[int, ...]) -> VringFile:
    """SET_VRING_KICK/CALL/ERR: index in bits 0-7, bit 8 set means "no FD attached"."""
    value = parse_u64(payload)
    if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
        raise ProtocolError(f"vring file payload {value:#x} has reserved bits set")
    index = value & VRING_IDX_MASK
    if value & VRING_NOFD_MASK:
        if fds:
            raise ProtocolError("vring file says no FD but FDs were attached")
        return VringFile(index, None)
    if len(fds) != 1:
        raise ProtocolError(f"vring file needs exactly one FD, got {len(fds)}")
    return VringFile(index, fds[0])


def parse_mem_table(payload: bytes, nfds: int) -> tuple[MemRegion, ...]:
    """SET_MEM_TABLE: a region count, padding, then that many regions, one FD each."""
    if len(payload) < MEM_TABLE_HEAD.size:
        raise ProtocolError(f"memory table payload is {len(payload)} bytes, too short")
    nregions, _padding = MEM_TABLE_HEAD.unpack_from(payload, 0)
    if nregions == 0 or nregions > MAX_MEM_REGIONS:
        raise ProtocolError(f"memory table has {nregions} regions, allowed 1..{MAX_MEM_REGIONS}")
    expected = MEM_TABLE_HEAD.size + nregions * MEM_REGION.size
    # QEMU always sends the full 8-slot array; accept either the exact or the padded size.
    padded = MEM_TABLE_HEAD.size + MAX_MEM_REGIONS * MEM_REGION.size
    if len(payload) not in (expected, padded):
        raise ProtocolError(
            f"memory table of {nregions} regions is {len(payload)} bytes, expected {expected}"
        )
    if nfds != nregions:
        raise ProtocolError(f"memory table has {nregions} regions but {nfds} FDs were attached")
    regions = tuple(
        MemRegion(*MEM_REGION.unpack_from(payload, MEM_TABLE_HEAD.size + i * MEM_REGION.size))
        for i in range(nregions)
    )
    for region in regions:
        validate_region(region)
    _reject_overlaps([(r.guest_phys_addr, r.memory_size) for r in regions], "guest-physical")
    _reject_overlaps([(r.userspace_addr, r.memory_size) for r in regions], "front-end virtual")
    return regions


def validate_region(region: MemRegion) -> None:
    if region.memory_size == 0:
        raise ProtocolError("memory region has zero size")
    for name, start in (
        ("guest-physical", region.guest_phys_addr),
        ("front-end virtual", region.userspace_addr),
        ("mmap offset", region.mmap_offset),
    ):
        if start + region.memory_size > 1 << 64:
            raise ProtocolError(f"memory region {name} range wraps past 2**64")


def _reject_overlaps(ranges: list[tuple[int, int]], space: str) -> None:
    ordered = sorted(ranges)
    for (start_a, size_a), (start_b, _size_b) in itertools.pairwise(ordered):
        if start_a + size_a > start_b:
            raise ProtocolError(f"memory regions overlap in {space} address space")


def parse_config(payload: bytes, *, with_data: bool) -> ConfigRequest:
    """GET_CONFIG/SET_CONFIG: offset, size, flags, then `size` bytes of config space."""
    if len(payload) < CONFIG_HEAD.size:
        raise ProtocolError(f"config payload is {len(payload)} bytes, too short")
    offset, size, flags = CONFIG_HEAD.unpack_from(payload, 0)
    if size == 0 or size > MAX_CONFIG_SIZE or offset > MAX_CONFIG_SIZE - size:
        raise ProtocolError(f"config access at {offset}+{size} is outside 0..{MAX_CONFIG_SIZE}")
    _expect_size(payload, CONFIG_HEAD.size + size, "config")
    data = bytes(payload[CONFIG_HEAD.size :]) if with_data else b""
    return ConfigRequest(offset, size, flags, data)


def encode_config_reply(request: int, req: ConfigRequest, data: bytes) -> bytes:
    return encode_reply(request, CONFIG_HEAD.pack(req.offset, len(data), req.flags) + data)


@dataclass
class MessageReader:
    """Reassembles messages from a byte stream and gives each its FDs.

    On a unix stream socket one recvmsg can return several messages, and its FDs came with the
    sendmsg whose bytes end the chunk (the kernel stops a read after a buffer carrying FDs). So
    FDs belong to the message holding the last byte of the chunk they arrived with. FDs the
    reader still holds are the caller's to close via `take_fds()` when the connection ends.
    """

    buffer: bytearray = field(default_factory=bytearray)
    # (buffer offset just past the chunk that carried them, the FDs)
    fd_marks: list[tuple[int, list[int]]] = field(default_factory=list)

    def feed(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        self.buffer += data
        if fds:
            self.fd_marks.append((len(self.buffer), list(fds)))
            held = sum(len(f) for _, f in self.fd_marks)
            if held > MAX_FDS_PER_MESSAGE:
                raise ProtocolError(f"{held} FDs arrived for one message")

    def next_message(self) -> Message | None:
        """Return the next complete message, or None when more bytes are needed."""
        if len(self.buffer) < HEADER_SIZE:
            return None
        request, flags, size = parse_header(self.buffer)
        end = HEADER_SIZE + size
        if len(self.buffer) < end:
            return None
        payload = bytes(self.buffer[HEADER_SIZE:end])
        del self.buffer[:end]
        fds: list[int] = []
        remaining = []
        for mark, mark_fds in self.fd_marks:
            if mark <= end:
                fds.extend(mark_fds)
            else:
                remaining.append((mark - end, mark_fds))
        self.fd_marks = remaining
        return Message(request, flags, payload, tuple(fds))

    def take_fds(self) -> list[int]:
        fds = [fd for _, mark_fds in self.fd_marks for fd in mark_fds]
        self.fd_marks = []
        return fds
