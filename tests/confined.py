"""Run code in a forked child (typically one that confines itself) and report what became of it.

The child reports lines on a pipe: "ok" when its function returned, "errno NAME" for an
OSError, "error ..." for anything else, plus whatever it reported itself. The parent collects
them with the wait status, so a child that seccomp killed reads as outcome "SIGSYS". The child
never returns into pytest. Confining needs root: the tests run as root.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandbox.confine import confine

REPO = Path(__file__).resolve().parent.parent
BACKEND_POLICY = REPO / "policies" / "backend.policy"
NOBODY = 65534  # a scratch uid and gid that owns no test file


@dataclass(frozen=True)
class ChildResult:
    reports: list[str]
    status: int  # as os.waitpid returns it

    @property
    def confined(self) -> bool:
        return "confined" in self.reports

    @property
    def outcome(self) -> str:
        """SIGNAME if killed, "exit N" for a non-zero exit, else the child's last report."""
        if os.WIFSIGNALED(self.status):
            return signal.Signals(os.WTERMSIG(self.status)).name
        code = os.waitstatus_to_exitcode(self.status)
        if code:
            return f"exit {code}"
        return self.reports[-1] if self.reports else "no report"


class Child:
    """The child's end: report lines, or pause until the parent has looked at it."""

    def __init__(self, report_fd: int, go_fd: int) -> None:
        self.fds = [report_fd, go_fd]  # to keep open through confinement

    def report(self, line: str) -> None:
        os.write(self.fds[0], f"{line}\n".encode())

    def pause(self) -> None:
        self.report("paused")
        os.read(self.fds[1], 1)


def run_in_child(
    body: Callable[[Child], object],
    *,
    while_paused: Callable[[int], None] | None = None,
    timeout: float = 10.0,
) -> ChildResult:
    """Fork and run `body(child)` in the child; `while_paused(pid)` runs in the parent while
    the child sits in `child.pause()`. A child still running at `timeout` is killed."""
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        child = Child(report_w, go_r)
        try:
            os.close(report_r)
            os.close(go_w)
            body(child)
            child.report("ok")
        except OSError as exc:
            child.report(f"errno {errno.errorcode.get(exc.errno or 0, exc.errno)}")
        except BaseException as exc:
            child.report(f"error {type(exc).__name__}: {exc}")
        finally:
            os._exit(0)
    os.close(report_w)
    os.close(go_r)
    reader = _Reports(report_r, time.monotonic() + timeout)
    try:
        if while_paused is not None and reader.wait_for("paused"):
            while_paused(pid)
        with contextlib.suppress(BrokenPipeError):  # the child may be gone already
            os.write(go_w, b"g")
        reports = reader.read_all()
    finally:
        os.close(go_w)
        os.close(report_r)
        if not reader.finished:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    return ChildResult(reports, status)


def _no_setup() -> tuple[None, tuple[int, ...]]:
    return None, ()


def run_confined(
    body: Callable[[Any], object],
    setup: Callable[[], tuple[Any, Iterable[int]]] = _no_setup,
    *,
    while_confined: Callable[[int], None] | None = None,
    timeout: float = 10.0,
    **confine_args: Any,
) -> ChildResult:
    """In a child: `setup()` -> (context, FDs to keep), confine, report "confined", then
    `body(context)`. `while_confined(pid)` inspects the confined child from the parent before
    the body runs. `confine_args` override the defaults: the backend policy in kill mode,
    uid and gid NOBODY, an empty root."""
    args: dict[str, Any] = {"uid": NOBODY, "gid": NOBODY, "seccomp_policy": BACKEND_POLICY}
    args.update(confine_args)

    def confined_body(child: Child) -> None:
        context, fds = setup()
        confine(keep_fds=[*child.fds, *fds], **args)
        child.report("confined")
        if while_confined is not None:
            child.pause()
        body(context)

    return run_in_child(confined_body, while_paused=while_confined, timeout=timeout)


class _Reports:
    """The child's report lines, read with a deadline so a stuck child fails the test."""

    def __init__(self, fd: int, deadline: float) -> None:
        self.fd = fd
        self.deadline = deadline
        self.data = b""
        self.finished = False

    def _read_some(self) -> bool:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
            return False
        chunk = os.read(self.fd, 4096)
        self.data += chunk
        self.finished = not chunk
        return bool(chunk)

    def wait_for(self, line: str) -> bool:
        while line not in self.lines():
            if not self._read_some():
                return False
        return True

    def read_all(self) -> list[str]:
        while self._read_some():
            pass
        return self.lines()

    def lines(self) -> list[str]:
        return self.data.decode(errors="replace").splitlines()
