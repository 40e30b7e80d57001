"""Unit tests for supervisor/taphub.py: watchers, what workers are told, routing, bounds."""

from __future__ import annotations

import asyncio
import json

import pytest

from statsd_filter.protocol.messages import TapAck, TapFilter, TapLines, TapWanted, decode_message
from statsd_filter.supervisor import taphub
from statsd_filter.supervisor.taphub import QUEUE_LINES, TapHub, parse_filter


class Workers:
    """Records what the hub sends to each worker."""

    def __init__(self, alive: list[int]) -> None:
        self.alive = alive
        self.sent: list[tuple[int, TapWanted]] = []

    def send(self, index: int, payload: bytes) -> bool:
        message = decode_message(payload)
        assert isinstance(message, TapWanted)
        self.sent.append((index, message))
        return True


def hub(max_watchers: int = 2, alive: list[int] | None = None) -> tuple[TapHub, Workers]:
    workers = Workers([0, 1] if alive is None else alive)
    return TapHub(workers.send, lambda: workers.alive, max_watchers), workers


def test_parse_filter() -> None:
    """?match= must be a usable glob and ?verdict= one of the three verdicts."""
    assert parse_filter(" api.* ", "BLOCKED") == TapFilter("api.*", "blocked")
    assert parse_filter("", "") == TapFilter(None, None)
    with pytest.raises(ValueError, match="can never match"):
        parse_filter("a|b", None)
    with pytest.raises(ValueError, match="not one of forwarded, blocked, dropped"):
        parse_filter(None, "lost")


def test_workers_hear_of_every_change_and_nothing_without_watchers() -> None:
    """Opening and closing watchers sends every live worker the current filters."""
    tap, workers = hub()
    first = tap.open(TapFilter("a.*", None))
    second = tap.open(TapFilter(None, "blocked"))
    assert first is not None
    assert second is not None
    assert tap.open(TapFilter()) is None  # max_watchers = 2
    assert tap.full
    tap.close(first)
    tap.close(second)
    tap.close(second)  # twice: nothing more is sent
    filters = [(i, m.version, m.filters) for i, m in workers.sent]
    assert filters == [
        (0, 1, (TapFilter("a.*", None),)),
        (1, 1, (TapFilter("a.*", None),)),
        (0, 2, (TapFilter("a.*", None), TapFilter(None, "blocked"))),
        (1, 2, (TapFilter("a.*", None), TapFilter(None, "blocked"))),
        (0, 3, (TapFilter(None, "blocked"),)),
        (1, 3, (TapFilter(None, "blocked"),)),
        (0, 4, ()),
        (1, 4, ()),
    ]


def test_a_restarted_worker_is_told_only_while_someone_watches() -> None:
    """A (re)started worker gets the filters if there are watchers, else nothing."""
    tap, workers = hub()
    tap.on_worker_started(0)
    assert workers.sent == []
    watcher = tap.open(TapFilter())
    assert watcher is not None
    tap.on_ack(TapAck(0, 1))
    tap.on_ack(TapAck(1, 1))
    assert tap.tapping(watcher) == (2, 2)
    tap.on_worker_started(1)
    assert workers.sent[-1][0] == 1
    assert tap.tapping(watcher) == (1, 2)  # until worker 1 acknowledges again


def test_lines_go_to_the_watchers_whose_filter_they_match() -> None:
    """Each watcher gets only its lines, encoded once as NDJSON events."""
    tap, _ = hub(3)
    api = tap.open(TapFilter("api.*", None))
    blocked = tap.open(TapFilter(None, "blocked"))
    assert api is not None
    assert blocked is not None
    tap.on_lines(
        TapLines(
            1,
            2,
            (
                (b"api.a:1|c", "forwarded", "", b""),
                (b"api.b:1|c|#h:1", "blocked", "no-h", b""),
                (b"web.c:1|c", "forwarded", "tag", b"web.c:1|c|#e:x"),
            ),
            skipped=3,
        )
    )
    got_api = [json.loads(line) for line in api.queue]
    assert [e["line"] for e in got_api] == ["api.a:1|c", "api.b:1|c|#h:1"]
    assert got_api[1] == {
        "type": "line",
        "worker": 1,
        "verdict": "blocked",
        "rule": "no-h",
        "line": "api.b:1|c|#h:1",
    }
    assert [json.loads(line)["line"] for line in blocked.queue] == ["api.b:1|c|#h:1"]
    assert api.skipped == blocked.skipped == 3
    everything = tap.open(TapFilter())
    assert everything is not None
    tap.on_lines(TapLines(0, 3, ((b"web.c:1|c", "forwarded", "tag", b"web.c:1|c|#e:x"),)))
    assert json.loads(everything.queue[0])["forwarded_as"] == "web.c:1|c|#e:x"


def test_a_watcher_queue_is_bounded() -> None:
    """Beyond QUEUE_LINES waiting lines, lines are skipped and counted, never queued."""
    tap, _ = hub()
    watcher = tap.open(TapFilter())
    assert watcher is not None
    line = (b"a:1|c", "forwarded", "", b"")
    tap.on_lines(TapLines(0, 1, (line,) * (QUEUE_LINES + 5)))
    assert len(watcher.queue) == QUEUE_LINES
    assert watcher.skipped == 5


def test_stream_events_and_leaving(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stream says ready once workers acknowledge, then lines, skips and heartbeats;
    when it is closed the watcher leaves."""
    monkeypatch.setattr(taphub, "HEARTBEAT", 0.05)

    async def main() -> None:
        tap, workers = hub(1)
        stream = tap.stream(TapFilter("a.*", None))
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.05)
        assert not first.done()  # waiting for the workers to tap
        tap.on_ack(TapAck(0, 1))
        tap.on_ack(TapAck(1, 1))
        ready = json.loads(await asyncio.wait_for(first, 2))
        assert ready == {"type": "ready", "workers": 2, "of": 2, "match": "a.*", "verdict": None}
        assert json.loads(await asyncio.wait_for(stream.__anext__(), 2)) == {"type": "heartbeat"}
        tap.on_lines(TapLines(0, 1, ((b"a.b:1|c", "forwarded", "", b""),), skipped=2))
        chunk = await asyncio.wait_for(stream.__anext__(), 2)
        events = [json.loads(line) for line in chunk.splitlines()]
        assert [e["type"] for e in events] == ["line", "skipped"]
        assert events[1]["lines"] == 2
        # Full: a second stream says so and ends.
        refused = tap.stream(TapFilter())
        assert b"too many" in await refused.__anext__()
        await stream.aclose()
        assert tap.watchers == []
        assert workers.sent[-1][1].filters == ()

    asyncio.run(main())


def test_ready_after_a_timeout_says_how_many_tap(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that never acknowledges delays ready only READY_TIMEOUT, and ready says so."""
    monkeypatch.setattr(taphub, "READY_TIMEOUT", 0.1)

    async def main() -> None:
        tap, _ = hub(1)
        stream = tap.stream(TapFilter())
        pending = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.01)
        tap.on_ack(TapAck(0, 1))
        ready = json.loads(await asyncio.wait_for(pending, 2))
        assert (ready["workers"], ready["of"]) == (1, 2)
        await stream.aclose()

    asyncio.run(main())
