"""Per-worker counters in shared memory, summed by the supervisor for /metrics.

The supervisor maps one anonymous shared region before it forks any worker;
each worker owns one slot (a row of unsigned 64-bit integers) and is its only
writer, so no locks are needed: an aligned 64-bit store is atomic on every
platform we run on, and readers only ever see whole values. A worker that is
restarted keeps its slot and adds to it, so totals never go backwards (what a
Prometheus counter requires). Gauges (open connections, upstream state) are
reset by the worker when it starts.

Workers accumulate counts in local variables on the hot path and publish once
per event-loop wake-up, never per line.
"""

from __future__ import annotations

import mmap
import time
from enum import IntEnum

__all__ = ["DROP_REASONS", "Counter", "SharedStats", "WorkerState"]


class Counter(IntEnum):
    """Index of each value in a worker's slot."""

    LINES_RECEIVED = 0
    LINES_FORWARDED = 1
    LINES_BLOCKED = 2
    DROPPED_OVERSIZE = 3
    DROPPED_UPSTREAM = 4
    DROPPED_QUEUE_FULL = 5
    DROPPED_PARTIAL = 6
    DATAGRAMS_IN = 7
    BYTES_IN = 8
    DATAGRAMS_OUT = 9
    BYTES_OUT = 10
    TCP_CONNECTIONS_OPEN = 11  # gauge
    TCP_CONNECTIONS_ACCEPTED = 12
    TCP_CONNECTIONS_REJECTED = 13
    TCP_IDLE_CLOSED = 14
    UPSTREAM_ERRORS = 15
    UPSTREAM_CONNECTED = 16  # gauge: 1 up, 0 down
    UPSTREAM_RECONNECTS = 17
    UPSTREAM_BUFFERED_BYTES = 18  # gauge
    RECEIVE_ERRORS = 19
    STATE = 20  # gauge: a WorkerState
    HEARTBEAT = 21  # gauge: monotonic milliseconds of the worker's last tick
    UPSTREAM_REFUSED_MS = 22  # gauge: heartbeat clock of the last UDP refusal
    UPSTREAM_HEALTHY = 23  # gauge: 1 while the health check passes


SLOT_WIDTH = 32  # room to add counters without changing the layout
GAUGES = frozenset(
    {
        Counter.TCP_CONNECTIONS_OPEN,
        Counter.UPSTREAM_CONNECTED,
        Counter.UPSTREAM_BUFFERED_BYTES,
        Counter.STATE,
        Counter.HEARTBEAT,
        Counter.UPSTREAM_REFUSED_MS,
        Counter.UPSTREAM_HEALTHY,
    }
)
DROP_REASONS = {
    Counter.DROPPED_OVERSIZE: "oversize",
    Counter.DROPPED_UPSTREAM: "upstream",
    Counter.DROPPED_QUEUE_FULL: "queue_full",
    Counter.DROPPED_PARTIAL: "partial",
}


class WorkerState(IntEnum):
    """Lifecycle of a worker as it reports it in its slot."""

    STOPPED = 0
    STARTING = 1
    RUNNING = 2
    DRAINING = 3


RULE_FIELDS = 3  # matches, lines saved, bytes saved (see rules.filter.RuleStats)
RULE_METRICS = ("rule_matches_total", "rule_lines_saved_total", "rule_bytes_saved_total")


class SharedStats:
    """A block of ``slots`` counter rows in anonymous shared memory.

    After the worker rows come per-rule rows: for each worker, ``rule_capacity``
    rows of (matches, lines saved, bytes saved), addressed by the stable row
    number the supervisor assigns each rule name.
    """

    def __init__(self, slots: int, rule_capacity: int = 1024, upstreams: int = 1) -> None:
        self.slots = slots
        self.rule_capacity = rule_capacity
        self.upstreams = upstreams
        self._rule_width = rule_capacity * RULE_FIELDS
        self._upstream_width = upstreams * SLOT_WIDTH
        size = slots * (SLOT_WIDTH + self._rule_width + self._upstream_width)
        self._mem = mmap.mmap(-1, size * 8)
        self._values = memoryview(self._mem).cast("Q")
        self._rules_base = slots * SLOT_WIDTH
        self._upstreams_base = self._rules_base + slots * self._rule_width

    def upstream_slot(self, index: int, upstream: int) -> memoryview:
        """The counters a worker keeps for one upstream (same layout as a worker row)."""
        start = self._upstreams_base + index * self._upstream_width + upstream * SLOT_WIDTH
        return self._values[start : start + SLOT_WIDTH]

    def upstream_get(self, index: int, upstream: int, counter: Counter) -> int:
        """One worker's value for one upstream."""
        start = self._upstreams_base + index * self._upstream_width + upstream * SLOT_WIDTH
        return int(self._values[start + counter])

    def upstream_total(self, upstream: int, counter: Counter) -> int:
        """One upstream's counter summed over all workers."""
        return sum(self.upstream_get(i, upstream, counter) for i in range(self.slots))

    def rule_slot(self, index: int) -> memoryview:
        """A worker's per-rule counters: row r, field f at ``r * 3 + f``."""
        start = self._rules_base + index * self._rule_width
        return self._values[start : start + self._rule_width]

    def rule_total(self, row: int, field: int) -> int:
        """One per-rule counter summed over all workers."""
        offset = self._rules_base + row * RULE_FIELDS + field
        return sum(self._values[offset + i * self._rule_width] for i in range(self.slots))

    def slot(self, index: int) -> memoryview:
        """The row a worker writes to (a view of unsigned 64-bit integers)."""
        start = index * SLOT_WIDTH
        return self._values[start : start + SLOT_WIDTH]

    def total(self, counter: Counter) -> int:
        """One counter summed over all slots."""
        return sum(self._values[i * SLOT_WIDTH + counter] for i in range(self.slots))

    def get(self, index: int, counter: Counter) -> int:
        """One worker's value."""
        return int(self._values[index * SLOT_WIDTH + counter])

    def reset_gauges(self, index: int) -> None:
        """Zero a slot's gauges (a worker starting, or found dead)."""
        rows = [self.slot(index)] + [self.upstream_slot(index, u) for u in range(self.upstreams)]
        for row in rows:
            for gauge in GAUGES:
                row[gauge] = 0


def heartbeat_ms() -> int:
    """The clock workers stamp into HEARTBEAT."""
    return int(time.monotonic() * 1000)
