"""/metrics: the shared counters as Prometheus metric families, read at each scrape.

A ``prometheus_client`` custom collector over the :class:`Observer`'s view: the
library does the exposition (HELP/TYPE lines, label escaping), so rule names
and upstream addresses may hold any character. How lines are counted once
across upstreams: see ``observe.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from statsd_filter.rules.filter import RULE_FIELDS
from statsd_filter.stats import AGGREGATE_FLUSH_REASONS, GAUGES, UPSTREAM_DROP_REASONS, Stat
from statsd_filter.supervisor.limits import read_state
from statsd_filter.supervisor.observe import Observer

__all__ = ["MetricsCollector", "metrics_registry"]

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


def metrics_registry(observer: Observer) -> CollectorRegistry:
    """A registry holding only the proxy's collector (no process or GC metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(observer))
    return registry


class MetricsCollector(Collector):
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
