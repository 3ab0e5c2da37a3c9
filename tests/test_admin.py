"""The admin socket (broker/admin.py): who may connect, and the request/response lines."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from collections.abc import Sequence

import pytest

from broker.admin import (
    MAX_LINE,
    AdminError,
    AdminRequest,
    Command,
    encode_response,
    parse_request,
    peer_allowed,
)

NOBODY = 65534
ADMIN_GID = 4242


# --- the protocol (pure) ----------------------------------------------------------------------


@pytest.mark.parametrize("cmd", ["status", "reload", "stop"])
def test_each_command_parses(cmd: str) -> None:
    assert parse_request(b'{"cmd": "%s"}\n' % cmd.encode()) == AdminRequest(Command(cmd))
    assert parse_request(b'{"cmd":"%s"}' % cmd.encode()).cmd == cmd  # newline optional


@pytest.mark.parametrize(("line", "needle"), [
    (b"", "not a JSON object"),
    (b"\n", "not a JSON object"),
    (b"status\n", "not a JSON object"),
    (b'{"cmd": "status"\n', "not a JSON object"),
    (b'{"cmd": "st\xffatus"}\n', "not a JSON object"),
    (b'{"cmd": "status"}\n{"cmd": "stop"}\n', "not a JSON object"),
    (b"[" * 4000 + b"\n", "not a JSON object"),
    (b'["status"]\n', 'exactly {"cmd"'),
    (b"{}\n", 'exactly {"cmd"'),
    (b'{"cmd": "status", "vm": "web1"}\n', 'exactly {"cmd"'),
    (b'{"cmd": 1}\n', 'exactly {"cmd"'),
    (b'{"cmd": "STATUS"}\n', "unknown command 'STATUS'"),
    (b'{"cmd": "shell"}\n', "unknown command 'shell'"),
    (b'{"cmd": "status"}' + b" " * MAX_LINE + b"\n", f"longer than {MAX_LINE} bytes"),
])
def test_bad_requests_rejected(line: bytes, needle: str) -> None:
    with pytest.raises(AdminError, match=re.escape(needle)):
        parse_request(line)


def test_response_is_one_json_line() -> None:
    line = encode_response({"ok": False, "error": "bad\nthing"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"ok": False, "error": "bad\nthing"}


@pytest.mark.parametrize("response", [{}, {"ok": 1}, {"ok": "true"}])
def test_response_needs_a_boolean_ok(response: dict[str, object]) -> None:
    with pytest.raises(ValueError, match='boolean "ok"'):
        encode_response(response)


# --- who may connect: real processes on a real listening socket -------------------------------


def serve_one(server: socket.socket, admin_gid: int | None) -> None:
    """What the broker does per connection: judge the peer, then answer or refuse."""
    conn, _ = server.accept()
    with conn:
        # Read the line even from a refused peer, but do not parse it: closing a unix socket
        # with unread data makes the peer's read fail with ECONNRESET instead of the refusal.
        line = conn.makefile("rb").readline(MAX_LINE + 1)
        if not peer_allowed(conn, admin_gid):
            conn.sendall(encode_response({"ok": False, "error": "not allowed"}))
            return
        conn.sendall(encode_response({"ok": True, "cmd": parse_request(line).cmd}))


def ask_as(uid: int, gid: int, groups: Sequence[int], admin_gid: int | None) -> dict[str, object]:
    """Send a status request from a forked child with these credentials; the reply it got."""
    address = f"\0ringfence-test-admin-{os.getpid()}"  # abstract: no file permissions involved
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(address)
    server.listen(1)
    server.settimeout(10)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to the given identity, ask, pass the reply up, and exit
        status = 1
        try:
            os.close(read_end)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(10)
                client.connect(address)
                client.sendall(b'{"cmd": "status"}\n')
                os.write(write_end, client.makefile("rb").readline())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    try:
        serve_one(server, admin_gid)
    finally:
        server.close()
        _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0
    with os.fdopen(read_end, "rb") as reply:
        return json.loads(reply.read())


def test_admin_request_from_a_non_root_uid_refused() -> None:
    assert ask_as(NOBODY, NOBODY, [], admin_gid=ADMIN_GID) == {"ok": False,
                                                               "error": "not allowed"}


def test_non_root_uid_refused_when_no_admin_group_is_configured() -> None:
    assert ask_as(NOBODY, NOBODY, [ADMIN_GID], admin_gid=None)["ok"] is False


def test_member_of_the_admin_group_allowed() -> None:
    assert ask_as(NOBODY, NOBODY, [100, ADMIN_GID], admin_gid=ADMIN_GID) == {"ok": True,
                                                                            "cmd": "status"}


def test_primary_admin_group_allowed() -> None:
    assert ask_as(NOBODY, ADMIN_GID, [], admin_gid=ADMIN_GID)["ok"] is True


def test_root_allowed_without_any_admin_group() -> None:
    assert ask_as(0, 0, [], admin_gid=None)["ok"] is True


def test_peer_in_too_many_groups_to_read_is_refused_not_guessed(
        caplog: pytest.LogCaptureFixture) -> None:
    # 300 groups do not fit the 1024-byte getsockopt buffer: refuse rather than read /proc.
    groups = [*range(10000, 10299), ADMIN_GID]
    with caplog.at_level(logging.WARNING, logger="broker.admin"):
        assert ask_as(NOBODY, NOBODY, groups, admin_gid=ADMIN_GID)["ok"] is False
    assert "its groups cannot be read" in caplog.text
