"""A real guest on a real network through the privilege split: signed policy -> root broker
(in a network namespace the test creates) -> tap on the policy's bridge -> confined backend ->
`ringfence run-qemu` (QEMU in an empty network namespace) -> virtio-net in the guest.

The peer lives on the bridge at 10.99.0.1 inside the test's namespace; the guest is 10.99.0.2.
Nothing outside that namespace can see a frame.
"""

from __future__ import annotations

import hashlib
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy import Deployment, ensure_user, ringfence
from tests.devproc import REPO, wait_until
from tests.e2e.guest import KERNEL_CMDLINE, guest_image, write_initrd
from tests.e2e.network import (
    PEER_IP,
    TO_GUEST_PORT,
    TO_PEER_PORT,
    Peer,
    bridged_namespace,
    console_values,
    exchange_script,
    guest_up,
    nic_entry,
)

TRANSFER_MIB = 64


@dataclass
class NetWorld:
    deploy: Deployment
    ns: str


@pytest.fixture
def world() -> Iterator[NetWorld]:
    ensure_user("rf-vm1")
    ensure_user("rf-vm2")
    with bridged_namespace("rfe") as ns, Deployment.temporary() as deploy:
        yield NetWorld(deploy, ns)
        deploy.stop_broker()


def vm_policy(deploy: Deployment, name: str, index: int, script: str, queues: int = 1) -> str:
    initrd = write_initrd(script, deploy.root / f"initrd-{name}.cpio.gz")
    initrd.chmod(0o644)
    return (f'group = "tenant-a"\nuser = "rf-{name}"\nmemory = "512M"\n'
            f'kernel = "{guest_image().kernel}"\ninitrd = "{initrd}"\n'
            f'append = "{KERNEL_CMDLINE}"\nnics = [ {nic_entry(f"rfe-{name}-0", index, queues)} ]')


def start_qemu(deploy: Deployment, vm: str, *extra: str) -> tuple[subprocess.Popen[str], Path]:
    console = deploy.root / f"console-{vm}.log"
    with open(console, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "backend", "run-qemu", "--policy", str(deploy.policy), vm,
             "--", "-nographic", "-no-reboot", "-accel", "tcg", *extra],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
    return proc, console


def values(console: Path) -> dict[str, str]:
    return console_values(console.read_text(errors="replace"))


@pytest.mark.e2e
def test_guest_pings_the_peer_and_moves_64_mib_each_way_checked_by_sha256(
        world: NetWorld) -> None:
    data = random.Random(5).randbytes(TRANSFER_MIB << 20)
    digest = hashlib.sha256(data).hexdigest()
    script = exchange_script("10.99.0.2")
    deploy = world.deploy
    deploy.write_policy({"vm1": vm_policy(deploy, "vm1", 0, script)})
    peer = Peer(world.ns, data)
    peer.listen()
    deploy.start_broker(netns=world.ns)
    qemu, console = start_qemu(deploy, "vm1")
    try:
        wait_until(lambda: "listening" in values(console) or qemu.poll() is not None, 300,
                   "the guest's network set-up")
        assert values(console).get("ping") == "ok", console.read_text() + deploy.log()
        start = time.monotonic()
        peer.download_to("10.99.0.2")
        downloaded = time.monotonic()
        wait_until(lambda: "sent" in values(console) or qemu.poll() is not None, 600,
                   "the guest's upload")
        peer.wait_upload()
        uploaded = time.monotonic()
        print(f"\nTCG guest over vhost-user-net: peer -> guest "
              f"{TRANSFER_MIB / (downloaded - start):.1f} MiB/s, guest -> peer (incl. the "
              f"guest's sha256) {TRANSFER_MIB / (uploaded - downloaded):.1f} MiB/s")
    finally:
        if qemu.poll() is None:
            qemu.send_signal(signal.SIGTERM)
            qemu.wait(timeout=30)
        peer.close()
    result = values(console)
    assert result.get("rx_bytes") == str(len(data)), console.read_text()
    assert result.get("rx_sha") == digest
    assert not peer.errors and peer.received_bytes == len(data), peer.errors
    assert peer.received.hexdigest() == digest
    status = ringfence("status", "--policy", str(deploy.policy), "--json")
    assert status.returncode == 0, status.stdout + status.stderr


@pytest.mark.e2e
def test_guest_with_two_queue_pairs_uses_both_and_moves_data_checked_by_sha256(
        world: NetWorld) -> None:
    """queues = 2 and a 2-vCPU guest: Linux uses both pairs (one per vCPU, sysfs shows rx-0,
    rx-1, tx-0, tx-1). A ping from each vCPU leaves on that vCPU's TX queue (XPS) and its
    replies come back on the same pair (the tap steers a flow to the queue it came from); the
    backend's per-pair counters show both pairs carried frames both ways, and 16 MiB cross in
    each direction intact."""
    mib = 16
    data = random.Random(6).randbytes(mib << 20)
    digest = hashlib.sha256(data).hexdigest()
    script = guest_up("10.99.0.2") + f"""
echo "RF: cpus=$(nproc)"
echo "RF: queues=$(ls /sys/class/net/eth0/queues | tr '\\n' ' ')"
for cpu in 0 1; do
    taskset $((1 << cpu)) ping -c 3 -W 5 {PEER_IP} > /tmp/ping 2>&1 \
        && echo "RF: ping$cpu=ok" || {{ cat /tmp/ping; echo "RF: ping$cpu=bad"; }}
done
nc -l -p {TO_GUEST_PORT} < /dev/null > /tmp/rx &
echo "RF: listening=yes"
wait
echo "RF: rx_sha=$(sha256sum /tmp/rx | cut -d' ' -f1)"
taskset 2 nc {PEER_IP} {TO_PEER_PORT} < /tmp/rx > /dev/null && echo "RF: sent=yes"
"""
    deploy = world.deploy
    deploy.write_policy({"vm1": vm_policy(deploy, "vm1", 0, script, queues=2)})
    peer = Peer(world.ns, data)
    peer.listen()
    deploy.start_broker(netns=world.ns)
    qemu, console = start_qemu(deploy, "vm1", "-smp", "2")
    try:
        wait_until(lambda: "listening" in values(console) or qemu.poll() is not None, 300,
                   "the guest's network set-up")
        result = values(console)
        assert result.get("cpus") == "2", console.read_text() + deploy.log()
        assert result.get("queues", "").split() == ["rx-0", "rx-1", "tx-0", "tx-1"], result
        assert result.get("ping0") == "ok" and result.get("ping1") == "ok", console.read_text()
        peer.download_to("10.99.0.2")
        wait_until(lambda: "sent" in values(console) or qemu.poll() is not None, 600,
                   "the guest's upload")
        peer.wait_upload()
    finally:
        if qemu.poll() is None:
            qemu.send_signal(signal.SIGTERM)
            qemu.wait(timeout=30)
        peer.close()
    assert values(console).get("rx_sha") == digest, console.read_text()
    assert not peer.errors and peer.received.hexdigest() == digest, peer.errors
    (nic,) = deploy.status()["groups"]["tenant-a"]["nics"]
    assert nic["queues"] == 2 and nic["tx_dropped"] == 0, nic
    for pair in nic["pairs"]:  # each carried frames out and in
        assert pair["tx_frames"] >= 3 and pair["rx_frames"] >= 3, nic
    per_pair = [(p["rx_frames"], p["tx_frames"]) for p in nic["pairs"]]
    print(f"\nqueue pairs (rx, tx frames): {per_pair}")


@pytest.mark.e2e
def test_two_guests_on_the_same_bridge_reach_each_other(world: NetWorld) -> None:
    listen = guest_up("10.99.0.3") + """
nc -l -p 6000 < /dev/null > /tmp/got &
echo "RF: listening=yes"
wait
echo "RF: got=$(cat /tmp/got)"
"""
    talk = guest_up("10.99.0.2") + """
for i in $(seq 1 120); do ping -c 1 -W 1 10.99.0.3 > /dev/null 2>&1 && break; done
ping -c 2 -W 5 10.99.0.3 > /dev/null 2>&1 && echo "RF: ping=ok" || echo "RF: ping=bad"
for i in $(seq 1 60); do
    echo hello-from-vm1 | nc 10.99.0.3 6000 > /dev/null 2>&1 && break
    sleep 1
done
echo "RF: sent=yes"
"""
    deploy = world.deploy
    deploy.write_policy({"vm1": vm_policy(deploy, "vm1", 0, talk),
                         "vm2": vm_policy(deploy, "vm2", 1, listen)})
    deploy.start_broker(netns=world.ns)
    guests = [start_qemu(deploy, vm) for vm in ("vm2", "vm1")]
    try:
        for qemu, console in guests:
            wait_until(lambda q=qemu, c=console: "sent" in values(c) or "got" in values(c)
                       or q.poll() is not None, 300, "both guests done")
    finally:
        for qemu, _console in guests:
            if qemu.poll() is None:
                qemu.send_signal(signal.SIGTERM)
                qemu.wait(timeout=30)
    (_, console2), (_, console1) = guests
    assert values(console1).get("ping") == "ok", console1.read_text() + deploy.log()
    assert values(console2).get("got") == "hello-from-vm1", console2.read_text()
