"""``/tap``: live sampled lines with their verdicts, for a bounded set of watchers.

Nobody watching, nothing flows: workers send tap lines only after a
:class:`~statsd_filter.protocol.messages.TapWanted` naming at least one
watcher's filter, and stop when the last watcher leaves. Every change of the
watchers sends the new list to every worker (and a restarted worker gets it
when it starts); each worker acknowledges, and a watcher's stream begins with
a ``ready`` event once every live worker taps for it (or after
:data:`READY_TIMEOUT`, saying how many do).

Bounds, so watching can never slow the data path: at most ``max_watchers``
streams (the next is refused with 503); each worker sends at most
``worker/sampler.py``'s ``TAP_BATCH`` lines per batch, dropping and counting the
rest; each watcher has a queue of at most :data:`QUEUE_LINES` lines, beyond
which lines are skipped (and the stream says how many), never buffered; a
watcher that stops reading is cut off by the admin server's write timeout.

The stream is NDJSON, one object per line::

    {"type": "ready", "workers": 2, "of": 2, "match": "api.*", "verdict": null}
    {"type": "line", "worker": 0, "verdict": "forwarded", "rule": null, "line": "api.x:1|c"}
    {"type": "line", ..., "verdict": "forwarded", "rule": "tag-env", "line": "...",
     "forwarded_as": "api.x:1|c|#env:prod"}
    {"type": "skipped", "lines": 120}
    {"type": "heartbeat"}

``forwarded_as`` is present when a rule rewrote the line; ``heartbeat`` comes
after :data:`HEARTBEAT` seconds without anything else.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence

from statsd_filter.protocol.messages import (
    TapAck,
    TapFilter,
    TapLines,
    TapWanted,
    encode_message,
)
from statsd_filter.rules.filter import BLOCKED, DROPPED, FORWARDED
from statsd_filter.rules.glob import glob_to_regex, validate_glob
from statsd_filter.worker.sampler import line_name

__all__ = ["HEARTBEAT", "QUEUE_LINES", "READY_TIMEOUT", "TapHub", "Watcher", "parse_filter"]

VERDICTS = (FORWARDED, BLOCKED, DROPPED)
QUEUE_LINES = 2000
HEARTBEAT = 5.0
READY_TIMEOUT = 5.0
_READY_POLL = 0.02


def parse_filter(match: str | None, verdict: str | None) -> TapFilter:
    """A watcher's filter from ``?match=`` and ``?verdict=``; ValueError says what is wrong."""
    if match is not None:
        match = match.strip() or None
    if match is not None:
        problem = validate_glob(match)
        if problem:
            raise ValueError(problem)
    if verdict is not None:
        verdict = verdict.strip().lower() or None
    if verdict is not None and verdict not in VERDICTS:
        raise ValueError(f"verdict {verdict!r} is not one of {', '.join(VERDICTS)}")
    return TapFilter(match, verdict)


class Watcher:
    """One /tap stream: its filter and a bounded queue of encoded lines."""

    def __init__(self, tap_filter: TapFilter, version: int) -> None:
        self.filter = tap_filter
        self.version = version  # the TapWanted that first included it
        self._glob = re.compile(glob_to_regex(tap_filter.match)) if tap_filter.match else None
        self.queue: deque[bytes] = deque()
        self.skipped = 0
        self.wake = asyncio.Event()

    def wants(self, name: bytes, verdict: str) -> bool:
        if self.filter.verdict is not None and verdict != self.filter.verdict:
            return False
        return self._glob is None or self._glob.fullmatch(name) is not None

    def push(self, encoded: bytes) -> None:
        if len(self.queue) >= QUEUE_LINES:
            self.skipped += 1
        else:
            self.queue.append(encoded)
        self.wake.set()

    def skip(self, count: int) -> None:
        self.skipped += count
        self.wake.set()


class TapHub:
    """The current watchers, what the workers were told, and the routing of their lines."""

    def __init__(
        self,
        send: Callable[[int, bytes], bool],
        alive: Callable[[], Sequence[int]],
        max_watchers: int,
    ) -> None:
        self._send = send
        self._alive = alive
        self.max_watchers = max_watchers
        self.watchers: list[Watcher] = []
        self._version = 0
        self._acked: dict[int, int] = {}

    @property
    def full(self) -> bool:
        return len(self.watchers) >= self.max_watchers

    def _wanted(self) -> TapWanted:
        return TapWanted(self._version, tuple(w.filter for w in self.watchers))

    def _broadcast(self) -> None:
        self._version += 1
        payload = encode_message(self._wanted())
        for index in self._alive():
            self._send(index, payload)

    def open(self, tap_filter: TapFilter) -> Watcher | None:
        """Register a watcher and tell the workers; None when ``max_watchers`` watch already."""
        if self.full:
            return None
        watcher = Watcher(tap_filter, self._version + 1)
        self.watchers.append(watcher)
        self._broadcast()
        return watcher

    def close(self, watcher: Watcher) -> None:
        """A watcher left: tell the workers (the last one leaving stops the lines)."""
        if watcher in self.watchers:
            self.watchers.remove(watcher)
            self._broadcast()

    def tapping(self, watcher: Watcher) -> tuple[int, int]:
        """(live workers tapping for ``watcher``, live workers)."""
        alive = list(self._alive())
        done = sum(1 for i in alive if self._acked.get(i, 0) >= watcher.version)
        return done, len(alive)

    # ------------------------------------------------------------ from the workers
    def on_worker_started(self, index: int) -> None:
        """A (re)started worker taps nothing: tell it what is wanted, if anything."""
        self._acked.pop(index, None)
        if self.watchers:
            self._send(index, encode_message(self._wanted()))

    def on_ack(self, ack: TapAck) -> None:
        self._acked[ack.worker] = ack.version

    def on_lines(self, batch: TapLines) -> None:
        """Hand a worker's lines to every watcher whose filter they match."""
        watchers = self.watchers
        if not watchers:
            return
        if batch.skipped:
            for watcher in watchers:
                watcher.skip(batch.skipped)
        for line, verdict, rule, rewritten in batch.lines:
            name = line_name(line)
            encoded = b""
            for watcher in watchers:
                if watcher.wants(name, verdict):
                    if not encoded:
                        event = {
                            "type": "line",
                            "worker": batch.worker,
                            "verdict": verdict,
                            "rule": rule or None,
                            "line": line.decode("utf-8", "backslashreplace"),
                        }
                        if rewritten:
                            event["forwarded_as"] = rewritten.decode("utf-8", "backslashreplace")
                        encoded = json.dumps(event).encode() + b"\n"
                    watcher.push(encoded)

    # ------------------------------------------------------------ the stream
    async def stream(self, tap_filter: TapFilter) -> AsyncGenerator[bytes, None]:
        """The NDJSON body of one /tap response; the watcher leaves when it ends."""
        watcher = self.open(tap_filter)
        if watcher is None:
            yield _event({"type": "error", "error": "too many /tap watchers"})
            return
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + READY_TIMEOUT
            while True:
                done, alive = self.tapping(watcher)
                if done >= alive or loop.time() > deadline:
                    break
                await asyncio.sleep(_READY_POLL)
            yield _event(
                {
                    "type": "ready",
                    "workers": done,
                    "of": alive,
                    "match": tap_filter.match,
                    "verdict": tap_filter.verdict,
                }
            )
            while True:
                try:
                    await asyncio.wait_for(watcher.wake.wait(), HEARTBEAT)
                except TimeoutError:
                    yield _event({"type": "heartbeat"})
                    continue
                watcher.wake.clear()
                out = b"".join(watcher.queue)
                watcher.queue.clear()
                if watcher.skipped:
                    out += _event({"type": "skipped", "lines": watcher.skipped})
                    watcher.skipped = 0
                if out:
                    yield out
        finally:
            self.close(watcher)


def _event(payload: dict[str, object]) -> bytes:
    return json.dumps(payload).encode() + b"\n"
