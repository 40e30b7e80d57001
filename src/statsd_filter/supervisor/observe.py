"""What the admin endpoint shows: /healthz (JSON) and /metrics (Prometheus).

Both are read from the shared counters the workers write, the supervisor's
view of its workers, and the reload status; the supervisor never asks a
worker. /metrics is a ``prometheus_client`` custom collector over those
counters: the library does the exposition (HELP/TYPE lines, label escaping),
so rule names and upstream addresses may hold any character.

Counting each line once: a sharded line goes to one upstream, so per-upstream
values add up; a mirrored line goes to every upstream, so the first upstream
stands for the line in the proxy-wide totals (each upstream has its own series).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from statsd_filter import __version__
from statsd_filter.buildinfo import build_info
from statsd_filter.config import Settings
from statsd_filter.limitpool import LimitPool
from statsd_filter.rules.filter import RULE_FIELDS
from statsd_filter.stats import (
    AGGREGATE_FLUSH_REASONS,
    GAUGES,
    UPSTREAM_DROP_REASONS,
    WORKER_DROP_REASONS,
    SharedStats,
    Stat,
    WorkerState,
    heartbeat_ms,
)
from statsd_filter.supervisor.limits import read_state
from statsd_filter.supervisor.process import WorkerInfo
from statsd_filter.supervisor.reload import Reloader, Rollout

__all__ = ["Observer"]

# A UDP upstream counts as "refused" this long after the last ICMP refusal.
REFUSED_WINDOW_MS = 5000
PREFIX = "statsd_filter_"
RULE_METRICS = (
    ("rule_matches", "Lines each rule decided."),
    ("rule_lines_saved", "Lines each rule removed (dropped or sampled away)."),
    ("rule_bytes_saved", "Bytes each rule removed from the upstream stream."),
    ("rule_limited", "Lines a limit rule dropped or stripped of tags (over its limit)."),
    (
        "rule_series_limited",
        (
            "New series (limit_series) or tag values (limit_tag_values) a limit rule refused, "
            "each once per window."
        ),
    ),
    (
        "rule_tracking_full",
        (
            "New series a limit rule met with its max_tracked table full: refused although "
            "its budget had room, or refused without being remembered."
        ),
    ),
)
assert len(RULE_METRICS) == RULE_FIELDS


class Observer:
    """Builds /healthz and /metrics from the shared counters and the supervisor's state."""

    def __init__(
        self,
        stats: SharedStats,
        workers: Sequence[WorkerInfo],
        reloader: Reloader,
        rollout: Rollout,
        listen_port: int,
        kernel_drops: Callable[[], int],
        stopping: Callable[[], bool],
        pool: LimitPool | None = None,
    ) -> None:
        self.stats = stats
        self.pool = pool
        self.workers = workers
        self.reloader = reloader
        self.rollout = rollout
        self.listen_port = listen_port
        self.kernel_drops = kernel_drops
        self.stopping = stopping
        self.started = time.time()
        self.build = build_info()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    @property
    def settings(self) -> Settings:
        return self.reloader.current.settings

    # ------------------------------------------------------------ shared helpers
    def upstream_state(self, u: int) -> str:
        """up, down, refused or partial: one upstream as all live workers see it."""
        alive = [w.index for w in self.workers if w.alive]
        if not alive:
            return "down"
        get = self.stats.upstream_get
        now = heartbeat_ms()
        refused = any(
            0 < now - get(i, u, Stat.UPSTREAM_REFUSED_MS) < REFUSED_WINDOW_MS
            for i in alive
            if get(i, u, Stat.UPSTREAM_REFUSED_MS)
        )
        if refused:
            return "refused"
        ok = sum(
            1
            for i in alive
            if get(i, u, Stat.UPSTREAM_CONNECTED) and get(i, u, Stat.UPSTREAM_HEALTHY)
        )
        if ok == len(alive):
            return "up"
        return "down" if ok == 0 else "partial"

    def primary_total(self, stat: Stat) -> int:
        """A per-upstream value summed over the upstreams that count each line once."""
        specs = self.settings.effective_upstreams
        count = 1 if self.settings.upstream_mode_in_use == "mirror" else len(specs)
        return sum(self.stats.upstream_total(u, stat) for u in range(count))

    def all_upstreams_total(self, stat: Stat) -> int:
        """A per-upstream value summed over every upstream."""
        count = len(self.settings.effective_upstreams)
        return sum(self.stats.upstream_total(u, stat) for u in range(count))

    def dropped(self) -> dict[str, int]:
        """Lines lost, by reason, proxy-wide."""
        t = self.stats.total
        out = {reason: t(stat) for stat, reason in WORKER_DROP_REASONS.items()}
        out.update(
            (reason, self.primary_total(stat)) for stat, reason in UPSTREAM_DROP_REASONS.items()
        )
        return out

    def totals(self) -> dict[str, int]:
        """Proxy-wide line counts: received, forwarded, blocked, dropped (all reasons)."""
        t = self.stats.total
        return {
            "received": t(Stat.LINES_RECEIVED),
            "forwarded": self.primary_total(Stat.LINES_FORWARDED),
            "blocked": t(Stat.LINES_BLOCKED),
            "aggregated": t(Stat.LINES_AGGREGATED),
            "dropped": sum(self.dropped().values()),
        }

    def held(self, worker: int) -> list[int]:
        """Lines one worker has read but not yet accounted for, per upstream.

        ``received - blocked - aggregated - dropped - forwarded`` of that
        worker's slot: lines waiting in its aggregator, batchers and sender
        buffers (and, for UDP, sent but not yet confirmed). Once the worker is
        dead, they are lost. The first value is what counts proxy-wide (every value, in mirror mode,
        where each upstream gets its own copy of a line; one value otherwise).
        """
        g = self.stats.get
        up = self.stats.upstream_get
        count = len(self.settings.effective_upstreams)
        entered = (
            g(worker, Stat.LINES_RECEIVED)
            - g(worker, Stat.LINES_BLOCKED)
            - g(worker, Stat.DROPPED_OVERSIZE)
            - g(worker, Stat.DROPPED_PARTIAL)
            - g(worker, Stat.LINES_AGGREGATED)
        )

        def out(u: int) -> int:
            return up(worker, u, Stat.LINES_FORWARDED) + sum(
                up(worker, u, stat) for stat in UPSTREAM_DROP_REASONS
            )

        if self.settings.upstream_mode_in_use == "mirror":
            return [
                entered - out(u) - up(worker, u, Stat.UPSTREAM_WORKER_DIED) for u in range(count)
            ]
        return [entered - g(worker, Stat.DROPPED_WORKER_DIED) - sum(map(out, range(count)))]

    # ------------------------------------------------------------ /healthz
    def healthz(self) -> tuple[int, dict[str, Any]]:
        """The HTTP status and the JSON document of /healthz."""
        stats = self.stats
        workers = []
        for w in self.workers:
            state = WorkerState(stats.get(w.index, Stat.STATE)).name.lower()
            workers.append(
                {
                    "index": w.index,
                    "pid": w.pid if w.alive else None,
                    "state": state if w.alive else "restarting",
                    "restarts": w.restarts,
                    "tcp_connections": stats.get(w.index, Stat.TCP_CONNECTIONS_OPEN),
                    "unix_connections": stats.get(w.index, Stat.UNIX_CONNECTIONS_OPEN),
                    "last_exit": w.last_exit or None,
                    "config_generation": self.rollout.applied.get(w.index),
                }
            )
        running = sum(1 for w in workers if w["state"] == "running")
        s = self.settings
        specs = s.effective_upstreams
        states = [self.upstream_state(u) for u in range(len(specs))]
        if len(states) == 1:
            upstream = states[0]
        elif set(states) == {"up"}:
            upstream = "up"
        else:
            upstream = "down" if not {"up", "partial"} & set(states) else "partial"
        if self.stopping():
            status = "stopping"
        elif running == len(workers) and upstream == "up":
            status = "ok"
        else:
            status = "degraded"
        reload_status = self.reloader.status
        single = len(specs) == 1
        payload = {
            "status": status,
            "version": __version__,
            "build": self.build.as_dict(),
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 3),
            "listen": {
                "host": s.listen_host,
                "port": self.listen_port,
                "protocols": list(s.protocols),
                "unix_socket": s.unix_socket,
                "unix_stream_socket": s.unix_stream_socket,
            },
            "upstream": {
                "address": specs[0].address if single else None,
                "protocol": specs[0].protocol if single else None,
                "mode": s.upstream_mode_in_use,
                "state": upstream,
            },
            "upstreams": [
                {
                    "address": spec.address,
                    "protocol": spec.protocol,
                    "weight": spec.weight,
                    "state": state,
                    "lines_sent": stats.upstream_total(u, Stat.LINES_FORWARDED),
                    "buffered_bytes": stats.upstream_total(u, Stat.UPSTREAM_BUFFERED_BYTES),
                }
                for u, (spec, state) in enumerate(zip(specs, states, strict=True))
            ],
            "workers": workers,
            "config": {
                "file": s.config_file,
                "generation": self.reloader.current.number,
                "rules": len(s.all_rules),
                "last_reload": reload_status.last,
                "reload_failures": reload_status.failures,
                "restart_required": reload_status.restart_required,
            },
        }
        return (200 if running else 503), payload


class _Collector(Collector):
    """The shared counters as Prometheus metric families, read at each scrape."""

    def __init__(self, observer: Observer) -> None:
        self._o = observer

    def collect(self) -> Iterator[Metric]:
        o = self._o
        t = o.stats.total
        totals = o.totals()

        def counter(name: str, help_text: str, value: int) -> CounterMetricFamily:
            return CounterMetricFamily(PREFIX + name, help_text, value=value)

        def gauge(name: str, help_text: str, value: int) -> GaugeMetricFamily:
            return GaugeMetricFamily(PREFIX + name, help_text, value=value)

        build = o.build
        info = GaugeMetricFamily(
            PREFIX + "build_info",
            "Always 1; the labels say the version, whether the C accelerator (c) or the "
            "pure-Python fallback (python) moves datagrams, and whether Hyperscan is installed.",
            labels=["version", "accelerator", "hyperscan", "python"],
        )
        info.add_metric(
            [
                build.version,
                build.accelerator,
                "yes" if build.hyperscan is not None else "no",
                build.python.split(" ", 1)[0],
            ],
            1,
        )
        yield info
        yield counter(
            "lines_received_total",
            "Non-empty lines read from clients (UDP, TCP and Unix sockets).",
            totals["received"],
        )
        yield counter(
            "lines_forwarded_total",
            "Lines handed to the upstream socket(s); a mirrored line counts once.",
            totals["forwarded"],
        )
        yield counter(
            "lines_blocked_total",
            "Lines removed by rules: every rule drop (the blocklist included), lines no rule "
            "allowed in allowlist mode, and lines sampled away.",
            totals["blocked"],
        )
        yield counter(
            "lines_aggregated_total",
            "Input lines merged by pre-aggregation into lines handed to the upstream "
            "socket(s) (counted when handed over, at a flush).",
            totals["aggregated"],
        )
        yield counter(
            "aggregate_lines_out_total",
            "Lines pre-aggregation made of them (not in lines_forwarded_total).",
            t(Stat.AGGREGATE_LINES_OUT),
        )
        yield gauge(
            "aggregate_series",
            "Series held by pre-aggregation, summed over workers.",
            t(Stat.AGGREGATE_SERIES),
        )
        flushes = CounterMetricFamily(
            PREFIX + "aggregate_flushes",
            "Pre-aggregation flushes, by reason (interval, cap, reload, shutdown).",
            labels=["reason"],
        )
        for stat, reason in AGGREGATE_FLUSH_REASONS.items():
            flushes.add_metric([reason], t(stat))
        yield flushes
        dropped = CounterMetricFamily(
            PREFIX + "lines_dropped_total",
            "Lines lost, by reason (oversize, partial, worker_died, upstream, queue_full, "
            "refused).",
            labels=["reason"],
        )
        for reason, value in o.dropped().items():
            dropped.add_metric([reason], value)
        yield dropped
        yield counter(
            "datagrams_received_total",
            "Datagrams read (UDP and Unix datagram socket).",
            t(Stat.DATAGRAMS_IN),
        )
        yield counter(
            "bytes_received_total", "Bytes read from clients (every input).", t(Stat.BYTES_IN)
        )
        yield counter(
            "datagrams_sent_total",
            "Upstream datagrams (or TCP writes) sent, all upstreams.",
            o.all_upstreams_total(Stat.DATAGRAMS_OUT),
        )
        yield counter(
            "bytes_sent_total",
            "Bytes sent upstream, all upstreams.",
            o.all_upstreams_total(Stat.BYTES_OUT),
        )
        yield counter(
            "receive_errors_total",
            "Errors reading the UDP or Unix datagram socket.",
            t(Stat.RECEIVE_ERRORS),
        )
        # The socket's own drop count: it lives as long as the supervisor, so it
        # never goes backwards (a counter), even across worker restarts.
        yield counter(
            "udp_kernel_drops_total",
            "Datagrams the kernel dropped on the listening socket because its receive "
            "buffer was full.",
            o.kernel_drops(),
        )
        yield gauge(
            "tcp_connections_open", "TCP client connections open.", t(Stat.TCP_CONNECTIONS_OPEN)
        )
        yield counter(
            "tcp_connections_accepted_total",
            "TCP clients accepted.",
            t(Stat.TCP_CONNECTIONS_ACCEPTED),
        )
        yield counter(
            "tcp_connections_rejected_total",
            "TCP clients refused (max_connections or out of descriptors).",
            t(Stat.TCP_CONNECTIONS_REJECTED),
        )
        yield counter(
            "tcp_idle_closed_total", "TCP clients closed for idleness.", t(Stat.TCP_IDLE_CLOSED)
        )
        yield from self._unix()
        yield counter(
            "upstream_errors_total",
            "Upstream send, connect and resolve errors and refusals, all upstreams.",
            o.all_upstreams_total(Stat.UPSTREAM_ERRORS),
        )
        yield counter(
            "upstream_connects_total",
            "Successful TCP and Unix socket upstream connects, all upstreams.",
            o.all_upstreams_total(Stat.UPSTREAM_RECONNECTS),
        )
        yield from self._per_upstream()
        yield counter(
            "config_reloads_total",
            "Config reloads applied (SIGHUP or --watch-config).",
            o.reloader.status.successes,
        )
        yield counter(
            "config_reload_failures_total",
            "Config reloads rejected (the running config was kept).",
            o.reloader.status.failures,
        )
        yield gauge(
            "config_generation",
            "Generation of the running config (0 at start).",
            o.reloader.current.number,
        )
        rows = o.reloader.current.rows
        for field, (name, help_text) in enumerate(RULE_METRICS):
            family = CounterMetricFamily(PREFIX + name, help_text, labels=["rule"])
            for rule, row in rows.items():
                family.add_metric([rule], o.stats.rule_total(row, field))
            yield family
        yield from self._limits()
        workers = o.workers
        yield gauge("workers", "Worker processes alive.", sum(1 for w in workers if w.alive))
        yield counter(
            "worker_restarts_total",
            "Workers restarted after dying.",
            sum(w.restarts for w in workers),
        )

    def _unix(self) -> Iterator[Metric]:
        """The Unix socket inputs' share of the input counters, and their own."""
        t = self._o.stats.total
        unix: tuple[tuple[str, str, Stat], ...] = (
            (
                "unix_datagrams_received_total",
                "Datagrams read from the Unix datagram socket.",
                Stat.UNIX_DATAGRAMS_IN,
            ),
            (
                "unix_bytes_received_total",
                "Bytes read from the Unix datagram and stream sockets.",
                Stat.UNIX_BYTES_IN,
            ),
            (
                "unix_connections_open",
                "Unix stream socket clients connected.",
                Stat.UNIX_CONNECTIONS_OPEN,
            ),
            (
                "unix_connections_accepted_total",
                "Unix stream socket clients accepted.",
                Stat.UNIX_CONNECTIONS_ACCEPTED,
            ),
            (
                "unix_connections_rejected_total",
                "Unix stream socket clients refused (max_connections or out of descriptors).",
                Stat.UNIX_CONNECTIONS_REJECTED,
            ),
            (
                "unix_idle_closed_total",
                "Unix stream socket clients closed for idleness.",
                Stat.UNIX_IDLE_CLOSED,
            ),
            (
                "unix_frames_rejected_total",
                (
                    "Unix datagrams or stream length prefixes over unix_socket_max_payload "
                    "(each also counts as one oversize line; a stream is closed)."
                ),
                Stat.UNIX_FRAMES_REJECTED,
            ),
            (
                "unix_origin_tagged_total",
                "Lines given their sender's container id (unix_origin_detection).",
                Stat.UNIX_ORIGIN_TAGGED,
            ),
        )
        for name, help_text, stat in unix:
            kind = GaugeMetricFamily if stat in GAUGES else CounterMetricFamily
            yield kind(PREFIX + name, help_text, value=t(stat))

    def _limits(self) -> Iterator[Metric]:
        o = self._o
        generation = o.reloader.current
        series = GaugeMetricFamily(
            PREFIX + "rule_series",
            "Series (limit_series) or tag values (limit_tag_values) a limit rule admitted in "
            "its current window.",
            labels=["rule"],
        )
        memory = GaugeMetricFamily(
            PREFIX + "rule_limit_memory_bytes",
            "Shared memory a limit rule's table takes (pages are used as it fills).",
            labels=["rule"],
        )
        now = time.monotonic()
        for spec in generation.settings.all_rules:
            slot = generation.limits.get(spec.name)
            if slot is None or o.pool is None:
                continue
            state = read_state(o.pool, slot)
            current = state.window == int(now // spec.window)
            series.add_metric([spec.name], state.admitted if current else 0)
            memory.add_metric([spec.name], slot.size)
        yield series
        yield memory

    def _per_upstream(self) -> Iterator[Metric]:
        o = self._o
        stats = o.stats
        specs = o.settings.effective_upstreams
        addresses = [spec.address for spec in specs]
        up = GaugeMetricFamily(
            PREFIX + "upstream_up",
            "1 if every worker finds the upstream healthy, else 0.",
            labels=["upstream"],
        )
        for u, address in enumerate(addresses):
            up.add_metric([address], int(o.upstream_state(u) == "up"))
        yield up
        per_upstream: tuple[tuple[str, str, Stat], ...] = (
            ("upstream_lines_sent", "Lines sent.", Stat.LINES_FORWARDED),
            ("upstream_bytes_sent", "Bytes sent.", Stat.BYTES_OUT),
            ("upstream_failures", "Errors and refusals.", Stat.UPSTREAM_ERRORS),
            ("upstream_buffered_bytes", "Bytes waiting.", Stat.UPSTREAM_BUFFERED_BYTES),
        )
        for name, help_text, stat in per_upstream:
            kind = GaugeMetricFamily if stat in GAUGES else CounterMetricFamily
            family = kind(PREFIX + name, f"{help_text} Per upstream.", labels=["upstream"])
            for u, address in enumerate(addresses):
                family.add_metric([address], stats.upstream_total(u, stat))
            yield family
        dropped = CounterMetricFamily(
            PREFIX + "upstream_dropped",
            "Lines each upstream lost, by reason.",
            labels=["upstream", "reason"],
        )
        reasons = [*UPSTREAM_DROP_REASONS.items(), (Stat.UPSTREAM_WORKER_DIED, "worker_died")]
        for u, address in enumerate(addresses):
            for stat, reason in reasons:
                dropped.add_metric([address, reason], stats.upstream_total(u, stat))
        yield dropped
        rerouted = CounterMetricFamily(
            PREFIX + "upstream_lines_rerouted",
            "Lines an upstream refused that went to another upstream instead.",
            labels=["upstream"],
        )
        for u, address in enumerate(addresses):
            rerouted.add_metric([address], stats.upstream_total(u, Stat.LINES_REROUTED))
        yield rerouted
        yield GaugeMetricFamily(
            PREFIX + "buffered_bytes",
            "Bytes waiting for any upstream (the sum of upstream_buffered_bytes).",
            value=o.all_upstreams_total(Stat.UPSTREAM_BUFFERED_BYTES),
        )
