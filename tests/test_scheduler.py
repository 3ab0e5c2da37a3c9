"""The shared I/O thread's scheduler (backend/scheduler.py), driven by a fake clock."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Hashable

import pytest

from backend.scheduler import PRIORITIES, Qos, Scheduler

US = 1_000
MS = 1_000_000
S = 1_000_000_000
KIB = 1024
T0 = 1 * S  # a fake monotonic clock starts somewhere after zero


class Loop:
    """The server's loop as the scheduler's protocol describes it, over a fake clock: serve
    batches of the selected queue, each request taking `per_request_ns`, keeping saturated
    queues at their depth (new requests arrive as soon as others complete)."""

    def __init__(self, sched: Scheduler, *, per_request_ns: int = 5 * US, batch: int = 8) -> None:
        self.sched = sched
        self.now = T0
        self.per_request_ns = per_request_ns
        self.batch = batch
        self.depth: dict[Hashable, int] = {}
        self.size: dict[Hashable, int] = {}
        self.served: Counter[Hashable] = Counter()
        self.bytes: Counter[Hashable] = Counter()

    def saturate(self, key: Hashable, *, depth: int = 64, size: int = 4 * KIB) -> None:
        self.depth[key] = depth
        self.size[key] = size
        self.sched.set_pending(key, depth, self.now)

    def stop(self, key: Hashable) -> None:
        del self.depth[key]
        self.sched.set_pending(key, 0, self.now)

    def run_until(self, end: int) -> None:
        sched = self.sched
        while self.now < end:
            key = sched.select_queue_to_process(self.now)
            if key is None:
                deadline = sched.next_deadline(self.now)
                self.now = end if deadline is None else min(deadline, end)
                continue
            sched.start_turn(key, self.now)
            while True:
                n = min(self.batch, sched.turn_budget(key, self.now), sched.pending(key))
                assert n >= 1, "a selected queue's turn must be allowed a request"
                self.now += n * self.per_request_ns
                sched.account(key, n, n * self.size[key], self.now)
                self.served[key] += n
                self.bytes[key] += n * self.size[key]
                sched.set_pending(key, self.depth.get(key, sched.pending(key)), self.now)
                if sched.should_change_queue(key, self.now):
                    break

    def served_during(self, end: int) -> Counter[Hashable]:
        before = Counter(self.served)
        self.run_until(end)
        return self.served - before


def make(*vms: tuple[str, Qos], queues_per_vm: int = 1, **settings: int) -> Scheduler:
    """A scheduler with the given VMs; VM "a" gets queues "a0", "a1", ..."""
    sched = Scheduler(**settings)
    for name, qos in vms:
        sched.add_vm(name, qos)
        for i in range(queues_per_vm):
            sched.add_queue(f"{name}{i}", name)
    return sched


def assert_shares(served: Counter[Hashable], expected: dict[Hashable, float], tol: float) -> None:
    total = sum(served[k] for k in expected)
    weight_total = sum(expected.values())
    for key, weight in expected.items():
        share, want = served[key] / total, weight / weight_total
        assert abs(share - want) <= tol * want, (key, share, want, dict(served))


def serve(sched: Scheduler, key: str, n: int, now: int, refill: int | None = None) -> None:
    sched.account(key, n, n * 4 * KIB, now)
    if refill is not None:
        sched.set_pending(key, refill, now)


# --- QoS and registration ---------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"weight": 0},
    {"weight": 1.5},
    {"weight": True},
    {"priority": "urgent"},
    {"iops_limit": 0},
    {"bps_limit": -1},
    {"iops_limit": 2.5},
    {"burst": 0.5},
    {"burst": "2x"},
])
def test_qos_rejects_invalid_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="QoS"):
        Qos(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [
    {"latency_target_ns": 0},
    {"latency_target_ns": 2 * MS, "starvation_ns": 1 * MS},
    {"min_turn_requests": 0},
    {"min_turn_requests": 64, "max_turn_requests": 32},
    {"request_cost_bytes": -1},
])
def test_scheduler_rejects_inconsistent_settings(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Scheduler(**kwargs)


def test_duplicate_vm_or_queue_is_refused_and_unknown_keys_raise_key_error() -> None:
    sched = make(("a", Qos()))
    with pytest.raises(ValueError, match="already"):
        sched.add_vm("a", Qos())
    with pytest.raises(ValueError, match="already"):
        sched.add_queue("a0", "a")
    with pytest.raises(KeyError):
        sched.add_queue("b0", "b")
    with pytest.raises(KeyError):
        sched.set_pending("nope", 1, T0)
    with pytest.raises(KeyError):
        sched.throttled_until("b", T0)


def test_removed_queues_and_vms_are_never_selected() -> None:
    sched = make(("a", Qos()), ("b", Qos(priority="high")), queues_per_vm=2)
    for key in ("a0", "a1", "b0", "b1"):
        sched.set_pending(key, 3, T0)
    sched.remove_queue("b0", T0)
    assert sched.select_queue_to_process(T0) == "b1"
    sched.start_turn("b1", T0)
    sched.remove_vm("b", T0)
    with pytest.raises(KeyError):
        sched.pending("b1")
    assert sched.select_queue_to_process(T0) in ("a0", "a1")


# --- pending work and request age ---------------------------------------------------------------


def test_nothing_pending_selects_nothing() -> None:
    sched = make(("a", Qos()), ("b", Qos()))
    assert sched.select_queue_to_process(T0) is None
    assert sched.next_deadline(T0) is None
    sched.set_pending("a0", 2, T0)
    sched.set_pending("a0", 0, T0 + 1)
    assert sched.select_queue_to_process(T0 + 2) is None


def test_oldest_arrival_follows_service_through_arrival_segments() -> None:
    sched = make(("a", Qos()))
    assert sched.oldest_arrival("a0") is None
    sched.set_pending("a0", 4, T0)
    sched.set_pending("a0", 6, T0 + 10)
    sched.set_pending("a0", 9, T0 + 20)
    assert sched.oldest_arrival("a0") == T0
    sched.account("a0", 3, 0, T0 + 30)  # one of the first four is left
    assert (sched.pending("a0"), sched.oldest_arrival("a0")) == (6, T0)
    sched.account("a0", 1, 0, T0 + 31)
    assert sched.oldest_arrival("a0") == T0 + 10
    sched.account("a0", 2, 0, T0 + 32)
    assert sched.oldest_arrival("a0") == T0 + 20
    sched.account("a0", 50, 0, T0 + 33)  # more than pending: the server served fresh arrivals
    assert (sched.pending("a0"), sched.oldest_arrival("a0")) == (0, None)


def test_a_decrease_reported_without_account_drops_the_oldest_requests() -> None:
    sched = make(("a", Qos()))
    sched.set_pending("a0", 2, T0)
    sched.set_pending("a0", 5, T0 + 10)
    sched.set_pending("a0", 3, T0 + 20)
    assert sched.oldest_arrival("a0") == T0 + 10


def test_more_arrival_bursts_than_segments_never_make_a_request_look_younger() -> None:
    sched = make(("a", Qos()))
    for i in range(20):
        sched.set_pending("a0", i + 1, T0 + i)
    for served in range(20):
        # request `served` arrived at T0 + served; the scheduler may only think it older
        assert sched.oldest_arrival("a0") <= T0 + served
        sched.account("a0", 1, 0, T0 + 100)
    assert sched.oldest_arrival("a0") is None


# --- selection -----------------------------------------------------------------------------------


def test_strict_priority_classes_high_then_normal_then_low() -> None:
    sched = make(("lo", Qos(priority="low")), ("no", Qos()), ("hi", Qos(priority="high")))
    for key in ("lo0", "no0", "hi0"):
        sched.set_pending(key, 1, T0)
    assert sched.select_queue_to_process(T0) == "hi0"
    sched.account("hi0", 1, 0, T0)
    assert sched.select_queue_to_process(T0) == "no0"
    sched.account("no0", 1, 0, T0)
    assert sched.select_queue_to_process(T0) == "lo0"


def test_least_virtual_time_wins_within_a_class_and_time_advances_by_cost_over_weight() -> None:
    sched = make(("a", Qos(weight=1)), ("b", Qos(weight=2)), request_cost_bytes=0)
    sched.set_pending("a0", 1000, T0)
    sched.set_pending("b0", 1000, T0)
    sched.account("a0", 100, 100 * 4096, T0 + 1)  # virtual time 100 pages
    sched.account("b0", 150, 150 * 4096, T0 + 2)  # 150 pages / weight 2 = 75
    assert sched.select_queue_to_process(T0 + 3) == "b0"
    sched.account("b0", 60, 60 * 4096, T0 + 4)  # 105
    assert sched.select_queue_to_process(T0 + 5) == "a0"


def test_a_vms_queue_that_has_waited_longest_is_selected_first() -> None:
    sched = make(("a", Qos()), queues_per_vm=2)
    sched.set_pending("a0", 5, T0)
    sched.set_pending("a1", 5, T0 + 10)
    assert sched.select_queue_to_process(T0 + 20) == "a0"
    sched.account("a0", 1, 0, T0 + 20)  # a0 was just served; a1 has waited since T0 + 10
    assert sched.select_queue_to_process(T0 + 20) == "a1"


def test_weights_1_2_4_get_service_in_proportion_within_5_percent() -> None:
    sched = make(("a", Qos(weight=1)), ("b", Qos(weight=2)), ("c", Qos(weight=4)))
    loop = Loop(sched)
    for key in ("a0", "b0", "c0"):
        loop.saturate(key)
    served = loop.served_during(T0 + 1 * S)
    assert_shares(served, {"a0": 1, "b0": 2, "c0": 4}, 0.05)


def test_fair_shares_count_bytes_plus_a_fixed_cost_per_request() -> None:
    sched = make(("big", Qos()), ("small", Qos()), request_cost_bytes=4 * KIB)
    loop = Loop(sched)
    loop.saturate("big0", size=64 * KIB)
    loop.saturate("small0", size=4 * KIB)
    served = loop.served_during(T0 + 1 * S)
    # equal cost: 68 KiB per big request against 8 KiB per small one
    cost = Counter({"big0": served["big0"] * 68, "small0": served["small0"] * 8})
    assert_shares(cost, {"big0": 1, "small0": 1}, 0.05)


def test_a_vm_that_was_idle_gets_its_share_not_the_service_it_missed() -> None:
    sched = make(("busy", Qos()), ("late", Qos()))
    loop = Loop(sched)
    loop.saturate("busy0")
    loop.run_until(T0 + 1 * S)
    loop.saturate("late0")
    served = loop.served_during(loop.now + 100 * MS)
    assert_shares(served, {"busy0": 1, "late0": 1}, 0.1)


def test_a_weight_change_applies_to_future_service_live() -> None:
    sched = make(("a", Qos()), ("b", Qos()))
    loop = Loop(sched)
    loop.saturate("a0")
    loop.saturate("b0")
    assert_shares(loop.served_during(T0 + 500 * MS), {"a0": 1, "b0": 1}, 0.05)
    sched.set_qos("a", Qos(weight=3), loop.now)
    assert_shares(loop.served_during(loop.now + 1 * S), {"a0": 3, "b0": 1}, 0.05)


def test_a_weight_change_rescales_how_far_ahead_the_vm_is() -> None:
    sched = make(("a", Qos()), ("b", Qos()), request_cost_bytes=1)
    sched.set_pending("a0", 100, T0)
    sched.set_pending("b0", 200, T0)
    sched.account("b0", 100, 0, T0)  # b is 100 requests ahead at weight 1...
    sched.start_turn("a0", T0)
    sched.set_qos("b", Qos(weight=4), T0)  # ...which is 25 at weight 4
    sched.account("a0", 24, 0, T0)
    assert sched.select_queue_to_process(T0) == "a0"
    sched.account("a0", 2, 0, T0)
    assert sched.select_queue_to_process(T0) == "b0"


def test_a_priority_change_moves_the_vm_to_its_new_class_live() -> None:
    sched = make(("a", Qos()), ("b", Qos()))
    sched.set_pending("a0", 5, T0)
    sched.set_pending("b0", 5, T0)
    sched.account("b0", 1, 0, T0)
    assert sched.select_queue_to_process(T0) == "a0"
    sched.set_qos("b", Qos(priority="high"), T0)
    assert sched.select_queue_to_process(T0) == "b0"
    sched.set_qos("b", Qos(priority="low"), T0)
    sched.account("a0", 5, 0, T0)
    sched.set_pending("a0", 5, T0)
    assert sched.select_queue_to_process(T0) == "a0"


# --- aging across classes -------------------------------------------------------------------------


def test_a_low_priority_queue_is_aged_past_a_saturating_high_priority_vm() -> None:
    starvation_ns = 2 * MS
    sched = make(("hi", Qos(priority="high")), ("lo", Qos(priority="low")),
                 starvation_ns=starvation_ns)
    loop = Loop(sched, batch=8)
    loop.saturate("hi0")
    loop.size["lo0"] = 4 * KIB
    sched.set_pending("lo0", 1, loop.now)
    arrival = loop.now
    loop.run_until(arrival + starvation_ns - 10 * US)
    assert loop.served["lo0"] == 0  # strict priority until it starves
    batch_ns = 8 * loop.per_request_ns
    loop.run_until(arrival + starvation_ns + 2 * batch_ns)
    assert loop.served["lo0"] == 1  # served within starvation_ns + N (= 2) batches


def test_a_vm_becoming_busy_is_not_placed_behind_a_vm_served_only_through_aging() -> None:
    # x's weight is so low that it runs only when it starves, and its virtual time runs far
    # ahead of its class; z, arriving later, must be placed against y, which is served fairly.
    sched = make(("x", Qos(weight=1)), ("y", Qos(weight=1000)), ("z", Qos()))
    loop = Loop(sched)
    loop.saturate("x0")
    loop.saturate("y0")
    loop.run_until(T0 + 1 * S)
    assert loop.served["x0"] > 0
    loop.size["z0"] = 4 * KIB
    sched.set_pending("z0", 1, loop.now)
    loop.run_until(loop.now + 1 * MS)  # the latency target, a tenth of starvation_ns
    assert loop.served["z0"] == 1


def test_starving_queues_are_served_longest_waiting_first() -> None:
    sched = make(("hi", Qos(priority="high")), ("lo", Qos(priority="low")), queues_per_vm=2,
                 starvation_ns=1 * MS)
    sched.set_pending("hi0", 64, T0)
    sched.set_pending("lo1", 1, T0)
    sched.set_pending("lo0", 1, T0 + 100 * US)
    now = T0 + 900 * US
    sched.account("hi0", 1, 0, now)
    assert sched.select_queue_to_process(now) == "hi0"
    now = T0 + 1200 * US
    assert sched.select_queue_to_process(now) == "lo1"
    sched.account("lo1", 1, 0, now)
    assert sched.select_queue_to_process(now) == "lo0"


# --- ending a turn --------------------------------------------------------------------------------


def test_a_turn_runs_to_max_turn_requests_when_no_other_queue_is_pending() -> None:
    sched = make(("a", Qos()), ("b", Qos()), max_turn_requests=16, min_turn_requests=4)
    sched.set_pending("a0", 100, T0)
    sched.start_turn("a0", T0)
    for i in range(1, 4):
        serve(sched, "a0", 4, T0 + i * 10 * MS)  # long past the latency target: nobody waits
        assert not sched.should_change_queue("a0", T0 + i * 10 * MS)
    serve(sched, "a0", 4, T0 + 40 * MS)
    assert sched.should_change_queue("a0", T0 + 40 * MS)


def test_a_turn_ends_after_the_fair_quantum_when_a_same_class_queue_is_pending() -> None:
    sched = make(("a", Qos()), ("b", Qos()), max_turn_requests=64, min_turn_requests=8)
    sched.set_pending("a0", 100, T0)
    sched.start_turn("a0", T0)
    sched.set_pending("b0", 1, T0 + 1)
    serve(sched, "a0", 4, T0 + 2)
    assert not sched.should_change_queue("a0", T0 + 2)
    serve(sched, "a0", 4, T0 + 3)
    assert sched.should_change_queue("a0", T0 + 3)


def test_large_requests_end_a_contended_turn_by_cost_not_by_count() -> None:
    """A VM reading 64 KiB at a time holds the thread about as long per turn as one reading
    4 KiB: its quantum of 8 requests of 4 KiB (plus the 16 KiB fixed cost each) is 160 KiB of
    cost, which two 64 KiB requests (80 KiB of cost each) use up."""
    sched = make(("a", Qos()), ("b", Qos()), max_turn_requests=64, min_turn_requests=8)
    sched.set_pending("a0", 100, T0)
    sched.start_turn("a0", T0)
    sched.set_pending("b0", 1, T0 + 1)
    sched.account("a0", 1, 64 * KIB, T0 + 2)
    assert not sched.should_change_queue("a0", T0 + 2)
    assert sched.turn_budget("a0", T0 + 2) == 1  # the next batch is sized by cost, not 7
    sched.account("a0", 1, 64 * KIB, T0 + 3)
    assert sched.should_change_queue("a0", T0 + 3)
    assert sched.turn_budget("a0", T0 + 3) == 0


def test_a_lone_queue_of_large_requests_keeps_its_long_turn() -> None:
    sched = make(("a", Qos()), ("b", Qos()), max_turn_requests=64, min_turn_requests=8)
    sched.set_pending("a0", 100, T0)
    sched.start_turn("a0", T0)
    sched.account("a0", 16, 16 * 64 * KIB, T0 + 1)
    assert not sched.should_change_queue("a0", T0 + 1)
    assert sched.turn_budget("a0", T0 + 1) == 64 - 16  # nobody waits: cost does not matter


def test_lower_priority_pending_work_does_not_shorten_a_turn() -> None:
    sched = make(("hi", Qos(priority="high")), ("lo", Qos(priority="low")),
                 max_turn_requests=32, min_turn_requests=4)
    sched.set_pending("hi0", 100, T0)
    sched.set_pending("lo0", 100, T0)
    sched.start_turn("hi0", T0)
    for i in range(1, 8):
        serve(sched, "hi0", 4, T0 + i * 10 * US)
        assert not sched.should_change_queue("hi0", T0 + i * 10 * US)
    serve(sched, "hi0", 4, T0 + 80 * US)
    assert sched.should_change_queue("hi0", T0 + 80 * US)


def test_high_priority_queue_preempts_a_normal_turn() -> None:
    sched = make(("no", Qos()), ("hi", Qos(priority="high")), min_turn_requests=32)
    sched.set_pending("no0", 100, T0)
    sched.start_turn("no0", T0)
    serve(sched, "no0", 1, T0 + 10)
    assert not sched.should_change_queue("no0", T0 + 10)
    sched.set_pending("hi0", 1, T0 + 15)
    serve(sched, "no0", 1, T0 + 20)
    assert sched.should_change_queue("no0", T0 + 20)
    assert sched.select_queue_to_process(T0 + 20) == "hi0"


def test_a_turn_ends_early_when_a_queue_owed_service_passes_the_latency_target() -> None:
    sched = make(("a", Qos()), ("b", Qos()), latency_target_ns=1 * MS, min_turn_requests=100,
                 max_turn_requests=200)
    sched.set_pending("a0", 100, T0)
    sched.set_pending("b0", 100, T0)
    assert sched.select_queue_to_process(T0) == "a0"
    sched.start_turn("a0", T0)
    now = T0
    while now < T0 + 1 * MS - 100 * US:
        now += 100 * US
        serve(sched, "a0", 1, now)
        assert not sched.should_change_queue("a0", now)
    now += 100 * US  # b0 has waited 1 ms, far fewer than 100 requests into this turn
    serve(sched, "a0", 1, now)
    assert sched.should_change_queue("a0", now)
    assert sched.select_queue_to_process(now) == "b0"


def test_an_overdue_queue_whose_vm_is_ahead_in_virtual_time_does_not_shorten_a_turn() -> None:
    sched = make(("a", Qos()), ("b", Qos()), latency_target_ns=1 * MS, starvation_ns=1 * S,
                 min_turn_requests=20, max_turn_requests=200)
    sched.set_pending("a0", 100, T0)
    sched.set_pending("b0", 100, T0)
    serve(sched, "b0", 50, T0, refill=100)  # b is 50 requests ahead
    sched.start_turn("a0", T0)
    now = T0
    for _ in range(19):
        now += 1 * MS  # b0 is overdue after every one of these batches
        serve(sched, "a0", 1, now)
        assert not sched.should_change_queue("a0", now)
    serve(sched, "a0", 1, now)
    assert sched.should_change_queue("a0", now)  # the quantum still ends it


def test_under_latency_pressure_the_turn_passes_to_the_most_owed_vm() -> None:
    sched = make(("a", Qos()), ("b", Qos()), ("c", Qos()), latency_target_ns=1 * MS,
                 starvation_ns=1 * S, min_turn_requests=100, max_turn_requests=200,
                 request_cost_bytes=0)
    sched.set_pending("b0", 100, T0)
    serve(sched, "b0", 50, T0, refill=100)  # b is far ahead, and will be overdue
    sched.set_pending("a0", 100, T0)
    assert sched.select_queue_to_process(T0) == "a0"
    sched.start_turn("a0", T0)
    serve(sched, "a0", 5, T0 + 2 * MS)  # b is overdue now, but owed nothing
    assert not sched.should_change_queue("a0", T0 + 2 * MS)
    sched.set_pending("c0", 10, T0 + 2 * MS)  # c starts at the class clock: behind a
    serve(sched, "a0", 1, T0 + 2 * MS)
    assert sched.should_change_queue("a0", T0 + 2 * MS)  # a passed c, and b is overdue
    assert sched.select_queue_to_process(T0 + 2 * MS) == "c0"


def test_a_turn_ends_when_its_queue_drains() -> None:
    sched = make(("a", Qos()), queues_per_vm=2)
    sched.set_pending("a0", 3, T0)
    sched.set_pending("a1", 3, T0)
    sched.start_turn("a0", T0)
    serve(sched, "a0", 2, T0 + 1)
    assert not sched.should_change_queue("a0", T0 + 1)
    serve(sched, "a0", 1, T0 + 2)
    assert sched.should_change_queue("a0", T0 + 2)
    assert sched.should_change_queue("a1", T0 + 2)  # not in a turn: go and select one


def test_a_turn_ends_when_the_vm_runs_out_of_tokens() -> None:
    sched = make(("a", Qos(iops_limit=1000)))  # 1,000 IOPS: 10 ms of slack holds 10 requests
    sched.set_pending("a0", 100, T0)
    sched.start_turn("a0", T0)
    serve(sched, "a0", 10, T0)
    assert not sched.should_change_queue("a0", T0)
    serve(sched, "a0", 1, T0)
    assert sched.should_change_queue("a0", T0)
    assert sched.throttled_until("a", T0) == T0 + 1 * MS


def test_a_throttled_queue_elsewhere_contends_again_once_its_tokens_return() -> None:
    sched = make(("a", Qos()), ("b", Qos(iops_limit=1000)), min_turn_requests=4)
    sched.set_pending("b0", 100, T0)
    serve(sched, "b0", 12, T0)  # 2 requests in debt: throttled for 2 ms
    sched.set_pending("a0", 100, T0)
    sched.start_turn("a0", T0)
    for i in range(1, 4):
        serve(sched, "a0", 4, T0 + i * 500 * US)
        assert not sched.should_change_queue("a0", T0 + i * 500 * US)
    serve(sched, "a0", 4, T0 + 2 * MS)
    assert sched.should_change_queue("a0", T0 + 2 * MS)


def test_turn_budget_is_the_rest_of_the_turn_capped_by_iops_tokens() -> None:
    sched = make(("a", Qos(iops_limit=1000)), ("b", Qos()), max_turn_requests=64,
                 min_turn_requests=8)
    sched.set_pending("a0", 100, T0)
    assert sched.turn_budget("a0", T0) == 10  # the bucket holds 10 ms of 1,000 IOPS
    sched.start_turn("a0", T0)
    serve(sched, "a0", 6, T0)
    assert sched.turn_budget("a0", T0) == 4
    serve(sched, "a0", 4, T0)
    assert sched.turn_budget("a0", T0 + 500 * US) == 1  # half a token still admits one
    serve(sched, "a0", 1, T0 + 500 * US)
    assert sched.turn_budget("a0", T0 + 500 * US) == 0  # throttled

    now = T0 + 600 * US
    sched.set_pending("b0", 100, now)
    sched.start_turn("b0", now)
    assert sched.turn_budget("b0", now) == 64  # nobody else runnable: the whole turn
    now = T0 + 2 * MS  # a has tokens again and contends
    serve(sched, "b0", 3, now)
    assert sched.turn_budget("b0", now) == 5  # the rest of the quantum


# --- limits ------------------------------------------------------------------------------------


def test_iops_limit_holds_within_2_percent_over_10_seconds() -> None:
    sched = make(("a", Qos(iops_limit=2000)))
    loop = Loop(sched)
    loop.saturate("a0")
    served = loop.served_during(T0 + 10 * S)
    assert served["a0"] == pytest.approx(20_000, rel=0.02)


def test_bps_limit_holds_within_2_percent_over_10_seconds() -> None:
    sched = make(("a", Qos(bps_limit=20_000_000)))
    loop = Loop(sched)
    loop.saturate("a0", size=64 * KIB)
    loop.run_until(T0 + 10 * S)
    assert loop.bytes["a0"] == pytest.approx(200_000_000, rel=0.02)


def test_burst_runs_at_burst_times_the_limit_for_one_second_then_at_the_limit() -> None:
    sched = make(("a", Qos(iops_limit=1000, burst=3)))
    loop = Loop(sched)
    loop.saturate("a0")
    # at most 3x the limit even within the burst (10 ms of slack aside), not all of it at once
    assert loop.served_during(T0 + 100 * MS)["a0"] == pytest.approx(300 + 30, abs=8)
    assert loop.served_during(T0 + 1 * S)["a0"] == pytest.approx(2700, rel=0.02)
    loop.run_until(T0 + 2 * S)
    assert loop.served_during(T0 + 5 * S)["a0"] == pytest.approx(3000, rel=0.02)
    loop.stop("a0")
    loop.run_until(T0 + 10 * S)  # idle long enough to refill the burst
    loop.saturate("a0")
    assert loop.served_during(T0 + 11 * S)["a0"] == pytest.approx(3000, rel=0.02)


def test_a_request_larger_than_the_bucket_is_served_and_paid_back() -> None:
    sched = make(("a", Qos(bps_limit=1_000_000)))  # the bucket holds 10 kB
    sched.set_pending("a0", 2, T0)
    sched.account("a0", 1, 1_000_000, T0)
    assert sched.throttled_until("a", T0) == T0 + 990 * MS
    assert sched.select_queue_to_process(T0 + 989 * MS) is None
    assert sched.select_queue_to_process(T0 + 990 * MS) == "a0"


def test_a_throttled_vm_does_not_block_the_others() -> None:
    sched = make(("lim", Qos(iops_limit=1000)), ("free", Qos()))
    loop = Loop(sched)
    loop.saturate("lim0")
    loop.saturate("free0")
    served = loop.served_during(T0 + 1 * S)
    assert served["lim0"] == pytest.approx(1000, rel=0.02)
    # the thread never idles: all the time lim0 does not use goes to free0
    assert served["lim0"] + served["free0"] == pytest.approx(1 * S // loop.per_request_ns,
                                                             rel=0.001)


def test_next_deadline_is_when_the_first_throttled_vm_with_pending_work_can_run() -> None:
    sched = make(("a", Qos(iops_limit=1000)), ("b", Qos(iops_limit=1000)),
                 ("c", Qos(iops_limit=1000)))
    for key, n in (("a0", 13), ("b0", 12), ("c0", 11)):  # 3, 2 and 1 requests in debt
        sched.set_pending(key, n + 1, T0)
        sched.account(key, n, 0, T0)
    assert sched.select_queue_to_process(T0) is None
    assert sched.next_deadline(T0) == T0 + 1 * MS
    sched.set_pending("c0", 0, T0)  # nothing left to wait for in c
    assert sched.next_deadline(T0) == T0 + 2 * MS
    assert sched.next_deadline(T0 + 2 * MS) == T0 + 3 * MS
    assert sched.select_queue_to_process(T0 + 2 * MS) == "b0"
    assert sched.next_deadline(T0 + 3 * MS) is None


def test_throttled_ns_counts_the_time_a_vm_waited_for_tokens_with_work_pending() -> None:
    sched = make(("a", Qos(iops_limit=1000)))
    sched.set_pending("a0", 20, T0)
    sched.account("a0", 11, 0, T0)  # one request in debt: 1 ms
    assert sched.throttled_ns("a", T0 + 250 * US) == 250 * US
    assert sched.throttled_ns("a", T0 + 5 * MS) == 1 * MS
    t1 = T0 + 5 * MS  # 5 tokens back, 4 after the debt
    sched.account("a0", 9, 0, t1)  # 5 in debt, but nothing pending: no one waits
    assert sched.throttled_ns("a", t1 + 10 * MS) == 1 * MS
    sched.set_pending("a0", 1, t1 + 2 * MS)  # waits while the debt is paid back...
    assert sched.throttled_ns("a", t1 + 10 * MS) == 4 * MS
    sched.set_pending("a0", 0, t1 + 3 * MS)  # ...until nothing is pending any more
    assert sched.throttled_ns("a", t1 + 10 * MS) == 2 * MS


def test_raising_and_lowering_limits_applies_live() -> None:
    sched = make(("a", Qos(iops_limit=1000)))
    loop = Loop(sched)
    loop.saturate("a0")
    loop.run_until(T0 + 1 * S)
    sched.set_qos("a", Qos(iops_limit=4000), loop.now)
    assert loop.served_during(T0 + 3 * S)["a0"] == pytest.approx(8000, rel=0.02)
    sched.set_qos("a", Qos(iops_limit=500), loop.now)
    assert loop.served_during(T0 + 5 * S)["a0"] == pytest.approx(1000, rel=0.02)
    sched.set_qos("a", Qos(), loop.now)
    assert sched.throttled_until("a", loop.now) is None


def test_lowering_a_limit_keeps_the_debt() -> None:
    sched = make(("a", Qos(iops_limit=1000)))
    sched.set_pending("a0", 100, T0)
    sched.account("a0", 20, 0, T0)  # 10 requests in debt: 10 ms at 1,000 IOPS
    sched.set_qos("a", Qos(iops_limit=100), T0 + 5 * MS)  # 5 left to pay at 100 IOPS: 50 ms
    assert sched.throttled_until("a", T0 + 5 * MS) == T0 + 55 * MS
    assert sched.throttled_ns("a", T0 + 55 * MS) == 55 * MS


# --- the starvation bound and random use -----------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_every_pending_queue_is_selected_within_the_starvation_bound(seed: int) -> None:
    """The module's bound: a runnable queue is selected before N batches end after it starves,
    so within starvation_ns + N batches of its waiting_since (N queues, no throttling)."""
    rng = random.Random(seed)
    max_turn = rng.choice([8, 32, 128])
    starvation_ns = rng.choice([300 * US, 1 * MS, 3 * MS])
    sched = Scheduler(latency_target_ns=starvation_ns // rng.choice([1, 3, 10]),
                      starvation_ns=starvation_ns, max_turn_requests=max_turn,
                      min_turn_requests=rng.randint(1, max_turn))
    keys: list[str] = []
    for v in range(rng.randint(2, 6)):
        sched.add_vm(v, Qos(weight=rng.choice([1, 2, 5, 50]),
                            priority=rng.choice(["low", "normal", "high"])))
        for i in range(rng.randint(1, 3)):
            keys.append(f"{v}.{i}")
            sched.add_queue(keys[-1], v)
    n = len(keys)
    # per queue: chance of arrivals per step and their size; some saturate
    rate = {k: rng.choice([0.01, 0.1, 0.5, 1.0]) for k in keys}
    pending = dict.fromkeys(keys, 0)
    since: dict[str, int] = {}  # waiting_since of queues with pending work
    batches_after_starving = dict.fromkeys(keys, 0)
    longest_batch = 0
    now = T0
    selections = 0

    def arrivals() -> None:
        for k in keys:
            if rng.random() < rate[k]:
                if not pending[k]:
                    since[k] = now
                pending[k] += rng.randint(1, 40)
                sched.set_pending(k, pending[k], now)

    while selections < 3000:
        arrivals()
        key = sched.select_queue_to_process(now)
        if key is None:
            assert not any(pending.values())
            now += rng.randint(1, 100) * US
            continue
        selections += 1
        assert pending[key] > 0
        assert batches_after_starving[key] <= n
        assert now - since[key] <= starvation_ns + n * longest_batch
        batches_after_starving[key] = 0
        sched.start_turn(key, now)
        while True:
            batch = min(rng.randint(1, max_turn), sched.turn_budget(key, now), pending[key])
            assert batch >= 1
            duration = batch * rng.randint(1, 20) * US
            longest_batch = max(longest_batch, duration)
            now += duration
            pending[key] -= batch
            sched.account(key, batch, batch * 4 * KIB, now)
            since[key] = now
            for k in keys:
                if k != key and pending[k] and now >= since[k] + starvation_ns:
                    batches_after_starving[k] += 1
            if rng.random() < 0.3:
                arrivals()
            if sched.should_change_queue(key, now):
                break


@pytest.mark.parametrize("seed", range(40))
def test_random_operation_sequences_keep_the_invariants(seed: int) -> None:
    """Whatever the server does in whatever order: no exception, never a queue without pending
    work or of a throttled VM, and pending work with nothing runnable always has a deadline."""
    rng = random.Random(seed)
    sched = Scheduler(latency_target_ns=rng.choice([10 * US, 1 * MS]),
                      max_turn_requests=rng.choice([4, 64]), min_turn_requests=rng.choice([1, 4]))
    vms: dict[int, list[int]] = {}
    pending: dict[int, int] = {}
    throttled_seen: dict[int, int] = {}
    now = T0
    next_id = 0
    current: int | None = None

    def random_qos() -> Qos:
        return Qos(weight=rng.randint(1, 10), priority=rng.choice(["low", "normal", "high"]),
                   iops_limit=rng.choice([None, 1, 100, 10_000]),
                   bps_limit=rng.choice([None, 1000, 10_000_000]),
                   burst=rng.choice([1, 1.5, 4]))

    for _ in range(600):
        op = rng.randrange(10)
        queues = [k for ks in vms.values() for k in ks]
        if op == 0 or not vms:
            next_id += 1
            vms[next_id] = []
            sched.add_vm(next_id, random_qos())
            throttled_seen[next_id] = 0
        elif op == 1 and rng.random() < 0.3:
            vm = rng.choice(list(vms))
            for k in vms.pop(vm):
                del pending[k]
            del throttled_seen[vm]
            sched.remove_vm(vm, now)
        elif op == 2:
            sched.set_qos(rng.choice(list(vms)), random_qos(), now)
        elif op == 3 or not queues:
            next_id += 1
            vm = rng.choice(list(vms))
            vms[vm].append(next_id)
            pending[next_id] = 0
            sched.add_queue(next_id, vm)
        elif op == 4 and rng.random() < 0.2:
            k = rng.choice(queues)
            next(ks for ks in vms.values() if k in ks).remove(k)
            del pending[k]
            sched.remove_queue(k, now)
        elif op in (5, 6):
            k = rng.choice(queues)
            pending[k] = rng.choice([0, 1, pending[k] + rng.randint(0, 50),
                                     max(0, pending[k] - rng.randint(0, 50))])
            sched.set_pending(k, pending[k], now)
        elif op == 7:
            key = sched.select_queue_to_process(now)
            if key is None:
                waiting = [k for k in queues if pending[k]]
                if waiting:
                    deadline = sched.next_deadline(now)
                    assert deadline is not None and deadline > now
                    for k in waiting:
                        vm = next(v for v, ks in vms.items() if k in ks)
                        assert sched.throttled_until(vm, now) is not None
            else:
                assert pending[key] > 0
                vm = next(v for v, ks in vms.items() if key in ks)
                assert sched.throttled_until(vm, now) is None
                sched.start_turn(key, now)
                current = key
        elif op == 8:
            k = current if current in pending and rng.random() < 0.8 else rng.choice(queues)
            budget = sched.turn_budget(k, now)
            assert 0 <= budget <= 64
            served = rng.randint(0, max(budget, 1))
            sched.account(k, served, served * rng.choice([512, 4096, 65536]), now)
            pending[k] = max(0, pending[k] - served)
            assert isinstance(sched.should_change_queue(k, now), bool)
        else:
            now += rng.choice([0, 1, 10 * US, 1 * MS, 100 * MS])
        for k in pending:
            assert sched.pending(k) == pending[k]
            oldest = sched.oldest_arrival(k)
            assert (oldest is None) == (pending[k] == 0)
            assert oldest is None or oldest <= now
        for vm in vms:
            spent = sched.throttled_ns(vm, now)
            assert spent >= throttled_seen[vm]
            throttled_seen[vm] = spent
        deadline = sched.next_deadline(now)
        assert deadline is None or deadline > now


@pytest.mark.parametrize("seed", range(40))
def test_a_turn_started_by_selection_knows_what_a_full_rescan_would(seed: int) -> None:
    """start_turn reuses what select_queue_to_process saw instead of scanning the queues again,
    even after changes and time in between (white-box: whenever the turn state claims to be
    fresh, it must be what a full rescan finds)."""
    rng = random.Random(seed)
    sched = Scheduler(latency_target_ns=100 * US, starvation_ns=rng.choice([300, 2000]) * US)
    keys = []
    for v in range(rng.randint(2, 6)):
        sched.add_vm(v, Qos(weight=rng.randint(1, 4), priority=rng.choice(PRIORITIES),
                            iops_limit=rng.choice([None, 2000])))
        for i in range(rng.randint(1, 3)):
            keys.append((v, i))
            sched.add_queue(keys[-1], v)
    now = T0
    checked = 0
    for _ in range(400):
        for k in keys:
            if rng.random() < 0.3:
                sched.set_pending(k, rng.choice([0, rng.randint(1, 20)]), now)
        now += rng.randint(0, 150) * US
        key = sched.select_queue_to_process(now)
        if key is None:
            continue
        if rng.random() < 0.3:  # the server does something else before starting the turn
            other = rng.choice(keys)
            if rng.random() < 0.5:
                sched.set_pending(other, rng.choice([0, rng.randint(1, 20)]), now)
            elif other != key:
                sched.account(other, 1, 4 * KIB, now)
            now += rng.choice([0, 50 * US])
        sched.start_turn(key, now)
        if not sched._dirty and now < sched._recheck:
            prepared = (sched._urgent, sched._contended, sched._yield_vtime, sched._recheck)
            sched._rescan(sched._queues[key], now)
            assert prepared == (sched._urgent, sched._contended, sched._yield_vtime,
                                sched._recheck)
            checked += 1
        n = rng.randint(1, max(1, sched.pending(key)))
        now += n * US
        sched.account(key, n, n * 4 * KIB, now)
    assert checked >= 10  # the prepared path was taken, and checked
