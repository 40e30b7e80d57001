"""Unit tests for statsd_filter.ticks: periodic tasks sharing one timer per interval."""

from __future__ import annotations

import asyncio
import contextlib

from statsd_filter.ticks import Ticker, Ticks

INTERVAL = 0.01


def test_one_ticker_per_interval() -> None:
    """Every caller asking for an interval gets the same ticker; another interval, another."""
    ticks = Ticks()
    assert ticks.ticker(1.0) is ticks.ticker(1.0)
    assert ticks.ticker(1.0) is not ticks.ticker(2.0)
    assert ticks.ticker(2.0).interval == 2.0


def test_waiters_share_one_timer() -> None:
    """Three tasks waiting in a loop resume on the same ticks: one timer per tick,
    not one per task (the wake-ups an idle worker saves)."""
    ticker = Ticker(INTERVAL)
    rounds: list[int] = [0, 0, 0]

    async def task(i: int) -> None:
        while True:
            await ticker.wait()
            rounds[i] += 1

    async def scenario() -> None:
        tasks = [asyncio.create_task(task(i)) for i in range(3)]
        for _ in range(500):
            if min(rounds) >= 5:
                break
            await asyncio.sleep(0.002)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(scenario())
    assert min(rounds) >= 5
    # Every task saw every tick (or the one before it started), and each tick was one timer.
    assert max(rounds) - min(rounds) <= 1
    assert ticker.fired in (max(rounds), max(rounds) + 1)


def test_cancelled_waiter_does_not_cancel_the_tick() -> None:
    """A task stopping (cancelled while waiting) leaves the others' tick alone."""
    ticker = Ticker(INTERVAL)

    async def scenario() -> bool:
        stopping = asyncio.create_task(ticker.wait())
        staying = asyncio.create_task(ticker.wait())
        await asyncio.sleep(0)
        stopping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopping
        await asyncio.wait_for(staying, 5.0)
        return staying.done() and not staying.cancelled()

    assert asyncio.run(scenario())
    assert ticker.fired == 1


def test_a_late_waiter_joins_the_armed_tick() -> None:
    """A task that waits while a tick is armed resumes on it, not an interval later:
    each task still runs once per interval, never faster, and no second timer is armed."""
    ticker = Ticker(INTERVAL)

    async def scenario() -> None:
        first = asyncio.create_task(ticker.wait())
        await asyncio.sleep(0)
        second = asyncio.create_task(ticker.wait())
        await asyncio.wait_for(asyncio.gather(first, second), 5.0)

    asyncio.run(scenario())
    assert ticker.fired == 1
