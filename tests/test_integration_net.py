"""vhost-user-net end to end without a guest: `ringfence dev --net` on a real tap in a network
namespace the test creates, driven by the test front-end (tests/frontend.py's NetFrontend).

The namespace holds the tap's host side at 10.99.0.1 and knows the "guest" at 10.99.0.2 by a
static neighbour entry; frames the front-end transmits reach the namespace's kernel (ARP,
UDP sockets bound there) and what that kernel sends comes back through RX. Nothing outside
the namespace ever sees a frame.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.devproc import DevBackend, wait_until
from tests.frontend import (
    NET_F_CSUM,
    NET_F_GUEST_CSUM,
    NET_F_MQ,
    NET_F_MRG_RXBUF,
    NET_HDR,
    NetFrontend,
    ProtocolFeature,
)
from tests.netns import netns, ns_ip, udp_socket

GUEST_MAC = bytes.fromhex("525400123456")
GUEST_IP = "10.99.0.2"
PEER_IP = "10.99.0.1"
BROADCAST = b"\xff" * 6
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
NO_HDR = bytes(NET_HDR.size)


# --- frames ---------------------------------------------------------------------------------


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def ipv4(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(dst))
    return head[:10] + struct.pack("!H", checksum(head)) + head[12:] + payload


def udp_frame(dst_mac: bytes, payload: bytes, sport: int, dport: int, *,
              partial_csum: bool = False, src: str = GUEST_IP, dst: str = PEER_IP) -> bytes:
    length = 8 + len(payload)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 17, length)
    if partial_csum:  # what a driver with checksum offload leaves: the pseudo-header sum only
        csum = ~checksum(pseudo) & 0xFFFF
    else:
        csum = checksum(pseudo + struct.pack("!HHHH", sport, dport, length, 0) + payload) or 0xFFFF
    segment = struct.pack("!HHHH", sport, dport, length, csum) + payload
    return eth(dst_mac, GUEST_MAC, ETH_P_IP, ipv4(src, dst, 17, segment))


def arp_request(target_ip: str) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, 1, GUEST_MAC,
                       socket.inet_aton(GUEST_IP), bytes(6), socket.inet_aton(target_ip))
    return eth(BROADCAST, GUEST_MAC, ETH_P_ARP, body)


def udp_payload(frame: bytes) -> tuple[int, bytes] | None:
    """(destination port, payload) of an IPv4 UDP frame to the guest, else None."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    ihl = (frame[14] & 0xF) * 4
    dport, length = struct.unpack_from("!2xHH", frame, 14 + ihl)
    return dport, frame[14 + ihl + 8 : 14 + ihl + length]


# --- the namespace and the backend ----------------------------------------------------------


@dataclass
class NetEnv:
    ns: str
    backend: DevBackend
    sockets: list[str]
    peer_macs: list[bytes]

    def open(self, index: int = 0, **kwargs: object) -> NetFrontend:
        dev = NetFrontend.open(self.sockets[index], **kwargs)  # type: ignore[arg-type]
        return dev


def _setup_tap(ns: str, tap: str, address: str, guest_ip: str) -> bytes:
    ns_ip(ns, "addr", "add", f"{address}/24", "dev", tap)
    ns_ip(ns, "link", "set", tap, "up")
    ns_ip(ns, "neigh", "replace", guest_ip, "lladdr", "52:54:00:12:34:56", "dev", tap)
    info = json.loads(ns_ip(ns, "-j", "link", "show", tap).stdout)[0]
    return bytes.fromhex(info["address"].replace(":", ""))


@pytest.fixture(scope="module")
def net_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetEnv]:
    """One backend in a namespace serving two taps: rft0 (10.99.0.0/24) and rft1
    (10.99.1.0/24), each with the guest's MAC; a second device is the 'other VM'."""
    directory = tmp_path_factory.mktemp("net")
    socks = [str(directory / "nic0.sock"), str(directory / "nic1.sock")]
    with netns() as ns:
        for key in ("all", "default"):  # no IPv6 chatter (RS, MLD, DAD) on the taps
            os.system(f"ip netns exec {ns} sysctl -q -w net.ipv6.conf.{key}.disable_ipv6=1")
        with DevBackend({}, nets={socks[0]: "rft0", socks[1]: "rft1"}, netns=ns) as backend:
            macs = [_setup_tap(ns, "rft0", PEER_IP, GUEST_IP),
                    _setup_tap(ns, "rft1", "10.99.1.1", "10.99.1.2")]
            yield NetEnv(ns, backend, socks, macs)


@pytest.fixture
def env(net_env: NetEnv) -> Iterator[NetEnv]:
    assert net_env.backend.alive(), net_env.backend.log()
    yield net_env
    for sock in net_env.sockets:
        net_env.backend.wait_until_free(sock)
    assert net_env.backend.alive(), net_env.backend.log()


@pytest.fixture
def peer(env: NetEnv) -> Iterator[socket.socket]:
    """A UDP socket in the namespace at 10.99.0.1."""
    sock = udp_socket(env.ns, PEER_IP)
    sock.settimeout(5)
    yield sock
    sock.close()


def receive_udp(dev: NetFrontend, count: int, port: int, *, pair: int = 0) -> list[bytes]:
    """The payloads of the next `count` UDP frames to `port` on queue pair `pair` (other
    frames are skipped)."""
    got: list[bytes] = []
    deadline = time.monotonic() + 10
    while len(got) < count:
        for _hdr, frame in dev.receive(1, timeout=max(deadline - time.monotonic(), 0.01),
                                       pair=pair):
            parsed = udp_payload(frame)
            if parsed is not None and parsed[0] == port:
                got.append(parsed[1])
    return got


# --- tests ----------------------------------------------------------------------------------


def test_features_and_no_config_space_over_vhost_user(env: NetEnv) -> None:
    """QEMU serves virtio-net's config space from its own options (mac=, host_mtu=), so the
    back-end does not offer the CONFIG protocol feature (QEMU warns if it does)."""
    with env.open() as dev:
        assert not dev.protocol_features & (1 << ProtocolFeature.CONFIG)
        assert dev.protocol_features & (1 << ProtocolFeature.REPLY_ACK)
        assert dev.conn.get_queue_num() == 1  # queue pairs
        assert dev.features & (1 << NET_F_MRG_RXBUF)
        assert dev.features & (1 << NET_F_GUEST_CSUM)


def test_guest_arp_request_is_answered_through_the_tap(env: NetEnv) -> None:
    with env.open() as dev:
        dev.post_rx()
        assert dev.wait_tx(dev.send(arp_request(PEER_IP))) == 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for header, frame in dev.receive(1):
                if frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02":
                    assert frame[:6] == GUEST_MAC
                    assert frame[22:28] == env.peer_macs[0]  # sender hardware address
                    assert frame[28:32] == socket.inet_aton(PEER_IP)
                    assert NET_HDR.unpack(header)[6] == 1  # num_buffers
                    return
        pytest.fail("no ARP reply")


def test_udp_from_the_namespace_reaches_the_guest_and_back(env: NetEnv,
                                                           peer: socket.socket) -> None:
    with env.open() as dev:
        dev.post_rx()
        for i in range(20):
            peer.sendto(f"to guest {i}".encode(), (GUEST_IP, 7000))
        assert receive_udp(dev, 20, 7000) == [f"to guest {i}".encode() for i in range(20)]
        port = peer.getsockname()[1]
        for i in range(20):
            dev.send(udp_frame(env.peer_macs[0], f"to peer {i}".encode(), 7000, port))
        assert [peer.recv(100) for _ in range(20)] == [f"to peer {i}".encode()
                                                        for i in range(20)]


def test_checksum_offload_reaches_the_tap(env: NetEnv, peer: socket.socket) -> None:
    """A frame with NEEDS_CSUM and only the pseudo-header sum in place is accepted by the
    namespace's UDP socket: the header went through to the tap as it was."""
    with env.open() as dev:
        assert dev.features & (1 << NET_F_CSUM)
        port = peer.getsockname()[1]
        frame = udp_frame(env.peer_macs[0], b"offloaded checksum", 7000, port,
                          partial_csum=True)
        header = NET_HDR.pack(1, 0, 0, 0, 34, 6, 0)  # NEEDS_CSUM at UDP's checksum field
        dev.send(frame, header)
        assert peer.recv(100) == b"offloaded checksum"


def test_frame_larger_than_a_buffer_spans_mergeable_buffers(env: NetEnv,
                                                             peer: socket.socket) -> None:
    with env.open(rx_buf_size=256) as dev:
        dev.post_rx()
        payload = os.urandom(1400)
        peer.sendto(payload, (GUEST_IP, 7001))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for header, frame in dev.receive(1):
                if udp_payload(frame) == (7001, payload):
                    # 12 + 1442 bytes in 256-byte buffers
                    assert NET_HDR.unpack(header)[6] == 6
                    return
        pytest.fail("the large frame did not arrive")


def test_frame_waits_for_enough_buffers_then_arrives_whole(env: NetEnv,
                                                           peer: socket.socket) -> None:
    with env.open(rx_buf_size=256) as dev:
        dev.post_rx(2)
        payload = os.urandom(1400)
        peer.sendto(payload, (GUEST_IP, 7002))
        time.sleep(0.2)  # (not synchronisation: what must NOT happen gets a chance to)
        assert dev.reap_rx() == []  # two buffers cannot hold it, and none was used
        assert dev.rx.used_idx == 0
        dev.post_rx()
        assert receive_udp(dev, 1, 7002) == [payload]


def test_frames_wait_in_the_tap_until_the_guest_posts_buffers(env: NetEnv,
                                                              peer: socket.socket) -> None:
    with env.open() as dev:
        for i in range(50):
            peer.sendto(f"queued {i}".encode(), (GUEST_IP, 7003))
        time.sleep(0.1)
        dev.post_rx()
        assert receive_udp(dev, 50, 7003) == [f"queued {i}".encode() for i in range(50)]


def test_guest_without_mergeable_buffers_gets_one_buffer_per_frame(
        env: NetEnv, peer: socket.socket) -> None:
    features = None
    with env.open() as probe:
        features = probe.features & ~(1 << NET_F_MRG_RXBUF)
    env.backend.wait_until_free(env.sockets[0])
    with env.open(features=features, rx_buf_size=2048) as dev:
        dev.post_rx()
        peer.sendto(b"x" * 1400, (GUEST_IP, 7004))
        assert receive_udp(dev, 1, 7004) == [b"x" * 1400]


# --- hostile TX chains ----------------------------------------------------------------------


def _post_raw(dev: NetFrontend, chain: list[tuple[int, int, bool]]) -> int:
    head = dev.tx.post(chain)
    dev.tx.kick()
    return head


# shape -> (chain over a buffer at gpa holding header + frame, the reason the backend logs)
HOSTILE = {
    "header only": (lambda gpa, frame: [(gpa, NET_HDR.size, False)],
                    "a header and no frame"),
    "truncated header": (lambda gpa, frame: [(gpa, 7, False)],
                         "shorter than the header"),
    "runt frame": (lambda gpa, frame: [(gpa, NET_HDR.size + 10, False)],
                   "shorter than an Ethernet header"),
    "oversized": (lambda gpa, frame: [(gpa, NET_HDR.size + 65536, False), (gpa, 100, False)],
                  "exceeds 65550"),
    "header in a write-only descriptor": (
        lambda gpa, frame: [(gpa, NET_HDR.size + len(frame), True)], "device-writable"),
    "a writable descriptor after the frame": (
        lambda gpa, frame: [(gpa, NET_HDR.size + len(frame), False), (gpa, 64, True)],
        "device-writable"),
}


@pytest.mark.parametrize("shape", list(HOSTILE))
def test_hostile_tx_chain_is_dropped_and_the_device_goes_on(env: NetEnv, peer: socket.socket,
                                                            shape: str) -> None:
    with env.open() as dev:
        port = peer.getsockname()[1]
        good = udp_frame(env.peer_macs[0], b"after " + shape.encode(), 7000, port)
        gpa = dev.mem.alloc(NET_HDR.size + 65536 + 100, 64)
        dev.mem.write(gpa, NO_HDR + good)
        chain, reason = HOSTILE[shape]
        head = _post_raw(dev, chain(gpa, good))
        assert dev.wait_tx(head) == 0
        dev.send(good)
        assert peer.recv(100) == b"after " + shape.encode()
    # Logged once per reason for the backend's life, then only counted.
    env.backend.wait_for_line("dropped a transmitted frame", reason)
    assert env.backend.alive()


def test_tx_chain_outside_guest_memory_breaks_only_that_device(env: NetEnv,
                                                               peer: socket.socket) -> None:
    mark = env.backend.log_mark()
    other_peer = udp_socket(env.ns, "10.99.1.1")
    other_peer.settimeout(5)
    with env.open(1) as other, env.open(0) as dev:
        other.post_rx()
        dev.tx.write_desc(0, 1 << 40, 64, 0)  # far beyond guest RAM
        dev.tx.write_avail(0, 0)
        dev.tx.set_avail_idx(1)
        dev.tx.kick(force=True)
        env.backend.wait_for_line(env.sockets[0], "vring 1 broken", since=mark)
        assert dev.conn.wait_closed(5)
        # the other device (another VM) is untouched
        other_peer.sendto(b"still here", ("10.99.1.2", 7005))
        assert receive_udp(other, 1, 7005) == [b"still here"]
    other_peer.close()


def test_rx_chain_with_a_readable_descriptor_breaks_the_device(env: NetEnv,
                                                               peer: socket.socket) -> None:
    mark = env.backend.log_mark()
    with env.open() as dev:
        gpa = dev.mem.alloc(4096, 64)
        dev.rx.post([(gpa, 2048, False), (gpa + 2048, 2048, True)])
        dev.rx.kick()
        peer.sendto(b"needs a buffer", (GUEST_IP, 7006))
        env.backend.wait_for_line(env.sockets[0], "vring 0 broken", "device-readable",
                                  since=mark)
        assert dev.conn.wait_closed(5)


# --- multiqueue: queue pair i on tap queue i -------------------------------------------------

MQ_PEER_IP = "10.99.2.1"
MQ_GUEST_IP = "10.99.2.2"


@pytest.fixture(scope="module")
def mq_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetEnv]:
    """One backend serving a two-queue tap rftm0 (a multi-queue tap, one FD per queue pair);
    its host side is 10.99.2.1, the guest 10.99.2.2."""
    directory = tmp_path_factory.mktemp("mq")
    socks = [str(directory / "mq.sock")]
    with netns() as ns:
        for key in ("all", "default"):
            os.system(f"ip netns exec {ns} sysctl -q -w net.ipv6.conf.{key}.disable_ipv6=1")
        with DevBackend({}, nets={socks[0]: "rftm0,queues=2"}, netns=ns) as backend:
            macs = [_setup_tap(ns, "rftm0", MQ_PEER_IP, MQ_GUEST_IP)]
            yield NetEnv(ns, backend, socks, macs)


@pytest.fixture
def mq(mq_env: NetEnv) -> Iterator[NetEnv]:
    assert mq_env.backend.alive(), mq_env.backend.log()
    yield mq_env
    mq_env.backend.wait_until_free(mq_env.sockets[0])
    assert mq_env.backend.alive(), mq_env.backend.log()


def test_multi_queue_nic_offers_mq_and_one_pair_per_tap_queue(mq: NetEnv) -> None:
    with NetFrontend.open(mq.sockets[0], queue_pairs=2) as dev:
        assert dev.conn.get_queue_num() == 2  # queue pairs, as QEMU compares with queues=2
        assert dev.features & (1 << NET_F_MQ)
        assert len(dev.queues) == 4
    info = json.loads(ns_ip(mq.ns, "-j", "-d", "link", "show", "rftm0").stdout)[0]
    assert info["linkinfo"]["info_data"]["multi_queue"] is True


def test_frames_of_queue_pair_1_go_out_and_come_back_on_tap_queue_1(
        mq: NetEnv) -> None:
    """What the guest sends on pair i leaves through tap queue i; the tap steers the replies
    of that flow to the queue it came from (rx follows tx), and they arrive on pair i."""
    peer = udp_socket(mq.ns, MQ_PEER_IP)
    peer.settimeout(5)
    port = peer.getsockname()[1]
    with NetFrontend.open(mq.sockets[0], queue_pairs=2) as dev:
        for pair in (0, 1):
            dev.post_rx(pair=pair)
        for pair, sport in ((1, 7101), (0, 7100), (1, 7103)):
            payload = f"on pair {pair}".encode()
            frame = udp_frame(mq.peer_macs[0], payload, sport, port, src=MQ_GUEST_IP,
                              dst=MQ_PEER_IP)
            assert dev.wait_tx(dev.send(frame, pair=pair), pair=pair) == 0
            got, (_host, reply_port) = peer.recvfrom(100)
            assert got == payload and reply_port == sport
            peer.sendto(f"back to pair {pair}".encode(), (MQ_GUEST_IP, sport))
            assert receive_udp(dev, 1, sport, pair=pair) == [f"back to pair {pair}".encode()]
        assert dev.reap_rx(pair=1 - pair) == []  # nothing strayed onto the other pair
    peer.close()


def test_a_pair_the_driver_disables_has_its_tap_queue_detached_so_no_frame_waits_there(
        mq: NetEnv) -> None:
    """With pair 1 disabled (a guest with fewer vCPUs than pairs), the host's frames of every
    flow reach pair 0; enabled again, its tap queue is back."""
    mark = mq.backend.log_mark()
    peer_socks = [udp_socket(mq.ns, MQ_PEER_IP) for _ in range(16)]  # 16 flows
    with NetFrontend.open(mq.sockets[0], queue_pairs=2, enabled_pairs=1) as dev:
        mq.backend.wait_for_line("queue 1 of tap rftm0 detached", since=mark)
        dev.post_rx()
        dev.post_rx(pair=1)
        for i, sock in enumerate(peer_socks):
            sock.sendto(f"flow {i}".encode(), (MQ_GUEST_IP, 7200))
        got = receive_udp(dev, len(peer_socks), 7200)
        assert sorted(got) == sorted(f"flow {i}".encode() for i in range(len(peer_socks)))
        assert dev.reap_rx(pair=1) == []
        dev.set_pairs(2)
        mq.backend.wait_for_line("queue 1 of tap rftm0 attached", since=mark)
        dev.set_pairs(1)
        wait_until(lambda: mq.backend.log()[mark:].count("queue 1 of tap rftm0 detached") == 2,
                   5, "the queue detached again")
    for sock in peer_socks:
        sock.close()
    # The connection gone, the queue is attached again for whoever connects next.
    wait_until(lambda: mq.backend.log()[mark:].count("queue 1 of tap rftm0 attached") == 2, 5,
               "the queue attached after the front-end left")


# --- figures --------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_throughput_and_backend_cpu_per_frame(env: NetEnv, peer: socket.socket) -> None:
    """Not a timed test: it checks every frame arrives and prints frames/s and the backend's
    CPU time per frame in each direction (pytest -s shows them)."""
    batch, rounds = 128, 40
    total = batch * rounds
    with env.open(queue_size=256) as dev:
        dev.post_rx()
        port = peer.getsockname()[1]
        cpu0, t0 = _cpu_seconds(env.backend.pid), time.perf_counter()
        for r in range(rounds):
            for i in range(batch):
                peer.sendto(struct.pack("!II", r, i) + bytes(56), (GUEST_IP, 7010))
            got = receive_udp(dev, batch, 7010)
            assert [struct.unpack_from("!II", g) for g in got] == [(r, i) for i in range(batch)]
        rx_s, rx_cpu = time.perf_counter() - t0, _cpu_seconds(env.backend.pid) - cpu0
        frame = udp_frame(env.peer_macs[0], bytes(64), 7010, port)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        cpu0, t0 = _cpu_seconds(env.backend.pid), time.perf_counter()
        received = 0
        for _ in range(rounds):
            for _ in range(batch):
                dev.send(frame, kick=False)
            dev.tx.kick()
            for _ in range(batch):
                peer.recv(2048)
                received += 1
            wait_until(lambda: (dev.reap_tx(), dev.tx.in_flight == 0)[1], 5,
                       "TX completions")
        tx_s, tx_cpu = time.perf_counter() - t0, _cpu_seconds(env.backend.pid) - cpu0
        dev.tx_done.clear()
    assert received == total
    print(f"\nvhost-user-net RX: {total / rx_s:,.0f} frames/s, backend "
          f"{rx_cpu / total * 1e6:.1f} us CPU/frame; TX: {total / tx_s:,.0f} frames/s, "
          f"backend {tx_cpu / total * 1e6:.1f} us CPU/frame ({total} 64-byte UDP frames "
          "each way, batches of 128)")


def test_a_tap_deleted_under_a_running_nic_costs_that_nic_only(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    directory = tmp_path_factory.mktemp("gone")
    socks = [str(directory / "a.sock"), str(directory / "b.sock")]
    with netns() as ns, DevBackend({}, nets={socks[0]: "rftg0", socks[1]: "rftg1"},
                                   netns=ns) as backend:
        macs = [_setup_tap(ns, "rftg0", PEER_IP, GUEST_IP),
                _setup_tap(ns, "rftg1", "10.99.1.1", "10.99.1.2")]
        other_peer = udp_socket(ns, "10.99.1.1")
        other_peer.settimeout(5)
        with NetFrontend.open(socks[0]) as dev, NetFrontend.open(socks[1]) as other:
            dev.post_rx()
            other.post_rx()
            ns_ip(ns, "link", "del", "rftg0")
            backend.wait_for_line("tap FD reports an error or hang-up")
            assert dev.wait_tx(dev.send(udp_frame(macs[0], b"into the void", 7000, 9))) == 0
            backend.wait_for_line("dropped a transmitted frame", "tap refused the frame")
            other_peer.sendto(b"unaffected", ("10.99.1.2", 7007))
            assert receive_udp(other, 1, 7007) == [b"unaffected"]
        other_peer.close()
        assert backend.alive()
