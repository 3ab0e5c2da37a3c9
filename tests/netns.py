"""Network namespaces for tests: real taps, bridges and peers where no host address can see them.

Everything a test creates lives in a namespace it made (`ip netns add`) and goes with it; the
host's own interfaces are never touched. Addresses are in 10.99.0.0/24.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import subprocess
from collections.abc import Iterator

from pyroute2 import netns as pyroute2_netns

_counter = itertools.count()


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def ns_ip(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return ip("-n", ns, *args, check=check)


@contextlib.contextmanager
def netns(prefix: str = "rft") -> Iterator[str]:
    """A new, empty network namespace (lo up) for the duration of the block."""
    name = f"{prefix}-{os.getpid()}-{next(_counter)}"
    ip("netns", "add", name)
    try:
        ns_ip(name, "link", "set", "lo", "up")
        yield name
    finally:
        ip("netns", "del", name, check=False)


@contextlib.contextmanager
def inside(ns: str) -> Iterator[None]:
    """Run the block's socket and tap creation in namespace `ns` (this thread only)."""
    pyroute2_netns.pushns(ns)
    try:
        yield
    finally:
        pyroute2_netns.popns()


def udp_socket(ns: str, address: str, port: int = 0) -> socket.socket:
    """A UDP socket bound in namespace `ns` (it stays there after the block)."""
    with inside(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, port))
    return sock
