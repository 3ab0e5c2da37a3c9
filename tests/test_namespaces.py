"""sandbox/namespaces.py: a new root showing only what was bound, in a real forked child."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sandbox.namespaces import (
    CLONE_NEWNET,
    CLONE_NEWNS,
    Bind,
    enter_new_root,
    unshare,
)


def in_child(body: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run `body` in a forked child (namespaces must not touch the test process); its result
    comes back as JSON over a pipe."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            result = body()
        except BaseException as exc:  # reported to the parent, never raised into pytest
            result = {"error": repr(exc)}
        os.write(writer, json.dumps(result).encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    result = json.loads(data)
    assert "error" not in result, result["error"]
    return result


def write_errno(path: str) -> int:
    try:
        with open(path, "w") as f:
            f.write("x")
    except OSError as exc:
        return exc.errno
    return 0


def test_new_root_shows_only_the_binds_with_their_modes(tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "kernel").write_text("k")
    (tmp_path / "ro" / "hidden").write_text("h")
    (tmp_path / "rw").mkdir()
    kernel, rw = str(tmp_path / "ro" / "kernel"), str(tmp_path / "rw")

    def body() -> dict[str, Any]:
        os.umask(0o077)  # the directories leading to binds must still be 0755
        unshare(CLONE_NEWNS | CLONE_NEWNET)
        enter_new_root([Bind("/usr", executable=True), Bind("/dev/null", devices=True),
                        Bind(kernel), Bind(rw, writable=True)], {"/lib": "usr/lib"})
        return {
            "root": sorted(os.listdir("/")),
            "ro_dir": sorted(os.listdir(os.path.dirname(kernel))),
            "parent_mode": os.stat(os.path.dirname(kernel)).st_mode & 0o777,
            "kernel": Path(kernel).read_text(),
            "lib": os.readlink("/lib"),
            "usr_works": os.path.exists("/usr/bin/env"),
            "write_kernel": write_errno(kernel),
            "write_root": write_errno("/new"),
            "write_rw": write_errno(rw + "/file"),
            "null": write_errno("/dev/null"),
            "sys": sorted(os.listdir("/sys")) if os.path.exists("/sys") else None,
        }

    seen = in_child(body)
    assert seen["root"] == sorted({"usr", "dev", "lib", tmp_path.parts[1]})
    assert seen["ro_dir"] == ["kernel"]  # its sibling stays on the host
    assert seen["parent_mode"] == 0o755
    assert seen["kernel"] == "k" and seen["lib"] == "usr/lib" and seen["usr_works"]
    assert seen["write_kernel"] == errno.EROFS
    assert seen["write_root"] == errno.EROFS
    assert seen["write_rw"] == 0 and (tmp_path / "rw" / "file").read_text() == "x"
    assert seen["null"] == 0
    assert seen["sys"] is None  # no /sys, no /proc: nothing that was not bound
    assert not os.path.exists("/new")  # nothing leaked to the host's root


def test_a_failed_bind_raises_oserror_naming_the_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")

    def body() -> dict[str, Any]:
        unshare(CLONE_NEWNS)
        try:
            enter_new_root([Bind(missing)])
        except FileNotFoundError as exc:
            return {"errno": exc.errno, "filename": exc.filename}
        return {"errno": 0}

    assert in_child(body) == {"errno": errno.ENOENT, "filename": missing}
