"""Seccomp policies: the parser's rejections, and every rule of policies/backend.policy at work.

Each rule of the backend policy is exercised in a child that confined itself with the real
policy in kill mode (uid 65534, empty root): once within the rule (the call the backend makes,
which must return normally, or fail with the errno the rule names) and once outside it (a
forbidden argument, or a neighbouring syscall the policy does not list, which must kill the
child with SIGSYS). The two probes of a rule differ only in that call, so the outside probe
can only have died of it. CASES must cover every rule: adding a rule without its probes, or
leaving probes for a rule that is gone, fails test_every_rule_has_probes_and_no_probe_is_stale.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import select
import signal
import socket
import struct
import termios
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyseccomp
import pytest

from backend.blk import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, fallocate
from backend.net import (
    IFF_ATTACH_QUEUE,
    IFF_DETACH_QUEUE,
    TUN_F_CSUM,
    TUNSETOFFLOAD,
    TUNSETQUEUE,
)
from broker.taps import TUNSETIFF, TUNSETVNETHDRSZ, open_tun_queues
from sandbox.namespaces import CLONE_NEWNET, unshare
from sandbox.seccomp_policy import (
    CONSTANTS,
    Comparison,
    Rule,
    SeccompPolicyError,
    compile_filter,
    parse_policy,
    read_policy,
)
from tests.confined import BACKEND_POLICY, run_confined

KILLED = "SIGSYS"
OK = "ok"
PAGE = mmap.PAGESIZE
MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
READ_IMPLIES_EXEC = 0x0400000
CLOCK_REALTIME = 0
CLOCK_MONOTONIC = 1
EPOLL_CTL_ADD = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def sc(name: str, *args: Any) -> int:
    """Make syscall `name` directly, so no libc wrapper picks another one; OSError on -1."""
    number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    result = _libc.syscall(ctypes.c_long(number),
                           *(ctypes.c_long(a) if isinstance(a, int) else a for a in args))
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def buf(size: int) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(size)


# --- what the probes act on ---------------------------------------------------------------


@dataclass
class Kit:
    """FDs and memory the probes use: prepared before confinement, as the backend's are."""

    image: int  # a scratch disk image
    memfd: int  # sealed guest memory
    efd: int  # an eventfd with a count of 1
    epoll: select.epoll
    listener: socket.socket  # a front-end is waiting to be accepted
    client: socket.socket
    a: socket.socket  # a connected pair; each end has bytes waiting
    b: socket.socket
    broken_pipe: int  # the write end of a pipe whose read end is closed
    mapping: int  # address of one private anonymous page
    tap: int  # queue 0 of a two-queue tap, in a network namespace of the child's own
    tap1: int  # its queue 1
    sigpipes: list[int] = field(default_factory=list)

    @classmethod
    def build(cls, directory: Path) -> tuple[Kit, list[int]]:
        # First into a network namespace of our own: the tap (and the abstract socket below)
        # live and die with this child, and the host's interfaces are never touched.
        unshare(CLONE_NEWNET)
        tap, tap1 = open_tun_queues("rf-probe0", 2)
        image = os.open(directory / f"image.{os.getpid()}", os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(image, 1 << 20)
        memfd = os.memfd_create("guest-ram", os.MFD_ALLOW_SEALING)
        os.ftruncate(memfd, 4 * PAGE)
        fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        efd = os.eventfd(1, os.EFD_NONBLOCK)
        # Abstract address: no file to clean up, and the connection outlives the netns switch.
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(f"\0ringfence-seccomp-test-{os.getpid()}")
        listener.listen(1)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(listener.getsockname())
        a, b = socket.socketpair()
        a.sendall(b"x" * 64)
        b.sendall(b"y" * 64)
        pipe_r, broken_pipe = os.pipe()
        os.close(pipe_r)
        mapping = sc("mmap", None, PAGE, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        kit = cls(image, memfd, efd, select.epoll(), listener, client, a, b, broken_pipe, mapping,
                  tap, tap1)
        signal.signal(signal.SIGPIPE, lambda signum, _frame: kit.sigpipes.append(signum))
        fds = [image, memfd, efd, kit.epoll.fileno(), broken_pipe, tap, tap1,
               *(s.fileno() for s in (listener, client, a, b))]
        return kit, fds


# --- probes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    syscall: str  # the syscall `call` makes last, the one the outcome is about
    call: Callable[[Kit], object]
    expect: str = OK  # OK, KILLED, "errno NAME" or "exit N"


def raw(syscall: str, args: Callable[[Kit], Sequence[Any]], expect: str = OK) -> Probe:
    return Probe(syscall, lambda kit: sc(syscall, *args(kit)), expect)


@dataclass(frozen=True)
class Case:
    within: Sequence[Probe]  # calls the rule covers (one per alternative where it has several)
    outside: Sequence[Probe]  # calls it does not: forbidden arguments or unlisted neighbours


def handle_sigpipe(kit: Kit) -> None:
    """A signal arrives and its handler returns: rt_sigreturn (SIGTERM takes the same path)."""
    with contextlib.suppress(BrokenPipeError):
        os.write(kit.broken_pipe, b"x")
    if kit.sigpipes != [signal.SIGPIPE]:
        raise RuntimeError(f"the SIGPIPE handler ran for {kit.sigpipes}")


def zero_range(kit: Kit) -> None:
    try:
        fallocate(kit.image, FALLOC_FL_KEEP_SIZE | FALLOC_FL_ZERO_RANGE, 0, PAGE)
    except OSError as exc:  # e.g. tmpfs: the syscall ran; the backend then writes zeroes
        if exc.errno != errno.EOPNOTSUPP:
            raise


# Within: the Python call the backend itself makes wherever there is one, so a Python that
# switches syscalls shows up here. Outside: raw syscalls, so nothing else can be at fault.
CASES: dict[str, Case] = {
    "epoll_wait": Case(
        [Probe("epoll_wait", lambda k: k.epoll.poll(0))],
        [raw("epoll_pwait", lambda k: (k.epoll.fileno(), buf(64), 4, 0, None, 8), KILLED)]),
    "epoll_ctl": Case(
        [Probe("epoll_ctl", lambda k: k.epoll.register(k.efd, select.EPOLLIN))],
        [raw("epoll_create1", lambda k: (0,), KILLED)]),
    "accept4": Case(
        [Probe("accept4", lambda k: k.listener.accept())],
        [raw("listen", lambda k: (k.listener.fileno(), 8), KILLED)]),
    "getsockname": Case(
        [Probe("getsockname", lambda k: k.a.getsockname())],
        [raw("bind", lambda k: (k.a.fileno(), buf(16), 16), KILLED)]),
    "getsockopt": Case(
        [Probe("getsockopt",
               lambda k: k.a.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))],
        [Probe("getsockopt", lambda k: k.a.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE),
               KILLED),
         Probe("getsockopt", lambda k: k.a.getsockopt(socket.IPPROTO_TCP, socket.SO_PEERCRED),
               KILLED)]),
    "ioctl": Case(
        [Probe("ioctl", lambda k: k.a.setblocking(False)),
         Probe("ioctl", lambda k: fcntl.ioctl(k.tap, TUNSETOFFLOAD, TUN_F_CSUM)),
         # A disabled queue pair's tap queue leaves and comes back, with no capability.
         Probe("ioctl", lambda k: (
             fcntl.ioctl(k.tap1, TUNSETQUEUE, struct.pack("16sH22x", b"", IFF_DETACH_QUEUE)),
             fcntl.ioctl(k.tap1, TUNSETQUEUE, struct.pack("16sH22x", b"", IFF_ATTACH_QUEUE))))],
        # TIOCSTI would type into a terminal the process holds; TUNSETIFF would attach the tap
        # FD to another interface, TUNSETVNETHDRSZ change the frame layout the broker set.
        [raw("ioctl", lambda k: (2, termios.TIOCSTI, b"x"), KILLED),
         raw("ioctl", lambda k: (k.tap, TUNSETIFF, buf(40)), KILLED),
         raw("ioctl", lambda k: (k.tap, TUNSETVNETHDRSZ, buf(4)), KILLED)]),
    "recvmsg": Case(
        [Probe("recvmsg", lambda k: socket.recv_fds(k.b, 64, 4, socket.MSG_CMSG_CLOEXEC))],
        [raw("recvmmsg", lambda k: (k.b.fileno(), None, 0, 0, None), KILLED)]),
    "recvfrom": Case(
        [Probe("recvfrom", lambda k: k.b.recv(64))],
        [raw("recvmmsg", lambda k: (k.b.fileno(), None, 0, 0, None), KILLED)]),
    "sendto": Case(
        [Probe("sendto", lambda k: k.a.send(b"reply"))],
        # sendmsg could pass an FD (SCM_RIGHTS) to a peer: not allowed at all.
        [raw("sendmsg", lambda k: (k.a.fileno(), None, 0), KILLED),
         raw("sendmmsg", lambda k: (k.a.fileno(), None, 0, 0), KILLED)]),
    "getpeername": Case(
        [Probe("getpeername", lambda k: k.a.getpeername())],
        [raw("connect", lambda k: (k.a.fileno(), buf(16), 16), KILLED)]),
    "read": Case(
        [Probe("read", lambda k: os.read(k.efd, 8))],
        [raw("pread64", lambda k: (k.efd, None, 0, 0), KILLED)]),
    "write": Case(
        [Probe("write", lambda k: os.write(k.efd, (1).to_bytes(8, "little")))],
        [raw("sendfile", lambda k: (k.a.fileno(), k.image, None, 8), KILLED)]),
    "readv": Case(
        [Probe("readv", lambda k: os.readv(k.b.fileno(), [bytearray(8), bytearray(8)]))],
        [raw("preadv", lambda k: (k.b.fileno(), None, 0, 0, 0), KILLED)]),
    "writev": Case(
        [Probe("writev", lambda k: os.writev(k.a.fileno(), [b"frame", b"data"]))],
        [raw("pwritev", lambda k: (k.a.fileno(), None, 0, 0, 0), KILLED)]),
    "pselect6": Case(
        [Probe("pselect6", lambda k: select.select((), (k.efd,), (), 0))],
        [raw("ppoll", lambda k: (None, 0, None, None, 8), KILLED)]),
    "preadv2": Case(
        [Probe("preadv2", lambda k: os.preadv(k.image, [bytearray(512)], 0))],
        [raw("preadv", lambda k: (k.image, None, 0, 0, 0), KILLED)]),
    "pwritev2": Case(
        [Probe("pwritev2", lambda k: os.pwritev(k.image, [b"w" * 512], 0))],
        [raw("pwritev", lambda k: (k.image, None, 0, 0, 0), KILLED)]),
    "pwrite64": Case(
        [Probe("pwrite64", lambda k: os.pwrite(k.image, bytes(512), 512))],
        # An image never changes size.
        [raw("ftruncate", lambda k: (k.image, 0), KILLED)]),
    "lseek": Case(
        [Probe("lseek", lambda k: os.lseek(k.image, 0, os.SEEK_END))],
        [raw("fadvise64", lambda k: (k.image, 0, 0, 0), KILLED)]),
    "fdatasync": Case(
        [Probe("fdatasync", lambda k: os.fdatasync(k.image))],
        [raw("sync", lambda k: (), KILLED)]),
    "fallocate": Case(
        [Probe("fallocate",
               lambda k: fallocate(k.image, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, PAGE)),
         Probe("fallocate", zero_range)],
        # Mode 0 and KEEP_SIZE alone allocate: the first could even grow the image.
        [Probe("fallocate", lambda k: fallocate(k.image, 0, 0, 2 << 20), KILLED),
         Probe("fallocate", lambda k: fallocate(k.image, FALLOC_FL_KEEP_SIZE, 0, PAGE), KILLED)]),
    "newfstatat": Case(
        [Probe("newfstatat", lambda k: os.fstat(k.memfd))],
        [raw("getdents64", lambda k: (k.image, buf(64), 64), KILLED)]),
    "fcntl": Case(
        [Probe("fcntl", lambda k: fcntl.fcntl(k.efd, fcntl.F_GETFL)),
         Probe("fcntl", lambda k: fcntl.fcntl(k.efd, fcntl.F_SETFL, os.O_NONBLOCK)),
         Probe("fcntl", lambda k: fcntl.fcntl(k.memfd, fcntl.F_GET_SEALS)),
         Probe("fcntl", lambda k: fcntl.fcntl(k.memfd, fcntl.F_DUPFD_CLOEXEC, 0))],
        # Sealing guest memory is the front-end's business, never the backend's.
        [Probe("fcntl", lambda k: fcntl.fcntl(k.memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE),
               KILLED)]),
    "mmap": Case(
        [Probe("mmap", lambda k: mmap.mmap(k.memfd, PAGE, mmap.MAP_SHARED,
                                           mmap.PROT_READ | mmap.PROT_WRITE))],
        [raw("mmap", lambda k: (None, PAGE, mmap.PROT_READ | mmap.PROT_EXEC,
                                mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0), KILLED),
         raw("mmap", lambda k: (None, PAGE, mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC,
                                mmap.MAP_SHARED, k.memfd, 0), KILLED)]),
    "mremap": Case(
        [raw("mremap", lambda k: (k.mapping, PAGE, 2 * PAGE, MREMAP_MAYMOVE))],
        [raw("mremap", lambda k: (k.mapping, PAGE, PAGE, MREMAP_MAYMOVE | MREMAP_FIXED,
                                  k.mapping + 16 * PAGE), KILLED)]),
    "munmap": Case(
        [raw("munmap", lambda k: (k.mapping, PAGE))],
        [raw("mprotect", lambda k: (k.mapping, PAGE, mmap.PROT_READ | mmap.PROT_EXEC), KILLED)]),
    "brk": Case(
        [raw("brk", lambda k: (0,))],
        # READ_IMPLIES_EXEC would make every readable mapping executable.
        [raw("personality", lambda k: (READ_IMPLIES_EXEC,), KILLED)]),
    "close": Case(
        [Probe("close", lambda k: os.close(k.efd))],
        [raw("dup3", lambda k: (k.efd, 100, 0), KILLED)]),
    "getpid": Case(
        [Probe("getpid", lambda k: os.getpid())],
        [raw("kill", lambda k: (1, 0), KILLED)]),
    "clock_gettime": Case(
        # Direct: time.clock_gettime() would be answered by the vDSO without a syscall.
        [raw("clock_gettime", lambda k: (CLOCK_MONOTONIC, buf(16)))],
        [raw("clock_settime", lambda k: (CLOCK_REALTIME, buf(16)), KILLED)]),
    "rt_sigreturn": Case(
        [Probe("rt_sigreturn", handle_sigpipe)],
        [raw("tgkill", lambda k: (1, 1, signal.SIGKILL), KILLED)]),
    "rt_sigaction": Case(
        [Probe("rt_sigaction", lambda k: signal.signal(signal.SIGUSR1, signal.SIG_IGN))],
        [raw("rt_sigprocmask", lambda k: (signal.SIG_BLOCK, buf(8), None, 8), KILLED)]),
    "exit_group": Case(
        [Probe("exit_group", lambda k: os._exit(7), "exit 7")],
        [raw("exit", lambda k: (7,), KILLED)]),
    "openat": Case(
        # Refused without running, whatever the path: the traceback printer copes.
        [Probe("openat", lambda k: Path("/etc/passwd").read_bytes(), "errno EPERM")],
        [raw("open", lambda k: (b"/etc/passwd", os.O_RDONLY), KILLED)]),
}

# Syscalls that would undo the confinement or reach outside it. None may be in the policy,
# and each must kill the backend outright, before it runs.
NEVER = (
    "open", "openat2", "creat", "execve", "execveat", "fork", "vfork", "clone", "clone3",
    "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root",
    "chroot", "unshare", "setns", "socket", "socketpair", "connect", "bind", "listen", "kill",
    "tkill", "tgkill", "setuid", "setresuid", "setgid", "setgroups", "capset", "prctl",
    "seccomp", "bpf", "perf_event_open", "memfd_create", "userfaultfd", "io_uring_setup",
    "mprotect", "personality", "keyctl", "init_module", "reboot",
)


def _probe_params() -> list[Any]:
    return [
        pytest.param(probe, id=f"{rule}-{side}{i}")
        for rule, case in CASES.items()
        for side, probes in (("within", case.within), ("outside", case.outside))
        for i, probe in enumerate(probes)
    ]


# --- the backend policy, rule by rule -----------------------------------------------------


def test_backend_policy_parses_with_kill_as_default() -> None:
    policy = read_policy(BACKEND_POLICY)
    assert policy.default == "kill"
    assert len(policy.rules) == len(set(policy.syscalls))


def test_every_rule_has_probes_and_no_probe_is_stale() -> None:
    policy = read_policy(BACKEND_POLICY)
    assert sorted(CASES) == sorted(policy.syscalls)
    allowed = set(policy.syscalls)
    for rule in policy.rules:
        case = CASES[rule.syscall]
        assert case.within and case.outside, rule.syscall
        expect = OK if rule.errno is None else f"errno {errno.errorcode[rule.errno]}"
        for probe in case.within:
            assert probe.syscall == rule.syscall
            # exit_group succeeds by exiting.
            assert probe.expect == expect or rule.syscall == "exit_group", rule.syscall
        for probe in case.outside:
            # A forbidden argument of this very rule, or a syscall the policy does not list.
            assert probe.syscall == rule.syscall or probe.syscall not in allowed, probe
            assert probe.expect == KILLED
            if probe.syscall == rule.syscall:
                assert rule.alternatives, f"{rule.syscall} allows every argument"


@pytest.mark.parametrize("probe", _probe_params())
def test_rule_in_a_confined_child(probe: Probe, tmp_path: Path) -> None:
    result = run_confined(probe.call, lambda: Kit.build(tmp_path))
    assert result.confined, result.reports
    assert result.outcome == probe.expect, result.reports


def test_no_forbidden_syscall_is_in_the_policy() -> None:
    assert not set(NEVER) & set(read_policy(BACKEND_POLICY).syscalls)


@pytest.mark.parametrize("syscall", NEVER)
def test_forbidden_syscall_kills_the_confined_child(syscall: str) -> None:
    result = run_confined(lambda _: sc(syscall, 0, 0, 0, 0, 0, 0))
    assert result.confined, result.reports
    assert result.outcome == KILLED, result.reports


def test_log_mode_lets_an_unlisted_syscall_run() -> None:
    result = run_confined(lambda _: sc("getppid"), seccomp_action="log")
    assert result.confined, result.reports
    assert result.outcome == OK


# --- the parser ---------------------------------------------------------------------------

GRAMMAR = """\
# every form the format has
@default kill
read: 1                                 # trailing comment
mmap: arg2 & PROT_EXEC == 0
fcntl: arg1 == F_GETFL || arg1 == 0x4
getsockopt: arg1 == SOL_SOCKET && arg2 == SO_PEERCRED
fallocate: arg1 == FALLOC_FL_KEEP_SIZE|FALLOC_FL_PUNCH_HOLE
lseek: arg2 <= 2 && arg1 != 7
openat: return EPERM
"""


def test_grammar_parses_into_rules() -> None:
    policy = parse_policy(GRAMMAR, "grammar.policy")
    rules = {rule.syscall: rule for rule in policy.rules}
    assert policy.default == "kill"
    assert policy.syscalls == ("read", "mmap", "fcntl", "getsockopt", "fallocate", "lseek",
                               "openat")
    assert rules["read"] == Rule("read", 0, 3)
    assert rules["mmap"].alternatives == ((Comparison(2, "==", 0, mmap.PROT_EXEC),),)
    assert rules["fcntl"].alternatives == (
        (Comparison(1, "==", fcntl.F_GETFL),), (Comparison(1, "==", 4),))
    assert rules["getsockopt"].alternatives == (
        (Comparison(1, "==", socket.SOL_SOCKET), Comparison(2, "==", socket.SO_PEERCRED)),)
    assert rules["fallocate"].alternatives == ((Comparison(1, "==", 3),),)
    assert rules["lseek"].alternatives == ((Comparison(2, "<=", 2), Comparison(1, "!=", 7)),)
    assert rules["openat"] == Rule("openat", 257, 9, errno=errno.EPERM)


@pytest.mark.parametrize(("line", "reason"), [
    ("nosuchcall: 1", "unknown syscall 'nosuchcall'"),
    ("socketcall: 1", "unknown syscall 'socketcall' on this architecture"),
    ("Read: 1", "'Read' is not a syscall name"),
    ("read 1", "expected 'syscall: condition'"),
    ("read:", "bad condition ''"),
    ("mmap: arg2 ~ 4", "bad condition 'arg2 ~ 4'"),
    ("mmap: arg2 == PROT_EVERYTHING", "unknown constant 'PROT_EVERYTHING'"),
    ("mmap: arg6 == 0", "arg6 does not exist"),
    ("mmap: arg2 & PROT_EXEC != 0", "a masked test must use =="),
    ("mmap: arg2 & PROT_EXEC == 8", "can never hold"),
    ("mmap: arg2 == 0x10000000000000000", "does not fit in 64 bits"),
    ("mmap: arg2 == 0 && arg2 == 1", "tests one argument twice"),
    ("openat: return ENOTANERRNO", "unknown errno 'ENOTANERRNO'"),
    ("openat: return errorcode", "unknown errno 'errorcode'"),
    ("read: 1\nread: arg0 == 0", "read already has a rule on line 3"),
    ("@default kill", "@default is given twice"),
    ("@include common.policy", "unknown directive '@include'"),
])
def test_parser_rejects_with_file_and_line(line: str, reason: str) -> None:
    text = f"# a policy\n@default kill\n{line}\n"
    with pytest.raises(SeccompPolicyError) as info:
        parse_policy(text, "bad.policy")
    message = str(info.value)
    assert message.startswith(("bad.policy:3: ", "bad.policy:4: ")), message
    assert reason in message


def test_parser_rejects_an_unknown_default_action() -> None:
    with pytest.raises(SeccompPolicyError, match=r"^bad.policy:1: @default must be one of"):
        parse_policy("@default allow\nread: 1\n", "bad.policy")


def test_parser_rejects_a_policy_without_default() -> None:
    with pytest.raises(SeccompPolicyError, match=r"^bad.policy: no '@default kill' line"):
        parse_policy("read: 1\n", "bad.policy")


def test_constants_are_this_platforms_values() -> None:
    assert CONSTANTS["PROT_EXEC"] == mmap.PROT_EXEC
    assert CONSTANTS["FIONBIO"] == termios.FIONBIO
    assert CONSTANTS["FALLOC_FL_ZERO_RANGE"] == FALLOC_FL_ZERO_RANGE
    assert CONSTANTS["TUNSETOFFLOAD"] == TUNSETOFFLOAD
    assert CONSTANTS["TUNSETQUEUE"] == TUNSETQUEUE


# --- compiling ----------------------------------------------------------------------------


@pytest.mark.parametrize(("action", "default"), [
    ("kill", pyseccomp.KILL_PROCESS), ("log", pyseccomp.LOG),
])
def test_compiled_filter_default_follows_the_action(action: str, default: int) -> None:
    flt = compile_filter(read_policy(BACKEND_POLICY), action)
    assert flt.get_attr(pyseccomp.Attr.ACT_DEFAULT) == default
    assert flt.get_attr(pyseccomp.Attr.ACT_BADARCH) == default


def test_compile_rejects_an_unknown_action() -> None:
    with pytest.raises(SeccompPolicyError, match="must be one of kill, log, not 'allow'"):
        compile_filter(read_policy(BACKEND_POLICY), "allow")
