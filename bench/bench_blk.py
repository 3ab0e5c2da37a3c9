"""virtio-blk over vhost-user: ringfence against qemu-storage-daemon (QSD).

Prints figures; never a test. Every system serves the same page-cached raw images
to the in-process test front-end (tests/frontend.py), which plays QEMU and runs
random I/O for each case. For the back-end process it reports CPU seconds per I/O
(utime+stime of the whole process from /proc/PID/stat) and context switches per I/O
(/proc/PID/task/*/status), then every system's ratio to QSD.

    python bench/bench_blk.py [--systems qsd,ringfence] [--seconds 5] [--image-size 1G]
                              [--only CASE] [--dir DIR] [--qsd-aio threads|io_uring|native]

The 8-device case uses 8 images of image-size/8 each, so both systems see the same
total page-cached data and no back-end has to share one image between devices.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # so `python bench/bench_blk.py` finds the tests package

from tests.frontend import BlkFrontend, BlkLoad, run_load  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
WARMUP_S = 0.5  # unmeasured run first: back-end thread pools, caches, CPU clocks settle
START_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Case:
    name: str
    block_size: int
    qd: int
    write: bool = False
    devices: int = 1


CASES = [
    Case("randread-4k-qd1", 4096, 1),
    Case("randread-4k-qd32", 4096, 32),
    Case("randwrite-4k-qd32", 4096, 32, write=True),
    Case("randread-64k-qd8", 65536, 8),
    Case("randread-4k-qd32-8dev", 4096, 32, devices=8),
]


# ----------------------------------------------------------------------------- systems

Command = Callable[[Sequence[tuple[str, str]]], list[str]]


def qsd_command(aio: str) -> Command:
    """QSD with one file+raw node and one vhost-user-blk export per (socket, image)."""

    def build(devices: Sequence[tuple[str, str]]) -> list[str]:
        args = ["qemu-storage-daemon"]
        for i, (sock, image) in enumerate(devices):
            args += [
                "--blockdev",
                f"driver=file,node-name=f{i},filename={image},aio={aio}",
                "--blockdev",
                f"driver=raw,node-name=d{i},file=f{i}",
                "--export",
                f"type=vhost-user-blk,id=e{i},node-name=d{i},addr.type=unix,"
                f"addr.path={sock},writable=on,num-queues=1",
            ]
        return args

    return build


def machine_line() -> str:
    """Host, kernel, CPUs, Python and QSD version: the context every figure needs."""
    qsd_version = subprocess.run(
        ["qemu-storage-daemon", "--version"], capture_output=True, text=True
    ).stdout.splitlines()[:1]
    return (f"{platform.node()}  kernel {platform.release()}  {os.cpu_count()} CPUs  "
            f"Python {platform.python_version()}  {' '.join(qsd_version)}")


def ringfence_command(extra: Sequence[str] = ()) -> Command:
    """`ringfence dev` from this checkout (run with cwd=REPO), whatever is installed."""

    def build(devices: Sequence[tuple[str, str]]) -> list[str]:
        args = [sys.executable, "-m", "backend", "dev", *extra]
        for sock, image in devices:
            args += ["--blk", f"{sock}={image}"]
        return args

    return build


# ------------------------------------------------------------------------ measurement


@dataclass(frozen=True)
class ProcSample:
    cpu_s: float
    vcsw: dict[int, int]  # per thread id
    ivcsw: dict[int, int]


def sample_process(pid: int) -> ProcSample:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # comm may contain spaces
    cpu_s = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: whole process
    vcsw: dict[int, int] = {}
    ivcsw: dict[int, int] = {}
    # Context switches are only per thread; threads that exit mid-run are lost.
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except FileNotFoundError:
            continue
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key == "voluntary_ctxt_switches":
                vcsw[int(tid)] = int(value)
            elif key == "nonvoluntary_ctxt_switches":
                ivcsw[int(tid)] = int(value)
    return ProcSample(cpu_s, vcsw, ivcsw)


def _delta(before: dict[int, int], after: dict[int, int]) -> int:
    return sum(v - before.get(tid, 0) for tid, v in after.items())


@dataclass(frozen=True)
class Figures:
    iops: float
    p50_us: float
    p99_us: float
    cpu_us_per_io: float
    vcsw_per_io: float
    ivcsw_per_io: float
    fe_us_per_io: float
    errors: int


METRICS = [  # (column title, attribute, format)
    ("IOPS", "iops", "{:>10.0f}"),
    ("p50 us", "p50_us", "{:>9.1f}"),
    ("p99 us", "p99_us", "{:>9.1f}"),
    ("cpu us/IO", "cpu_us_per_io", "{:>10.2f}"),
    ("vcsw/IO", "vcsw_per_io", "{:>9.3f}"),
    ("ivcsw/IO", "ivcsw_per_io", "{:>9.3f}"),
    ("fe us/IO", "fe_us_per_io", "{:>9.2f}"),
]


# ----------------------------------------------------------------------------- images


def prepare_image(path: Path, size: int) -> None:
    """Create (or reuse) a fully written raw image and read it once into page cache."""
    chunk = 1 << 20
    if not path.exists() or path.stat().st_size != size:
        pattern = os.urandom(chunk)  # allocated, non-zero data: no holes to short-cut reads
        with open(path, "wb") as f:
            for _ in range(size // chunk):
                f.write(pattern)
            f.write(pattern[: size % chunk])
            os.fsync(f.fileno())  # no writeback may compete with the measured runs
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
        while os.read(fd, chunk):
            pass
    finally:
        os.close(fd)


def flush_images(images: Sequence[Path]) -> None:
    """Write back what a write case dirtied before the next case is measured."""
    for path in images:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -------------------------------------------------------------------------------- run


def _wait_for_sockets(proc: subprocess.Popen, socks: Sequence[str], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not all(os.path.exists(s) for s in socks):
        if proc.poll() is not None:
            raise RuntimeError(f"back-end exited with {proc.returncode}: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"back-end sockets did not appear: {log.read_text()[-2000:]}")
        time.sleep(0.02)


def run_case(command: Command, case: Case, images: Sequence[Path], seconds: float) -> Figures:
    with tempfile.TemporaryDirectory(prefix="rf-bench-") as rundir:
        socks = [f"{rundir}/blk{i}.sock" for i in range(case.devices)]
        log = Path(rundir) / "backend.log"
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                command(list(zip(socks, map(str, images), strict=True))),
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        devs: list[BlkFrontend] = []
        loads: list[BlkLoad] = []
        try:
            _wait_for_sockets(proc, socks, log)
            for i, sock in enumerate(socks):
                devs.append(BlkFrontend.open(sock, mem_size=8 << 20, timeout=START_TIMEOUT_S))
                loads.append(
                    BlkLoad(
                        devs[-1], qd=case.qd, block_size=case.block_size, write=case.write, seed=i
                    )
                )
            run_load(loads, WARMUP_S)
            before = sample_process(proc.pid)
            res = run_load(loads, seconds)
            after = sample_process(proc.pid)
        finally:
            for ld in loads:
                ld.close()
            for dev in devs:
                dev.close()
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    ios = max(res.ios, 1)
    return Figures(
        iops=res.iops,
        p50_us=res.latency_us(50),
        p99_us=res.latency_us(99),
        cpu_us_per_io=(after.cpu_s - before.cpu_s) / ios * 1e6,
        vcsw_per_io=_delta(before.vcsw, after.vcsw) / ios,
        ivcsw_per_io=_delta(before.ivcsw, after.ivcsw) / ios,
        fe_us_per_io=res.frontend_cpu_s / ios * 1e6,
        errors=res.errors,
    )


def print_table(
    cases: Sequence[Case], results: dict[tuple[str, str], Figures], systems: Sequence[str]
) -> None:
    head = f"{'case':<22} {'system':<13}" + "".join(
        f"{title:>{len(fmt.format(0))}}" for title, _, fmt in METRICS
    )
    print(head)
    print("-" * len(head))
    for case in cases:
        label = case.name
        for system in systems:
            fig = results.get((case.name, system))
            if fig is None:
                continue
            row = "".join(fmt.format(getattr(fig, attr)) for _, attr, fmt in METRICS)
            note = f"  ({fig.errors} errors)" if fig.errors else ""
            print(f"{label:<22} {system:<13}{row}{note}")
            label = ""
        ref = results.get((case.name, "qsd"))
        for system in systems:
            fig = results.get((case.name, system))
            if system == "qsd" or fig is None or ref is None:
                continue
            cells = []
            for _, attr, fmt in METRICS:
                base = getattr(ref, attr)
                cell = f"{getattr(fig, attr) / base:.2f}x" if base else "-"
                cells.append(f"{cell:>{len(fmt.format(0))}}")
            print(f"{'':<22} {system + '/qsd':<13}{''.join(cells)}")
    print(
        "\ncpu = back-end process user+system CPU; vcsw/ivcsw = its voluntary/involuntary"
        "\ncontext switches; fe = this front-end's CPU. Latency is post-to-reap."
    )


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text[-1:].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--systems",
        default="qsd,ringfence",
        help="comma-separated, from: qsd, ringfence (default: both)",
    )
    ap.add_argument("--seconds", type=float, default=5.0, help="measured time per case")
    ap.add_argument("--image-size", type=parse_size, default=1 << 30, help="e.g. 1G, 256M")
    ap.add_argument(
        "--only",
        choices=[c.name for c in CASES],
        action="append",
        help="run only this case (repeatable)",
    )
    ap.add_argument("--dir", type=Path, help="where the images live (kept); default: a temp dir")
    ap.add_argument(
        "--qsd-aio",
        default="threads",
        choices=["threads", "io_uring", "native"],
        help="QSD file driver aio= (default: threads, QSD's own default)",
    )
    args = ap.parse_args(argv)

    commands: dict[str, Command] = {}
    for name in args.systems.split(","):
        if name == "qsd":
            if shutil.which("qemu-storage-daemon") is None:
                ap.error("qemu-storage-daemon not found (apt-get install qemu-utils)")
            commands[name] = qsd_command(args.qsd_aio)
        elif name == "ringfence":
            commands[name] = ringfence_command()
        else:
            ap.error(f"unknown system {name!r}")
    cases = [c for c in CASES if not args.only or c.name in args.only]

    workdir = args.dir or Path(tempfile.mkdtemp(prefix="rf-bench-img-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        print(f"preparing images in {workdir} ...", file=sys.stderr)
        main_image = workdir / "disk.raw"
        prepare_image(main_image, args.image_size)
        small = [workdir / f"disk{i}.raw" for i in range(8)]
        if any(c.devices > 1 for c in cases):
            for path in small:
                prepare_image(path, args.image_size // 8)

        results: dict[tuple[str, str], Figures] = {}
        for case in cases:
            images = [main_image] if case.devices == 1 else small[: case.devices]
            for system, command in commands.items():
                print(f"{case.name} on {system} ...", file=sys.stderr)
                results[(case.name, system)] = run_case(command, case, images, args.seconds)
                if case.write:
                    flush_images(images)
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"\n{machine_line()}")
    print(
        f"image {args.image_size >> 20} MiB page-cached raw, {args.seconds:g} s per case, "
        f"QSD aio={args.qsd_aio}\n"
    )
    print_table(cases, results, list(commands))
    return 0


if __name__ == "__main__":
    sys.exit(main())
