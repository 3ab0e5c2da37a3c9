"""The confined backend's side of the broker channel: devices arrive as FDs, never as paths.

The broker sends ADD_BLK with a listening vhost-user socket and an open image, and ADD_NET with
a listening socket and an open tap (one FD per queue pair); the backend wraps them in an
`Endpoint` on its one event loop. It cannot open anything itself, so every device it serves is
one the broker granted. Channel EOF means the broker is gone: shut down.
"""

from __future__ import annotations

import logging
import os
import select
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backend.blk import BlkDevice
from backend.eventfds import eventfd_guard
from backend.net import NetDevice
from backend.scheduler import Qos
from backend.server import Endpoint, Loop
from backend.stats import combined
from broker.fdpass import TO_BACKEND, FrameError, Kind, recv_frame, send_frame
from sandbox.confine import ConfinementError, confine

log = logging.getLogger(__name__)

Device = BlkDevice | NetDevice
# The eventfd guard's first alarm comes this long after it is armed, just before confinement,
# whose ctypes calls would not survive an EINTR; confinement takes milliseconds.
CONFINE_BEFORE_ALARM_S = 2.0


class BrokerChannel:
    """Serves the broker's requests on one SOCK_SEQPACKET socket inside the event loop."""

    def __init__(self, loop: Loop, sock: socket.socket, group: str) -> None:
        self.loop = loop
        self.sock = sock
        self.group = group
        # (vm, disk) -> (endpoint, image fd)
        self.devices: dict[tuple[str, int], tuple[Endpoint, int]] = {}
        # (vm, nic) -> (endpoint, tap queue fds)
        self.nics: dict[tuple[str, int], tuple[Endpoint, list[int]]] = {}
        sock.setblocking(False)
        loop.register(sock.fileno(), select.EPOLLIN, self.on_readable)

    def announce_ready(self) -> None:
        send_frame(self.sock, Kind.READY, {"devices": len(self.devices)})

    def on_readable(self, _events: int) -> None:
        try:
            received = recv_frame(self.sock, TO_BACKEND)
        except BlockingIOError:
            return
        except FrameError as exc:
            log.error("group %s: refused a frame from the broker: %s", self.group, exc)
            return
        except OSError as exc:
            log.error("group %s: broker channel failed: %s; shutting down", self.group, exc)
            self.loop.stopping = True
            return
        if received is None:
            log.info("group %s: broker closed the channel; shutting down", self.group)
            self.loop.stopping = True
            return
        frame, fds = received
        handler = {
            Kind.ADD_BLK: self._add_blk,
            Kind.ADD_NET: self._add_net,
            Kind.REMOVE_VM: self._remove_vm,
            Kind.STATUS: self._status,
            Kind.STOP: self._stop,
            Kind.SET_QOS: self._set_qos,
        }[frame.kind]
        handler(frame.fields, fds)

    def _adopt(self, name: str, vm: str, listener_fd: int, device_fds: list[int],
               build: Callable[[], Device]) -> tuple[Endpoint, Device] | None:
        """Wrap a handed-over listening socket and device FDs into an endpoint, or refuse them
        all (closing them and telling the broker why)."""
        listener = None
        try:
            device = build()
            # Family and type given: Python would otherwise ask the kernel (getsockopt).
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=listener_fd)
            return Endpoint(name, listener, device, self.loop, vm=vm), device
        except (OSError, ValueError) as exc:
            log.error("%s: cannot serve: %s", name, exc)
            if listener is not None:
                listener.close()
            else:
                os.close(listener_fd)
            for fd in device_fds:
                os.close(fd)
            send_frame(self.sock, Kind.ERROR, {"vm": vm, "message": str(exc)})
            return None

    def _add_blk(self, fields: dict[str, Any], fds: list[int]) -> None:
        listener_fd, image_fd = fds
        key = (fields["vm"], fields["disk"])
        name = f"vm {fields['vm']} disk{fields['disk']} ({fields['socket']})"

        def build() -> BlkDevice:
            if key in self.devices:
                raise ValueError("this device is already being served")
            return BlkDevice(image_fd, readonly=fields["readonly"],
                             num_queues=fields["num_queues"], serial=fields["serial"])

        served = self._adopt(name, fields["vm"], listener_fd, [image_fd], build)
        if served is not None:
            endpoint, device = served
            self.devices[key] = (endpoint, image_fd)
            log.info("%s: serving (%d sectors, %s)", name, device.capacity,
                     "read-only" if device.readonly else "read-write")

    def _add_net(self, fields: dict[str, Any], fds: list[int]) -> None:
        listener_fd, *tap_fds = fds  # one tap queue per pair: recv_frame checked the count
        key = (fields["vm"], fields["nic"])
        name = f"vm {fields['vm']} nic{fields['nic']} ({fields['socket']})"

        def build() -> NetDevice:
            if key in self.nics:
                raise ValueError("this NIC is already being served")
            mac = bytes.fromhex(fields["mac"].replace(":", ""))
            return NetDevice(tap_fds, mac=mac, mtu=fields["mtu"], name=name, tap=fields["tap"])

        served = self._adopt(name, fields["vm"], listener_fd, tap_fds, build)
        if served is not None:
            self.nics[key] = (served[0], tap_fds)
            log.info("%s: serving tap %s (mtu %d, %d queue pair%s)", name, fields["tap"],
                     fields["mtu"], len(tap_fds), "" if len(tap_fds) == 1 else "s")

    def _remove_vm(self, fields: dict[str, Any], _fds: list[int]) -> None:
        for key in [k for k in self.devices if k[0] == fields["vm"]]:
            endpoint, fd = self.devices.pop(key)
            endpoint.close()
            os.close(fd)
            log.info("%s: removed", endpoint.name)
        for key in [k for k in self.nics if k[0] == fields["vm"]]:
            endpoint, fds = self.nics.pop(key)
            endpoint.close()
            for fd in fds:
                os.close(fd)
            log.info("%s: removed", endpoint.name)

    def _set_qos(self, fields: dict[str, Any], _fds: list[int]) -> None:
        vm = fields["vm"]
        try:
            qos = Qos(weight=fields["weight"], priority=fields["priority"],
                      iops_limit=fields["iops_limit"] or None,
                      bps_limit=fields["bps_limit"] or None,
                      burst=fields["burst_milli"] / 1000)
        except ValueError as exc:
            send_frame(self.sock, Kind.ERROR, {"vm": vm, "message": f"QoS refused: {exc}"})
            return
        if not any(v == vm for v, _index in [*self.devices, *self.nics]):
            send_frame(self.sock, Kind.ERROR, {"vm": vm, "message": "QoS for a VM not served"})
            return
        self.loop.dispatcher.set_qos(vm, qos)
        log.info("vm %s: QoS %s", vm, qos)

    def _status(self, _fields: dict[str, Any], _fds: list[int]) -> None:
        devices = []
        for (vm, disk), (endpoint, _fd) in sorted(self.devices.items()):
            totals = combined([r.stats for r in endpoint.runtimes.values()])
            latency = totals.latency
            devices.append({
                "vm": vm, "disk": disk, "socket": endpoint.name,
                "connected": endpoint.connection is not None,
                "requests": totals.requests, "bytes": totals.bytes, "kicks": totals.kicks,
                "interrupts": totals.interrupts,
                "p50_us": latency.percentile(50) // 1000,
                "p99_us": latency.percentile(99) // 1000,
                "p999_us": latency.percentile(99.9) // 1000,
                "throttled_ms": self.loop.dispatcher.throttled_ns(vm) // 1_000_000,
            })
        nics = [nic_status(vm, nic, endpoint)
                for (vm, nic), (endpoint, _fds) in sorted(self.nics.items())]
        send_frame(self.sock, Kind.STATUS_REPLY, {"devices": devices, "nics": nics})

    def _stop(self, _fields: dict[str, Any], _fds: list[int]) -> None:
        log.info("group %s: stop requested by the broker", self.group)
        self.loop.stopping = True

    def close(self) -> None:
        for vm in {vm for vm, _index in [*self.devices, *self.nics]}:
            self._remove_vm({"vm": vm}, [])
        self.loop.unregister(self.sock.fileno())
        self.sock.close()


def nic_status(vm: str, nic: int, endpoint: Endpoint) -> dict[str, Any]:
    """One NIC's entry of STATUS_REPLY: the device's frame counters and its rings' kicks and
    interrupts over the endpoint's life (all front-ends it served)."""
    device = endpoint.device
    if not isinstance(device, NetDevice):
        raise TypeError(f"{endpoint.name} is not a NIC")
    counters = device.counters
    rings = [r.stats for r in endpoint.runtimes.values()]
    return {
        "vm": vm, "nic": nic, "socket": endpoint.name, "tap": device.tap_name,
        "connected": endpoint.connection is not None, "queues": len(device.pairs),
        "tx_frames": counters.tx_frames, "tx_bytes": counters.tx_bytes,
        "rx_frames": counters.rx_frames, "rx_bytes": counters.rx_bytes,
        "tx_dropped": counters.tx_dropped, "rx_dropped": counters.rx_dropped,
        "kicks": sum(r.kicks for r in rings), "interrupts": sum(r.interrupts for r in rings),
        "drops": [{"reason": reason, "count": count}
                  for reason, count in sorted(counters.drop_reasons.items())],
        "pairs": [{"rx_frames": p.rx_frames, "tx_frames": p.tx_frames} for p in device.pairs],
    }


def serve_for_broker(
    channel_fd: int, group: str, uid: int, gid: int, seccomp_policy: Path, seccomp_action: str
) -> int:
    """The confined backend's main: set everything up, confine, then serve the broker."""
    loop = Loop()
    loop.stop_on_signals()  # creates its wakeup socketpair now: socket() is gone after confine
    channel = BrokerChannel(loop, socket.socket(fileno=channel_fd), group)
    keep = [channel_fd, loop.epoll.fileno(), *loop.signal_fds()]
    with eventfd_guard(first_s=CONFINE_BEFORE_ALARM_S):  # setitimer is gone after confine too
        try:
            confine(keep_fds=keep, uid=uid, gid=gid, seccomp_policy=seccomp_policy,
                    seccomp_action=seccomp_action)
        except ConfinementError as exc:
            log.error("group %s: %s; the backend will not serve unconfined", group, exc)
            return 1
        log.info("group %s: confined (uid %d, seccomp %s); serving", group, uid,
                 seccomp_action)
        channel.announce_ready()
        try:
            loop.run()
        finally:
            channel.close()
    return 0
