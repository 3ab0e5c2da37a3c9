"""systemd integration: readiness notification and the hardened broker unit.

The broker is the only root process of ringfence, so its unit takes away everything it does
not use: the file system is read-only except the image roots and the run directory, devices
are closed except /dev/net/tun, only AF_UNIX and AF_NETLINK sockets, and the capability
bounding set holds only what the broker and the backends it spawns use before they drop it.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from broker.policy import PolicyError, load_policy

UNIT_NAME = "ringfence-broker.service"
DEFAULT_POLICY = "/etc/ringfence/policy.toml"
DEFAULT_IMAGE_ROOT = "/var/lib/ringfence/images"
DEFAULT_USER = "ringfence"
RUNTIME_DIR = "/run/ringfence"  # the unit's RuntimeDirectory=ringfence
# ProtectHome= hides these; an interpreter installed below one must be bound back in.
HOME_DIRS = ("/root", "/home", "/run/user")


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to systemd; False when not started by it or on failure.

    This is sd_notify(3): one datagram to the AF_UNIX socket in $NOTIFY_SOCKET, where a
    leading '@' names an abstract socket.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False  # not run by systemd (or a vsock address, which no unit of ours uses)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError:
        return False  # readiness is advisory: a broken socket must not stop the broker
    return True


def unit_text(ringfence_path: str, *, policy_path: str = DEFAULT_POLICY,
              image_roots: Sequence[str] = (DEFAULT_IMAGE_ROOT,),
              run_dir: str = RUNTIME_DIR, read_only_paths: Sequence[str] = ()) -> str:
    """The broker's unit file. `read_only_paths` are bound in when ProtectHome= hides them
    (an interpreter or virtualenv installed below /root or /home)."""
    # "-": a missing path must not stop the unit before the broker can say what is wrong.
    writable = " ".join(f"-{path}" for path in (*image_roots, *(
        [run_dir] if run_dir != RUNTIME_DIR else [])))
    bind_ro = f"BindReadOnlyPaths={' '.join(read_only_paths)}\n" if read_only_paths else ""
    return f"""\
[Unit]
Description=ringfence broker (privileged half of the confined vhost-user back-end)
After=local-fs.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={ringfence_path} broker --policy {policy_path}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=2

# Files: the host is read-only; images and the run directory are the only writable paths.
# The run directory outlives restarts: QEMUs keep their socket directories bound.
RuntimeDirectory=ringfence
RuntimeDirectoryMode=0755
RuntimeDirectoryPreserve=yes
ReadWritePaths={writable}
{bind_ro}ProtectSystem=strict
ProtectHome=tmpfs
PrivateTmp=yes
UMask=0077
# Devices: only the tap clone device (block-device images need a DeviceAllow= drop-in).
DevicePolicy=closed
DeviceAllow=/dev/net/tun rw

# Privileges. The backend, spawned as root, unshares mount, network, IPC and UTS namespaces,
# pivots into an empty root and drops its bounding set and uid: CAP_SYS_ADMIN, CAP_SETPCAP,
# CAP_SETUID, CAP_SETGID. The broker gives VM sockets to their users (CAP_CHOWN), signals
# backends running as another uid (CAP_KILL) and creates taps (CAP_NET_ADMIN). Without
# CAP_DAC_OVERRIDE, images must be owned by root (or be readable and writable by it).
CapabilityBoundingSet=CAP_SYS_ADMIN CAP_SETPCAP CAP_SETUID CAP_SETGID
CapabilityBoundingSet=CAP_CHOWN CAP_KILL CAP_NET_ADMIN
NoNewPrivileges=yes
RestrictNamespaces=mnt net ipc uts
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RestrictRealtime=yes

# Kernel and system: nothing of it is the broker's business.
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
PrivateIPC=yes
PrivateMounts=yes

# Network: netlink for taps and bridges, unix sockets for vhost-user and admin; no IP at all.
RestrictAddressFamilies=AF_UNIX AF_NETLINK
IPAddressDeny=any

# System calls: a service's set plus mount and pivot_root (@mount) and seccomp() for the
# backend's own filter, which it stacks on this one.
SystemCallArchitectures=native
SystemCallFilter=@system-service @mount seccomp
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""


def install_unit(dest_dir: str = "/etc/systemd/system", *, policy_path: str = DEFAULT_POLICY,
                 ringfence_path: str | None = None, say: Callable[[str], None] = print) -> str:
    """Write the broker's unit, create the backend user and the policy's directory
    (/etc/ringfence); returns the unit path.

    Image roots, run directory and backend user come from the policy if it exists (so the unit
    makes exactly those writable), else the defaults. `say` reports each step.
    """
    ringfence = ringfence_path or _installed_ringfence()
    image_roots: Sequence[str] = (DEFAULT_IMAGE_ROOT,)
    run_dir, user = RUNTIME_DIR, DEFAULT_USER
    if os.path.exists(policy_path):
        settings = load_policy(policy_path).broker
        image_roots, run_dir, user = settings.image_roots, settings.run_dir, settings.backend_user
        say(f"using image roots, run directory and backend user from {policy_path}")
    else:
        say(f"no policy at {policy_path} yet: the unit allows writes to {DEFAULT_IMAGE_ROOT}")
    hidden = sorted({_home_prefix(p) for p in (sys.prefix, os.path.realpath(ringfence))} - {None})
    text = unit_text(ringfence, policy_path=policy_path, image_roots=image_roots,
                     run_dir=run_dir, read_only_paths=hidden)
    os.makedirs(dest_dir, exist_ok=True)
    unit_path = os.path.join(dest_dir, UNIT_NAME)
    Path(unit_path + ".tmp").write_text(text)
    os.chmod(unit_path + ".tmp", 0o644)
    os.replace(unit_path + ".tmp", unit_path)
    say(f"wrote {unit_path} (ExecStart={ringfence} broker --policy {policy_path})")
    if isinstance(user, str):  # a numeric uid needs no account
        _ensure_system_user(user, say)
    config_dir = os.path.dirname(os.path.abspath(policy_path))
    if not os.path.isdir(config_dir):
        os.makedirs(config_dir, mode=0o755)
        say(f"created {config_dir}")
    # sd_booted(3): systemd is PID 1 exactly when this directory exists.
    if os.path.isdir("/run/systemd/system"):
        subprocess.run(["systemctl", "daemon-reload"], check=True)
        say("ran systemctl daemon-reload")
    else:
        say("systemd is not running here: skipped systemctl daemon-reload")
    return unit_path


def _installed_ringfence() -> str:
    # The script next to this interpreter, not a shim that may pick another Python.
    beside = Path(sys.executable).with_name("ringfence")
    if beside.exists():
        return str(beside)
    found = shutil.which("ringfence")
    if found is None:
        raise FileNotFoundError("the ringfence script is not installed; run pip install first")
    return os.path.abspath(found)


def _home_prefix(path: str) -> str | None:
    """The top directory below a hidden home tree that holds `path`, e.g. /root/.pyenv."""
    for home in HOME_DIRS:
        if path.startswith(home + "/"):
            return os.path.join(home, path[len(home) + 1:].split("/")[0])
    return None


def _ensure_system_user(user: str, say: Callable[[str], None]) -> None:
    try:
        pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", user], check=True)
        say(f"created system user {user}")
    else:
        say(f"system user {user} exists")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("install-unit", help=f"install {UNIT_NAME} and the backend user")
    p.add_argument("--policy", default=DEFAULT_POLICY, help="policy the unit starts the "
                   "broker with (default %(default)s)")
    p.add_argument("--dest", default="/etc/systemd/system", help="unit directory (default "
                   "%(default)s)")
    p.set_defaults(func=_cmd_install_unit)


def _cmd_install_unit(args: argparse.Namespace) -> int:
    try:
        install_unit(args.dest, policy_path=args.policy)
    except PolicyError as exc:
        print(f"ringfence: {exc}", file=sys.stderr)
        return 1
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"ringfence: install-unit failed: {exc}", file=sys.stderr)
        return 1
    return 0
