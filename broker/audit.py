"""`ringfence audit`: what each ringfence process can actually do, against what it should.

The processes are found through the pidfiles in the policy's run directory (the broker's, one
per backend, one per `ringfence run-qemu`); their facts come from /proc. `evaluate` is pure:
facts and expectations in, violations out, so every rule is tested on made-up facts. The
collection side takes the /proc root as a parameter, so it is tested on fake trees too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import broker
import sandbox
from broker.policy import Policy, PolicyError, load_policy

DEFAULT_POLICY = "/etc/ringfence/policy.toml"
ROLES = ("broker", "backend", "qemu")
# A pid is reused only after its process died; a process that started this much later than
# its pidfile was written is not the one the file names. The slack covers /proc's rounding.
PIDFILE_SLACK_S = 2.0
# The backend's stderr is the log it inherits from the broker (the journal under systemd).
LOG_FD = 2


class AuditError(Exception):
    """The audit cannot be done; one sentence for the operator."""


@dataclass(frozen=True)
class Fd:
    fd: int
    target: str  # what /proc/PID/fd/N links to: a path, socket:[inode], anon_inode:[...], ...
    unix_path: str | None = None  # the address of a unix socket, when /proc/net/unix knows it


@dataclass(frozen=True)
class ProcessFacts:
    pid: int
    role: str  # one of ROLES
    name: str | None  # the group of a backend, the VM of a QEMU
    uids: tuple[int, ...]  # real, effective, saved, file system
    cap_eff: int
    cap_bnd: int
    no_new_privs: int
    seccomp: int  # 0 none, 1 strict, 2 filter
    namespaces: tuple[str, ...]  # those that differ from init's (or, if hidden, the auditor's)
    fds: tuple[Fd, ...]
    interfaces: tuple[str, ...]  # network interfaces in its network namespace


@dataclass(frozen=True)
class Expectations:
    image_roots: tuple[str, ...]


# --- the rules (pure) ----------------------------------------------------------------------


def evaluate(facts: ProcessFacts, expect: Expectations) -> list[str]:
    """Every way `facts` breaks what its role must be; empty when it meets its expectations."""
    if facts.role == "backend":
        return _backend_violations(facts, expect)
    if facts.role == "qemu":
        return _qemu_violations(facts, expect)
    return []  # the broker is root by design; the unit file is what confines it


def _backend_violations(facts: ProcessFacts, expect: Expectations) -> list[str]:
    found = []
    if facts.cap_eff:
        found.append(f"has effective capabilities {facts.cap_eff:#x}")
    if facts.cap_bnd:
        found.append(f"has capabilities {facts.cap_bnd:#x} in its bounding set")
    if facts.seccomp != 2:
        found.append(f"is not under a seccomp filter (Seccomp {facts.seccomp})")
    if facts.no_new_privs != 1:
        found.append("can gain privileges through exec (NoNewPrivs 0)")
    if 0 in facts.uids:
        found.append("runs as root")
    for ns in ("net", "mnt"):
        if ns not in facts.namespaces:
            found.append(f"shares the host's {ns} namespace")
    for fd in facts.fds:
        path = _path(fd.target)
        if path is not None and not (fd.fd == LOG_FD or _is_backend_grant(path, expect)):
            found.append(f"holds fd {fd.fd} to {path}, which is not one of its grants")
    return found


def _qemu_violations(facts: ProcessFacts, expect: Expectations) -> list[str]:
    found = []
    if 0 in facts.uids:
        found.append("runs as root")
    for fd in facts.fds:
        path = _path(fd.target)
        if path is not None and _under(path, expect.image_roots):
            found.append(f"holds fd {fd.fd} to the image {path}")
        elif path == TUN:
            found.append(f"holds fd {fd.fd} to a tap ({TUN})")
    others = [name for name in facts.interfaces if name != "lo"]
    if others:
        found.append(f"sees network interfaces besides lo: {', '.join(others)}")
    return found


def _path(target: str) -> str | None:
    """The file an fd target names, or None for sockets, pipes and anonymous inodes."""
    if not target.startswith("/"):
        return None
    return target.removesuffix(" (deleted)")


TUN = "/dev/net/tun"


def _is_backend_grant(path: str, expect: Expectations) -> bool:
    # memfds (guest RAM) show as "/memfd:<name>"; /dev/null is what confine() leaves on 0 and 1;
    # /dev/net/tun is a tap the broker created and handed over (the backend cannot open one).
    return (path.startswith("/memfd:") or path in ("/dev/null", TUN)
            or _under(path, expect.image_roots))


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path.startswith(root.rstrip("/") + "/") for root in roots)


# --- /proc parsers (pure) --------------------------------------------------------------------


def parse_status(text: str) -> dict[str, str]:
    return {key: value.strip() for key, _, value in
            (line.partition(":") for line in text.splitlines())}


def parse_net_dev(text: str) -> tuple[str, ...]:
    """Interface names from /proc/PID/net/dev (two header lines, then "name: counters")."""
    return tuple(line.partition(":")[0].strip() for line in text.splitlines()[2:] if ":" in line)


def parse_unix_table(text: str) -> dict[int, str]:
    """inode -> address from /proc/net/unix, for the sockets that have one."""
    table = {}
    for line in text.splitlines()[1:]:
        # Num RefCount Protocol Flags Type St Inode [Path]; the path may contain spaces.
        fields = line.split(maxsplit=7)
        if len(fields) == 8:
            table[int(fields[6])] = fields[7]
    return table


# --- collection ------------------------------------------------------------------------------


def pidfile_role(filename: str) -> tuple[str, str | None] | None:
    """(role, group or VM) of a pidfile name in the run directory, None for other files."""
    if filename == "broker.pid":
        return "broker", None
    for role in ("backend", "qemu"):
        name = filename.removeprefix(f"{role}-").removesuffix(".pid")
        if filename == f"{role}-{name}.pid" and name:
            return role, name
    return None


def live_pid(pidfile: str, proc: str = "/proc") -> int | None:
    """The pid in `pidfile` if that process still runs; None for a stale or unreadable file."""
    try:
        pid = int(Path(pidfile).read_text().strip())
        written = os.stat(pidfile).st_mtime
        stat = Path(f"{proc}/{pid}/stat").read_text()
        boot = next(int(line.split()[1]) for line in Path(f"{proc}/stat").read_text()
                    .splitlines() if line.startswith("btime "))
    except (OSError, ValueError, StopIteration):
        return None
    # After "comm)" come state (field 3) ... starttime (field 22), in clock ticks since boot.
    fields = stat[stat.rfind(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return pid if started <= written + PIDFILE_SLACK_S else None


def find_processes(run_dir: str, proc: str = "/proc") -> list[tuple[str, str | None, int]]:
    """(role, name, pid) of every live process with a pidfile in `run_dir`, broker first."""
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return []
    found = []
    for filename in names:
        role = pidfile_role(filename)
        pid = live_pid(os.path.join(run_dir, filename), proc) if role else None
        if role and pid:
            found.append((*role, pid))
    return sorted(found, key=lambda item: (ROLES.index(item[0]), item[1] or ""))


def read_namespaces(pid: int | str, proc: str = "/proc") -> dict[str, str]:
    """Namespace kind -> identity ("net:[4026531840]") for the ones /proc lets us read."""
    found = {}
    for kind in os.listdir(f"{proc}/{pid}/ns"):
        try:
            found[kind] = os.readlink(f"{proc}/{pid}/ns/{kind}")
        except OSError:
            continue  # e.g. pid 1 hidden from us inside a container
    return found


def reference_namespaces(proc: str = "/proc") -> dict[str, str]:
    """init's namespaces; the auditor's own where init's cannot be read (as in containers)."""
    return read_namespaces(1, proc) or read_namespaces("self", proc)


def read_facts(pid: int, role: str, name: str | None, *, proc: str = "/proc",
               reference: Mapping[str, str], unix_paths: Mapping[int, str]) -> ProcessFacts:
    """The facts about one process; OSError if it is gone or hidden."""
    status = parse_status(Path(f"{proc}/{pid}/status").read_text())
    namespaces = read_namespaces(pid, proc)
    fds = []
    for entry in sorted(os.listdir(f"{proc}/{pid}/fd"), key=int):
        try:
            target = os.readlink(f"{proc}/{pid}/fd/{entry}")
        except FileNotFoundError:
            continue  # closed while we looked
        inode = target[len("socket:["):-1] if target.startswith("socket:[") else ""
        fds.append(Fd(int(entry), target, unix_paths.get(int(inode)) if inode else None))
    return ProcessFacts(
        pid=pid, role=role, name=name,
        uids=tuple(int(u) for u in status["Uid"].split()),
        cap_eff=int(status["CapEff"], 16),
        cap_bnd=int(status["CapBnd"], 16),
        no_new_privs=int(status.get("NoNewPrivs", "0")),
        seccomp=int(status.get("Seccomp", "0")),
        namespaces=tuple(sorted(kind for kind, ident in namespaces.items()
                                if kind in reference and reference[kind] != ident)),
        fds=tuple(fds),
        interfaces=parse_net_dev(Path(f"{proc}/{pid}/net/dev").read_text()),
    )


def collect(run_dir: str, proc: str = "/proc") -> list[ProcessFacts]:
    """Facts about every live ringfence process of `run_dir`; processes that exit meanwhile
    are left out."""
    processes = find_processes(run_dir, proc)
    # A unix socket is listed in the table of the network namespace it was made in; the
    # backend's listening sockets come from the broker's, so read every process's table.
    unix_paths: dict[int, str] = {}
    for table in [f"{proc}/net/unix", *(f"{proc}/{pid}/net/unix" for _, _, pid in processes)]:
        try:
            unix_paths.update(parse_unix_table(Path(table).read_text()))
        except FileNotFoundError:
            continue
    reference = reference_namespaces(proc)
    facts = []
    for role, name, pid in processes:
        try:
            facts.append(read_facts(pid, role, name, proc=proc, reference=reference,
                                    unix_paths=unix_paths))
        except PermissionError:
            raise AuditError(f"cannot read /proc/{pid} of the {role}; run ringfence audit as "
                             "root") from None
        except (FileNotFoundError, ProcessLookupError):
            continue
    return facts


def privileged_lines(dirs: Iterable[Path] | None = None) -> int:
    """Non-blank, non-comment lines of the privileged code: broker/*.py and sandbox/*.py."""
    if dirs is None:
        dirs = [Path(broker.__file__).parent, Path(sandbox.__file__).parent]
    count = 0
    for directory in dirs:
        for source in sorted(directory.glob("*.py")):
            count += sum(1 for line in source.read_text().splitlines()
                         if line.strip() and not line.lstrip().startswith("#"))
    return count


# --- output ----------------------------------------------------------------------------------


def to_json(results: list[tuple[ProcessFacts, list[str]]], lines: int) -> dict[str, Any]:
    processes = []
    for facts, violations in results:
        entry: dict[str, Any] = {"role": facts.role, "pid": facts.pid}
        if facts.role != "broker":
            entry["group" if facts.role == "backend" else "vm"] = facts.name
        entry.update(
            uid=facts.uids[1], uids=list(facts.uids), cap_eff=facts.cap_eff,
            cap_bnd=facts.cap_bnd, no_new_privs=facts.no_new_privs, seccomp=facts.seccomp,
            namespaces=list(facts.namespaces), interfaces=list(facts.interfaces),
            fds=[{"fd": fd.fd, "target": fd.target, "unix_path": fd.unix_path}
                 for fd in facts.fds],
            violations=violations,
        )
        processes.append(entry)
    return {"processes": processes, "privileged_lines": lines}


def format_table(results: list[tuple[ProcessFacts, list[str]]], lines: int) -> str:
    header = ("ROLE", "NAME", "PID", "UID", "CAPEFF", "CAPBND", "NNP", "SECCOMP", "NAMESPACES",
              "FDS", "VIOLATIONS")
    rows = [header]
    for facts, violations in results:
        rows.append((facts.role, facts.name or "-", str(facts.pid), str(facts.uids[1]),
                     f"{facts.cap_eff:x}", f"{facts.cap_bnd:x}", str(facts.no_new_privs),
                     str(facts.seccomp), ",".join(facts.namespaces) or "-", str(len(facts.fds)),
                     str(len(violations))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    out = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
           for row in rows]
    if len(rows) == 1:
        out.append("(no running ringfence process found)")
    for facts, violations in results:
        label = f"{facts.role} {facts.name}" if facts.name else facts.role
        out += [f"{label} (pid {facts.pid}): {violation}" for violation in violations]
    out.append(f"privileged code (broker/, sandbox/): {lines} lines")
    return "\n".join(out)


def run_audit(policy: Policy, proc: str = "/proc") -> list[tuple[ProcessFacts, list[str]]]:
    expect = Expectations(policy.broker.image_roots)
    return [(facts, evaluate(facts, expect)) for facts in collect(policy.broker.run_dir, proc)]


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("audit", help="check the confinement of the broker, backends "
                              "and QEMUs; exit 1 on any violation")
    p.add_argument("--policy", default=DEFAULT_POLICY, help="policy naming the run directory "
                   "(default %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_audit)


def _cmd_audit(args: argparse.Namespace) -> int:
    try:
        results = run_audit(load_policy(args.policy))
    except (PolicyError, AuditError) as exc:
        print(f"ringfence: {exc}", file=sys.stderr)
        return 2
    lines = privileged_lines()
    if args.json:
        print(json.dumps(to_json(results, lines), indent=2))
    else:
        print(format_table(results, lines))
    return 1 if any(violations for _, violations in results) else 0
