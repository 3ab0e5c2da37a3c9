"""QEMU with no disk and no network (broker/qemu.py): its arguments and the confined run."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.audit import (
    Expectations,
    evaluate,
    parse_net_dev,
    parse_status,
    read_facts,
    reference_namespaces,
)
from broker.policy import BrokerSettings, Disk, MiB, Nic, Policy, Qos, Vm, parse_policy
from broker.qemu import (
    NIC_INTERRUPTS,
    SANDBOX,
    QemuError,
    add_commands,
    jail_binds,
    kvm_groups,
    qemu_argv,
    qemu_device_args,
    qemu_pidfile,
    run_qemu,
)
from tests.devproc import REPO, DevBackend, wait_until
from tests.e2e.guest import (
    KERNEL_CMDLINE,
    GuestResult,
    _Cpio,
    blk_check_problems,
    blk_check_script,
    guest_image,
)

VM_UID = 64000  # numeric: the policy allows users without a passwd entry (gid = uid)

# Unsigned development policies (allow_unsigned = true) throughout: see tests/conftest.py.
pytestmark = pytest.mark.usefixtures("unsigned_policies_allowed")


def settings(run_dir: str = "/run/rf", roots: tuple[str, ...] = ("/srv/images",)) -> BrokerSettings:
    return BrokerSettings(roots, run_dir, "ringfence", None, (), True, "kill")


def vm(name: str = "web1", **changes: object) -> Vm:
    fields: dict[str, object] = dict(
        name=name, group="g", user=VM_UID, memory_bytes=512 * MiB, kernel=None, initrd=None,
        append=None, num_queues=2, qos=Qos(),
        disks=(Disk("web1.raw", False), Disk("data.raw", True)))
    fields.update(changes)
    return Vm(**fields)  # type: ignore[arg-type]


def policy(*vms: Vm, run_dir: str = "/run/rf") -> Policy:
    return Policy(settings(run_dir), {}, {v.name: v for v in vms})


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ringfence")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


# --- arguments --------------------------------------------------------------------------------


def test_device_args_give_shared_memfd_ram_one_vhost_user_disk_per_socket_and_no_nic() -> None:
    assert qemu_device_args(policy(vm()), "web1") == [
        "-object", "memory-backend-memfd,id=mem,size=536870912,share=on",
        "-numa", "node,memdev=mem",
        "-m", "512M",
        "-chardev", "socket,id=disk0,path=/run/rf/vms/web1/disk0.sock,reconnect=1",
        "-device", "vhost-user-blk-pci,chardev=disk0,num-queues=2",
        "-chardev", "socket,id=disk1,path=/run/rf/vms/web1/disk1.sock,reconnect=1",
        "-device", "vhost-user-blk-pci,chardev=disk1,num-queues=2",
        "-nic", "none",
    ]  # fmt: skip


def test_device_args_give_each_nic_a_vhost_user_netdev_with_its_mac_and_mtu() -> None:
    nic = Nic("rf-web1-0", "br0", "52:54:00:12:34:56", 9000, 1)
    args = qemu_device_args(policy(vm(disks=(), nics=(nic,))), "web1")
    assert args[6:] == [
        "-chardev", "socket,id=nic0,path=/run/rf/vms/web1/nic0.sock,reconnect=1",
        "-netdev", "vhost-user,id=net0,chardev=nic0",
        "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,host_mtu=9000,"
        + NIC_INTERRUPTS,
        "-nic", "none",
    ]  # fmt: skip


def test_multi_queue_nic_asks_the_back_end_for_its_pairs_and_offers_mq_to_the_guest() -> None:
    nic = Nic("rf-web1-0", "br0", "52:54:00:12:34:56", 1500, 4)
    args = qemu_device_args(policy(vm(disks=(), nics=(nic,))), "web1")
    assert args[6:] == [
        "-chardev", "socket,id=nic0,path=/run/rf/vms/web1/nic0.sock,reconnect=1",
        "-netdev", "vhost-user,id=net0,chardev=nic0,queues=4",
        "-device", "virtio-net-pci,netdev=net0,mac=52:54:00:12:34:56,host_mtu=1500,mq=on,"
        + NIC_INTERRUPTS,
        "-nic", "none",
    ]  # fmt: skip


def test_jail_of_a_vm_with_only_a_nic_shows_the_socket_dir() -> None:
    nic = Nic("rf-web1-0", "br0", "52:54:00:12:34:56", 1500, 1)
    binds, _ = jail_binds(settings(), vm(disks=(), nics=(nic,)))
    assert any(b.path == "/run/rf/vms/web1" for b in binds)


def test_device_args_double_commas_in_socket_paths() -> None:
    args = qemu_device_args(policy(vm(disks=(Disk("a", False),)), run_dir="/run/a,b"), "web1")
    assert "socket,id=disk0,path=/run/a,,b/vms/web1/disk0.sock,reconnect=1" in args


def test_argv_adds_kernel_initrd_append_and_sandbox_before_the_extra_args() -> None:
    p = policy(vm(kernel="/k", initrd="/i", append="console=ttyS0 quiet"))
    argv = qemu_argv(p, "web1", "/usr/bin/qemu", ["-nographic"])
    assert argv[0] == "/usr/bin/qemu"
    assert argv[1:-9] == qemu_device_args(p, "web1")
    assert argv[-9:] == ["-kernel", "/k", "-initrd", "/i", "-append", "console=ttyS0 quiet",
                         "-sandbox", SANDBOX, "-nographic"]
    assert SANDBOX == "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def test_argv_without_kernel_has_no_kernel_options() -> None:
    argv = qemu_argv(policy(vm()), "web1", "/usr/bin/qemu", [])
    assert not {"-kernel", "-initrd", "-append"} & set(argv)


def test_unknown_vm_is_one_sentence_naming_the_known_ones() -> None:
    with pytest.raises(QemuError, match=r"no VM named 'db1' \(known: app, web1\)"):
        qemu_device_args(policy(vm(), vm("app")), "db1")


def test_jail_shows_system_tree_dev_nodes_kernel_files_and_the_socket_dir_only() -> None:
    binds, symlinks = jail_binds(settings(), vm(kernel="/boot/k", initrd="/boot/i"))
    paths = [b.path for b in binds]
    assert "/usr" in paths or "/usr" in symlinks
    for path in ("/lib", "/lib64"):
        if os.path.islink(path):
            assert symlinks[path] == os.readlink(path)
    assert {"/dev/null", "/dev/zero", "/dev/urandom"} <= set(paths)
    assert paths[-3:] == ["/boot/k", "/boot/i", "/run/rf/vms/web1"]
    by_path = {b.path: b for b in binds}
    assert not any(b.writable for b in binds)  # connect() needs no writable mount
    assert by_path["/dev/null"].devices and not by_path["/boot/k"].devices
    assert by_path["/usr"].executable and not by_path["/run/rf/vms/web1"].executable


@pytest.mark.parametrize(("gid", "mode", "groups"), [
    (1234, 0o660, [1234]),  # Debian: root:kvm 0660
    (1234, 0o600, []),  # the group may not use it
    (0, 0o660, []),  # root's group is no group to hand out
])
def test_the_only_supplementary_group_is_the_one_dev_kvm_is_shared_with(
        tmp_path: Path, gid: int, mode: int, groups: list[int]) -> None:
    kvm = tmp_path / "kvm"
    kvm.touch()
    os.chown(kvm, 0, gid)
    kvm.chmod(mode)
    assert kvm_groups(str(kvm)) == groups
    assert kvm_groups(str(tmp_path / "absent")) == []


def test_jail_of_a_vm_without_disks_has_no_socket_dir() -> None:
    binds, _ = jail_binds(settings(), vm(disks=()))
    assert not any(b.path.startswith("/run/rf") for b in binds)


# --- the commands -----------------------------------------------------------------------------

POLICY_TEMPLATE = """\
[broker]
image_roots = ["{root}"]
run_dir = "{run_dir}"
backend_user = "nobody"
allow_unsigned = true

[groups.g]

[vms.v1]
group = "g"
user = {user}
memory = "256M"
{extra}
"""


def write_policy(path: Path, run_dir: Path, root: Path, *, user: object = VM_UID,
                 extra: str = "") -> Path:
    path.write_text(POLICY_TEMPLATE.format(root=root, run_dir=run_dir, user=user, extra=extra))
    parse_policy(path.read_bytes(), str(path))  # a test policy that does not parse is a bug
    return path


def test_qemu_args_command_prints_the_device_args_shell_quoted(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_policy(tmp_path / "p.toml", tmp_path / "run dir", tmp_path / "img",
                        extra='disks = [{ image = "a.raw" }]')
    assert cli(["qemu-args", "--policy", str(path), "v1"]) == 0
    out = capsys.readouterr().out
    args = shlex.split(out)
    assert args[args.index("-chardev") + 1].endswith(f"path={tmp_path}/run dir/vms/v1/"
                                                     "disk0.sock,reconnect=1")
    assert "'socket,id=disk0" in out  # the space is quoted for the shell


def test_qemu_args_command_with_an_unknown_vm_exits_1_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_policy(tmp_path / "p.toml", tmp_path / "run", tmp_path / "img")
    assert cli(["qemu-args", "--policy", str(path), "nope"]) == 1
    err = capsys.readouterr().err
    assert err == "ringfence: the policy has no VM named 'nope' (known: v1)\n"


def test_run_qemu_command_passes_everything_after_the_vm_to_qemu() -> None:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["run-qemu", "--policy", "/p", "v1", "--", "-accel", "tcg"])
    assert (args.policy, args.vm, args.extra) == ("/p", "v1", ["-accel", "tcg"])


def test_run_qemu_refuses_an_unknown_user(tmp_path: Path) -> None:
    path = write_policy(tmp_path / "p.toml", tmp_path / "run", tmp_path / "img",
                        user='"rf-no-such-user"')
    p = parse_policy(path.read_bytes(), str(path))
    with pytest.raises(QemuError, match="user 'rf-no-such-user' does not exist"):
        run_qemu(p, "v1", [])


def test_run_qemu_refuses_a_missing_kernel_before_starting(tmp_path: Path) -> None:
    path = write_policy(tmp_path / "p.toml", tmp_path / "run", tmp_path / "img",
                        extra=f'kernel = "{tmp_path}/vmlinuz"')
    p = parse_policy(path.read_bytes(), str(path))
    with pytest.raises(QemuError, match=f"needs {tmp_path}/vmlinuz, which does not exist"):
        run_qemu(p, "v1", [])


def test_run_qemu_refuses_the_socket_dir_missing_and_says_to_start_the_broker(
        tmp_path: Path) -> None:
    path = write_policy(tmp_path / "p.toml", tmp_path / "run", tmp_path / "img",
                        extra='disks = [{ image = "a.raw" }]')
    p = parse_policy(path.read_bytes(), str(path))
    with pytest.raises(QemuError, match="vms/v1, which does not exist; start the broker first"):
        run_qemu(p, "v1", [])


def test_run_qemu_refuses_a_vm_that_already_runs(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = write_policy(tmp_path / "p.toml", run_dir, tmp_path / "img")
    p = parse_policy(path.read_bytes(), str(path))
    Path(qemu_pidfile(p.broker, "v1")).write_text(f"{os.getpid()}\n")  # a live process
    with pytest.raises(QemuError, match=f"already runs in QEMU pid {os.getpid()}"):
        run_qemu(p, "v1", [])


# --- real QEMU, confined ------------------------------------------------------------------------

# Runs the command in a process of its own: run_qemu installs signal handlers and forks.
RUN_QEMU = """\
import argparse, sys
from broker.qemu import add_commands
parser = argparse.ArgumentParser()
add_commands(parser.add_subparsers(dest="command"))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""
QEMU_ARGS = ["-accel", "tcg", "-nographic", "-no-reboot"]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be too deep.
    path = Path(tempfile.mkdtemp(prefix="rf-qemu-"))
    yield path
    shutil.rmtree(path)


def guest_initrd(path: Path, script: str) -> Path:
    archive = _Cpio()
    archive.file("test.sh", script.encode(), 0o755)
    path.write_bytes(guest_image().initramfs.read_bytes() + archive.gzipped())
    return path


def start_run_qemu(policy_path: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", RUN_QEMU, "run-qemu", "--policy", str(policy_path), "v1",
             "--", *QEMU_ARGS], cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=out)


@pytest.mark.e2e
def test_confined_qemu_serves_its_guest_a_disk_and_sees_nothing_else(short_dir: Path) -> None:
    run_dir, root = short_dir / "run", short_dir / "images"
    sock_dir = run_dir / "vms" / "v1"
    sock_dir.mkdir(parents=True)
    root.mkdir()
    image = root / "vda.raw"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)
    # The guest stays up after its check so that QEMU can be inspected while it runs.
    script = blk_check_script(["vda"]) + "echo RF: done=1\nwhile :; do sleep 1; done\n"
    initrd = guest_initrd(short_dir / "initrd.gz", script)
    kernel = guest_image().kernel
    policy_path = write_policy(
        short_dir / "policy.toml", run_dir, root,
        extra=f'kernel = "{kernel}"\ninitrd = "{initrd}"\nappend = "{KERNEL_CMDLINE}"\n'
              'disks = [{ image = "vda.raw" }]')
    sock = str(sock_dir / "disk0.sock")
    log = short_dir / "qemu.log"
    with DevBackend({sock: image}) as backend:
        os.chown(sock, VM_UID, VM_UID)  # as the broker does: only the VM's uid may connect
        os.chmod(sock, 0o600)
        process = start_run_qemu(policy_path, log)
        try:
            wait_until(lambda: "RF: done=1" in log.read_text(errors="replace")
                       or process.poll() is not None, timeout=240, what="guest finished its check")
            assert process.poll() is None, log.read_text(errors="replace")
            pidfile = run_dir / "qemu-v1.pid"
            qemu_pid = int(pidfile.read_text())
            status = parse_status(Path(f"/proc/{qemu_pid}/status").read_text())
            root_entries = sorted(os.listdir(f"/proc/{qemu_pid}/root"))
            dev_entries = sorted(os.listdir(f"/proc/{qemu_pid}/root/dev"))
            sock_visible = os.path.exists(f"/proc/{qemu_pid}/root{sock}")
            image_visible = os.path.exists(f"/proc/{qemu_pid}/root{image}")
            interfaces = parse_net_dev(Path(f"/proc/{qemu_pid}/net/dev").read_text())
            facts = read_facts(qemu_pid, "qemu", "v1", reference=reference_namespaces(),
                               unix_paths={})
            os.kill(process.pid, signal.SIGTERM)  # forwarded to QEMU, which shuts down
            assert process.wait(timeout=30) == 0, log.read_text(errors="replace")
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert backend.alive()

    serial = log.read_text(errors="replace").replace("\r\n", "\n")
    result = GuestResult(serial, 0, 0, "", False, 0.0)
    assert blk_check_problems(result, {"vda": image}) == [], serial
    assert not pidfile.exists()
    # Only lo, as the VM's uid with no supplementary groups, under QEMU's seccomp sandbox.
    assert interfaces == ("lo",)
    ids = " ".join([str(VM_UID)] * 4)
    assert (status["Uid"].split(), status["Gid"].split()) == (ids.split(), ids.split())
    assert status["Groups"].split() == [str(g) for g in kvm_groups()]
    assert facts.no_new_privs == 1 and facts.seccomp == 2
    assert facts.cap_eff == 0 and facts.cap_bnd == 0
    assert {"mnt", "net"} <= set(facts.namespaces)
    # The root holds the system tree, the bound files' top directories and nothing else.
    tops = {p.split("/")[1] for p in (str(kernel), str(initrd), str(sock_dir))}
    assert set(root_entries) <= {"usr", "lib", "lib64", "dev", *tops}
    assert "etc" not in root_entries and "home" not in root_entries
    assert set(dev_entries) <= {"null", "zero", "urandom", "kvm"}
    assert sock_visible and not image_visible
    # And the audit's own rules agree: no image FD, not root, no interface but lo.
    assert not any(fd.target.startswith(str(root)) for fd in facts.fds)
    assert evaluate(facts, Expectations((str(root),))) == []


@pytest.mark.e2e
def test_run_qemu_returns_the_guest_exit_and_removes_its_pidfile(short_dir: Path) -> None:
    run_dir = short_dir / "run"
    run_dir.mkdir()
    initrd = guest_initrd(short_dir / "initrd.gz", "echo RF: uid=$(id -u)\n")
    policy_path = write_policy(
        short_dir / "policy.toml", run_dir, short_dir / "images",
        extra=f'kernel = "{guest_image().kernel}"\ninitrd = "{initrd}"\n'
              f'append = "{KERNEL_CMDLINE}"')
    log = short_dir / "qemu.log"
    process = start_run_qemu(policy_path, log)
    try:
        assert process.wait(timeout=240) == 0, log.read_text(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "RF-EXIT 0" in log.read_text(errors="replace")
    assert os.listdir(run_dir) == []
