"""Which queue the shared I/O thread serves next, and for how long: pure logic, no I/O.

One thread serves the virtqueues of many VMs. This module decides, from what the server tells
it, which queue gets the thread and when its turn ends. It never reads a clock: every call takes
`now`, integer nanoseconds of a monotonic clock, so tests and fuzzers drive it with a fake one.

The server's loop (the protocol every guarantee below assumes):

    sched.set_pending(key, n, now)            # whenever it learns a queue's avail count
    key = sched.select_queue_to_process(now)  # None: sleep until a kick or next_deadline(now)
    sched.start_turn(key, now)
    loop:
        serve up to sched.turn_budget(key, now) requests from the queue
        sched.account(key, requests, nbytes, now)   # before reporting the new pending count
        sched.set_pending(key, remaining, now)
        if sched.should_change_queue(key, now): break

Terms. A queue is *runnable* when it has pending requests and its VM is not throttled. Its
*waiting time* is `now - waiting_since`, where `waiting_since` is the later of the arrival of its
oldest pending request and the last time it was served: how long it has gone without service.
It is *overdue* once that reaches `latency_target_ns`, and *starving* once it reaches
`starvation_ns`.

Selection (`select_queue_to_process`), among runnable queues:
  1. starving queues first, longest waiting first (aging: no class starves another for ever);
  2. then strict priority classes, high > normal > low;
  3. within a class, start-time fair queuing over VMs: the VM with the least virtual time, which
     advances by each batch's cost divided by the VM's weight (cost = nbytes plus
     `request_cost_bytes` per request); a VM that was idle restarts at its class's virtual clock,
     so idling banks no credit;
  4. ties, and the choice between one VM's queues, go to the longest waiting queue.

A turn ends (`should_change_queue`) when any of these holds:
  - it served `max_turn_requests`; its queue has nothing pending; its VM ran out of tokens;
  - a queue of a higher class became runnable, or any queue elsewhere is starving;
  - a same-class queue elsewhere is overdue, and this VM's virtual time has reached the least
    among the VMs of the other runnable same-class queues (its own, if another of its queues
    waits): under latency pressure the class is served in strict fair-queuing order a batch at
    a time, a VM's queues taking turns; a VM still owed service keeps its turn, since ending it
    would only make selection choose it again;
  - it served its fair quantum and a runnable queue of the same class is waiting: the VM's
    share of `min_turn_requests` requests, or as much cost as that many requests of
    `QUANTUM_REQUEST_BYTES` each, whichever comes first (so large requests make short turns, and
    a VM reading 64 KiB at a time holds the thread no longer than one reading 4 KiB).
Under overload the latency rule shortens turns until every contending queue is revisited within
about the latency target, down to one batch per turn; the quantum bounds turns otherwise.

Cost. Selection is one pass over the queues with pending work. account, set_pending and
should_change_queue are O(1), except that should_change_queue rescans the busy queues once
after a queue elsewhere changes state (becomes busy or idle, or is served out of turn) or a time
it precomputed passes (a queue becoming overdue or starving, a throttle ending). start_turn right
after the selection that chose its queue reuses what that pass saw, so a turn starts without a
second scan. Nothing is allocated per request.

Limits: per-VM token buckets for IOPS and bytes/s (see `Qos.burst`). A batch may overdraw a
bucket (a request is never split or refused); the VM is then throttled until the debt is paid
back, so the long-run rate is exact and a request larger than the bucket still goes through.
A throttled VM's queues are never selected, and `next_deadline` tells the loop when the first
throttled VM with pending work can run again, so waiting for tokens blocks no other VM.

Starvation bound. Let N be the number of queues and suppose the server follows the protocol
above, serving at most `turn_budget` (<= `max_turn_requests`) requests per batch. If a queue q
stays runnable, it is selected before more than N batches end after it becomes starving:
  - every turn's should_change_queue re-examines the other queues no later than the instant q
    starves (a time precomputed from the earliest waiting_since elsewhere, or earlier when a
    queue's state changes), so the batch in progress then is the last of its turn: 1 batch;
  - starving queues are selected by waiting_since; only queues that were already starving and
    have an earlier waiting_since than q can go first, each of them once (serving a queue moves
    its waiting_since to now, after q's), and each such turn ends after its first batch because
    q is starving elsewhere: at most N - 1 batches.
So q waits at most `starvation_ns` plus N batches (<= N * max_turn_requests requests served
elsewhere) from its waiting_since, whatever the classes, weights and arrival patterns. Time the
VM spends throttled is excluded: it is the VM's own limit at work. Within a class, fair queuing
usually serves q far sooner; the bound is what holds in the worst case. The guard overrides
weights only for a VM whose fair share would leave it waiting longer than `starvation_ns`.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Literal

QueueKey = Hashable  # the server uses its ring objects
VmKey = Hashable
Priority = Literal["low", "normal", "high"]

PRIORITIES: tuple[Priority, ...] = ("low", "normal", "high")
_RANK: dict[str, int] = {"low": 0, "normal": 1, "high": 2}

NS_PER_S = 1_000_000_000
# A burst may last this long at the burst rate, as QEMU's default `*-max-length` of one second.
BURST_LENGTH_NS = NS_PER_S
# Extra bucket depth beyond the burst: absorbs the loop waking a little late after a throttle
# and batch granularity, so neither eats into the rate.
BUCKET_SLACK_NS = 10_000_000

# Bucket levels count billionths of a token, so a refill is elapsed_ns * rate, exact in integers:
# no drift over hours of accounting.
_UNIT = NS_PER_S
# Virtual time advances by cost * (_VT_SCALE // weight); the scale keeps the integer division's
# rounding below one part in a million for any weight up to a million.
_VT_SCALE = 1 << 40
# Arrival segments remembered per queue; more arrivals than that join the newest segment, which
# only makes them look older than they are (ages are never underestimated).
_SEGMENTS = 8
_SEG_MASK = _SEGMENTS - 1
# Later than any clock reading and beyond any virtual time (at 100k requests/s of 1 MiB, weight 1,
# it grows by about 2**101 a year): an int, so comparisons stay int-to-int on the hot path.
_NEVER = 1 << 128
# The fair quantum is counted in requests of up to this size; larger requests count by their
# cost (see should_change_queue).
QUANTUM_REQUEST_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Qos:
    """A VM's share of the I/O thread, its priority class and its limits.

    Field names match `broker.policy.Qos`, so `Qos(**dataclasses.asdict(policy_qos))` converts.

    burst: how many times its limits a VM may reach briefly, like QEMU throttle groups with
    `*-max = burst * limit` and `*-max-length = 1 s`: a VM that has been idle may run at up to
    `burst * limit` for one second, then gets `limit`. Each limited dimension has a main bucket
    (rate `limit`, depth `(burst - 1) * limit * 1 s` plus 10 ms of slack) and, when burst > 1, a
    peak bucket (rate `burst * limit`, depth 10 ms of it) capping the rate inside the burst.
    """

    weight: int = 1
    priority: Priority = "normal"
    iops_limit: int | None = None
    bps_limit: int | None = None  # bytes per second
    burst: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.weight, bool) or not isinstance(self.weight, int) or not (
            1 <= self.weight <= 1_000_000
        ):
            raise ValueError(f"QoS weight must be an integer from 1 to 10**6, not {self.weight!r}")
        if self.priority not in _RANK:
            raise ValueError(f"QoS priority must be one of {PRIORITIES}, not {self.priority!r}")
        for name in ("iops_limit", "bps_limit"):
            limit = getattr(self, name)
            if limit is not None and (
                isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
            ):
                raise ValueError(f"QoS {name} must be a positive integer or None, not {limit!r}")
        if not (isinstance(self.burst, int | float) and 1 <= self.burst <= 1000):
            raise ValueError(f"QoS burst must be a number from 1 to 1000, not {self.burst!r}")


class _Bucket:
    """One token bucket; `level` may go negative (a debt paid back before the VM runs again)."""

    __slots__ = ("byte_units", "depth", "kind", "level", "rate", "req_units", "stamp")

    def __init__(self, kind: str, rate: int, depth_ns: int, per_request: bool) -> None:
        self.kind = kind
        self.rate = rate  # tokens per second = units gained per nanosecond
        self.depth = rate * depth_ns
        self.level = self.depth  # a new bucket is full, whatever `stamp` says
        self.stamp = 0
        self.req_units = _UNIT if per_request else 0
        self.byte_units = 0 if per_request else _UNIT

    def refill(self, now: int) -> None:
        elapsed = now - self.stamp
        if elapsed > 0:  # a clock reading from the past must not drain the bucket
            level = self.level + elapsed * self.rate
            self.level = level if level < self.depth else self.depth
            self.stamp = now

    def ready_at(self) -> int:
        """When the level is back to zero (the past, if it is not negative)."""
        if self.level >= 0:
            return self.stamp
        return self.stamp + (self.rate - 1 - self.level) // self.rate


def _make_buckets(qos: Qos) -> tuple[_Bucket, ...]:
    buckets = []
    for kind, limit, per_request in (
        ("iops", qos.iops_limit, True),
        ("bps", qos.bps_limit, False),
    ):
        if limit is None:
            continue
        depth_ns = round((qos.burst - 1) * BURST_LENGTH_NS) + BUCKET_SLACK_NS
        buckets.append(_Bucket(kind, limit, depth_ns, per_request))
        if qos.burst > 1:
            peak = max(limit, round(limit * qos.burst))
            buckets.append(_Bucket(kind + "-peak", peak, BUCKET_SLACK_NS, per_request))
    return tuple(buckets)


class _Vm:
    __slots__ = ("backlog", "buckets", "inv_weight", "qos", "quantum", "quantum_cost", "queues",
                 "rank", "req_cost", "throttle_acc", "until", "vtime")

    def __init__(self, qos: Qos, vtime: int) -> None:
        self.qos = qos
        self.rank = _RANK[qos.priority]
        self.inv_weight = _VT_SCALE // qos.weight
        self.vtime = vtime
        self.buckets = _make_buckets(qos)
        self.quantum = 1  # set by Scheduler._rescale_quanta
        self.quantum_cost = 1  # the quantum as cost, also set there
        self.req_cost = 1  # cost per request in its last batch, to size the next one
        self.until = 0  # throttled while now < until
        self.backlog = 0  # how many of its queues have pending requests
        # Throttled time while backlogged, including the projected rest of the current episode
        # (throttled_ns subtracts what has not happened yet): O(1) upkeep at each transition.
        self.throttle_acc = 0
        self.queues: list[_Queue] = []


class _Queue:
    __slots__ = ("key", "oldest", "pending", "seg_count", "seg_head", "seg_len", "seg_time",
                 "since", "slot", "vm")

    def __init__(self, key: QueueKey, vm: _Vm) -> None:
        self.key = key
        self.vm = vm
        self.pending = 0
        self.oldest = 0  # arrival of the oldest pending request (meaningful while pending)
        # waiting_since: the later of `oldest` and the last service (meaningful while pending);
        # kept as one field because selection reads it for every queue
        self.since = 0
        self.slot = -1  # index in Scheduler._busy while it has pending requests
        # A ring of (arrival time, count) segments, oldest first, preallocated: requests are
        # served in order, so the head segment's time is the oldest pending arrival.
        self.seg_time = [0] * _SEGMENTS
        self.seg_count = [0] * _SEGMENTS
        self.seg_head = 0
        self.seg_len = 0

    def arrive(self, n: int, now: int) -> None:
        if self.seg_len:
            tail = (self.seg_head + self.seg_len - 1) & _SEG_MASK
            if self.seg_time[tail] == now or self.seg_len == _SEGMENTS:
                self.seg_count[tail] += n
                self.pending += n
                return
        else:
            self.oldest = self.since = now
        index = (self.seg_head + self.seg_len) & _SEG_MASK
        self.seg_time[index] = now
        self.seg_count[index] = n
        self.seg_len += 1
        self.pending += n

    def consume(self, n: int) -> None:
        """Drop the n oldest pending requests (0 < n <= pending)."""
        self.pending -= n
        counts = self.seg_count
        head = self.seg_head
        while n:
            count = counts[head]
            if count > n:
                counts[head] = count - n
                break
            n -= count
            head = (head + 1) & _SEG_MASK
            self.seg_len -= 1
        self.seg_head = head
        if self.pending:
            self.oldest = oldest = self.seg_time[head]
            if oldest > self.since:
                self.since = oldest


class Scheduler:
    """Chooses the next queue and the length of its turn; see the module docstring."""

    __slots__ = ("_busy", "_contended", "_current", "_dirty", "_latency_ns", "_max_turn",
                 "_min_turn", "_prep_contended", "_prep_recheck", "_prep_yield",
                 "_prepared", "_queues", "_recheck", "_request_cost", "_starvation_ns",
                 "_turn_cost", "_turn_served", "_urgent", "_vclock", "_vms", "_yield_vtime")

    def __init__(
        self,
        *,
        latency_target_ns: int = 1_000_000,
        starvation_ns: int | None = None,
        max_turn_requests: int = 256,
        min_turn_requests: int = 32,
        request_cost_bytes: int = 16384,
    ) -> None:
        """latency_target_ns: how long a queue should go without service at most when its VM is
        owed service; turns elsewhere are cut short to meet it.
        starvation_ns: waiting this long puts a queue ahead of every class (default 10 x the
        latency target); the starvation bound is stated in terms of it.
        max_turn_requests: the longest turn, even with nothing else to do (the loop must get
        back to its sockets). min_turn_requests: the fair quantum when others are waiting.
        request_cost_bytes: a request's fixed cost (parsing, syscalls, completion) expressed as
        bytes moved; fair shares count nbytes plus this per request. 0 shares bytes only.
        """
        if starvation_ns is None:
            starvation_ns = 10 * latency_target_ns
        if latency_target_ns < 1:
            raise ValueError("latency_target_ns must be positive")
        if starvation_ns < latency_target_ns:
            raise ValueError("starvation_ns must be at least latency_target_ns")
        if not 1 <= min_turn_requests <= max_turn_requests:
            raise ValueError("need 1 <= min_turn_requests <= max_turn_requests")
        if request_cost_bytes < 0:
            raise ValueError("request_cost_bytes must not be negative")
        self._latency_ns = latency_target_ns
        self._starvation_ns = starvation_ns
        self._max_turn = max_turn_requests
        self._min_turn = min_turn_requests
        self._request_cost = request_cost_bytes
        self._vms: dict[VmKey, _Vm] = {}
        self._queues: dict[QueueKey, _Queue] = {}
        # The queues with pending requests, in no particular order: selection and rescans
        # iterate over this, not over idle queues.
        self._busy: list[_Queue] = []
        # Per class: the virtual time of the latest turn chosen by fair queuing (SFQ's system
        # virtual time). A VM that becomes busy again starts no earlier than this.
        self._vclock = [0, 0, 0]
        self._current: _Queue | None = None
        self._turn_served = 0
        self._turn_cost = 0
        # What the current turn knows about the other queues, refreshed by _rescan when a queue
        # elsewhere changes state (_dirty) or a time it depends on passes (_recheck), so that
        # should_change_queue is O(1) after most batches:
        self._dirty = True
        self._recheck = 0
        self._urgent = False  # a starving or higher-class queue is runnable elsewhere
        self._contended = False  # a same-class queue is runnable elsewhere
        # The least virtual time among the same-class VMs waiting elsewhere, once one of their
        # queues is overdue (else infinity): this VM's turn ends when it gets there.
        self._yield_vtime: int = _NEVER
        # The same, computed by select_queue_to_process for the queue it chose, so that a
        # start_turn right after it needs no second scan. Every change to a queue or VM clears
        # _prepared; time passing needs nothing, as _recheck covers what time changes.
        self._prepared: _Queue | None = None
        self._prep_contended = False
        self._prep_yield: int = _NEVER
        self._prep_recheck = 0

    # --- registration --------------------------------------------------------------------------

    def add_vm(self, vm: VmKey, qos: Qos) -> None:
        if vm in self._vms:
            raise ValueError(f"VM {vm!r} is already scheduled")
        self._vms[vm] = _Vm(qos, self._vclock[_RANK[qos.priority]])
        self._rescale_quanta()

    def _rescale_quanta(self) -> None:
        """A VM's fair quantum is min_turn_requests scaled by its weight over the largest.

        Fair queuing only works on VMs that stay backlogged: a light VM allowed to drain its
        whole queue each turn looks idle to the scheduler, loses its place, and the VMs end
        up taking turns 1:1. Shorter turns for lighter VMs keep them backlogged.
        """
        heaviest = max((v.qos.weight for v in self._vms.values()), default=1)
        per_request = self._request_cost + QUANTUM_REQUEST_BYTES
        for v in self._vms.values():
            v.quantum = max(1, self._min_turn * v.qos.weight // heaviest)
            v.quantum_cost = v.quantum * per_request

    def set_qos(self, vm: VmKey, qos: Qos, now: int) -> None:
        """Apply new QoS live. The VM keeps its place relative to its class's virtual clock
        (rescaled to the new weight, so it owes or is owed the same service) and its token debt;
        a newly limited dimension starts with a full bucket."""
        v = self._vms[vm]
        lag = v.vtime - self._vclock[v.rank]
        lag = lag * v.qos.weight // qos.weight
        v.rank = _RANK[qos.priority]
        v.inv_weight = _VT_SCALE // qos.weight
        v.vtime = self._vclock[v.rank] + lag
        old = {b.kind: b for b in v.buckets}
        v.buckets = _make_buckets(qos)
        for bucket in v.buckets:
            previous = old.get(bucket.kind)
            if previous is not None:
                previous.refill(now)
                bucket.level = min(previous.level, bucket.depth)
                bucket.stamp = max(previous.stamp, now)
        v.qos = qos
        self._rescale_quanta()
        self._set_until(v, self._ready_at(v), now)
        self._dirty = True
        self._prepared = None

    def remove_vm(self, vm: VmKey, now: int) -> None:
        """Forget a VM and all its queues."""
        v = self._vms[vm]
        for q in list(v.queues):
            self.remove_queue(q.key, now)
        del self._vms[vm]
        self._rescale_quanta()

    def add_queue(self, key: QueueKey, vm: VmKey) -> None:
        if key in self._queues:
            raise ValueError(f"queue {key!r} is already scheduled")
        v = self._vms[vm]
        q = _Queue(key, v)
        v.queues.append(q)
        self._queues[key] = q
        self._dirty = True
        self._prepared = None

    def remove_queue(self, key: QueueKey, now: int) -> None:
        q = self._queues.pop(key)
        if q.pending:
            self._became_idle(q, now)
        q.vm.queues.remove(q)
        if q is self._current:
            self._current = None
        self._dirty = True
        self._prepared = None

    # --- what the server reports ---------------------------------------------------------------

    def set_pending(self, key: QueueKey, count: int, now: int) -> None:
        """The queue has `count` requests pending (avail idx - last avail idx). An increase
        arrived at `now`; a decrease the scheduler was not told about through account() drops
        the oldest requests."""
        q = self._queues[key]
        pending = q.pending
        if count > pending:
            if not pending:
                self._became_busy(q, now)
                self._prepared = None
                if q is not self._current:
                    self._dirty = True
            q.arrive(count - pending, now)
        elif count < pending:
            q.consume(pending - count)
            self._prepared = None  # its waiting_since may have moved
            if q is not self._current:
                self._dirty = True
            if not count:
                self._became_idle(q, now)

    def account(self, key: QueueKey, requests: int, nbytes: int, now: int) -> None:
        """A batch of `requests` requests moving `nbytes` bytes was served from this queue:
        they stop being pending, the VM's virtual time advances by their cost over its weight,
        and its buckets are charged."""
        q = self._queues[key]
        vm = q.vm
        if requests and q.pending:
            q.consume(requests if requests < q.pending else q.pending)
            if not q.pending:
                self._became_idle(q, now)
        q.since = now
        self._prepared = None
        cost = requests * self._request_cost + nbytes
        if q is self._current:
            self._turn_served += requests
            self._turn_cost += cost
        else:
            self._dirty = True
        if requests:
            vm.req_cost = cost // requests or 1
        vm.vtime += cost * vm.inv_weight
        if vm.buckets:
            until = 0
            for bucket in vm.buckets:
                bucket.refill(now)
                bucket.level -= requests * bucket.req_units + nbytes * bucket.byte_units
                if bucket.level < 0:
                    ready = bucket.ready_at()
                    if ready > until:
                        until = ready
            if until != vm.until:
                self._set_until(vm, until, now)

    # --- decisions -----------------------------------------------------------------------------

    def select_queue_to_process(self, now: int) -> QueueKey | None:
        """The runnable queue to serve next, or None when no queue is runnable. O(busy queues).

        Besides choosing, it gathers what the chosen queue's turn needs to know about the
        others (see start_turn), in the same pass.
        """
        starving_since = now - self._starvation_ns
        starving: _Queue | None = None
        starving_min = _NEVER
        best: _Queue | None = None
        top = -1  # the best class seen so far, and in it:
        best_vtime = 0
        best_since = 0
        count = 0  # runnable queues
        vtime2: int = _NEVER  # the least virtual time but best's
        since1 = since2 = _NEVER  # the two earliest waiting_since...
        since1_q: _Queue | None = None  # ...and whose the first is
        since_lower = _NEVER  # earliest waiting_since below class `top`
        until_min = _NEVER  # earliest end of a throttle with work pending
        for q in self._busy:
            vm = q.vm
            until = vm.until
            if until > now:
                if until < until_min:
                    until_min = until
                continue
            since = q.since
            if since <= starving_since:
                if since < starving_min:
                    starving = q
                    starving_min = since
                continue
            rank = vm.rank
            if rank < top:
                if since < since_lower:
                    since_lower = since
                continue
            vtime = vm.vtime
            if rank > top:
                if since1 < since_lower:
                    since_lower = since1
                top = rank
                best = since1_q = q
                best_vtime = vtime
                best_since = since1 = since
                since2 = _NEVER
                vtime2 = _NEVER
                count = 1
                continue
            count += 1
            if since < since1:
                since2 = since1
                since1 = since
                since1_q = q
            elif since < since2:
                since2 = since
            if vtime < best_vtime or (vtime == best_vtime and since < best_since):
                vtime2 = best_vtime
                best = q
                best_vtime = vtime
                best_since = since
            elif vtime < vtime2:
                vtime2 = vtime
        if starving is not None:
            self._prepared = None  # its turn ends at the first check anyway, if others starve
            return starving.key
        if best is None:
            return None
        # Nothing starves and nothing outranks best, so its turn starts not urgent.
        same_since = since2 if since1_q is best else since1
        self._prepared = best
        self._prep_contended = count > 1
        self._prep_yield, self._prep_recheck = self._turn_limits(
            now, vtime2, same_since, since_lower, until_min)
        return best.key

    def start_turn(self, key: QueueKey, now: int) -> None:
        q = self._queues[key]
        vm = q.vm
        self._current = q
        self._turn_served = 0
        self._turn_cost = 0
        if self._prepared is q:
            self._urgent = False
            self._contended = self._prep_contended
            self._yield_vtime = self._prep_yield
            self._recheck = self._prep_recheck
            self._dirty = False
        else:
            self._dirty = True
        # Only a turn chosen by fair queuing moves the class clock: a starving VM's virtual
        # time may be far ahead of its class, and VMs becoming busy must not start from there.
        if now - q.since < self._starvation_ns and vm.vtime > self._vclock[vm.rank]:
            self._vclock[vm.rank] = vm.vtime

    def turn_budget(self, key: QueueKey, now: int) -> int:
        """How many requests the next batch of this queue's turn may serve: what is left of the
        turn (the quantum when others wait, in requests and, at the cost of the VM's last
        batch, in cost; else max_turn_requests), capped by the VM's IOPS tokens; at least 1
        while the VM has tokens, 0 when the turn should end or it has none."""
        q = self._queues[key]
        vm = q.vm
        if vm.until > now:
            return 0
        limit = self._max_turn
        if q is self._current:
            if self._dirty or now >= self._recheck:
                self._rescan(q, now)
            if self._contended or self._urgent:
                limit = vm.quantum - self._turn_served
                room = vm.quantum_cost - self._turn_cost
                if limit <= 0 or room <= 0:
                    return 0
                fit = -(-room // vm.req_cost)
                if fit < limit:
                    limit = fit
            else:
                limit -= self._turn_served
                if limit <= 0:
                    return 0
        for bucket in vm.buckets:
            if bucket.req_units:
                bucket.refill(now)
                tokens = bucket.level // _UNIT
                if tokens < limit:
                    limit = tokens if tokens > 0 else 1  # a fraction of a token still admits one
        return limit

    def should_change_queue(self, key: QueueKey, now: int) -> bool:
        """Whether the turn of this queue should end now (True when it is not in a turn).
        O(1) unless a queue elsewhere changed state or a time of interest passed."""
        q = self._queues[key]
        if q is not self._current:
            return True
        vm = q.vm
        if self._turn_served >= self._max_turn or not q.pending or vm.until > now:
            return True
        if self._dirty or now >= self._recheck:
            self._rescan(q, now)
        if self._urgent or vm.vtime >= self._yield_vtime:
            return True
        return self._contended and (self._turn_served >= vm.quantum
                                    or self._turn_cost >= vm.quantum_cost)

    def _rescan(self, current: _Queue, now: int) -> None:
        """Look at every other queue once: does one outrank the current turn, do some of its
        class contend for the thread, how owed are they, and when to look again."""
        rank = current.vm.rank
        starving_since = now - self._starvation_ns
        contended = False
        min_vtime: int = _NEVER
        same_since = since_lower = until_min = _NEVER
        for q in self._busy:
            if q is current:
                continue
            vm = q.vm
            until = vm.until
            if until > now:
                if until < until_min:
                    until_min = until
                continue
            since = q.since
            other = vm.rank
            if since <= starving_since or other > rank:
                self._urgent = True
                self._recheck = _NEVER  # until a change elsewhere (_dirty) or the next turn
                self._dirty = False
                return
            if other == rank:
                contended = True
                if vm.vtime < min_vtime:
                    min_vtime = vm.vtime
                if since < same_since:
                    same_since = since
            elif since < since_lower:
                since_lower = since
        self._urgent = False
        self._contended = contended
        self._yield_vtime, self._recheck = self._turn_limits(
            now, min_vtime, same_since, since_lower, until_min)
        self._dirty = False

    def _turn_limits(self, now: int, min_vtime: int, same_since: int, since_lower: int,
                     until_min: int) -> tuple[int, int]:
        """The virtual time at which the turn yields, and when to look at the others again,
        from the least virtual time and earliest waiting_since of the same-class queues
        elsewhere, the earliest waiting_since below the class, and the earliest end of a
        throttle with work pending."""
        recheck = min(until_min, min(same_since, since_lower) + self._starvation_ns)
        overdue_at = same_since + self._latency_ns
        if overdue_at <= now:
            return min_vtime, recheck
        return _NEVER, min(recheck, overdue_at)

    # --- limits and stats ----------------------------------------------------------------------

    def throttled_until(self, vm: VmKey, now: int) -> int | None:
        """When the VM gets tokens again, or None if it has some now."""
        until = self._vms[vm].until
        return until if until > now else None

    def next_deadline(self, now: int) -> int | None:
        """The earliest time a throttled VM with pending work becomes runnable again (the loop
        may sleep until then, or a kick), or None if no such VM waits. O(VMs)."""
        deadline: int | None = None
        for vm in self._vms.values():
            if vm.backlog and vm.until > now and (deadline is None or vm.until < deadline):
                deadline = vm.until
        return deadline

    def throttled_ns(self, vm: VmKey, now: int) -> int:
        """Time so far that the VM had pending requests but no tokens."""
        v = self._vms[vm]
        ahead = v.until - now if v.backlog and v.until > now else 0
        return v.throttle_acc - ahead

    def pending(self, key: QueueKey) -> int:
        return self._queues[key].pending

    def oldest_arrival(self, key: QueueKey) -> int | None:
        """When the queue's oldest pending request arrived (as far as the scheduler was told),
        or None if nothing is pending."""
        q = self._queues[key]
        return q.oldest if q.pending else None

    # --- internals -----------------------------------------------------------------------------

    @staticmethod
    def _ready_at(vm: _Vm) -> int:
        return max((bucket.ready_at() for bucket in vm.buckets), default=0)

    def _set_until(self, vm: _Vm, until: int, now: int) -> None:
        if vm.backlog:
            vm.throttle_acc += max(0, until - now) - max(0, vm.until - now)
        vm.until = until

    def _became_busy(self, q: _Queue, now: int) -> None:
        q.slot = len(self._busy)
        self._busy.append(q)
        vm = q.vm
        if not vm.backlog:
            clock = self._vclock[vm.rank]
            if vm.vtime < clock:
                vm.vtime = clock  # no credit for the time it had nothing to do
            if vm.until > now:
                vm.throttle_acc += vm.until - now
        vm.backlog += 1

    def _became_idle(self, q: _Queue, now: int) -> None:
        last = self._busy.pop()  # swap-remove: O(1)
        if last is not q:
            self._busy[q.slot] = last
            last.slot = q.slot
        q.slot = -1
        vm = q.vm
        vm.backlog -= 1
        if not vm.backlog and vm.until > now:
            vm.throttle_acc -= vm.until - now
