"""A real ringfence deployment in a temp directory: users, keys, images, signed policy, broker.

Runs as root, like the broker itself. Everything lives under one directory, so tests do not
touch /etc or /run; the backend and VM users are real system users (created if missing).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.devproc import REPO, wait_until

BACKEND_USER = "ringfence"


def ensure_user(name: str) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", name], check=True)
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def ringfence(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, check=False)


class Deployment:
    """Keys, image root, run dir and a policy of `vms` ({name: toml body lines})."""

    def __init__(self, root: Path, *, seccomp: str = "kill") -> None:
        self.root = root
        self.images = root / "images"
        self.run_dir = root / "run"
        self.keys = root / "keys"
        self.policy = root / "policy.toml"
        self.seccomp = seccomp
        self.images.mkdir()
        self.keys.mkdir(mode=0o700)
        self.backend_ids = ensure_user(BACKEND_USER)
        result = ringfence("policy", "keygen", "--out", str(self.keys / "ops"))
        assert result.returncode == 0, result.stderr
        self.broker: subprocess.Popen[str] | None = None
        self._log = root / "broker.log"
        self._notify: socket.socket | None = None

    @classmethod
    @contextlib.contextmanager
    def temporary(cls, **kwargs: Any) -> Iterator[Deployment]:
        """A deployment in a fresh directory that other users may traverse (as /run is)."""
        root = Path(tempfile.mkdtemp(prefix="rf-deploy-"))
        root.chmod(0o755)
        deploy = cls(root, **kwargs)
        try:
            yield deploy
        finally:
            deploy.stop_broker()
            shutil.rmtree(root, ignore_errors=True)

    def image(self, name: str, mib: int = 64, content: bytes = b"") -> Path:
        path = self.images / name
        with open(path, "wb") as f:
            f.write(content)
            f.truncate(mib << 20)
        return path

    def write_policy(self, vms: dict[str, str], groups: Sequence[str] = ("tenant-a",),
                     *, sign: bool = True) -> None:
        lines = [
            "[broker]",
            f'image_roots = ["{self.images}"]',
            f'run_dir = "{self.run_dir}"',
            f'backend_user = "{BACKEND_USER}"',
            f'trusted_keys = ["{self.keys / "ops.pub"}"]',
            f'seccomp = "{self.seccomp}"',
            "",
        ]
        for group in groups:
            lines += [f"[groups.{group}]", ""]
        for name, body in vms.items():
            lines += [f"[vms.{name}]", body.strip(), ""]
        self.policy.write_text("\n".join(lines))
        if sign:
            self.sign()

    def sign(self) -> None:
        result = ringfence("policy", "sign", str(self.policy), "--key", str(self.keys / "ops"))
        assert result.returncode == 0, result.stderr

    def start_broker(self, timeout: float = 30, *, netns: str | None = None) -> str:
        """Start the broker with a test NOTIFY_SOCKET; return what it notified once ready.
        `netns`: run it in that network namespace, where it then creates the VMs' taps."""
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_path = tempfile.mktemp(prefix="rf-notify-", dir=self.root)
        self._notify.bind(notify_path)
        self._notify.settimeout(timeout)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path)
        log = open(self._log, "w")  # noqa: SIM115 - the broker writes it while it runs
        argv = [sys.executable, "-m", "backend", "broker", "--policy", str(self.policy)]
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]  # ip execs: the pid is the broker's
        self.broker = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=log,
                                       text=True)
        log.close()
        try:
            return self._notify.recv(4096).decode()
        except TimeoutError:
            raise AssertionError(f"broker sent no READY=1:\n{self.log()}") from None

    def notifications(self, timeout: float = 10) -> str:
        assert self._notify is not None
        self._notify.settimeout(timeout)
        return self._notify.recv(4096).decode()

    def log(self) -> str:
        return self._log.read_text(errors="replace") if self._log.exists() else ""

    def wait_for_log(self, needle: str, timeout: float = 30) -> None:
        wait_until(lambda: needle in self.log(), timeout, f"broker log line with {needle!r}")

    def status(self) -> dict[str, Any]:
        result = ringfence("status", "--policy", str(self.policy), "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)

    def backend_pid(self, group: str = "tenant-a") -> int | None:
        return self.status()["groups"][group]["pid"]

    def socket(self, vm: str, disk: int = 0) -> str:
        return str(self.run_dir / "vms" / vm / f"disk{disk}.sock")

    def nic_socket(self, vm: str, nic: int = 0) -> str:
        return str(self.run_dir / "vms" / vm / f"nic{nic}.sock")

    def stop_broker(self) -> int | None:
        if self.broker is None:
            return None
        if self.broker.poll() is None:
            self.broker.terminate()
            try:
                self.broker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.broker.kill()
                self.broker.wait()
        if self._notify is not None:
            self._notify.close()
        return self.broker.returncode
