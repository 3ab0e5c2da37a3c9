"""A private network for real guests: a namespace with a bridge, and a peer on it.

The broker runs in the namespace, so the taps it creates join the bridge there; the peer's
sockets live there too. Nothing outside the namespace can see a frame. Used by the e2e network
tests and by the quick-start demo.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from tests.e2e.guest import GuestResult
from tests.netns import inside, netns, ns_ip

BRIDGE = "br-rfe"
PEER_IP = "10.99.0.1"
TO_PEER_PORT = 5001
TO_GUEST_PORT = 5002


@contextlib.contextmanager
def bridged_namespace(prefix: str = "rfe") -> Iterator[str]:
    """A new network namespace holding BRIDGE, with the peer's address PEER_IP on it."""
    with netns(prefix) as ns:
        for key in ("all", "default"):
            os.system(f"ip netns exec {ns} sysctl -q -w net.ipv6.conf.{key}.disable_ipv6=1")
        # A fixed address: a bridge adopting its first port's would flush its neighbours.
        ns_ip(ns, "link", "add", BRIDGE, "address", "02:99:00:00:00:01", "type", "bridge")
        ns_ip(ns, "addr", "add", f"{PEER_IP}/24", "dev", BRIDGE)
        ns_ip(ns, "link", "set", BRIDGE, "up")
        yield ns


def nic_entry(tap: str, index: int, queues: int = 1) -> str:
    """A policy NIC on BRIDGE with a MAC derived from `index`."""
    return (f'{{ tap = "{tap}", bridge = "{BRIDGE}", '
            f'mac = "52:54:00:12:34:{0x56 + index:02x}", queues = {queues} }}')


def guest_up(address: str) -> str:
    """Guest shell lines bringing eth0 up at `address`/24."""
    return (f"ip link set eth0 up\nip addr add {address}/24 dev eth0\n"
            "ip link set lo up\n")


def exchange_script(guest_ip: str) -> str:
    """Guest shell lines: ping the peer, take a download, report its size and hash, and send
    it back (reported as RF: ping, listening, rx_bytes, rx_sha, sent)."""
    return guest_up(guest_ip) + f"""
ping -c 3 -W 5 {PEER_IP} > /tmp/ping 2>&1 && echo "RF: ping=ok" \
    || {{ cat /tmp/ping; echo "RF: ping=bad"; }}
nc -l -p {TO_GUEST_PORT} < /dev/null > /tmp/rx &
echo "RF: listening=yes"
wait
echo "RF: rx_bytes=$(wc -c < /tmp/rx)"
echo "RF: rx_sha=$(sha256sum /tmp/rx | cut -d' ' -f1)"
nc {PEER_IP} {TO_PEER_PORT} < /tmp/rx > /dev/null && echo "RF: sent=yes"
"""


def console_values(text: str) -> dict[str, str]:
    """The `RF: key=value` lines a guest printed on its console."""
    return GuestResult(text.replace("\r\n", "\n"), None, 0, "", False, 0.0).values()


@dataclass
class Peer:
    """The peer's side of the transfers, in namespace `ns`: `data` goes to the guest, and
    whatever the guest uploads is hashed."""

    ns: str
    data: bytes
    received: hashlib._Hash = field(default_factory=hashlib.sha256)
    received_bytes: int = 0
    errors: list[str] = field(default_factory=list)
    _listener: socket.socket | None = None
    _upload: threading.Thread | None = None

    def listen(self, timeout: float = 600) -> None:
        """Take the guest's upload to PEER_IP:TO_PEER_PORT in a thread, from now on."""
        with inside(self.ns):
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((PEER_IP, TO_PEER_PORT))
        listener.listen(1)
        listener.settimeout(timeout)
        self._listener = listener
        self._upload = threading.Thread(target=self._serve_upload, daemon=True)
        self._upload.start()

    def _serve_upload(self) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
            with conn:
                while chunk := conn.recv(1 << 20):
                    self.received.update(chunk)
                    self.received_bytes += len(chunk)
        except OSError as exc:
            self.errors.append(f"upload: {exc}")

    def download_to(self, guest_ip: str) -> None:
        """Send `data` to the guest's listener (TO_GUEST_PORT), retrying until it listens
        (the guest reports before its background nc has bound)."""
        deadline = time.monotonic() + 60
        while True:
            with inside(self.ns):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(240)
            try:
                sock.connect((guest_ip, TO_GUEST_PORT))
                break
            except ConnectionRefusedError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # a retry interval, not synchronisation
        with sock:
            sock.sendall(self.data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):
                pass

    def wait_upload(self, timeout: float = 60) -> None:
        if self._upload is not None:
            self._upload.join(timeout)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
