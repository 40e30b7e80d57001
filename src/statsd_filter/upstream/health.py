"""Per-upstream health checks, run by every worker for its own senders.

An upstream is healthy when:

* UDP: no ICMP port-unreachable came back since the last check. A connected
  UDP socket reports it as ``ECONNREFUSED``; the sender reads its socket to
  notice at once. In every interval in which no data went out, the checker
  sends a zero-length probe datagram (StatsD servers ignore empty datagrams),
  because an idle upstream, or one taken out of the ring, gets no data that
  could be refused; the upstream is healthy again once an interval passes
  without a refusal.
* TCP: the connection is up.
* With ``admin_port``: StatsD's admin ``health`` command also answers
  ``health: up`` (what Etsy StatsD's proxy.js checks).

Changes are reported to ``on_change`` (the router moves names off and back
onto the ring) and logged once per change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from statsd_filter.stats import Stat
from statsd_filter.upstream.base import Upstream

__all__ = ["HealthChecker", "admin_health"]

ADMIN_REPLY_LIMIT = 1024


async def admin_health(host: str, port: int, timeout: float) -> bool:
    """True if the StatsD admin port answers ``health`` with ``health: up``."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"health\n")
            await writer.drain()
            reply = await reader.readline()
    except (OSError, TimeoutError):
        return False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    return b"up" in reply[:ADMIN_REPLY_LIMIT]


class HealthChecker:
    """Checks one upstream every ``interval`` seconds and reports changes."""

    def __init__(
        self,
        name: str,
        sender: Upstream,
        counters: memoryview,
        interval: float,
        on_change: Callable[[str, bool], None],
        log: logging.Logger,
        admin: tuple[str, int] | None = None,
    ) -> None:
        self.name = name
        self._sender = sender
        self._c = counters
        self._interval = interval
        self._on_change = on_change
        self._log = log
        self._admin = admin
        self.healthy = True
        self._c[Stat.UPSTREAM_HEALTHY] = 1

    async def run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self._interval)
            ok = self._sender.healthy_since(last)
            last = time.monotonic()
            if ok and self._admin is not None:
                ok = await admin_health(*self._admin, timeout=self._interval)
            # Probe every time: an idle upstream (or one out of the ring) gets no
            # data, and without traffic a UDP upstream's death is invisible.
            self._sender.probe()
            self._set(ok)

    def _set(self, ok: bool) -> None:
        self._c[Stat.UPSTREAM_HEALTHY] = 1 if ok else 0
        if ok == self.healthy:
            return
        self.healthy = ok
        if ok:
            self._log.warning("upstream %s is healthy again", self.name)
        else:
            self._log.warning("upstream %s failed its health check", self.name)
        self._on_change(self.name, ok)
