"""Real QEMU guests for end-to-end tests.

A guest is a Debian cloud kernel plus a busybox initramfs whose /init loads the virtio drivers,
runs a per-boot shell script and reports its exit status on the serial console. Both the kernel
and the base initramfs are built once and cached (see `guest_image`); each boot only appends a
tiny archive holding the script. QEMU runs under TCG because KVM is not assumed to be usable.

Block devices appear in the guest in command-line order: first one per vhost-user socket, then
one per QEMU built-in drive, so they are vda, vdb, ... in that order.
"""

from __future__ import annotations

import fcntl
import functools
import gzip
import hashlib
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CACHE_ENV = "RINGFENCE_GUEST_CACHE"
DEFAULT_CACHE = Path("/var/cache/ringfence-guest")
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")
INIT_SCRIPT = Path(__file__).with_name("guest_init.sh")
# Load order: each module only depends on the ones before it.
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
)
KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1"
RESULT_PREFIX = "RF: "
MIB = 1024 * 1024


class GuestError(RuntimeError):
    """The guest kernel or initramfs could not be prepared, or QEMU could not be started."""


@dataclass(frozen=True)
class GuestImage:
    """The cached files every boot starts from."""

    kernel: Path
    initramfs: Path


@dataclass(frozen=True)
class GuestResult:
    """What a guest printed and how it ended."""

    output: str  # the serial console, with "\r\n" normalised to "\n"
    exit_status: int | None  # the test script's status from "RF-EXIT", None if never printed
    qemu_returncode: int
    qemu_stderr: str
    timed_out: bool
    elapsed: float  # seconds from starting QEMU to its exit

    def values(self, prefix: str = RESULT_PREFIX) -> dict[str, str]:
        """The `key=value` pairs of the lines the script printed as `<prefix>key=value`."""
        found = {}
        for line in self.output.splitlines():
            if line.startswith(prefix) and "=" in line:
                key, _, value = line[len(prefix) :].partition("=")
                found[key.strip()] = value.strip()
        return found


# --- the cached kernel and base initramfs -------------------------------------------------


@functools.cache
def guest_image() -> GuestImage:
    """Return the cached guest kernel and base initramfs, building whichever is missing.

    The kernel is keyed on the Debian package version; the initramfs also on a hash of the
    init script, busybox and the module list, so editing any of them rebuilds it.
    """
    cache = _cache_dir()
    package, version = _kernel_package()
    with _cache_lock(cache):
        kernel_dir = cache / f"kernel-{package}_{version}"
        if not kernel_dir.is_dir():
            _fetch_kernel(package, version, kernel_dir)
        busybox = _static_busybox()
        init = INIT_SCRIPT.read_bytes()
        key = hashlib.sha256(init + busybox + "\n".join(MODULES).encode()).hexdigest()[:16]
        initramfs = cache / f"initramfs-{package}_{version}-{key}.cpio.gz"
        if not initramfs.exists():
            archive = _base_initramfs(init, busybox, kernel_dir / "modules")
            _write_atomically(initramfs, archive)
    return GuestImage(kernel=kernel_dir / "vmlinuz", initramfs=initramfs)


def _cache_dir() -> Path:
    cache = Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE))
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GuestError(
            f"Cannot create the guest cache {cache} ({e.strerror}); "
            f"set {CACHE_ENV} to a writable directory."
        ) from e
    return cache


@contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    # Parallel test processes must not download or build the same entry twice.
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _run(argv: Sequence[str], what: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise GuestError(f"Cannot {what}: {argv[0]} is not installed.") from e
    if done.returncode != 0:
        detail = (done.stderr.strip().splitlines() or ["no error output"])[-1]
        raise GuestError(f"Cannot {what}: {argv[0]} failed with '{detail}'.")
    return done.stdout


def _kernel_package() -> tuple[str, str]:
    """The concrete kernel package the cloud meta-package depends on, and its version."""
    info = _run(
        ["apt-cache", "show", "--no-all-versions", KERNEL_META_PACKAGE],
        f"look up {KERNEL_META_PACKAGE}",
    )
    depends = re.search(r"^Depends:.*?\b(linux-image-\S+)(?: \(= ([^)]+)\))?", info, re.M)
    meta_version = re.search(r"^Version: (\S+)", info, re.M)
    if depends is None or meta_version is None:
        raise GuestError(f"Cannot find the kernel package that {KERNEL_META_PACKAGE} depends on.")
    # Debian pins the exact version; the meta-package shares it when the pin is absent.
    return depends[1], depends[2] or meta_version[1]


def _fetch_kernel(package: str, version: str, dest: Path) -> None:
    """Download the kernel package and keep only vmlinuz and our modules, under `dest`."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        work = Path(tmp)
        _run(
            ["apt-get", "download", f"{package}={version}"],
            f"download the guest kernel {package}={version} (check apt's mirror access)",
            cwd=work,
        )
        (deb,) = work.glob("*.deb")
        root = work / "root"
        _run(["dpkg-deb", "-x", str(deb), str(root)], f"unpack {deb.name}")
        stage = work / "kernel"
        (stage / "modules").mkdir(parents=True)
        (vmlinuz,) = (root / "boot").glob("vmlinuz-*")
        shutil.copyfile(vmlinuz, stage / "vmlinuz")
        (module_root,) = (root / "lib" / "modules").iterdir()
        _copy_modules(module_root, stage / "modules")
        stage.rename(dest)  # same file system: readers never see a half-built entry


def _copy_modules(module_root: Path, dest: Path) -> None:
    """Copy MODULES as uncompressed `NN-name.ko`, the numbers giving the insmod order."""
    builtin_paths = _read_lines(module_root / "modules.builtin")
    builtin = {Path(line).name.split(".")[0] for line in builtin_paths}
    for index, name in enumerate(MODULES):
        found = [*module_root.rglob(f"{name}.ko"), *module_root.rglob(f"{name}.ko.xz")]
        target = dest / f"{index:02d}-{name}.ko"
        if not found:
            if name not in builtin:
                raise GuestError(f"The guest kernel has no {name} driver, built in or as a module.")
            continue
        data = found[0].read_bytes()
        # busybox insmod cannot be relied on to read xz-compressed modules.
        target.write_bytes(lzma.decompress(data) if found[0].suffix == ".xz" else data)


def _read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _static_busybox() -> bytes:
    # The guest has no libc, so a dynamically linked busybox would leave it without an init.
    try:
        data = BUSYBOX.read_bytes()
    except FileNotFoundError as e:
        raise GuestError(f"{BUSYBOX} is missing; install the busybox-static package.") from e
    if _elf_has_interpreter(data):
        raise GuestError(f"{BUSYBOX} is dynamically linked; install the busybox-static package.")
    return data


def _elf_has_interpreter(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF file names a dynamic loader (a PT_INTERP header)."""
    pt_interp = 3
    (phoff,) = struct.unpack_from("<Q", elf, 32)
    phentsize, phnum = struct.unpack_from("<HH", elf, 54)
    return any(
        struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == pt_interp for i in range(phnum)
    )


def _base_initramfs(init: bytes, busybox: bytes, modules: Path) -> bytes:
    applets = _run([str(BUSYBOX), "--list"], "list the busybox applets").split()
    archive = _Cpio()
    for directory in ("bin", "dev", "lib", "lib/rf-modules", "proc", "sys", "tmp", "usr"):
        archive.directory(directory)
    # The kernel gives PID 1 /dev/console as stdin/stdout/stderr only if the node exists.
    archive.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    archive.file("init", init, 0o755)
    archive.file("bin/busybox", busybox, 0o755)
    for applet in applets:
        if applet != "busybox":
            archive.symlink(f"bin/{applet}", "busybox")
    # Scripts may use any of the usual applet paths.
    for alias, target in (("sbin", "bin"), ("usr/bin", "../bin"), ("usr/sbin", "../bin")):
        archive.symlink(alias, target)
    for module in sorted(modules.iterdir()):
        archive.file(f"lib/rf-modules/{module.name}", module.read_bytes(), 0o644)
    return archive.gzipped()


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


class _Cpio:
    """A "newc" cpio archive, the format the kernel unpacks into its initial root file system."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._inode = 0

    def directory(self, name: str) -> None:
        self.add(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int) -> None:
        self.add(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self.add(name, stat.S_IFLNK | 0o777, target.encode())

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self._inode += 1
        encoded = name.encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize
        # check; a zero mtime keeps the archive, and so the cache, reproducible.
        fields = (self._inode, mode, 0, 0, nlink, 0, len(data), 0, 0, *rdev, len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % field for field in fields)
        self._parts += [_pad4(header + encoded), _pad4(data)]

    def gzipped(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return gzip.compress(b"".join(self._parts), mtime=0)


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


# --- booting ----------------------------------------------------------------------------


class RunningGuest:
    """A QEMU guest started by `start_guest`; `wait` collects its result.

    Use it as a context manager so that a failing test never leaves QEMU running.
    """

    def __init__(self, argv: Sequence[str], workdir: tempfile.TemporaryDirectory, timeout: float):
        self._workdir = workdir
        work = Path(workdir.name)
        # Files rather than pipes: a guest that nobody is reading from must never stall.
        self._stdout = open(work / "serial.log", "w+b")  # noqa: SIM115 - closed in wait()
        self._stderr = open(work / "qemu-stderr.log", "w+b")  # noqa: SIM115 - closed in wait()
        self._started = time.monotonic()
        self._deadline = self._started + timeout
        self._result: GuestResult | None = None
        try:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=self._stdout, stderr=self._stderr
            )
        except FileNotFoundError as e:
            self._cleanup()
            raise GuestError(f"{QEMU} is missing; install the qemu-system-x86 package.") from e

    def wait(self) -> GuestResult:
        """Wait for the guest to power off, killing it at the deadline, and return its result."""
        if self._result is None:
            timed_out = False
            try:
                self.process.wait(timeout=max(0.0, self._deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                self.process.kill()
                self.process.wait()
            output = self._read(self._stdout)
            exits = re.findall(r"^RF-EXIT (\d+)$", output, re.M)
            self._result = GuestResult(
                output=output,
                exit_status=int(exits[-1]) if exits else None,
                qemu_returncode=self.process.returncode,
                qemu_stderr=self._read(self._stderr),
                timed_out=timed_out,
                elapsed=time.monotonic() - self._started,
            )
            self._cleanup()
        return self._result

    def kill(self) -> None:
        """Stop the guest now if it is still running; `wait` still returns what it printed."""
        if self.process.poll() is None:
            self.process.kill()
        self.wait()

    def __enter__(self) -> RunningGuest:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    @staticmethod
    def _read(log: BinaryIO) -> str:
        log.seek(0)
        return log.read().decode(errors="replace").replace("\r\n", "\n")

    def _cleanup(self) -> None:
        self._stdout.close()
        self._stderr.close()
        self._workdir.cleanup()


def raw_image(path: Path, mib: int) -> Path:
    """A sparse raw image of `mib` MiB for a test disk."""
    with open(path, "wb") as f:
        f.truncate(mib * MIB)
    return path


def write_initrd(script: str, dest: Path) -> Path:
    """Write an initramfs that runs `script` as /test.sh to `dest` (for policies naming it)."""
    script_archive = _Cpio()
    script_archive.file("test.sh", script.encode(), 0o755)
    # Linux unpacks concatenated archives in turn, so the cached base needs no copy-and-edit.
    dest.write_bytes(guest_image().initramfs.read_bytes() + script_archive.gzipped())
    return dest


def start_guest(
    blk_sockets: Sequence[str | os.PathLike[str]] = (),
    script: str = "",
    *,
    drives: Sequence[str | os.PathLike[str]] = (),
    mem_mb: int = 256,
    timeout: float = 180,
    extra_args: Sequence[str] = (),
) -> RunningGuest:
    """Boot a guest that runs `script` as /test.sh, without waiting for it.

    Each of `blk_sockets` (already listening) becomes a vhost-user-blk disk, each of `drives`
    a raw image served by QEMU's own virtio-blk, for checking the harness or comparing.
    `timeout` counts from now and covers the whole boot.
    """
    image = guest_image()
    workdir = tempfile.TemporaryDirectory(prefix="ringfence-guest-")
    initrd = write_initrd(script, Path(workdir.name) / "initrd.cpio.gz")
    argv = [
        QEMU, "-accel", "tcg", "-m", str(mem_mb), "-nographic", "-no-reboot", "-nic", "none",
        "-kernel", str(image.kernel), "-initrd", str(initrd), "-append", KERNEL_CMDLINE,
        # vhost-user back-ends can only map guest RAM that is a shared file descriptor.
        "-object", f"memory-backend-memfd,id=mem,size={mem_mb}M,share=on",
        "-numa", "node,memdev=mem",
    ]  # fmt: skip
    for i, socket in enumerate(blk_sockets):
        argv += ["-chardev", f"socket,id=c{i},path={_qemu_escape(socket)}"]
        argv += ["-device", f"vhost-user-blk-pci,chardev=c{i}"]
    for i, drive in enumerate(drives):
        argv += ["-drive", f"file={_qemu_escape(drive)},format=raw,if=none,id=d{i},cache=none"]
        argv += ["-device", f"virtio-blk-pci,drive=d{i}"]
    argv += extra_args
    return RunningGuest(argv, workdir, timeout)


def boot_guest(
    blk_sockets: Sequence[str | os.PathLike[str]] = (),
    script: str = "",
    *,
    drives: Sequence[str | os.PathLike[str]] = (),
    mem_mb: int = 256,
    timeout: float = 180,
    extra_args: Sequence[str] = (),
) -> GuestResult:
    """Boot a guest that runs `script` as /test.sh and return once it has powered off."""
    with start_guest(
        blk_sockets, script, drives=drives, mem_mb=mem_mb, timeout=timeout, extra_args=extra_args
    ) as guest:
        return guest.wait()


def _qemu_escape(path: str | os.PathLike[str]) -> str:
    # QEMU option values end at a comma unless it is doubled.
    return os.fspath(path).replace(",", ",,")


# --- the block device check -------------------------------------------------------------

DEFAULT_OFFSETS_MIB = (0, 17, 60)
SECTOR = 512


def pattern_bytes(device: str, offset_mib: int, pattern_mib: int) -> bytes:
    """Exactly the bytes `blk_check_script` writes to `device` at `offset_mib`.

    Each 512-byte sector is one text line naming the device and its own absolute sector
    number, so a sector that lands in the wrong place, or on the wrong disk, changes the hash
    and can be read off a hexdump of the image.
    """
    first = offset_mib * MIB // SECTOR
    return b"".join(
        f"ringfence {device:<4} sector {lba:012d}{'':477}\n".encode()
        for lba in range(first, first + pattern_mib * MIB // SECTOR)
    )


_CHECK_BODY = r"""
set -eu -o pipefail
MIB=1048576

# busybox dd silently retries without O_DIRECT when a transfer fails with EINVAL (misaligned);
# whole MiBs at MiB offsets from its page-aligned buffers never are, so O_DIRECT holds.
pattern() {  # device, offset MiB, MiB: must match pattern_bytes() in tests/e2e/guest.py
    awk -v dev=$1 -v first=$(($2 * MIB / 512)) -v sectors=$(($3 * MIB / 512)) 'BEGIN {
        for (lba = first; lba < first + sectors; lba++)
            printf "ringfence %-4s sector %012d%477s\n", dev, lba, ""
    }'
}

for dev in $DEVICES; do
    echo "RF: $dev.sectors=$(cat /sys/block/$dev/size)"
    for off in $OFFSETS_MIB; do
        pattern $dev $off $PATTERN_MIB > /tmp/pattern
        sum=$(sha256sum < /tmp/pattern)
        echo "RF: $dev.off$off.written=${sum%% *}"
        # conv=fsync makes the device see a flush, as it would under a file system.
        dd if=/tmp/pattern of=/dev/$dev bs=1M seek=$off oflag=direct conv=fsync status=none
    done
done
rm -f /tmp/pattern
sync
echo 3 > /proc/sys/vm/drop_caches
for dev in $DEVICES; do
    for off in $OFFSETS_MIB; do
        sum=$(dd if=/dev/$dev bs=1M skip=$off count=$PATTERN_MIB iflag=direct status=none \
              | sha256sum)
        echo "RF: $dev.off$off.read=${sum%% *}"
    done
done
"""


def blk_check_script(
    devices: Sequence[str],
    pattern_mib: int = 4,
    offsets_mib: Sequence[int] = DEFAULT_OFFSETS_MIB,
) -> str:
    """A guest script that writes `pattern_bytes` to each device and reads it back.

    Writes and reads use O_DIRECT, writes end with a flush, and the page cache is dropped
    between them. It prints, per device, `RF: vda.sectors=N` and, per offset,
    `RF: vda.off17.written=SHA256` and `RF: vda.off17.read=SHA256`.
    """
    if not devices or not all(re.fullmatch(r"vd[a-z]{1,2}", d) for d in devices):
        raise ValueError(f"devices must be guest virtio disk names like 'vda', not {devices!r}")
    if pattern_mib < 1 or not offsets_mib or min(offsets_mib) < 0:
        raise ValueError("pattern_mib must be at least 1 and offsets_mib non-empty and >= 0")
    settings = (
        f"DEVICES='{' '.join(devices)}'\n"
        f"OFFSETS_MIB='{' '.join(str(int(o)) for o in offsets_mib)}'\n"
        f"PATTERN_MIB={int(pattern_mib)}\n"
    )
    return settings + _CHECK_BODY


def blk_check_problems(
    result: GuestResult,
    images: Mapping[str, str | os.PathLike[str]],
    pattern_mib: int = 4,
    offsets_mib: Sequence[int] = DEFAULT_OFFSETS_MIB,
) -> list[str]:
    """What went wrong in a `blk_check_script` run over `images` (device name -> image file).

    Checks the script's exit status, that the guest wrote and read back the expected bytes,
    and that those bytes are in the image file. Empty means success.
    """
    values = result.values()
    problems = [] if result.exit_status == 0 else [f"script exit status {result.exit_status}"]
    for device, image in images.items():
        with open(image, "rb") as f:
            for offset in offsets_mib:
                expected = pattern_bytes(device, offset, pattern_mib)
                want = hashlib.sha256(expected).hexdigest()
                for side in ("written", "read"):
                    got = values.get(f"{device}.off{offset}.{side}")
                    if got != want:
                        problems.append(f"{device} at {offset} MiB: {side} {got}, want {want}")
                f.seek(offset * MIB)
                if f.read(len(expected)) != expected:
                    problems.append(f"{device} at {offset} MiB: {image} lacks the pattern")
    return problems
