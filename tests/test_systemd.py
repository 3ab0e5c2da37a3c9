"""systemd integration (broker/systemd.py): sd_notify, the hardened unit and install-unit."""

from __future__ import annotations

import argparse
import os
import pwd
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.systemd import UNIT_NAME, add_commands, install_unit, notify, unit_text
from tests.devproc import REPO

MAX_EXPOSURE = 4.0


# Unsigned development policies (allow_unsigned = true) throughout: see tests/conftest.py.
pytestmark = pytest.mark.usefixtures("unsigned_policies_allowed")


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: install the systemd package"
    return subprocess.run([tool, *args], capture_output=True, text=True, check=False)


# --- sd_notify ---------------------------------------------------------------------------------


def test_notify_sends_ready_to_the_socket_in_notify_socket(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert notify("READY=1\nSTATUS=serving") is True
        assert server.recv(4096) == b"READY=1\nSTATUS=serving"


def test_notify_reaches_an_abstract_socket_named_with_an_at_sign(
        monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"ringfence-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1") is True
        assert server.recv(4096) == b"READY=1"


def test_notify_outside_systemd_or_to_a_vanished_socket_returns_false(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert notify("READY=1") is False


# --- the unit ----------------------------------------------------------------------------------


def write_policy(directory: Path, user: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    policy = directory / "policy.toml"
    policy.write_text('[broker]\nimage_roots = ["/srv/vm-images", "/data/images"]\n'
                      f'run_dir = "/run/ringfence"\nbackend_user = "{user}"\n'
                      "allow_unsigned = true\n")
    return policy


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    """The unit as install-unit writes it here, pointing at this checkout's ringfence."""
    return Path(install_unit(str(tmp_path / "units"), policy_path=str(write_policy(
        tmp_path, "nobody")), say=lambda _: None))


def test_unit_passes_systemd_analyze_verify(unit: Path) -> None:
    done = systemd_analyze("verify", str(unit))
    assert done.returncode == 0, done.stderr
    assert UNIT_NAME not in done.stderr, done.stderr  # no warning about our unit either


def test_unit_exposure_is_at_most_4(unit: Path) -> None:
    done = systemd_analyze("security", "--offline=yes", "--threshold=40", str(unit))
    match = re.search(rf"Overall exposure level for {UNIT_NAME}: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    print(f"\n{UNIT_NAME} exposure: {match[1]}")
    assert done.returncode == 0 and float(match[1]) <= MAX_EXPOSURE, done.stdout


def test_unit_makes_only_the_policy_image_roots_writable(unit: Path) -> None:
    text = unit.read_text()
    assert "ReadWritePaths=-/srv/vm-images -/data/images\n" in text
    assert "ProtectSystem=strict\n" in text and "RuntimeDirectory=ringfence\n" in text
    assert "DevicePolicy=closed\nDeviceAllow=/dev/net/tun rw\n" in text
    assert "RestrictAddressFamilies=AF_UNIX AF_NETLINK\n" in text
    assert "PrivateDevices" not in text


def test_shipped_unit_is_what_unit_text_generates() -> None:
    shipped = (REPO / "systemd" / UNIT_NAME).read_text()
    assert shipped == unit_text("/usr/local/bin/ringfence")
    assert "ExecStart=/usr/local/bin/ringfence broker --policy /etc/ringfence/policy.toml\n" \
        in shipped
    assert "ExecReload=/bin/kill -HUP $MAINPID\n" in shipped


def test_an_interpreter_below_a_home_directory_is_bound_back_in(tmp_path: Path) -> None:
    messages: list[str] = []
    path = install_unit(str(tmp_path / "units"), policy_path=str(write_policy(tmp_path, "nobody")),
                        ringfence_path="/home/ops/venv/bin/ringfence", say=messages.append)
    text = Path(path).read_text()
    assert "ExecStart=/home/ops/venv/bin/ringfence broker --policy" in text
    assert re.search(r"^BindReadOnlyPaths=.*/home/ops(\s|$)", text, re.M)
    assert "ProtectHome=tmpfs\n" in text


# --- install-unit ------------------------------------------------------------------------------

TEST_USER = "rf-unit-test"


@pytest.fixture
def no_test_user() -> Iterator[str]:
    subprocess.run(["userdel", TEST_USER], capture_output=True, check=False)
    yield TEST_USER
    subprocess.run(["userdel", TEST_USER], capture_output=True, check=False)


def test_install_unit_creates_the_backend_user_and_the_policy_dir_and_says_so(
        tmp_path: Path, no_test_user: str) -> None:
    policy = tmp_path / "etc" / "ringfence" / "policy.toml"
    messages: list[str] = []
    path = install_unit(str(tmp_path / "units"), policy_path=str(policy), say=messages.append)
    assert path == str(tmp_path / "units" / UNIT_NAME)
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"
    assert f"no policy at {policy} yet: the unit allows writes to /var/lib/ringfence/images" \
        in messages
    assert policy.parent.is_dir()
    assert f"created {policy.parent}" in messages
    assert any(m.startswith(f"wrote {path}") for m in messages)
    assert any("daemon-reload" in m for m in messages)

    messages.clear()  # now with the policy, which names the backend user to create
    write_policy(policy.parent, no_test_user)
    install_unit(str(tmp_path / "units"), policy_path=str(policy), say=messages.append)
    entry = pwd.getpwnam(no_test_user)
    assert entry.pw_shell == "/usr/sbin/nologin" and entry.pw_uid < 1000  # a system user
    assert not os.path.exists(entry.pw_dir)
    assert f"created system user {no_test_user}" in messages
    assert f"using image roots, run directory and backend user from {policy}" in messages
    assert "-/srv/vm-images" in Path(path).read_text()

    messages.clear()  # a third run changes nothing and says so
    install_unit(str(tmp_path / "units"), policy_path=str(policy), say=messages.append)
    assert f"system user {no_test_user} exists" in messages


def test_install_unit_command_writes_the_unit(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="ringfence")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["install-unit", "--dest", str(tmp_path),
                              "--policy", str(write_policy(tmp_path, "nobody"))])
    assert args.func(args) == 0
    assert (tmp_path / UNIT_NAME).exists()
    assert f"wrote {tmp_path / UNIT_NAME}" in capsys.readouterr().out


def test_install_unit_command_with_a_broken_policy_exits_1_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[broker\n")
    parser = argparse.ArgumentParser(prog="ringfence")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["install-unit", "--dest", str(tmp_path), "--policy", str(policy)])
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ringfence: policy {policy}") and err.count("\n") == 1
    assert not (tmp_path / UNIT_NAME).exists()
