"""The broker daemon (root): open what needs privilege, hand it to confined backends, supervise.

It never parses guest data. Per VM it opens and locks the images and creates the listening
vhost-user sockets (owned by the VM's uid, mode 0600); per isolation group it spawns one
backend, which confines itself before reading anything, and passes it those FDs over a
SOCK_SEQPACKET socketpair. It keeps its own copies, so a backend that dies is restarted and
re-handed its devices. Operators talk to it on the admin socket (status, reload, stop) or with
SIGHUP (reload) and SIGTERM (stop).
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from broker import admin, systemd
from broker.fdpass import TO_BROKER, FrameError, Kind, recv_frame, send_frame
from broker.images import ImageError, open_image
from broker.policy import (
    Nic,
    Policy,
    PolicyError,
    Vm,
    admin_socket_path,
    disk_socket_path,
    load_policy,
    nic_socket_path,
    vm_socket_dir,
)
from broker.taps import TapError, create_tap, delete_tap, parse_mac

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 15.0
REPLY_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 5.0
# Restart delays for a backend that keeps dying right after it starts.
QUICK_DEATH_S = 2.0
MAX_RESTART_DELAY_S = 30.0


class BrokerError(Exception):
    """The broker cannot start or apply a policy; one sentence for the operator."""


def resolve_user(user: str | int, what: str) -> tuple[int, int]:
    """(uid, gid) of a user name or numeric uid; a numeric uid without an entry uses gid=uid."""
    try:
        entry = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    except KeyError:
        if isinstance(user, int):
            return user, user
        raise BrokerError(f"{what} user {user!r} does not exist; create it (useradd --system "
                          f"{user}) or change the policy") from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise BrokerError(f"{what} user {user!r} is root (uid or gid 0); give it a dedicated "
                          "unprivileged user in the policy")
    return entry.pw_uid, entry.pw_gid


def resolve_group(group: str | int | None) -> int | None:
    if group is None or isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise BrokerError(f"admin group {group!r} does not exist; create it (groupadd "
                          f"--system {group}) or change the policy") from None


def make_public_dir(path: str) -> None:
    """Create `path` 0755 (kept if it exists: a running QEMU may have it bind-mounted).

    VM users must reach their sockets although the unit's UMask=0077 would make it 0700.
    """
    os.makedirs(path, exist_ok=True)
    os.chmod(path, 0o755)


def bind_socket(path: str, uid: int, gid: int, mode: int) -> socket.socket:
    """A listening unix socket at `path`, created with `mode` and then given to uid:gid."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # ours: the directory is root's and only the broker writes it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o777 & ~mode)  # never a moment with wider permissions
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    os.chown(path, uid, gid, follow_symlinks=False)
    sock.listen(8)
    return sock


@dataclass(eq=False)
class DiskGrant:
    """What the broker holds for one disk: the locked image and the listening socket."""

    vm: str
    index: int
    socket_path: str
    image_fd: int
    listener: socket.socket
    readonly: bool
    num_queues: int
    serial: str
    kind: ClassVar[Kind] = Kind.ADD_BLK

    def frame(self) -> tuple[dict[str, Any], list[int]]:
        fields = {"vm": self.vm, "disk": self.index, "socket": self.socket_path,
                  "readonly": self.readonly, "num_queues": self.num_queues,
                  "serial": self.serial}
        return fields, [self.listener.fileno(), self.image_fd]

    def close(self) -> None:
        self.listener.close()
        os.close(self.image_fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)


@dataclass(eq=False)
class NicGrant:
    """What the broker holds for one NIC: the tap it created (an FD per queue pair) and the
    listening socket."""

    vm: str
    index: int
    socket_path: str
    tap_fds: list[int]
    listener: socket.socket
    nic: Nic
    kind: ClassVar[Kind] = Kind.ADD_NET

    def frame(self) -> tuple[dict[str, Any], list[int]]:
        nic = self.nic
        fields = {"vm": self.vm, "nic": self.index, "socket": self.socket_path, "tap": nic.tap,
                  "mac": nic.mac, "mtu": nic.mtu, "queues": nic.queues}
        return fields, [self.listener.fileno(), *self.tap_fds]

    def close(self) -> None:
        self.listener.close()
        for fd in self.tap_fds:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        try:
            delete_tap(self.nic.tap, vm=self.vm, nic=self.index)
        except OSError as exc:  # it still goes once the backend closes its copy
            log.error("VM %s nic%d: cannot delete tap %s: %s", self.vm, self.index,
                      self.nic.tap, exc)


Grant = DiskGrant | NicGrant


def open_nic(policy: Policy, vm: Vm, index: int, uid: int, gid: int) -> NicGrant:
    nic = vm.nics[index]
    try:
        tap_fds = create_tap(nic.tap, vm=vm.name, nic=index, bridge=nic.bridge,
                             mac=parse_mac(nic.mac), mtu=nic.mtu, queues=nic.queues)
    except TapError as exc:
        raise BrokerError(str(exc)) from None  # it names the VM and the NIC
    except (ValueError, OSError) as exc:
        raise BrokerError(f"VM {vm.name} nic{index}: {exc}") from None
    path = nic_socket_path(policy.broker, vm.name, index)
    try:
        listener = bind_socket(path, uid, gid, 0o600)
    except OSError as exc:
        for fd in tap_fds:
            os.close(fd)
        with contextlib.suppress(OSError):
            delete_tap(nic.tap, vm=vm.name, nic=index)
        raise BrokerError(f"VM {vm.name} nic{index}: cannot create socket {path}: "
                          f"{exc.strerror}") from None
    return NicGrant(vm.name, index, path, tap_fds, listener, nic)


def open_vm(policy: Policy, vm: Vm) -> list[Grant]:
    """Open, lock, create and bind everything one VM needs; all or nothing."""
    uid, gid = resolve_user(vm.user, f"VM {vm.name}'s")
    settings = policy.broker
    socket_dir = vm_socket_dir(settings, vm.name)
    make_public_dir(os.path.dirname(socket_dir))
    make_public_dir(socket_dir)
    grants: list[Grant] = []
    try:
        for index in range(len(vm.nics)):
            grants.append(open_nic(policy, vm, index, uid, gid))
        for index, disk in enumerate(vm.disks):
            try:
                image_fd = open_image(settings.image_roots, disk.image, readonly=disk.readonly)
            except ImageError as exc:
                raise BrokerError(f"VM {vm.name} disk{index}: {exc}") from None
            path = disk_socket_path(settings, vm.name, index)
            try:
                listener = bind_socket(path, uid, gid, 0o600)
            except OSError as exc:
                os.close(image_fd)
                raise BrokerError(f"VM {vm.name} disk{index}: cannot create socket {path}: "
                                  f"{exc.strerror}") from None
            grants.append(DiskGrant(vm.name, index, path, image_fd, listener, disk.readonly,
                                    vm.num_queues, f"{vm.name}-disk{index}"))
    except BaseException:
        for grant in grants:
            grant.close()
        raise
    return grants


@dataclass(eq=False)
class Backend:
    """One confined backend process serving one isolation group."""

    group: str
    process: subprocess.Popen[bytes]
    channel: socket.socket
    pidfd: int
    started: float = field(default_factory=time.monotonic)

    def request(self, kind: Kind, fields: dict[str, Any], fds: list[int] | None = None) -> None:
        send_frame(self.channel, kind, fields, fds or [])

    def receive(self, expected: Kind, timeout: float) -> dict[str, Any]:
        """Wait for a frame of `expected` kind, logging unsolicited ERROR frames meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.channel], [], [], remaining)[0]:
                raise BrokerError(f"backend for group {self.group} did not answer within "
                                  f"{timeout:.0f} s; see its log lines above")
            received = recv_frame(self.channel, TO_BROKER)
            if received is None:
                raise BrokerError(f"backend for group {self.group} exited; see its log above")
            frame, _fds = received  # no frame kind to the broker carries FDs
            if frame.kind == expected:
                return frame.fields
            if frame.kind == Kind.ERROR:
                log.error("group %s: backend could not serve VM %s: %s", self.group,
                          frame.fields["vm"], frame.fields["message"])


def qos_fields(vm: Vm) -> dict[str, Any]:
    qos = vm.qos
    return {"vm": vm.name, "weight": qos.weight, "priority": qos.priority,
            "iops_limit": qos.iops_limit or 0, "bps_limit": qos.bps_limit or 0,
            "burst_milli": round(qos.burst * 1000)}


def describe_exit(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with status {returncode}"
    sig = signal.Signals(-returncode)
    if sig == signal.SIGSYS:
        return ("was killed by its seccomp filter (SIGSYS): it made a system call outside "
                "policies/backend.policy")
    return f"was killed by {sig.name}"


class Broker:
    """The daemon's state and its event loop."""

    def __init__(self, policy_path: str, policy: Policy) -> None:
        self.policy_path = policy_path
        self.policy = policy
        self.backend_ids = resolve_user(policy.broker.backend_user, "backend")
        self.grants: dict[str, list[Grant]] = {}
        self.backends: dict[str, Backend] = {}
        self.restart_at: dict[str, float] = {}
        self.restart_delay: dict[str, float] = {}
        self.admin_listener: socket.socket | None = None
        self.selector = select.epoll()
        self.stopping = False
        self.reload_requested = False
        self._wakeup = socket.socketpair()

    # --- start and stop ----------------------------------------------------------------------

    def start(self) -> None:
        policy = self.policy
        settings = policy.broker
        admin_gid = resolve_group(settings.admin_group)
        make_public_dir(settings.run_dir)
        self._write_pidfile("broker", os.getpid())
        for vm in policy.vms.values():
            self.grants[vm.name] = open_vm(policy, vm)
        for group in policy.groups:
            self.spawn(group)
        self.admin_listener = bind_socket(admin_socket_path(settings), 0, admin_gid or 0,
                                          0o660 if admin_gid is not None else 0o600)
        self.admin_listener.setblocking(False)
        self.selector.register(self.admin_listener.fileno(), select.EPOLLIN)
        self._install_signals()
        log.info("broker ready: %d VMs, %d backends, admin socket %s", len(policy.vms),
                 len(self.backends), admin_socket_path(settings))
        systemd.notify("READY=1\nSTATUS=serving")

    def stop(self) -> None:
        systemd.notify("STOPPING=1")
        for group in list(self.backends):
            self.stop_backend(group)
        for grants in self.grants.values():
            for grant in grants:
                grant.close()
        self.grants.clear()
        if self.admin_listener is not None:
            self.admin_listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(admin_socket_path(self.policy.broker))
        self._remove_pidfile("broker")
        log.info("broker stopped")

    # --- backends ----------------------------------------------------------------------------

    def spawn(self, group: str) -> None:
        """Start a confined backend for `group`, hand it its devices, wait until it serves."""
        uid, gid = self.backend_ids
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-m", "backend", "backend", "--channel-fd", str(child.fileno()),
                "--group", group, "--uid", str(uid), "--gid", str(gid),
                "--seccomp", self.policy.broker.seccomp]
        process = subprocess.Popen(argv, pass_fds=[child.fileno()], stdin=subprocess.DEVNULL)
        child.close()
        backend = Backend(group, process, parent, os.pidfd_open(process.pid))
        self.backends[group] = backend
        self.selector.register(backend.pidfd, select.EPOLLIN)
        self._write_pidfile(f"backend-{group}", process.pid)
        try:
            backend.receive(Kind.READY, READY_TIMEOUT_S)
            for vm in self.policy.vms_in_group(group):
                self.hand_over(backend, vm, self.grants[vm.name])
            reply = backend_status(backend)
            served = len(reply["devices"]) + len(reply["nics"])
        except (BrokerError, FrameError, OSError) as exc:
            log.error("group %s: backend pid %d failed to start: %s", group, process.pid, exc)
            return  # its pidfd fires when it exits; the restart logic takes over
        log.info("group %s: backend pid %d confined and serving %d devices", group,
                 process.pid, served)

    def hand_over(self, backend: Backend, vm: Vm, grants: list[Grant]) -> None:
        for grant in grants:
            fields, fds = grant.frame()
            backend.request(grant.kind, fields, fds)
        if grants:
            backend.request(Kind.SET_QOS, qos_fields(vm))

    def stop_backend(self, group: str) -> None:
        backend = self.backends.pop(group)
        self.selector.unregister(backend.pidfd)
        with contextlib.suppress(OSError):
            backend.request(Kind.STOP, {})
        try:
            backend.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            backend.process.kill()
            backend.process.wait()
        backend.channel.close()
        os.close(backend.pidfd)
        self._remove_pidfile(f"backend-{group}")

    def backend_exited(self, backend: Backend) -> None:
        returncode = backend.process.wait()
        self.selector.unregister(backend.pidfd)
        os.close(backend.pidfd)
        backend.channel.close()
        del self.backends[backend.group]
        quick = time.monotonic() - backend.started < QUICK_DEATH_S
        delay = min(2 * self.restart_delay.get(backend.group, 0.5), MAX_RESTART_DELAY_S)
        self.restart_delay[backend.group] = delay if quick else 0.5
        wait = self.restart_delay[backend.group] if quick else 0.0
        log.error("group %s: backend pid %d %s; restarting it in %.1f s", backend.group,
                  backend.process.pid, describe_exit(returncode), wait)
        self.restart_at[backend.group] = time.monotonic() + wait

    # --- reload ------------------------------------------------------------------------------

    def reload(self) -> dict[str, Any]:
        """Apply a changed policy: only VMs and groups that changed are touched."""
        try:
            new = load_policy(self.policy_path)
        except PolicyError as exc:
            log.error("reload refused, keeping the running policy: %s", exc)
            return {"ok": False, "error": str(exc)}
        if new.broker != self.policy.broker:
            message = ("the [broker] section changed; restart the broker to apply it "
                       "(VM and group changes were not applied either)")
            log.error("reload refused: %s", message)
            return {"ok": False, "error": message}
        old = self.policy
        # A VM whose QoS alone changed is retuned in place: no disconnect, no reopen.
        retuned = [n for n in new.vms if n in old.vms and old.vms[n] != new.vms[n]
                   and replace(old.vms[n], qos=new.vms[n].qos) == new.vms[n]]
        removed = [n for n in old.vms if old.vms[n] != new.vms.get(n) and n not in retuned]
        added = [n for n in new.vms if new.vms[n] != old.vms.get(n) and n not in retuned]
        for name in removed:
            backend = self.backends.get(old.vms[name].group)
            if backend is not None:
                backend.request(Kind.REMOVE_VM, {"vm": name})
            for grant in self.grants.pop(name):
                grant.close()
        for group in set(old.groups) - set(new.groups):
            self.stop_backend(group)
        self.policy = new
        errors = []
        for name in added:
            try:
                self.grants[name] = open_vm(new, new.vms[name])
            except BrokerError as exc:
                log.error("reload: %s", exc)
                errors.append(str(exc))
                continue
            backend = self.backends.get(new.vms[name].group)
            if backend is not None:
                self.hand_over(backend, new.vms[name], self.grants[name])
        for name in retuned:
            backend = self.backends.get(new.vms[name].group)
            if backend is not None and self.grants.get(name):
                backend.request(Kind.SET_QOS, qos_fields(new.vms[name]))
        for group in set(new.groups) - set(old.groups):
            self.spawn(group)
        log.info("reload: removed %s, added %s, QoS changed for %s",
                 sorted(set(removed) - set(added)) or "none", sorted(added) or "none",
                 sorted(retuned) or "none")
        return {"ok": not errors, "removed": removed, "added": added, "retuned": retuned,
                "errors": errors}

    # --- admin -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        groups = {}
        for group in self.policy.groups:
            backend = self.backends.get(group)
            # "devices" are the disks (as before NICs had statistics); "nics" the NICs.
            entry: dict[str, Any] = {"pid": None, "devices": [], "nics": []}
            if backend is not None:
                entry["pid"] = backend.process.pid
                try:
                    reply = backend_status(backend)
                    entry["devices"], entry["nics"] = reply["devices"], reply["nics"]
                except (BrokerError, OSError) as exc:
                    entry["error"] = str(exc)
            groups[group] = entry
        vms = {name: {"group": vm.group, "user": vm.user,
                      "sockets": [g.socket_path for g in self.grants.get(name, [])]}
               for name, vm in self.policy.vms.items()}
        return {"ok": True, "pid": os.getpid(), "policy": self.policy_path, "groups": groups,
                "vms": vms}

    def serve_admin(self) -> None:
        if self.admin_listener is None:
            return
        try:
            conn, _ = self.admin_listener.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(2.0)  # a local client that stalls may not hold up the broker
            try:
                # Read before answering: closing with unread data would reset the connection
                # and the refused client would never see why.
                line = admin.read_line(conn)
                if not admin.peer_allowed(conn, resolve_group(self.policy.broker.admin_group)):
                    conn.sendall(admin.encode_response(
                        {"ok": False, "error": "permission denied: root or the admin group "
                         "only"}))
                    log.warning("admin request refused: peer is not root or in the admin group")
                    return
                request = admin.parse_request(line)
                if request.cmd == admin.Command.STATUS:
                    response = self.status()
                elif request.cmd == admin.Command.RELOAD:
                    response = self.reload()
                else:
                    self.stopping = True
                    response = {"ok": True, "stopping": True}
                conn.sendall(admin.encode_response(response))
            except (admin.AdminError, OSError) as exc:
                with contextlib.suppress(OSError):
                    conn.sendall(admin.encode_response({"ok": False, "error": str(exc)}))

    # --- loop --------------------------------------------------------------------------------

    def run(self) -> None:
        while not self.stopping:
            timeout = -1.0
            if self.restart_at:
                timeout = max(0.0, min(self.restart_at.values()) - time.monotonic())
            for fd, _mask in self.selector.poll(timeout):
                if fd == self._wakeup[0].fileno():
                    with contextlib.suppress(BlockingIOError):
                        self._wakeup[0].recv(64)
                elif self.admin_listener is not None and fd == self.admin_listener.fileno():
                    self.serve_admin()
                else:
                    for backend in list(self.backends.values()):
                        if backend.pidfd == fd:
                            self.backend_exited(backend)
            now = time.monotonic()
            for group, when in list(self.restart_at.items()):
                if when <= now:
                    del self.restart_at[group]
                    if group in self.policy.groups:
                        self.spawn(group)
            if self.reload_requested:
                self.reload_requested = False
                self.reload()

    def _install_signals(self) -> None:
        reader, writer = self._wakeup
        reader.setblocking(False)
        writer.setblocking(False)
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self.selector.register(reader.fileno(), select.EPOLLIN)

        def on_stop(signum: int, _frame: object) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            self.stopping = True

        def on_reload(_signum: int, _frame: object) -> None:
            self.reload_requested = True

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_reload)

    def _write_pidfile(self, name: str, pid: int) -> None:
        path = os.path.join(self.policy.broker.run_dir, f"{name}.pid")
        with open(path + ".tmp", "w") as f:
            f.write(f"{pid}\n")
        os.replace(path + ".tmp", path)

    def _remove_pidfile(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.policy.broker.run_dir, f"{name}.pid"))


def backend_status(backend: Backend) -> dict[str, Any]:
    """The backend's STATUS_REPLY: {"devices": [disk, ...], "nics": [nic, ...]}."""
    backend.request(Kind.STATUS, {})
    return backend.receive(Kind.STATUS_REPLY, REPLY_TIMEOUT_S)


def run_broker(policy_path: str) -> int:
    try:
        broker = Broker(policy_path, load_policy(policy_path))
    except (PolicyError, BrokerError) as exc:
        log.error("%s", exc)
        return 1
    try:
        broker.start()
        broker.run()
    except BrokerError as exc:
        log.error("%s", exc)
        return 1
    finally:
        broker.stop()
    return 0
