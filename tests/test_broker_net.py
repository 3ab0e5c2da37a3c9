"""NICs through the whole privilege split: the broker (in a namespace the test creates) makes
the tap on the policy's bridge, the confined backend serves it, and the test front-end, as the
VM's user, exchanges frames with a peer on that bridge. QEMU's part is the test front-end.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.deploy import Deployment, ensure_user, ringfence
from tests.devproc import wait_until
from tests.frontend import NetFrontend
from tests.netns import netns, ns_ip, udp_socket
from tests.test_broker import as_user
from tests.test_integration_net import GUEST_IP, PEER_IP, receive_udp, udp_frame

BRIDGE = "br-rft"
TAP = "rft-vm1-0"
NIC1 = f'{{ tap = "{TAP}", bridge = "{BRIDGE}", mac = "52:54:00:12:34:56", mtu = 1400 }}'
VM1_NIC = f'group = "tenant-a"\nuser = "rf-vm1"\nnics = [ {NIC1} ]'
VM2 = 'group = "tenant-a"\nuser = "rf-vm2"\ndisks = [ { image = "vm2.raw" } ]'
VM1_MQ = VM1_NIC.replace("mtu = 1400", "mtu = 1400, queues = 2")


@dataclass
class NetDeployment:
    deploy: Deployment
    ns: str

    def link(self, name: str) -> dict | None:
        result = ns_ip(self.ns, "-j", "-d", "link", "show", name, check=False)
        return json.loads(result.stdout)[0] if result.returncode == 0 else None


@pytest.fixture
def net_deployment() -> Iterator[NetDeployment]:
    for user in ("rf-vm1", "rf-vm2"):
        ensure_user(user)
    with netns() as ns, Deployment.temporary() as deploy:
        for key in ("all", "default"):
            os.system(f"ip netns exec {ns} sysctl -q -w net.ipv6.conf.{key}.disable_ipv6=1")
        # A fixed address: a bridge that adopts its first port's would flush the neighbours.
        ns_ip(ns, "link", "add", BRIDGE, "address", "02:99:00:00:00:01", "type", "bridge")
        ns_ip(ns, "addr", "add", f"{PEER_IP}/24", "dev", BRIDGE)
        ns_ip(ns, "link", "set", BRIDGE, "up")
        ns_ip(ns, "neigh", "replace", GUEST_IP, "lladdr", "52:54:00:12:34:56", "dev", BRIDGE)
        deploy.image("vm2.raw")
        deploy.write_policy({"vm1": VM1_NIC, "vm2": VM2})
        yield NetDeployment(deploy, ns)
        deploy.stop_broker()


def exchange(sock_path: str, peer: socket.socket, bridge_mac: bytes, *, pairs: int = 1,
             pair: int = 0) -> tuple[bytes, list[bytes]]:
    """As the VM: one UDP frame to the peer on queue pair `pair`, one from it (the tap steers
    the reply to the queue the flow came from); (what the peer got, what we got)."""
    with NetFrontend.open(sock_path, queue_pairs=pairs) as dev:
        dev.post_rx(pair=pair)
        port = peer.getsockname()[1]
        dev.send(udp_frame(bridge_mac, b"from the guest", 7000, port), pair=pair)
        got = peer.recv(100)
        peer.sendto(b"to the guest", (GUEST_IP, 7000))
        return got, receive_udp(dev, 1, 7000, pair=pair)


def test_broker_creates_the_tap_on_the_bridge_and_the_confined_backend_serves_it(
        net_deployment: NetDeployment) -> None:
    deploy = net_deployment.deploy
    assert "READY=1" in deploy.start_broker(netns=net_deployment.ns)
    tap = net_deployment.link(TAP)
    bridge = net_deployment.link(BRIDGE)
    assert tap is not None and bridge is not None
    assert tap["master"] == BRIDGE and tap["mtu"] == 1400 and "UP" in tap["flags"]
    assert tap["address"] == "fe:54:00:12:34:56"
    assert tap["ifalias"] == "ringfence:vm1:0"
    assert tap["linkinfo"]["info_kind"] == "tun"
    sock = deploy.nic_socket("vm1")
    assert os.stat(sock).st_uid == ensure_user("rf-vm1")[0]

    peer = udp_socket(net_deployment.ns, PEER_IP)
    peer.settimeout(5)
    bridge_mac = bytes.fromhex(bridge["address"].replace(":", ""))
    got, received = as_user("rf-vm1", lambda: exchange(sock, peer, bridge_mac))
    peer.close()
    assert got == b"from the guest" and received == [b"to the guest"]

    # The backend holds the tap (a grant) and nothing it should not; it stayed confined.
    report = json.loads(ringfence("audit", "--policy", str(deploy.policy), "--json").stdout)
    (backend,) = [p for p in report["processes"] if p["role"] == "backend"]
    assert backend["violations"] == []
    assert any("/dev/net/tun" in json.dumps(fd) for fd in backend["fds"])
    assert backend["seccomp"] == 2


def test_a_multi_queue_nic_is_handed_over_as_one_tap_fd_per_queue_pair(
        net_deployment: NetDeployment) -> None:
    deploy = net_deployment.deploy
    deploy.write_policy({"vm1": VM1_MQ, "vm2": VM2})
    assert "READY=1" in deploy.start_broker(netns=net_deployment.ns)
    tap = net_deployment.link(TAP)
    bridge = net_deployment.link(BRIDGE)
    assert tap is not None and bridge is not None
    assert tap["linkinfo"]["info_data"]["multi_queue"] is True and tap["master"] == BRIDGE

    # ADD_NET carried the socket and both queues: the confined backend holds two tap FDs.
    report = json.loads(ringfence("audit", "--policy", str(deploy.policy), "--json").stdout)
    (backend,) = [p for p in report["processes"] if p["role"] == "backend"]
    assert backend["violations"] == [] and backend["seccomp"] == 2
    assert sum("/dev/net/tun" in json.dumps(fd) for fd in backend["fds"]) == 2

    peer = udp_socket(net_deployment.ns, PEER_IP)
    peer.settimeout(5)
    bridge_mac = bytes.fromhex(bridge["address"].replace(":", ""))
    got, received = as_user("rf-vm1", lambda: exchange(deploy.nic_socket("vm1"), peer,
                                                       bridge_mac, pairs=2, pair=1))
    peer.close()
    assert got == b"from the guest" and received == [b"to the guest"]

    (nic,) = deploy.status()["groups"]["tenant-a"]["nics"]
    assert (nic["vm"], nic["nic"], nic["tap"], nic["queues"]) == ("vm1", 0, TAP, 2)
    assert nic["pairs"][1]["tx_frames"] == 1 and nic["pairs"][1]["rx_frames"] >= 1
    assert nic["pairs"][0]["tx_frames"] == 0
    assert nic["tx_frames"] == 1 and nic["tx_bytes"] > 0 and nic["rx_frames"] >= 1
    assert nic["kicks"] >= 1 and nic["drops"] == [] and nic["tx_dropped"] == 0

    text = ringfence("status", "--policy", str(deploy.policy)).stdout
    assert f"nic0   waiting for QEMU  tap {TAP} (2 queue pairs)" in text
    assert "per pair (rx/tx frames): 0: 0/0  1: " in text
    top = ringfence("top", "--policy", str(deploy.policy), "--iterations", "2",
                    "--interval", "0.2")
    assert top.returncode == 0, top.stderr
    rows = [line.split() for line in top.stdout.splitlines() if line.startswith("vm1 ")]
    assert len(rows) == 2 and rows[0][:3] == ["vm1", "tenant-a", "-"]  # no disk
    assert rows[0][5] == "0/1"  # NICS: the front-end is gone


def test_removing_the_vm_deletes_its_tap_and_stopping_leaves_none(
        net_deployment: NetDeployment) -> None:
    deploy = net_deployment.deploy
    deploy.start_broker(netns=net_deployment.ns)
    assert net_deployment.link(TAP) is not None
    deploy.write_policy({"vm2": VM2})
    result = ringfence("reload", "--policy", str(deploy.policy), "--json")
    assert json.loads(result.stdout).get("removed") == ["vm1"], (result.stdout + result.stderr
                                                                 + deploy.log()[-3000:])
    wait_until(lambda: net_deployment.link(TAP) is None, 10, "the tap gone")
    deploy.write_policy({"vm1": VM1_NIC, "vm2": VM2})
    ringfence("reload", "--policy", str(deploy.policy), "--json")
    wait_until(lambda: net_deployment.link(TAP) is not None, 10, "the tap back")
    deploy.stop_broker()
    assert net_deployment.link(TAP) is None


def test_a_tap_name_that_is_a_host_interface_is_refused(
        net_deployment: NetDeployment) -> None:
    deploy = net_deployment.deploy
    ns_ip(net_deployment.ns, "link", "add", TAP, "type", "veth", "peer", "name", "rft-peer")
    result_log = _start_expecting_failure(deploy, net_deployment.ns)
    assert f"tap name {TAP} is already a host interface" in result_log
    assert net_deployment.link(TAP)["linkinfo"]["info_kind"] == "veth"  # left alone


def test_a_missing_bridge_is_refused_and_nothing_is_created(
        net_deployment: NetDeployment) -> None:
    deploy = net_deployment.deploy
    deploy.write_policy({"vm1": VM1_NIC.replace(BRIDGE, "br-nothere")})
    result_log = _start_expecting_failure(deploy, net_deployment.ns)
    assert "bridge br-nothere does not exist" in result_log
    assert net_deployment.link(TAP) is None


def _start_expecting_failure(deploy: Deployment, ns: str) -> str:
    """Start a broker that must refuse its policy: no READY, exit status 1; its log."""
    try:
        notified = deploy.start_broker(netns=ns, timeout=5)  # STOPPING=1 as it gives up
    except AssertionError:
        notified = ""  # nothing notified at all
    assert "READY=1" not in notified
    assert deploy.broker is not None
    assert deploy.broker.wait(timeout=20) == 1
    return deploy.log()
