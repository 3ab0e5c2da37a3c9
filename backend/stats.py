"""Per-queue counters and a latency histogram cheap enough for the I/O thread's hot path.

Latencies go into log-linear buckets (16 per power of two, so any percentile is within about
4.5% of the true value) indexed with int.bit_length: no allocation, no sorting per request.
"""

from __future__ import annotations

SUB_BUCKETS = 16
SUB_SHIFT = 4  # log2(SUB_BUCKETS)
MAX_EXPONENT = 40  # 2**40 ns is about 18 minutes: enough for any request
BUCKETS = (MAX_EXPONENT + 1) * SUB_BUCKETS


def bucket_of(value: int) -> int:
    """The bucket holding `value` (>= 0): exact below 16, then 16 buckets per octave."""
    if value < SUB_BUCKETS:
        return max(value, 0)
    exponent = value.bit_length() - SUB_SHIFT - 1
    if exponent >= MAX_EXPONENT:
        return BUCKETS - 1
    return (exponent + 1) * SUB_BUCKETS + ((value >> exponent) - SUB_BUCKETS)


def bucket_floor(index: int) -> int:
    """The smallest value that lands in bucket `index`."""
    if index < SUB_BUCKETS:
        return index
    exponent = index // SUB_BUCKETS - 1
    return (SUB_BUCKETS + index % SUB_BUCKETS) << exponent


class LatencyHistogram:
    __slots__ = ("count", "counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * BUCKETS
        self.count = 0
        self.total = 0

    def add(self, value: int, times: int = 1) -> None:
        self.counts[bucket_of(value)] += times
        self.count += times
        self.total += value * times

    def percentile(self, pct: float) -> int:
        """The bucket floor at or below which `pct` percent of the samples lie (0 if none)."""
        if not self.count:
            return 0
        rank = max(1, -(-self.count * pct // 100))  # ceil, at least the first sample
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return bucket_floor(index)
        return bucket_floor(BUCKETS - 1)

    def summary_us(self) -> dict[str, float]:
        return {name: round(self.percentile(pct) / 1000, 1)
                for name, pct in (("p50_us", 50), ("p99_us", 99), ("p999_us", 99.9))}


class QueueStats:
    """What one virtqueue has done since it was created."""

    __slots__ = ("bytes", "interrupts", "kicks", "latency", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.kicks = 0
        self.interrupts = 0
        self.latency = LatencyHistogram()

    def snapshot(self) -> dict[str, object]:
        return {"requests": self.requests, "bytes": self.bytes, "kicks": self.kicks,
                "interrupts": self.interrupts, **self.latency.summary_us()}


def combined(queues: list[QueueStats]) -> QueueStats:
    """One device's totals over its queues (histograms merged bucket by bucket)."""
    total = QueueStats()
    counts = total.latency.counts
    for q in queues:
        total.requests += q.requests
        total.bytes += q.bytes
        total.kicks += q.kicks
        total.interrupts += q.interrupts
        total.latency.count += q.latency.count
        total.latency.total += q.latency.total
        for index, count in enumerate(q.latency.counts):
            if count:
                counts[index] += count
    return total
