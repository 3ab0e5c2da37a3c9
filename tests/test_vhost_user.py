"""Unit tests for the vhost-user wire codec (backend/vhost_user.py)."""

from __future__ import annotations

import struct

import pytest

from backend.vhost_user import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_CONFIG_SIZE,
    MAX_FDS_PER_MESSAGE,
    MAX_MEM_REGIONS,
    MAX_PAYLOAD,
    VERSION,
    ConfigRequest,
    MemRegion,
    Message,
    MessageReader,
    ProtocolError,
    Request,
    VringAddr,
    VringFile,
    VringState,
    encode_config_reply,
    encode_reply,
    encode_u64_reply,
    parse_config,
    parse_header,
    parse_mem_table,
    parse_u64,
    parse_vring_addr,
    parse_vring_file,
    parse_vring_state,
    validate_region,
)

U64 = struct.Struct("<Q")
MiB = 1 << 20


def header(request: int, size: int, flags: int = VERSION) -> bytes:
    return struct.pack("<III", request, flags, size)


def message(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    return header(request, len(payload), flags) + payload


def mem_table(regions: list[tuple[int, int, int, int]], *, padded: bool = False) -> bytes:
    body = b"".join(struct.pack("<QQQQ", *r) for r in regions)
    if padded:
        body = body.ljust(MAX_MEM_REGIONS * 32, b"\0")
    return struct.pack("<II", len(regions), 0) + body


def config_payload(offset: int, size: int, flags: int = 0, data: bytes | None = None) -> bytes:
    if data is None:
        data = bytes(size)
    return struct.pack("<III", offset, size, flags) + data


# --- parse_header -----------------------------------------------------------------------------


def test_header_accepted_returns_request_flags_and_size():
    assert parse_header(header(Request.SET_FEATURES, 8)) == (Request.SET_FEATURES, VERSION, 8)


def test_header_with_need_reply_flag_is_accepted():
    flags = VERSION | FLAG_NEED_REPLY
    assert parse_header(header(Request.SET_OWNER, 0, flags)) == (Request.SET_OWNER, flags, 0)


def test_header_ignores_bytes_after_the_first_twelve():
    assert parse_header(header(Request.GET_FEATURES, 0) + b"\xff" * 8)[0] == Request.GET_FEATURES


def test_header_payload_of_exactly_the_limit_is_accepted():
    assert parse_header(header(Request.SET_MEM_TABLE, MAX_PAYLOAD))[2] == MAX_PAYLOAD


def test_short_header_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="header is 11 bytes"):
        parse_header(header(Request.GET_FEATURES, 0)[:11])


def test_empty_header_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="header is 0 bytes"):
        parse_header(b"")


@pytest.mark.parametrize("version", [0, 2, 3])
def test_header_with_unsupported_version_is_a_protocol_error(version):
    with pytest.raises(ProtocolError, match="unsupported protocol version"):
        parse_header(header(Request.GET_FEATURES, 0, version))


@pytest.mark.parametrize("extra", [0x10, 0x100, 0x8000_0000])
def test_header_with_unknown_flags_is_a_protocol_error(extra):
    with pytest.raises(ProtocolError, match="unknown header flags"):
        parse_header(header(Request.GET_FEATURES, 0, VERSION | extra))


def test_header_marked_as_reply_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="marked as a reply"):
        parse_header(header(Request.GET_FEATURES, 0, VERSION | FLAG_REPLY))


def test_header_payload_over_the_limit_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="exceeds"):
        parse_header(header(Request.SET_MEM_TABLE, MAX_PAYLOAD + 1))


def test_header_payload_of_four_gib_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="exceeds"):
        parse_header(header(Request.SET_MEM_TABLE, 0xFFFF_FFFF))


# --- replies ----------------------------------------------------------------------------------


def test_encode_reply_sets_version_and_reply_flag_and_size():
    raw = encode_reply(Request.GET_VRING_BASE, b"abcdefgh")
    assert struct.unpack_from("<III", raw) == (Request.GET_VRING_BASE, VERSION | FLAG_REPLY, 8)
    assert raw[HEADER_SIZE:] == b"abcdefgh"


def test_encode_u64_reply_packs_little_endian_value():
    raw = encode_u64_reply(Request.GET_FEATURES, 0x1122_3344_5566_7788)
    assert len(raw) == HEADER_SIZE + 8
    assert U64.unpack_from(raw, HEADER_SIZE)[0] == 0x1122_3344_5566_7788


def test_encode_config_reply_echoes_offset_flags_and_data_length():
    req = ConfigRequest(offset=4, size=8, flags=3, data=b"")
    raw = encode_config_reply(Request.GET_CONFIG, req, b"12345678")
    assert struct.unpack_from("<III", raw) == (Request.GET_CONFIG, VERSION | FLAG_REPLY, 20)
    assert struct.unpack_from("<III", raw, HEADER_SIZE) == (4, 8, 3)
    assert raw[HEADER_SIZE + 12 :] == b"12345678"


# --- fixed-size payloads ----------------------------------------------------------------------


def test_u64_payload_is_decoded_little_endian():
    assert parse_u64(U64.pack(0xDEAD_BEEF_0000_0001)) == 0xDEAD_BEEF_0000_0001


@pytest.mark.parametrize("size", [0, 4, 7, 9, 16])
def test_u64_payload_of_wrong_size_is_a_protocol_error(size):
    with pytest.raises(ProtocolError, match=f"u64 payload is {size} bytes"):
        parse_u64(bytes(size))


def test_vring_state_is_decoded():
    assert parse_vring_state(struct.pack("<II", 3, 256)) == VringState(index=3, num=256)


@pytest.mark.parametrize("size", [0, 4, 7, 9, 12])
def test_vring_state_of_wrong_size_is_a_protocol_error(size):
    with pytest.raises(ProtocolError, match="vring state payload"):
        parse_vring_state(bytes(size))


def test_vring_addr_is_decoded_field_by_field():
    raw = struct.pack("<IIQQQQ", 1, 0, 0x1000, 0x2000, 0x3000, 0x4000)
    assert parse_vring_addr(raw) == VringAddr(
        index=1,
        flags=0,
        desc_user_addr=0x1000,
        used_user_addr=0x2000,
        avail_user_addr=0x3000,
        log_guest_addr=0x4000,
    )


@pytest.mark.parametrize("size", [0, 39, 41])
def test_vring_addr_of_wrong_size_is_a_protocol_error(size):
    with pytest.raises(ProtocolError, match="vring address payload"):
        parse_vring_addr(bytes(size))


# --- parse_vring_file -------------------------------------------------------------------------


def test_vring_file_with_one_fd_returns_index_and_fd():
    assert parse_vring_file(U64.pack(5), (42,)) == VringFile(index=5, fd=42)


def test_vring_file_with_nofd_bit_returns_no_fd():
    assert parse_vring_file(U64.pack(0x100 | 7), ()) == VringFile(index=7, fd=None)


def test_vring_file_index_uses_all_eight_low_bits():
    assert parse_vring_file(U64.pack(0xFF), (9,)).index == 255


@pytest.mark.parametrize("value", [0x200, 0x1_0000_0000, 1 << 63, 0x2FF])
def test_vring_file_with_reserved_bits_is_a_protocol_error(value):
    with pytest.raises(ProtocolError, match="reserved bits"):
        parse_vring_file(U64.pack(value), (3,))


def test_vring_file_nofd_bit_with_an_fd_attached_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="no FD but FDs were attached"):
        parse_vring_file(U64.pack(0x100), (3,))


@pytest.mark.parametrize("fds", [(), (3, 4)])
def test_vring_file_without_exactly_one_fd_is_a_protocol_error(fds):
    with pytest.raises(ProtocolError, match=f"exactly one FD, got {len(fds)}"):
        parse_vring_file(U64.pack(0), fds)


def test_vring_file_payload_of_wrong_size_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="u64 payload is 4 bytes"):
        parse_vring_file(b"\0" * 4, (3,))


# --- parse_mem_table --------------------------------------------------------------------------


def test_mem_table_exact_size_is_decoded():
    payload = mem_table(
        [(0, MiB, 0x7F00_0000_0000, 0), (0x1_0000_0000, 2 * MiB, 0x7F10_0000_0000, 4096)]
    )
    assert parse_mem_table(payload, 2) == (
        MemRegion(0, MiB, 0x7F00_0000_0000, 0),
        MemRegion(0x1_0000_0000, 2 * MiB, 0x7F10_0000_0000, 4096),
    )


def test_mem_table_padded_to_eight_slots_is_accepted():
    payload = mem_table([(0, MiB, 0x10_0000, 0)], padded=True)
    assert len(payload) == 8 + 8 * 32
    assert parse_mem_table(payload, 1) == (MemRegion(0, MiB, 0x10_0000, 0),)


def test_mem_table_of_eight_regions_is_accepted():
    regions = [(i * MiB, MiB, 0x1000_0000 + i * MiB, 0) for i in range(8)]
    assert len(parse_mem_table(mem_table(regions), 8)) == 8


def test_mem_table_adjacent_regions_do_not_overlap():
    payload = mem_table([(0, MiB, 0, 0), (MiB, MiB, MiB, 0)])
    assert len(parse_mem_table(payload, 2)) == 2


def test_mem_table_region_ending_exactly_at_two_pow_64_is_accepted():
    payload = mem_table([((1 << 64) - MiB, MiB, (1 << 64) - MiB, 0)])
    assert parse_mem_table(payload, 1)[0].guest_phys_addr == (1 << 64) - MiB


def test_mem_table_shorter_than_its_head_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="too short"):
        parse_mem_table(b"\x01\0\0\0", 1)


def test_mem_table_with_zero_regions_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="has 0 regions"):
        parse_mem_table(struct.pack("<II", 0, 0), 0)


def test_mem_table_with_more_than_eight_regions_is_a_protocol_error():
    regions = [(i * MiB, MiB, i * MiB, 0) for i in range(9)]
    with pytest.raises(ProtocolError, match="has 9 regions"):
        parse_mem_table(mem_table(regions), 9)


def test_mem_table_with_huge_region_count_is_a_protocol_error():
    with pytest.raises(ProtocolError, match=r"allowed 1\.\.8"):
        parse_mem_table(struct.pack("<II", 0xFFFF_FFFF, 0) + bytes(256), 8)


@pytest.mark.parametrize("delta", [-1, +1, +32])
def test_mem_table_length_disagreeing_with_count_is_a_protocol_error(delta):
    payload = mem_table([(0, MiB, 0, 0)])
    payload = payload[:delta] if delta < 0 else payload + bytes(delta)
    with pytest.raises(ProtocolError, match="memory table of 1 regions"):
        parse_mem_table(payload, 1)


@pytest.mark.parametrize("nfds", [0, 2])
def test_mem_table_region_count_must_match_fds(nfds):
    with pytest.raises(ProtocolError, match=f"but {nfds} FDs"):
        parse_mem_table(mem_table([(0, MiB, 0, 0)]), nfds)


def test_mem_table_zero_size_region_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="zero size"):
        parse_mem_table(mem_table([(0, 0, 0, 0)]), 1)


@pytest.mark.parametrize(
    ("region", "space"),
    [
        (((1 << 64) - 4096, 8192, 0, 0), "guest-physical"),
        ((0, 8192, (1 << 64) - 4096, 0), "front-end virtual"),
        ((0, 8192, 0, (1 << 64) - 4096), "mmap offset"),
    ],
)
def test_mem_table_region_wrapping_past_two_pow_64_is_a_protocol_error(region, space):
    with pytest.raises(ProtocolError, match=f"{space} range wraps"):
        parse_mem_table(mem_table([region]), 1)


def test_validate_region_rejects_wrap_directly():
    with pytest.raises(ProtocolError, match="wraps"):
        validate_region(MemRegion((1 << 64) - 1, 2, 0, 0))


def test_mem_table_overlapping_guest_physical_ranges_is_a_protocol_error():
    payload = mem_table([(0, 2 * MiB, 0, 0), (MiB, MiB, 0x1000_0000, 0)])
    with pytest.raises(ProtocolError, match="overlap in guest-physical"):
        parse_mem_table(payload, 2)


def test_mem_table_regions_sharing_one_byte_overlap():
    payload = mem_table([(MiB, MiB, 0, 0), (0, MiB + 1, 0x1000_0000, 0)])
    with pytest.raises(ProtocolError, match="overlap in guest-physical"):
        parse_mem_table(payload, 2)
    payload = mem_table([(0, MiB, MiB - 1, 0), (0x1000_0000, MiB, 2 * MiB - 2, 0)])
    with pytest.raises(ProtocolError, match="overlap in front-end virtual"):
        parse_mem_table(payload, 2)


def test_mem_table_region_nested_in_another_is_a_protocol_error():
    payload = mem_table(
        [(0, 8 * MiB, 0, 0), (3 * MiB, MiB, 0x1000_0000, 0), (9 * MiB, MiB, 0x2000_0000, 0)]
    )
    with pytest.raises(ProtocolError, match="overlap in guest-physical"):
        parse_mem_table(payload, 3)


def test_mem_table_overlapping_front_end_virtual_ranges_is_a_protocol_error():
    payload = mem_table([(0, MiB, 0x1000_0000, 0), (0x1000_0000, MiB, 0x1000_0000 + 4096, 0)])
    with pytest.raises(ProtocolError, match="overlap in front-end virtual"):
        parse_mem_table(payload, 2)


# --- parse_config -----------------------------------------------------------------------------


def test_config_get_request_is_decoded_without_data():
    assert parse_config(config_payload(8, 4, flags=1), with_data=False) == ConfigRequest(
        offset=8, size=4, flags=1, data=b""
    )


def test_config_set_request_keeps_its_data():
    req = parse_config(config_payload(0, 4, data=b"wxyz"), with_data=True)
    assert (req.offset, req.size, req.data) == (0, 4, b"wxyz")


def test_config_access_of_whole_space_is_accepted():
    assert parse_config(config_payload(0, MAX_CONFIG_SIZE), with_data=False).size == 256


def test_config_access_ending_at_the_last_byte_is_accepted():
    assert parse_config(config_payload(255, 1), with_data=False).offset == 255


def test_config_shorter_than_its_head_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="config payload is 11 bytes, too short"):
        parse_config(bytes(11), with_data=False)


def test_config_of_zero_size_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="outside"):
        parse_config(config_payload(0, 0), with_data=False)


def test_config_larger_than_config_space_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="outside"):
        parse_config(config_payload(0, MAX_CONFIG_SIZE + 1), with_data=False)


@pytest.mark.parametrize(("offset", "size"), [(255, 2), (256, 1), (0xFFFF_FFFF, 1)])
def test_config_access_past_the_end_is_a_protocol_error(offset, size):
    with pytest.raises(ProtocolError, match="outside"):
        parse_config(config_payload(offset, size), with_data=False)


@pytest.mark.parametrize("extra", [-1, 1])
def test_config_payload_length_disagreeing_with_size_is_a_protocol_error(extra):
    payload = config_payload(0, 8)
    payload = payload[:extra] if extra < 0 else payload + bytes(extra)
    with pytest.raises(ProtocolError, match="config payload is"):
        parse_config(payload, with_data=True)


# --- MessageReader ----------------------------------------------------------------------------


def test_reader_returns_none_until_the_header_is_complete():
    reader = MessageReader()
    raw = message(Request.SET_FEATURES, U64.pack(1))
    reader.feed(raw[: HEADER_SIZE - 1])
    assert reader.next_message() is None
    reader.feed(raw[HEADER_SIZE - 1 :])
    assert reader.next_message() == Message(Request.SET_FEATURES, VERSION, U64.pack(1), ())


def test_reader_returns_none_until_the_payload_is_complete():
    reader = MessageReader()
    raw = message(Request.SET_FEATURES, U64.pack(7))
    reader.feed(raw[:-1])
    assert reader.next_message() is None
    reader.feed(raw[-1:])
    msg = reader.next_message()
    assert msg is not None
    assert parse_u64(msg.payload) == 7
    assert reader.next_message() is None
    assert reader.buffer == bytearray()


def test_reader_splits_two_messages_fed_together():
    reader = MessageReader()
    reader.feed(message(Request.SET_OWNER) + message(Request.GET_FEATURES, flags=VERSION | 8))
    first, second = reader.next_message(), reader.next_message()
    assert first == Message(Request.SET_OWNER, VERSION, b"", ())
    assert second is not None and second.need_reply
    assert second.request == Request.GET_FEATURES
    assert reader.next_message() is None


def test_reader_attaches_fds_to_the_message_they_arrive_with():
    reader = MessageReader()
    raw = message(Request.SET_VRING_KICK, U64.pack(0))
    reader.feed(raw[:5], [11])
    reader.feed(raw[5:])
    assert reader.next_message().fds == (11,)
    reader.feed(message(Request.SET_VRING_NUM, struct.pack("<II", 0, 8)))
    assert reader.next_message().fds == ()


def test_reader_gives_fds_to_the_message_whose_bytes_end_the_chunk():
    # A unix stream recvmsg may return [SET_VRING_NUM][SET_VRING_KICK] with the kick's FD
    # (the kernel only stops *after* the skb carrying FDs). The FD belongs to the kick.
    reader = MessageReader()
    data = message(Request.SET_VRING_NUM, struct.pack("<II", 0, 8)) + message(
        Request.SET_VRING_KICK, U64.pack(0)
    )
    reader.feed(data, [11])
    num, kick = reader.next_message(), reader.next_message()
    assert (num.fds, kick.fds) == ((), (11,))


def test_reader_with_bad_header_is_a_protocol_error():
    reader = MessageReader()
    reader.feed(header(Request.GET_FEATURES, 0, VERSION | FLAG_REPLY))
    with pytest.raises(ProtocolError, match="reply"):
        reader.next_message()


def test_reader_rejects_oversized_payload_before_it_arrives():
    reader = MessageReader()
    reader.feed(header(Request.SET_MEM_TABLE, MAX_PAYLOAD + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        reader.next_message()


def test_reader_with_more_fds_than_any_message_is_a_protocol_error():
    reader = MessageReader()
    reader.feed(b"", list(range(MAX_FDS_PER_MESSAGE)))
    with pytest.raises(ProtocolError, match=f"{MAX_FDS_PER_MESSAGE + 1} FDs"):
        reader.feed(b"", [99])
    # The FDs stay with the reader so the caller can close them all.
    assert sorted(reader.take_fds()) == [*range(MAX_FDS_PER_MESSAGE), 99]


def test_reader_take_fds_returns_and_forgets_pending_fds():
    reader = MessageReader()
    reader.feed(message(Request.SET_VRING_CALL)[:4], [5, 6])
    assert reader.take_fds() == [5, 6]
    assert reader.take_fds() == []


def test_message_request_name_of_unknown_request():
    assert Message(999, VERSION, b"").request_name() == "request 999"
    assert Message(Request.SET_MEM_TABLE, VERSION, b"").request_name() == "SET_MEM_TABLE"
