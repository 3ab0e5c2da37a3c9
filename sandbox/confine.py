"""Confine the calling process before it touches untrusted input.

A process started as root imports everything it will ever need, opens what it must hold (or
receives it from the broker), then calls `confine()`. After it returns the process holds only
the FDs it kept, runs as an unprivileged uid with no capabilities in its own mount, network,
IPC and UTS namespaces with an empty read-only root, cannot gain privileges or be dumped, and
is under a seccomp allow-list. Every step either succeeds or raises ConfinementError: the
caller must exit on it, never carry on half-confined.

This file is part of the trusted computing base: keep it short and obvious.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
from collections.abc import Iterable, Iterator
from pathlib import Path

import prctl

from sandbox.namespaces import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWUTS,
    enter_new_root,
    unshare,
)
from sandbox.seccomp_policy import SeccompPolicyError, compile_filter, read_policy

# <linux/prctl.h>; python-prctl has no ambient capability calls.
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

# FDs a backend may hold: per VM a listening and a connected socket, a few memory regions and
# three eventfds per queue, so thousands leave room for hundreds of VMs.
MAX_FDS = 4096

_libc = ctypes.CDLL(None, use_errno=True)


class ConfinementError(RuntimeError):
    """A confinement step failed; the process must not go on to serve anything."""


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    """Turn any OSError of one step into a ConfinementError naming the step."""
    try:
        yield
    except OSError as exc:
        raise ConfinementError(f"cannot {what}: {exc.strerror or exc}") from exc


def _libc_call(result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def confine(
    *,
    keep_fds: Iterable[int],
    uid: int,
    gid: int,
    seccomp_policy: Path,
    seccomp_action: str = "kill",
    empty_root: bool = True,
) -> None:
    """Confine this process for good; raises ConfinementError if any step fails.

    `keep_fds` (plus 0, 1 and 2; 0 and 1 become /dev/null unless kept) survive, every other
    FD is closed: Python objects still wrapping a closed FD must not be used or collected
    afterwards, as their number may be reused. `seccomp_action="log"` logs syscalls outside
    the policy instead of killing the process (development only).
    """
    if uid == 0 or gid == 0:
        raise ConfinementError("refusing to confine to uid or gid 0; use a dedicated user")
    if os.geteuid() != 0:
        raise ConfinementError("confine() needs root to set up namespaces and drop privileges")
    kept = set(keep_fds)
    with _step("read the process status"):
        threads = describe_self()["threads"]
        # Read now: /proc is out of sight once the root is empty.
        last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    if threads != 1:
        # Namespaces, credentials and the filter would bind only some threads.
        raise ConfinementError(f"confine() needs a single-threaded process, not {threads}")

    # Compile first: a bad policy must fail before anything about the process has changed.
    try:
        with _step(f"load seccomp policy {seccomp_policy}"):
            syscall_filter = compile_filter(read_policy(seccomp_policy), seccomp_action)
    except SeccompPolicyError as exc:
        raise ConfinementError(str(exc)) from exc

    with _step("close inherited file descriptors"):
        _close_fds(kept)

    with _step("set resource limits"):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # guest memory never lands in a core
        resource.setrlimit(resource.RLIMIT_NOFILE, (MAX_FDS, MAX_FDS))
        # No new processes or threads once the uid is dropped. No RLIMIT_FSIZE: the backend
        # writes disk images, which may be as large as the operator made them.
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))

    with _step("create new mount, network, IPC and UTS namespaces"):
        unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)

    if empty_root:
        with _step("switch to an empty root directory"):
            # A read-only tmpfs with nothing in it; the host's tree is detached.
            enter_new_root([])

    # Bounding and ambient sets first: dropping them needs CAP_SETPCAP, lost with the uid.
    with _step("drop the capability bounding and ambient sets"):
        for cap in range(last_cap + 1):
            prctl.capbset_drop(cap)
        _libc_call(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0))

    with _step(f"switch to uid {uid} gid {gid}"):
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)

    with _step("clear the effective, inheritable and permitted capabilities"):
        # The uid switch clears effective and permitted unless keep-caps was set; be explicit.
        prctl.cap_effective.limit()
        prctl.cap_inheritable.limit()
        prctl.cap_permitted.limit()
    try:
        os.setresuid(0, 0, 0)
    except PermissionError:
        pass  # as it must be: root is gone for good
    else:
        raise ConfinementError("root could be regained after dropping privileges")

    with _step("set no_new_privs and make the process non-dumpable"):
        prctl.set_no_new_privs(1)
        prctl.set_dumpable(0)  # no core dumps, no ptrace or /proc access by our own uid

    # Last: no syscall outside the policy may follow, not even from the steps above.
    with _step("load the seccomp filter"):
        syscall_filter.load()


def _close_fds(kept: set[int]) -> None:
    # stdin and stdout may be a terminal: /dev/null instead. stderr (2) stays: it is the log.
    null = os.open("/dev/null", os.O_RDWR)
    for fd in {0, 1} - kept - {null}:
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    lowest = 0
    for fd in sorted(kept | {0, 1, 2}):
        if lowest < fd:  # os.closerange(n, n) would close everything from n on
            os.closerange(lowest, fd)
        lowest = fd + 1
    # One close_range(2) call (Linux 5.9+) up to the largest possible FD number.
    os.closerange(lowest, 2**31 - 1)


def describe_self(pid: int | str = "self") -> dict[str, object]:
    """Confinement facts of a process from /proc/PID/status (the caller's own by default).

    A confined process cannot see /proc; its parent or an auditor passes its pid instead.
    """
    path = Path(f"/proc/{pid}/status")
    fields = {key: value.strip() for key, _, value in
              (line.partition(":") for line in path.read_text().splitlines())}
    return {
        "uid": [int(u) for u in fields["Uid"].split()],  # real, effective, saved, file system
        "gid": [int(g) for g in fields["Gid"].split()],
        "groups": [int(g) for g in fields["Groups"].split()],
        "cap_eff": int(fields["CapEff"], 16),
        "cap_prm": int(fields["CapPrm"], 16),
        "cap_inh": int(fields["CapInh"], 16),
        "cap_bnd": int(fields["CapBnd"], 16),
        "cap_amb": int(fields["CapAmb"], 16),
        "no_new_privs": int(fields["NoNewPrivs"]),
        "seccomp": int(fields["Seccomp"]),
        "threads": int(fields["Threads"]),
    }
