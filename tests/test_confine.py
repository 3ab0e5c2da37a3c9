"""sandbox.confine: what a confined child can see and do, checked from the parent's side too.

A confined process has no /proc of its own, so the parent inspects it through /proc/PID while
the child waits (tests.confined.run_confined's `while_confined`). Failure cases run in a child
as well: a half-confined pytest would be no test runner at all.
"""

from __future__ import annotations

import os
import resource
import threading
from pathlib import Path

import pytest

from sandbox.confine import MAX_FDS, describe_self
from tests.confined import NOBODY, Child, run_confined, run_in_child

CONFINED_NAMESPACES = ("mnt", "net", "ipc", "uts")


def test_confined_child_has_its_uid_no_capabilities_no_new_privs_and_a_filter() -> None:
    seen: dict[str, object] = {}
    result = run_confined(lambda _: None,
                          while_confined=lambda pid: seen.update(describe_self(pid)))
    assert result.outcome == "ok", result.reports
    assert seen["uid"] == [NOBODY] * 4
    assert seen["gid"] == [NOBODY] * 4
    assert seen["groups"] == []
    for capabilities in ("cap_eff", "cap_prm", "cap_inh", "cap_bnd", "cap_amb"):
        assert seen[capabilities] == 0, capabilities
    assert seen["no_new_privs"] == 1
    assert seen["seccomp"] == 2
    assert seen["threads"] == 1


def test_describe_self_reads_the_callers_own_status() -> None:
    facts = describe_self()
    assert facts["uid"][:2] == [os.getuid(), os.geteuid()]  # type: ignore[index]
    assert facts["seccomp"] == 0  # pytest itself runs unconfined


def test_confined_child_is_in_new_mount_network_ipc_and_uts_namespaces() -> None:
    namespaces: dict[str, tuple[str, str]] = {}

    def compare(pid: int) -> None:
        for ns in (*CONFINED_NAMESPACES, "pid", "user"):
            namespaces[ns] = (os.readlink(f"/proc/{pid}/ns/{ns}"),
                              os.readlink(f"/proc/self/ns/{ns}"))

    result = run_confined(lambda _: None, while_confined=compare)
    assert result.outcome == "ok", result.reports
    for ns in CONFINED_NAMESPACES:
        child, ours = namespaces[ns]
        assert child != ours, ns
    # Only what confine() asks for: no user namespace games.
    assert namespaces["user"][0] == namespaces["user"][1]


def test_confined_child_network_namespace_has_only_loopback() -> None:
    interfaces: list[str] = []

    def list_interfaces(pid: int) -> None:
        # /proc/PID/net shows the network namespace of PID, not ours.
        lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
        interfaces.extend(line.split(":")[0].strip() for line in lines)

    result = run_confined(lambda _: None, while_confined=list_interfaces)
    assert result.outcome == "ok", result.reports
    assert interfaces == ["lo"]


def test_confined_child_root_is_one_empty_read_only_tmpfs() -> None:
    seen: dict[str, object] = {}

    def look(pid: int) -> None:
        seen["root"] = os.listdir(f"/proc/{pid}/root")
        seen["cwd"] = os.path.samefile(f"/proc/{pid}/cwd", f"/proc/{pid}/root")
        seen["mounts"] = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()

    result = run_confined(lambda _: None, while_confined=look)
    assert result.outcome == "ok", result.reports
    assert seen["root"] == []
    assert seen["cwd"] is True
    (mount,) = seen["mounts"]  # type: ignore[misc]
    fields = mount.split()
    mount_point, options, fs_type = fields[4], fields[5], fields[fields.index("-") + 1]
    assert (mount_point, fs_type) == ("/", "tmpfs")
    assert "ro" in options.split(",")


def test_no_host_path_is_visible_from_inside(tmp_path: Path) -> None:
    # A policy that logs instead of refusing, so the child can look around with open().
    permissive = tmp_path / "log-everything.policy"
    permissive.write_text("@default log\n")

    def look(_: object) -> None:
        entries = os.listdir("/")
        if entries or os.path.exists("/etc/passwd") or os.path.exists(tmp_path):
            raise AssertionError(f"host paths visible: / holds {entries}")

    result = run_confined(look, seccomp_policy=permissive)
    assert result.outcome == "ok", result.reports


def test_open_of_a_host_path_is_refused_before_it_runs() -> None:
    result = run_confined(lambda _: Path("/etc/passwd").read_bytes())
    assert result.confined
    # EPERM from the filter, not ENOENT from the empty root: openat never ran.
    assert result.outcome == "errno EPERM"


def test_only_kept_fds_stay_open_and_stdin_stdout_become_dev_null() -> None:
    kept = os.open("/dev/null", os.O_RDONLY)
    dropped = [os.open("/dev/null", os.O_RDONLY) for _ in range(3)]
    high = os.dup2(dropped[0], 1000)  # beyond any small range a loop might cover
    open_fds: set[int] = set()
    devices: dict[int, tuple[int, int]] = {}

    def look(pid: int) -> None:
        open_fds.update(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))
        for fd in (0, 1, 2):
            st = os.stat(f"/proc/{pid}/fd/{fd}")
            devices[fd] = (st.st_dev, st.st_ino)

    try:
        result = run_confined(lambda _: None, lambda: (None, [kept]), while_confined=look)
    finally:
        for fd in (kept, *dropped, high):
            os.close(fd)
    assert result.outcome == "ok", result.reports
    assert kept in open_fds
    assert not open_fds & {*dropped, high}
    assert len(open_fds) == 3 + 1 + 2  # stdio, `kept`, the report and go pipes
    null = os.stat("/dev/null")
    assert devices[0] == devices[1] == (null.st_dev, null.st_ino)
    stderr = os.fstat(2)
    assert devices[2] == (stderr.st_dev, stderr.st_ino)  # stderr is the log: kept as it was


def test_resource_limits_forbid_core_dumps_and_new_processes_and_bound_fds() -> None:
    limits: dict[str, list[str]] = {}

    def read_limits(pid: int) -> None:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
            name, soft, hard = line[:26].strip(), *line[26:].split()[:2]
            limits[name] = [soft, hard]

    result = run_confined(lambda _: None, while_confined=read_limits)
    assert result.outcome == "ok", result.reports
    assert limits["Max core file size"] == ["0", "0"]
    assert limits["Max processes"] == ["0", "0"]
    assert limits["Max open files"] == [str(MAX_FDS)] * 2
    assert limits["Max file size"] == ["unlimited"] * 2  # images are written at any size


@pytest.mark.parametrize("attempt", [
    pytest.param(lambda _: os.fork(), id="fork"),
    pytest.param(lambda _: os.execv("/bin/true", ["true"]), id="execve"),
    pytest.param(lambda _: threading.Thread(target=int).start(), id="thread"),
    pytest.param(lambda _: os.kill(1, 0), id="kill"),
    pytest.param(lambda _: os.setuid(0), id="setuid"),
])
def test_new_processes_threads_exec_and_privileges_kill_the_child(attempt: object) -> None:
    result = run_confined(attempt)  # type: ignore[arg-type]
    assert result.confined, result.reports
    assert result.outcome == "SIGSYS"


def test_log_mode_keeps_running_where_kill_mode_dies() -> None:
    result = run_confined(lambda _: os.getppid(), seccomp_action="log")
    assert (result.confined, result.outcome) == (True, "ok")
    result = run_confined(lambda _: os.getppid())
    assert (result.confined, result.outcome) == (True, "SIGSYS")


def test_without_empty_root_the_host_file_system_stays_visible() -> None:
    seen: list[str] = []
    result = run_confined(lambda _: None, empty_root=False,
                          while_confined=lambda pid: seen.extend(os.listdir(f"/proc/{pid}/root")))
    assert result.outcome == "ok", result.reports
    assert "etc" in seen


# --- refusals: one sentence, and the process is left as it was ------------------------------


def _bad_policy(directory: Path) -> Path:
    path = directory / "bad.policy"
    path.write_text("@default kill\nnosuchcall: 1\n")
    return path


def _two_threads(child: Child) -> None:
    release = threading.Event()
    threading.Thread(target=release.wait, daemon=True).start()


@pytest.mark.parametrize(("args", "prepare", "message"), [
    ({"seccomp_policy": Path("/nonexistent/backend.policy")}, None,
     "cannot load seccomp policy /nonexistent/backend.policy: No such file or directory"),
    ({"seccomp_policy": "bad"}, None, "bad.policy:2: unknown syscall 'nosuchcall'"),
    ({"seccomp_action": "allow"}, None, "seccomp action must be one of kill, log, not 'allow'"),
    ({"uid": 0}, None, "refusing to confine to uid or gid 0"),
    ({"gid": 0}, None, "refusing to confine to uid or gid 0"),
    ({}, lambda child: os.seteuid(NOBODY), "confine() needs root"),
    ({}, _two_threads, "confine() needs a single-threaded process, not 2"),
], ids=["no-policy-file", "bad-policy", "bad-action", "uid-0", "gid-0", "not-root", "threads"])
def test_refusal_raises_confinement_error_and_changes_nothing(
        args: dict[str, object], prepare: object, message: str, tmp_path: Path) -> None:
    from sandbox.confine import ConfinementError, confine

    if args.get("seccomp_policy") == "bad":
        args = {**args, "seccomp_policy": _bad_policy(tmp_path)}
    confine_args = {"uid": NOBODY, "gid": NOBODY,
                    "seccomp_policy": Path(__file__).parent.parent / "policies/backend.policy",
                    **args}
    witness = os.open("/dev/null", os.O_RDONLY)  # not kept: must still be open afterwards

    def attempt(child: Child) -> None:
        if prepare is not None:
            prepare(child)  # type: ignore[operator]
        try:
            confine(keep_fds=child.fds, **confine_args)  # type: ignore[arg-type]
        except ConfinementError as exc:
            child.report(f"refused: {exc}")
        os.seteuid(0)  # undo the not-root case; a no-op otherwise
        child.report(" ".join([
            str(os.getresuid()), str(resource.getrlimit(resource.RLIMIT_NOFILE)),
            os.readlink("/proc/self/ns/net"), str(os.path.exists(f"/proc/self/fd/{witness}")),
        ]))

    try:
        result = run_in_child(attempt)
    finally:
        os.close(witness)
    assert result.outcome == "ok", result.reports
    refusal, state = result.reports[:2]
    assert refusal.startswith("refused: ") and message in refusal, refusal
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert state == f"(0, 0, 0) {limits} {os.readlink('/proc/self/ns/net')} True"
