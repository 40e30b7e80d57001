"""A worker's upstream side, built from the configured upstream list.

For each configured upstream: a sender (UDP, TCP, Unix datagram or Unix
stream), a batcher sized for it,
and a health checker; in front of them all, the router that decides which
batcher gets a line (one upstream, shard or mirror). The worker talks to the
:class:`UpstreamSet` only: it hands the router to its pipeline, starts the set,
and drains it at shutdown.

This module sits above the senders (it imports ``udp``, ``tcp`` and ``unix``;
they import only ``base``, and ``unix`` the TCP sender it extends), so there is
no import circle.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence

from statsd_filter.stats import Stat
from statsd_filter.ticks import Ticks
from statsd_filter.upstream.base import Upstream
from statsd_filter.upstream.batcher import Batcher
from statsd_filter.upstream.health import HealthChecker
from statsd_filter.upstream.router import Router
from statsd_filter.upstream.spec import UpstreamSpec
from statsd_filter.upstream.tcp import TcpUpstream
from statsd_filter.upstream.udp import CONFIRM_DELAY, RefusalHandler, UdpUpstream
from statsd_filter.upstream.unix import UnixDatagramUpstream, UnixStreamUpstream

__all__ = ["TCP_UPSTREAM_BATCH", "UpstreamSet", "make_upstream"]

# A TCP upstream has no datagram limit; larger writes mean fewer system calls.
TCP_UPSTREAM_BATCH = 65536


def make_upstream(
    spec: UpstreamSpec,
    counters: memoryview,
    buffer_bytes: int,
    log: logging.Logger,
    on_refused: RefusalHandler | None = None,
) -> Upstream:
    """The sender for one configured upstream."""
    if spec.protocol == "tcp":
        return TcpUpstream(spec.host, spec.port, counters, buffer_bytes, log)
    if spec.protocol == "unix":
        return UnixDatagramUpstream(spec.host, counters, buffer_bytes, log)
    if spec.protocol == "unix+stream":
        return UnixStreamUpstream(spec.host, counters, buffer_bytes, log)
    return UdpUpstream(spec.host, spec.port, counters, buffer_bytes, log, on_refused)


class UpstreamSet:
    """Senders, batchers, health checkers and the router of one worker."""

    def __init__(
        self,
        specs: Sequence[UpstreamSpec],
        mode: str,
        counters_of: Callable[[int], memoryview],
        *,
        buffer_bytes: int,
        max_udp_size: int,
        health_interval: float,
        log: logging.Logger,
        max_unix_payload: int = 8192,
        ticks: Ticks | None = None,
    ) -> None:
        """``counters_of(i)`` is the shared counter row of upstream ``i``; the health
        checks wait on ``ticks``' ticker of ``health_interval``, if given."""
        self._log = log
        self._counters = [counters_of(i) for i in range(len(specs))]
        self._closing = False
        self.senders = [
            make_upstream(
                spec, self._counters[i], buffer_bytes, log, functools.partial(self._on_refused, i)
            )
            for i, spec in enumerate(specs)
        ]
        sizes = {"udp": max_udp_size, "unix": max_unix_payload, "unix+stream": max_unix_payload}
        batchers = [
            Batcher(sizes.get(spec.protocol, TCP_UPSTREAM_BATCH), u.send_batch)
            for spec, u in zip(specs, self.senders, strict=True)
        ]
        self.router = Router(
            [spec.address for spec in specs], batchers, mode, [spec.weight for spec in specs]
        )
        self._checkers = [
            HealthChecker(
                spec.address,
                sender,
                counters_of(i),
                health_interval,
                self._on_health_change,
                log,
                (spec.host, spec.admin_port) if spec.admin_port else None,
                ticker=ticks.ticker(health_interval) if ticks is not None else None,
            )
            for i, (spec, sender) in enumerate(zip(specs, self.senders, strict=True))
        ]
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start connecting every sender, then checking their health."""
        await asyncio.gather(*(sender.start() for sender in self.senders))
        self._tasks = [asyncio.create_task(checker.run()) for checker in self._checkers]

    def _on_refused(self, index: int, payload: bytes | None, lines: int) -> None:
        """Upstream ``index`` refused a datagram: out of the ring, its lines elsewhere."""
        checker = self._checkers[index]
        checker.mark_down("refused (ICMP port unreachable)")
        if payload is None:
            return
        counters = self._counters[index]
        # A datagram without line counts holds aggregated lines (see Router.add_uncounted).
        if not self._closing and self.router.reroute(payload, checker.name, counted=lines > 0):
            counters[Stat.LINES_REROUTED] += lines
            self.router.flush()
        else:
            counters[Stat.DROPPED_REFUSED] += lines

    def _on_health_change(self, name: str, healthy: bool) -> None:
        router = self.router
        if router.set_healthy(name, healthy) and router.mode == "shard":
            verb = "rejoins" if healthy else "leaves"
            self._log.warning("upstream %s %s the hash ring", name, verb)

    async def close(self, timeout: float) -> None:
        """Flush every batch, stop checking, deliver what is buffered within ``timeout``."""
        self.router.flush()
        # Refusals of the last datagrams may still re-route lines: give them
        # their round trip before the senders close.
        deadline = time.monotonic() + timeout
        if any(isinstance(s, UdpUpstream) for s in self.senders):
            await asyncio.sleep(min(CONFIRM_DELAY, timeout))
            self.router.flush()
        self._closing = True
        for task in self._tasks:
            task.cancel()
        remaining = max(0.0, deadline - time.monotonic())
        await asyncio.gather(*(sender.drain(remaining) for sender in self.senders))
