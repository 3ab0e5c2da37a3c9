"""Fuzz the shared I/O thread's scheduler (backend/scheduler.py) with sequences of calls.

The input drives registrations, QoS changes, pending counts, selections, turns, accounting and
the clock. Whatever the order, no call may raise, no selected queue may lack pending work or
belong to a throttled VM, pending work that cannot run must come with a deadline, and throttled
time never goes backwards.

    python -m fuzz scheduler --seconds 60
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz._harness import Invariant, Reader, instrumented, time_limit

with instrumented(__name__, "backend.scheduler"):
    from backend.scheduler import PRIORITIES, Qos, Scheduler

MS = 1_000_000
LIMITS = (None, 1, 100, 10_000, 1_000_000)
STEPS = (0, 1, 1000, 100_000, MS, 100 * MS)


def _qos(fdp: _Provider) -> Qos:
    return Qos(weight=fdp.ConsumeIntInRange(1, 1000),
               priority=PRIORITIES[fdp.ConsumeIntInRange(0, 2)],
               iops_limit=LIMITS[fdp.ConsumeIntInRange(0, len(LIMITS) - 1)],
               bps_limit=LIMITS[fdp.ConsumeIntInRange(0, len(LIMITS) - 1)],
               burst=1 + fdp.ConsumeIntInRange(0, 40) / 4)


class _Provider(Reader):
    """The FuzzedDataProvider calls this harness was written with, on the plain Reader."""

    ConsumeIntInRange = Reader.int_in_range

    def ConsumeBool(self) -> bool:
        return self.bool()


def check(data: bytes) -> None:
    with time_limit(2.0):
        _check(data)


def _check(data: bytes) -> None:
    fdp = _Provider(data)
    latency = fdp.ConsumeIntInRange(1, 10 * MS)
    max_turn = fdp.ConsumeIntInRange(1, 512)
    sched = Scheduler(latency_target_ns=latency,
                      starvation_ns=latency * fdp.ConsumeIntInRange(1, 20),
                      max_turn_requests=max_turn,
                      min_turn_requests=fdp.ConsumeIntInRange(1, max_turn),
                      request_cost_bytes=fdp.ConsumeIntInRange(0, 1 << 20))
    vms: dict[int, list[int]] = {}  # VM -> its queues
    owner: dict[int, int] = {}  # queue -> VM
    pending: dict[int, int] = {}
    throttled: dict[int, int] = {}
    now = fdp.ConsumeIntInRange(0, 1 << 62)
    ids = iter(range(1 << 30))
    for _ in range(fdp.ConsumeIntInRange(0, 400)):
        op = fdp.ConsumeIntInRange(0, 9)
        if op == 0 or not vms:
            vm = next(ids)
            vms[vm] = []
            throttled[vm] = 0
            sched.add_vm(vm, _qos(fdp))
            continue
        vm = list(vms)[fdp.ConsumeIntInRange(0, len(vms) - 1)]
        if op == 1:
            sched.set_qos(vm, _qos(fdp), now)
        elif op == 2 and fdp.ConsumeBool():
            for key in vms.pop(vm):
                del owner[key], pending[key]
            del throttled[vm]
            sched.remove_vm(vm, now)
        elif op == 3 or not vms[vm]:
            key = next(ids)
            vms[vm].append(key)
            owner[key] = vm
            pending[key] = 0
            sched.add_queue(key, vm)
        else:
            key = vms[vm][fdp.ConsumeIntInRange(0, len(vms[vm]) - 1)]
            if op == 4 and fdp.ConsumeBool():
                vms[vm].remove(key)
                del owner[key], pending[key]
                sched.remove_queue(key, now)
            elif op in (4, 5):
                pending[key] = fdp.ConsumeIntInRange(0, 1024)
                sched.set_pending(key, pending[key], now)
            elif op == 6:
                chosen = sched.select_queue_to_process(now)
                if chosen is None:
                    if any(pending.values()):
                        deadline = sched.next_deadline(now)
                        if deadline is None or deadline <= now:
                            raise Invariant("work waits with no deadline to wake up for")
                else:
                    if not pending[chosen]:
                        raise Invariant("selected a queue with nothing pending")
                    if sched.throttled_until(owner[chosen], now) is not None:
                        raise Invariant("selected a queue of a throttled VM")
                    sched.start_turn(chosen, now)
            elif op == 7:
                budget = sched.turn_budget(key, now)
                if not 0 <= budget <= max_turn:
                    raise Invariant(f"turn budget {budget} out of range")
                served = fdp.ConsumeIntInRange(0, max(budget, 1))
                sched.account(key, served, served * fdp.ConsumeIntInRange(0, 1 << 20), now)
                pending[key] = max(0, pending[key] - served)
                sched.should_change_queue(key, now)
            else:
                now += STEPS[fdp.ConsumeIntInRange(0, len(STEPS) - 1)]
        for vm, before in throttled.items():
            spent = sched.throttled_ns(vm, now)
            if spent < before:
                raise Invariant("throttled time went backwards")
            throttled[vm] = spent
    for key, count in pending.items():
        if sched.pending(key) != count:
            raise Invariant("pending count drifted from what the server reported")


if __name__ == "__main__":
    from fuzz._harness import fuzz

    fuzz(check, "scheduler")
