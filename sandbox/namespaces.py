"""Mount and namespace primitives over libc, for the privileged launchers.

Python 3.11 has no `os.unshare`, `mount` or `pivot_root`, so these are thin ctypes calls that
raise `OSError` (errno, message, path) like the `os` functions do. `enter_new_root` builds on
them: it replaces the calling process's view of the file system with a read-only tmpfs that
holds only the listed bind mounts. It is used by `ringfence run-qemu` and can be used by any
confinement that needs an empty or near-empty root.
"""

from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pyseccomp

# <sched.h> and <sys/mount.h>; the values are the same on every Linux architecture.
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

# glibc has no pivot_root wrapper, so it is called by number.
_SYS_PIVOT_ROOT = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, "pivot_root")

_libc = ctypes.CDLL(None, use_errno=True)  # our own handle: argtypes set here stay private
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syscall.argtypes = [ctypes.c_long, ctypes.c_char_p, ctypes.c_char_p]


def _check(result: int, path: str | None = None) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def _encode(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def unshare(flags: int) -> None:
    """Move the calling process into new namespaces (CLONE_NEW* flags)."""
    _check(_libc.unshare(flags))


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    _check(_libc.mount(_encode(source), _encode(target), _encode(fstype), flags, _encode(data)),
           target)


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(_encode(target), flags), target)


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(_SYS_PIVOT_ROOT, _encode(new_root), _encode(put_old)), new_root)


@dataclass(frozen=True)
class Bind:
    """A host file or directory to show at the same path inside a new root."""

    path: str  # absolute; symlinks in it are followed on the host side
    writable: bool = False
    executable: bool = False  # binaries and shared libraries need exec
    devices: bool = False  # device nodes need the mount to allow devices


def enter_new_root(binds: Sequence[Bind], symlinks: Mapping[str, str] | None = None,
                   scratch: str = "/tmp") -> None:
    """Make `/` a read-only tmpfs showing only `binds` (and `symlinks`: path -> target).

    Each bind appears at its path as given (so paths in arguments stay valid), in list order:
    a parent directory comes before the paths inside it. Symlinks are made last, so no bind
    path may pass through one of them.

    The caller must already be in its own mount namespace (CLONE_NEWNS) and be privileged in
    it. `scratch` is any existing directory to mount the new root on; every source is opened
    first, so whatever the tmpfs hides there is still bound by its descriptor. Every mount is
    nosuid, and nodev/noexec unless the bind asks otherwise. The old root is detached, so no
    other host path stays reachable (except through descriptors the caller still holds).
    """
    # Our mounts must not propagate back into the host's namespace.
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    fds = [os.open(b.path, os.O_PATH | os.O_CLOEXEC) for b in binds]
    # The directories leading to each bind must be traversable by the uid the caller switches
    # to, whatever umask it was started with (systemd units often set 0077).
    umask = os.umask(0o022)
    try:
        mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755")
        for bind, fd in zip(binds, fds, strict=True):
            target = scratch + os.path.normpath(bind.path)
            _make_mount_point(target, is_dir=stat.S_ISDIR(os.fstat(fd).st_mode))
            mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
            # Bind mounts ignore flags on creation; they take effect on a remount.
            flags = MS_BIND | MS_REMOUNT | MS_NOSUID
            flags |= 0 if bind.writable else MS_RDONLY
            flags |= 0 if bind.executable else MS_NOEXEC
            flags |= 0 if bind.devices else MS_NODEV
            mount(None, target, None, flags)
        for path, link_target in (symlinks or {}).items():
            link = scratch + os.path.normpath(path)
            os.makedirs(os.path.dirname(link), mode=0o755, exist_ok=True)
            os.symlink(link_target, link)
    finally:
        os.umask(umask)
        for fd in fds:
            os.close(fd)
    mount(None, scratch, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # pivot_root(".", ".") stacks the old root on the new one; detaching it leaves only ours.
    os.chdir(scratch)
    pivot_root(".", ".")
    umount2(".", MNT_DETACH)
    os.chdir("/")


def _make_mount_point(target: str, is_dir: bool) -> None:
    # A path inside an earlier bind already exists there; creating it would hit a read-only
    # mount.
    if os.path.lexists(target):
        return
    if is_dir:
        os.makedirs(target, mode=0o755)
        return
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
