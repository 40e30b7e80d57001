"""Per-upstream health checks, run by every worker for its own senders.

An upstream is healthy when:

* UDP: no ICMP port-unreachable came back since the last check (the sender
  reads its socket's error queue and reports a refusal at once, which takes
  the upstream down without waiting for a check). Every interval in which no
  data went out, and every interval while it is down, the checker sends a
  zero-length probe datagram (StatsD servers ignore empty datagrams), whose
  refusal the next check sees.
* TCP: the connection is up.
* With ``admin_port``: StatsD's admin ``health`` command also answers
  ``health: up`` (what Etsy StatsD's proxy.js checks).

An upstream goes down at its first failure and comes back only after
``RECOVERY_CHECKS`` clean checks in a row. Changes are reported to
``on_change`` (the router moves names off and back onto the ring) and logged
once per change; while an upstream stays down, a summary is logged once a
minute, not a warning per check.

In a worker the checks wait on the worker's shared ticker for their interval
(``ticks.py``), so with the default one-second interval they wake up together
with the worker's housekeeping, not on a timer of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from statsd_filter.stats import Stat
from statsd_filter.ticks import Ticker
from statsd_filter.upstream.base import Upstream

__all__ = ["HealthChecker", "admin_health"]

ADMIN_REPLY_LIMIT = 1024
# Clean checks in a row before an unhealthy upstream is trusted again: one clean
# interval can be luck (a probe skipped, a refusal still on its way), and a
# flapping upstream moves names back and forth and loses lines each time.
RECOVERY_CHECKS = 3
# How often a worker repeats that an upstream is still down.
SUMMARY_INTERVAL = 60.0


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
        *,
        recovery_checks: int = RECOVERY_CHECKS,
        ticker: Ticker | None = None,
    ) -> None:
        """``ticker`` (its interval: ``interval``) shares the checks' timer with other
        periodic tasks; without one, the checker sleeps on its own."""
        self.name = name
        self._sender = sender
        self._c = counters
        self._interval = interval
        self._on_change = on_change
        self._log = log
        self._admin = admin
        self._recovery_checks = recovery_checks
        self._ticker = ticker
        self.healthy = True
        self._clean = 0  # clean checks in a row while unhealthy
        self._down_since = 0.0
        self._summary_at = 0.0
        self._lost_at_down = 0
        self._rerouted_at_down = 0
        self._c[Stat.UPSTREAM_HEALTHY] = 1

    async def run(self) -> None:
        last = time.monotonic()
        while True:
            if self._ticker is not None:
                await self._ticker.wait()
            else:
                await asyncio.sleep(self._interval)
            ok = self._sender.healthy_since(last)
            last = time.monotonic()
            if ok and self._admin is not None:
                ok = await admin_health(*self._admin, timeout=self._interval)
            # Probe every time: an idle upstream (or one out of the ring) gets no
            # data, and without traffic a UDP upstream's death is invisible. The
            # next check sees its refusal, a whole interval later.
            self._sender.probe(force=not self.healthy)
            self.check(ok)

    def check(self, ok: bool) -> None:
        """Take one check's result: leave at once, come back only after clean checks."""
        if self.healthy:
            if not ok:
                self.mark_down("failed its health check")
            return
        if not ok:
            self._clean = 0
            self._summarise()
            return
        self._clean += 1
        if self._clean >= self._recovery_checks:
            self._set(True, "")

    def mark_down(self, why: str) -> None:
        """The upstream failed (a check, or a refusal seen by the sender): out at once."""
        if self.healthy:
            self._set(False, why)

    def _lost(self) -> int:
        c = self._c
        return int(c[Stat.DROPPED_REFUSED] + c[Stat.DROPPED_UPSTREAM] + c[Stat.DROPPED_QUEUE_FULL])

    def _set(self, ok: bool, why: str) -> None:
        self.healthy = ok
        self._clean = 0
        self._c[Stat.UPSTREAM_HEALTHY] = 1 if ok else 0
        now = time.monotonic()
        if ok:
            self._log.warning(
                "upstream %s is healthy again after %.1fs (%d clean checks); "
                "%d line(s) re-routed and %d lost while it was down",
                self.name,
                now - self._down_since,
                self._recovery_checks,
                self._c[Stat.LINES_REROUTED] - self._rerouted_at_down,
                self._lost() - self._lost_at_down,
            )
        else:
            self._down_since = self._summary_at = now
            self._lost_at_down = self._lost()
            self._rerouted_at_down = int(self._c[Stat.LINES_REROUTED])
            self._log.warning("upstream %s is down: %s", self.name, why)
        self._on_change(self.name, ok)

    def _summarise(self) -> None:
        """While down, say so once every SUMMARY_INTERVAL, not on every check."""
        now = time.monotonic()
        if now - self._summary_at < SUMMARY_INTERVAL:
            return
        self._summary_at = now
        self._log.warning(
            "upstream %s still down after %.0fs: %d line(s) re-routed and %d lost so far",
            self.name,
            now - self._down_since,
            self._c[Stat.LINES_REROUTED] - self._rerouted_at_down,
            self._lost() - self._lost_at_down,
        )
