"""The latency histogram: bucket arithmetic and percentiles within the stated error."""

from __future__ import annotations

import random

import pytest

from backend.stats import BUCKETS, LatencyHistogram, QueueStats, bucket_floor, bucket_of


@pytest.mark.parametrize("value", [0, 1, 15, 16, 17, 31, 32, 1000, 123_456, 10**9, 2**39])
def test_every_value_lies_between_its_bucket_floor_and_the_next(value: int) -> None:
    index = bucket_of(value)
    assert bucket_floor(index) <= value < bucket_floor(index + 1)
    assert (value - bucket_floor(index)) <= value / 16


def test_buckets_are_monotonic_and_huge_values_saturate() -> None:
    floors = [bucket_floor(i) for i in range(BUCKETS)]
    assert floors == sorted(set(floors))
    assert bucket_of(2**60) == BUCKETS - 1


def test_percentiles_of_a_known_distribution_are_within_7_percent() -> None:
    rng = random.Random(7)
    values = sorted(rng.randint(1_000, 5_000_000) for _ in range(20_000))
    hist = LatencyHistogram()
    for value in values:
        hist.add(value)
    for pct in (50, 99, 99.9):
        exact = values[int(len(values) * pct / 100) - 1]
        assert abs(hist.percentile(pct) - exact) <= 0.07 * exact
    assert hist.count == len(values) and hist.total == sum(values)


def test_empty_histogram_reports_zero_and_snapshot_has_all_counters() -> None:
    stats = QueueStats()
    stats.requests, stats.kicks = 3, 2
    stats.latency.add(2_000_000, times=3)
    snap = stats.snapshot()
    assert snap["requests"] == 3 and snap["kicks"] == 2 and snap["interrupts"] == 0
    assert 1900 <= snap["p99_us"] <= 2000
    assert LatencyHistogram().percentile(99) == 0
