"""How rings get served: the shared I/O thread (the scheduler decides) or a thread per ring.

`SharedDispatcher` is the model the project exists for: one thread polls the avail rings of
every busy queue with guest kicks suppressed, and serves them in the order and turn lengths
`backend.scheduler` chooses. A ring that has been idle for its (adaptive) polling window gets
its kicks re-enabled, is re-checked so that no request slips through, and sleeps in epoll.
Completions are published a batch at a time, with one interrupt per batch when the driver
wants one (used_event / NO_INTERRUPT).

`PerRingThreads` gives every ring its own thread blocked on its kick eventfd and leaves the
choice to the kernel. It exists only as the benchmark's comparison point.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from backend.scheduler import Qos, Scheduler
from backend.stats import QueueStats
from backend.virtqueue import RingError

if TYPE_CHECKING:
    from backend.server import Ring

MIN_POLL_NS = 20_000
MAX_POLL_NS = 2_000_000
# Requests served per loop iteration before the loop looks at its sockets again.
LOOP_BUDGET = 1024
# Requests per batch: between batches the other busy rings are looked at, so that work
# arriving elsewhere during a long turn is seen by the scheduler and can end that turn.
BATCH = 16

Clock = Callable[[], int]


class RingRuntime:
    """Per-ring state of the dispatchers: statistics, polling and arrival times."""

    __slots__ = ("arrivals", "done", "last_work", "polling", "seen", "sleep_at", "stats",
                 "window")

    def __init__(self) -> None:
        self.stats = QueueStats()
        self.polling = False
        self.last_work = 0
        self.sleep_at = 0
        self.window = MIN_POLL_NS * 4
        # Requests numbered from the ring's start: `done` completed, `seen` noticed; arrivals
        # holds (seen count at the time, time) so each completion knows how long it waited.
        self.done = 0
        self.seen = 0
        self.arrivals: collections.deque[tuple[int, int]] = collections.deque()

    def restart(self) -> None:
        """A new connection's ring starts counting its requests from zero."""
        self.polling = False
        self.done = self.seen = 0
        self.arrivals.clear()

    def noticed(self, pending: int, now: int) -> None:
        total = self.done + pending
        if total > self.seen:
            self.seen = total
            self.arrivals.append((total, now))

    def completed(self, count: int, now: int) -> None:
        start = self.done
        end = start + count
        self.done = end
        if self.seen < end:
            self.seen = end  # served in the batch that found them: waited no time we saw
        hist = self.stats.latency
        arrivals = self.arrivals
        while start < end and arrivals:
            seg_end, at = arrivals[0]
            take = (seg_end if seg_end < end else end) - start
            if take > 0:
                hist.add(now - at, take)
                start += take
            if seg_end > end:
                break
            arrivals.popleft()
        if start < end:
            hist.add(0, end - start)


class SharedDispatcher:
    """The shared I/O thread's scheduling across every ring of every VM."""

    def __init__(self, scheduler: Scheduler | None = None,
                 clock: Clock = time.monotonic_ns) -> None:
        self.scheduler = scheduler or Scheduler()
        self.clock = clock
        self.rings: set[Ring] = set()
        self.polling: dict[Ring, None] = {}
        # The polled rings whose last look found nothing pending: between batches only these
        # are looked at, since only an idle ring becoming busy changes a turn's contention.
        self.idle_polled: dict[Ring, None] = {}
        self.vm_refs: collections.Counter[str] = collections.Counter()

    # --- VMs and rings -------------------------------------------------------------------------

    def add_vm(self, vm: str, qos: Qos) -> None:
        if not self.vm_refs[vm]:
            self.scheduler.add_vm(vm, qos)
        self.vm_refs[vm] += 1

    def set_qos(self, vm: str, qos: Qos) -> None:
        self.scheduler.set_qos(vm, qos, self.clock())

    def remove_vm(self, vm: str) -> None:
        self.vm_refs[vm] -= 1
        if not self.vm_refs[vm]:
            del self.vm_refs[vm]
            self.scheduler.remove_vm(vm, self.clock())

    def throttled_ns(self, vm: str) -> int:
        return self.scheduler.throttled_ns(vm, self.clock()) if self.vm_refs[vm] else 0

    def attach(self, ring: Ring) -> None:
        """A started and enabled ring joins the scheduler; its pending work is noticed now."""
        if ring in self.rings:
            return
        self.rings.add(ring)
        self.scheduler.add_queue(ring, ring.conn.endpoint.vm)
        # Start asleep with kicks on: the ring's memory may hold a previous owner's suppression.
        ring.runtime.polling = False
        ring.queue.set_kicks(True)
        self._look(ring, self.clock())

    def detach(self, ring: Ring) -> None:
        if ring in self.rings:
            self.rings.discard(ring)
            self.polling.pop(ring, None)
            self.idle_polled.pop(ring, None)
            if ring.runtime.polling:
                ring.runtime.polling = False
                ring.queue.set_kicks(True)  # whoever serves the ring next expects kicks
            self.scheduler.remove_queue(ring, self.clock())

    def kicked(self, ring: Ring) -> None:
        runtime = ring.runtime
        runtime.stats.kicks += 1
        if ring not in self.rings:
            return
        now = self.clock()
        if not runtime.polling:
            # Adapt the polling window: a kick soon after we went to sleep means we slept
            # too early (as KVM's halt-polling grows); a long sleep means polling was wasted.
            if now - runtime.sleep_at < MAX_POLL_NS:
                runtime.window = min(runtime.window * 2, MAX_POLL_NS)
            else:
                runtime.window = max(runtime.window // 2, MIN_POLL_NS)
        self._look(ring, now)

    # --- the loop's calls ----------------------------------------------------------------------

    def busy(self) -> bool:
        """Whether rings are being polled, so that other work in the loop takes time from them."""
        return bool(self.polling)

    def timeout(self) -> float:
        """Seconds the loop may sleep in epoll: none while a polled ring may get work (its
        kicks are off), else until the first throttled VM with pending work may run."""
        now = self.clock()
        sched = self.scheduler
        for ring in self.polling:
            if not sched.pending(ring) or sched.throttled_until(ring.conn.endpoint.vm,
                                                                now) is None:
                return 0
        deadline = sched.next_deadline(now)
        if deadline is None:
            return -1
        return max(deadline - now, 0) / 1e9

    def run(self) -> None:
        """Poll the busy rings, then serve what the scheduler picks, up to the loop budget."""
        now = self.clock()
        for ring in list(self.polling):
            self._look(ring, now)
        self._serve(now)

    # --- internals -----------------------------------------------------------------------------

    def _look(self, ring: Ring, now: int) -> None:
        """Read the ring's avail index; poll a busy ring, put an idle one to sleep."""
        runtime = ring.runtime
        queue = ring.queue
        try:
            pending = queue.pending()
            if not pending and runtime.polling and now - runtime.last_work > runtime.window:
                queue.set_kicks(True)  # then re-check: a request may have raced the switch
                pending = queue.pending()
                if not pending:
                    runtime.polling = False
                    runtime.sleep_at = now
                    del self.polling[ring]
                    self.idle_polled.pop(ring, None)
        except RingError as exc:
            ring.conn.fail_ring(ring, str(exc))
            return
        if pending:
            runtime.last_work = now
            if not runtime.polling:
                queue.set_kicks(False)
                runtime.polling = True
                self.polling[ring] = None
            else:
                self.idle_polled.pop(ring, None)
            runtime.noticed(pending, now)
        elif runtime.polling:
            self.idle_polled[ring] = None
        self.scheduler.set_pending(ring, pending, now)

    def _serve(self, now: int) -> None:
        sched = self.scheduler
        clock = self.clock
        idle_polled = self.idle_polled
        served = 0
        while served < LOOP_BUDGET:
            ring = sched.select_queue_to_process(now)
            if ring is None:
                return
            sched.start_turn(ring, now)
            conn = ring.conn
            device = conn.endpoint.device
            queue = ring.queue
            runtime = ring.runtime
            stats = runtime.stats
            while True:
                budget = sched.turn_budget(ring, now)
                if budget <= 0:
                    break
                if budget > BATCH:
                    budget = BATCH
                moved = device.moved
                try:
                    done = device.serve_batch(queue, budget)
                    notify = queue.publish_used()
                    now = clock()
                    pending = queue.pending()
                except RingError as exc:
                    conn.fail_ring(ring, str(exc))
                    break
                nbytes = device.moved - moved
                stats.requests += done
                stats.bytes += nbytes
                runtime.completed(done, now)
                runtime.last_work = now
                if notify and ring.call is not None:
                    ring.notify()
                sched.account(ring, done, nbytes, now)
                if pending:
                    runtime.noticed(pending, now)
                    idle_polled.pop(ring, None)
                elif runtime.polling:
                    idle_polled[ring] = None
                sched.set_pending(ring, pending, now)
                served += done
                if idle_polled:
                    for other in list(idle_polled):
                        if other is not ring:
                            self._look(other, now)
                if ring not in self.rings or sched.should_change_queue(ring, now):
                    break


class PerRingThreads:
    """The comparison model: one thread per ring, woken by its kick, scheduled by the kernel.

    A ring's thread owns its queue until detach() joins it; a broken ring is handed back to
    the loop thread (through `report`) to be failed there.
    """

    def __init__(self, report: Callable[[Ring, str], None]) -> None:
        self.report = report
        self.threads: dict[Ring, tuple[threading.Thread, int]] = {}

    def add_vm(self, vm: str, qos: Qos) -> None:
        """QoS is the shared thread's business; per-ring threads have none."""

    def set_qos(self, vm: str, qos: Qos) -> None:
        """See add_vm."""

    def remove_vm(self, vm: str) -> None:
        """See add_vm."""

    def throttled_ns(self, vm: str) -> int:
        return 0

    def attach(self, ring: Ring) -> None:
        if ring in self.threads:
            return
        stop = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        thread = threading.Thread(target=self._serve, args=(ring, stop), daemon=True,
                                  name=f"ring-{ring.index}")
        self.threads[ring] = (thread, stop)
        thread.start()

    def detach(self, ring: Ring) -> None:
        entry = self.threads.pop(ring, None)
        if entry is not None:
            thread, stop = entry
            os.eventfd_write(stop, 1)
            thread.join()
            os.close(stop)

    def kicked(self, ring: Ring) -> None:
        """Kicks go to the ring's own thread, not through the loop."""

    def busy(self) -> bool:
        """Ring threads have their own time: the loop's other work takes none from them."""
        return False

    def timeout(self) -> float:
        return -1

    def run(self) -> None:
        """Nothing to do in the loop thread."""

    def _serve(self, ring: Ring, stop: int) -> None:
        poller = select.poll()
        poller.register(ring.kick, select.POLLIN)
        poller.register(stop, select.POLLIN)
        device = ring.conn.endpoint.device
        stats = ring.runtime.stats
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if stop in ready:
                return
            with contextlib.suppress(OSError):
                os.read(ring.kick, 8)
            stats.kicks += 1
            try:
                done = device.process(ring.queue, LOOP_BUDGET)
                notify = ring.queue.publish_used()
            except RingError as exc:
                self.report(ring, str(exc))
                return
            stats.requests += done
            if notify and ring.call is not None:
                ring.notify()
