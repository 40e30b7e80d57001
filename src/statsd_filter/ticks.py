"""Shared timers: periodic tasks of one event loop with the same interval wake up together.

On a quiet proxy nearly all its CPU goes to timer wake-ups (a return from
epoll, a turn of the event loop, a context switch each), so two tasks that each
sleep a second in a loop cost about twice what one does. A worker's
housekeeping and its upstream health checks both run every second by default;
instead of a timer each, they wait on one :class:`Ticker` for that interval,
handed out by the worker's :class:`Ticks`, and resume in the same loop turn.

A tick is armed only while someone waits: the first task to wait after a tick
arms the next one, one interval later (what ``asyncio.sleep(interval)`` in a
loop gives it); the others join that tick. A task whose own work took a while
(an admin-port health check) therefore waits less than a whole interval, so a
task still runs once per interval, never faster.
"""

from __future__ import annotations

import asyncio

__all__ = ["Ticker", "Ticks"]


class Ticker:
    """One timer for every task waiting on this interval."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.fired = 0  # ticks so far (timers that went off), for tests and curiosity
        self._next: asyncio.Future[None] | None = None

    async def wait(self) -> None:
        """Return at the next tick: at most one interval from now."""
        tick = self._next
        if tick is None or tick.done():
            loop = asyncio.get_running_loop()
            tick = self._next = loop.create_future()
            loop.call_later(self.interval, self._fire, tick)
        # Shielded: one waiter cancelled (a task stopping) must not cancel the others' tick.
        await asyncio.shield(tick)

    def _fire(self, tick: asyncio.Future[None]) -> None:
        self.fired += 1
        if not tick.done():
            tick.set_result(None)


class Ticks:
    """The tickers of one event loop, one per interval."""

    def __init__(self) -> None:
        self._tickers: dict[float, Ticker] = {}

    def ticker(self, interval: float) -> Ticker:
        """The ticker of ``interval`` seconds (the same one for every caller)."""
        ticker = self._tickers.get(interval)
        if ticker is None:
            ticker = self._tickers[interval] = Ticker(interval)
        return ticker
