"""The broker <-> backend channel (broker/fdpass.py): frames, their checks, and real FD passing."""

from __future__ import annotations

import array
import json
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.fdpass import (
    HEADER,
    MAGIC,
    MAX_FDS,
    MAX_FRAME,
    MAX_NET_QUEUES,
    TO_BACKEND,
    TO_BROKER,
    VERSION,
    Frame,
    FrameError,
    Kind,
    decode_frame,
    encode_frame,
    fd_count,
    recv_frame,
    send_frame,
)

ADD_BLK = {"vm": "web1", "disk": 0, "socket": "/run/rf/vms/web1/disk0.sock", "readonly": False,
           "num_queues": 2, "serial": "web1.raw"}
DEVICE = {"vm": "web1", "disk": 0, "socket": "/run/rf/vms/web1/disk0.sock", "connected": True,
          "requests": 12345, "bytes": 50565120, "kicks": 99, "interrupts": 120, "p50_us": 80,
          "p99_us": 310, "p999_us": 900, "throttled_ms": 0}
NIC = {"vm": "web1", "nic": 0, "socket": "/run/rf/vms/web1/nic0.sock", "tap": "rf-web1-0",
       "connected": True, "queues": 2, "tx_frames": 10, "tx_bytes": 6000, "rx_frames": 12,
       "rx_bytes": 9000, "tx_dropped": 1, "rx_dropped": 0, "kicks": 7, "interrupts": 9,
       "drops": [{"reason": "oversized", "count": 1}],
       "pairs": [{"rx_frames": 8, "tx_frames": 6}, {"rx_frames": 4, "tx_frames": 4}]}
ADD_NET = {"vm": "web1", "nic": 0, "socket": "/run/rf/vms/web1/nic0.sock", "tap": "rf-web1-0",
           "mac": "52:54:00:12:34:56", "mtu": 1500, "queues": 1}
SAMPLES: dict[Kind, dict[str, Any]] = {
    Kind.ADD_BLK: ADD_BLK,
    Kind.ADD_NET: ADD_NET,
    Kind.REMOVE_VM: {"vm": "web1"},
    Kind.STATUS: {},
    Kind.STOP: {},
    Kind.SET_QOS: {"vm": "web1", "weight": 2, "priority": "high", "iops_limit": 2000,
                   "bps_limit": 0, "burst_milli": 1500},
    Kind.READY: {"devices": 3},
    Kind.STATUS_REPLY: {"devices": [DEVICE, {**DEVICE, "disk": 1, "connected": False}],
                        "nics": [NIC]},
    Kind.ERROR: {"vm": "web1", "message": "disk0: guest ring is broken"},
}


def raw_frame(kind: int, payload: bytes, *, magic: int = MAGIC, version: int = VERSION,
              length: int | None = None) -> bytes:
    return HEADER.pack(magic, version, kind, len(payload) if length is None else length) + payload


def json_frame(kind: Kind, fields: object) -> bytes:
    return raw_frame(kind, json.dumps(fields).encode())


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    broker, backend = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield broker, backend
    broker.close()
    backend.close()


def send_raw(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


def write_end_is_closed_everywhere(read_fd: int) -> bool:
    """True once no process holds the pipe's write end: a read then sees end of file."""
    os.set_blocking(read_fd, False)
    try:
        return os.read(read_fd, 1) == b""
    except BlockingIOError:
        return False


# --- the codec (pure) -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_round_trips(kind: Kind) -> None:
    data = encode_frame(kind, SAMPLES[kind])
    assert decode_frame(data, fd_count(kind, SAMPLES[kind])) == Frame(kind, SAMPLES[kind])


def test_only_add_blk_and_add_net_carry_fds() -> None:
    assert {kind: fd_count(kind, SAMPLES[kind]) for kind in Kind
            if fd_count(kind, SAMPLES[kind])} == {Kind.ADD_BLK: 2, Kind.ADD_NET: 2}


@pytest.mark.parametrize("queues", [1, 2, MAX_NET_QUEUES])
def test_add_net_carries_one_fd_per_queue_pair_plus_the_socket(queues: int) -> None:
    fields = {**ADD_NET, "queues": queues}
    assert fd_count(Kind.ADD_NET, fields) == 1 + queues <= MAX_FDS
    frame = decode_frame(encode_frame(Kind.ADD_NET, fields), 1 + queues)
    assert frame.fields["queues"] == queues
    with pytest.raises(FrameError, match=f"came with {queues} file descriptors, expected "
                                         f"{queues + 1} for {queues} queues"):
        decode_frame(encode_frame(Kind.ADD_NET, fields), queues)


@pytest.mark.parametrize("queues", [0, MAX_NET_QUEUES + 1])
def test_add_net_with_a_queue_count_out_of_range_is_refused(queues: int) -> None:
    with pytest.raises(FrameError, match=rf"ADD_NET\.queues is {queues}, not from 1 to 8"):
        decode_frame(json_frame(Kind.ADD_NET, {**ADD_NET, "queues": queues}), 1 + queues)
    with pytest.raises(FrameError, match=r"ADD_NET\.queues"):
        encode_frame(Kind.ADD_NET, {**ADD_NET, "queues": queues})


def test_non_ascii_text_round_trips_as_utf8() -> None:
    data = encode_frame(Kind.ERROR, {"vm": "web1", "message": "Größe ≠ 0"})
    assert "Größe ≠ 0".encode() in data
    assert decode_frame(data, 0).fields["message"] == "Größe ≠ 0"


@pytest.mark.parametrize(("data", "nfds", "needle"), [
    (b"", 0, "shorter than its header"),
    (HEADER.pack(MAGIC, VERSION, Kind.STOP, 0)[:-1], 0, "shorter than its header"),
    (raw_frame(Kind.STOP, b"{}", magic=0x1234), 0, "magic 0x1234"),
    (raw_frame(Kind.STOP, b"{}", version=2), 0, "version 2"),
    (raw_frame(Kind.STOP, b"{}", length=3), 0, "says 3 payload bytes but has 2"),
    (raw_frame(Kind.STOP, b"{}", length=1), 0, "says 1 payload bytes but has 2"),
    (raw_frame(99, b"{}"), 0, "kind 99 is unknown"),
    (raw_frame(Kind.STOP, b"{}"), 1, "STOP came with 1 file descriptors, expected 0"),
    (encode_frame(Kind.ADD_BLK, ADD_BLK), 1, "ADD_BLK came with 1 file descriptors, expected 2"),
    (raw_frame(Kind.STOP, b"\xff{}"), 0, "not a UTF-8 JSON object"),
    (raw_frame(Kind.STOP, b"{"), 0, "not a UTF-8 JSON object"),
    (raw_frame(Kind.STOP, b"[]"), 0, "STOP is not a JSON object"),
    (raw_frame(Kind.STOP, b"[" * 100000), 0, "larger than"),
    (raw_frame(Kind.STOP, b"[" * 60000), 0, "not a UTF-8 JSON object"),
    (raw_frame(Kind.REMOVE_VM, b'{"vm":"a","vm":"b"}'), 0, "repeats a key"),
    (raw_frame(Kind.REMOVE_VM, b'{"vm":NaN}'), 0, "REMOVE_VM.vm is not a str"),
    (json_frame(Kind.REMOVE_VM, {}), 0, "REMOVE_VM has fields [], expected ['vm']"),
    (json_frame(Kind.REMOVE_VM, {"vm": "a", "extra": 1}), 0, "has fields ['extra', 'vm']"),
    (json_frame(Kind.REMOVE_VM, {"vm": 1}), 0, "REMOVE_VM.vm is not a str"),
    (json_frame(Kind.ADD_BLK, {**ADD_BLK, "readonly": 0}), 2, "ADD_BLK.readonly is not a bool"),
    (json_frame(Kind.ADD_BLK, {**ADD_BLK, "disk": True}), 2, "ADD_BLK.disk is not an integer"),
    (json_frame(Kind.ADD_BLK, {**ADD_BLK, "disk": -1}), 2, "ADD_BLK.disk is not an integer"),
    (json_frame(Kind.ADD_BLK, {**ADD_BLK, "disk": 1.0}), 2, "ADD_BLK.disk is not an integer"),
    (json_frame(Kind.ADD_BLK, {**ADD_BLK, "num_queues": 1 << 63}), 2, "not an integer"),
    (json_frame(Kind.STATUS_REPLY, {"devices": {}, "nics": []}), 0,
     "STATUS_REPLY.devices is not a list"),
    (json_frame(Kind.STATUS_REPLY, {"devices": [DEVICE, 1], "nics": []}), 0,
     "STATUS_REPLY.devices[1] is not a JSON object"),
    (json_frame(Kind.STATUS_REPLY, {"devices": []}), 0,
     "STATUS_REPLY has fields ['devices'], expected ['devices', 'nics']"),
    (json_frame(Kind.STATUS_REPLY, {"devices": [], "nics": [{**NIC, "drops": [{"x": 1}]}]}),
     0, "STATUS_REPLY.nics[0].drops[0] has fields ['x']"),
    (json_frame(Kind.STATUS_REPLY, {"devices": [], "nics": [{**NIC, "pairs": [{
        "rx_frames": -1, "tx_frames": 0}]}]}), 0,
     "STATUS_REPLY.nics[0].pairs[0].rx_frames is not an integer"),
    (json_frame(Kind.STATUS_REPLY, {"devices": [{**DEVICE, "connected": "yes"}],
                                    "nics": []}), 0,
     "STATUS_REPLY.devices[0].connected is not a bool"),
])
def test_malformed_frames_rejected(data: bytes, nfds: int, needle: str) -> None:
    with pytest.raises(FrameError, match=re.escape(needle)):
        decode_frame(data, nfds)


@pytest.mark.parametrize(("data", "where"), [
    (raw_frame(Kind.ERROR, b'{"vm":"web1","message":"\\ud800"}'), "ERROR.message"),
    (raw_frame(Kind.ERROR, b'{"vm":"web1","message":"ok \\udfff then"}'), "ERROR.message"),
    (json_frame(Kind.STATUS_REPLY, {"devices": [DEVICE, {**DEVICE, "vm": "\udc80"}],
                                    "nics": []}),
     "STATUS_REPLY.devices[1].vm"),
    (json_frame(Kind.STATUS_REPLY, {"devices": [], "nics": [{**NIC, "drops": [
        {"reason": "\udc80", "count": 1}]}]}),
     "STATUS_REPLY.nics[0].drops[0].reason"),
])
def test_string_with_a_lone_surrogate_is_refused_so_every_accepted_frame_re_encodes(
        data: bytes, where: str) -> None:
    with pytest.raises(FrameError, match=re.escape(f"{where} holds a lone surrogate")):
        decode_frame(data, 0)


def test_surrogate_pair_escape_is_one_valid_character() -> None:
    frame = decode_frame(raw_frame(Kind.ERROR, b'{"vm":"web1","message":"\\ud83d\\ude00"}'), 0)
    assert frame.fields["message"] == "\U0001F600"
    assert decode_frame(encode_frame(Kind.ERROR, frame.fields), 0) == frame


@pytest.mark.parametrize(("accept", "kind"), [(TO_BACKEND, Kind.READY),
                                              (TO_BROKER, Kind.ADD_BLK),
                                              (TO_BROKER, Kind.STOP)])
def test_kind_sent_in_the_wrong_direction_rejected(accept: frozenset[Kind], kind: Kind) -> None:
    with pytest.raises(FrameError, match="not accepted in this direction"):
        decode_frame(encode_frame(kind, SAMPLES[kind]), fd_count(kind), accept)


def test_encoding_checks_fields_too() -> None:
    with pytest.raises(FrameError, match=r"READY\.devices is not an integer"):
        encode_frame(Kind.READY, {"devices": "3"})
    with pytest.raises(FrameError, match="not valid Unicode"):
        encode_frame(Kind.ERROR, {"vm": "web1", "message": "\ud800"})
    with pytest.raises(FrameError, match=f"larger than {MAX_FRAME} bytes"):
        encode_frame(Kind.ERROR, {"vm": "web1", "message": "x" * MAX_FRAME})


# --- through a real socketpair ----------------------------------------------------------------


def test_add_blk_carries_a_working_listening_socket_and_image(
        pair: tuple[socket.socket, socket.socket], tmp_path: Path) -> None:
    broker, backend = pair
    image = tmp_path / "disk.raw"
    image.write_bytes(b"guest data")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "disk0.sock"))
    listener.listen(1)
    image_fd = os.open(image, os.O_RDWR)
    send_frame(broker, Kind.ADD_BLK, ADD_BLK, [listener.fileno(), image_fd])
    listener.close()  # the backend's copies stay valid: the broker can let go of its own
    os.close(image_fd)

    received = recv_frame(backend, TO_BACKEND)
    assert received is not None
    frame, (sock_fd, got_image) = received
    assert frame == Frame(Kind.ADD_BLK, ADD_BLK)
    assert not os.get_inheritable(sock_fd) and not os.get_inheritable(got_image)
    assert os.pread(got_image, 10, 0) == b"guest data"
    os.pwrite(got_image, b"GUEST", 0)
    assert image.read_bytes() == b"GUEST data"
    server = socket.socket(fileno=sock_fd)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(tmp_path / "disk0.sock"))
        conn, _ = server.accept()
        client.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        conn.close()
    server.close()
    os.close(got_image)


def test_add_net_carries_the_socket_and_every_tap_queue_in_order(
        pair: tuple[socket.socket, socket.socket]) -> None:
    broker, backend = pair
    fields = {**ADD_NET, "queues": MAX_NET_QUEUES}
    pipes = [os.pipe() for _ in range(1 + MAX_NET_QUEUES)]
    send_frame(broker, Kind.ADD_NET, fields, [w for _r, w in pipes])
    received = recv_frame(backend, TO_BACKEND)
    assert received is not None
    frame, fds = received
    assert frame == Frame(Kind.ADD_NET, fields) and len(fds) == 1 + MAX_NET_QUEUES
    for index, ((read_end, write_end), got) in enumerate(zip(pipes, fds, strict=True)):
        os.write(got, bytes([index]))  # FD i arrives as FD i
        assert os.read(read_end, 1) == bytes([index])
        for fd in (read_end, write_end, got):
            os.close(fd)


def test_replies_travel_back_to_the_broker(pair: tuple[socket.socket, socket.socket]) -> None:
    broker, backend = pair
    send_frame(backend, Kind.STATUS_REPLY, SAMPLES[Kind.STATUS_REPLY])
    assert recv_frame(broker, TO_BROKER) == (Frame(Kind.STATUS_REPLY,
                                                   SAMPLES[Kind.STATUS_REPLY]), [])


def test_closed_peer_reads_as_none(pair: tuple[socket.socket, socket.socket]) -> None:
    broker, backend = pair
    broker.close()
    assert recv_frame(backend) is None


def test_send_with_the_wrong_number_of_fds_sends_nothing(
        pair: tuple[socket.socket, socket.socket]) -> None:
    broker, backend = pair
    with pytest.raises(FrameError, match="ADD_BLK carries 2 file descriptors, not 1"):
        send_frame(broker, Kind.ADD_BLK, ADD_BLK, [0])
    backend.setblocking(False)
    with pytest.raises(BlockingIOError):
        backend.recv(1)


@pytest.mark.parametrize(("data", "nfds", "needle"), [
    (HEADER.pack(MAGIC, VERSION, Kind.ADD_BLK, 40), 2, "says 40 payload bytes but has 0"),
    (encode_frame(Kind.ADD_BLK, ADD_BLK)[:20], 2, "payload bytes"),
    (raw_frame(Kind.ERROR, b" " * MAX_FRAME), 2, f"larger than {MAX_FRAME} bytes"),
    (encode_frame(Kind.READY, {"devices": 1}), 2, "not accepted in this direction"),
    (encode_frame(Kind.ADD_BLK, ADD_BLK), 1, "ADD_BLK came with 1 file descriptors"),
    (encode_frame(Kind.ADD_BLK, ADD_BLK), 3, "ADD_BLK came with 3 file descriptors"),
    # (MAX_FDS + 1 still fit the control buffer, which the kernel rounds up to 8 bytes)
    (encode_frame(Kind.ADD_BLK, ADD_BLK), MAX_FDS + 2, f"more than {MAX_FDS} file descriptors"),
    (encode_frame(Kind.ADD_NET, {**ADD_NET, "queues": 2}), 2, "expected 3 for 2 queues"),
    (json_frame(Kind.ADD_BLK, {**ADD_BLK, "readonly": 1}), 2, "ADD_BLK.readonly is not a bool"),
])
def test_rejected_frames_have_their_fds_closed(pair: tuple[socket.socket, socket.socket],
                                               data: bytes, nfds: int, needle: str) -> None:
    broker, backend = pair
    read_end, write_end = os.pipe()
    send_raw(broker, data, [write_end] * nfds)
    os.close(write_end)
    assert not write_end_is_closed_everywhere(read_end)  # the backend holds copies now
    with pytest.raises(FrameError, match=re.escape(needle)):
        recv_frame(backend, TO_BACKEND)
    assert write_end_is_closed_everywhere(read_end)
    os.close(read_end)
    # The channel is still usable: one bad frame does not desynchronise the next.
    send_frame(broker, Kind.STATUS, {})
    assert recv_frame(backend, TO_BACKEND) == (Frame(Kind.STATUS, {}), [])
