"""Per-worker counters in shared memory, summed by the supervisor for /metrics.

The supervisor maps one anonymous shared region before it forks any worker.
Each worker owns one slot: a row of unsigned 64-bit integers for itself, a row
per upstream, and a row of counters per rule. It is the only writer of its
slot while it lives, so no locks are needed: an aligned 64-bit store is atomic
on every platform we run on, and readers only ever see whole values.

A restarted worker keeps its slot and adds to it, so totals never go
backwards (what a Prometheus counter requires). Gauges (open connections,
upstream state, the worker's state) are zeroed by the supervisor when it reaps
a dead worker (:meth:`SharedStats.reset_gauges`), before the slot's next owner
is forked, so a dead worker's connections are not reported as open.

Workers accumulate counts in local variables on the hot path and publish once
per event-loop wake-up, never per line.
"""

from __future__ import annotations

import mmap
import time
from enum import IntEnum

from statsd_filter.rules.filter import RULE_FIELDS

__all__ = [
    "AGGREGATE_FLUSH_REASONS",
    "GAUGES",
    "READER_ROLES",
    "SLOT_WIDTH",
    "UPSTREAM_DROP_REASONS",
    "WORKER_DROP_REASONS",
    "SharedStats",
    "Stat",
    "WorkerState",
]


class Stat(IntEnum):
    """Index of each value in a worker's row (and, for upstream values, an upstream row)."""

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
    DROPPED_WORKER_DIED = 24  # lines a worker held when it died (written by the supervisor)
    DROPPED_REFUSED = 25  # upstream row: lines in datagrams the upstream refused
    UPSTREAM_WORKER_DIED = 26  # upstream row, mirror mode: copies a dead worker held
    LINES_REROUTED = 27  # upstream row: refused lines handed to another upstream
    # Pre-aggregation (worker row): input lines merged into aggregates handed to
    # the router, the lines those aggregates made, the live series, and flushes.
    LINES_AGGREGATED = 28
    AGGREGATE_LINES_OUT = 29
    AGGREGATE_SERIES = 30  # gauge
    AGGREGATE_FLUSHES_INTERVAL = 31
    AGGREGATE_FLUSHES_CAP = 32
    AGGREGATE_FLUSHES_RELOAD = 33
    AGGREGATE_FLUSHES_SHUTDOWN = 34
    # The read role of each shared UDP socket (worker/readrole.py): heartbeat-clock
    # ms until which this worker reads that socket on its timer (0: it does not).
    READ_ROLE_0 = 35  # gauge
    READ_ROLE_1 = 36  # gauge
    READ_ROLE_2 = 37  # gauge
    READ_ROLE_3 = 38  # gauge
    # 39: free. The Unix socket inputs' values (their share of DATAGRAMS_IN and
    # BYTES_IN, which count every input, and their own connection counters):
    UNIX_DATAGRAMS_IN = 40
    UNIX_BYTES_IN = 41
    UNIX_CONNECTIONS_OPEN = 42  # gauge
    UNIX_CONNECTIONS_ACCEPTED = 43
    UNIX_CONNECTIONS_REJECTED = 44
    UNIX_IDLE_CLOSED = 45
    UNIX_FRAMES_REJECTED = 46  # datagrams or length prefixes over unix_socket_max_payload
    UNIX_ORIGIN_TAGGED = 47  # lines given a container id by origin detection


SLOT_WIDTH = 48  # room to add values without changing the layout
GAUGES = frozenset(
    {
        Stat.TCP_CONNECTIONS_OPEN,
        Stat.UNIX_CONNECTIONS_OPEN,
        Stat.UPSTREAM_CONNECTED,
        Stat.UPSTREAM_BUFFERED_BYTES,
        Stat.STATE,
        Stat.HEARTBEAT,
        Stat.UPSTREAM_REFUSED_MS,
        Stat.UPSTREAM_HEALTHY,
        Stat.AGGREGATE_SERIES,
        Stat.READ_ROLE_0,
        Stat.READ_ROLE_1,
        Stat.READ_ROLE_2,
        Stat.READ_ROLE_3,
    }
)
# Shared UDP sockets beyond the first four (listen addresses) read as before,
# every worker on its own timer.
READER_ROLES = (Stat.READ_ROLE_0, Stat.READ_ROLE_1, Stat.READ_ROLE_2, Stat.READ_ROLE_3)
# Why lines were lost. A worker counts the first kind in its own row, a sender
# the second kind in its upstream's row; `lines_dropped_total{reason}` shows both.
WORKER_DROP_REASONS = {
    Stat.DROPPED_OVERSIZE: "oversize",
    Stat.DROPPED_PARTIAL: "partial",
    Stat.DROPPED_WORKER_DIED: "worker_died",
}
UPSTREAM_DROP_REASONS = {
    Stat.DROPPED_UPSTREAM: "upstream",
    Stat.DROPPED_QUEUE_FULL: "queue_full",
    Stat.DROPPED_REFUSED: "refused",
}


# Why an aggregator flushed: `aggregate_flushes_total{reason}`.
AGGREGATE_FLUSH_REASONS = {
    Stat.AGGREGATE_FLUSHES_INTERVAL: "interval",
    Stat.AGGREGATE_FLUSHES_CAP: "cap",
    Stat.AGGREGATE_FLUSHES_RELOAD: "reload",
    Stat.AGGREGATE_FLUSHES_SHUTDOWN: "shutdown",
}


class WorkerState(IntEnum):
    """Lifecycle of a worker as it reports it in its row."""

    STOPPED = 0
    STARTING = 1
    RUNNING = 2
    DRAINING = 3


class SharedStats:
    """Rows of 64-bit counters in anonymous shared memory, one slot per worker.

    Layout, in order: ``workers`` worker rows of ``SLOT_WIDTH``; then for each
    worker ``rule_capacity`` rule rows of ``RULE_FIELDS`` values, addressed by
    the stable row number the supervisor assigns each rule name; then for each
    worker ``upstreams`` rows of ``SLOT_WIDTH`` (indexed by :class:`Stat`).
    """

    def __init__(self, workers: int, rule_capacity: int = 1024, upstreams: int = 1) -> None:
        self.workers = workers
        self.rule_capacity = rule_capacity
        self.upstreams = upstreams
        self._rules_width = rule_capacity * RULE_FIELDS
        self._upstreams_width = upstreams * SLOT_WIDTH
        size = workers * (SLOT_WIDTH + self._rules_width + self._upstreams_width)
        self._mem = mmap.mmap(-1, size * 8)
        self._values = memoryview(self._mem).cast("Q")
        self._rules_base = workers * SLOT_WIDTH
        self._upstreams_base = self._rules_base + workers * self._rules_width

    # ------------------------------------------------------------ worker rows
    def row(self, worker: int) -> memoryview:
        """The row a worker writes to (a view of unsigned 64-bit integers)."""
        start = worker * SLOT_WIDTH
        return self._values[start : start + SLOT_WIDTH]

    def get(self, worker: int, stat: Stat) -> int:
        """One worker's value."""
        return int(self._values[worker * SLOT_WIDTH + stat])

    def total(self, stat: Stat) -> int:
        """One value summed over all workers."""
        return sum(self._values[i * SLOT_WIDTH + stat] for i in range(self.workers))

    # ------------------------------------------------------------ upstream rows
    def upstream_row(self, worker: int, upstream: int) -> memoryview:
        """The values a worker keeps for one upstream (indexed by :class:`Stat`)."""
        start = self._upstreams_base + worker * self._upstreams_width + upstream * SLOT_WIDTH
        return self._values[start : start + SLOT_WIDTH]

    def upstream_get(self, worker: int, upstream: int, stat: Stat) -> int:
        """One worker's value for one upstream."""
        start = self._upstreams_base + worker * self._upstreams_width + upstream * SLOT_WIDTH
        return int(self._values[start + stat])

    def upstream_total(self, upstream: int, stat: Stat) -> int:
        """One upstream's value summed over all workers."""
        return sum(self.upstream_get(i, upstream, stat) for i in range(self.workers))

    # ------------------------------------------------------------ rule rows
    def rule_rows(self, worker: int) -> memoryview:
        """A worker's per-rule counters: rule row r, field f at ``r * RULE_FIELDS + f``."""
        start = self._rules_base + worker * self._rules_width
        return self._values[start : start + self._rules_width]

    def rule_total(self, row: int, field: int) -> int:
        """One per-rule counter summed over all workers."""
        offset = self._rules_base + row * RULE_FIELDS + field
        return sum(self._values[offset + i * self._rules_width] for i in range(self.workers))

    # ------------------------------------------------------------ lifecycle
    def reset_gauges(self, worker: int) -> None:
        """Zero a dead worker's gauges (its own row and its upstream rows)."""
        rows = [self.row(worker)] + [self.upstream_row(worker, u) for u in range(self.upstreams)]
        for row in rows:
            for gauge in GAUGES:
                row[gauge] = 0


def heartbeat_ms() -> int:
    """The clock workers stamp into HEARTBEAT and UPSTREAM_REFUSED_MS."""
    return int(time.monotonic() * 1000)
