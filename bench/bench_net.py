"""virtio-net: ringfence's vhost-user-net against QEMU's own tap back-ends.

Prints figures; never a test. Two parts, one run:

1. Guest TCP throughput. For each system a TCG guest (the e2e busybox guest of
   tests/e2e/guest.py) at 10.99.0.2 sits on a bridge in a network namespace this script
   creates, with the peer at 10.99.0.1 on the bridge. The peer (Python sockets, in the
   namespace) sends --mib MiB to the guest's `nc -l > /dev/null`, then the guest sends
   --mib MiB from a tmpfs file with `nc` to the peer. Both directions are timed on the peer:
   connect -> the guest closing (peer -> guest), accept -> EOF (guest -> peer). --repeat
   rounds of both run in one boot; the median of each direction is reported.
   Systems:
     ringfence  `ringfence dev --net SOCK=TAP` in the namespace; QEMU uses -chardev socket +
                -netdev vhost-user + -device virtio-net-pci (as broker/qemu.py builds them)
     tap        QEMU's built-in -netdev tap,vhost=off (the baseline of the ratios)
     vhost-net  -netdev tap,vhost=on (kernel vhost-net), if /dev/vhost-net exists
   Every system gets the same virtio-net-pci options, including broker/qemu.py's
   NIC_INTERRUPTS (vectors=0, the vhost-user workaround), so only the back-end differs.
   These are TCG-bound numbers: the guest's emulated CPU is the bottleneck.

2. Back-end CPU per frame without a guest: tests/frontend.py's NetFrontend drives
   `ringfence dev --net` on a tap in a second namespace (as tests/test_integration_net.py
   does), pushing 64- and 1514-byte Ethernet frames (UDP) each way in batches of 128 for
   --seconds per case. Reports frames/s (bounded by the Python front-end) and the backend's
   CPU microseconds per frame (utime+stime delta of its /proc/PID/stat).

    python bench/bench_net.py [--mib 64] [--repeat 3] [--seconds 2]
                              [--systems ringfence,tap,vhost-net] [--skip-guest] [--skip-frontend]

Needs root (network namespaces, taps). Only addresses inside the namespaces this script
creates ever receive traffic; the namespaces (and with them every tap and bridge) are
deleted at the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # so `python bench/bench_net.py` finds the tests package

from broker.qemu import NIC_INTERRUPTS  # noqa: E402
from tests.devproc import DevBackend, wait_until  # noqa: E402
from tests.e2e.guest import KERNEL_CMDLINE, QEMU, guest_image, write_initrd  # noqa: E402
from tests.frontend import NetFrontend  # noqa: E402
from tests.netns import inside, netns, ns_ip  # noqa: E402
from tests.test_integration_net import (  # noqa: E402
    GUEST_IP,
    PEER_IP,
    _setup_tap,
    udp_frame,
    udp_payload,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")
BRIDGE = "br-rfb"
BRIDGE_MAC = "02:99:00:00:00:01"  # fixed: a bridge adopting a port's MAC flushes neighbours
TO_PEER_PORT = 5001
TO_GUEST_PORT = 5002
GUEST_MEM_MB = 512
BOOT_TIMEOUT_S = 240.0
TRANSFER_TIMEOUT_S = 300.0
BATCH = 128
ETH_IP_UDP = 14 + 20 + 8
FRAME_SIZES = (64, 1514)  # Ethernet frame bytes without FCS: minimum-ish and MTU 1500


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads) from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# ------------------------------------------------------------------------ guest throughput


@dataclass
class GuestFigures:
    to_guest: list[float] = field(default_factory=list)  # MiB/s of each round
    to_peer: list[float] = field(default_factory=list)
    backend_cpu: dict[str, float] = field(default_factory=dict)  # direction -> CPU s
    skipped: str | None = None


def guest_script(mib: int, repeat: int) -> str:
    return f"""
ip link set eth0 up
ip addr add {GUEST_IP}/24 dev eth0
ip link set lo up
dd if=/dev/zero of=/tmp/tx bs=1M count={mib} 2>/dev/null
ping -c 3 -W 5 {PEER_IP} > /tmp/ping 2>&1 && echo "RF: ping=ok" \\
    || {{ cat /tmp/ping; echo "RF: ping=bad"; }}
for i in $(seq 1 {repeat}); do
    nc -l -p {TO_GUEST_PORT} < /dev/null > /dev/null &
    echo "RF: listening$i=yes"
    wait
    nc {PEER_IP} {TO_PEER_PORT} < /tmp/tx > /dev/null && echo "RF: sent$i=yes"
done
"""


def console_values(console: Path) -> dict[str, str]:
    found = {}
    for line in console.read_text(errors="replace").replace("\r\n", "\n").splitlines():
        if line.startswith("RF: ") and "=" in line:
            key, _, value = line[4:].partition("=")
            found[key.strip()] = value.strip()
    return found


class Upload:
    """The peer's listener for the guest's uploads: `repeat` times accept, then read to EOF,
    timed; `rounds` holds (bytes, seconds) of each finished upload."""

    def __init__(self, ns: str, repeat: int) -> None:
        with inside(ns):
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((PEER_IP, TO_PEER_PORT))
        self.listener.listen(1)
        self.listener.settimeout(BOOT_TIMEOUT_S + TRANSFER_TIMEOUT_S)
        self.repeat = repeat
        self.rounds: list[tuple[int, float]] = []
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for _ in range(self.repeat):
                conn, _ = self.listener.accept()
                started, received = time.perf_counter(), 0
                with conn:
                    conn.settimeout(TRANSFER_TIMEOUT_S)
                    while chunk := conn.recv(1 << 20):
                        received += len(chunk)
                self.rounds.append((received, time.perf_counter() - started))
        except OSError as exc:
            self.error = str(exc)

    def close(self) -> None:
        self.listener.close()


def download(ns: str, data: bytes) -> float:
    """Send `data` to the guest's listener and wait for it to close; seconds taken."""
    deadline = time.monotonic() + 60
    while True:
        with inside(ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(TRANSFER_TIMEOUT_S)
        try:
            start = time.perf_counter()
            sock.connect((GUEST_IP, TO_GUEST_PORT))
            break
        except ConnectionRefusedError:  # the guest said "listening" before nc bound
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(1 << 16):
            pass
    return time.perf_counter() - start


def qemu_argv(initrd: Path, net_args: list[str], mac: str) -> list[str]:
    image = guest_image()
    return [
        QEMU, "-accel", "tcg", "-m", str(GUEST_MEM_MB), "-nographic", "-no-reboot",
        "-nic", "none", "-kernel", str(image.kernel), "-initrd", str(initrd),
        "-append", KERNEL_CMDLINE,
        # vhost-user needs guest RAM shared as an fd; the tap systems get the same RAM.
        "-object", f"memory-backend-memfd,id=mem,size={GUEST_MEM_MB}M,share=on",
        "-numa", "node,memdev=mem",
        *net_args,
        "-device", f"virtio-net-pci,netdev=net0,mac={mac},host_mtu=1500,{NIC_INTERRUPTS}",
    ]  # fmt: skip


def run_guest(system: str, index: int, ns: str, work: Path, mib: int, repeat: int,
              data: bytes) -> GuestFigures:
    tap = f"rfb{index}"
    mac = f"52:54:00:12:34:{0x60 + index:02x}"
    backend: DevBackend | None = None
    qemu: subprocess.Popen[bytes] | None = None
    upload: Upload | None = None
    figures = GuestFigures()
    try:
        # The tap is made here, in the namespace set-up, for every system.
        ns_ip(ns, "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr")
        ns_ip(ns, "link", "set", tap, "master", BRIDGE, "up")
        ns_ip(ns, "neigh", "flush", "dev", BRIDGE, check=False)
        if system == "ringfence":
            sock = str(work / f"{tap}.sock")
            backend = DevBackend({}, nets={sock: f"{tap},mac={mac}"}, netns=ns)
            net_args = ["-chardev", f"socket,id=nic0,path={sock}",
                        "-netdev", "vhost-user,id=net0,chardev=nic0"]
        else:
            vhost = "on" if system == "vhost-net" else "off"
            net_args = ["-netdev", f"tap,id=net0,ifname={tap},script=no,downscript=no,"
                        f"vhost={vhost}"]
        initrd = write_initrd(guest_script(mib, repeat), work / f"initrd-{system}.cpio.gz")
        upload = Upload(ns, repeat)
        console = work / f"console-{system}.log"
        with open(console, "wb") as out:
            # In the namespace: QEMU's tap (by ifname) lives there; harmless for vhost-user.
            qemu = subprocess.Popen(["ip", "netns", "exec", ns,
                                     *qemu_argv(initrd, net_args, mac)],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        cpu = {"peer->guest": 0.0, "guest->peer": 0.0}
        for round_ in range(1, repeat + 1):
            wait_until(lambda r=round_: f"listening{r}" in console_values(console)
                       or qemu.poll() is not None or upload.error is not None,
                       BOOT_TIMEOUT_S, f"{system}: the guest's listener (round {round_})")
            found = console_values(console)
            if found.get("ping") != "ok" or f"listening{round_}" not in found:
                tail = console.read_text(errors="replace")[-1500:]
                figures.skipped = (f"round {round_}: the guest could not ping the peer or "
                                   f"did not listen; console tail:\n{tail}")
                return figures
            cpu0 = cpu_seconds(backend.pid) if backend else 0.0
            figures.to_guest.append(mib / download(ns, data))
            cpu1 = cpu_seconds(backend.pid) if backend else 0.0
            wait_until(lambda r=round_: len(upload.rounds) >= r or upload.error is not None
                       or qemu.poll() is not None, TRANSFER_TIMEOUT_S,
                       f"{system}: the guest's upload (round {round_})")
            cpu2 = cpu_seconds(backend.pid) if backend else 0.0
            cpu["peer->guest"] += cpu1 - cpu0
            cpu["guest->peer"] += cpu2 - cpu1
            if len(upload.rounds) < round_:
                figures.skipped = f"round {round_}: upload failed: {upload.error or 'QEMU exited'}"
                return figures
            received, seconds = upload.rounds[-1]
            if received != len(data):
                figures.skipped = f"round {round_}: upload moved {received} of {len(data)} bytes"
                return figures
            figures.to_peer.append(mib / seconds)
        if backend:
            figures.backend_cpu = cpu
        return figures
    finally:
        if qemu is not None and qemu.poll() is None:
            qemu.send_signal(signal.SIGTERM)
            try:
                qemu.wait(timeout=20)
            except subprocess.TimeoutExpired:
                qemu.kill()
                qemu.wait()
        if upload is not None:
            upload.close()
        if backend is not None:
            backend.__exit__(None, None, None)
        ns_ip(ns, "link", "del", tap, check=False)


def vhost_net_reason() -> str | None:
    """Why kernel vhost-net cannot be measured here, or None if it can."""
    if not os.path.exists("/dev/vhost-net"):
        done = subprocess.run(["modprobe", "vhost_net"], capture_output=True, text=True)
        if not os.path.exists("/dev/vhost-net"):
            detail = (done.stderr.strip() or "no error output").splitlines()[-1]
            return f"/dev/vhost-net is missing and `modprobe vhost_net` failed: {detail}"
    return None


def guest_part(systems: list[str], mib: int, repeat: int) -> None:
    print(f"\n== Guest TCP throughput (TCG guest, busybox nc <-> Python peer, {mib} MiB each way, "
          f"{repeat} rounds per boot)")
    print("   guest-side NIC for every system: virtio-net-pci,host_mtu=1500," + NIC_INTERRUPTS)
    data = bytes(mib << 20)
    results: dict[str, GuestFigures] = {}
    with netns("rfb") as ns, tempfile.TemporaryDirectory(prefix="bench-net-") as tmp:
        for key in ("all", "default"):
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                            f"net.ipv6.conf.{key}.disable_ipv6=1"], check=True)
        ns_ip(ns, "link", "add", BRIDGE, "address", BRIDGE_MAC, "type", "bridge")
        ns_ip(ns, "addr", "add", f"{PEER_IP}/24", "dev", BRIDGE)
        ns_ip(ns, "link", "set", BRIDGE, "up")
        work = Path(tmp)
        os.chmod(work, 0o755)
        for index, system in enumerate(systems):
            if system == "vhost-net" and (reason := vhost_net_reason()):
                results[system] = GuestFigures(skipped=reason)
            else:
                t0 = time.monotonic()
                results[system] = run_guest(system, index, ns, work, mib, repeat, data)
                print(f"   ({system}: boot + transfers took {time.monotonic() - t0:.0f} s)",
                      flush=True)
        ns_ip(ns, "link", "del", BRIDGE, check=False)
    base = results.get("tap")
    print(f"   median of {repeat} rounds per direction (min-max); ratios are of the medians")
    print(f"   {'system':<10} {'peer->guest MiB/s':>24} {'guest->peer MiB/s':>24} "
          f"{'vs tap p->g':>12} {'vs tap g->p':>12}")
    for system, fig in results.items():
        if not fig.to_guest and not fig.to_peer:
            print(f"   {system:<10} skipped: {fig.skipped}")
            continue
        ref_in = median(base.to_guest) if base and base.to_guest else None
        ref_out = median(base.to_peer) if base and base.to_peer else None
        print(f"   {system:<10} {cell(fig.to_guest):>24} {cell(fig.to_peer):>24} "
              f"{ratio(fig.to_guest, ref_in):>12} {ratio(fig.to_peer, ref_out):>12}")
        if fig.skipped:
            print(f"   {'':<10} incomplete: {fig.skipped}")
        if fig.backend_cpu:
            rounds = {"peer->guest": len(fig.to_guest), "guest->peer": len(fig.to_peer)}
            cpu = ", ".join(f"{d} {s:.2f} s ({s / (mib * rounds[d]) * 1e3:.1f} ms/MiB)"
                            for d, s in fig.backend_cpu.items() if rounds[d])
            print(f"   {'':<10} ringfence backend CPU (utime+stime) over all rounds: {cpu}")


def cell(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def ratio(values: list[float], ref: float | None) -> str:
    return f"{median(values) / ref:.2f}x" if values and ref else "n/a"


# ------------------------------------------------------------------- front-end CPU/frame


@dataclass
class FrameFigures:
    frames: int
    lost: int
    seconds: float
    cpu: float

    def line(self, what: str) -> str:
        per = self.cpu / self.frames * 1e6 if self.frames else float("nan")
        lost = f", {self.lost} lost" if self.lost else ""
        return (f"   {what:<28} {self.frames / self.seconds:>10,.0f} frames/s  "
                f"backend {per:6.1f} us CPU/frame  ({self.frames} frames{lost})")


def rx_case(dev: NetFrontend, peer: socket.socket, pid: int, size: int,
            seconds: float) -> FrameFigures:
    """Peer -> tap -> backend -> the front-end's RX ring."""
    port = 7010 + size
    payload_len = size - ETH_IP_UDP
    frames = lost = 0
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i in range(BATCH):
            peer.sendto(struct.pack("!I", i) + bytes(payload_len - 4), (GUEST_IP, port))
        got = 0
        deadline = time.monotonic() + 2
        while got < BATCH and time.monotonic() < deadline:
            try:
                batch = dev.receive(1, timeout=max(deadline - time.monotonic(), 0.01))
            except TimeoutError:
                break
            for _hdr, frame in batch:
                parsed = udp_payload(frame)
                if parsed is not None and parsed[0] == port:
                    got += 1
        frames += got
        lost += BATCH - got
    return FrameFigures(frames, lost, time.perf_counter() - t0, cpu_seconds(pid) - cpu0)


def tx_case(dev: NetFrontend, peer: socket.socket, peer_mac: bytes, pid: int, size: int,
            seconds: float) -> FrameFigures:
    """The front-end's TX ring -> backend -> tap -> the peer's UDP socket."""
    frame = udp_frame(peer_mac, bytes(size - ETH_IP_UDP), 7010, peer.getsockname()[1])
    assert len(frame) == size
    frames = lost = 0
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(BATCH):
            dev.send(frame, kick=False)
        dev.tx.kick()
        got = 0
        for _ in range(BATCH):
            try:
                peer.recv(2048)
                got += 1
            except TimeoutError:
                break
        frames += got
        lost += BATCH - got
        wait_until(lambda: (dev.reap_tx(), dev.tx.in_flight == 0)[1], 5, "TX completions")
        dev.tx_done.clear()
    return FrameFigures(frames, lost, time.perf_counter() - t0, cpu_seconds(pid) - cpu0)


def frontend_part(seconds: float) -> None:
    print(f"\n== Backend CPU per frame, no guest (NetFrontend <-> ringfence dev <-> tap, "
          f"UDP, batches of {BATCH}, {seconds:g} s per case)")
    print("   frames/s is bounded by the Python front-end; the CPU column is the backend's own")
    with netns("rfbf") as ns, tempfile.TemporaryDirectory(prefix="bench-net-fe-") as tmp:
        for key in ("all", "default"):
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                            f"net.ipv6.conf.{key}.disable_ipv6=1"], check=True)
        sock = str(Path(tmp) / "nic.sock")
        with DevBackend({}, nets={sock: "rfbf0"}, netns=ns) as backend:
            peer_mac = _setup_tap(ns, "rfbf0", PEER_IP, GUEST_IP)
            with inside(ns):
                peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
            peer.bind((PEER_IP, 0))
            peer.settimeout(2)
            try:
                with NetFrontend.open(sock, queue_size=256) as dev:
                    dev.post_rx()
                    for size in FRAME_SIZES:
                        rx = rx_case(dev, peer, backend.pid, size, seconds)
                        print(rx.line(f"peer->guest (RX) {size} B"), flush=True)
                        tx = tx_case(dev, peer, peer_mac, backend.pid, size, seconds)
                        print(tx.line(f"guest->peer (TX) {size} B"), flush=True)
            finally:
                peer.close()
            if not backend.alive():
                print("   the backend died:\n" + backend.log()[-2000:])


# ----------------------------------------------------------------------------------- main


def _raise_on_term(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=64, help="MiB each way per guest (64)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="transfer rounds each way per guest boot (3)")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="seconds per front-end case (2)")
    parser.add_argument("--systems", default="ringfence,tap,vhost-net",
                        help="guest systems, comma-separated (ringfence,tap,vhost-net)")
    parser.add_argument("--skip-guest", action="store_true")
    parser.add_argument("--skip-frontend", action="store_true")
    args = parser.parse_args()
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - {"ringfence", "tap", "vhost-net"}
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces and taps)")
    signal.signal(signal.SIGTERM, _raise_on_term)
    qemu_version = subprocess.run([QEMU, "--version"], capture_output=True,
                                  text=True).stdout.splitlines()[:1]
    print(f"bench_net: {platform.node()} kernel {platform.release()}, {os.cpu_count()} CPUs, "
          f"{qemu_version[0] if qemu_version else QEMU}, -accel tcg")
    started = time.monotonic()
    steps: list[Callable[[], None]] = []
    if not args.skip_guest:
        steps.append(lambda: guest_part(systems, args.mib, args.repeat))
    if not args.skip_frontend:
        steps.append(lambda: frontend_part(args.seconds))
    for step in steps:
        step()
    print(f"\n(total {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM, after the cleanup ran
        print(f"\ninterrupted ({exc or 'Ctrl-C'}); namespaces, taps and QEMU cleaned up",
              file=sys.stderr)
        sys.exit(130)
