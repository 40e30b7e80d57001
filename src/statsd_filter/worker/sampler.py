"""Heavy hitters without touching every line: sample points in the byte stream.

The worker's hot path never looks at single lines in Python, so this does not
either. It sees each chunk only as its length: a countdown of bytes tells when
the next *sample point* falls inside a chunk (one subtraction per chunk, in
:meth:`Pipeline.feed <statsd_filter.worker.pipeline.Pipeline.feed>`). Sample
points are spaced by random gaps, uniform on ``[1, 2*step - 1]`` bytes (mean
``step``), so no periodic pattern in the traffic can alias with them. Only for
a chunk that holds a sample point is the line under that point found (two
C-level ``find`` calls), judged by the live filter (:meth:`LineFilter.judge
<statsd_filter.rules.filter.LineFilter.judge>`), and counted.

Estimates (Horvitz-Thompson): a point falls on a line of ``length`` bytes
(its newline included) with expected count ``length / step``, so each point
that lands on it stands for ``step / length`` lines and ``step`` bytes. Sums
of those are unbiased estimates of the lines and bytes each name carried,
whatever the mix of line lengths. Their relative error is about
``1/sqrt(points)`` on that name (the gaps are more regular than a Poisson
process, so a little less): ``/top`` shows the number of sampled lines per
name so a reader can judge.

``step`` adapts so that a worker takes about ``target`` points per second:
after each period it is the bytes read in that period over ``target``
(``step = 1``, every byte a point, means every line is seen, exactly once in
the lines and ``/tap``; each line then stands for exactly one line). If
traffic jumps within a period, a brake recomputes it as soon as the period's
points exceed 1.5 times the target, so a flood after a quiet spell costs a
bounded number of judged lines.

On the C fast path (a blocklist and nothing else; ``csrc/_fastio.c``) the raw
datagrams never reach Python: the C code runs the same countdown with its own
random gaps (:meth:`Sampler.packed_args` hands it the state) and returns the
lines under the points with the bytes they stand for (:meth:`Sampler.take_packed`),
so both paths estimate alike.

What each name's sampled lines stand for is sent to the supervisor once a
period (:class:`~statsd_filter.protocol.messages.TopReport`). While someone
watches ``/tap``, the sampled lines that match a watcher's filter also go to a
bounded buffer sent a few times a second; beyond :data:`TAP_BATCH` lines per
batch they are skipped and counted, never queued.
"""

from __future__ import annotations

import random
import re
import time

from statsd_filter.cardinality import tag_set_bit
from statsd_filter.fastio import SampleArgs, Sampled
from statsd_filter.protocol.messages import (
    NameStats,
    TapFilter,
    TapLine,
    TapLines,
    TopReport,
)
from statsd_filter.rules.filter import BLOCKED, FORWARDED, LineFilter
from statsd_filter.rules.glob import glob_to_regex
from statsd_filter.stats import Stat

__all__ = ["TAP_BATCH", "Sampler", "line_name"]

# Lines sent to the watchers per batch (a batch every TAP_INTERVAL seconds):
# at most 500 lines a second per worker, whatever the traffic and the watchers.
TAP_BATCH = 100
TAP_INTERVAL = 0.2
# Points per period allowed above the target before the brake recomputes the step.
BRAKE_FACTOR = 1.5
# How often the worker reports (its housekeeping tick), in seconds.
REPORT_INTERVAL = 1.0
# A name longer than this is cut (a malformed line can be one long "name").
MAX_NAME = 200
EVENT_NAME = b"(event)"
SERVICE_CHECK_NAME = b"(service_check)"
MALFORMED_NAME = b"(malformed)"
# Tag sections whose linear-counter bit is remembered (their hash is most of a
# sampled line's cost, and real traffic repeats a few tag sets endlessly);
# beyond this many the memo starts over.
TAG_MEMO = 4096


class _Name:
    """What one name's sampled lines stand for so far this period."""

    __slots__ = (
        "blocked",
        "bytes_fwd",
        "bytes_in",
        "dropped",
        "fwd",
        "lines",
        "rules",
        "sampled",
        "sq",
        "tag_bits",
    )

    def __init__(self) -> None:
        self.lines = self.bytes_in = self.fwd = self.bytes_fwd = 0.0
        self.blocked = self.dropped = 0.0
        self.sampled = 0
        self.sq = 0.0  # the sum of each sampled line's weight squared
        self.tag_bits = 0  # a linear counter of its tag sets (cardinality.py)
        self.rules: dict[str, float] = {}

    def stats(self) -> NameStats:
        return (
            self.lines,
            self.bytes_in,
            self.fwd,
            self.bytes_fwd,
            self.blocked,
            self.dropped,
            self.sampled,
            self.tag_bits,
            self.rules,
            self.sq,
        )


def line_name(line: bytes) -> bytes:
    """What ``/top`` groups a line under: its metric name, or its kind."""
    if line.startswith(b"_e{"):
        return EVENT_NAME
    if line.startswith(b"_sc|"):
        return SERVICE_CHECK_NAME
    colon = line.find(b":")
    if colon <= 0:
        return MALFORMED_NAME
    return line[: min(colon, MAX_NAME)]


def _tags(line: bytes) -> bytes:
    start = line.find(b"|#")
    if start < 0:
        return b""
    end = line.find(b"|", start + 2)
    return line[start + 2 : end] if end >= 0 else line[start + 2 :]


class Sampler:
    """One worker's sample points, estimates and tap buffer."""

    __slots__ = (
        "_bytes0",
        "_c_rng",
        "_counters",
        "_gap",
        "_hits",
        "_limit",
        "_names",
        "_period_start",
        "_rand",
        "_rule_names",
        "_tag_bits",
        "_tap",
        "_tap_lines",
        "_tap_skipped",
        "_tap_version",
        "_target",
        "index",
        "next_at",
        "step",
    )

    def __init__(
        self,
        index: int,
        target: int,
        counters: memoryview,
        rule_names: dict[int, str],
        rng: random.Random | None = None,
    ) -> None:
        self.index = index
        self._target = max(1, target)
        self._counters = counters
        self._rule_names = rule_names
        rng = rng or random.Random()
        self._rand = rng.random
        # The C fast path's xorshift state (it draws the gaps itself there).
        self._c_rng = rng.getrandbits(64) | 1
        self.step = 1
        # Bytes from the start of the next chunk to the next sample point, and the
        # mean of the gap that leads there: that point stands for it even if the
        # step changes meanwhile (a brake, a new period).
        self.next_at = 0
        self._gap = 1
        self._names: dict[bytes, _Name] = {}
        self._tag_bits: dict[bytes, int] = {}
        self._hits = 0
        self._limit = self._period_limit()
        self._period_start = time.monotonic()
        self._bytes0 = int(counters[Stat.BYTES_IN])
        self._tap: list[tuple[re.Pattern[bytes] | None, str | None]] = []
        self._tap_version = 0
        self._tap_lines: list[TapLine] = []
        self._tap_skipped = 0

    def _period_limit(self) -> int:
        # Per nominal period (a report a second), whatever the last one lasted: the
        # first is cut short by the worker's start, and must not trip the brake.
        return int(self._target * REPORT_INTERVAL * BRAKE_FACTOR) + 1

    def set_rule_names(self, rule_names: dict[int, str]) -> None:
        """Counter row -> rule name, for a new config generation."""
        self._rule_names = rule_names

    # ------------------------------------------------------------ sampling
    def take(self, chunk: bytes, at: int, line_filter: LineFilter) -> None:
        """Judge and count the lines under every sample point in ``chunk``, from ``at``.

        The chunk is seen as its bytes plus the newline ending its last line
        (index ``len(chunk)``); a point on a newline belongs to the line it ends.
        """
        n = len(chunk)
        pos = at
        step = self.step
        span = 2 * step - 1  # gaps are 1 + int(random() * span): 1 to 2*step - 1, mean step
        rand = self._rand
        gap = self._gap
        while pos <= n:
            start = chunk.rfind(b"\n", 0, pos) + 1
            end = chunk.find(b"\n", pos)
            if end < 0:
                end = n
            if step == 1:
                hits = end - pos + 1
                nxt = end + 1
            else:
                hits = 1
                nxt = pos + 1 + int(rand() * span)
                while nxt <= end:
                    hits += 1
                    nxt += 1 + int(rand() * span)
            line = chunk[start:end]
            if line.endswith(b"\r"):
                line = line[:-1]
            weight = gap + (hits - 1) * step
            gap = step
            if line:
                self._record(line, weight / (end - start + 1), end - start + 1, line_filter)
            self._hits += hits
            if self._hits >= self._limit:
                self._brake()
                step = self.step
                span = 2 * step - 1
            pos = nxt
        self.next_at = pos - n - 1
        self._gap = gap

    def packed_args(self) -> SampleArgs:
        """The countdown, spacing and random state, for the C fast path to sample a read."""
        return (self.next_at, self.step, self._c_rng, max(1, self._limit - self._hits), self._gap)

    def take_packed(self, sampled: Sampled, line_filter: LineFilter) -> None:
        """Judge and count the lines the C fast path found under sample points."""
        lines, self.next_at, step, self._c_rng, hits = sampled
        for line, weight, length in lines:
            self._record(line, weight / length, length, line_filter)
        if hits:
            self._gap = step  # the gap running now was drawn with the returned step
        self.step = step
        self._hits += hits
        if self._hits >= self._limit:
            self._brake()

    def _brake(self) -> None:
        """Too many points this period: traffic jumped; space them for the current rate."""
        elapsed = max(0.05, time.monotonic() - self._period_start)
        seen = int(self._counters[Stat.BYTES_IN]) - self._bytes0
        self.step = max(self.step * 2, int(seen / (self._target * elapsed)))
        self._limit = self._hits + self._target // 2 + 1

    def _record(self, line: bytes, weight: float, length: int, line_filter: LineFilter) -> None:
        verdict, row, output = line_filter.judge(line)
        name = line_name(line)
        entry = self._names.get(name)
        if entry is None:
            entry = self._names[name] = _Name()
        entry.lines += weight
        entry.sq += weight * weight
        entry.bytes_in += weight * length
        if verdict == FORWARDED:
            assert output is not None
            entry.fwd += weight
            entry.bytes_fwd += weight * (len(output) + 1)
        elif verdict == BLOCKED:
            entry.blocked += weight
        else:
            entry.dropped += weight
        entry.sampled += 1
        tags = _tags(line)
        bit = self._tag_bits.get(tags)
        if bit is None:
            if len(self._tag_bits) >= TAG_MEMO:
                self._tag_bits.clear()
            bit = self._tag_bits[tags] = tag_set_bit(tags)
        entry.tag_bits |= bit
        rule = self._rule_names.get(row, "") if row >= 0 else ""
        entry.rules[rule] = entry.rules.get(rule, 0.0) + weight
        if self._tap:
            self._offer(line, name, verdict, rule, output)

    # ------------------------------------------------------------ reports
    def report(self) -> TopReport:
        """What this period's points stand for; starts the next period with a new step."""
        now = time.monotonic()
        period = max(1e-3, now - self._period_start)
        seen = int(self._counters[Stat.BYTES_IN])
        names = {name: entry.stats() for name, entry in self._names.items()}
        report = TopReport(self.index, period, self.step, self._hits, names)
        self.step = max(1, round((seen - self._bytes0) / (self._target * period)))
        self._names = {}
        self._hits = 0
        self._limit = self._period_limit()
        self._period_start = now
        self._bytes0 = seen
        return report

    # ------------------------------------------------------------ tap
    @property
    def tapping(self) -> bool:
        return bool(self._tap)

    def set_tap(self, version: int, filters: tuple[TapFilter, ...]) -> None:
        """Send the sampled lines matching any of ``filters`` (none: stop)."""
        self._tap_version = version
        self._tap = [
            (
                re.compile(glob_to_regex(f.match)) if f.match else None,
                f.verdict,
            )
            for f in filters
        ]
        if not filters:
            self._tap_lines = []
            self._tap_skipped = 0

    def _offer(
        self, line: bytes, name: bytes, verdict: str, rule: str, output: bytes | None
    ) -> None:
        for glob, wanted in self._tap:
            if (wanted is None or wanted == verdict) and (
                glob is None or glob.fullmatch(name) is not None
            ):
                break
        else:
            return
        if len(self._tap_lines) >= TAP_BATCH:
            self._tap_skipped += 1
            return
        rewritten = output if output is not None and output != line else b""
        self._tap_lines.append((line, verdict, rule, rewritten))

    def tap_batch(self) -> TapLines | None:
        """The lines gathered for the watchers since the last batch, if any."""
        if not self._tap_lines and not self._tap_skipped:
            return None
        batch = TapLines(self.index, self._tap_version, tuple(self._tap_lines), self._tap_skipped)
        self._tap_lines = []
        self._tap_skipped = 0
        return batch
