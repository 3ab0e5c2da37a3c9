"""Real QEMU guests (TCG) using `ringfence dev` as their only disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.devproc import DevBackend
from tests.e2e.guest import (
    MIB,
    blk_check_problems,
    blk_check_script,
    boot_guest,
    raw_image,
    start_guest,
)


@pytest.mark.e2e
def test_guest_writes_and_reads_back_through_ringfence(tmp_path: Path) -> None:
    image = raw_image(tmp_path / "vda.raw", 96)
    sock = str(tmp_path / "vda.sock")
    with DevBackend({sock: image}) as backend:
        result = boot_guest([sock], blk_check_script(["vda"]))
        assert backend.alive()

    assert result.values()["vda.sectors"] == str(96 * MIB // 512)
    assert blk_check_problems(result, {"vda": image}) == [], result.output + backend.log()
    assert "front-end connected" in backend.log()


@pytest.mark.e2e
def test_two_guests_at_once_on_two_sockets_of_one_backend(tmp_path: Path) -> None:
    images = [raw_image(tmp_path / f"guest{i}.raw", 64 + 32 * i) for i in range(2)]
    socks = [str(tmp_path / f"guest{i}.sock") for i in range(2)]
    with DevBackend(dict(zip(socks, images, strict=True))) as backend:
        with (
            start_guest([socks[0]], blk_check_script(["vda"])) as one,
            start_guest([socks[1]], blk_check_script(["vda"])) as two,
        ):
            results = [one.wait(), two.wait()]
        assert backend.alive()

    for result, image, mib in zip(results, images, (64, 96), strict=True):
        assert result.values()["vda.sectors"] == str(mib * MIB // 512)
        assert blk_check_problems(result, {"vda": image}) == [], result.output
    # Same device name and offsets in both guests: the images differ only if each guest's
    # writes went to its own image.
    assert images[0].read_bytes()[: 4 * MIB] == images[1].read_bytes()[: 4 * MIB]


@pytest.mark.e2e
def test_readonly_device_is_readonly_in_the_guest(tmp_path: Path) -> None:
    image = raw_image(tmp_path / "ro.raw", 16)
    image.write_bytes(b"ringfence-readonly".ljust(16 * MIB, b"\0"))
    sock = str(tmp_path / "ro.sock")
    script = (
        "echo RF: ro=$(cat /sys/block/vda/ro)\n"
        "echo RF: head=$(head -c 18 /dev/vda)\n"
        "if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null;"
        " then echo RF: write=ok; else echo RF: write=refused; fi\n"
    )
    with DevBackend({sock: image}, readonly=[sock]):
        result = boot_guest([sock], script)

    values = result.values()
    assert values["ro"] == "1"
    assert values["head"] == "ringfence-readonly"
    assert values["write"] == "refused"
    assert image.read_bytes().startswith(b"ringfence-readonly")
