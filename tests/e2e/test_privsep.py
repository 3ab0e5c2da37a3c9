"""The full chain with a real guest: signed policy -> root broker -> confined backend ->
`ringfence run-qemu` (QEMU with no disk and no network access) -> data written and verified.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy import Deployment, ensure_user, ringfence
from tests.devproc import REPO, wait_until
from tests.e2e.guest import (
    KERNEL_CMDLINE,
    MIB,
    GuestResult,
    blk_check_problems,
    blk_check_script,
    guest_image,
    write_initrd,
)


@pytest.fixture
def deployment() -> Iterator[Deployment]:
    ensure_user("rf-vm1")
    with Deployment.temporary() as deploy:
        yield deploy


def vm_policy(deploy: Deployment, script: str) -> str:
    initrd = write_initrd(script, deploy.root / "initrd.cpio.gz")
    initrd.chmod(0o644)
    return (f'group = "tenant-a"\nuser = "rf-vm1"\nmemory = "256M"\n'
            f'kernel = "{guest_image().kernel}"\ninitrd = "{initrd}"\n'
            f'append = "{KERNEL_CMDLINE}"\ndisks = [ {{ image = "vm1.raw" }} ]')


def start_qemu(deploy: Deployment) -> tuple[subprocess.Popen[str], Path]:
    console = deploy.root / "console.log"
    with open(console, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backend", "run-qemu", "--policy", str(deploy.policy), "vm1",
             "--", "-nographic", "-no-reboot", "-accel", "tcg"],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
    return proc, console


def console_result(console: Path, exit_status: int | None = None) -> GuestResult:
    """The console of a run-qemu guest, read like a boot_guest result."""
    text = console.read_text(errors="replace").replace("\r\n", "\n")
    return GuestResult(output=text, exit_status=exit_status, qemu_returncode=0, qemu_stderr="",
                       timed_out=False, elapsed=0.0)


def guest_values(console: Path) -> dict[str, str]:
    return console_result(console).values()


@pytest.mark.e2e
def test_guest_io_through_broker_confined_backend_and_confined_qemu(
        deployment: Deployment) -> None:
    image = deployment.image("vm1.raw", 64)
    # The guest checks its disk, then idles so that audit can look at the running processes.
    script = blk_check_script(["vda"]) + "echo RF: checked=yes\nsleep 600\n"
    deployment.write_policy({"vm1": vm_policy(deployment, script)})
    deployment.start_broker()
    qemu, console = start_qemu(deployment)
    try:
        wait_until(lambda: "checked" in guest_values(console) or qemu.poll() is not None, 240,
                   "the guest's disk check")
        values = guest_values(console)
        assert values.get("checked") == "yes", console.read_text()
        result = ringfence("audit", "--policy", str(deployment.policy), "--json")
        report = json.loads(result.stdout)
    finally:
        qemu.send_signal(signal.SIGTERM)
        qemu.wait(timeout=30)

    check = console_result(console, exit_status=0)  # stopped in its idle sleep, after the check
    assert blk_check_problems(check, {"vda": image}) == [], check.output
    assert values["vda.sectors"] == str(64 * MIB // 512)

    by_role = {}
    for proc in report["processes"]:
        by_role.setdefault(proc["role"], []).append(proc)
    assert result.returncode == 0, json.dumps(report, indent=1)
    (backend,) = by_role["backend"]
    (qemu_facts,) = by_role["qemu"]
    assert backend["cap_eff"] in (0, "0000000000000000")
    assert backend["seccomp"] == 2 and backend["no_new_privs"] == 1
    assert backend["uid"] == ensure_user("ringfence")[0]
    assert backend["violations"] == []
    image_path = str(image)
    assert not any(image_path in json.dumps(fd) for fd in qemu_facts["fds"])
    assert qemu_facts["uid"] == ensure_user("rf-vm1")[0]
    assert qemu_facts["violations"] == []
    assert report["privileged_lines"] > 0


@pytest.mark.e2e
def test_guest_io_resumes_after_the_backend_is_killed(deployment: Deployment) -> None:
    image = deployment.image("vm1.raw", 64)
    rounds = 12
    # Each round writes a distinct MiB with O_DIRECT and reads it back; the test kills the
    # backend after round 3, so later rounds only pass if QEMU reconnected to its successor.
    script = (
        f"for i in $(seq 1 {rounds}); do\n"
        "  yes \"round $i\" | head -c 1048576 > /tmp/w\n"
        "  dd if=/tmp/w of=/dev/vda bs=1M seek=$i oflag=direct conv=fsync status=none\n"
        "  dd if=/dev/vda of=/tmp/r bs=1M skip=$i count=1 iflag=direct status=none\n"
        "  cmp -s /tmp/w /tmp/r && echo \"RF: round$i=ok\" || echo \"RF: round$i=bad\"\n"
        "  [ $i = 3 ] && sleep 3\n"
        "done\n"
    )
    deployment.write_policy({"vm1": vm_policy(deployment, script)})
    deployment.start_broker()
    qemu, console = start_qemu(deployment)
    try:
        wait_until(lambda: "round3" in guest_values(console) or qemu.poll() is not None, 240,
                   "three rounds of guest I/O")
        first = deployment.backend_pid()
        assert first is not None
        os.kill(first, signal.SIGKILL)
        deployment.wait_for_log("was killed by SIGKILL")
        qemu.wait(timeout=240)
    finally:
        if qemu.poll() is None:
            qemu.kill()
    values = guest_values(console)
    assert [values.get(f"round{i}") for i in range(1, rounds + 1)] == ["ok"] * rounds, \
        console.read_text() + deployment.log()
    assert deployment.backend_pid() not in (None, first)
    with open(image, "rb") as f:
        f.seek(rounds * MIB)
        assert f.read(MIB) == (f"round {rounds}\n".encode() * MIB)[:MIB]
