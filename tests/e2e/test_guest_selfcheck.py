"""The guest harness itself, proven against QEMU's built-in virtio-blk: no ringfence code runs.

When a vhost-user test fails, this baseline passing says the guest, the check script and the
host-side pattern are sound and the fault is in the back-end.
"""

import hashlib
from pathlib import Path

import pytest

from tests.e2e.guest import (
    MIB,
    GuestResult,
    blk_check_problems,
    blk_check_script,
    boot_guest,
    pattern_bytes,
    raw_image,
    start_guest,
)


@pytest.mark.e2e
def test_builtin_virtio_disks_round_trip_the_check_pattern(tmp_path: Path) -> None:
    images = {device: raw_image(tmp_path / f"{device}.raw", 64) for device in ("vda", "vdb")}

    result = boot_guest(script=blk_check_script(list(images)), drives=list(images.values()))

    assert blk_check_problems(result, images) == [], result.output
    assert result.values()["vdb.sectors"] == str(64 * MIB // 512)


@pytest.mark.e2e
def test_two_guests_run_at_once_and_report_their_own_status() -> None:
    with (
        start_guest(script="echo RF: guest=one") as one,
        start_guest(script="echo RF: guest=two; exit 3") as two,
    ):
        results = [one.wait(), two.wait()]

    assert [r.values()["guest"] for r in results] == ["one", "two"]
    assert [r.exit_status for r in results] == [0, 3]


@pytest.mark.e2e
def test_hung_guest_is_killed_at_the_timeout() -> None:
    result = boot_guest(script="sleep 600", timeout=2)

    assert result.timed_out
    assert result.exit_status is None


def test_check_reports_bytes_missing_from_the_image(tmp_path: Path) -> None:
    image = raw_image(tmp_path / "vda.raw", 8)
    with open(image, "r+b") as f:
        f.write(pattern_bytes("vda", 0, 4))
    # The guest saw what it expected, but only the first region reached the image.
    lines = [
        f"RF: vda.off{offset}.{side}={hashlib.sha256(pattern_bytes('vda', offset, 4)).hexdigest()}"
        for offset in (0, 4)
        for side in ("written", "read")
    ]
    result = GuestResult(
        output="\n".join([*lines, "RF-EXIT 0"]),
        exit_status=0,
        qemu_returncode=0,
        qemu_stderr="",
        timed_out=False,
        elapsed=0.0,
    )

    assert blk_check_problems(result, {"vda": image}, offsets_mib=(0, 4)) == [
        f"vda at 4 MiB: {image} lacks the pattern"
    ]
