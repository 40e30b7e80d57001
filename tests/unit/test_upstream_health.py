"""Unit tests for statsd_filter.upstream.health: the per-upstream checker and admin_health."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable

from statsd_filter.stats import SLOT_WIDTH, Stat
from statsd_filter.ticks import Ticker
from statsd_filter.upstream.health import RECOVERY_CHECKS, HealthChecker, admin_health

INTERVAL = 0.05
LOG = logging.getLogger("test.health")
DOWN = [False]
CLEAN = [True] * RECOVERY_CHECKS  # enough clean checks in a row to come back


def counters_row() -> memoryview:
    return memoryview(bytearray(SLOT_WIDTH * 8)).cast("Q")


class FakeSender:
    """An Upstream whose health follows a script, recording every check and probe."""

    def __init__(self, script: list[bool], then: bool = True) -> None:
        self._script = list(script)
        self.then = then
        self.checks: list[tuple[float, float]] = []  # (since, when asked)
        self.probes: list[bool] = []  # the force flag of each probe

    def healthy_since(self, since: float) -> bool:
        self.checks.append((since, time.monotonic()))
        return self._script.pop(0) if self._script else self.then

    def probe(self, *, force: bool = False) -> None:
        self.probes.append(force)

    def send_batch(self, payloads: list[bytes], lines: list[int]) -> None:
        raise AssertionError(f"the checker never sends data ({payloads}, {lines})")

    async def start(self) -> None:
        raise AssertionError("the checker never starts the sender")

    async def drain(self, timeout: float) -> None:
        raise AssertionError(f"the checker never drains the sender ({timeout})")


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` every 10 ms; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def checking(checker: HealthChecker, body: Callable[[], Awaitable[None]]) -> None:
    task = asyncio.create_task(checker.run())
    try:
        await body()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def run_script(
    script: list[bool], checks: int, recovery_checks: int = RECOVERY_CHECKS
) -> tuple[list[tuple[str, bool, int]], FakeSender, memoryview]:
    """Run a checker over ``script``; return its changes (name, healthy, at check number)."""
    row = counters_row()
    changes: list[tuple[str, bool, int]] = []
    sender = FakeSender(script)

    def on_change(name: str, healthy: bool) -> None:
        assert row[Stat.UPSTREAM_HEALTHY] == int(healthy)  # gauge set before the callback
        changes.append((name, healthy, len(sender.checks)))

    checker = HealthChecker(
        "10.0.0.1:8125", sender, row, INTERVAL, on_change, LOG, recovery_checks=recovery_checks
    )

    async def body() -> None:
        await until(lambda: len(sender.checks) >= checks)

    asyncio.run(checking(checker, body))
    assert checker.healthy is (not changes or changes[-1][1])
    return changes, sender, row


def test_starts_healthy_and_sets_the_gauge() -> None:
    """A new checker is healthy and sets UPSTREAM_HEALTHY to 1 before any check."""
    row = counters_row()
    checker = HealthChecker("u:1", FakeSender([]), row, INTERVAL, lambda *_: None, LOG)
    assert checker.healthy is True
    assert row[Stat.UPSTREAM_HEALTHY] == 1
    assert sum(row) == 1  # it touched nothing else


def test_reports_each_transition_once() -> None:
    """on_change fires once per change of state, with the name, never for a repeat."""
    script = [True, *DOWN, False, *CLEAN, True, *DOWN, *CLEAN]
    changes, _, row = run_script(script, len(script) + 2)
    name = "10.0.0.1:8125"
    assert [(n, ok) for n, ok, _ in changes] == [(name, False), (name, True)] * 2
    assert row[Stat.UPSTREAM_HEALTHY] == 1


def test_goes_down_at_the_first_failure() -> None:
    """One failed check takes a healthy upstream down at once, gauge to 0."""
    changes, _, row = run_script([True, True, False], 5, recovery_checks=3)
    assert [(ok, at) for _, ok, at in changes] == [(False, 3)]
    assert row[Stat.UPSTREAM_HEALTHY] == 0


def test_comes_back_only_after_clean_checks_in_a_row() -> None:
    """Recovery needs recovery_checks clean checks in a row; a failure restarts the count."""
    script = [False, True, True, False, True, True, True]
    changes, _, _ = run_script(script, len(script) + 2, recovery_checks=3)
    assert [(ok, at) for _, ok, at in changes] == [(False, 1), (True, 7)]


def test_recovery_checks_one_comes_back_at_once() -> None:
    """With recovery_checks=1 the first clean check brings the upstream back."""
    changes, _, _ = run_script([False, True, False, True], 6, recovery_checks=1)
    assert [(ok, at) for _, ok, at in changes] == [(False, 1), (True, 2), (False, 3), (True, 4)]


def test_default_recovery_needs_several_checks() -> None:
    """By default one clean interval is not enough to trust an upstream again."""
    assert RECOVERY_CHECKS > 1
    changes, _, _ = run_script([False, True], 2 + RECOVERY_CHECKS)
    assert [(ok, at) for _, ok, at in changes] == [(False, 1), (True, 1 + RECOVERY_CHECKS)]


def test_mark_down_takes_it_down_at_once() -> None:
    """mark_down() (a refusal the sender saw) reports down once, without waiting for a check."""
    row = counters_row()
    changes: list[bool] = []
    checker = HealthChecker(
        "u", FakeSender([]), row, INTERVAL, lambda _, ok: changes.append(ok), LOG
    )
    checker.mark_down("refused")
    checker.mark_down("refused again")
    assert changes == [False]
    assert checker.healthy is False
    assert row[Stat.UPSTREAM_HEALTHY] == 0
    for _ in range(RECOVERY_CHECKS - 1):
        checker.check(True)
    assert changes == [False]
    checker.check(True)
    assert changes == [False, True]
    assert row[Stat.UPSTREAM_HEALTHY] == 1


def test_checks_and_probes_every_interval() -> None:
    """Every interval: one health check asking about the time since the previous one, one probe."""
    row = counters_row()
    sender = FakeSender([True, False, True])
    checker = HealthChecker("u", sender, row, INTERVAL, lambda *_: None, LOG)
    started = time.monotonic()

    async def body() -> None:
        await until(lambda: len(sender.checks) >= 6)

    asyncio.run(checking(checker, body))
    elapsed = time.monotonic() - started
    checks = len(sender.checks)
    assert len(sender.probes) == checks  # a probe follows each check
    assert checks <= elapsed / INTERVAL + 1  # never faster than the interval
    since_values = [since for since, _ in sender.checks]
    asked_at = [when for _, when in sender.checks]
    assert since_values[0] >= started
    for i in range(1, checks):
        # "since" is when the previous check ran, so no refusal can fall between windows.
        assert asked_at[i - 1] <= since_values[i] <= asked_at[i]
        assert asked_at[i] - asked_at[i - 1] >= INTERVAL * 0.9


def test_probes_are_forced_while_down() -> None:
    """A healthy upstream's probe may be skipped by the sender; a down one's is forced."""
    changes, sender, _ = run_script([True, True, False, False, *CLEAN, True], 9 + RECOVERY_CHECKS)
    assert [ok for _, ok, _ in changes] == [False, True]
    # The probe follows the check, with the state from before that check.
    down_at = 3
    up_at = down_at + 1 + RECOVERY_CHECKS
    assert sender.probes == [down_at < n <= up_at for n in range(1, len(sender.probes) + 1)]


# ------------------------------------------------------------------ admin port
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def answering(reply: bytes, heard: list[bytes]) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            heard.append(await asyncio.wait_for(reader.readline(), 5.0))
            writer.write(reply)
            await writer.drain()
        finally:
            writer.close()

    return handle


def silent(release: asyncio.Event) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(release.wait(), 5.0)
        finally:
            writer.close()

    return handle


async def with_admin(handle: Handler, body: Callable[[int], Awaitable[None]]) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        await body(port)
    finally:
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)  # let the handlers' closes complete


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_admin_health_up() -> None:
    """admin_health sends 'health\\n' and is True when the answer says 'health: up'."""
    heard: list[bytes] = []

    async def body(port: int) -> None:
        assert await admin_health("127.0.0.1", port, timeout=2.0) is True

    asyncio.run(with_admin(answering(b"health: up\n", heard), body))
    assert heard == [b"health\n"]


def test_admin_health_down() -> None:
    """An answer of 'health: down' is False."""
    heard: list[bytes] = []

    async def body(port: int) -> None:
        assert await admin_health("127.0.0.1", port, timeout=2.0) is False

    asyncio.run(with_admin(answering(b"health: down\n", heard), body))
    assert heard == [b"health\n"]


def test_admin_health_closed_without_answer() -> None:
    """A connection closed with no answer at all is False."""

    async def body(port: int) -> None:
        assert await admin_health("127.0.0.1", port, timeout=2.0) is False

    asyncio.run(with_admin(answering(b"", []), body))


def test_admin_health_silence_times_out() -> None:
    """A server that never answers is False after about ``timeout``, not a hang."""

    async def main() -> None:
        release = asyncio.Event()

        async def body(port: int) -> None:
            started = time.monotonic()
            assert await admin_health("127.0.0.1", port, timeout=0.2) is False
            assert 0.15 <= time.monotonic() - started < 3.0
            release.set()

        await with_admin(silent(release), body)

    asyncio.run(main())


def test_admin_health_refused() -> None:
    """A closed admin port (connection refused) is False at once."""

    async def main() -> None:
        started = time.monotonic()
        assert await admin_health("127.0.0.1", closed_port(), timeout=2.0) is False
        assert time.monotonic() - started < 1.5

    asyncio.run(main())


def test_checker_admin_down_makes_healthy_sender_unhealthy() -> None:
    """With an admin port, 'health: down' there makes an otherwise healthy upstream unhealthy."""
    heard: list[bytes] = []
    row = counters_row()
    changes: list[bool] = []

    async def body(port: int) -> None:
        sender = FakeSender([], then=True)
        checker = HealthChecker(
            "u", sender, row, 0.25, lambda _, ok: changes.append(ok), LOG, ("127.0.0.1", port)
        )
        await checking(checker, lambda: until(lambda: checker.healthy is False and len(heard) >= 2))

    asyncio.run(with_admin(answering(b"health: down\n", heard), body))
    assert changes == [False]
    assert row[Stat.UPSTREAM_HEALTHY] == 0


def test_checker_skips_admin_port_when_sender_is_unhealthy() -> None:
    """An upstream already failing its sender check is not asked about on its admin port."""
    heard: list[bytes] = []

    async def body(port: int) -> None:
        sender = FakeSender([], then=False)
        checker = HealthChecker(
            "u", sender, counters_row(), INTERVAL, lambda *_: None, LOG, ("127.0.0.1", port)
        )
        await checking(checker, lambda: until(lambda: len(sender.checks) >= 4))
        assert checker.healthy is False

    asyncio.run(with_admin(answering(b"health: up\n", heard), body))
    assert heard == []


def test_checker_healthy_with_admin_up() -> None:
    """With an admin port answering 'health: up' and a healthy sender, it stays healthy."""
    heard: list[bytes] = []
    changes: list[bool] = []

    async def body(port: int) -> None:
        sender = FakeSender([], then=True)
        checker = HealthChecker(
            "u",
            sender,
            counters_row(),
            0.5,  # the admin query's timeout too: generous for a loaded machine
            lambda _, ok: changes.append(ok),
            LOG,
            ("127.0.0.1", port),
        )
        await checking(checker, lambda: until(lambda: len(sender.checks) >= 2))
        assert checker.healthy is True

    asyncio.run(with_admin(answering(b"health: up\n", heard), body))
    assert changes == []
    assert len(heard) >= 1


def test_checks_wait_on_a_shared_ticker() -> None:
    """With a ticker, the checker checks (and probes) once per tick, on the timer it shares
    with another periodic task: no timer of its own."""
    row = counters_row()
    sender = FakeSender([])
    ticker = Ticker(INTERVAL)
    checker = HealthChecker("u:1", sender, row, INTERVAL, lambda *_: None, LOG, ticker=ticker)
    other_rounds = [0]

    async def other() -> None:  # e.g. the worker's housekeeping
        while True:
            await ticker.wait()
            other_rounds[0] += 1

    async def body() -> None:
        task = asyncio.create_task(other())
        try:
            await until(lambda: len(sender.checks) >= 4)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(checking(checker, body))
    checks = len(sender.checks)
    assert checks >= 4
    assert len(sender.probes) == checks
    # One timer per tick served both tasks.
    assert ticker.fired - 1 <= checks <= ticker.fired
    assert abs(other_rounds[0] - checks) <= 1
