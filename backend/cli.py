"""The `ringfence` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from backend.blk import BlkDevice
from backend.eventfds import eventfd_guard
from backend.net import NetDevice
from backend.scheduler import Qos, Scheduler
from backend.server import Endpoint, Loop

log = logging.getLogger("ringfence")

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad argument: one sentence for the operator, exit code 2."""


@dataclass(frozen=True)
class BlkExport:
    socket_path: str
    image_path: str
    readonly: bool


def parse_blk_exports(specs: Sequence[str], readonly: Sequence[str]) -> list[BlkExport]:
    exports = []
    seen: set[str] = set()
    for spec in specs:
        sock_path, sep, image_path = spec.partition("=")
        if not sep or not sock_path or not image_path:
            raise UsageError(f"--blk {spec!r} must be SOCKET=IMAGE")
        sock_path = os.path.abspath(sock_path)
        if sock_path in seen:
            raise UsageError(f"socket {sock_path} is given twice; give each device its own")
        seen.add(sock_path)
        exports.append(BlkExport(sock_path, image_path, False))
    for path in readonly:
        path = os.path.abspath(path)
        if path not in seen:
            raise UsageError(f"--readonly {path} names no --blk socket")
    ro = {os.path.abspath(p) for p in readonly}
    return [BlkExport(e.socket_path, e.image_path, e.socket_path in ro) for e in exports]


@dataclass(frozen=True)
class NetExport:
    socket_path: str
    tap: str
    mac: bytes
    mtu: int
    queues: int = 1  # queue pairs: a multi-queue tap with one FD per pair when more than 1


DEFAULT_DEV_MAC = "52:54:00:12:34:56"


def parse_net_exports(specs: Sequence[str]) -> list[NetExport]:
    """`SOCKET=TAP[,mac=52:54:00:12:34:56][,mtu=1500][,queues=N]` -> NetExport."""
    from broker.taps import MAX_QUEUES, TapError, check_tap_name, parse_mac

    exports = []
    for spec in specs:
        sock_path, sep, rest = spec.partition("=")
        tap, *options = rest.split(",")
        if not sep or not sock_path or not tap:
            raise UsageError(f"--net {spec!r} must be SOCKET=TAP[,mac=MAC][,mtu=N][,queues=N]")
        settings = {"mac": DEFAULT_DEV_MAC, "mtu": "1500", "queues": "1"}
        for option in options:
            key, _, value = option.partition("=")
            if key not in settings:
                raise UsageError(f"--net {spec!r}: unknown setting {key!r}; use mac, mtu or "
                                 "queues")
            settings[key] = value
        try:
            check_tap_name(tap)
            mac = parse_mac(settings["mac"])
            mtu = int(settings["mtu"])
            queues = int(settings["queues"])
        except (TapError, ValueError) as exc:
            raise UsageError(f"--net {spec!r}: {exc}") from None
        if not 68 <= mtu <= 65500:
            raise UsageError(f"--net {spec!r}: mtu {mtu} must be from 68 to 65500")
        if not 1 <= queues <= MAX_QUEUES:
            raise UsageError(f"--net {spec!r}: queues {queues} must be from 1 to {MAX_QUEUES}")
        exports.append(NetExport(os.path.abspath(sock_path), tap, mac, mtu, queues))
    return exports


def open_image(export: BlkExport) -> int:
    """Open an image for a dev-mode export; UsageError names the file and the fix."""
    path = export.image_path
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"image {path} does not exist; create it (e.g. truncate -s 1G)") from None
    except OSError as exc:
        raise UsageError(f"image {path} cannot be read: {exc.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise UsageError(f"image {path} is not a regular file or block device")
    flags = (os.O_RDONLY if export.readonly else os.O_RDWR) | os.O_CLOEXEC
    try:
        return os.open(path, flags)
    except OSError as exc:
        raise UsageError(f"image {path} cannot be opened: {exc.strerror}") from None


def listen_unix(path: str) -> socket.socket:
    """Bind a listening socket, replacing only a stale socket file nobody listens on."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise UsageError(
                f"socket path {path} exists and is not a socket; remove it or pick another"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale: left behind by a process that is gone
        except OSError as exc:
            raise UsageError(f"socket path {path} cannot be checked: {exc.strerror}") from None
        else:
            raise UsageError(f"socket path {path} is in use by another process")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot create socket {path}: {exc.strerror}") from None
    sock.listen(4)
    return sock


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_qos(spec: str) -> tuple[str, Qos]:
    """`SOCKET=weight=2,priority=high,iops=2000,bps=20M,burst=2` -> (socket path, Qos)."""
    sock_path, sep, settings = spec.partition("=")
    if not sep or not settings:
        raise UsageError(f"--qos {spec!r} must be SOCKET=KEY=VALUE[,KEY=VALUE...]")
    fields: dict[str, object] = {}
    for item in settings.split(","):
        key, _, value = item.partition("=")
        try:
            if key == "weight":
                fields["weight"] = int(value)
            elif key == "priority":
                fields["priority"] = value
            elif key == "iops":
                fields["iops_limit"] = int(value)
            elif key == "bps":
                unit = value[-1:].upper() if value[-1:].isalpha() else ""
                fields["bps_limit"] = int(value[: len(value) - len(unit)]) * _SIZE_UNITS[unit]
            elif key == "burst":
                fields["burst"] = float(value)
            else:
                raise UsageError(f"--qos {spec!r}: unknown setting {key!r}; use weight, "
                                 "priority, iops, bps or burst")
        except (ValueError, KeyError):
            raise UsageError(f"--qos {spec!r}: {item!r} is not a valid value") from None
    try:
        return os.path.abspath(sock_path), Qos(**fields)  # type: ignore[arg-type]
    except ValueError as exc:
        raise UsageError(f"--qos {spec!r}: {exc}") from None


def cmd_dev(args: argparse.Namespace) -> int:
    exports = parse_blk_exports(args.blk, args.readonly)
    nets = parse_net_exports(args.net)
    if not exports and not nets:
        raise UsageError("give at least one --blk SOCKET=IMAGE or --net SOCKET=TAP")
    paths = [e.socket_path for e in exports] + [n.socket_path for n in nets]
    if len(set(paths)) != len(paths):
        raise UsageError("a socket is given twice; give each device its own")
    if args.num_queues < 1 or args.num_queues > 64:
        raise UsageError(f"--num-queues {args.num_queues} must be between 1 and 64")
    qos = dict(parse_qos(spec) for spec in args.qos)
    for path in qos:
        if path not in paths:
            raise UsageError(f"--qos {path} names no --blk or --net socket")
    loop = Loop(args.model, Scheduler(latency_target_ns=args.latency_target_us * 1000))
    # Before any socket listens: a SIGTERM from whoever saw it listening must find the handler.
    loop.stop_on_signals()
    endpoints: list[Endpoint] = []
    image_fds: list[int] = []
    tap_fds: list[list[int]] = []  # per --net, one FD per queue pair
    sockets: list[socket.socket] = []
    try:
        for export in exports:
            image_fds.append(open_image(export))
        for net in nets:
            tap_fds.append(open_dev_tap(net))
        for path in paths:
            sockets.append(listen_unix(path))
        for export, fd, sock in zip(exports, image_fds, sockets[: len(exports)], strict=True):
            device = BlkDevice(fd, readonly=export.readonly, num_queues=args.num_queues,
                               serial=os.path.basename(export.image_path))
            endpoints.append(Endpoint(export.socket_path, sock, device, loop,
                                      require_sealed_memory=not args.allow_unsealed_memory,
                                      qos=qos.get(export.socket_path, Qos())))
            log.info("serving %s on %s (%d sectors, %s, %d queues)", export.image_path,
                     export.socket_path, device.capacity, "read-only" if export.readonly
                     else "read-write", args.num_queues)
        for net, fd, sock in zip(nets, tap_fds, sockets[len(exports):], strict=True):
            try:
                net_device = NetDevice(fd, mac=net.mac, mtu=net.mtu, name=net.socket_path,
                                       tap=net.tap)
            except ValueError as exc:
                raise UsageError(f"tap {net.tap}: {exc}") from None
            endpoints.append(Endpoint(net.socket_path, sock, net_device, loop,
                                      require_sealed_memory=not args.allow_unsealed_memory,
                                      qos=qos.get(net.socket_path, Qos())))
            log.info("serving tap %s on %s (mtu %d, %d queue pairs)", net.tap, net.socket_path,
                     net.mtu, net.queues)
        with eventfd_guard() if args.model == "shared" else contextlib.nullcontext():
            loop.run()
    finally:
        for endpoint in endpoints:
            endpoint.close()
        for sock in sockets[len(endpoints):]:
            sock.close()
        for path in paths[: len(sockets)]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for fd in image_fds + [fd for fds in tap_fds for fd in fds]:
            os.close(fd)
    return 0


def open_dev_tap(net: NetExport) -> list[int]:
    """Attach to tap `net.tap` in this network namespace, creating it (for as long as this
    process holds it) if there is none: one FD per queue pair. Needs CAP_NET_ADMIN."""
    from broker.taps import open_tun_queues

    try:
        return open_tun_queues(net.tap, net.queues)
    except OSError as exc:
        kind = "IFF_MULTI_QUEUE|" if net.queues > 1 else ""
        raise UsageError(f"tap {net.tap} cannot be opened: {exc.strerror}; run as root, and "
                         f"name a tap with {kind}IFF_TAP|IFF_NO_PI|IFF_VNET_HDR or a new one"
                         ) from None


BACKEND_POLICY = Path(__file__).resolve().parent.parent / "policies" / "backend.policy"
DEFAULT_POLICY = "/etc/ringfence/policy.toml"


def cmd_backend(args: argparse.Namespace) -> int:
    from backend.channel import serve_for_broker

    return serve_for_broker(args.channel_fd, args.group, args.uid, args.gid,
                            Path(args.seccomp_policy), args.seccomp)


def cmd_broker(args: argparse.Namespace) -> int:
    from broker.service import run_broker

    return run_broker(args.policy)


def admin_socket_of(policy_path: str) -> str:
    """The admin socket named by a policy (read, not verified: the broker verifies it)."""
    from broker.policy import PolicyError, admin_socket_path, parse_policy

    try:
        with open(policy_path, "rb") as f:
            return admin_socket_path(parse_policy(f.read(), policy_path).broker)
    except OSError as exc:
        raise UsageError(f"policy {policy_path} cannot be read: {exc.strerror}") from None
    except PolicyError as exc:
        raise UsageError(str(exc)) from None


def cmd_top(args: argparse.Namespace) -> int:
    from broker.top import run_top

    path = admin_socket_of(args.policy)
    try:
        return run_top(path, interval=args.interval, iterations=args.iterations)
    except OSError as exc:
        print(f"ringfence: cannot reach the broker at {path}: {exc.strerror or exc}; is "
              "ringfence-broker running?", file=sys.stderr)
        return 1


def cmd_admin(args: argparse.Namespace) -> int:
    """status / reload / stop through the broker's admin socket."""
    from broker.admin import admin_request

    path = admin_socket_of(args.policy)
    try:
        response = admin_request(path, args.command)
    except OSError as exc:
        print(f"ringfence: cannot reach the broker at {path}: {exc.strerror or exc}; is "
              "ringfence-broker running?", file=sys.stderr)
        return 1
    if args.command == "status" and not args.json and response.get("ok"):
        print(format_status(response))
    else:
        print(json.dumps(response, indent=2 if not args.json else None))
    return 0 if response.get("ok") else 1


def format_status(status: dict) -> str:
    lines = [f"broker pid {status['pid']}  policy {status['policy']}"]
    for group, entry in status["groups"].items():
        pid = entry["pid"] if entry["pid"] is not None else "not running"
        lines.append(f"group {group}: backend pid {pid}" +
                     (f"  ERROR {entry['error']}" if "error" in entry else ""))
        for dev in entry["devices"]:
            state = "connected" if dev["connected"] else "waiting for QEMU"
            lines.append(f"  vm {dev['vm']:<16} disk{dev['disk']}  {state:<17} "
                         f"{dev['requests']:>10} requests  p99 {dev['p99_us']} us  "
                         f"{dev['kicks']} kicks  {dev['interrupts']} interrupts")
        for nic in entry.get("nics", []):
            state = "connected" if nic["connected"] else "waiting for QEMU"
            lines.append(f"  vm {nic['vm']:<16} nic{nic['nic']}   {state:<17} "
                         f"tap {nic['tap']} ({nic['queues']} queue pair"
                         f"{'' if nic['queues'] == 1 else 's'})  "
                         f"rx {nic['rx_frames']} frames {nic['rx_bytes']} bytes  "
                         f"tx {nic['tx_frames']} frames {nic['tx_bytes']} bytes  "
                         f"{nic['kicks']} kicks  {nic['interrupts']} interrupts")
            drops = ", ".join(f"{d['reason']} {d['count']}" for d in nic["drops"])
            lines.append(f"      dropped: rx {nic['rx_dropped']}, tx {nic['tx_dropped']}"
                         + (f" ({drops})" if drops else ""))
            if nic["queues"] > 1:
                lines.append("      per pair (rx/tx frames): " + "  ".join(
                    f"{i}: {p['rx_frames']}/{p['tx_frames']}"
                    for i, p in enumerate(nic["pairs"])))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ringfence", description=__doc__)
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)
    dev = sub.add_parser("dev", help="serve vhost-user-blk and -net devices directly (no "
                         "broker, no confinement)")
    dev.add_argument("--blk", action="append", default=[], metavar="SOCKET=IMAGE",
                     help="export IMAGE as a vhost-user-blk device on SOCKET (repeatable)")
    dev.add_argument("--net", action="append", default=[],
                     metavar="SOCKET=TAP[,mac=M,mtu=N,queues=N]",
                     help="serve tap TAP (created if absent) as a vhost-user-net device on "
                     "SOCKET (repeatable; needs root)")
    dev.add_argument("--readonly", action="append", default=[], metavar="SOCKET",
                     help="make the device on SOCKET read-only (repeatable)")
    dev.add_argument("--num-queues", type=int, default=1, metavar="N",
                     help="virtqueues per device (default 1)")
    dev.add_argument("--allow-unsealed-memory", action="store_true",
                     help="accept guest memory FDs without F_SEAL_SHRINK (a shrinking file "
                     "would kill the backend with SIGBUS)")
    dev.add_argument("--model", choices=["shared", "per-device"], default="shared",
                     help="shared: one I/O thread schedules every queue (default); "
                     "per-device: a thread per queue, for comparison only")
    dev.add_argument("--qos", action="append", default=[],
                     metavar="SOCKET=weight=W,priority=P,iops=N,bps=N[KMG],burst=B",
                     help="share, priority class and limits of the device on SOCKET")
    dev.add_argument("--latency-target-us", type=int, default=1000, metavar="US",
                     help="how long a queue may wait while others are served (default 1000)")
    dev.set_defaults(func=cmd_dev)

    broker = sub.add_parser("broker", help="the privileged broker daemon (run by systemd)")
    broker.add_argument("--policy", default=DEFAULT_POLICY, help="signed policy file")
    broker.set_defaults(func=cmd_broker)

    backend = sub.add_parser("backend", help="internal: the confined backend the broker spawns")
    backend.add_argument("--channel-fd", type=int, required=True)
    backend.add_argument("--group", required=True)
    backend.add_argument("--uid", type=int, required=True)
    backend.add_argument("--gid", type=int, required=True)
    backend.add_argument("--seccomp", choices=["kill", "log"], default="kill")
    backend.add_argument("--seccomp-policy", default=str(BACKEND_POLICY))
    backend.set_defaults(func=cmd_backend)

    for name, text in (("status", "show the broker, its backends and their devices"),
                       ("reload", "re-read the policy; add and remove VMs in place"),
                       ("stop", "stop the broker and its backends")):
        admin_cmd = sub.add_parser(name, help=text)
        admin_cmd.add_argument("--policy", default=DEFAULT_POLICY)
        admin_cmd.add_argument("--json", action="store_true", help="machine-readable output")
        admin_cmd.set_defaults(func=cmd_admin)

    top = sub.add_parser("top", help="live per-VM I/O rates and latency, refreshed each second")
    top.add_argument("--policy", default=DEFAULT_POLICY)
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.add_argument("--iterations", type=int, default=None,
                     help="stop after this many refreshes (default: until Ctrl-C)")
    top.set_defaults(func=cmd_top)

    from broker import audit, qemu, systemd
    from broker.policy_cli import add_policy_commands

    add_policy_commands(sub)
    qemu.add_commands(sub)
    audit.add_commands(sub)
    systemd.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"ringfence: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
