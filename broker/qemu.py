"""QEMU with no disk and no network: its only device channel is the VM's vhost-user sockets.

`qemu_device_args` (pure) turns a VM of the policy into QEMU's memory and device arguments;
`ringfence qemu-args VM` prints them for libvirt users and hand-written command lines.
`run_qemu` (root) starts QEMU itself, confined: in an empty network namespace (only `lo`), in a
mount namespace whose root shows only /usr (QEMU, its libraries and firmware), the VM's kernel
and initrd, a few /dev nodes and the VM's socket directory, as the VM's uid with no
supplementary group but /dev/kvm's, no capabilities even in the bounding set, with
no_new_privs, under QEMU's own seccomp sandbox.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import prctl

from broker.audit import live_pid
from broker.policy import (
    BrokerSettings,
    MiB,
    Policy,
    PolicyError,
    Vm,
    disk_socket_path,
    load_policy,
    nic_socket_path,
    vm_socket_dir,
)
from broker.service import BrokerError, resolve_user
from sandbox.namespaces import (
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWUTS,
    Bind,
    enter_new_root,
    unshare,
)

DEFAULT_POLICY = "/etc/ringfence/policy.toml"
QEMU = "qemu-system-x86_64"
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# QEMU, its shared libraries, modules and firmware all live below /usr on Debian 12, where
# /lib and /lib64 are symlinks into it; elsewhere they are directories and get bound.
SYSTEM_PATHS = ("/usr", "/lib", "/lib64")
KVM = "/dev/kvm"
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", KVM)  # each bound if present
ENVIRONMENT = {"PATH": "/usr/bin:/bin"}  # nothing of the caller's environment reaches QEMU
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
EXIT_CONFINE_FAILED = 127
# QEMU 7.2 (Debian 12) crashes (SIGSEGV in msix_set_vector_notifiers, from vhost_net_start)
# as soon as a vhost-user NIC with MSI-X vectors is started, by the guest driver or even by
# iPXE's option ROM, whatever the features and however many queue pairs (re-checked under TCG
# with mq=on and queues=2: QEMU dies within seconds of boot; KVM could not be tried here). With
# INTx (vectors=0) it runs. So it stays, for multi-queue NICs too: their queues then share one
# interrupt line, which costs spreading interrupts over vCPUs, not correctness (a 2-vCPU guest
# still shows and uses rx-0/rx-1/tx-0/tx-1). Revisit with a newer QEMU: MSI-X matters under KVM.
NIC_INTERRUPTS = "vectors=0"


class QemuError(Exception):
    """QEMU cannot be started for a VM; one sentence naming the VM and the fix."""


def find_vm(policy: Policy, vm_name: str) -> Vm:
    vm = policy.vms.get(vm_name)
    if vm is None:
        known = ", ".join(sorted(policy.vms)) or "none"
        raise QemuError(f"the policy has no VM named {vm_name!r} (known: {known})")
    return vm


def _option_value(value: str) -> str:
    # A comma ends a QEMU option value unless it is doubled.
    return value.replace(",", ",,")


def qemu_device_args(policy: Policy, vm_name: str) -> list[str]:
    """The guest RAM, vhost-user disk and NIC arguments for `vm_name`, and no other network."""
    vm = find_vm(policy, vm_name)
    # The backend can only map guest RAM that QEMU shares with it as a file descriptor.
    args = ["-object", f"memory-backend-memfd,id=mem,size={vm.memory_bytes},share=on",
            "-numa", "node,memdev=mem", "-m", f"{vm.memory_bytes // MiB}M"]
    for index in range(len(vm.disks)):
        path = _option_value(disk_socket_path(policy.broker, vm.name, index))
        # reconnect: QEMU redials a restarted backend instead of losing the disk.
        args += ["-chardev", f"socket,id=disk{index},path={path},reconnect=1",
                 "-device", f"vhost-user-blk-pci,chardev=disk{index},num-queues={vm.num_queues}"]
    for index, nic in enumerate(vm.nics):
        path = _option_value(nic_socket_path(policy.broker, vm.name, index))
        # Several queue pairs: the back-end's pairs (queues=N, checked against its
        # GET_QUEUE_NUM) and VIRTIO_NET_F_MQ offered to the guest (mq=on), whose control queue
        # QEMU serves itself.
        queues, mq = (f",queues={nic.queues}", ",mq=on") if nic.queues > 1 else ("", "")
        args += ["-chardev", f"socket,id=nic{index},path={path},reconnect=1",
                 "-netdev", f"vhost-user,id=net{index},chardev=nic{index}{queues}",
                 "-device", f"virtio-net-pci,netdev=net{index},mac={nic.mac},"
                 f"host_mtu={nic.mtu}{mq},{NIC_INTERRUPTS}"]
    # No default NIC: the guest's only network is the vhost-user NICs above.
    return [*args, "-nic", "none"]


def qemu_argv(policy: Policy, vm_name: str, qemu_path: str, extra_args: Sequence[str]) -> list[str]:
    """QEMU's whole command line as `run_qemu` executes it."""
    vm = find_vm(policy, vm_name)
    argv = [qemu_path, *qemu_device_args(policy, vm_name)]
    for option, value in (("-kernel", vm.kernel), ("-initrd", vm.initrd), ("-append", vm.append)):
        if value is not None:
            argv += [option, value]
    return [*argv, "-sandbox", SANDBOX, *extra_args]


def jail_binds(settings: BrokerSettings, vm: Vm) -> tuple[list[Bind], dict[str, str]]:
    """What QEMU's root shows: binds, and symlinks (path -> target) copied from the host."""
    binds, symlinks = [], {}
    for path in SYSTEM_PATHS:
        if os.path.islink(path):
            symlinks[path] = os.readlink(path)
        elif os.path.isdir(path):
            binds.append(Bind(path, executable=True))
    binds += [Bind(path, devices=True) for path in DEVICES if os.path.exists(path)]
    binds += [Bind(path) for path in (vm.kernel, vm.initrd) if path is not None]
    if vm.disks or vm.nics:
        # Read-only is enough: connect() needs write access to the socket, not to the mount.
        binds.append(Bind(vm_socket_dir(settings, vm.name)))
    return binds, symlinks


def kvm_groups(kvm: str = KVM) -> list[int]:
    """QEMU's only supplementary group: the one /dev/kvm is shared with (kvm on Debian, mode
    0660), so that the guest can be accelerated; none if /dev/kvm is absent or root's."""
    try:
        st = os.stat(kvm)
    except FileNotFoundError:
        return []
    return [st.st_gid] if st.st_gid != 0 and st.st_mode & 0o060 == 0o060 else []


def qemu_pidfile(settings: BrokerSettings, vm_name: str) -> str:
    return os.path.join(settings.run_dir, f"qemu-{vm_name}.pid")


def run_qemu(policy: Policy, vm_name: str, extra_args: Sequence[str], qemu: str = QEMU) -> int:
    """Run QEMU for `vm_name`, confined, until it exits; returns its exit status (128+N for
    signal N). Needs root. Raises QemuError before starting anything if it cannot."""
    vm = find_vm(policy, vm_name)
    try:
        uid, gid = resolve_user(vm.user, f"VM {vm_name}'s")
    except BrokerError as exc:
        raise QemuError(str(exc)) from None
    if uid == 0:
        raise QemuError(f"VM {vm_name} would run QEMU as root; give it its own user")
    qemu_path = shutil.which(qemu)
    if qemu_path is None or not os.path.realpath(qemu_path).startswith("/usr/"):
        raise QemuError(f"{qemu} is not installed below /usr, the only system tree QEMU sees; "
                        "install the qemu-system-x86 package")
    binds, symlinks = jail_binds(policy.broker, vm)
    for bind in binds:
        if not os.path.exists(bind.path):
            raise QemuError(f"VM {vm_name} needs {bind.path}, which does not exist; "
                            + ("start the broker first" if bind.path.startswith(
                                policy.broker.run_dir + "/") else "fix the policy"))
    pidfile = qemu_pidfile(policy.broker, vm_name)
    running = live_pid(pidfile)
    if running is not None:
        raise QemuError(f"VM {vm_name} already runs in QEMU pid {running}; stop it first")
    argv = qemu_argv(policy, vm_name, qemu_path, extra_args)

    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())  # /proc is not in the jail
    pid = os.fork()
    if pid == 0:
        _exec_confined(vm_name, binds, symlinks, uid, gid, kvm_groups(), last_cap, argv)
    try:
        with open(pidfile + ".tmp", "w") as f:
            f.write(f"{pid}\n")
        os.replace(pidfile + ".tmp", pidfile)
    except OSError as exc:
        os.kill(pid, signal.SIGKILL)  # a QEMU that audit cannot find must not run
        os.waitpid(pid, 0)
        raise QemuError(f"cannot write {pidfile}: {exc.strerror}; check the run directory") \
            from None
    # QEMU gets our termination signals (e.g. systemctl stop of a wrapping unit), so that it
    # shuts the guest down itself and we still remove the pidfile after it.
    previous = {sig: signal.signal(sig, lambda signum, _: os.kill(pid, signum))
                for sig in FORWARDED_SIGNALS}
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        with contextlib.suppress(FileNotFoundError):  # e.g. the run directory was cleaned
            os.unlink(pidfile)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _exec_confined(vm_name: str, binds: list[Bind], symlinks: dict[str, str], uid: int,
                   gid: int, groups: list[int], last_cap: int, argv: list[str]) -> NoReturn:
    """In the forked child: confine, then become QEMU. Never returns, not even by raising."""
    try:
        unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
        enter_new_root(binds, symlinks)
        for cap in range(last_cap + 1):  # while still root: dropping needs CAP_SETPCAP
            prctl.capbset_drop(cap)
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # all three ids: the capabilities go with root
        prctl.set_no_new_privs(1)
        os.closerange(3, 2**31 - 1)  # whatever our caller left open is not QEMU's business
        os.execve(argv[0], argv, ENVIRONMENT)
    except BaseException as exc:  # the child must never return into our caller's code
        os.write(2, f"ringfence: cannot start QEMU for VM {vm_name} confined: {exc}\n".encode())
    os._exit(EXIT_CONFINE_FAILED)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser("run-qemu", help="run a VM's QEMU with no disk and no network "
                                "access, as the VM's user (root only)")
    run.add_argument("--policy", default=DEFAULT_POLICY, help="(default %(default)s)")
    run.add_argument("--qemu", default=QEMU, help="QEMU binary, below /usr (default %(default)s)")
    run.add_argument("vm", help="VM name in the policy")
    run.add_argument("extra", nargs=argparse.REMAINDER, metavar="-- QEMU-ARGS",
                     help="more QEMU arguments, e.g. -- -nographic -accel kvm")
    run.set_defaults(func=_cmd_run_qemu)
    show = subparsers.add_parser("qemu-args", help="print a VM's vhost-user device arguments "
                                 "for QEMU or libvirt")
    show.add_argument("--policy", default=DEFAULT_POLICY, help="(default %(default)s)")
    show.add_argument("vm", help="VM name in the policy")
    show.set_defaults(func=_cmd_qemu_args)


def _cmd_run_qemu(args: argparse.Namespace) -> int:
    try:
        return run_qemu(load_policy(args.policy), args.vm, args.extra, args.qemu)
    except (PolicyError, QemuError) as exc:
        print(f"ringfence: {exc}", file=sys.stderr)
        return 1


def _cmd_qemu_args(args: argparse.Namespace) -> int:
    try:
        print(shlex.join(qemu_device_args(load_policy(args.policy), args.vm)))
    except (PolicyError, QemuError) as exc:
        print(f"ringfence: {exc}", file=sys.stderr)
        return 1
    return 0
