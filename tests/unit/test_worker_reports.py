"""Unit tests for a worker's /top reports: an idle worker does not wake the supervisor
every second, and what it skips is still accounted for as quiet time."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest

from statsd_filter.config import Generation, Settings
from statsd_filter.protocol.messages import TopReport
from statsd_filter.stats import SharedStats
from statsd_filter.worker.main import QUIET_REPORT_MAX, Worker, WorkerSockets


@pytest.fixture
def worker_and_sent(request: pytest.FixtureRequest) -> Iterator[tuple[Worker, list[object]]]:
    window = getattr(request, "param", 10.0)
    parent, child = socket.socketpair()
    generation = Generation(0, Settings(top_window=window), {}, {})
    worker = Worker(
        0, generation, WorkerSockets([], None), SharedStats(1, 4), child, logging.getLogger("t")
    )
    sent: list[object] = []

    def send(message: object, *, droppable: bool = False) -> None:
        assert droppable  # a report may be dropped when the channel is full
        sent.append(message)

    worker._send = send  # type: ignore[method-assign]
    try:
        yield worker, sent
    finally:
        parent.close()
        child.close()


def empty(period: float = 1.0) -> TopReport:
    return TopReport(0, period, 1, 0, {})


def busy(period: float = 1.0) -> TopReport:
    return TopReport(0, period, 1, 3, {b"api.a": (3.0, 30.0, 3.0, 30.0, 0.0, 0.0, 3, 0, {}, 3.0)})


def test_reports_with_lines_go_every_time(worker_and_sent: tuple[Worker, list[object]]) -> None:
    """A worker whose points saw lines sends every report, with no quiet time."""
    worker, sent = worker_and_sent
    for _ in range(5):
        worker._report(busy())
    assert sent == [busy()] * 5


def test_empty_reports_go_once_per_quiet_spell(
    worker_and_sent: tuple[Worker, list[object]],
) -> None:
    """An idle worker sends one report per QUIET_REPORT_MAX seconds, not one a second,
    and that report carries the seconds of the empty ones it did not send. Its first
    report goes at once, so /top lists it from the start."""
    worker, sent = worker_and_sent
    assert QUIET_REPORT_MAX == 5.0
    for _ in range(21):
        worker._report(empty())
    # 21 quiet seconds: the first report, then one per 5 s; not 21.
    assert [(r.quiet, r.period) for r in sent if isinstance(r, TopReport)] == [
        (0.0, 1.0),
        (4.0, 1.0),
        (4.0, 1.0),
        (4.0, 1.0),
        (4.0, 1.0),
    ]


def test_first_report_after_quiet_carries_the_quiet_time(
    worker_and_sent: tuple[Worker, list[object]],
) -> None:
    """Lines after a quiet spell are sent at once, with the spell's seconds."""
    worker, sent = worker_and_sent
    worker._report(empty(0.001))  # at start
    worker._report(empty(1.0))
    worker._report(empty(1.5))
    worker._report(busy(1.0))
    worker._report(busy(1.0))
    reports = [(r.quiet, r.hits) for r in sent if isinstance(r, TopReport)]
    assert reports == [(0.0, 0), (2.5, 3), (0.0, 3)]


@pytest.mark.parametrize("worker_and_sent", [2.0], indirect=True)
def test_short_window_keeps_an_idle_worker_in_it(
    worker_and_sent: tuple[Worker, list[object]],
) -> None:
    """With a 2 s window an idle worker reports every second (half the window), so the
    supervisor always holds one of its reports."""
    worker, sent = worker_and_sent
    for _ in range(6):
        worker._report(empty())
    assert len(sent) == 6
    assert all(isinstance(r, TopReport) and r.quiet == 0.0 for r in sent)
