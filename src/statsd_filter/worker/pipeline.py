"""The worker's one pipeline: chunks from every input -> rules -> router -> batchers.

Both inputs (``udp.py``, ``tcp.py``) hand it *chunks* (complete lines joined by
``\\n``); it filters each chunk as a whole, hands what passes to the router
(which batches lines per upstream), and counts lines in one place. Inputs
count only what belongs to their transport (datagrams, bytes, connections).

Counting order matters for the books to balance even when a worker is killed
at any instant: a chunk's lines are counted as received *before* any of them
can be counted as forwarded (that happens in the sender, on :meth:`flush`), so
``received - forwarded - blocked - dropped`` of a worker is always the lines it
holds, never negative.

A reload swaps the filter here, between two chunks, so no line is judged by
two rule sets or by none.

UDP has a fast path: the UDP input reads a whole wake-up, drops oversize
lines and the leading prefix rules' lines, in C (``fastio.recv_filter_pack``),
and hands the result to :meth:`Pipeline.feed_packed`, which counts exactly
what :meth:`Pipeline.feed` would have. In the common configuration (a prefix
blocklist, no other rule, no per-line routing) C also packs the upstream
datagrams; otherwise it returns the kept lines as one chunk, and the other
rules and the router take it from there in Python. :attr:`Pipeline.packed`
says whether (and how) that path applies to the current filter; logging every
line's verdict (debug) needs the Python path.

With pre-aggregation on (``aggregate``, or a rule with ``action =
"aggregate"``), what the rules pass goes through the worker's
:class:`~statsd_filter.rules.aggregate.Aggregator` before the router: lines it
merges stay in it (counted as received, not yet as anything else: the worker
*holds* them), the others are routed as they are. :meth:`flush_aggregates`
(the worker's flush timer, a reload, the drain) hands the merged lines to the
router's uncounted batchers and counts their input lines as aggregated in the
same step, so ``received = forwarded + blocked + aggregated + dropped`` holds
for a worker at every instant, up to what it holds. The C fast path then stops
at the leading drops (it returns one chunk, never packs): the lines chosen for
aggregation must be seen one by one.

With ``/top`` sampling on, each chunk costs one more subtraction: the byte
countdown to the next sample point (see ``sampler.py``); only a chunk that
holds one is looked at line by line, and only at that point. On the C fast
path the C code finds the lines under the points (one comparison per line)
and the sampler judges them as it would on the Python path.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from statsd_filter.config import Settings
from statsd_filter.fastio import FAST_PATH, PackedRead, SampleArgs, Trie, pack_chunk
from statsd_filter.protocol.lines import split_lines
from statsd_filter.rules.aggregate import MARK, Aggregator
from statsd_filter.rules.filter import LineFilter
from statsd_filter.stats import AGGREGATE_FLUSH_REASONS, Stat
from statsd_filter.upstream.router import Router
from statsd_filter.worker.sampler import Sampler

__all__ = ["PackedPath", "Pipeline", "aggregation"]


def aggregation(s: Settings) -> tuple[Aggregator | None, bool, bool]:
    """The worker's aggregator for these settings (None: not aggregating), whether
    it takes every line, and whether rules mark lines for it."""
    marked = any(rule.action == "aggregate" for rule in s.rules)
    if not (s.aggregate or marked):
        return None, False, False
    # Packed lines must fit the smallest datagram any upstream takes.
    sizes = [s.max_udp_size]
    if any(u.is_unix for u in s.effective_upstreams):
        sizes.append(s.unix_upstream_max_payload)
    return Aggregator(s.upstream_flavor, s.aggregate_max_series, min(sizes)), s.aggregate, marked


@dataclass(frozen=True)
class PackedPath:
    """What the C fast path needs for the current filter and upstreams."""

    trie: Trie | None  # the blocked prefixes (None: none)
    rows: tuple[int, ...]  # each prefix's counter row, by position in the trie
    max_line: int
    max_size: int  # the upstream datagram size to pack for (0: return one chunk)


class Pipeline:
    """Filters chunks, routes what passes, and keeps the line counters."""

    __slots__ = (
        "_agg_all",
        "_agg_marked",
        "_aggregator",
        "_counters",
        "_filter",
        "_flush_scheduled",
        "_log",
        "_log_lines",
        "_loop",
        "_max_line",
        "_router",
        "_rule_counters",
        "_sampler",
        "packed",
    )

    def __init__(
        self,
        line_filter: LineFilter,
        router: Router,
        counters: memoryview,
        rule_counters: memoryview,
        log: logging.Logger,
        max_line_bytes: int,
        sampler: Sampler | None = None,
    ) -> None:
        self._filter = line_filter
        self._sampler = sampler
        self._router = router
        self._counters = counters
        self._rule_counters = rule_counters
        self._log = log
        self._max_line = max_line_bytes
        self._log_lines = log.isEnabledFor(logging.DEBUG)
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.packed: PackedPath | None = None
        self._aggregator: Aggregator | None = None
        self._agg_all = False
        self._agg_marked = False
        self._choose_path()

    def _choose_path(self) -> None:
        """Use the C fast path; let it pack (and route) too when nothing else must
        see lines."""
        f = self._filter
        if not FAST_PATH or self._log_lines:
            self.packed = None
            return
        size = self._router.packed_size if f.leading_only and self._aggregator is None else None
        self.packed = PackedPath(
            f.prefix_trie(), tuple(row for _, row in f.leading_prefixes), self._max_line, size or 0
        )

    @property
    def router(self) -> Router:
        return self._router

    def feed(self, chunk: bytes, longest: int | None = None, oversize: int = 0) -> None:
        """Filter one chunk and queue what passes (sent on the next :meth:`flush`).

        ``longest`` bounds the length of any line in the chunk (spares a scan);
        ``oversize`` counts lines an input already dropped for their length.
        """
        kept, received, forwarded, blocked, too_long = self._filter.filter(chunk, longest)
        sampler = self._sampler
        if sampler is not None:
            # The chunk and the newline ending its last line.
            left = sampler.next_at - len(chunk) - 1
            if left < 0:
                sampler.take(chunk, sampler.next_at, self._filter)
            else:
                sampler.next_at = left
        c = self._counters
        c[Stat.LINES_RECEIVED] += received + oversize
        if blocked:
            c[Stat.LINES_BLOCKED] += blocked
        if too_long or oversize:
            c[Stat.DROPPED_OVERSIZE] += too_long + oversize
        if forwarded:
            if self._aggregator is None:
                self._router.add(kept, forwarded)
            else:
                self._aggregate(kept)
        if self._log_lines:
            self._log_verdicts(chunk, kept)

    def sample_args(self) -> SampleArgs | None:
        """What the C fast path needs to sample this read (None: sampling is off)."""
        return None if self._sampler is None else self._sampler.packed_args()

    def feed_packed(self, read: PackedRead) -> None:
        """Count a fast-path read and send its packed datagrams (see the module doc)."""
        payloads, lines, _, _, received, blocked, oversize, hits, _, sampled = read
        if sampled is not None and self._sampler is not None:
            self._sampler.take_packed(sampled, self._filter)
        c = self._counters
        c[Stat.LINES_RECEIVED] += received
        if blocked:
            c[Stat.LINES_BLOCKED] += blocked
            assert self.packed is not None
            rows = self.packed.rows
            add = self._filter.counters.add
            for position, count, size in hits:
                add(rows[position], count, size, count)
        if oversize:
            c[Stat.DROPPED_OVERSIZE] += oversize
        if self.packed is not None and not self.packed.max_size:
            # One chunk of what the leading drops kept: the other rules, then routing.
            kept, more = self._filter.apply_rules(payloads[0])
            if more:
                c[Stat.LINES_BLOCKED] += more
            if kept:
                router = self._router
                pack_size = router.packed_size
                if self._aggregator is not None:
                    self._aggregate(kept)
                    router.flush()
                elif pack_size and router.c_ring is None:
                    # Packed in C, as the batcher would (a Python split of a large
                    # chunk cost as much as the rules' pass over it).
                    router.send_packed(*pack_chunk(kept, pack_size))
                else:
                    router.add(kept, lines[0] - more)
                    router.flush()
        elif self._router.c_ring is not None:
            self._router.send_routed(payloads, lines)  # type: ignore[arg-type]
        elif payloads:
            self._router.send_packed(payloads, lines)

    # ------------------------------------------------------------ aggregation
    def set_aggregation(
        self, aggregator: Aggregator | None, everything: bool, marked: bool
    ) -> None:
        """Aggregate (every aggregatable line, or those a rule marks) or not.

        The caller flushes the old aggregator first (:meth:`flush_aggregates`).
        """
        self._aggregator = aggregator
        self._agg_all = everything
        self._agg_marked = marked
        self._counters[Stat.AGGREGATE_SERIES] = 0
        self._choose_path()

    @property
    def aggregator(self) -> Aggregator | None:
        return self._aggregator

    def _aggregate(self, kept: bytes) -> None:
        agg = self._aggregator
        assert agg is not None
        passed, lines = agg.take(kept, self._agg_all, self._agg_marked)
        if lines:
            self._router.add(passed, lines)
        if agg.ready_inputs:
            self._emit_ready(agg)
        self._counters[Stat.AGGREGATE_SERIES] = agg.series

    def flush_aggregates(self, reason: Stat) -> None:
        """Hand every aggregate to the router (``reason``: one of AGGREGATE_FLUSH_REASONS)."""
        assert reason in AGGREGATE_FLUSH_REASONS
        agg = self._aggregator
        if agg is None:
            return
        if agg.ready_inputs:
            self._emit_ready(agg)
        out, inputs = agg.flush()
        self._emit(out, inputs, reason)
        self._counters[Stat.AGGREGATE_SERIES] = 0
        self._router.flush()

    def _emit_ready(self, agg: Aggregator) -> None:
        """Send what the series cap made the aggregator flush early."""
        out, inputs = agg.take_ready()
        self._emit(out, inputs, Stat.AGGREGATE_FLUSHES_CAP, agg.cap_flushes)
        agg.cap_flushes = 0

    def _emit(self, out: list[bytes], inputs: int, reason: Stat, flushes: int = 1) -> None:
        c = self._counters
        if out:
            self._router.add_uncounted(b"\n" + b"\n".join(out))
        # Counted in the same step as the hand-off (see the module doc).
        c[Stat.LINES_AGGREGATED] += inputs
        c[Stat.AGGREGATE_LINES_OUT] += len(out)
        c[reason] += flushes

    def flush(self) -> None:
        """Hand every batched line to the senders."""
        self._flush_scheduled = False
        self._router.flush()

    def flush_soon(self) -> None:
        """Flush once the event loop has run this iteration's callbacks.

        Lines from many TCP connections read in one wake-up then share upstream
        datagrams.
        """
        if not self._flush_scheduled:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def drop_partial(self) -> None:
        """Count a line cut off by a connection that ended abnormally."""
        c = self._counters
        c[Stat.LINES_RECEIVED] += 1
        c[Stat.DROPPED_PARTIAL] += 1

    def set_filter(self, line_filter: LineFilter, max_line_bytes: int) -> None:
        """Judge every later chunk by ``line_filter`` (a reload)."""
        self.publish_rule_counters()
        self._filter = line_filter
        self._max_line = max_line_bytes
        self._choose_path()

    def set_line_logging(self, on: bool) -> None:
        """Log every line's verdict (log level debug) or not."""
        self._log_lines = on
        self._choose_path()

    def publish_rule_counters(self) -> None:
        """Add the filter's per-rule counts to shared memory (about once a second)."""
        shared = self._rule_counters
        for offset, delta in self._filter.drain_counters():
            if offset < len(shared):
                shared[offset] += delta

    def _log_verdicts(self, chunk: bytes, kept: bytes) -> None:
        log = self._log
        # (a line a rule chose to aggregate shows without its mark)
        passed = [line.removeprefix(MARK) for line in kept.split(b"\n")[1:]]
        for line in passed:
            log.debug("forwarded %r", line.decode("utf-8", "replace"))
        forwarded = set(passed)
        for line in split_lines(chunk):
            if line not in forwarded:
                verdict = "dropped (oversize)" if len(line) > self._max_line else "blocked"
                log.debug("%s %r", verdict, line.decode("utf-8", "replace"))
