"""Opening images safely (broker/images.py): below a root, no symlinks, the right kind, locked."""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.images import ImageError, open_image, shown, split_image_path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "web1.raw").write_bytes(b"web1" * 1024)
    (root / "sub" / "db1.raw").write_bytes(b"db1!" * 1024)
    return root


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """FDs a test opened; closed at the end so that their locks go away."""
    opened: list[int] = []
    yield opened
    for fd in opened:
        os.close(fd)


def refused(roots: list[str], image: str, *, readonly: bool = False) -> str:
    with pytest.raises(ImageError) as info:
        fd = open_image(roots, image, readonly=readonly)
        os.close(fd)
    message = str(info.value)
    assert "\n" not in message and "; " in message, message
    return message


def test_relative_image_opens_read_write(root: Path, fds: list[int]) -> None:
    fds.append(open_image([str(root)], "web1.raw", readonly=False))
    fd = fds[0]
    assert os.pread(fd, 4, 0) == b"web1"
    assert os.pwrite(fd, b"WEB1", 0) == 4
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    assert flags & os.O_ACCMODE == os.O_RDWR
    assert not flags & os.O_NONBLOCK  # only there for the open itself
    assert not os.get_inheritable(fd)


def test_readonly_image_opens_read_only(root: Path, fds: list[int]) -> None:
    fds.append(open_image([str(root)], "sub/db1.raw", readonly=True))
    assert fcntl.fcntl(fds[0], fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    with pytest.raises(OSError):
        os.pwrite(fds[0], b"x", 0)


def test_absolute_image_below_a_root_opens(root: Path, fds: list[int]) -> None:
    fds.append(open_image(["/nonexistent", str(root)], f"{root}/sub/db1.raw", readonly=True))
    assert os.pread(fds[0], 4, 0) == b"db1!"


def test_relative_image_is_looked_up_in_each_root_in_turn(root: Path, tmp_path: Path,
                                                          fds: list[int]) -> None:
    second = tmp_path / "more"
    second.mkdir()
    (second / "only-here.raw").write_bytes(b"here")
    fds.append(open_image([str(root), str(second)], "only-here.raw", readonly=True))
    assert os.pread(fds[0], 4, 0) == b"here"


def test_symlinked_directory_component_refused(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.raw").write_bytes(b"secret")
    (root / "link").symlink_to(outside)
    message = refused([str(root)], "link/secret.raw")
    assert f"image path {root}/link is a symlink" in message


def test_symlink_to_a_directory_inside_the_root_refused_too(root: Path) -> None:
    (root / "alias").symlink_to(root / "sub")
    assert "is a symlink" in refused([str(root)], "alias/db1.raw")


def test_symlinked_image_file_refused(root: Path) -> None:
    (root / "shadow.raw").symlink_to("/etc/shadow")
    assert f"image path {root}/shadow.raw is a symlink" in refused([str(root)], "shadow.raw")


def test_dangling_symlink_refused_not_skipped(root: Path, tmp_path: Path) -> None:
    (root / "gone.raw").symlink_to(tmp_path / "nowhere")
    assert "is a symlink" in refused([str(root)], "gone.raw")


def test_symlink_in_the_root_itself_is_the_operators_choice(root: Path, tmp_path: Path,
                                                            fds: list[int]) -> None:
    (tmp_path / "root-link").symlink_to(root)
    fds.append(open_image([str(tmp_path / "root-link")], "web1.raw", readonly=True))


@pytest.mark.parametrize("image", ["../images/web1.raw", "sub/../web1.raw", "../../etc/passwd"])
def test_dot_dot_refused(root: Path, image: str) -> None:
    assert "has a '..' component" in refused([str(root)], image)


@pytest.mark.parametrize(("image", "needle"), [
    ("./web1.raw", "has a '.' component"),
    ("sub//db1.raw", "has an empty component"),
    ("sub/", "has an empty component"),
    ("", "has an empty component"),
    ("web1.raw\0x", "contains a NUL byte"),
])
def test_odd_components_refused(root: Path, image: str, needle: str) -> None:
    assert needle in refused([str(root)], image)


def test_absolute_image_outside_every_root_refused(root: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere.raw").write_bytes(b"x")
    message = refused([str(root)], f"{tmp_path}/elsewhere.raw")
    assert f"image {tmp_path}/elsewhere.raw is outside every image root ({root})" in message


def test_absolute_image_with_dot_dot_out_of_the_root_refused(root: Path) -> None:
    assert "has a '..' component" in refused([str(root)], f"{root}/../images/web1.raw")


def test_root_prefix_that_is_not_a_directory_boundary_refused(root: Path, tmp_path: Path) -> None:
    (tmp_path / "images2").mkdir()
    (tmp_path / "images2" / "x.raw").write_bytes(b"x")
    assert "outside every image root" in refused([str(root)], f"{root}2/x.raw")


def test_missing_image_refused(root: Path) -> None:
    assert "was not found below any image root" in refused([str(root)], "sub/nope.raw")
    assert "was not found below any image root" in refused([str(root)], "nodir/nope.raw")


def test_missing_root_refused(tmp_path: Path) -> None:
    assert "image root" in refused([str(tmp_path / "absent")], "web1.raw")


def test_file_used_as_a_directory_refused(root: Path) -> None:
    assert "cannot be opened: Not a directory" in refused([str(root)], "web1.raw/x")


def test_directory_refused(root: Path) -> None:
    assert f"image {root}/sub is not a regular file or block device" in refused(
        [str(root)], "sub", readonly=True)


def test_fifo_refused_without_hanging(root: Path) -> None:
    os.mkfifo(root / "pipe.raw")
    assert "is not a regular file or block device" in refused([str(root)], "pipe.raw",
                                                              readonly=True)


def test_block_device_accepted(root: Path, fds: list[int]) -> None:
    rdev = os.stat("/dev/loop0").st_rdev if os.path.exists("/dev/loop0") else None
    if rdev is None:
        pytest.skip("no /dev/loop0 to copy a block device node from")
    try:
        os.mknod(root / "loop.blk", stat.S_IFBLK | 0o600, rdev)
    except PermissionError:
        pytest.skip("cannot create device nodes here")
    fds.append(open_image([str(root)], "loop.blk", readonly=True))
    assert stat.S_ISBLK(os.fstat(fds[0]).st_mode)


def test_image_locked_by_another_open_file_description_refused(root: Path,
                                                               fds: list[int]) -> None:
    fds.append(open_image([str(root)], "web1.raw", readonly=False))
    # A second open is a separate open file description, as another VM's would be.
    message = refused([str(root)], "web1.raw")
    assert message.startswith(f"image {root}/web1.raw is locked by another VM or process; ")
    assert "locked" in refused([str(root)], f"{root}/web1.raw", readonly=True)


def test_readonly_user_blocks_a_writer(root: Path, fds: list[int]) -> None:
    fds.append(open_image([str(root)], "web1.raw", readonly=True))
    assert "is locked by another VM or process" in refused([str(root)], "web1.raw")


def test_readonly_opens_share_the_image(root: Path, fds: list[int]) -> None:
    fds.append(open_image([str(root)], "web1.raw", readonly=True))
    fds.append(open_image([str(root)], f"{root}/web1.raw", readonly=True))
    assert os.pread(fds[1], 4, 0) == b"web1"


def test_lock_follows_the_fd_not_the_process_and_ends_with_it(root: Path) -> None:
    fd = open_image([str(root)], "web1.raw", readonly=False)
    passed = os.dup(fd)  # as the FD handed to a backend: the same open file description
    os.close(fd)
    assert "locked" in refused([str(root)], "web1.raw")
    os.close(passed)
    os.close(open_image([str(root)], "web1.raw", readonly=False))


def test_refused_open_leaves_no_fd_behind(root: Path, fds: list[int]) -> None:
    fds.append(open_image([str(root)], "web1.raw", readonly=False))
    before = len(os.listdir("/proc/self/fd"))
    refused([str(root)], "web1.raw")
    refused([str(root)], "sub", readonly=True)
    assert len(os.listdir("/proc/self/fd")) == before


def test_split_image_path_lists_the_candidate_places() -> None:
    roots = ["/a", "/b/c"]
    assert split_image_path(roots, "x/y.raw") == [("/a", ("x", "y.raw")), ("/b/c", ("x", "y.raw"))]
    assert split_image_path(roots, "/b/c/y.raw") == [("/b/c", ("y.raw",))]


def one_line(message: str) -> None:
    assert len(message.splitlines()) == 1, message
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in message), message


@pytest.mark.parametrize(("image", "needle"), [
    ("/etc/x\ny", r"image '/etc/x\ny' is outside every image root (/a, '/b\x1b[2J')"),
    ("x/\x1b]0;owned\x07/../y", r"image 'x/\x1b]0;owned\x07/../y' has a '..' component"),
    ("x\u2028//y", r"image 'x\u2028//y' has an empty component"),
])
def test_image_names_from_the_policy_are_escaped_so_each_error_is_one_line(
        image: str, needle: str) -> None:
    with pytest.raises(ImageError) as info:
        split_image_path(["/a", "/b\x1b[2J"], image)
    one_line(str(info.value))
    assert needle in str(info.value)


def test_paths_opened_below_a_root_are_escaped_in_errors(root: Path) -> None:
    odd = root / "odd\ndir"
    odd.mkdir()
    message = refused([str(root)], "odd\ndir", readonly=True)
    one_line(message)
    assert f"image {str(odd)!r} is not a regular file" in message
    gone = f"{root}/gone\r"
    message = refused([gone], "web1.raw")
    one_line(message)
    assert f"image root {gone!r} cannot be opened" in message


def test_shown_leaves_plain_names_alone_and_quotes_everything_else() -> None:
    assert shown("/srv/images/web1.raw") == "/srv/images/web1.raw"
    assert shown("Größe.raw") == "Größe.raw"
    assert shown("my disk.raw") == "'my disk.raw'"
    assert shown("it's") == '"it\'s"'
    assert shown("") == "''"
    assert shown("a\nb\x1b[0m\x85") == r"'a\nb\x1b[0m\x85'"
