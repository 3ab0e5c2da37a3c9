"""The broker as a real root daemon: signed policy, confined backend, admin socket, restarts.

QEMU's part is played by the test front-end, run as the VM's user in a forked child.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deploy import Deployment, ensure_user, ringfence
from tests.devproc import wait_until
from tests.frontend import BlkFrontend

VM1 = 'group = "tenant-a"\nuser = "rf-vm1"\ndisks = [ { image = "vm1.raw" } ]'
VM2 = 'group = "tenant-a"\nuser = "rf-vm2"\ndisks = [ { image = "vm2.raw" } ]'
BLOCK = 4096


def as_user(user: str, fn: Callable[[], Any]) -> Any:
    """Run `fn` in a child that has become `user`; return its result or raise its error."""
    uid, gid = ensure_user(user)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            outcome: tuple[bool, Any] = (True, fn())
        except BaseException as exc:  # report everything to the parent
            outcome = (False, f"{type(exc).__name__}: {exc}")
        with os.fdopen(write_end, "wb") as f:
            pickle.dump(outcome, f)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        ok, value = pickle.load(f)
    os.waitpid(pid, 0)
    if not ok:
        raise AssertionError(value)
    return value


def write_and_read(sock: str, sector: int, payload: bytes) -> bytes:
    with BlkFrontend.open(sock) as dev:
        assert dev.write(sector, payload) == 0
        status, data = dev.read(sector, len(payload))
        assert status == 0
        return data


@pytest.fixture
def deployment() -> Iterator[Deployment]:
    for user in ("rf-vm1", "rf-vm2"):
        ensure_user(user)
    with Deployment.temporary() as deploy:
        deploy.image("vm1.raw")
        deploy.image("vm2.raw")
        deploy.write_policy({"vm1": VM1})
        yield deploy


def test_broker_notifies_ready_and_serves_the_vm_user_only(deployment: Deployment) -> None:
    assert "READY=1" in deployment.start_broker()
    sock = deployment.socket("vm1")
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == ensure_user("rf-vm1")[0]

    payload = b"through the broker".ljust(BLOCK, b"\0")
    assert as_user("rf-vm1", lambda: write_and_read(sock, 16, payload)) == payload
    with open(deployment.images / "vm1.raw", "rb") as f:
        f.seek(16 * 512)
        assert f.read(BLOCK) == payload

    def connect() -> None:
        socket.socket(socket.AF_UNIX).connect(sock)

    with pytest.raises(AssertionError, match="PermissionError"):
        as_user("rf-vm2", connect)
    devices = deployment.status()["groups"]["tenant-a"]["devices"]
    assert [(d["vm"], d["disk"]) for d in devices] == [("vm1", 0)]
    assert devices[0]["requests"] >= 2


def test_backend_runs_confined_in_every_thread(deployment: Deployment) -> None:
    deployment.start_broker()
    pid = deployment.backend_pid()
    assert pid is not None
    backend_uid = ensure_user("ringfence")[0]
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = dict(line.split(":\t", 1) for line in (task / "status").read_text().splitlines()
                      if ":\t" in line)
        assert status["Seccomp"].strip() == "2"
        assert status["NoNewPrivs"].strip() == "1"
        assert int(status["CapEff"], 16) == 0
        assert int(status["CapBnd"], 16) == 0
        assert int(status["Uid"].split()[0]) == backend_uid
    for ns in ("net", "mnt", "ipc", "uts"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")


def test_reload_adds_and_removes_a_vm_without_disturbing_the_other(
        deployment: Deployment) -> None:
    deployment.start_broker()
    sock1 = deployment.socket("vm1")
    backend = deployment.backend_pid()
    deployment.write_policy({"vm1": VM1, "vm2": VM2})
    result = ringfence("reload", "--policy", str(deployment.policy))
    assert result.returncode == 0, result.stdout + result.stderr
    payload = os.urandom(BLOCK)
    assert as_user("rf-vm2", lambda: write_and_read(deployment.socket("vm2"), 8, payload)) \
        == payload
    assert as_user("rf-vm1", lambda: write_and_read(sock1, 8, payload)) == payload

    deployment.write_policy({"vm1": VM1})
    assert ringfence("reload", "--policy", str(deployment.policy)).returncode == 0
    assert not os.path.exists(deployment.socket("vm2"))
    assert deployment.backend_pid() == backend  # nothing restarted
    assert as_user("rf-vm1", lambda: write_and_read(sock1, 24, payload)) == payload


def reload_error(deployment: Deployment) -> str:
    """The one error a refused reload reports: the broker's answer (exit 1), or the client's
    own when the policy it must read to find the broker cannot be parsed (exit 2)."""
    result = ringfence("reload", "--policy", str(deployment.policy), "--json")
    assert result.returncode in (1, 2), result.stdout
    if result.returncode == 2:
        assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
        return result.stderr
    return result.stdout


@pytest.mark.parametrize("case", ["symlink", "outside-roots", "locked", "tampered", "malformed"])
def test_bad_reload_is_refused_with_one_clear_error_and_vm1_keeps_serving(
        deployment: Deployment, tmp_path: Path, case: str) -> None:
    deployment.start_broker()
    sock1 = deployment.socket("vm1")
    held = None
    if case == "symlink":
        (deployment.images / "real").mkdir()
        deployment.image("real/vm2.raw")
        (deployment.images / "link").symlink_to(deployment.images / "real")
        deployment.write_policy({"vm1": VM1, "vm2": VM2.replace("vm2.raw", "link/vm2.raw")})
        expected = "symlink"
    elif case == "outside-roots":
        outside = tmp_path / "outside.raw"
        outside.write_bytes(b"\0" * BLOCK)
        deployment.write_policy({"vm1": VM1}, sign=False)
        text = deployment.policy.read_text() + f'\n[vms.vm2]\ngroup = "tenant-a"\nuser = ' \
            f'"rf-vm2"\ndisks = [ {{ image = "{outside}" }} ]\n'
        deployment.policy.write_text(text)
        expected = "image root"
    elif case == "locked":
        import fcntl
        import struct
        held = os.open(deployment.images / "vm2.raw", os.O_RDWR)
        fcntl.fcntl(held, fcntl.F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0))
        deployment.write_policy({"vm1": VM1, "vm2": VM2})
        expected = "locked"
    elif case == "tampered":
        deployment.write_policy({"vm1": VM1, "vm2": VM2})
        deployment.policy.write_text(deployment.policy.read_text() + "\n# tampered\n")
        expected = "signature"
    else:
        deployment.policy.write_text(deployment.policy.read_text() + "\n[vms.bad\n")
        expected = "line"
    if case == "outside-roots":
        signed = ringfence("policy", "sign", str(deployment.policy), "--key",
                           str(deployment.keys / "ops"))
        # The policy itself is refused at parse time: signing it fails the same way.
        assert signed.returncode == 2 and expected in signed.stdout + signed.stderr
    try:
        error = reload_error(deployment)
    finally:
        if held is not None:
            os.close(held)
    assert expected in error, error
    payload = os.urandom(BLOCK)
    assert as_user("rf-vm1", lambda: write_and_read(sock1, 32, payload)) == payload
    assert deployment.broker is not None and deployment.broker.poll() is None


def test_admin_request_from_an_unprivileged_user_is_refused(deployment: Deployment) -> None:
    deployment.start_broker()
    admin = str(deployment.run_dir / "admin.sock")
    os.chmod(admin, 0o666)  # let the request reach the peer check, which must refuse it

    def ask() -> bytes:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(admin)
            sock.sendall(b'{"cmd": "stop"}\n')
            return sock.recv(4096)

    answer = as_user("rf-vm2", ask)
    assert b'"ok":false' in answer and b"permission denied" in answer
    assert deployment.broker is not None and deployment.broker.poll() is None
    deployment.wait_for_log("admin request refused")


def test_killed_backend_is_restarted_and_serves_again(deployment: Deployment) -> None:
    deployment.start_broker()
    sock = deployment.socket("vm1")
    payload = os.urandom(BLOCK)
    assert as_user("rf-vm1", lambda: write_and_read(sock, 40, payload)) == payload
    first = deployment.backend_pid()
    assert first is not None
    os.kill(first, signal.SIGKILL)
    deployment.wait_for_log("was killed by SIGKILL")
    wait_until(lambda: deployment.backend_pid() not in (None, first), 30, "a new backend")
    assert as_user("rf-vm1", lambda: write_and_read(sock, 40, payload)) == payload

    second = deployment.backend_pid()
    assert second is not None
    os.kill(second, signal.SIGSYS)
    deployment.wait_for_log("killed by its seccomp filter (SIGSYS)")


@pytest.mark.parametrize("damage", ["unsigned", "tampered"])
def test_broker_refuses_to_start_on_a_bad_signature(deployment: Deployment,
                                                    damage: str) -> None:
    sig = Path(str(deployment.policy) + ".sig")
    if damage == "unsigned":
        sig.unlink()
    else:
        deployment.policy.write_text(deployment.policy.read_text() + "\n")
    result = ringfence("broker", "--policy", str(deployment.policy), timeout=30)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "signature" in errors[0], result.stderr
    assert not (deployment.run_dir / "admin.sock").exists()


def timed_reads(sock: str, count: int) -> float:
    with BlkFrontend.open(sock) as dev:
        started = time.monotonic()
        for i in range(count):
            assert dev.read(i * 8, BLOCK)[0] == 0
        return time.monotonic() - started


def test_qos_change_is_applied_in_place_and_limits_the_vm(deployment: Deployment) -> None:
    deployment.start_broker()
    sock = deployment.socket("vm1")
    backend = deployment.backend_pid()
    fast = as_user("rf-vm1", lambda: timed_reads(sock, 100))
    deployment.write_policy({"vm1": VM1 + "\nqos = { iops_limit = 100 }"})
    result = ringfence("reload", "--policy", str(deployment.policy), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["retuned"] == ["vm1"]
    assert deployment.backend_pid() == backend
    deployment.wait_for_log("vm vm1: QoS")
    # 100 requests at 100 IOPS take about a second; unlimited they took a fraction of it.
    limited = as_user("rf-vm1", lambda: timed_reads(sock, 100))
    assert limited > 0.8 and limited > 4 * fast, (fast, limited)
    (device,) = deployment.status()["groups"]["tenant-a"]["devices"]
    assert device["requests"] >= 200 and device["throttled_ms"] > 0
    assert device["p99_us"] > 0

    top = ringfence("top", "--policy", str(deployment.policy), "--iterations", "2",
                    "--interval", "0.2")
    assert top.returncode == 0, top.stderr
    rows = [line for line in top.stdout.splitlines() if line.startswith("vm1 ")]
    assert len(rows) == 2 and "tenant-a" in rows[0]
