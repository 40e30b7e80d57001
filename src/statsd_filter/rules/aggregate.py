"""Pre-aggregation: a flush interval's lines merged into one line (or a few) per series.

Sans-I/O: :class:`Aggregator` takes lines and hands back the lines to send;
the worker's pipeline feeds it and its flush timer empties it. Nothing here
knows about sockets, timers or counters in shared memory.

Series key
    name + type + tags (order not significant, duplicates kept) + every other
    section verbatim (a container id ``c:...``, unknown extensions). The
    sample rate is not part of the key: counters fold it into the value,
    timers keep their values grouped by rate within the series, and gauges
    and sets ignore it (as every server does). Output keeps the tags in the
    order of the first line seen for the series in the window.

Keying is fast for repeated lines: a line's *raw key* is its bytes with the
value cut out (the name, then everything from the first ``|``); a dict maps
it to what was learned from the first such line (the canonical key, the rate,
the type), so a repeated line costs two ``find``, a concatenation and two dict
lookups (the raw-key table, then this window's series). Tag order is
canonicalised only on a raw-key miss. The raw-key table is bounded
(:data:`ALIAS_LIMIT` times the series cap, then cleared).

Merge rules, per type (see the README's "Aggregation" section for why):

* ``c`` counters: the sum of value / rate, sent without ``@rate`` so every
  server's 1/rate scaling agrees. Sums are kept per rate, as Python ints
  while every value is an integer (exact), and divided only when the line
  is built. The output is an integer when every input value was written as
  an integer and the scaled total is within ``1e-9`` (relative) of an
  integer -- ``3 x 1@0.3`` is ``10.000000000000002`` in floats and means 10;
  otherwise the shortest repr of the float.
* ``g`` gauges: the last absolute value wins; ``+N``/``-N`` deltas apply in
  arrival order on top of the last absolute value of the window. With no
  absolute value in the window, the deltas are sent as one combined delta
  (``+0`` if they cancel), never as an absolute value. A last value with
  no delta after it goes out byte-for-byte. A negative result is sent as
  ``0`` then the negative delta, as StatsD clients set negative gauges.
  For the flavours in :data:`ABSOLUTE_GAUGE_FLAVORS` a signed value is an
  absolute value (those servers have no gauge deltas), so the last value
  wins whatever its sign.
* ``s`` sets: the distinct values, one line per value (no server takes
  packed set values: ``:`` may be part of a set value).
* ``ms``, ``h``, ``d``: every value kept as its original bytes (never
  summarised, never round-tripped through a float), grouped by sample rate.
  Packed ``name:v1:v2|ms|@r|#tags`` for the flavours in
  :data:`PACKED_FLAVORS`; for Etsy statsd its own several-samples form
  ``name:v1|ms:v2|ms|@r|#tags`` (every sample with its type and rate, the
  tags once at the end; one value per line if the series has sections other
  than tags); one value per line for the others. Every line at most
  ``max_line`` bytes (a single value longer than that goes out alone).

Not aggregated (:meth:`Aggregator.add` returns False and the caller forwards
the line as it is): events, service checks, malformed lines (a value that is
not a number, for every type but sets), lines with a timestamp section
(``|T...``) and lines with two rate sections.

Memory is bounded by ``max_series`` live series: a line that would open one
more series first seals everything held into :attr:`Aggregator.ready`
(an early flush; nothing is dropped).
"""

from __future__ import annotations

from typing import Any

from statsd_filter.protocol.metric import METRIC_TYPES
from statsd_filter.rules.aggseries import (
    ETSY_MULTI,
    ONE_PER_LINE,
    PACKED,
    CounterSeries,
    GaugeSeries,
    Number,
    Series,
    SeriesKey,
    SetSeries,
    ValuesSeries,
    is_value,
    parse_number,
)

__all__ = [
    "ABSOLUTE_GAUGE_FLAVORS",
    "FLAVORS",
    "MARK",
    "PACKED_FLAVORS",
    "Aggregator",
    "SeriesKey",
]

FLAVORS = (
    "etsy",
    "datadog",
    "gostatsd",
    "veneur",
    "statsd_exporter",
    "telegraf",
    "vector",
    "collectd",
)
# Upstreams that accept several values in one line (``name:1:2:3|ms``) for
# timers, histograms and distributions: the Datadog agent (DogStatsD protocol
# 1.1, agent 6.25 / 7.25 and later: every type but sets) and statsd_exporter
# (its "DogStatsD extended aggregation": ms, h and d only). The others get one
# value per line, which every version of every server takes; the gostatsd and
# veneur parsers we read (pkg/statsd/lexer.go, samplers/parser.go) take one
# value per line.
PACKED_FLAVORS = frozenset({"datadog", "statsd_exporter"})
# Upstreams whose gauges have no deltas: they parse ``+5`` as the number 5, so a
# signed value is a value and the last one wins (the same parsers, and the
# Datadog agent).
ABSOLUTE_GAUGE_FLAVORS = frozenset({"datadog", "gostatsd", "veneur"})
# The byte a rule with ``action = "aggregate"`` puts before a line it passes,
# so the pipeline knows to aggregate it (a line can never hold one: it is not
# text a StatsD client writes, and the pipeline strips it before anything is sent).
MARK = b"\x00"
ALIAS_LIMIT = 2  # raw keys kept per series the cap allows, before the table is cleared
EXACT_LIMIT = 1  # whole lines kept per series the cap allows, likewise


class Aggregator:
    """Merges lines per series until :meth:`flush` (see the module docstring)."""

    def __init__(
        self, flavor: str = "etsy", max_series: int = 100_000, max_line: int = 1432
    ) -> None:
        if flavor not in FLAVORS:
            raise ValueError(f"unknown upstream flavor {flavor!r}")
        self.flavor = flavor
        self.max_series = max_series
        self.max_line = max_line
        if flavor in PACKED_FLAVORS:
            self._style = PACKED
        else:
            self._style = ETSY_MULTI if flavor == "etsy" else ONE_PER_LINE
        self._signed_is_delta = flavor not in ABSOLUTE_GAUGE_FLAVORS
        self._alias: dict[bytes, SeriesKey] = {}
        # Whole lines met before -> (key, value, number): a repeated line skips
        # even the parse (most counter and gauge lines repeat byte for byte).
        self._exact: dict[bytes, tuple[SeriesKey, bytes, Number | None]] = {}
        self._exact_limit = EXACT_LIMIT * max_series
        self._series: dict[bytes, Series] = {}
        self._epoch = 0
        self.held = 0  # input lines merged into the live series
        # Sealed by an early flush (the series cap), waiting for the caller:
        self.ready: list[bytes] = []
        self.ready_inputs = 0
        self.cap_flushes = 0

    @property
    def series(self) -> int:
        """Live series."""
        return len(self._series)

    # ------------------------------------------------------------ keys
    def key_of(self, raw: bytes) -> SeriesKey | None:
        """The series a line belongs to, or None if it is not aggregated."""
        colon = raw.find(b":")
        pipe = raw.find(b"|", colon)
        if colon <= 0 or pipe < 0:
            return None
        return self._alias.get(raw[:colon] + raw[pipe:]) or self._learn(raw, colon, pipe)

    def _learn(self, raw: bytes, colon: int, pipe: int) -> SeriesKey | None:  # noqa: PLR0911
        name = raw[:colon]
        if b"|" in name or name.startswith(b"_e{"):
            return None  # a service check, a malformed line, an event
        fields = raw[pipe + 1 :].split(b"|")
        type_ = fields[0]
        if type_ not in METRIC_TYPES:
            return None
        rate, rate_text, tags = 1.0, b"", None
        others: list[bytes] = []
        rest: list[bytes] = []
        for section in fields[1:]:
            first = section[:1]
            if first == b"@":
                if rate_text or not section[1:]:
                    return None
                try:
                    rate = float(section[1:])
                except ValueError:
                    return None
                if not 0.0 < rate <= 1.0:
                    return None
                rate_text = b"" if rate == 1.0 else section[1:]
                continue
            if first == b"T" or not section:
                return None  # a timestamp: the server must see it as sent
            if first == b"#" and tags is None:
                tags = sorted(t for t in section[1:].split(b",") if t)
            else:
                others.append(section)
            rest.append(section)
        canonical = b"|".join(
            [name, type_, b"#" + b",".join(tags) if tags is not None else b"", *others]
        )
        key = SeriesKey(canonical, name, type_, rate, rate_text, b"".join(b"|" + s for s in rest))
        if len(self._alias) >= ALIAS_LIMIT * self.max_series:
            self._alias.clear()
            self._exact.clear()  # its keys may be the ones forgotten
        self._alias[name + raw[pipe:]] = key
        return key

    # ------------------------------------------------------------ merging
    def add(self, raw: bytes) -> bool:
        """Merge one line (no newline); False if it is not aggregated (forward it)."""
        return not self.take(b"\n" + raw, everything=True, marked=False)[1]

    def _add_packed(self, key: SeriesKey, value: bytes) -> bool:
        """A line with several values (DogStatsD's ``name:1:2:3|h``): all or none."""
        texts = value.split(b":")
        numbers = [parse_number(t) for t in texts]
        if None in numbers:
            return False
        series = key.series if key.epoch == self._epoch else self._attach(key)
        type_ = key.type
        if type_ == b"c":
            series.merge(numbers, key.rate)
        elif type_ == b"g":
            for text, number in zip(texts, numbers, strict=True):
                series.merge_one(text, number, self._signed_is_delta)
        else:
            series.by_rate.setdefault(key.rate_text, []).extend(texts)
        self.held += 1
        return True

    def _attach(self, key: SeriesKey) -> Any:
        """The key's series in this window (created, at the cap after an early flush)."""
        series = self._series.get(key.canonical)
        if series is None:
            if len(self._series) >= self.max_series:
                self.cap_flushes += 1
                lines, inputs = self.flush()
                self.ready.extend(lines)
                self.ready_inputs += inputs
            series = self._series[key.canonical] = self._new(key)
        key.series = series
        key.epoch = self._epoch
        return series

    def _new(self, key: SeriesKey) -> Series:
        type_ = key.type
        if type_ == b"c":
            return CounterSeries(key)
        if type_ == b"g":
            return GaugeSeries(key)
        if type_ == b"s":
            return SetSeries(key)
        return ValuesSeries(key, self._style, self.max_line)

    def take(self, buf: bytes, everything: bool, marked: bool) -> tuple[bytes, int]:
        """Merge the lines of a filter chunk (``b"\\n"`` + lines); returns the lines
        to forward as they are, in the same shape, and how many.

        ``everything``: every aggregatable line is merged; else only the lines a
        rule marked (``marked``: lines may carry :data:`MARK`, which is removed).

        The hot path, written out in one loop (a call per line costs as much as
        the lookup): one value, a raw key met before, a series already in this
        window. Several values go to :meth:`_add_packed`, new keys to
        :meth:`_learn`, new series to :meth:`_attach`.
        """
        passed: list[bytes] = []
        keep = passed.append
        alias = self._alias.get
        exact = self._exact
        seen = exact.get
        epoch = self._epoch
        signed_is_delta = self._signed_is_delta
        number: Number | None
        for line in buf[1:].split(b"\n"):
            raw = line
            if marked and raw[:1] == MARK:
                raw = raw[1:]
            elif not everything:
                keep(raw)
                continue
            hit = seen(raw)
            if hit is not None:
                key, value, number = hit
                type_ = key.type
            else:
                colon = raw.find(b":")
                pipe = raw.find(b"|", colon)
                if colon <= 0 or pipe < 0:
                    keep(raw)
                    continue
                found = alias(raw[:colon] + raw[pipe:]) or self._learn(raw, colon, pipe)
                if found is None:
                    keep(raw)
                    continue
                key = found
                value = raw[colon + 1 : pipe]
                type_ = key.type
                if type_ == b"s":
                    ok = bool(value)
                    number = None
                elif b":" in value:
                    if not self._add_packed(key, value):
                        keep(raw)
                    epoch = self._epoch
                    continue
                elif type_ == b"c" or type_ == b"g":  # noqa: PLR1714 - faster than a tuple
                    number = parse_number(value)
                    ok = number is not None
                else:
                    number = None
                    ok = is_value(value)
                if not ok:
                    keep(raw)
                    continue
                if len(exact) >= self._exact_limit:
                    exact.clear()
                exact[raw] = (key, value, number)
            series = key.series if key.epoch == epoch else self._attach(key)
            if type_ == b"c":
                sums = series.sums
                rate = key.rate
                sums[rate] = sums.get(rate, 0) + number
                if number.__class__ is float:
                    series.integers = False
            elif type_ == b"g":
                series.merge_one(value, number, signed_is_delta)
            elif type_ == b"s":
                series.values[value] = None
            else:
                group = series.by_rate.get(key.rate_text)
                if group is None:
                    group = series.by_rate[key.rate_text] = []
                group.append(value)
            # _attach may have flushed early (the cap): a new epoch.
            epoch = self._epoch
            self.held += 1
        return (b"\n" + b"\n".join(passed) if passed else b""), len(passed)

    def flush(self) -> tuple[list[bytes], int]:
        """Every live series as output lines, and how many input lines they merge;
        the aggregator is then empty (:attr:`ready` is the caller's to take)."""
        out: list[bytes] = []
        for series in self._series.values():
            series.lines(out)
        inputs = self.held
        self._series = {}
        self._epoch += 1  # every key's series pointer is stale now
        self.held = 0
        return out, inputs

    def take_ready(self) -> tuple[list[bytes], int]:
        """What early flushes sealed, emptied."""
        lines, inputs = self.ready, self.ready_inputs
        self.ready = []
        self.ready_inputs = 0
        return lines, inputs
