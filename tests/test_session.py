"""Unit tests for the per-connection vhost-user state machine (backend/session.py)."""

from __future__ import annotations

import itertools
import struct
from collections import Counter
from dataclasses import dataclass, field

import pytest

from backend.session import OFFERED_PROTOCOL_FEATURES, RingSetup, Session
from backend.vhost_user import (
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    VERSION,
    MemRegion,
    Message,
    ProtocolError,
    ProtocolFeature,
    Request,
)

U64 = struct.Struct("<Q")
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32
DEVICE_FEATURES = F_VERSION_1 | F_EVENT_IDX | (1 << 28)
CONFIG_SPACE = bytes(range(60))
MiB = 1 << 20


@dataclass
class FakeHost:
    """Records what the session asks of the device; hands out fake FD numbers."""

    device_features: int = DEVICE_FEATURES
    num_queues: int = 2
    calls: list[tuple] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)
    refuse_memory: bool = False
    refuse_start: bool = False
    refuse_features: bool = False
    not_eventfds: set[int] = field(default_factory=set)
    stop_base: int = 0
    written_config: list[tuple[int, bytes]] = field(default_factory=list)
    _fds: itertools.count = field(default_factory=lambda: itertools.count(100))

    def fd(self) -> int:
        return next(self._fds)

    def read_config(self, offset: int, size: int) -> bytes:
        self.calls.append(("read_config", offset, size))
        return CONFIG_SPACE.ljust(offset + size, b"\0")[offset : offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        self.calls.append(("write_config", offset, data))
        raise ValueError("config space is read-only")

    def set_features(self, features: int) -> None:
        self.calls.append(("set_features", features))
        if self.refuse_features:
            raise ValueError("tap refused offloads")

    def set_memory(self, regions: tuple[MemRegion, ...], fds: tuple[int, ...]) -> None:
        self.calls.append(("set_memory", regions, fds))
        # The host owns the FDs: it closes them whether or not it accepts the table.
        self.closed.extend(fds)
        if self.refuse_memory:
            raise ValueError("memory FD is not sealed")

    def start_ring(self, index: int, setup: RingSetup, event_idx: bool) -> None:
        self.calls.append(("start_ring", index, setup.enabled, setup.base, event_idx))
        if self.refuse_start:
            raise ValueError("ring outside guest memory")

    def stop_ring(self, index: int) -> int:
        self.calls.append(("stop_ring", index))
        return self.stop_base

    def ring_enabled(self, index: int, enabled: bool) -> None:
        self.calls.append(("ring_enabled", index, enabled))

    def call_fd_changed(self, index: int, fd: int | None) -> None:
        self.calls.append(("call_fd_changed", index, fd))

    def accept_eventfd(self, fd: int) -> None:
        if fd in self.not_eventfds:
            raise ValueError("the FD is not an eventfd")

    def close_fd(self, fd: int) -> None:
        self.closed.append(fd)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


def msg(request: int, payload: bytes = b"", fds: tuple[int, ...] = (), *, need_reply=False):
    return Message(request, VERSION | (FLAG_NEED_REPLY if need_reply else 0), payload, fds)


def u64(value: int) -> bytes:
    return U64.pack(value)


def state(index: int, num: int) -> bytes:
    return struct.pack("<II", index, num)


def addr(index: int, flags: int = 0) -> bytes:
    return struct.pack("<IIQQQQ", index, flags, 0x1000, 0x3000, 0x2000, 0)


def mem_table(nregions: int = 1) -> bytes:
    body = b"".join(
        struct.pack("<QQQQ", i * MiB, MiB, 0x7F00_0000_0000 + i * MiB, 0) for i in range(nregions)
    )
    return struct.pack("<II", nregions, 0) + body


def reply_header(raw: bytes) -> tuple[int, int, int]:
    return struct.unpack_from("<III", raw)


def ack_value(raw: bytes) -> int:
    _request, flags, size = reply_header(raw)
    assert flags == VERSION | FLAG_REPLY
    assert size == 8
    return U64.unpack_from(raw, HEADER_SIZE)[0]


@pytest.fixture
def host() -> FakeHost:
    return FakeHost()


@pytest.fixture
def session(host: FakeHost) -> Session:
    return Session(host)


def ok(session: Session, message: Message) -> bytes:
    reply, failure = session.handle(message)
    assert failure is None
    return reply


def negotiate(session: Session, *, protocol: bool, event_idx: bool = False) -> None:
    features = F_VERSION_1 | (F_PROTOCOL_FEATURES if protocol else 0)
    features |= F_EVENT_IDX if event_idx else 0
    ok(session, msg(Request.SET_OWNER))
    ok(session, msg(Request.SET_FEATURES, u64(features)))
    if protocol:
        ok(session, msg(Request.SET_PROTOCOL_FEATURES, u64(int(OFFERED_PROTOCOL_FEATURES))))


def prepare_ring(session: Session, host: FakeHost, index: int = 0) -> None:
    if not session.memory_set:
        ok(session, msg(Request.SET_MEM_TABLE, mem_table(), (host.fd(),)))
    ok(session, msg(Request.SET_VRING_NUM, state(index, 256)))
    ok(session, msg(Request.SET_VRING_BASE, state(index, 7)))
    ok(session, msg(Request.SET_VRING_ADDR, addr(index)))


def start_ring(session: Session, host: FakeHost, index: int = 0) -> int:
    prepare_ring(session, host, index)
    kick = host.fd()
    ok(session, msg(Request.SET_VRING_KICK, u64(index), (kick,)))
    return kick


# --- feature negotiation ----------------------------------------------------------------------


def test_get_features_offers_device_features_plus_protocol_features(session):
    reply = ok(session, msg(Request.GET_FEATURES))
    assert reply_header(reply)[0] == Request.GET_FEATURES
    assert ack_value(reply) == DEVICE_FEATURES | F_PROTOCOL_FEATURES


def test_get_features_tolerates_an_eight_byte_zero_payload(session):
    assert ack_value(ok(session, msg(Request.GET_FEATURES, u64(0)))) & F_PROTOCOL_FEATURES


def test_get_features_with_odd_payload_raises_so_the_server_closes(session):
    with pytest.raises(ProtocolError, match="4-byte payload"):
        session.handle(msg(Request.GET_FEATURES, b"\0" * 4, need_reply=True))


def test_set_features_records_accepted_features(session):
    assert ok(session, msg(Request.SET_FEATURES, u64(F_VERSION_1 | F_EVENT_IDX))) == b""
    assert session.features == F_VERSION_1 | F_EVENT_IDX
    assert session.event_idx
    assert not session.protocol_features_negotiated


def test_set_features_not_offered_is_a_protocol_error(session):
    with pytest.raises(ProtocolError, match="not offered"):
        session.handle(msg(Request.SET_FEATURES, u64(F_VERSION_1 | (1 << 5))))
    assert session.features == 0


def test_set_features_changing_while_a_ring_runs_is_a_protocol_error(session, host):
    negotiate(session, protocol=False)
    start_ring(session, host)
    # Re-sending the same features is allowed ...
    ok(session, msg(Request.SET_FEATURES, u64(F_VERSION_1)))
    # ... changing them is not.
    with pytest.raises(ProtocolError, match="while a ring is running"):
        session.handle(msg(Request.SET_FEATURES, u64(F_VERSION_1 | F_EVENT_IDX)))


def test_get_protocol_features_offers_mq_reply_ack_and_config(session):
    value = ack_value(ok(session, msg(Request.GET_PROTOCOL_FEATURES)))
    assert value == ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG


def test_set_protocol_features_not_offered_is_a_protocol_error(session):
    with pytest.raises(ProtocolError, match=r"protocol features .* not offered"):
        session.handle(msg(Request.SET_PROTOCOL_FEATURES, u64(ProtocolFeature.LOG_SHMFD)))
    assert session.protocol_features == 0


def test_get_queue_num_answers_the_host_queue_count(session):
    assert ack_value(ok(session, msg(Request.GET_QUEUE_NUM))) == 2


def test_set_owner_with_payload_is_a_protocol_error(session):
    with pytest.raises(ProtocolError, match="SET_OWNER carries a 3-byte payload"):
        session.handle(msg(Request.SET_OWNER, b"abc"))
    ok(session, msg(Request.SET_OWNER))
    assert session.owner


def test_unknown_request_is_a_protocol_error(session):
    with pytest.raises(ProtocolError, match="unknown request 999"):
        session.handle(msg(999))


def test_unsupported_request_is_a_protocol_error(session):
    with pytest.raises(ProtocolError, match="unsupported request SET_LOG_BASE"):
        session.handle(msg(Request.SET_LOG_BASE, u64(0)))


# --- REPLY_ACK --------------------------------------------------------------------------------


def test_need_reply_on_success_acks_with_zero(session):
    reply, failure = session.handle(msg(Request.SET_OWNER, need_reply=True))
    assert failure is None
    assert reply_header(reply)[0] == Request.SET_OWNER
    assert ack_value(reply) == 0


def test_need_reply_on_malformed_message_acks_failure_instead_of_raising(session):
    reply, failure = session.handle(msg(Request.SET_VRING_NUM, b"\0" * 3, need_reply=True))
    assert ack_value(reply) != 0
    assert reply_header(reply)[0] == Request.SET_VRING_NUM
    assert "vring state payload" in failure


def test_need_reply_on_unknown_request_acks_failure(session):
    reply, failure = session.handle(msg(777, need_reply=True))
    assert ack_value(reply) == 1
    assert "unknown request" in failure


def test_malformed_message_without_need_reply_raises(session):
    with pytest.raises(ProtocolError):
        session.handle(msg(Request.SET_VRING_NUM, b"\0" * 3))


@pytest.mark.parametrize(
    "request_",
    [Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM],
)
def test_malformed_get_request_raises_even_with_need_reply(session, request_):
    with pytest.raises(ProtocolError):
        session.handle(msg(request_, b"\0" * 5, need_reply=True))


def test_malformed_get_vring_base_raises_even_with_need_reply(session):
    with pytest.raises(ProtocolError, match="vring 9 does not exist"):
        session.handle(msg(Request.GET_VRING_BASE, state(9, 0), need_reply=True))


def test_malformed_get_config_raises_even_with_need_reply(session):
    negotiate(session, protocol=True)
    with pytest.raises(ProtocolError, match="outside"):
        session.handle(msg(Request.GET_CONFIG, struct.pack("<III", 0, 0, 0), need_reply=True))


def test_get_request_with_need_reply_gets_its_answer_not_an_ack(session):
    reply = ok(session, msg(Request.GET_QUEUE_NUM, need_reply=True))
    assert ack_value(reply) == 2


# --- memory table -----------------------------------------------------------------------------


def test_set_mem_table_hands_regions_and_fds_to_the_host(session, host):
    fds = (host.fd(), host.fd())
    ok(session, msg(Request.SET_MEM_TABLE, mem_table(2), fds))
    name, regions, given = host.calls[-1]
    assert name == "set_memory"
    assert given == fds
    assert [r.guest_phys_addr for r in regions] == [0, MiB]
    assert session.memory_set
    # The session closed nothing itself: the host owns memory FDs.
    assert Counter(host.closed) == Counter(fds)


def test_set_mem_table_malformed_closes_its_fds_and_never_reaches_the_host(session, host):
    fds = (host.fd(), host.fd())
    with pytest.raises(ProtocolError, match="1 regions but 2 FDs"):
        session.handle(msg(Request.SET_MEM_TABLE, mem_table(1), fds))
    assert "set_memory" not in host.names()
    assert sorted(host.closed) == sorted(fds)
    assert not session.memory_set


def test_set_mem_table_refused_by_host_is_a_protocol_error_and_keeps_the_old_table(session,
                                                                                   host):
    ok(session, msg(Request.SET_MEM_TABLE, mem_table(), (host.fd(),)))
    host.refuse_memory = True
    fd = host.fd()
    reply, failure = session.handle(msg(Request.SET_MEM_TABLE, mem_table(), (fd,),
                                        need_reply=True))
    assert ack_value(reply) == 1
    assert "not sealed" in failure
    assert session.memory_set  # the previous table is still in force
    assert host.closed.count(fd) == 1


# --- vring setup ------------------------------------------------------------------------------


@pytest.mark.parametrize("num", [0, 3, 100, 65536])
def test_vring_num_not_a_power_of_two_up_to_32768_is_a_protocol_error(session, num):
    with pytest.raises(ProtocolError, match="not a power of 2"):
        session.handle(msg(Request.SET_VRING_NUM, state(0, num)))


@pytest.mark.parametrize("num", [1, 256, 32768])
def test_vring_num_power_of_two_is_recorded(session, num):
    ok(session, msg(Request.SET_VRING_NUM, state(1, num)))
    assert session.rings[1].num == num


def test_vring_index_beyond_queue_count_is_a_protocol_error(session):
    with pytest.raises(ProtocolError, match="vring 2 does not exist"):
        session.handle(msg(Request.SET_VRING_NUM, state(2, 256)))


def test_vring_base_over_sixteen_bits_is_a_protocol_error(session):
    with pytest.raises(ProtocolError, match="exceeds 16 bits"):
        session.handle(msg(Request.SET_VRING_BASE, state(0, 0x10000)))
    ok(session, msg(Request.SET_VRING_BASE, state(0, 0xFFFF)))
    assert session.rings[0].base == 0xFFFF


def test_vring_addr_is_recorded(session):
    ok(session, msg(Request.SET_VRING_ADDR, addr(1)))
    ring_addr = session.rings[1].addr
    assert (ring_addr.desc_user_addr, ring_addr.avail_user_addr, ring_addr.used_user_addr) == (
        0x1000, 0x2000, 0x3000)


def test_vring_addr_with_log_flag_is_a_protocol_error(session):
    with pytest.raises(ProtocolError, match="address flags 0x1"):
        session.handle(msg(Request.SET_VRING_ADDR, addr(0, flags=1)))
    assert session.rings[0].addr is None


@pytest.mark.parametrize(
    ("request_", "payload"),
    [
        (Request.SET_VRING_NUM, state(0, 128)),
        (Request.SET_VRING_BASE, state(0, 1)),
        (Request.SET_VRING_ADDR, addr(0)),
    ],
)
def test_changing_a_running_ring_is_a_protocol_error(session, host, request_, payload):
    negotiate(session, protocol=False)
    start_ring(session, host)
    with pytest.raises(ProtocolError, match="while it is running"):
        session.handle(msg(request_, payload))


def test_kick_starts_the_ring_with_its_base_and_event_idx(session, host):
    negotiate(session, protocol=False, event_idx=True)
    kick = start_ring(session, host)
    assert host.calls[-1] == ("start_ring", 0, True, 7, True)
    assert session.rings[0].started
    assert session.rings[0].kick == kick
    assert kick not in host.closed


@pytest.mark.parametrize("missing", ["memory", "num", "addr"])
def test_kick_before_size_address_or_memory_is_a_protocol_error(session, host, missing):
    negotiate(session, protocol=False)
    if missing != "memory":
        ok(session, msg(Request.SET_MEM_TABLE, mem_table(), (host.fd(),)))
    if missing != "num":
        ok(session, msg(Request.SET_VRING_NUM, state(0, 256)))
    if missing != "addr":
        ok(session, msg(Request.SET_VRING_ADDR, addr(0)))
    kick = host.fd()
    with pytest.raises(ProtocolError, match="kicked before"):
        session.handle(msg(Request.SET_VRING_KICK, u64(0), (kick,)))
    assert "start_ring" not in host.names()
    assert not session.rings[0].started
    # The kick FD is held by the ring and released once, on close.
    session.close()
    assert host.closed.count(kick) == 1


def test_kick_refused_by_host_is_a_protocol_error(session, host):
    negotiate(session, protocol=False)
    host.refuse_start = True
    with pytest.raises(ProtocolError, match="cannot start: ring outside guest memory"):
        start_ring(session, host)
    assert not session.rings[0].started


def test_kick_with_nofd_bit_leaves_the_ring_stopped(session, host):
    negotiate(session, protocol=False)
    prepare_ring(session, host)
    ok(session, msg(Request.SET_VRING_KICK, u64(0x100)))
    assert "start_ring" not in host.names()
    assert session.rings[0].kick is None
    assert not session.rings[0].started


def test_kick_on_a_running_ring_restarts_it_and_closes_the_old_fd(session, host):
    negotiate(session, protocol=False)
    old = start_ring(session, host)
    host.stop_base = 42
    new = host.fd()
    ok(session, msg(Request.SET_VRING_KICK, u64(0), (new,)))
    assert host.names()[-2:] == ["stop_ring", "start_ring"]
    assert host.calls[-1][3] == 42  # restarted from the base the host stopped at
    assert host.closed.count(old) == 1
    assert new not in host.closed


def test_kick_for_a_missing_ring_closes_the_fd(session, host):
    fd = host.fd()
    with pytest.raises(ProtocolError, match="vring 5 does not exist"):
        session.handle(msg(Request.SET_VRING_KICK, u64(5), (fd,)))
    assert host.closed == [fd]


def test_kick_with_nofd_bit_but_an_fd_closes_the_fd(session, host):
    fd = host.fd()
    with pytest.raises(ProtocolError, match="no FD but FDs were attached"):
        session.handle(msg(Request.SET_VRING_KICK, u64(0x100), (fd,)))
    assert host.closed == [fd]


def test_kick_without_protocol_features_starts_enabled(session, host):
    negotiate(session, protocol=False)
    start_ring(session, host)
    assert host.calls[-1][:3] == ("start_ring", 0, True)


def test_ring_starts_disabled_when_protocol_features_are_negotiated(session, host):
    negotiate(session, protocol=True)
    start_ring(session, host)
    assert host.calls[-1][:3] == ("start_ring", 0, False)
    assert not session.rings[0].enabled


def test_set_vring_enable_one_enables_the_ring_on_the_host(session, host):
    negotiate(session, protocol=True)
    start_ring(session, host)
    ok(session, msg(Request.SET_VRING_ENABLE, state(0, 0)))
    assert host.calls[-1] == ("ring_enabled", 0, False)
    assert not session.rings[0].enabled
    ok(session, msg(Request.SET_VRING_ENABLE, state(0, 1)))
    assert host.calls[-1] == ("ring_enabled", 0, True)
    assert session.rings[0].enabled


def test_set_vring_enable_without_protocol_features_is_a_protocol_error(session):
    negotiate(session, protocol=False)
    with pytest.raises(ProtocolError, match="without protocol features"):
        session.handle(msg(Request.SET_VRING_ENABLE, state(0, 1)))


def test_set_vring_enable_value_other_than_zero_or_one_is_a_protocol_error(session):
    negotiate(session, protocol=True)
    with pytest.raises(ProtocolError, match="enable value 2"):
        session.handle(msg(Request.SET_VRING_ENABLE, state(0, 2)))


def test_set_vring_enable_for_missing_ring_is_a_protocol_error(session, host):
    negotiate(session, protocol=True)
    with pytest.raises(ProtocolError, match="vring 3 does not exist"):
        session.handle(msg(Request.SET_VRING_ENABLE, state(3, 1)))
    assert "ring_enabled" not in host.names()


def test_get_vring_base_stops_the_ring_and_returns_where_it_stopped(session, host):
    negotiate(session, protocol=False)
    kick = start_ring(session, host)
    host.stop_base = 0x1234
    reply = ok(session, msg(Request.GET_VRING_BASE, state(0, 0)))
    assert reply_header(reply) == (Request.GET_VRING_BASE, VERSION | FLAG_REPLY, 8)
    assert struct.unpack_from("<II", reply, HEADER_SIZE) == (0, 0x1234)
    assert host.calls[-1] == ("stop_ring", 0)
    assert not session.rings[0].started
    assert session.rings[0].kick is None
    assert host.closed.count(kick) == 1


def test_get_vring_base_of_a_stopped_ring_returns_the_base_set(session, host):
    ok(session, msg(Request.SET_VRING_BASE, state(1, 99)))
    reply = ok(session, msg(Request.GET_VRING_BASE, state(1, 0)))
    assert struct.unpack_from("<II", reply, HEADER_SIZE) == (1, 99)
    assert "stop_ring" not in host.names()


def test_ring_can_be_changed_after_get_vring_base(session, host):
    negotiate(session, protocol=False)
    start_ring(session, host)
    ok(session, msg(Request.GET_VRING_BASE, state(0, 0)))
    ok(session, msg(Request.SET_VRING_NUM, state(0, 128)))
    assert session.rings[0].num == 128


def test_call_fd_is_kept_and_reported_to_the_host(session, host):
    fd = host.fd()
    ok(session, msg(Request.SET_VRING_CALL, u64(1), (fd,)))
    assert host.calls[-1] == ("call_fd_changed", 1, fd)
    assert session.rings[1].call == fd
    assert host.closed == []


def test_call_fd_replaced_closes_the_old_one(session, host):
    first, second = host.fd(), host.fd()
    ok(session, msg(Request.SET_VRING_CALL, u64(0), (first,)))
    ok(session, msg(Request.SET_VRING_CALL, u64(0), (second,)))
    assert host.closed == [first]
    assert session.rings[0].call == second


def test_call_with_nofd_bit_clears_and_closes_the_call_fd(session, host):
    fd = host.fd()
    ok(session, msg(Request.SET_VRING_CALL, u64(0), (fd,)))
    ok(session, msg(Request.SET_VRING_CALL, u64(0x100)))
    assert host.calls[-1] == ("call_fd_changed", 0, None)
    assert session.rings[0].call is None
    assert host.closed == [fd]


def test_err_fd_is_kept_and_replaced(session, host):
    first, second = host.fd(), host.fd()
    ok(session, msg(Request.SET_VRING_ERR, u64(1), (first,)))
    ok(session, msg(Request.SET_VRING_ERR, u64(1), (second,)))
    assert session.rings[1].err == second
    assert host.closed == [first]


@pytest.mark.parametrize(
    ("request_", "payload"),
    [
        (Request.SET_OWNER, b""),
        (Request.SET_FEATURES, u64(F_VERSION_1)),
        (Request.SET_VRING_NUM, state(0, 256)),
        (Request.GET_FEATURES, b""),
    ],
)
def test_fds_with_a_message_that_takes_none_are_closed(session, host, request_, payload):
    fds = (host.fd(), host.fd())
    with pytest.raises(ProtocolError, match="2 unexpected FDs"):
        session.handle(msg(request_, payload, fds))
    assert sorted(host.closed) == sorted(fds)


def test_fds_with_a_message_that_takes_none_are_closed_when_acked(session, host):
    fd = host.fd()
    reply, failure = session.handle(msg(Request.SET_OWNER, b"", (fd,), need_reply=True))
    assert ack_value(reply) == 1
    assert "unexpected FDs" in failure
    assert host.closed == [fd]
    assert not session.owner


def test_fds_with_an_unknown_request_are_closed(session, host):
    fd = host.fd()
    with pytest.raises(ProtocolError):
        session.handle(msg(4242, b"", (fd,)))
    assert host.closed == [fd]


# --- config space -----------------------------------------------------------------------------


def test_get_config_reads_the_host_config_space(session, host):
    negotiate(session, protocol=True)
    reply = ok(session, msg(Request.GET_CONFIG, struct.pack("<III", 8, 4, 0) + bytes(4)))
    assert host.calls[-1] == ("read_config", 8, 4)
    assert reply_header(reply) == (Request.GET_CONFIG, VERSION | FLAG_REPLY, 16)
    assert struct.unpack_from("<III", reply, HEADER_SIZE) == (8, 4, 0)
    assert reply[HEADER_SIZE + 12 :] == CONFIG_SPACE[8:12]


def test_get_config_without_config_protocol_feature_is_a_protocol_error(session, host):
    negotiate(session, protocol=False)
    with pytest.raises(ProtocolError, match="without the CONFIG protocol feature"):
        session.handle(msg(Request.GET_CONFIG, struct.pack("<III", 0, 4, 0) + bytes(4)))
    assert "read_config" not in host.names()


def test_set_config_refused_by_host_is_a_protocol_error(session, host):
    negotiate(session, protocol=True)
    reply, failure = session.handle(
        msg(Request.SET_CONFIG, struct.pack("<III", 0, 2, 0) + b"hi", need_reply=True)
    )
    assert host.calls[-1] == ("write_config", 0, b"hi")
    assert ack_value(reply) == 1
    assert "read-only" in failure


def test_set_config_without_config_protocol_feature_is_a_protocol_error(session, host):
    with pytest.raises(ProtocolError, match="SET_CONFIG without the CONFIG"):
        session.handle(msg(Request.SET_CONFIG, struct.pack("<III", 0, 2, 0) + b"hi"))


# --- teardown ---------------------------------------------------------------------------------


def test_close_stops_running_rings_and_closes_every_fd_exactly_once(session, host):
    negotiate(session, protocol=True)
    received: list[int] = []

    def send(request_, index, payload=None):
        fd = host.fd()
        received.append(fd)
        ok(session, msg(request_, payload or u64(index), (fd,)))

    mem_fd = host.fd()
    received.append(mem_fd)
    ok(session, msg(Request.SET_MEM_TABLE, mem_table(), (mem_fd,)))
    for index in (0, 1):
        send(Request.SET_VRING_CALL, index)
        send(Request.SET_VRING_CALL, index)  # replaces (and closes) the first
        send(Request.SET_VRING_ERR, index)
        prepare_ring(session, host, index)
        send(Request.SET_VRING_KICK, index)
    send(Request.SET_VRING_KICK, 0)  # restart ring 0 with a new kick
    ok(session, msg(Request.GET_VRING_BASE, state(1, 0)))  # stops ring 1, closes its kick
    session.close()
    assert Counter(host.closed) == Counter(received)
    assert host.calls.count(("stop_ring", 0)) == 2  # the restart, then close()
    assert host.calls.count(("stop_ring", 1)) == 1  # GET_VRING_BASE only
    assert all(not r.started and r.kick is None for r in session.rings)
    # A second close has nothing left to release.
    session.close()
    assert Counter(host.closed) == Counter(received)


def test_reset_owner_stops_rings_and_forgets_features(session, host):
    negotiate(session, protocol=False)
    kick = start_ring(session, host)
    ok(session, msg(Request.RESET_OWNER))
    assert host.calls[-1] == ("stop_ring", 0)
    assert host.closed.count(kick) == 1
    assert session.features == 0
    assert not session.owner
    assert session.rings[0].num == 0


def test_reset_owner_tells_the_host_the_call_fd_is_gone(session, host):
    negotiate(session, protocol=False)
    call = host.fd()
    ok(session, msg(Request.SET_VRING_CALL, u64(0), (call,)))
    start_ring(session, host)
    ok(session, msg(Request.RESET_OWNER))
    assert ("call_fd_changed", 0, None) in host.calls
    assert host.closed.count(call) == 1
    assert session.rings[0].call is None
    assert host.calls.index(("call_fd_changed", 0, None)) > host.calls.index(("stop_ring", 0))


def test_reset_owner_leaves_the_host_alone_for_a_ring_without_a_call_fd(session, host):
    negotiate(session, protocol=False)
    start_ring(session, host)
    ok(session, msg(Request.RESET_OWNER))
    assert not any(c[0] == "call_fd_changed" for c in host.calls)


@pytest.mark.parametrize("request_type", [Request.SET_VRING_KICK, Request.SET_VRING_CALL,
                                          Request.SET_VRING_ERR])
def test_vring_fd_that_is_not_an_eventfd_is_refused_and_closed(request_type: Request) -> None:
    host = FakeHost()
    session = Session(host)
    fd = host.fd()
    host.not_eventfds.add(fd)
    reply, failure = session.handle(msg(request_type, (0).to_bytes(8, "little"), (fd,),
                                        need_reply=True))
    assert failure is not None and "not an eventfd" in failure
    assert int.from_bytes(reply[12:], "little") != 0
    assert host.closed == [fd]
    ring = session.rings[0]
    assert (ring.kick, ring.call, ring.err) == (None, None, None)


def test_set_vring_enable_after_protocol_negotiation_but_before_set_features_is_accepted(
        session, host):
    """QEMU's vhost-user-net disables its rings right after GET_FEATURES and the protocol
    negotiation, before SET_FEATURES acks VHOST_USER_F_PROTOCOL_FEATURES."""
    ok(session, msg(Request.SET_OWNER))
    ok(session, msg(Request.SET_PROTOCOL_FEATURES, u64(int(OFFERED_PROTOCOL_FEATURES))))
    ok(session, msg(Request.SET_VRING_ENABLE, state(0, 0)))
    assert host.calls[-1] == ("ring_enabled", 0, False)


def test_set_features_refused_by_the_device_is_a_protocol_error(session, host):
    host.refuse_features = True
    with pytest.raises(ProtocolError, match="refused: tap refused offloads"):
        session.handle(msg(Request.SET_FEATURES, u64(F_VERSION_1)))
    assert session.features == 0


def test_set_features_reaches_the_device(session, host):
    ok(session, msg(Request.SET_FEATURES, u64(F_VERSION_1 | F_EVENT_IDX)))
    assert ("set_features", F_VERSION_1 | F_EVENT_IDX) in host.calls


def test_a_device_may_answer_queue_num_and_protocol_features_itself(host):
    host.vhost_queue_num = 1  # type: ignore[attr-defined]  # virtio-net: queue pairs
    host.offered_protocol_features = int(ProtocolFeature.REPLY_ACK)  # type: ignore[attr-defined]
    session = Session(host)
    assert ack_value(ok(session, msg(Request.GET_QUEUE_NUM))) == 1
    assert ack_value(ok(session, msg(Request.GET_PROTOCOL_FEATURES))) == ProtocolFeature.REPLY_ACK
    with pytest.raises(ProtocolError, match="not offered"):
        session.handle(msg(Request.SET_PROTOCOL_FEATURES, u64(int(ProtocolFeature.CONFIG))))
