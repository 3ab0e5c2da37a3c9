"""`ringfence top`: a live view of every VM's I/O, one row per VM, refreshed once a second.

It polls the broker's admin socket (`status`), so it needs nothing but the admin group. Rates
are differences between two samples; `render` is pure so that it can be tested on samples.
Disk columns sum a VM's disks, NIC columns its NICs (frames and drops in both directions);
kicks and interrupts are of both.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from broker.admin import admin_request

# (title, width): the first two left-aligned, the rest right-aligned.
LAYOUT = (("VM", 16), ("GROUP", 10), ("DISKS", 5), ("IOPS", 9), ("MB/s", 8), ("NICS", 5),
          ("RX/s", 8), ("TX/s", 8), ("NETMB/s", 8), ("DROP/s", 7), ("KICKS/s", 8),
          ("IRQ/s", 8), ("P50us", 7), ("P99us", 7), ("P99.9us", 8), ("THROTTLED", 10))
COLUMNS = tuple(title for title, _width in LAYOUT)
_ROW = " ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, (_t, w) in enumerate(LAYOUT))


def _new_row(group: str) -> dict[str, Any]:
    return {"group": group, "disks": 0, "connected": 0, "requests": 0, "bytes": 0, "kicks": 0,
            "interrupts": 0, "p50_us": 0, "p99_us": 0, "p999_us": 0, "throttled_ms": 0,
            "nics": 0, "nics_connected": 0, "rx_frames": 0, "tx_frames": 0, "net_bytes": 0,
            "drops": 0}


def per_vm(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Sum each VM's devices over every backend; latency is the worst of its disks."""
    vms: dict[str, dict[str, Any]] = {}
    for group, entry in status.get("groups", {}).items():
        for dev in entry.get("devices", []):
            row = vms.setdefault(dev["vm"], _new_row(group))
            row["disks"] += 1
            row["connected"] += dev.get("connected", False)
            for key in ("requests", "bytes", "kicks", "interrupts"):
                row[key] += dev.get(key, 0)
            for key in ("p50_us", "p99_us", "p999_us", "throttled_ms"):
                row[key] = max(row[key], dev.get(key, 0))
        for nic in entry.get("nics", []):  # absent from a broker older than NIC statistics
            row = vms.setdefault(nic["vm"], _new_row(group))
            row["nics"] += 1
            row["nics_connected"] += nic.get("connected", False)
            for key in ("rx_frames", "tx_frames", "kicks", "interrupts"):
                row[key] += nic.get(key, 0)
            row["net_bytes"] += nic.get("rx_bytes", 0) + nic.get("tx_bytes", 0)
            row["drops"] += nic.get("rx_dropped", 0) + nic.get("tx_dropped", 0)
    return vms


def render(previous: dict[str, Any] | None, current: dict[str, Any], seconds: float) -> str:
    """The table for one refresh: rates since `previous` (None: totals only, rates blank)."""
    before = per_vm(previous) if previous else {}
    now = per_vm(current)
    lines = [f"ringfence top - broker pid {current.get('pid')}  {len(now)} VMs",
             _ROW.format(*COLUMNS)]
    for name in sorted(now):
        row = now[name]
        old = before.get(name)

        def rate(key: str, scale: float = 1.0, row: dict = row, old: dict | None = old) -> str:
            if old is None or seconds <= 0:
                return "-"
            return f"{(row[key] - old[key]) / seconds / scale:.0f}"

        throttled = "-" if old is None else f"{row['throttled_ms'] - old['throttled_ms']}ms"
        disks = f"{row['connected']}/{row['disks']}" if row["disks"] else "-"
        nics = f"{row['nics_connected']}/{row['nics']}" if row["nics"] else "-"
        lines.append(_ROW.format(
            name[:16], row["group"][:10], disks, rate("requests"), rate("bytes", 1e6), nics,
            rate("rx_frames"), rate("tx_frames"), rate("net_bytes", 1e6), rate("drops"),
            rate("kicks"), rate("interrupts"), row["p50_us"], row["p99_us"], row["p999_us"],
            throttled))
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
