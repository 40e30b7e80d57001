"""Pre-aggregation's per-series state: how each type merges and what a flush sends.

The :class:`~statsd_filter.rules.aggregate.Aggregator` keys lines to series
and feeds these; each series object holds one window's merged state and
writes its output lines (the rules are in ``aggregate.py``'s docstring and
the README's "Pre-aggregation"). Sans-I/O.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ETSY_MULTI",
    "ONE_PER_LINE",
    "PACKED",
    "CounterSeries",
    "GaugeSeries",
    "Number",
    "Series",
    "SeriesKey",
    "SetSeries",
    "ValuesSeries",
    "is_value",
    "parse_number",
]

# How timer, histogram and distribution values go out.
PACKED, ETSY_MULTI, ONE_PER_LINE = "packed", "etsy", "one per line"
_NUMBER = b"0123456789+-.eE"
_RELATIVE_EPSILON = 1e-9

Number = int | float


class SeriesKey:
    """What the first line of a raw key taught: its series and how to merge it."""

    __slots__ = ("canonical", "epoch", "head", "rate", "rate_text", "rest", "series", "type")

    def __init__(
        self,
        canonical: bytes,
        head: bytes,
        type_: bytes,
        rate: float,
        rate_text: bytes,
        rest: bytes,
    ) -> None:
        self.canonical = canonical  # the series key (tags sorted)
        self.head = head  # the name
        self.type = type_
        self.rate = rate
        self.rate_text = rate_text  # b"" for 1
        self.rest = rest  # the sections after type and rate, as first seen (b"|#a,b...")
        # This window's series, valid while ``epoch`` is the aggregator's (spares
        # a second dict lookup per line).
        self.series: Any = None
        self.epoch = -1

    def describe(self) -> str:
        return self.canonical.decode("utf-8", "replace")


def parse_number(value: bytes) -> Number | None:
    """An int or float from a StatsD value, or None if it is not a number."""
    if value.isdigit():  # the common case, one C-level check
        return int(value)
    if not value or value.translate(None, _NUMBER):
        return None
    try:
        if value.translate(None, b"+-0123456789"):
            result: Number = float(value)
            if result - result != 0.0:  # inf or nan
                return None
            return result
        return int(value)
    except ValueError:
        return None


def is_value(value: bytes) -> bool:
    """Whether a timer, histogram or distribution value is a number."""
    if value.isdigit():
        return True
    if not value or value.translate(None, _NUMBER):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def format_number(value: Number) -> bytes:
    if isinstance(value, int):
        return str(value).encode()
    return repr(value).encode()


class Series:
    """One series' merged state; subclasses per type."""

    __slots__ = ("key",)

    def __init__(self, key: SeriesKey) -> None:
        self.key = key

    def lines(self, out: list[bytes]) -> None:
        raise NotImplementedError


class CounterSeries(Series):
    __slots__ = ("integers", "sums")

    def __init__(self, key: SeriesKey) -> None:
        super().__init__(key)
        self.sums: dict[float, Number] = {}
        self.integers = True

    def merge(self, values: list[Number], rate: float) -> None:
        total = self.sums.get(rate, 0)
        for v in values:
            total += v
            if type(v) is float:
                self.integers = False
        self.sums[rate] = total

    def lines(self, out: list[bytes]) -> None:
        total: Number = 0
        for rate, value in self.sums.items():
            total += value if rate == 1.0 else value / rate
        if isinstance(total, float) and self.integers:
            nearest = round(total)
            if abs(total - nearest) <= _RELATIVE_EPSILON * max(1.0, abs(total)):
                total = int(nearest)
        key = self.key
        out.append(key.head + b":" + format_number(total) + b"|c" + key.rest)


class GaugeSeries(Series):
    __slots__ = ("absolute", "delta", "has_delta")

    def __init__(self, key: SeriesKey) -> None:
        super().__init__(key)
        self.absolute: bytes | None = None  # the last absolute value, as sent
        self.delta: Number = 0  # deltas since it (or since the window began)
        self.has_delta = False

    def merge_one(self, text: bytes, value: Number, signed_is_delta: bool) -> None:
        if signed_is_delta and text[:1] in (b"+", b"-"):
            self.delta += value
            self.has_delta = True
        else:
            self.absolute = text
            self.delta = 0
            self.has_delta = False

    def lines(self, out: list[bytes]) -> None:
        key = self.key
        head, tail = key.head + b":", b"|g" + key.rest
        if self.absolute is None:
            d = self.delta
            out.append(
                head + (b"-" + format_number(-d) if d < 0 else b"+" + format_number(d)) + tail
            )
        elif not self.has_delta:
            out.append(head + self.absolute + tail)
        else:
            base = parse_number(self.absolute)
            assert base is not None
            value = base + self.delta
            if value < 0:
                out.append(head + b"0" + tail)
                out.append(head + b"-" + format_number(-value) + tail)
            else:
                out.append(head + format_number(value) + tail)


class SetSeries(Series):
    __slots__ = ("values",)

    def __init__(self, key: SeriesKey) -> None:
        super().__init__(key)
        self.values: dict[bytes, None] = {}

    def lines(self, out: list[bytes]) -> None:
        key = self.key
        head, tail = key.head + b":", b"|s" + key.rest
        out.extend(head + value + tail for value in self.values)


def joined(out: list[bytes], head: bytes, items: list[bytes], tail: bytes, max_line: int) -> None:
    """``head`` + as many ``:``-joined items as fit in lines of at most ``max_line``
    bytes + ``tail`` (always at least one item a line: none is lost for its length)."""
    room = max_line - len(head) - len(tail)
    start = 0
    while start < len(items):
        end, size = start + 1, len(items[start])
        while end < len(items) and size + 1 + len(items[end]) <= room:
            size += 1 + len(items[end])
            end += 1
        out.append(head + b":".join(items[start:end]) + tail)
        start = end


class ValuesSeries(Series):
    """Timers, histograms, distributions: every value kept, grouped by rate."""

    __slots__ = ("by_rate", "max_line", "style")

    def __init__(self, key: SeriesKey, style: str, max_line: int) -> None:
        super().__init__(key)
        self.by_rate: dict[bytes, list[bytes]] = {}
        self.style = style  # PACKED, ETSY_MULTI or ONE_PER_LINE
        self.max_line = max_line

    def lines(self, out: list[bytes]) -> None:
        key = self.key
        head = key.head + b":"
        rest = key.rest
        if self.style == ETSY_MULTI and (not rest or (rest[:2] == b"|#" and b"|" not in rest[1:])):
            # Etsy statsd's several samples in one line, each with its type and rate
            # (``t:1|ms:2|ms|@0.5``); its tags, if any, once at the end, where Etsy
            # looks for them before it splits the samples.
            pieces = [
                value + b"|" + key.type + (b"|@" + rate_text if rate_text else b"")
                for rate_text, values in self.by_rate.items()
                for value in values
            ]
            joined(out, head, pieces, rest, self.max_line)
            return
        for rate_text, values in self.by_rate.items():
            tail = b"|" + key.type + (b"|@" + rate_text if rate_text else b"") + rest
            if self.style == PACKED:
                joined(out, head, values, tail, self.max_line)
            else:
                out.extend(head + value + tail for value in values)
