"""Per-connection vhost-user state machine: validates the order of requests and ring state.

The session never does I/O itself. Side effects (mapping guest memory, starting and stopping
rings, closing FDs) go through a `SessionHost`, so the fuzz harness can drive it with a fake
host and arbitrary FD numbers. Every FD that arrives with a message is either kept by the
session (kick/call/err), handed to the host (memory regions) or returned to the host to close.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from backend.vhost_user import (
    F_PROTOCOL_FEATURES,
    ConfigRequest,
    MemRegion,
    Message,
    ProtocolError,
    ProtocolFeature,
    Request,
    VringAddr,
    encode_config_reply,
    encode_reply,
    encode_u64_reply,
    parse_config,
    parse_mem_table,
    parse_u64,
    parse_vring_addr,
    parse_vring_file,
    parse_vring_state,
)
from backend.virtqueue import F_RING_EVENT_IDX

MAX_QUEUE_SIZE = 32768
OFFERED_PROTOCOL_FEATURES = ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG
# Requests whose reply is their answer; REPLY_ACK never adds an ack to these.
ANSWERED_REQUESTS = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_QUEUE_NUM,
        Request.GET_VRING_BASE,
        Request.GET_CONFIG,
    }
)


@dataclass
class RingSetup:
    """What the front-end has told us about one vring so far."""

    num: int = 0
    base: int = 0
    addr: VringAddr | None = None
    kick: int | None = None
    call: int | None = None
    err: int | None = None
    enabled: bool = False
    started: bool = False


class SessionHost(Protocol):
    """The device side that a session drives."""

    device_features: int
    num_queues: int

    def read_config(self, offset: int, size: int) -> bytes: ...

    def set_features(self, features: int) -> None:
        """The features the front-end acked, before any ring runs; ValueError refuses them."""


    def write_config(self, offset: int, data: bytes) -> None: ...

    def set_memory(self, regions: tuple[MemRegion, ...], fds: tuple[int, ...]) -> None:
        """Map the regions, taking ownership of the FDs; raise ValueError to refuse."""


    def start_ring(self, index: int, setup: RingSetup, event_idx: bool) -> None:
        """Begin serving a ring; raise ValueError when its addresses cannot be used."""


    def stop_ring(self, index: int) -> int: ...

    def ring_enabled(self, index: int, enabled: bool) -> None: ...

    def call_fd_changed(self, index: int, fd: int | None) -> None: ...

    def accept_eventfd(self, fd: int) -> None:
        """Raise ValueError unless `fd` is an eventfd (then usable without blocking)."""


    def close_fd(self, fd: int) -> None: ...


@dataclass
class Session:
    host: SessionHost
    features: int = 0
    protocol_features: int = 0
    protocol_features_set: bool = False  # SET_PROTOCOL_FEATURES has been received
    owner: bool = False
    memory_set: bool = False
    rings: list[RingSetup] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rings = [RingSetup() for _ in range(self.host.num_queues)]

    @property
    def offered_features(self) -> int:
        return self.host.device_features | F_PROTOCOL_FEATURES

    def handle(self, msg: Message) -> tuple[bytes, str | None]:
        """Apply one message; return (reply bytes, reason it failed or None).

        Raises ProtocolError when the failure cannot be reported to the front-end, in which
        case the caller closes the connection.
        """
        keep: set[int] = set()
        try:
            reply = self._dispatch(msg, keep)
        except ProtocolError as exc:
            if msg.need_reply and msg.request not in ANSWERED_REQUESTS:
                return encode_u64_reply(msg.request, 1), str(exc)
            raise
        finally:
            for fd in msg.fds:
                if fd not in keep:
                    self.host.close_fd(fd)
        if msg.need_reply and msg.request not in ANSWERED_REQUESTS:
            reply = encode_u64_reply(msg.request, 0)
        return reply, None

    def close(self) -> None:
        """Stop every ring and release the FDs the session holds (connection gone)."""
        for index in range(len(self.rings)):
            self._reset_ring(index)

    def _dispatch(self, msg: Message, keep: set[int]) -> bytes:
        try:
            request = Request(msg.request)
        except ValueError:
            raise ProtocolError(f"unknown request {msg.request}") from None
        handler = _HANDLERS.get(request)
        if handler is None:
            raise ProtocolError(f"unsupported request {request.name}")
        if msg.fds and request not in _FD_REQUESTS:
            raise ProtocolError(f"{request.name} carries {len(msg.fds)} unexpected FDs")
        return handler(self, msg, keep)

    # --- feature negotiation -------------------------------------------------------------

    def _get_features(self, msg: Message, keep: set[int]) -> bytes:
        _no_payload(msg)
        return encode_u64_reply(msg.request, self.offered_features)

    def _set_features(self, msg: Message, keep: set[int]) -> bytes:
        features = parse_u64(msg.payload)
        if features & ~self.offered_features:
            raise ProtocolError(f"features {features & ~self.offered_features:#x} not offered")
        if any(r.started for r in self.rings) and features != self.features:
            raise ProtocolError("features changed while a ring is running")
        try:
            self.host.set_features(features)
        except ValueError as exc:
            raise ProtocolError(f"features {features:#x} refused: {exc}") from None
        self.features = features
        return b""

    @property
    def offered_protocol_features(self) -> int:
        # virtio-net's config space is QEMU's (it warns about a back-end offering CONFIG).
        return int(getattr(self.host, "offered_protocol_features", OFFERED_PROTOCOL_FEATURES))

    def _get_protocol_features(self, msg: Message, keep: set[int]) -> bytes:
        _no_payload(msg)
        return encode_u64_reply(msg.request, self.offered_protocol_features)

    def _set_protocol_features(self, msg: Message, keep: set[int]) -> bytes:
        features = parse_u64(msg.payload)
        if features & ~self.offered_protocol_features:
            raise ProtocolError(f"protocol features {features:#x} not offered")
        self.protocol_features = features
        self.protocol_features_set = True
        return b""

    def _get_queue_num(self, msg: Message, keep: set[int]) -> bytes:
        _no_payload(msg)
        # virtio-net counts queue pairs here (QEMU compares it with -netdev queues=N).
        return encode_u64_reply(msg.request, getattr(self.host, "vhost_queue_num",
                                                     self.host.num_queues))

    def _set_owner(self, msg: Message, keep: set[int]) -> bytes:
        _no_payload(msg)
        self.owner = True
        return b""

    def _reset_owner(self, msg: Message, keep: set[int]) -> bytes:
        _no_payload(msg)
        self.close()
        self.features = 0
        self.protocol_features = 0
        self.protocol_features_set = False
        self.owner = False
        self.memory_set = False
        return b""

    # --- memory ----------------------------------------------------------------------------

    def _set_mem_table(self, msg: Message, keep: set[int]) -> bytes:
        regions = parse_mem_table(msg.payload, len(msg.fds))
        # The host owns the FDs from here: it maps them and closes them, refused or not.
        keep.update(msg.fds)
        try:
            self.host.set_memory(regions, msg.fds)
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None  # the previous table stays in force
        self.memory_set = True
        return b""

    # --- vrings ----------------------------------------------------------------------------

    def _ring(self, index: int) -> RingSetup:
        if index >= len(self.rings):
            raise ProtocolError(f"vring {index} does not exist (device has {len(self.rings)})")
        return self.rings[index]

    def _stopped_ring(self, index: int, what: str) -> RingSetup:
        ring = self._ring(index)
        if ring.started:
            raise ProtocolError(f"{what} for vring {index} while it is running")
        return ring

    def _set_vring_num(self, msg: Message, keep: set[int]) -> bytes:
        state = parse_vring_state(msg.payload)
        ring = self._stopped_ring(state.index, "SET_VRING_NUM")
        num = state.num
        if num == 0 or num > MAX_QUEUE_SIZE or num & (num - 1):
            raise ProtocolError(f"vring {state.index} size {num} is not a power of 2 <= 32768")
        ring.num = num
        return b""

    def _set_vring_base(self, msg: Message, keep: set[int]) -> bytes:
        state = parse_vring_state(msg.payload)
        ring = self._stopped_ring(state.index, "SET_VRING_BASE")
        if state.num > 0xFFFF:
            raise ProtocolError(f"vring {state.index} base {state.num} exceeds 16 bits")
        ring.base = state.num
        return b""

    def _set_vring_addr(self, msg: Message, keep: set[int]) -> bytes:
        addr = parse_vring_addr(msg.payload)
        ring = self._stopped_ring(addr.index, "SET_VRING_ADDR")
        if addr.flags:
            raise ProtocolError(f"vring {addr.index} address flags {addr.flags:#x} (logging)")
        ring.addr = addr
        return b""

    def _get_vring_base(self, msg: Message, keep: set[int]) -> bytes:
        state = parse_vring_state(msg.payload)
        ring = self._ring(state.index)
        if ring.started:
            ring.base = self.host.stop_ring(state.index)
            ring.started = False
        if ring.kick is not None:
            self.host.close_fd(ring.kick)
            ring.kick = None
        return encode_reply(msg.request, _pack_state(state.index, ring.base))

    def _set_vring_kick(self, msg: Message, keep: set[int]) -> bytes:
        vfile = parse_vring_file(msg.payload, msg.fds)
        ring = self._ring(vfile.index)
        if ring.started:
            ring.base = self.host.stop_ring(vfile.index)
            ring.started = False
        self._replace_fd(ring, "kick", vfile.fd, keep)
        if ring.kick is None:
            # Polling mode (no kick FD) is not offered: the ring stays stopped.
            return b""
        if ring.num == 0 or ring.addr is None or not self.memory_set:
            raise ProtocolError(f"vring {vfile.index} kicked before its size/address/memory")
        if not self.protocol_features_negotiated:
            ring.enabled = True
        try:
            self.host.start_ring(vfile.index, ring, self.event_idx)
        except ValueError as exc:
            raise ProtocolError(f"vring {vfile.index} cannot start: {exc}") from None
        ring.started = True
        return b""

    def _set_vring_call(self, msg: Message, keep: set[int]) -> bytes:
        vfile = parse_vring_file(msg.payload, msg.fds)
        ring = self._ring(vfile.index)
        self._replace_fd(ring, "call", vfile.fd, keep)
        self.host.call_fd_changed(vfile.index, ring.call)
        return b""

    def _set_vring_err(self, msg: Message, keep: set[int]) -> bytes:
        vfile = parse_vring_file(msg.payload, msg.fds)
        self._replace_fd(self._ring(vfile.index), "err", vfile.fd, keep)
        return b""

    def _set_vring_enable(self, msg: Message, keep: set[int]) -> bytes:
        state = parse_vring_state(msg.payload)
        # QEMU's vhost-user-net disables its rings right after GET_FEATURES and protocol
        # negotiation, before SET_FEATURES acks VHOST_USER_F_PROTOCOL_FEATURES.
        if not (self.protocol_features_negotiated or self.protocol_features_set):
            raise ProtocolError("SET_VRING_ENABLE without protocol features")
        if state.num not in (0, 1):
            raise ProtocolError(f"vring {state.index} enable value {state.num} is not 0 or 1")
        ring = self._ring(state.index)
        ring.enabled = bool(state.num)
        self.host.ring_enabled(state.index, ring.enabled)
        return b""

    # --- config space ------------------------------------------------------------------------

    def _get_config(self, msg: Message, keep: set[int]) -> bytes:
        self._require_protocol(ProtocolFeature.CONFIG, "GET_CONFIG")
        req = parse_config(msg.payload, with_data=False)
        return encode_config_reply(msg.request, req, self.host.read_config(req.offset, req.size))

    def _set_config(self, msg: Message, keep: set[int]) -> bytes:
        self._require_protocol(ProtocolFeature.CONFIG, "SET_CONFIG")
        req: ConfigRequest = parse_config(msg.payload, with_data=True)
        try:
            self.host.write_config(req.offset, req.data)
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        return b""

    # --- helpers ---------------------------------------------------------------------------

    @property
    def protocol_features_negotiated(self) -> bool:
        return bool(self.features & F_PROTOCOL_FEATURES)

    @property
    def event_idx(self) -> bool:
        return bool(self.features & F_RING_EVENT_IDX)

    def _require_protocol(self, feature: ProtocolFeature, what: str) -> None:
        if not self.protocol_features & feature:
            raise ProtocolError(f"{what} without the {feature.name} protocol feature")

    def _replace_fd(self, ring: RingSetup, slot: str, fd: int | None, keep: set[int]) -> None:
        if fd is not None:
            try:
                self.host.accept_eventfd(fd)
            except (ValueError, OSError) as exc:
                raise ProtocolError(f"vring {slot} FD refused: {exc}") from None
        old = getattr(ring, slot)
        if old is not None:
            self.host.close_fd(old)
        setattr(ring, slot, fd)
        if fd is not None:
            keep.add(fd)

    def _reset_ring(self, index: int) -> None:
        ring = self.rings[index]
        if ring.started:
            self.host.stop_ring(index)
        if ring.call is not None:
            # The host signals this FD; tell it first, so it never holds a closed FD number.
            self.host.call_fd_changed(index, None)
        for fd in (ring.kick, ring.call, ring.err):
            if fd is not None:
                self.host.close_fd(fd)
        self.rings[index] = RingSetup()


def _no_payload(msg: Message) -> None:
    # QEMU sends some payload-less requests with an 8-byte zero payload; tolerate up to u64.
    if len(msg.payload) not in (0, 8):
        raise ProtocolError(f"{msg.request_name()} carries a {len(msg.payload)}-byte payload")


def _pack_state(index: int, num: int) -> bytes:
    return index.to_bytes(4, "little") + num.to_bytes(4, "little")


_FD_REQUESTS = frozenset(
    {Request.SET_MEM_TABLE, Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR}
)

_HANDLERS = {
    Request.GET_FEATURES: Session._get_features,
    Request.SET_FEATURES: Session._set_features,
    Request.GET_PROTOCOL_FEATURES: Session._get_protocol_features,
    Request.SET_PROTOCOL_FEATURES: Session._set_protocol_features,
    Request.GET_QUEUE_NUM: Session._get_queue_num,
    Request.SET_OWNER: Session._set_owner,
    Request.RESET_OWNER: Session._reset_owner,
    Request.SET_MEM_TABLE: Session._set_mem_table,
    Request.SET_VRING_NUM: Session._set_vring_num,
    Request.SET_VRING_BASE: Session._set_vring_base,
    Request.SET_VRING_ADDR: Session._set_vring_addr,
    Request.GET_VRING_BASE: Session._get_vring_base,
    Request.SET_VRING_KICK: Session._set_vring_kick,
    Request.SET_VRING_CALL: Session._set_vring_call,
    Request.SET_VRING_ERR: Session._set_vring_err,
    Request.SET_VRING_ENABLE: Session._set_vring_enable,
    Request.GET_CONFIG: Session._get_config,
    Request.SET_CONFIG: Session._set_config,
}
