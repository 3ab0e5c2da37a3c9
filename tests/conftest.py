"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest

from broker.policy import ALLOW_UNSIGNED_ENV


@pytest.fixture
def unsigned_policies_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests that write unsigned development policies (allow_unsigned = true), which only
    an environment with RINGFENCE_ALLOW_UNSIGNED=1 honours; commands they run inherit it."""
    monkeypatch.setenv(ALLOW_UNSIGNED_ENV, "1")
