"""The admin socket: who may ask, and the requests and responses (one JSON object per line).

A request is `{"cmd": "status" | "reload" | "stop"}` and nothing else; a response is a JSON
object with a boolean "ok". Only root and members of the policy's admin group may ask, judged
from the kernel's record of the peer (SO_PEERCRED, SO_PEERGROUPS), never from anything the peer
says. Parsing is pure; the broker's service owns the socket.
"""

from __future__ import annotations

import array
import enum
import json
import logging
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MAX_LINE = 4096
MAX_RESPONSE = 16 << 20
SO_PEERGROUPS = 59  # Linux >= 4.13; not exported by Python's socket module
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
_GID = "I"  # gid_t
_MAX_GROUPS = 256  # socket.getsockopt() returns at most 1024 bytes


class AdminError(Exception):
    """A request line is not one the admin socket understands."""


class Command(enum.StrEnum):
    STATUS = "status"
    RELOAD = "reload"
    STOP = "stop"


@dataclass(frozen=True)
class AdminRequest:
    cmd: Command


def parse_request(line: bytes) -> AdminRequest:
    """One request line (its trailing newline optional) -> AdminRequest, or AdminError."""
    if len(line) > MAX_LINE:
        raise AdminError(f"request is longer than {MAX_LINE} bytes")
    try:
        obj = json.loads(line.removesuffix(b"\n").decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise AdminError("request is not a JSON object on one line") from None
    if not isinstance(obj, dict) or obj.keys() != {"cmd"} or not isinstance(obj["cmd"], str):
        raise AdminError('request must be exactly {"cmd": "status" | "reload" | "stop"}')
    try:
        return AdminRequest(Command(obj["cmd"]))
    except ValueError:
        raise AdminError(f"unknown command {obj['cmd']!r}; use status, reload or stop") from None


def encode_response(obj: Mapping[str, Any]) -> bytes:
    """One response line. JSON escapes control characters, so the line holds no newline."""
    if type(obj.get("ok")) is not bool:
        raise ValueError('an admin response needs a boolean "ok"')
    return json.dumps(dict(obj), separators=(",", ":")).encode() + b"\n"


def peer_allowed(sock: socket.socket, admin_gid: int | None) -> bool:
    """Whether the process at the other end of a connected unix socket may use the admin socket.

    Root always may; otherwise only a member of `admin_gid` (primary or supplementary group, as
    the kernel recorded them when the peer connected).
    """
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size))
    if uid == 0:
        return True
    if admin_gid is None:
        return False
    if gid == admin_gid:
        return True
    try:
        groups = array.array(_GID, sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS,
                                                   _MAX_GROUPS * array.array(_GID).itemsize))
    except OSError as exc:
        # ERANGE: more groups than fit. No fallback to /proc/<pid>/status: the peer may have
        # exited and its pid been reused by a process in the admin group. Refuse instead.
        log.warning("admin peer pid %d uid %d refused: its groups cannot be read (%s)",
                    pid, uid, exc.strerror)
        return False
    return admin_gid in groups


def read_line(conn: socket.socket, limit: int = MAX_LINE) -> bytes:
    """Up to one line of at most about `limit` bytes, or what arrived before EOF."""
    data = b""
    while not data.endswith(b"\n") and len(data) <= limit:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def admin_request(socket_path: str, cmd: str, timeout: float = 30.0) -> dict[str, Any]:
    """Client side of the admin socket, for `ringfence status` and friends."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        # Responses (a status of many VMs) may be far longer than a request line.
        answer = read_line(sock, limit=MAX_RESPONSE)
        return json.loads(answer or b'{"ok": false, "error": "no answer"}')
