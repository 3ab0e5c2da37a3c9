"""`ringfence top` and `ringfence status` rendering (broker/top.py, backend/cli.py): pure, on
status samples shaped like the broker's admin answer."""

from __future__ import annotations

import copy
from typing import Any

from backend.cli import format_status
from broker.top import COLUMNS, per_vm, render


def disk(vm: str, index: int, **counters: int) -> dict[str, Any]:
    return {"vm": vm, "disk": index, "socket": f"/run/rf/vms/{vm}/disk{index}.sock",
            "connected": True, "requests": 0, "bytes": 0, "kicks": 0, "interrupts": 0,
            "p50_us": 10, "p99_us": 50, "p999_us": 90, "throttled_ms": 0, **counters}


def nic(vm: str, index: int, *, queues: int = 1, drops: list[dict[str, Any]] | None = None,
        connected: bool = True, **counters: int) -> dict[str, Any]:
    return {"vm": vm, "nic": index, "socket": f"/run/rf/vms/{vm}/nic{index}.sock",
            "tap": f"rf-{vm}-{index}", "connected": connected, "queues": queues,
            "tx_frames": 0, "tx_bytes": 0, "rx_frames": 0, "rx_bytes": 0, "tx_dropped": 0,
            "rx_dropped": 0, "kicks": 0, "interrupts": 0, "drops": drops or [],
            "pairs": [{"rx_frames": 0, "tx_frames": 0} for _ in range(queues)], **counters}


def status(devices: list[dict[str, Any]], nics: list[dict[str, Any]] | None = None
           ) -> dict[str, Any]:
    entry: dict[str, Any] = {"pid": 4242, "devices": devices}
    if nics is not None:
        entry["nics"] = nics
    return {"ok": True, "pid": 1000, "policy": "/etc/ringfence/policy.toml",
            "groups": {"tenant-a": entry}}


def row(screen: str, vm: str) -> dict[str, str]:
    """One VM's row as {column title: cell}."""
    (line,) = [line for line in screen.splitlines() if line.startswith(vm + " ")]
    return dict(zip(COLUMNS, line.split(), strict=True))


def test_a_vm_with_disks_and_nics_is_one_row_with_both_summed() -> None:
    sample = status([disk("web1", 0, requests=100, kicks=5, interrupts=4)],
                    [nic("web1", 0, rx_frames=10, tx_frames=20, rx_bytes=1000, tx_bytes=2000,
                         kicks=3, interrupts=2, tx_dropped=1),
                     nic("web1", 1, connected=False, rx_frames=1)])
    (vm,) = per_vm(sample).values()
    assert (vm["disks"], vm["nics"], vm["nics_connected"]) == (1, 2, 1)
    assert (vm["rx_frames"], vm["tx_frames"], vm["net_bytes"], vm["drops"]) == (11, 20, 3000, 1)
    assert (vm["kicks"], vm["interrupts"]) == (8, 6)  # disks' and NICs'


def test_rates_of_nic_frames_bytes_and_drops_per_second() -> None:
    before = status([disk("web1", 0)], [nic("web1", 0)])
    after = copy.deepcopy(before)
    after["groups"]["tenant-a"]["nics"][0].update(
        rx_frames=2000, tx_frames=1000, rx_bytes=3_000_000, tx_bytes=1_000_000, rx_dropped=6,
        tx_dropped=4, kicks=50, interrupts=30)
    cells = row(render(before, after, 2.0), "web1")
    assert (cells["NICS"], cells["RX/s"], cells["TX/s"], cells["NETMB/s"], cells["DROP/s"]) == (
        "1/1", "1000", "500", "2", "5")
    assert (cells["KICKS/s"], cells["IRQ/s"]) == ("25", "15")
    assert (cells["DISKS"], cells["IOPS"]) == ("1/1", "0")


def test_first_sample_shows_no_rates_and_a_nic_only_vm_gets_a_row() -> None:
    cells = row(render(None, status([], [nic("db1", 0, rx_frames=5)]), 1.0), "db1")
    assert (cells["DISKS"], cells["NICS"], cells["RX/s"], cells["DROP/s"]) == ("-", "1/1", "-",
                                                                              "-")


def test_a_status_without_nics_still_renders() -> None:
    """A status from before NIC statistics (no "nics" key) is still one row per VM."""
    cells = row(render(status([disk("web1", 0)]), status([disk("web1", 0, requests=10)]), 1.0),
                "web1")
    assert (cells["IOPS"], cells["NICS"], cells["RX/s"]) == ("10", "-", "0")


def test_status_text_has_a_line_per_nic_with_drops_by_reason_and_pairs() -> None:
    sample = status([disk("web1", 0, requests=7)], [nic(
        "web1", 0, queues=2, rx_frames=12, tx_frames=9, rx_bytes=900, tx_bytes=600, kicks=4,
        interrupts=3, tx_dropped=2, drops=[{"reason": "oversized", "count": 1},
                                           {"reason": "short", "count": 1}])])
    sample["groups"]["tenant-a"]["nics"][0]["pairs"] = [{"rx_frames": 8, "tx_frames": 5},
                                                        {"rx_frames": 4, "tx_frames": 4}]
    text = format_status(sample)
    assert "vm web1             disk0" in text
    assert ("vm web1             nic0   connected         tap rf-web1-0 (2 queue pairs)  "
            "rx 12 frames 900 bytes  tx 9 frames 600 bytes  4 kicks  3 interrupts") in text
    assert "dropped: rx 0, tx 2 (oversized 1, short 1)" in text
    assert "per pair (rx/tx frames): 0: 8/5  1: 4/4" in text


def test_status_text_of_a_single_queue_nic_has_no_pair_line() -> None:
    text = format_status(status([], [nic("web1", 0, connected=False)]))
    assert "nic0   waiting for QEMU  tap rf-web1-0 (1 queue pair)" in text
    assert "dropped: rx 0, tx 0" in text and "per pair" not in text
