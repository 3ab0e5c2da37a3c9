"""Open disk images for a backend: only below an image root, never through a symlink, locked.

The broker runs as root, so a careless open could hand a backend any file on the host. Here an
image is reached by walking its path one component at a time from an image root with
O_NOFOLLOW, so a symlink (or '..') planted below a root cannot redirect the open, and the file
must be a regular file or a block device. Each image is then locked with an open file
description (OFD) lock, exclusive for read-write and shared for read-only, so two VMs cannot
write one image. The lock belongs to the open file description, so it stays held while the
backend holds the FD passed to it, even after the broker closes its own copy.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Sequence

# struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid, then padding to 32 bytes.
_FLOCK = struct.Struct("hhqqi4x")


class ImageError(Exception):
    """An image cannot be used; the message is one sentence naming the file and the fix."""


def shown(text: str) -> str:
    """`text` (a name or path from the policy) for a one-line message: as is when it is plain,
    quoted and escaped (repr) when it is empty or has spaces, quotes or unprintable characters,
    so that no file can put a line break or a terminal escape into an error or a log line."""
    if text and text.isprintable() and not any(c.isspace() or c in "'\"" for c in text):
        return text
    return repr(text)


def split_image_path(roots: Sequence[str], image: str) -> list[tuple[str, tuple[str, ...]]]:
    """The (root, components below it) pairs where `image` may live, in search order (pure).

    An absolute image must lie below one of `roots` (absolute, normalised directories); a
    relative one is looked up in each root in turn. Empty, '.' and '..' components are refused
    so that the components alone say where the file is.
    """
    if "\0" in image:
        raise ImageError(f"image {image!r} contains a NUL byte; fix its name in the policy")
    parts = tuple(image.removeprefix("/").split("/"))
    for part in parts:
        if part in ("", ".", ".."):
            what = "an empty" if part == "" else f"a {part!r}"
            raise ImageError(f"image {shown(image)} has {what} component; name the file "
                             "plainly below an image root, without '.', '..' or '//'")
    if not image.startswith("/"):
        return [(root, parts) for root in roots]
    for root in roots:
        root_parts = tuple(root.strip("/").split("/"))
        if len(parts) > len(root_parts) and parts[: len(root_parts)] == root_parts:
            return [(root, parts[len(root_parts):])]
    raise ImageError(f"image {shown(image)} is outside every image root "
                     f"({', '.join(map(shown, roots))}); move it below one or add its directory "
                     "to broker.image_roots")


def open_image(roots: Sequence[str], image: str, *, readonly: bool) -> int:
    """Open and lock `image` for a backend; returns an O_CLOEXEC FD the caller owns.

    The FD is O_RDONLY with a shared lock when `readonly`, else O_RDWR with an exclusive lock.
    """
    for root, parts in split_image_path(roots, image):
        fd = _open_below(root, parts, readonly)
        if fd is not None:
            break
    else:
        raise ImageError(f"image {shown(image)} was not found below any image root "
                         f"({', '.join(map(shown, roots))}); create it there or fix the policy")
    path = os.path.join(root, *parts)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode) and not stat.S_ISBLK(mode):
            raise ImageError(f"image {shown(path)} is not a regular file or block device; "
                             "point the policy at a disk image")
        os.set_blocking(fd, True)  # O_NONBLOCK was only there to make the open itself safe
        _lock(fd, path, readonly)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_below(root: str, parts: tuple[str, ...], readonly: bool) -> int | None:
    """Open root/parts without following any symlink below root; None if it does not exist."""
    try:
        dir_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(f"image root {shown(root)} cannot be opened: {exc.strerror}; create it "
                         "or fix broker.image_roots") from None
    try:
        for depth, part in enumerate(parts[:-1], 1):
            try:
                next_fd = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC,
                                  dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    return None
                raise _refusal(dir_fd, part, os.path.join(root, *parts[:depth]), exc) from None
            os.close(dir_fd)
            dir_fd = next_fd
        # O_NONBLOCK so that a FIFO planted in a root cannot hang the broker in open();
        # O_NOCTTY so that a terminal cannot become the broker's controlling terminal.
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(parts[-1], flags | os.O_NOCTTY | os.O_NONBLOCK, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise _refusal(dir_fd, parts[-1], os.path.join(root, *parts), exc) from None
    finally:
        os.close(dir_fd)


def _refusal(dir_fd: int, part: str, path: str, exc: OSError) -> ImageError:
    """The error for a component that could not be opened: a symlink is named as such."""
    try:
        is_link = stat.S_ISLNK(os.stat(part, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        is_link = False
    if is_link:
        return ImageError(f"image path {shown(path)} is a symlink, and images are never reached "
                          "through symlinks; replace it with the real directory or file")
    return ImageError(f"image path {shown(path)} cannot be opened: {exc.strerror}; check that it "
                      "exists with the right type and permissions")


def _lock(fd: int, path: str, readonly: bool) -> None:
    lock_type = fcntl.F_RDLCK if readonly else fcntl.F_WRLCK
    try:  # l_start 0, l_len 0: the whole file, however it grows; l_pid must be 0 for OFD locks
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(lock_type, os.SEEK_SET, 0, 0, 0))
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise ImageError(f"image {shown(path)} is locked by another VM or process; stop the "
                             "other user, give this VM its own image, or make every use readonly"
                             ) from None
        raise ImageError(f"image {shown(path)} cannot be locked: {exc.strerror}; keep images on "
                         "a local filesystem that supports OFD locks") from None
