"""The broker <-> backend channel: small framed messages with FDs over SOCK_SEQPACKET.

A frame is an 8-byte header (magic, version, kind, payload length) and a UTF-8 JSON object;
file descriptors ride along as SCM_RIGHTS. SOCK_SEQPACKET keeps frame boundaries, so one
recvmsg() is one whole frame or a truncation the kernel reports. Each kind has an exact set of
fields, each of an exact type, and an exact number of FDs (for ADD_NET, one more than its
`queues`); anything else is a `FrameError`.

The checks run in both directions: the backend parses guest-controlled data and so may be
compromised, and the broker (the TCB) must read the backend's frames as carefully as the backend
reads the broker's. `decode_frame` is pure; `send_frame`/`recv_frame` are the only I/O.
"""

from __future__ import annotations

import array
import enum
import json
import os
import socket
import struct
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAGIC = 0x5246  # "RF"
VERSION = 1
HEADER = struct.Struct("<HBBI")  # magic, version, kind, payload length
MAX_FRAME = 64 * 1024  # header included
MAX_NET_QUEUES = 8  # queue pairs of one NIC, one tap FD each (broker.taps.MAX_QUEUES)
MAX_FDS = 1 + MAX_NET_QUEUES  # the most any kind carries; the control buffer has room for no more
MAX_INT = (1 << 63) - 1
_FD_SIZE = array.array("i").itemsize


class FrameError(Exception):
    """A frame is malformed, oversized, of a kind not accepted here, or has the wrong FDs."""


class Kind(enum.IntEnum):
    # broker -> backend
    ADD_BLK = 1  # FDs: [listening vhost-user socket, image]
    REMOVE_VM = 2
    STATUS = 3
    STOP = 4
    SET_QOS = 5
    ADD_NET = 6  # FDs: [listening vhost-user socket, tap queue 0, ..., tap queue queues-1]
    # backend -> broker
    READY = 65
    STATUS_REPLY = 66
    ERROR = 67


TO_BACKEND = frozenset({Kind.ADD_BLK, Kind.REMOVE_VM, Kind.STATUS, Kind.STOP, Kind.SET_QOS,
                        Kind.ADD_NET})
TO_BROKER = frozenset({Kind.READY, Kind.STATUS_REPLY, Kind.ERROR})

NET_FDS = -1  # ADD_NET's FD count: 1 + its "queues"
# A field's type is str, int (0..MAX_INT, never bool), bool, or [schema]: a list of objects.
_DEVICE = {"vm": str, "disk": int, "socket": str, "connected": bool, "requests": int,
           "bytes": int, "kicks": int, "interrupts": int, "p50_us": int, "p99_us": int,
           "p999_us": int, "throttled_ms": int}
# One NIC: totals, drops by reason (a fixed set of reason names) and frames per queue pair.
_NIC = {"vm": str, "nic": int, "socket": str, "tap": str, "connected": bool, "queues": int,
        "tx_frames": int, "tx_bytes": int, "rx_frames": int, "rx_bytes": int,
        "tx_dropped": int, "rx_dropped": int, "kicks": int, "interrupts": int,
        "drops": [{"reason": str, "count": int}],
        "pairs": [{"rx_frames": int, "tx_frames": int}]}
_SCHEMAS: dict[Kind, tuple[dict[str, Any], int]] = {  # kind -> (fields, number of FDs)
    Kind.ADD_BLK: ({"vm": str, "disk": int, "socket": str, "readonly": bool, "num_queues": int,
                    "serial": str}, 2),
    # mac: "52:54:00:12:34:56"; tap: the interface's name, for log lines only.
    # FDs: 1 + queues, checked against the field (NET_FDS).
    Kind.ADD_NET: ({"vm": str, "nic": int, "socket": str, "tap": str, "mac": str, "mtu": int,
                    "queues": int}, NET_FDS),
    Kind.REMOVE_VM: ({"vm": str}, 0),
    Kind.STATUS: ({}, 0),
    Kind.STOP: ({}, 0),
    # Limits of 0 mean none; burst in thousandths (JSON here carries no floats).
    Kind.SET_QOS: ({"vm": str, "weight": int, "priority": str, "iops_limit": int,
                    "bps_limit": int, "burst_milli": int}, 0),
    Kind.READY: ({"devices": int}, 0),
    Kind.STATUS_REPLY: ({"devices": [_DEVICE], "nics": [_NIC]}, 0),
    Kind.ERROR: ({"vm": str, "message": str}, 0),
}


@dataclass(frozen=True)
class Frame:
    kind: Kind
    fields: dict[str, Any]


def fd_count(kind: Kind, fields: Mapping[str, Any] | None = None) -> int:
    """How many FDs a frame of `kind` (with these checked `fields`) carries."""
    count = _SCHEMAS[kind][1]
    if count == NET_FDS:
        if fields is None:
            raise FrameError(f"{Kind(kind).name} carries a number of FDs its fields decide")
        return 1 + fields["queues"]
    return count


def encode_frame(kind: Kind, fields: Mapping[str, Any]) -> bytes:
    """A frame's bytes; the same checks as decoding, so a bad frame is caught at its source."""
    kind = Kind(kind)
    fields = dict(fields)
    _check_object(_SCHEMAS[kind][0], fields, kind.name)
    _check_counts(kind, fields)
    try:
        payload = json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        raise FrameError(f"{kind.name} has a string that is not valid Unicode") from None
    if HEADER.size + len(payload) > MAX_FRAME:
        raise FrameError(f"{kind.name} frame would be larger than {MAX_FRAME} bytes")
    return HEADER.pack(MAGIC, VERSION, kind, len(payload)) + payload


def decode_frame(data: bytes, nfds: int, accept: Collection[Kind] = frozenset(Kind)) -> Frame:
    """Parse one frame that arrived with `nfds` FDs; only kinds in `accept` are allowed."""
    if len(data) < HEADER.size:
        raise FrameError(f"frame of {len(data)} bytes is shorter than its header")
    if len(data) > MAX_FRAME:
        raise FrameError(f"frame of {len(data)} bytes is larger than {MAX_FRAME}")
    magic, version, kind_value, length = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise FrameError(f"frame has magic {magic:#x} version {version}, expected {MAGIC:#x} "
                         f"version {VERSION}")
    if length != len(data) - HEADER.size:
        raise FrameError(f"frame says {length} payload bytes but has {len(data) - HEADER.size}")
    try:
        kind = Kind(kind_value)
    except ValueError:
        raise FrameError(f"frame kind {kind_value} is unknown") from None
    if kind not in accept:
        raise FrameError(f"{kind.name} frames are not accepted in this direction")
    schema, expected_fds = _SCHEMAS[kind]
    if expected_fds != NET_FDS and nfds != expected_fds:
        raise FrameError(f"{kind.name} came with {nfds} file descriptors, expected "
                         f"{expected_fds}")
    try:
        fields = json.loads(bytes(data[HEADER.size:]).decode("utf-8"),
                            object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FrameError(f"{kind.name} payload is not a UTF-8 JSON object: {exc}") from None
    _check_object(schema, fields, kind.name)
    _check_counts(kind, fields)
    if expected_fds == NET_FDS and nfds != fd_count(kind, fields):
        raise FrameError(f"{kind.name} came with {nfds} file descriptors, expected "
                         f"{fd_count(kind, fields)} for {fields['queues']} queues")
    return Frame(kind, fields)


def _check_counts(kind: Kind, fields: Mapping[str, Any]) -> None:
    if kind == Kind.ADD_NET and not 1 <= fields["queues"] <= MAX_NET_QUEUES:
        raise FrameError(f"ADD_NET.queues is {fields['queues']}, not from 1 to "
                         f"{MAX_NET_QUEUES}")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of repeated keys; refuse them so each field has one meaning.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise FrameError("frame payload repeats a key")
    return obj


def _check_object(schema: Mapping[str, Any], value: object, where: str) -> None:
    if not isinstance(value, dict):
        raise FrameError(f"{where} is not a JSON object")
    if value.keys() != schema.keys():
        raise FrameError(f"{where} has fields {sorted(value)}, expected {sorted(schema)}")
    for name, kind in schema.items():
        field, item = f"{where}.{name}", value[name]
        if isinstance(kind, list):
            if not isinstance(item, list):
                raise FrameError(f"{field} is not a list")
            for index, element in enumerate(item):
                _check_object(kind[0], element, f"{field}[{index}]")
        elif kind is int:
            if type(item) is not int or not 0 <= item <= MAX_INT:
                raise FrameError(f"{field} is not an integer from 0 to {MAX_INT}")
        elif type(item) is not kind:
            raise FrameError(f"{field} is not a {kind.__name__}")
        elif kind is str and not _is_utf8(item):
            raise FrameError(f"{field} holds a lone surrogate: not valid Unicode")


def _is_utf8(text: str) -> bool:
    # JSON's \ud800 escapes decode to lone surrogates, which no UTF-8 encoder (nor
    # encode_frame, nor the journal) accepts.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def send_frame(sock: socket.socket, kind: Kind, fields: Mapping[str, Any],
               fds: Sequence[int] = ()) -> None:
    """Send one frame; the FDs are duplicated into the peer and stay open here."""
    data = encode_frame(kind, fields)
    if len(fds) != fd_count(kind, fields):
        raise FrameError(f"{Kind(kind).name} carries {fd_count(kind, fields)} file "
                         f"descriptors, not {len(fds)}")
    # SOCK_SEQPACKET: the whole frame or an exception. Frames without FDs go out with send(),
    # so that the confined backend's seccomp policy can forbid sendmsg(), with which it could
    # pass an FD it holds (another VM's image) to a connected front-end.
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.send(data)


def recv_frame(sock: socket.socket, accept: Collection[Kind] = frozenset(Kind)
               ) -> tuple[Frame, list[int]] | None:
    """Receive one frame and the FDs it carried (close-on-exec); None once the peer has closed.

    On any FrameError the FDs that arrived are closed, so a bad frame leaks nothing.
    """
    data, ancillary, flags, _ = sock.recvmsg(
        MAX_FRAME, socket.CMSG_SPACE(MAX_FDS * _FD_SIZE),
        socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    foreign = False
    for level, cmsg_type, cmsg_data in ancillary:
        if level == socket.SOL_SOCKET and cmsg_type == socket.SCM_RIGHTS:
            fds.extend(array.array("i", cmsg_data[: len(cmsg_data) - len(cmsg_data) % _FD_SIZE]))
        else:
            foreign = True
    if not data and not ancillary:
        return None  # a SOCK_SEQPACKET read of nothing is the peer's orderly shutdown
    try:
        if flags & socket.MSG_CTRUNC:
            raise FrameError(f"frame came with more than {MAX_FDS} file descriptors")
        if flags & socket.MSG_TRUNC:
            raise FrameError(f"frame is larger than {MAX_FRAME} bytes")
        if foreign:
            raise FrameError("frame came with ancillary data other than file descriptors")
        return decode_frame(data, len(fds), accept), fds
    except FrameError:
        for fd in fds:
            os.close(fd)
        raise
