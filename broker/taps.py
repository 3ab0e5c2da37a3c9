"""A VM's tap devices: created through /dev/net/tun, configured with pyroute2, handed over as FDs.

The broker creates each tap the policy names in its own network namespace, attaches it to the
bridge the policy names (which must exist: nothing else on the host network is created or
changed), sets its MTU and its host-side MAC, brings it up, and returns the open tap FDs
(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, vnet header of 12 bytes, non-blocking) for the backend:
one, or for a NIC with N queue pairs a multi-queue tap (IFF_MULTI_QUEUE) opened N times, one FD
per tap queue, so that the backend serves queue pair i on tap queue i.

A tap made by TUNSETIFF without TUNSETPERSIST lives only while an FD of it is open: the
broker's copy and the backend's. So a broker or backend that dies leaves no tap behind;
`delete_tap` removes it at once when the VM is removed. Each tap carries the alias
`ringfence:<vm>:<nic>`: an existing interface of the same name is refused unless it is a tap
with our alias (then it is a leftover of ours and is replaced).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import struct

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

TUN_PATH = "/dev/net/tun"
# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
VNET_HDR_SIZE = 12  # virtio_net_hdr_v1, what VIRTIO_F_VERSION_1 drivers use
# Queue pairs of one NIC: one tap queue and FD each (the kernel allows 256 tap queues; the
# broker channel's frames carry at most 1 + MAX_QUEUES FDs).
MAX_QUEUES = 8
IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH22x")

TAP_NAME_RE = re.compile(r"[a-z0-9_-]{1,15}")
BRIDGE_NAME_RE = re.compile(r"[a-zA-Z0-9_.-]{1,15}")
MAC_RE = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")


class TapError(Exception):
    """A tap cannot be created or removed; one sentence naming the tap and the fix."""


def check_tap_name(name: str) -> None:
    if not TAP_NAME_RE.fullmatch(name):
        raise TapError(f"tap name {name!r} is not allowed; use 1 to 15 of a-z, 0-9, '_' and '-'")


def parse_mac(text: str) -> bytes:
    """A unicast, non-zero MAC address written as six colon-separated hex bytes."""
    if not MAC_RE.fullmatch(text):
        raise ValueError(f"MAC address {text!r} is not six hex bytes like 52:54:00:12:34:56")
    mac = bytes(int(part, 16) for part in text.split(":"))
    if mac[0] & 1:
        raise ValueError(f"MAC address {text} is a multicast address; use a unicast one")
    if mac == bytes(6):
        raise ValueError("MAC address 00:00:00:00:00:00 is not usable")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def host_mac(guest: bytes) -> bytes:
    """The tap's own (host-side) address: the guest's with 0xfe first, as libvirt does, so it
    differs from the guest's and is never the lowest on the bridge (which takes the lowest)."""
    return b"\xfe" + guest[1:]


def tap_alias(vm: str, nic: int) -> str:
    return f"ringfence:{vm}:{nic}"


def open_tun(name: str, *, multi_queue: bool = False) -> int:
    """Create (or attach to) tap `name` in this network namespace; the non-blocking FD.

    With `multi_queue` the tap is IFF_MULTI_QUEUE and each call attaches one more queue."""
    fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if multi_queue else 0)
        ifr = _IFREQ.pack(name.encode(), flags)
        got = _IFREQ.unpack(fcntl.ioctl(fd, TUNSETIFF, ifr))[0].rstrip(b"\0").decode()
        if got != name:
            raise TapError(f"tap {name}: the kernel created {got!r} instead")
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
        # No offloads until a guest acks them (the backend sets them from its features).
        fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_tun_queues(name: str, queues: int) -> list[int]:
    """Tap `name` with `queues` queues: one FD (a single-queue tap) or one per queue of an
    IFF_MULTI_QUEUE tap, queue i on FD i. All or none: on failure every FD is closed."""
    if not 1 <= queues <= MAX_QUEUES:
        raise TapError(f"tap {name}: {queues} queues asked; use 1 to {MAX_QUEUES}")
    fds: list[int] = []
    try:
        for _ in range(queues):
            fds.append(open_tun(name, multi_queue=queues > 1))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _link(ipr: IPRoute, name: str) -> tuple[int, str | None, str | None] | None:
    """(index, kind, alias) of interface `name`, or None if there is none."""
    found = ipr.link_lookup(ifname=name)
    if not found:
        return None
    try:
        msg = ipr.link("get", index=found[0])[0]
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None  # gone since the lookup: a tap goes with its last FD
        raise
    info = msg.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    return found[0], kind, msg.get_attr("IFLA_IFALIAS")


def create_tap(name: str, *, vm: str, nic: int, bridge: str, mac: bytes, mtu: int,
               queues: int = 1) -> list[int]:
    """Create, configure and bring up the tap for `vm`'s NIC `nic`; its open FDs, one per
    queue pair."""
    check_tap_name(name)
    alias = tap_alias(vm, nic)
    with IPRoute() as ipr:
        existing = _link(ipr, name)
        if existing is not None:
            index, kind, current = existing
            if kind != "tun" or current != alias:
                raise TapError(f"VM {vm} nic{nic}: tap name {name} is already a host "
                               "interface; choose another name in the policy")
            ipr.link("del", index=index)  # a leftover of ours
        master = _link(ipr, bridge)
        if master is None or master[1] != "bridge":
            raise TapError(f"VM {vm} nic{nic}: bridge {bridge} does not exist or is not a "
                           "bridge; create it (ip link add NAME type bridge) or fix the policy")
        try:
            fds = open_tun_queues(name, queues)
        except OSError as exc:
            raise TapError(f"VM {vm} nic{nic}: cannot create tap {name} with {queues} "
                           f"queue(s): {exc.strerror}") from None
        try:
            index = ipr.link_lookup(ifname=name)[0]
            ipr.link("set", index=index, mtu=mtu, address=format_mac(host_mac(mac)),
                     ifalias=alias, master=master[0])
            ipr.link("set", index=index, state="up")
        except (NetlinkError, IndexError, OSError) as exc:
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(NetlinkError, IndexError):
                ipr.link("del", index=ipr.link_lookup(ifname=name)[0])
            raise TapError(f"VM {vm} nic{nic}: cannot configure tap {name}: {exc}") from None
    return fds


def delete_tap(name: str, *, vm: str, nic: int) -> None:
    """Remove the tap if it is still ours (an FD the backend holds then reads EBADFD).
    Netlink failures are raised as OSError."""
    try:
        with IPRoute() as ipr:
            existing = _link(ipr, name)
            if existing is not None and existing[1] == "tun" and existing[2] == tap_alias(vm,
                                                                                          nic):
                with contextlib.suppress(NetlinkError):
                    ipr.link("del", index=existing[0])
    except NetlinkError as exc:
        raise OSError(exc.code, f"netlink: {exc}") from None
