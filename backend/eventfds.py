"""A front-end's eventfds (kick, call, err) on the shared I/O thread, which they must never block.

The front-end passes its eventfds over the vhost-user socket and keeps its own copies: they
share one open file description, so it can clear O_NONBLOCK on them whenever it likes. A write
then blocks while the counter is near its maximum (the front-end can write that value itself),
and a read blocks while it is zero (the front-end can read it first). Checking with select()
before the syscall narrows that to a race, but a hostile front-end toggling the counter wins it
sooner or later, and a blocked syscall would stall every VM's I/O.

So the syscalls run under a guard: SIGALRM arrives every GUARD_PERIOD_S, and its handler raises
FrontendBlocked in the I/O thread when that thread has been inside the same guarded syscall since
the previous alarm (a guarded syscall takes microseconds; a blocked one is interrupted with
EINTR after one to two periods). The caller then drops the front-end. The timer is armed once,
before confinement (setitimer is not in the seccomp policy); the alarms cost a wake-up of the
loop each, GUARD_PERIOD_S apart.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import signal
from collections.abc import Iterator
from types import FrameType

log = logging.getLogger(__name__)

GUARD_PERIOD_S = 0.02
_ONE = (1).to_bytes(8, "little")


class FrontendBlocked(Exception):
    """A front-end's eventfd blocked a syscall of the I/O thread (see the module docstring)."""


class _Guard:
    """Which guarded syscall the I/O thread is in (`seq` counts them), and which the last
    alarm saw."""

    __slots__ = ("active", "seen", "seq")

    def __init__(self) -> None:
        self.active = False
        self.seq = 0
        self.seen = -1

    def on_alarm(self, _signum: int, _frame: FrameType | None) -> None:
        if self.active and self.seq == self.seen:
            self.active = False
            raise FrontendBlocked("an eventfd syscall blocked for a whole guard period")
        self.seen = self.seq


_GUARD = _Guard()


@contextlib.contextmanager
def eventfd_guard(period_s: float = GUARD_PERIOD_S, first_s: float | None = None) -> Iterator[None]:
    """Guard this (the main, I/O) thread's eventfd syscalls for the duration of the block, the
    first alarm `first_s` from now (default: one period).

    Confinement inside the block must be done before the first alarm: its ctypes calls do not
    retry after EINTR, and setitimer is not allowed once confined. So the timer cannot be
    disarmed at the end; SIGALRM is ignored instead (its default action, which the interpreter
    restores to the handlers it installed as it exits, would kill the process).

    Only the shared model uses it: per-ring threads (the benchmark's comparison model) cannot
    be interrupted by a handler that runs in the main thread."""
    signal.signal(signal.SIGALRM, _GUARD.on_alarm)
    signal.setitimer(signal.ITIMER_REAL, first_s or period_s, period_s)
    try:
        yield
    finally:
        signal.signal(signal.SIGALRM, signal.SIG_IGN)


def set_nonblocking(fd: int) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


def _eventfd_identity() -> tuple[int, int]:
    fd = os.eventfd(0)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return st.st_dev, st.st_ino


# Eventfds live on the kernel's one anonymous inode; taken at import, before any confinement.
_EVENTFD_IDENTITY = _eventfd_identity()


def check_eventfd(fd: int) -> None:
    """Refuse a kick/call/err FD that is not an eventfd (a pipe or socket could hang up or
    block), and make it non-blocking (the front-end may undo that: see the guard)."""
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != _EVENTFD_IDENTITY:
        raise ValueError("the FD is not an eventfd")
    set_nonblocking(fd)


def signal_eventfd(fd: int) -> None:
    """Add 1 to a front-end's eventfd; a full counter is skipped (the guest has been notified
    many times over). Raises FrontendBlocked if the front-end made the write block."""
    guard = _GUARD
    guard.seq += 1
    guard.active = True
    try:
        if select.select((), (fd,), (), 0)[1]:
            os.write(fd, _ONE)
    except OSError as exc:
        if exc.errno != errno.EAGAIN:
            log.debug("eventfd %d write failed: %s", fd, exc)
    finally:
        guard.active = False


def drain_eventfd(fd: int) -> None:
    """Reset a kick eventfd's counter. Raises FrontendBlocked if the front-end made the read
    block (it emptied the counter after epoll saw it non-zero)."""
    guard = _GUARD
    guard.seq += 1
    guard.active = True
    try:
        os.read(fd, 8)
    except OSError:
        pass  # EAGAIN: the front-end read it first; nothing to reset
    finally:
        guard.active = False
