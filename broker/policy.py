"""The operator's policy file: parse and validate it (pure), sign and verify it (Ed25519).

The policy is everything the broker acts on: which images it may open, as whom QEMU and the
backends run, and which VMs share a backend. `parse_policy` is a pure function over the file's
bytes so that it can be tested and fuzzed; every error is a `PolicyError` of one sentence naming
the file, the line where it can be found, and what to do. Unknown keys are errors, so a typo
never silently turns a setting off.

A policy is signed over its exact bytes; the base64 signature lives in `<policy>.sig` and must
verify against one of the public keys listed in `broker.trusted_keys`. Those key files must be
writable only by root, so whoever can edit the policy cannot also name a key of their own. A
policy that sets `allow_unsigned = true` is used without any check, a development escape hatch;
since whoever can edit the file could set it too, it is honoured only where the environment of
the process reading the policy (set by root: the unit, the shell) has ALLOW_UNSIGNED_ENV=1, and
is logged loudly every time.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.images import ImageError, shown, split_image_path

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")  # VM and group names
ACCOUNT_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")  # user and group names (Debian's default)
TAP_RE = re.compile(r"[a-z0-9_-]{1,15}")  # IFNAMSIZ - 1
BRIDGE_RE = re.compile(r"[a-zA-Z0-9_.-]{1,15}")
MAC_RE = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")
MIN_MTU = 68
MAX_MTU = 65500
SIZE_RE = re.compile(r"([0-9]+)([KMGT]?)", re.IGNORECASE)
BURST_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)x")
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MiB = 1 << 20
MAX_QUEUES = 64
MAX_NIC_QUEUES = 8  # queue pairs per NIC: one tap queue and FD each (broker.taps.MAX_QUEUES)
SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes including the terminating NUL
PRIORITIES = ("low", "normal", "high")
SECCOMP_ACTIONS = ("kill", "log")
SIG_SUFFIX = ".sig"


class PolicyError(Exception):
    """The policy (or a key or signature file) is unusable; one sentence for the operator."""


class SignatureError(PolicyError):
    """The policy's signature is missing or does not verify against any trusted key."""


@dataclass(frozen=True)
class BrokerSettings:
    image_roots: tuple[str, ...]
    run_dir: str
    backend_user: str | int  # name, or uid; resolved by the broker, never here
    admin_group: str | int | None
    trusted_keys: tuple[str, ...]
    allow_unsigned: bool
    seccomp: str  # "kill" or "log"


@dataclass(frozen=True)
class Group:
    name: str


@dataclass(frozen=True)
class Disk:
    image: str  # relative to an image root, or absolute below one
    readonly: bool


@dataclass(frozen=True)
class Nic:
    tap: str  # the host-side interface the broker creates
    bridge: str  # an existing bridge the tap joins
    mac: str  # the guest's address, lower case
    mtu: int
    queues: int


@dataclass(frozen=True)
class Qos:
    weight: int = 1
    priority: str = "normal"
    iops_limit: int | None = None
    bps_limit: int | None = None  # bytes per second
    burst: float = 1.0  # multiple of the limits a device may reach briefly


@dataclass(frozen=True)
class Vm:
    name: str
    group: str
    user: str | int
    memory_bytes: int
    kernel: str | None
    initrd: str | None
    append: str | None
    num_queues: int
    qos: Qos
    disks: tuple[Disk, ...]
    nics: tuple[Nic, ...] = ()


@dataclass(frozen=True)
class Policy:
    broker: BrokerSettings
    groups: dict[str, Group]
    vms: dict[str, Vm]

    def vms_in_group(self, name: str) -> list[Vm]:
        return [vm for vm in self.vms.values() if vm.group == name]


def vm_socket_dir(settings: BrokerSettings, vm_name: str) -> str:
    return os.path.join(settings.run_dir, "vms", vm_name)


def disk_socket_path(settings: BrokerSettings, vm_name: str, index: int) -> str:
    return os.path.join(vm_socket_dir(settings, vm_name), f"disk{index}.sock")


def nic_socket_path(settings: BrokerSettings, vm_name: str, index: int) -> str:
    return os.path.join(vm_socket_dir(settings, vm_name), f"nic{index}.sock")


def admin_socket_path(settings: BrokerSettings) -> str:
    return os.path.join(settings.run_dir, "admin.sock")


# ---------------------------------------------------------------------------------------------
# Parsing and validation (pure)


def parse_policy(data: bytes, source: str) -> Policy:
    """Validate a policy file's bytes; `source` names the file in errors."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"policy {source}: byte {exc.start} is not UTF-8; save the file as "
                          "UTF-8") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(_syntax_error(source, str(exc))) from None
    src = _Source(source, text)
    top = _Table(src, (), doc)
    broker = _parse_broker(src, top.get("broker", dict))
    groups = {}
    for name, raw in top.get("groups", dict, {}).items():
        _check_name(src, ("groups", name), "group", name)
        _Table(src, ("groups", name), raw).done()  # groups have no settings yet
        groups[name] = Group(name)
    vms = {}
    for name, raw in top.get("vms", dict, {}).items():
        _check_name(src, ("vms", name), "vm", name)
        vms[name] = _parse_vm(src, broker, groups, name, raw)
    top.done()
    _check_shared_images(src, broker, vms)
    _check_unique_nics(src, vms)
    return Policy(broker, groups, vms)


def _syntax_error(source: str, message: str) -> str:
    # tomllib (3.11) puts the position only in the message: "... (at line 3, column 7)".
    where = ""
    if match := re.search(r" \(at line (\d+), column (\d+)\)$", message):
        where, message = f" line {match[1]} column {match[2]}", message[: match.start()]
    elif message.endswith(" (at end of document)"):
        where, message = " at the end", message.removesuffix(" (at end of document)")
    return f"policy {source}{where}: {message[:1].lower()}{message[1:]}; fix the TOML syntax"


def _parse_broker(src: _Source, raw: dict[str, Any]) -> BrokerSettings:
    t = _Table(src, ("broker",), raw)
    roots = tuple(t.abspath_list("image_roots"))
    if not roots:
        raise t.error("image_roots", "broker.image_roots is empty; list the absolute "
                      "directories that hold disk images")
    if "/" in roots:
        raise t.error("image_roots", "broker.image_roots contains /, which would expose every "
                      "file on the host; list only the image directories")
    run_dir = t.abspath("run_dir", "/run/ringfence")
    backend_user = t.account("backend_user")
    admin_group = t.account("admin_group", None, may_be_root=True)
    trusted_keys = tuple(t.abspath_list("trusted_keys", []))
    allow_unsigned = t.get("allow_unsigned", bool, False)
    seccomp = t.choice("seccomp", SECCOMP_ACTIONS, "kill")
    t.done()
    if not trusted_keys and not allow_unsigned:
        raise t.error("trusted_keys", "broker.trusted_keys is empty, so no signature can "
                      "verify; list a public key made by `ringfence policy keygen`")
    settings = BrokerSettings(roots, run_dir, backend_user, admin_group, trusted_keys,
                              allow_unsigned, seccomp)
    _check_socket_path(src, admin_socket_path(settings))
    return settings


def _parse_vm(src: _Source, broker: BrokerSettings, groups: Mapping[str, Group], name: str,
              raw: object) -> Vm:
    t = _Table(src, ("vms", name), raw)
    group = t.get("group", str)
    if group not in groups:
        raise t.error("group", f"vm {name} names group {group!r}, which has no "
                      f"[groups.{shown(group)}] table; add one or fix the name")
    user = t.account("user")
    memory = t.size("memory", 256 * MiB)
    if memory % MiB:
        raise t.error("memory", f"vms.{name}.memory must be a whole number of MiB; write it "
                      "like \"256M\"")
    kernel = t.abspath("kernel", None)
    initrd = t.abspath("initrd", None)
    append = t.get("append", str, None)
    if kernel is None and (initrd is not None or append is not None):
        raise t.error("initrd" if initrd is not None else "append", f"vm {name} sets initrd or "
                      "append without kernel; add kernel or remove them")
    num_queues = t.get("num_queues", int, 1)
    if not 1 <= num_queues <= MAX_QUEUES:
        raise t.error("num_queues", f"vms.{name}.num_queues is {num_queues}; use 1 to "
                      f"{MAX_QUEUES}")
    qos = _parse_qos(_Table(src, ("vms", name, "qos"), t.get("qos", dict, {})))
    disks = []
    for index, item in enumerate(t.get("disks", list, [])):
        d = _Table(src, ("vms", name, "disks"), item, f"vms.{name}.disks[{index}]")
        image = d.get("image", str)
        try:
            split_image_path(broker.image_roots, image)
        except ImageError as exc:
            raise t.error("disks", f"{d.label}: {exc}") from None
        disks.append(Disk(image, d.get("readonly", bool, False)))
        d.done()
        _check_socket_path(src, disk_socket_path(broker, name, index))
    nics = []
    for index, item in enumerate(t.get("nics", list, [])):
        nics.append(_parse_nic(_Table(src, ("vms", name, "nics"), item,
                                      f"vms.{name}.nics[{index}]")))
        _check_socket_path(src, nic_socket_path(broker, name, index))
    t.done()
    return Vm(name, group, user, memory, kernel, initrd, append, num_queues, qos, tuple(disks),
              tuple(nics))


def _parse_nic(t: _Table) -> Nic:
    tap = t.get("tap", str)
    if not TAP_RE.fullmatch(tap):
        raise t.error("tap", f"{t.label}.tap is {tap!r}; use 1 to 15 of a-z, 0-9, '_' and '-'")
    bridge = t.get("bridge", str)
    if not BRIDGE_RE.fullmatch(bridge):
        raise t.error("bridge", f"{t.label}.bridge is {bridge!r}; name an existing bridge (1 to "
                      "15 of a-z, A-Z, 0-9, '_', '.' and '-')")
    mac = t.get("mac", str)
    if not MAC_RE.fullmatch(mac):
        raise t.error("mac", f"{t.label}.mac is {mac!r}; write six hex bytes like "
                      "\"52:54:00:12:34:56\"")
    if int(mac[:2], 16) & 1 or mac.replace(":", "").strip("0") == "":
        raise t.error("mac", f"{t.label}.mac {mac} is multicast or zero; use a unicast address "
                      "like 52:54:00:12:34:56")
    mtu = t.get("mtu", int, 1500)
    if not MIN_MTU <= mtu <= MAX_MTU:
        raise t.error("mtu", f"{t.label}.mtu is {mtu}; use {MIN_MTU} to {MAX_MTU}")
    queues = t.get("queues", int, 1)
    if not 1 <= queues <= MAX_NIC_QUEUES:
        raise t.error("queues", f"{t.label}.queues is {queues}; use 1 to {MAX_NIC_QUEUES} queue "
                      "pairs")
    t.done()
    return Nic(tap, bridge, mac.lower(), mtu, queues)


def _check_unique_nics(src: _Source, vms: Mapping[str, Vm]) -> None:
    """Each tap name and each guest MAC belongs to one NIC."""
    taps: dict[str, str] = {}
    macs: dict[str, str] = {}
    for vm in vms.values():
        for nic in vm.nics:
            for seen, value, what in ((taps, nic.tap, "tap"), (macs, nic.mac, "mac")):
                if value in seen:
                    raise src.error(("vms", vm.name, "nics"), f"{what} {value} of vm {vm.name} "
                                    f"is also used by vm {seen[value]}; give each NIC its own")
                seen[value] = vm.name


def _parse_qos(t: _Table) -> Qos:
    weight = t.get("weight", int, 1)
    if not 1 <= weight <= 1000:
        raise t.error("weight", f"{t.label}.weight is {weight}; use 1 to 1000")
    priority = t.choice("priority", PRIORITIES, "normal")
    iops_limit = t.get("iops_limit", int, None)
    if iops_limit is not None and iops_limit < 1:
        raise t.error("iops_limit", f"{t.label}.iops_limit must be positive; remove it for no "
                      "limit")
    bps_limit = t.size("bps_limit", None)
    burst = t.get("burst", str, "1x")
    match = BURST_RE.fullmatch(burst)
    if match is None or not 1 <= float(match[1]) <= 100:
        raise t.error("burst", f"{t.label}.burst is {burst!r}; write a multiple of the limits "
                      "from 1x to 100x, like \"2x\"")
    t.done()
    return Qos(weight, priority, iops_limit, bps_limit, float(match[1]))


def _check_shared_images(src: _Source, broker: BrokerSettings, vms: Mapping[str, Vm]) -> None:
    """An image used by more than one disk must be readonly everywhere (the locks would clash)."""
    seen: dict[tuple[str, tuple[str, ...]], tuple[str, bool]] = {}
    for vm in vms.values():
        for disk in vm.disks:
            for place in split_image_path(broker.image_roots, disk.image):
                other = seen.get(place)
                if other is not None and not (disk.readonly and other[1]):
                    raise src.error(("vms", vm.name, "disks"), f"image {shown(disk.image)} of vm "
                                    f"{vm.name} is also a disk of vm {other[0]}; give each VM "
                                    "its own image or set readonly = true on every use")
                seen.setdefault(place, (vm.name, disk.readonly))


def _check_name(src: _Source, path: tuple[str, ...], what: str, name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise src.error(path, f"{what} name {name!r} is not allowed; use 1 to 32 of a-z, 0-9, "
                        "'_' and '-', starting with a letter or digit")


def _check_socket_path(src: _Source, socket_path: str) -> None:
    if len(os.fsencode(socket_path)) > SUN_PATH_MAX:
        raise src.error(("broker", "run_dir"), f"socket path {shown(socket_path)} is longer than "
                        f"{SUN_PATH_MAX} bytes, the limit for unix sockets; choose a shorter "
                        "broker.run_dir")


class _Source:
    """The policy's text, to name the line where a semantic error can be found."""

    # TOML keys, each part bare or quoted. No two pieces of these patterns can match the same
    # characters (bare parts, quotes, dots and blanks are told apart by their first character),
    # so a match attempt backtracks at most once per character: linear time on any line.
    _PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*')"""
    _DOTTED = rf"{_PART}(?:[ \t]*\.[ \t]*{_PART})*"
    _HEADER = re.compile(rf"\[\[?[ \t]*({_DOTTED})[ \t]*\]\]?[ \t]*(?:#.*)?")
    _KEY = re.compile(rf"({_DOTTED})[ \t]*=")
    _KEY_PART = re.compile(_PART)

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        # Best effort, not a second TOML parser: the first line that defines each table or key.
        self.lines: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        # TOML ends lines only at \n (or \r\n); str.splitlines would also split at U+2028,
        # \x85 and others inside comments and strings and so misnumber every line after them.
        for number, line in enumerate(text.split("\n"), 1):
            line = line.removesuffix("\r").lstrip(" \t")
            if not line or line.startswith("#"):
                continue
            if header := self._HEADER.fullmatch(line):
                table = self._parts(header[1])
                self.lines.setdefault(table, number)
            elif key := self._KEY.match(line):
                self.lines.setdefault(table + self._parts(key[1]), number)

    @classmethod
    def _parts(cls, dotted: str) -> tuple[str, ...]:
        return tuple(part[1:-1] if part[0] in "\"'" else part
                     for part in cls._KEY_PART.findall(dotted))

    def error(self, path: tuple[str, ...], message: str) -> PolicyError:
        """`message` ("what; what to do") located at `path`, or at its closest enclosing table."""
        while path and path not in self.lines:
            path = path[:-1]
        where = f" line {self.lines[path]}" if path else ""
        return PolicyError(f"policy {self.name}{where}: {message}")


_REQUIRED: Any = object()
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list",
               dict: "a table"}


class _Table:
    """One TOML table being read: every key is taken once, and keys left over are errors."""

    def __init__(self, src: _Source, path: tuple[str, ...], raw: object,
                 label: str | None = None) -> None:
        self.src, self.path, self.label = src, path, label or ".".join(path)
        if not isinstance(raw, dict):
            raise src.error(path, f"{self.label} must be a table of settings; fix its value")
        self.raw = dict(raw)
        self.known: list[str] = []

    def name(self, key: str) -> str:
        return f"{self.label}.{key}" if self.label else key

    def error(self, key: str, message: str) -> PolicyError:
        return self.src.error((*self.path, key), message)

    def get(self, key: str, kind: type, default: Any = _REQUIRED) -> Any:
        self.known.append(key)
        if key not in self.raw:
            if default is _REQUIRED:
                what = self.name(key) if self.path else f"the [{key}] table"
                raise self.error(key, f"{what} is missing; add it")
            return default
        value = self.raw.pop(key)
        # bool is a subclass of int in Python, but `true` is no number of queues.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.error(key, f"{self.name(key)} must be {_TYPE_NAMES[kind]}; fix its value")
        return value

    def choice(self, key: str, choices: Sequence[str], default: str) -> str:
        value = self.get(key, str, default)
        if value not in choices:
            raise self.error(key, f"{self.name(key)} is {value!r}; use one of "
                             f"{', '.join(choices)}")
        return value

    def abspath(self, key: str, default: Any = _REQUIRED) -> Any:
        if key not in self.raw:
            return self.get(key, str, default)
        value = self.get(key, str)
        self._check_path(key, value)
        return value

    def abspath_list(self, key: str, default: Any = _REQUIRED) -> list[str]:
        values = self.get(key, list, default)
        for value in values:
            if not isinstance(value, str):
                raise self.error(key, f"{self.name(key)} must be a list of strings; fix its "
                                 "value")
            self._check_path(key, value)
        return values

    def _check_path(self, key: str, value: str) -> None:
        # Absolute and already normal, so that what the operator reads is what the broker opens.
        if not value.startswith("/") or "\0" in value or os.path.normpath(value) != value:
            raise self.error(key, f"{self.name(key)} has {value!r}, which is not a plain "
                             "absolute path; write it from / without '.', '..', '//' or a "
                             "trailing /")

    def size(self, key: str, default: Any = _REQUIRED) -> Any:
        if key not in self.raw:
            return self.get(key, object, default)
        value = self.get(key, object)
        match = SIZE_RE.fullmatch(value) if isinstance(value, str) else None
        if match:
            value = int(match[1]) * SIZE_UNITS[match[2].upper()]
        if type(value) is not int or not 0 < value < 1 << 63:
            raise self.error(key, f"{self.name(key)} must be a positive size in bytes or like "
                             "\"512K\", \"200M\", \"1G\"; fix its value")
        return value

    def account(self, key: str, default: Any = _REQUIRED, *, may_be_root: bool = False) -> Any:
        """A user or group: a name, or a numeric id (an integer or a string of digits)."""
        if key not in self.raw:
            return self.get(key, object, default)
        value = self.get(key, object)
        if isinstance(value, str) and re.fullmatch(r"[0-9]+", value):
            value = int(value)
        if not (isinstance(value, str) and ACCOUNT_RE.fullmatch(value)) and not (
                type(value) is int and 0 <= value < 0xFFFFFFFF):  # (uid_t)-1 means "unchanged"
            raise self.error(key, f"{self.name(key)} must be a user or group name or a numeric "
                             "id; fix its value")
        if not may_be_root and value in (0, "root"):
            raise self.error(key, f"{self.name(key)} is root, which would undo the privilege "
                             "split; name a dedicated unprivileged user")
        return value

    def done(self) -> None:
        for key in self.raw:
            raise self.error(key, f"unknown key {shown(self.name(key))}; remove it or fix its "
                             f"spelling (known: {', '.join(self.known) or 'none'})")


# ---------------------------------------------------------------------------------------------
# Keys and signatures


def generate_keypair(private_path: str, public_path: str) -> None:
    """Write a new Ed25519 key pair as PEM; the private key gets mode 0600. Never overwrites."""
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(private_path, private_pem, 0o600)
    try:
        _write_new(public_path, public_pem, 0o644)
    except PolicyError:
        os.unlink(private_path)  # half a key pair is of no use and would block the next try
        raise


def sign_policy(policy_path: str, private_key_path: str) -> str:
    """Sign a valid policy file's exact bytes into `<policy>.sig`; returns that path."""
    data = _read_file(policy_path, "policy")
    parse_policy(data, policy_path)  # a policy the broker would refuse is not worth a signature
    key = _load_private_key(private_key_path)
    sig_path = policy_path + SIG_SUFFIX
    try:
        fd = os.open(sig_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(base64.b64encode(key.sign(data)) + b"\n")
    except OSError as exc:
        raise PolicyError(f"signature file {sig_path} cannot be written: {exc.strerror}; check "
                          "the directory's permissions") from None
    return sig_path


def verify_policy_bytes(data: bytes, signature: bytes,
                        public_keys: Sequence[Ed25519PublicKey]) -> int | None:
    """The index of the first key under which `signature` (raw, 64 bytes) signs `data`, or None."""
    for index, key in enumerate(public_keys):
        try:
            key.verify(signature, data)
        except InvalidSignature:
            continue
        return index
    return None


# Where a development policy's allow_unsigned is honoured: an environment the file cannot set.
ALLOW_UNSIGNED_ENV = "RINGFENCE_ALLOW_UNSIGNED"


def verify_policy_file(path: str) -> tuple[Policy, str]:
    """Parse a policy and check its signature even if it allows unsigned use; returns the key."""
    data = _read_file(path, "policy")
    policy = parse_policy(data, path)
    return policy, _check_signature(path, data, policy.broker.trusted_keys)


def load_policy(path: str) -> Policy:
    """The broker's way in: a valid policy whose signature verifies (unless allow_unsigned, and
    ALLOW_UNSIGNED_ENV=1 in the environment)."""
    data = _read_file(path, "policy")
    policy = parse_policy(data, path)
    if policy.broker.allow_unsigned and os.environ.get(ALLOW_UNSIGNED_ENV) != "1":
        raise SignatureError(
            f"policy {path} sets allow_unsigned = true, which is honoured only with "
            f"{ALLOW_UNSIGNED_ENV}=1 in the environment (development only); sign the policy "
            f"with `ringfence policy sign {path} --key KEY` and remove allow_unsigned")
    if policy.broker.allow_unsigned:
        log.warning("policy %s is used WITHOUT checking its signature because it sets "
                    "allow_unsigned = true; this is for development only", path)
    else:
        key = _check_signature(path, data, policy.broker.trusted_keys)
        log.info("policy %s: signature verifies against trusted key %s", path, key)
    return policy


def _check_signature(path: str, data: bytes, trusted_keys: Sequence[str]) -> str:
    sig_path = path + SIG_SUFFIX
    if not os.path.lexists(sig_path):
        raise SignatureError(f"policy {path}: signature file {sig_path} is missing; sign the "
                             f"policy with `ringfence policy sign {path} --key KEY`")
    try:
        signature = base64.b64decode(_read_file(sig_path, "signature file").strip(),
                                     validate=True)
    except binascii.Error:
        signature = b""
    if len(signature) != 64:
        raise SignatureError(f"policy {path}: signature file {sig_path} is not a base64 Ed25519 "
                             "signature; re-sign it with `ringfence policy sign`")
    keys = [_load_trusted_key(key_path) for key_path in trusted_keys]
    index = verify_policy_bytes(data, signature, keys)
    if index is None:
        raise SignatureError(f"policy {path}: signature does not verify against any trusted "
                             "key; re-sign it with `ringfence policy sign`")
    return trusted_keys[index]


def _load_trusted_key(path: str) -> Ed25519PublicKey:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except OSError as exc:
        raise PolicyError(f"trusted key {shown(path)} cannot be read: {exc.strerror}; fix "
                          "broker.trusted_keys or restore the key") from None
    # The key list comes from the policy itself: a key its editor could write proves nothing.
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
        raise PolicyError(f"trusted key {shown(path)} can be changed by users other than root; "
                          "make it owned by root and not group- or world-writable")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise PolicyError(f"trusted key {shown(path)} is not a PEM Ed25519 public key; list the "
                          ".pub file written by `ringfence policy keygen`")
    return key


def _load_private_key(path: str) -> Ed25519PrivateKey:
    data = _read_file(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise PolicyError(f"private key {path} is not an unencrypted PEM Ed25519 private key; "
                          "use a key written by `ringfence policy keygen`")
    return key


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise PolicyError(f"{what} {path} cannot be read: {exc.strerror}; check the path and "
                          "its permissions") from None


def _write_new(path: str, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode)
    except FileExistsError:
        raise PolicyError(f"key file {path} already exists; refusing to overwrite it, so choose "
                          "another name or remove it first") from None
    except OSError as exc:
        raise PolicyError(f"key file {path} cannot be created: {exc.strerror}; check the "
                          "directory") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
            f.write(data)
    except OSError as exc:
        os.unlink(path)
        raise PolicyError(f"key file {path} cannot be written: {exc.strerror}; check the "
                          "filesystem") from None
