"""`ringfence top`: a live view of every VM's I/O, one row per VM, refreshed once a second.

It polls the broker's admin socket (`status`), so it needs nothing but the admin group. Rates
are differences between two samples; `render` is pure so that it can be tested on samples.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from broker.admin import admin_request

COLUMNS = ("VM", "GROUP", "DISKS", "IOPS", "MB/s", "KICKS/s", "IRQ/s", "P50us", "P99us",
           "P99.9us", "THROTTLED")


def per_vm(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Sum each VM's devices over every backend; latency is the worst of its devices."""
    vms: dict[str, dict[str, Any]] = {}
    for group, entry in status.get("groups", {}).items():
        for dev in entry.get("devices", []):
            row = vms.setdefault(dev["vm"], {"group": group, "disks": 0, "connected": 0,
                                             "requests": 0, "bytes": 0, "kicks": 0,
                                             "interrupts": 0, "p50_us": 0, "p99_us": 0,
                                             "p999_us": 0, "throttled_ms": 0})
            row["disks"] += 1
            row["connected"] += dev.get("connected", False)
            for key in ("requests", "bytes", "kicks", "interrupts"):
                row[key] += dev.get(key, 0)
            for key in ("p50_us", "p99_us", "p999_us", "throttled_ms"):
                row[key] = max(row[key], dev.get(key, 0))
    return vms


def render(previous: dict[str, Any] | None, current: dict[str, Any], seconds: float) -> str:
    """The table for one refresh: rates since `previous` (None: totals only, rates blank)."""
    before = per_vm(previous) if previous else {}
    now = per_vm(current)
    lines = [f"ringfence top - broker pid {current.get('pid')}  {len(now)} VMs",
             "{:<16} {:<10} {:>5} {:>9} {:>8} {:>8} {:>8} {:>7} {:>7} {:>8} {:>10}".format(
                 *COLUMNS)]
    for name in sorted(now):
        row = now[name]
        old = before.get(name)

        def rate(key: str, scale: float = 1.0, row: dict = row, old: dict | None = old) -> str:
            if old is None or seconds <= 0:
                return "-"
            return f"{(row[key] - old[key]) / seconds / scale:.0f}"

        throttled = "-" if old is None else f"{row['throttled_ms'] - old['throttled_ms']}ms"
        lines.append("{:<16} {:<10} {:>5} {:>9} {:>8} {:>8} {:>8} {:>7} {:>7} {:>8} {:>10}".format(
            name[:16], row["group"][:10], f"{row['connected']}/{row['disks']}",
            rate("requests"), rate("bytes", 1e6), rate("kicks"), rate("interrupts"),
            row["p50_us"], row["p99_us"], row["p999_us"], throttled))
    return "\n".join(lines)


def run_top(socket_path: str, *, interval: float = 1.0, iterations: int | None = None) -> int:
    """Refresh until interrupted (or `iterations` times); clears the screen on a terminal."""
    previous: dict[str, Any] | None = None
    taken = time.monotonic()
    count = 0
    try:
        while iterations is None or count < iterations:
            status = admin_request(socket_path, "status")
            now = time.monotonic()
            if not status.get("ok"):
                print(f"ringfence top: {status.get('error')}", file=sys.stderr)
                return 1
            screen = render(previous, status, now - taken)
            if sys.stdout.isatty():
                sys.stdout.write("\x1b[H\x1b[2J")
            print(screen, flush=True)
            previous, taken = status, now
            count += 1
            if iterations is None or count < iterations:
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
    return 0
