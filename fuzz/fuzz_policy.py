"""Fuzz the broker's policy parser (broker/policy.py): parse_policy.

The input is a policy file's bytes. parse_policy runs before the signature is checked (and on
`ringfence policy sign`), so its input is whatever is in the file. Invariants:
  * PolicyError is the only exception; its message is one line, no control characters, and
    starts by naming the file ("policy fuzz.toml");
  * no input keeps it busy for a second (the broker parses on every reload);
  * what it accepts obeys the rules it promises: image roots absolute and not "/", a key to
    verify with unless allow_unsigned, each VM in a declared group with 1..64 queues and whole
    MiB of memory, QoS in range, every disk below an image root, every socket path short enough
    for sockaddr_un, an image shared by several disks read-only everywhere, each NIC's tap and
    MAC its own (a lower-case unicast MAC, an MTU from 68 to 65500).

    python -m fuzz policy --seconds 60
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz._harness import instrumented, one_line, require, time_limit

with instrumented(__name__, "broker.policy", "broker.images", "tomllib"):
    from broker.images import split_image_path
    from broker.policy import (
        MAX_QUEUES,
        PRIORITIES,
        SECCOMP_ACTIONS,
        SUN_PATH_MAX,
        MiB,
        PolicyError,
        admin_socket_path,
        disk_socket_path,
        parse_policy,
    )

SOURCE = "fuzz.toml"


def check(data: bytes) -> None:
    with time_limit(1.0):
        _check(data)


def _check(data: bytes) -> None:
    try:
        policy = parse_policy(data, SOURCE)
    except PolicyError as exc:
        message = str(exc)
        one_line(message, "PolicyError")
        require(message.startswith(f"policy {SOURCE}"), f"error does not name the file: "
                f"{message!r}")
        return
    broker = policy.broker
    require(broker.image_roots and "/" not in broker.image_roots, "bad image roots accepted")
    require(all(r.startswith("/") for r in broker.image_roots), "relative image root accepted")
    require(broker.trusted_keys or broker.allow_unsigned, "no key and not allow_unsigned")
    require(broker.seccomp in SECCOMP_ACTIONS, f"seccomp {broker.seccomp!r}")
    require(len(admin_socket_path(broker).encode()) <= SUN_PATH_MAX, "admin socket path too long")
    users = defaultdict(list)
    nic_owners: dict[str, list[str]] = defaultdict(list)
    for name, vm in policy.vms.items():
        require(vm.group in policy.groups, f"vm {name} in undeclared group {vm.group!r}")
        require(1 <= vm.num_queues <= MAX_QUEUES, f"vm {name} has {vm.num_queues} queues")
        require(vm.memory_bytes > 0 and vm.memory_bytes % MiB == 0, f"vm {name} memory")
        require(vm.user not in (0, "root"), f"vm {name} runs QEMU as root")
        qos = vm.qos
        require(1 <= qos.weight <= 1000 and qos.priority in PRIORITIES and 1 <= qos.burst <= 100,
                f"vm {name} QoS out of range: {qos}")
        require(qos.iops_limit is None or qos.iops_limit >= 1, f"vm {name} iops_limit")
        require(qos.bps_limit is None or qos.bps_limit >= 1, f"vm {name} bps_limit")
        for index, disk in enumerate(vm.disks):
            for place in split_image_path(broker.image_roots, disk.image):
                users[place].append(disk.readonly)
            require(len(disk_socket_path(broker, name, index).encode()) <= SUN_PATH_MAX,
                    f"vm {name} disk {index} socket path too long")
        for nic in getattr(vm, "nics", ()):  # virtio-net, where the policy has it
            nic_owners[f"tap {nic.tap}"].append(name)
            nic_owners[f"mac {nic.mac}"].append(name)
            require(nic.mac == nic.mac.lower() and not int(nic.mac[:2], 16) & 1,
                    f"vm {name} MAC {nic.mac} is not lower-case unicast")
            require(68 <= nic.mtu <= 65500, f"vm {name} MTU {nic.mtu}")
    for what, owners in nic_owners.items():
        require(len(owners) == 1, f"{what} used by {owners}")
    for place, readonly in users.items():
        require(len(readonly) == 1 or all(readonly), f"image {place} shared read-write")
    require(broker.backend_user not in (0, "root"), "backends run as root")
    require(parse_policy(data, SOURCE) == policy, "parsing twice gives two policies")


if __name__ == "__main__":
    from fuzz._harness import fuzz

    fuzz(check, "policy")
