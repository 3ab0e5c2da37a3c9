"""`ringfence dev` argument handling: one clear line and exit code 2 for operator mistakes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.frontend import VhostUserConnection


def run_dev(*args: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "backend", "dev", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(b"\0" * (1 << 20))
    return path


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ringfence: ")
    for needle in needles:
        assert needle in lines[0]


def test_missing_image_is_one_line_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.raw"
    result = run_dev("--blk", f"{tmp_path / 's.sock'}={missing}")
    assert_one_line_error(result, str(missing), "does not exist")
    assert not (tmp_path / "s.sock").exists()


def test_image_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    result = run_dev("--blk", f"{tmp_path / 's.sock'}={tmp_path}")
    assert_one_line_error(result, str(tmp_path), "not a regular file")


def test_socket_path_in_use_is_refused(tmp_path: Path, image: Path) -> None:
    path = tmp_path / "busy.sock"
    holder = socket.socket(socket.AF_UNIX)
    holder.bind(str(path))
    holder.listen(1)
    try:
        result = run_dev("--blk", f"{path}={image}")
    finally:
        holder.close()
    assert_one_line_error(result, str(path), "in use")


def test_socket_path_that_is_a_file_is_refused(tmp_path: Path, image: Path) -> None:
    path = tmp_path / "file.sock"
    path.write_text("not a socket")
    result = run_dev("--blk", f"{path}={image}")
    assert_one_line_error(result, str(path), "not a socket")
    assert path.read_text() == "not a socket"


def test_malformed_blk_argument_is_refused(image: Path) -> None:
    assert_one_line_error(run_dev("--blk", str(image)), "SOCKET=IMAGE")


def test_readonly_must_name_an_export(tmp_path: Path, image: Path) -> None:
    result = run_dev("--blk", f"{tmp_path / 'a.sock'}={image}", "--readonly", "/other.sock")
    assert_one_line_error(result, "/other.sock", "names no --blk")


def test_stale_socket_is_replaced_and_sigterm_cleans_up(tmp_path: Path, image: Path) -> None:
    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a crashed backend leaves behind
    proc = subprocess.Popen(
        [sys.executable, "-m", "backend", "dev", "--blk", f"{path}={image}"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        def serving() -> bool:
            """Connected and answered: the loop runs (accepting alone proves only a backlog)."""
            try:
                probe = VhostUserConnection.connect(str(path))
            except OSError:
                return False
            try:
                return probe.get_features() != 0
            finally:
                probe.close()

        wait_for(serving)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "front-end connected" in err  # our probe, logged as one line per connection
    assert "shutting down" in err
    assert not os.path.exists(path)
