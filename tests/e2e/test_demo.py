"""The README's quick start runs: `scripts/demo.py` boots a guest through the whole privilege
split, checks its disk and network I/O and the audit, and says OK."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.devproc import REPO


@pytest.mark.e2e
def test_quick_start_demo_checks_disk_and_network_io_and_says_ok() -> None:
    result = subprocess.run([sys.executable, "scripts/demo.py"], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "demo: OK:" in result.stdout
    assert "guest: ping ok, received 16777216 bytes" in result.stdout
    assert "nic0   connected" in result.stdout, result.stdout  # `ringfence status` shows it
