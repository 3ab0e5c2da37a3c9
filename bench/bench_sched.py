"""The shared I/O thread: scale, fairness, noisy neighbour and limits, side by side.

Prints figures; never a test. Three systems serve page-cached raw images (one per device) to
the in-process test front-end (tests/frontend.py), which plays every VM from one process and
one epoll loop:

* shared      `ringfence dev`: one thread schedules every queue (backend/dispatch.py)
* per-device  `ringfence dev --model per-device`: a thread per queue, the kernel decides
* qsd         qemu-storage-daemon, all exports in one daemon, aio=threads (its default)

Cases (4 KiB random reads unless said):

* scale: 1, 2, 4, 8, 16 VMs at QD8 each: aggregate IOPS, back-end CPU us per I/O and
  context switches per I/O (voluntary + involuntary, summed over the back-end's threads);
  QSD with aio=io_uring is added for 8 VMs;
* fairness: three VMs with weights 1:2:4 (--qos), QD32 each as the issue asks, then 64, 320;
* noisy neighbour: one VM reading 64 KiB at QD64 beside seven at 4 KiB QD1: the seven's p99
  against their p99 without the noisy one (same back-end process, the noisy VM idle);
* limits: iops=2000 (4 KiB, QD32) and bps=20M (64 KiB, QD8) beside an unlimited VM at QD32.

    python bench/bench_sched.py [--seconds 3] [--only scale|fairness|noisy|limits ...]
                                [--image-size 64M] [--dir DIR] [--no-io-uring]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # so `python bench/bench_sched.py` finds bench/ and tests/

from bench.bench_blk import (  # noqa: E402
    START_TIMEOUT_S,
    WARMUP_S,
    _delta,
    _wait_for_sockets,
    machine_line,
    parse_size,
    prepare_image,
    qsd_command,
    ringfence_command,
    sample_process,
)
from tests.frontend import BlkFrontend, BlkLoad, run_load  # noqa: E402

SCALE_VMS = (1, 2, 4, 8, 16)
SCALE_QD = 8
FAIR_WEIGHTS = (1, 2, 4)
# QD32 as issue 4 asks; 64, a deep guest queue; 320, deeper than the longest turn the shared
# thread serves (Scheduler's max_turn_requests, 256), so no turn can empty a queue.
FAIR_QDS = (32, 64, 320)
QUIET_VMS = 7
IOPS_LIMIT = 2000
BPS_LIMIT = 20 << 20  # `bps=20M` means MiB, as the CLI parses it
MEM_SIZE = 16 << 20  # guest RAM per device: 64 slots of 64 KiB plus rings fit easily
KiB = 1024
MiB = 1 << 20

# Targets from issue 4.
FAIR_TOLERANCE = 0.10  # each share within 10% (relative) of its ideal
NOISY_FACTOR = 2.0  # quiet VMs' p99 within 2x of solo
LIMIT_TOLERANCE = 0.05


# ----------------------------------------------------------------------------- systems

#: (socket, image) per device and a --qos setting per device ("" for none) -> argv.
Argv = Callable[[Sequence[tuple[str, str]], Sequence[str]], list[str]]


@dataclass(frozen=True)
class System:
    name: str
    argv: Argv


def ringfence(model: str) -> System:
    def argv(devices: Sequence[tuple[str, str]], qos: Sequence[str]) -> list[str]:
        extra = ["--model", model]
        for (sock, _image), spec in zip(devices, qos, strict=True):
            if spec:
                extra += ["--qos", f"{sock}={spec}"]
        return ringfence_command(extra)(devices)

    return System("shared" if model == "shared" else "per-dev", argv)


def qsd(aio: str) -> System:
    build = qsd_command(aio)

    def argv(devices: Sequence[tuple[str, str]], qos: Sequence[str]) -> list[str]:
        if any(qos):
            raise ValueError("qemu-storage-daemon takes no ringfence --qos")
        return build(devices)

    return System("qsd" if aio == "threads" else f"qsd-{aio}", argv)


SHARED = ringfence("shared")
PER_DEVICE = ringfence("per-device")
QSD = qsd("threads")
QSD_URING = qsd("io_uring")
SYSTEMS = (SHARED, PER_DEVICE, QSD)


# ------------------------------------------------------------------------ measurement


@dataclass(frozen=True)
class LoadSpec:
    qd: int
    block_size: int = 4096


@dataclass(frozen=True)
class Measurement:
    """One measured run: per-device completions and latencies, the back-end's costs."""

    seconds: float
    latencies_ns: list[list[int]]  # per device, one per completion; empty if it was idle
    errors: int
    cpu_s: float  # back-end process user+system
    vcsw: int  # back-end voluntary context switches, all threads
    ivcsw: int
    fe_cpu_s: float  # this front-end process

    @property
    def ios(self) -> int:
        return sum(map(len, self.latencies_ns))

    def iops(self, device: int | None = None) -> float:
        count = self.ios if device is None else len(self.latencies_ns[device])
        return count / self.seconds

    def p_us(self, pct: float, devices: Sequence[int]) -> float:
        """Latency percentile over the completions of `devices` pooled, in microseconds."""
        pooled = sorted(x for d in devices for x in self.latencies_ns[d])
        if not pooled:
            return float("nan")
        return pooled[min(len(pooled) - 1, int(len(pooled) * pct / 100))] / 1000

    def per_io(self, value: float) -> float:
        return value / max(self.ios, 1)


class Session:
    """One back-end process serving one device per load spec, with a front-end for each."""

    def __init__(
        self,
        system: System,
        images: Sequence[Path],
        specs: Sequence[LoadSpec],
        qos: Sequence[str] = (),
    ) -> None:
        self.system = system
        self.specs = list(specs)
        self.qos = list(qos) or [""] * len(specs)
        self.images = images[: len(specs)]
        if len(self.images) < len(specs):
            raise ValueError(f"{len(specs)} devices need as many images")
        self._rundir = tempfile.TemporaryDirectory(prefix="rf-sched-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.devs: list[BlkFrontend] = []
        self.loads: list[BlkLoad] = []

    def __enter__(self) -> Session:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        rundir = self._rundir.name
        socks = [f"{rundir}/blk{i}.sock" for i in range(len(self.specs))]
        log = Path(rundir) / "backend.log"
        devices = list(zip(socks, map(str, self.images), strict=True))
        with open(log, "wb") as logf:
            self.proc = subprocess.Popen(
                self.system.argv(devices, self.qos), stdout=logf, stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        _wait_for_sockets(self.proc, socks, log)
        for i, (sock, spec) in enumerate(zip(socks, self.specs, strict=True)):
            # BlkLoad uses 3 descriptors per request in flight.
            size = max(256, 1 << (3 * spec.qd - 1).bit_length())
            dev = BlkFrontend.open(
                sock, mem_size=MEM_SIZE, queue_size=size, timeout=START_TIMEOUT_S
            )
            self.devs.append(dev)
            self.loads.append(BlkLoad(dev, qd=spec.qd, block_size=spec.block_size, seed=i))

    def close(self) -> None:
        for ld in self.loads:
            ld.close()
        for dev in self.devs:
            dev.close()
        self.loads, self.devs = [], []
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        self._rundir.cleanup()

    def measure(self, seconds: float, active: Sequence[int] | None = None) -> Measurement:
        """Warm up, then drive the `active` devices (default: all) for `seconds`; the
        others stay idle, connected."""
        assert self.proc is not None
        chosen = range(len(self.loads)) if active is None else active
        loads = [self.loads[i] for i in chosen]
        run_load(loads, WARMUP_S)  # thread pools, caches, polling windows and buckets settle
        before = sample_process(self.proc.pid)
        res = run_load(loads, seconds)
        after = sample_process(self.proc.pid)
        # run_load leaves each load's completions in its `latencies` (only those seen before
        # the deadline); idle devices keep what an earlier run left, so they are blanked.
        lat: list[list[int]] = [[] for _ in self.loads]
        for i in chosen:
            lat[i] = self.loads[i].latencies
        return Measurement(
            seconds=seconds,
            latencies_ns=lat,
            errors=res.errors,
            cpu_s=after.cpu_s - before.cpu_s,
            vcsw=_delta(before.vcsw, after.vcsw),
            ivcsw=_delta(before.ivcsw, after.ivcsw),
            fe_cpu_s=res.frontend_cpu_s,
        )


# ----------------------------------------------------------------------------- output


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def print_grid(
    title: str,
    rows: Sequence[str],
    systems: Sequence[str],
    groups: Sequence[tuple[str, str, Callable[[Measurement], float]]],
    cells: dict[tuple[str, str], Measurement],
) -> None:
    """A table with one row per `rows` label and, per metric group, one column per system."""
    width = 9
    print(f"\n{title}")
    head1 = f"{'':<6}" + "".join(
        f" | {name:^{width * len(systems)}}" for name, _, _ in groups
    )
    head2 = f"{'VMs':<6}" + "".join(
        " | " + "".join(f"{s:>{width}}" for s in systems) for _ in groups
    )
    print(head1)
    print(head2)
    print("-" * len(head2))
    for row in rows:
        line = f"{row:<6}"
        for _, fmt, value in groups:
            line += " | "
            for s in systems:
                m = cells.get((row, s))
                line += f"{fmt.format(value(m)):>{width}}" if m else f"{'-':>{width}}"
        print(line)


# -------------------------------------------------------------------------------- cases


def run_scale(
    images: Sequence[Path], seconds: float, io_uring: bool
) -> dict[tuple[str, str], Measurement]:
    cells: dict[tuple[str, str], Measurement] = {}
    for n in SCALE_VMS:
        systems = list(SYSTEMS) + ([QSD_URING] if io_uring and n == 8 else [])
        for system in systems:
            print(f"scale: {n} VMs on {system.name} ...", file=sys.stderr)
            with Session(system, images, [LoadSpec(SCALE_QD)] * n) as s:
                cells[(str(n), system.name)] = s.measure(seconds)
    return cells


def report_scale(cells: dict[tuple[str, str], Measurement]) -> list[str]:
    rows = [str(n) for n in SCALE_VMS]
    names = [s.name for s in SYSTEMS]
    title = f"scale: 4 KiB random reads, QD{SCALE_QD} per VM, aggregate over all VMs"
    print_grid(title, rows, names, [
        ("IOPS", "{:.0f}", lambda m: m.iops()),
        ("back-end CPU us/IO", "{:.2f}", lambda m: m.per_io(m.cpu_s) * 1e6),
        ("ctx switches/IO", "{:.3f}", lambda m: m.per_io(m.vcsw + m.ivcsw)),
    ], cells)
    print_grid("scale (continued)", rows, names, [
        ("p99 us", "{:.0f}", lambda m: m.p_us(99, range(len(m.latencies_ns)))),
        ("voluntary cs/IO", "{:.3f}", lambda m: m.per_io(m.vcsw)),
        ("involuntary cs/IO", "{:.3f}", lambda m: m.per_io(m.ivcsw)),
        ("front-end CPU %", "{:.0f}", lambda m: 100 * m.fe_cpu_s / m.seconds),
    ], cells)
    uring = cells.get(("8", QSD_URING.name))
    if uring is not None:
        print(
            f"qsd aio=io_uring, 8 VMs: {uring.iops():.0f} IOPS, "
            f"{uring.per_io(uring.cpu_s) * 1e6:.2f} CPU us/IO, "
            f"{uring.per_io(uring.vcsw + uring.ivcsw):.3f} ctx switches/IO, "
            f"p99 {uring.p_us(99, range(8)):.0f} us, front-end CPU "
            f"{100 * uring.fe_cpu_s / uring.seconds:.0f}%"
        )
    lines = []
    ok = True
    details = []
    for n in ("8", "16"):
        shared, per_dev = cells.get((n, SHARED.name)), cells.get((n, PER_DEVICE.name))
        if shared is None or per_dev is None:
            continue
        fewer = shared.per_io(shared.vcsw + shared.ivcsw) < per_dev.per_io(
            per_dev.vcsw + per_dev.ivcsw
        )
        ok = ok and shared.iops() >= per_dev.iops() and fewer
        details.append(
            f"{n} VMs {shared.iops() / per_dev.iops():.2f}x the IOPS, "
            f"{shared.per_io(shared.vcsw + shared.ivcsw):.3f} vs "
            f"{per_dev.per_io(per_dev.vcsw + per_dev.ivcsw):.3f} ctx switches/IO"
        )
    if details:
        lines.append(
            f"scale: shared >= per-device at 8 and 16 VMs with fewer context switches: "
            f"{verdict(ok)} ({'; '.join(details)})"
        )
    return lines


def run_fairness(images: Sequence[Path], seconds: float) -> dict[int, Measurement]:
    results = {}
    qos = [f"weight={w}" for w in FAIR_WEIGHTS]
    for qd in FAIR_QDS:
        print(f"fairness: weights 1:2:4 at QD{qd} ...", file=sys.stderr)
        with Session(SHARED, images, [LoadSpec(qd)] * len(FAIR_WEIGHTS), qos) as s:
            results[qd] = s.measure(seconds)
    return results


def report_fairness(results: dict[int, Measurement]) -> list[str]:
    ideal = [100 * w / sum(FAIR_WEIGHTS) for w in FAIR_WEIGHTS]
    print("\nfairness: three VMs, weights 1:2:4, 4 KiB random reads, all saturating (shared)")
    head = (f"{'QD':>4} {'VM':>3} {'weight':>7} {'IOPS':>9} {'share %':>8} {'ideal %':>8} "
            f"{'off %':>7}")
    print(head)
    print("-" * len(head))
    lines = []
    for qd, m in results.items():
        worst = 0.0
        for i, w in enumerate(FAIR_WEIGHTS):
            share = 100 * m.iops(i) / m.iops()
            off = (share - ideal[i]) / ideal[i]
            worst = max(worst, abs(off))
            print(f"{qd:>4} {i:>3} {w:>7} {m.iops(i):>9.0f} {share:>8.1f} {ideal[i]:>8.1f} "
                  f"{100 * off:>+7.1f}")
        shares = "/".join(f"{100 * m.iops(i) / m.iops():.1f}" for i in range(len(FAIR_WEIGHTS)))
        lines.append(
            f"fairness at QD{qd}: shares within 10% of 1:2:4: {verdict(worst <= FAIR_TOLERANCE)} "
            f"({shares}%, worst {100 * worst:.0f}% off)"
        )
    return lines


@dataclass(frozen=True)
class Noisy:
    solo: Measurement  # the seven quiet VMs, the noisy one idle
    mixed: Measurement  # all eight


def run_noisy(images: Sequence[Path], seconds: float) -> dict[str, Noisy]:
    specs = [LoadSpec(64, 64 * KiB)] + [LoadSpec(1)] * QUIET_VMS
    quiet = range(1, QUIET_VMS + 1)
    results = {}
    for system in SYSTEMS:
        print(f"noisy neighbour on {system.name} ...", file=sys.stderr)
        with Session(system, images, specs) as s:
            results[system.name] = Noisy(s.measure(seconds, quiet), s.measure(seconds))
    return results


def report_noisy(results: dict[str, Noisy]) -> list[str]:
    quiet = range(1, QUIET_VMS + 1)
    print(f"\nnoisy neighbour: {QUIET_VMS} quiet VMs at 4 KiB QD1, one noisy VM at 64 KiB QD64")
    head = (f"{'system':<9} {'quiet p50 us':>21} {'quiet p99 us':>21} {'p99':>6} "
            f"{'quiet IOPS (all 7)':>21} {'noisy':>7}")
    sub = (f"{'':<9} {'solo':>10} {'w/ noisy':>10} {'solo':>10} {'w/ noisy':>10} {'ratio':>6} "
           f"{'solo':>10} {'w/ noisy':>10} {'MiB/s':>7}")
    print(head)
    print(sub)
    print("-" * len(sub))
    ratios = {}
    for name, r in results.items():
        ratio = r.mixed.p_us(99, quiet) / r.solo.p_us(99, quiet)
        ratios[name] = ratio
        print(f"{name:<9} {r.solo.p_us(50, quiet):>10.0f} {r.mixed.p_us(50, quiet):>10.0f} "
              f"{r.solo.p_us(99, quiet):>10.0f} {r.mixed.p_us(99, quiet):>10.0f} "
              f"{ratio:>5.1f}x {r.solo.iops():>10.0f} "
              f"{r.mixed.iops() - r.mixed.iops(0):>10.0f} "
              f"{r.mixed.iops(0) * 64 * KiB / MiB:>7.0f}")
    if SHARED.name not in ratios:
        return []
    others = ", ".join(f"{n} {x:.1f}x" for n, x in ratios.items() if n != SHARED.name)
    return [
        f"noisy neighbour: quiet p99 within 2x of solo: "
        f"{verdict(ratios[SHARED.name] <= NOISY_FACTOR)} "
        f"(shared {ratios[SHARED.name]:.1f}x; {others})"
    ]


@dataclass(frozen=True)
class Limits:
    alone: Measurement  # the unlimited VM only
    together: Measurement  # all three


def run_limits(images: Sequence[Path], seconds: float) -> Limits:
    print("limits ...", file=sys.stderr)
    specs = [LoadSpec(32), LoadSpec(8, 64 * KiB), LoadSpec(32)]
    qos = [f"iops={IOPS_LIMIT}", f"bps={BPS_LIMIT // MiB}M", ""]
    with Session(SHARED, images, specs, qos) as s:
        return Limits(s.measure(seconds, [2]), s.measure(seconds))


def report_limits(r: Limits) -> list[str]:
    m = r.together
    iops = m.iops(0)
    bps = m.iops(1) * 64 * KiB
    print("\nlimits: three VMs at once on the shared thread")
    head = f"{'VM':<34} {'limit':>12} {'measured':>12} {'off %':>7}"
    print(head)
    print("-" * len(head))
    iops_off = (iops - IOPS_LIMIT) / IOPS_LIMIT
    bps_off = (bps - BPS_LIMIT) / BPS_LIMIT
    print(f"{'0: iops=2000, 4 KiB QD32':<34} {IOPS_LIMIT:>8} IOPS {iops:>7.0f} IOPS "
          f"{100 * iops_off:>+7.1f}")
    print(f"{'1: bps=20M, 64 KiB QD8':<34} {BPS_LIMIT / MiB:>6.0f} MiB/s {bps / MiB:>6.2f} MiB/s "
          f"{100 * bps_off:>+7.1f}")
    kept = m.iops(2) / r.alone.iops(2)
    print(f"{'2: unlimited, 4 KiB QD32':<34} {'alone':>12} {r.alone.iops(2):>7.0f} IOPS")
    print(f"{'':<34} {'w/ limited':>12} {m.iops(2):>7.0f} IOPS {100 * (kept - 1):>+7.1f}")
    ok = abs(iops_off) <= LIMIT_TOLERANCE and abs(bps_off) <= LIMIT_TOLERANCE
    return [
        f"limits: within 5%: {verdict(ok)} ({iops:.0f} IOPS for {IOPS_LIMIT}, "
        f"{bps / MiB:.2f} MiB/s for {BPS_LIMIT // MiB}; the unlimited VM kept "
        f"{100 * kept:.0f}% of its IOPS alone)"
    ]


# --------------------------------------------------------------------------------- main

CASES = ("scale", "fairness", "noisy", "limits")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="measured time per run")
    ap.add_argument("--only", choices=CASES, action="append", help="run only this case")
    ap.add_argument("--image-size", type=parse_size, default=64 << 20,
                    help="size of each device's image (default 64M; 16 of them)")
    ap.add_argument("--dir", type=Path, help="where the images live (kept); default: a temp dir")
    ap.add_argument("--no-io-uring", action="store_true",
                    help="skip the qemu-storage-daemon aio=io_uring figure at 8 VMs")
    args = ap.parse_args(argv)
    if shutil.which("qemu-storage-daemon") is None:
        ap.error("qemu-storage-daemon not found (apt-get install qemu-utils)")
    cases = args.only or list(CASES)
    # Other work on the host skews every figure here (two threads busy-polling or spinning
    # need two idle CPUs), so the load before and after is printed with them.
    load_before = os.getloadavg()[0]

    workdir = args.dir or Path(tempfile.mkdtemp(prefix="rf-sched-img-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    summary: list[str] = []
    try:
        print(f"preparing images in {workdir} ...", file=sys.stderr)
        images = [workdir / f"disk{i}.raw" for i in range(max(SCALE_VMS))]
        for path in images:
            prepare_image(path, args.image_size)
        # Run everything first, print after: progress goes to stderr, figures to stdout.
        scale = run_scale(images, args.seconds, not args.no_io_uring) if "scale" in cases else {}
        fairness = run_fairness(images, args.seconds) if "fairness" in cases else {}
        noisy = run_noisy(images, args.seconds) if "noisy" in cases else {}
        limits = run_limits(images, args.seconds) if "limits" in cases else None
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"{machine_line()}  1-min load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    print(
        f"{max(SCALE_VMS)} images of {args.image_size >> 20} MiB, page-cached raw; "
        f"{args.seconds:g} s per run after {WARMUP_S:g} s warm-up; one front-end process "
        "drives every device; latency is post-to-reap in the front-end"
    )
    if scale:
        summary += report_scale(scale)
    if fairness:
        summary += report_fairness(fairness)
    if noisy:
        summary += report_noisy(noisy)
    if limits is not None:
        summary += report_limits(limits)
    errors = sum(m.errors for m in scale.values()) + sum(m.errors for m in fairness.values())
    errors += sum(r.solo.errors + r.mixed.errors for r in noisy.values())
    if limits is not None:
        errors += limits.alone.errors + limits.together.errors
    print("\nsummary (targets from issue 4)")
    for line in summary:
        print(f"  {line}")
    if errors:
        print(f"  {errors} requests completed with an error status")
    return 0


if __name__ == "__main__":
    sys.exit(main())
