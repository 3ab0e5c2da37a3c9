"""`ringfence audit` (broker/audit.py): the rules on made-up facts, collection on fake and real
/proc, and the command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from broker.audit import (
    Expectations,
    Fd,
    ProcessFacts,
    add_commands,
    collect,
    evaluate,
    find_processes,
    live_pid,
    parse_net_dev,
    parse_unix_table,
    pidfile_role,
    privileged_lines,
    read_facts,
    reference_namespaces,
)
from tests.devproc import wait_until

ROOT = "/srv/images"
EXPECT = Expectations((ROOT,))
NAMESPACES = ("ipc", "mnt", "net", "uts")

BACKEND = ProcessFacts(
    pid=100, role="backend", name="tenant-a", uids=(999, 999, 999, 999), cap_eff=0, cap_bnd=0,
    no_new_privs=1, seccomp=2, namespaces=NAMESPACES,
    fds=(
        Fd(0, "/dev/null"), Fd(1, "/dev/null"), Fd(2, "/var/log/ringfence.log"),
        Fd(3, "socket:[1234]", "/run/ringfence/vms/web1/disk0.sock"),
        Fd(4, f"{ROOT}/web1.raw"), Fd(5, f"{ROOT}/old.raw (deleted)"),
        Fd(6, "/memfd:memory-backend-memfd (deleted)"), Fd(7, "anon_inode:[eventfd]"),
        Fd(8, "anon_inode:[eventpoll]"), Fd(9, "pipe:[77]"), Fd(10, "/dev/net/tun"),
    ),
    interfaces=("lo",),
)
QEMU = ProcessFacts(
    pid=200, role="qemu", name="web1", uids=(64000,) * 4, cap_eff=0, cap_bnd=(1 << 41) - 1,
    no_new_privs=1, seccomp=2, namespaces=NAMESPACES,
    fds=(Fd(0, "/dev/null"), Fd(1, "/var/log/qemu.log"), Fd(3, "/memfd:mem (deleted)"),
         Fd(4, "socket:[99]")),
    interfaces=("lo",),
)


# Unsigned development policies (allow_unsigned = true) throughout: see tests/conftest.py.
pytestmark = pytest.mark.usefixtures("unsigned_policies_allowed")


def test_a_confined_backend_and_a_confined_qemu_have_no_violations() -> None:
    assert evaluate(BACKEND, EXPECT) == []
    assert evaluate(QEMU, EXPECT) == []


def test_the_broker_is_root_by_design_and_never_a_violation() -> None:
    broker = dataclasses.replace(BACKEND, role="broker", name=None, uids=(0,) * 4,
                                 cap_eff=(1 << 41) - 1, seccomp=0, namespaces=(),
                                 fds=(Fd(5, "/etc/shadow"),))
    assert evaluate(broker, EXPECT) == []


@pytest.mark.parametrize(("change", "violation"), [
    ({"cap_eff": 1 << 21}, "has effective capabilities 0x200000"),
    ({"cap_bnd": 1}, "has capabilities 0x1 in its bounding set"),
    ({"seccomp": 0}, "is not under a seccomp filter (Seccomp 0)"),
    ({"seccomp": 1}, "is not under a seccomp filter (Seccomp 1)"),
    ({"no_new_privs": 0}, "can gain privileges through exec (NoNewPrivs 0)"),
    ({"uids": (999, 999, 0, 999)}, "runs as root"),
    ({"namespaces": ("ipc", "mnt", "uts")}, "shares the host's net namespace"),
    ({"namespaces": ("ipc", "net", "uts")}, "shares the host's mnt namespace"),
    ({"fds": (Fd(5, "/etc/passwd"),)}, "holds fd 5 to /etc/passwd, which is not one of its "
     "grants"),
    # A sibling directory whose name starts like the root is not below it.
    ({"fds": (Fd(6, "/srv/images-old/x.raw"),)}, "holds fd 6 to /srv/images-old/x.raw, which "
     "is not one of its grants"),
    ({"fds": (Fd(7, "/dev/kvm"),)}, "holds fd 7 to /dev/kvm, which is not one of its grants"),
])
def test_each_backend_rule(change: dict[str, object], violation: str) -> None:
    assert evaluate(dataclasses.replace(BACKEND, **change), EXPECT) == [violation]


@pytest.mark.parametrize(("change", "violation"), [
    ({"uids": (0, 0, 0, 0)}, "runs as root"),
    ({"fds": (Fd(9, f"{ROOT}/web1.raw"),)}, f"holds fd 9 to the image {ROOT}/web1.raw"),
    ({"fds": (Fd(9, f"{ROOT}/a/b.raw (deleted)"),)}, f"holds fd 9 to the image {ROOT}/a/b.raw"),
    ({"interfaces": ("lo", "eth0", "br0")}, "sees network interfaces besides lo: eth0, br0"),
    ({"fds": (Fd(9, "/dev/net/tun"),)}, "holds fd 9 to a tap (/dev/net/tun)"),
])
def test_each_qemu_rule(change: dict[str, object], violation: str) -> None:
    assert evaluate(dataclasses.replace(QEMU, **change), EXPECT) == [violation]


def test_every_broken_rule_is_reported_not_just_the_first() -> None:
    bad = dataclasses.replace(BACKEND, uids=(0,) * 4, seccomp=0, fds=(Fd(4, "/etc/passwd"),))
    assert len(evaluate(bad, EXPECT)) == 3


# --- /proc parsers and pidfiles ---------------------------------------------------------------


def test_unix_table_maps_inodes_to_paths_including_spaces_and_abstract_names() -> None:
    table = (
        "Num       RefCount Protocol Flags    Type St Inode Path\n"
        "0000000000000000: 00000002 00000000 00010000 0001 01 4242 /run/rf/vms/a b/disk0.sock\n"
        "0000000000000000: 00000002 00000000 00000000 0002 01 4243 @/tmp/.X11-unix/X0\n"
        "0000000000000000: 00000003 00000000 00000000 0001 03 4244\n"
    )
    assert parse_unix_table(table) == {4242: "/run/rf/vms/a b/disk0.sock",
                                       4243: "@/tmp/.X11-unix/X0"}


def test_net_dev_lists_interface_names() -> None:
    text = ("Inter-|   Receive\n face |bytes\n"
            "    lo:       0       0    0\n  eth0: 1 2 3\n")
    assert parse_net_dev(text) == ("lo", "eth0")


@pytest.mark.parametrize(("name", "role"), [
    ("broker.pid", ("broker", None)),
    ("backend-tenant-a.pid", ("backend", "tenant-a")),
    ("qemu-web1.pid", ("qemu", "web1")),
    ("qemu-.pid", None), ("broker.pid.tmp", None), ("admin.sock", None), ("vms", None),
])
def test_pidfile_names_give_role_and_name(name: str, role: tuple[str, str | None] | None) -> None:
    assert pidfile_role(name) == role


class FakeProc:
    """A made-up /proc: boot time, and per pid a stat line, status, ns, fds and net files."""

    BOOT = 1_000_000
    HOST_NS: ClassVar[dict[str, str]] = {
        kind: f"{kind}:[40265318{i:02d}]" for i, kind in enumerate(NAMESPACES)}

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        (root / "stat").write_text(f"cpu  1 2 3\nbtime {self.BOOT}\nprocesses 5\n")
        (root / "net").mkdir()
        (root / "net" / "unix").write_text(
            "Num RefCount Protocol Flags Type St Inode Path\n"
            "0: 00000002 00000000 00010000 0001 01 501 /run/rf/vms/web1/disk0.sock\n")
        self.add(1, started=0, namespaces=self.HOST_NS)

    def add(self, pid: int, *, started: float, state: str = "S", uid: int = 0,
            namespaces: dict[str, str] | None = None, fds: dict[int, str] | None = None,
            interfaces: tuple[str, ...] = ("lo", "eth0"), unix: str = "") -> None:
        d = self.root / str(pid)
        d.mkdir()
        ticks = round((started - self.BOOT) * os.sysconf("SC_CLK_TCK"))
        # The command name may hold spaces and parentheses: fields count from the last ')'.
        rest = [state] + ["0"] * 18 + [str(ticks)] + ["0"] * 10
        (d / "stat").write_text(f"{pid} (my (odd) name) {' '.join(rest)}\n")
        (d / "status").write_text(
            f"Name:\tx\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\nCapEff:\t0000000000000000\n"
            "CapBnd:\t000001ffffffffff\nNoNewPrivs:\t1\nSeccomp:\t2\n")
        (d / "ns").mkdir()
        for kind, ident in (namespaces or self.HOST_NS).items():
            (d / "ns" / kind).symlink_to(ident)
        (d / "fd").mkdir()
        for fd, target in (fds or {}).items():
            (d / "fd" / str(fd)).symlink_to(target)
        (d / "net").mkdir()
        lines = "".join(f"  {name}: 0 0 0\n" for name in interfaces)
        (d / "net" / "dev").write_text("Inter-|\n face |\n" + lines)
        (d / "net" / "unix").write_text("Num RefCount Protocol Flags Type St Inode Path\n" + unix)


def pidfile(run_dir: Path, name: str, pid: int, written: float) -> Path:
    path = run_dir / name
    path.write_text(f"{pid}\n")
    os.utime(path, (written, written))
    return path


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[tuple[FakeProc, Path]]:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    yield FakeProc(tmp_path / "proc"), run_dir


def test_live_pid_ignores_missing_dead_zombie_reused_and_garbled_pidfiles(
        fake: tuple[FakeProc, Path]) -> None:
    proc, run_dir = fake
    t = FakeProc.BOOT + 5000
    proc.add(10, started=t)
    proc.add(11, started=t, state="Z")
    proc.add(12, started=t + 600)  # started ten minutes after its pidfile: a reused pid
    assert live_pid(str(pidfile(run_dir, "a.pid", 10, t + 1)), str(proc.root)) == 10
    assert live_pid(str(pidfile(run_dir, "b.pid", 11, t + 1)), str(proc.root)) is None
    assert live_pid(str(pidfile(run_dir, "c.pid", 12, t + 1)), str(proc.root)) is None
    assert live_pid(str(pidfile(run_dir, "d.pid", 13, t + 1)), str(proc.root)) is None
    (run_dir / "e.pid").write_text("not a pid\n")
    assert live_pid(str(run_dir / "e.pid"), str(proc.root)) is None
    assert live_pid(str(run_dir / "missing.pid"), str(proc.root)) is None


def test_collect_on_fake_proc_resolves_fds_namespaces_and_socket_paths(
        fake: tuple[FakeProc, Path]) -> None:
    proc, run_dir = fake
    t = FakeProc.BOOT + 100
    backend_ns = dict(FakeProc.HOST_NS, net="net:[99]", mnt="mnt:[98]")
    proc.add(20, started=t)
    proc.add(21, started=t, uid=999, namespaces=backend_ns, interfaces=("lo",),
             fds={0: "/dev/null", 3: "socket:[501]", 4: "socket:[777]", 5: "socket:[888]",
                  6: "anon_inode:[eventfd]", 7: "/memfd:guest (deleted)"},
             unix="0: 00000002 00000000 00000000 0001 01 777 /run/rf/vms/web1/disk1.sock\n")
    proc.add(22, started=t, uid=64000, interfaces=("lo", "eth0"))
    pidfile(run_dir, "broker.pid", 20, t)
    pidfile(run_dir, "qemu-web1.pid", 22, t)
    pidfile(run_dir, "backend-tenant-a.pid", 21, t)
    pidfile(run_dir, "qemu-gone.pid", 23, t)  # stale: ignored
    (run_dir / "admin.sock").write_text("")

    facts = collect(str(run_dir), str(proc.root))

    assert [(f.role, f.name, f.pid) for f in facts] == [
        ("broker", None, 20), ("backend", "tenant-a", 21), ("qemu", "web1", 22)]
    backend = facts[1]
    assert backend.uids == (999,) * 4 and backend.seccomp == 2 and backend.no_new_privs == 1
    assert backend.cap_bnd == (1 << 41) - 1
    assert backend.namespaces == ("mnt", "net")
    assert backend.interfaces == ("lo",)
    assert backend.fds == (
        Fd(0, "/dev/null"),
        Fd(3, "socket:[501]", "/run/rf/vms/web1/disk0.sock"),  # from the host's table
        Fd(4, "socket:[777]", "/run/rf/vms/web1/disk1.sock"),  # from its own namespace's
        Fd(5, "socket:[888]"),
        Fd(6, "anon_inode:[eventfd]"),
        Fd(7, "/memfd:guest (deleted)"),
    )
    assert evaluate(backend, Expectations(("/srv",))) == [
        "has capabilities 0x1ffffffffff in its bounding set"]
    assert evaluate(facts[2], Expectations(("/srv",))) == [
        "sees network interfaces besides lo: eth0"]


def test_collect_of_a_missing_run_dir_finds_nothing(tmp_path: Path) -> None:
    assert collect(str(tmp_path / "none")) == []


def test_privileged_lines_skip_blank_and_comment_lines(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text('"""Doc."""\n\n# comment\nx = 1  # trailing\n    # indented\n')
    (tmp_path / "b.py").write_text("y = 2\n")
    (tmp_path / "notes.txt").write_text("not code\n")
    assert privileged_lines([tmp_path]) == 3
    assert privileged_lines() > 0  # broker/ and sandbox/ themselves


# --- real /proc ------------------------------------------------------------------------------


def test_real_facts_of_this_process_resolve_memfds_eventfds_and_unix_socket_paths(
        tmp_path: Path) -> None:
    memfd = os.memfd_create("rf-audit-test")
    eventfd = os.eventfd(0)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "s.sock"))
    sock_fd = listener.fileno()
    try:
        with open("/proc/net/unix") as f:
            table = parse_unix_table(f.read())
        facts = read_facts(os.getpid(), "broker", None, reference=reference_namespaces(),
                           unix_paths=table)
    finally:
        listener.close()
        os.close(eventfd)
        os.close(memfd)
    by_fd = {fd.fd: fd for fd in facts.fds}
    assert by_fd[memfd].target == "/memfd:rf-audit-test (deleted)"
    assert by_fd[eventfd].target == "anon_inode:[eventfd]"
    assert by_fd[sock_fd].target.startswith("socket:[")
    assert by_fd[sock_fd].unix_path == str(tmp_path / "s.sock")
    assert facts.uids[1] == os.geteuid()
    assert facts.namespaces == ()  # the test runs in the reference namespaces


def test_real_facts_of_a_child_in_new_namespaces_show_them_and_only_lo() -> None:
    child = subprocess.Popen(["unshare", "--net", "--mount", "--ipc", "--", "sleep", "60"])
    try:
        host = reference_namespaces()
        wait_until(lambda: os.readlink(f"/proc/{child.pid}/ns/net") != host["net"],
                   what="child in its own network namespace")
        facts = read_facts(child.pid, "backend", "g", reference=host, unix_paths={})
    finally:
        child.kill()
        child.wait()
    assert facts.namespaces == ("ipc", "mnt", "net")
    assert facts.interfaces == ("lo",)
    # Root with every capability and no filter: the rules must say so.
    violations = evaluate(facts, EXPECT)
    assert "runs as root" in violations
    assert "is not under a seccomp filter (Seccomp 0)" in violations
    assert not any("namespace" in v for v in violations)


# --- the command -----------------------------------------------------------------------------


def audit_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ringfence")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def write_policy(tmp_path: Path) -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[broker]\nimage_roots = ["{tmp_path}/images"]\nrun_dir = "{run_dir}"\n'
                      'backend_user = "nobody"\nallow_unsigned = true\n')
    return policy, run_dir


def test_audit_json_reports_each_process_and_exits_1_on_a_violation(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy, run_dir = write_policy(tmp_path)
    image = tmp_path / "images" / "disk.raw"
    image.parent.mkdir()
    image.write_bytes(b"\0" * 4096)
    pidfile(run_dir, "broker.pid", os.getpid(), time.time())
    # A "backend" that is anything but confined: root, all capabilities, an image and a file.
    with open(image, "rb") as img, open(policy, "rb") as other:
        backend = subprocess.Popen(["sleep", "60"], pass_fds=[img.fileno(), other.fileno()])
    try:
        pidfile(run_dir, "backend-g.pid", backend.pid, time.time())
        pidfile(run_dir, "qemu-gone.pid", 2**22 + 1, time.time())  # beyond pid_max: stale
        assert audit_cli(["audit", "--json", "--policy", str(policy)]) == 1
    finally:
        backend.kill()
        backend.wait()
    report = json.loads(capsys.readouterr().out)
    assert report["privileged_lines"] == privileged_lines() > 0
    broker, backend_entry = report["processes"]
    assert broker["role"] == "broker" and broker["pid"] == os.getpid()
    assert broker["violations"] == [] and "group" not in broker and "vm" not in broker
    assert backend_entry["role"] == "backend" and backend_entry["group"] == "g"
    assert set(backend_entry) >= {"pid", "uid", "cap_eff", "cap_bnd", "no_new_privs", "seccomp",
                                  "namespaces", "fds", "violations"}
    assert backend_entry["uid"] == 0
    targets = [fd["target"] for fd in backend_entry["fds"]]
    assert str(image) in targets and str(policy) in targets
    assert "runs as root" in backend_entry["violations"]
    assert any(str(policy) in v for v in backend_entry["violations"])
    assert not any(str(image) in v for v in backend_entry["violations"])  # an image is a grant


def test_audit_table_has_a_row_per_process_and_exits_0_when_all_is_well(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy, run_dir = write_policy(tmp_path)
    pidfile(run_dir, "broker.pid", os.getpid(), time.time())
    assert audit_cli(["audit", "--policy", str(policy)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ROLE", "NAME", "PID", "UID", "CAPEFF", "CAPBND", "NNP",
                                "SECCOMP", "NAMESPACES", "FDS", "VIOLATIONS"]
    assert lines[1].split()[:3] == ["broker", "-", str(os.getpid())]
    assert lines[-1] == f"privileged code (broker/, sandbox/): {privileged_lines()} lines"
    assert find_processes(str(run_dir)) == [("broker", None, os.getpid())]


def test_audit_with_a_bad_policy_exits_2_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert audit_cli(["audit", "--policy", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ringfence: policy ") and err.count("\n") == 1
