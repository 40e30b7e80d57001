"""Pre-aggregation's merge rules (rules/aggregate.py), against a reference StatsD server.

The property tests feed random lines to an :class:`Aggregator`, flush at random
points (and with a random series cap), and check that a reference server (a
plain, line-at-a-time model of what StatsD servers do with each type) ends in
the same state whether it is given the original lines or the aggregated ones.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statsd_filter.rules.aggregate import (
    ABSOLUTE_GAUGE_FLAVORS,
    FLAVORS,
    MARK,
    PACKED_FLAVORS,
    Aggregator,
)

Key = tuple[bytes, bytes, tuple[bytes, ...]]
_SAMPLE = rb"[-+.0-9eE]+\|(?:ms|h|d)(?:\|@[.0-9]+)?"
ETSY_SAMPLES = re.compile(rb"[^:|]+:" + _SAMPLE + rb"(?::" + _SAMPLE + rb")+(?:\|#[^|]*)?")


class Server:
    """What a StatsD server keeps from lines, one line at a time (the reference)."""

    def __init__(self, signed_gauges_are_deltas: bool = True) -> None:
        self.counters: dict[Key, Fraction] = {}
        self.gauges: dict[Key, Fraction] = {}
        self.sets: dict[Key, set[bytes]] = {}
        self.values: dict[Key, list[tuple[bytes, float]]] = {}
        self._deltas = signed_gauges_are_deltas

    def apply(self, line: bytes) -> None:
        if ETSY_SAMPLES.fullmatch(line):
            self._apply_etsy(line)
            return
        head, _, rest = line.partition(b"|")
        name, _, value = head.partition(b":")
        fields = rest.split(b"|")
        type_ = fields[0]
        rate = 1.0
        tags: tuple[bytes, ...] = ()
        for section in fields[1:]:
            if section.startswith(b"@"):
                rate = float(section[1:])
            elif section.startswith(b"#"):
                tags = tuple(sorted(section[1:].split(b",")))
        key = (name, type_, tags)
        if type_ == b"s":
            self.sets.setdefault(key, set()).add(value)
            return
        texts = value.split(b":")
        for text in texts:
            number = Fraction(text.decode())
            if type_ == b"c":
                self.counters[key] = self.counters.get(key, Fraction(0)) + number / Fraction(rate)
            elif type_ == b"g":
                if self._deltas and text[:1] in (b"+", b"-"):
                    self.gauges[key] = self.gauges.get(key, Fraction(0)) + number
                else:
                    self.gauges[key] = number
            else:
                self.values.setdefault(key, []).append((text, rate))

    def _apply_etsy(self, line: bytes) -> None:
        """Etsy statsd's several samples in one line: ``t:1|ms:2|ms|@0.5|#tags``."""
        body, _, tag_text = line.partition(b"|#")
        tags = tuple(sorted(tag_text.split(b","))) if tag_text else ()
        name, *samples = body.split(b":")
        for sample in samples:
            fields = sample.split(b"|")
            rate = float(fields[2][1:]) if len(fields) > 2 else 1.0
            self.values.setdefault((name, fields[1], tags), []).append((fields[0], rate))

    def feed(self, lines: list[bytes]) -> Server:
        for line in lines:
            self.apply(line)
        return self


def _close(a: dict[Key, Fraction], b: dict[Key, Fraction]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-9) for k in a)


def _same(a: Server, b: Server) -> None:
    assert _close(a.counters, b.counters), (a.counters, b.counters)
    assert _close(a.gauges, b.gauges), (a.gauges, b.gauges)
    assert a.sets == b.sets
    assert {k: sorted(v) for k, v in a.values.items()} == {
        k: sorted(v) for k, v in b.values.items()
    }


NAMES = [b"api.hits", b"db.q", b"x"]
TAGS = [b"env:prod", b"host:a", b"k"]
RATES = [b"", b"0.5", b"0.1", b"0.25"]


ALL_TYPES = (b"c", b"g", b"s", b"ms", b"h", b"d")


@st.composite
def lines(
    draw: st.DrawFn, names: list[bytes] = NAMES, types: tuple[bytes, ...] = ALL_TYPES
) -> bytes:
    """A random line; few names and types make long histories per series."""
    name = draw(st.sampled_from(names))
    type_ = draw(st.sampled_from(types))
    ints = st.integers(-50, 50).map(lambda i: str(i).encode())
    floats = st.sampled_from([b"0.5", b"1.25", b"-2.75", b"3.0", b"1e1", b".5"])
    if type_ == b"g":
        absolute = st.integers(0, 100).map(lambda i: str(i).encode()) | st.sampled_from(
            [b"0.5", b"7.25"]
        )
        delta = st.integers(1, 30).flatmap(
            lambda i: st.sampled_from([b"+%d" % i, b"-%d" % i, b"+0.5", b"-1.5"])
        )
        value = draw(absolute | delta)
    elif type_ == b"s":
        value = draw(st.sampled_from([b"u1", b"u2", b"7", b"a:b"]))
    elif type_ == b"c":
        value = draw(ints | floats)
    else:
        value = draw(st.integers(0, 500).map(lambda i: str(i).encode()) | floats)
        if draw(st.booleans()):  # DogStatsD packed values in the input
            value += b":" + draw(st.integers(0, 9).map(lambda i: str(i).encode()))
    line = name + b":" + value + b"|" + type_
    rate = draw(st.sampled_from(RATES))
    if rate:
        line += b"|@" + rate
    most = 3 if len(names) > 1 else 1
    tags = draw(st.permutations(TAGS).flatmap(lambda p: st.integers(0, most).map(lambda n: p[:n])))
    if tags:
        line += b"|#" + b",".join(tags)
    return line


def _run(flavor: str, batches: list[list[bytes]], cap: int, max_line: int = 1432) -> list[bytes]:
    agg = Aggregator(flavor, cap, max_line)
    out: list[bytes] = []
    for batch in batches:
        for line in batch:
            assert agg.add(line), line
        ready, _ = agg.take_ready()
        out += ready
        flushed, _ = agg.flush()
        out += flushed
    return out


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.lists(lines(), max_size=30), min_size=1, max_size=4),
    st.sampled_from(FLAVORS),
    st.integers(1, 20),
)
def test_aggregated_lines_leave_a_server_in_the_same_state(
    batches: list[list[bytes]], flavor: str, cap: int
) -> None:
    """Counters, gauges (absolute, deltas, mixed), sets and timer values: the
    upstream ends where it would have without aggregation, whatever the flush points."""
    deltas = flavor not in ABSOLUTE_GAUGE_FLAVORS
    everything = [line for batch in batches for line in batch]
    expected = Server(deltas).feed(everything)
    got = Server(deltas).feed(_run(flavor, batches, cap))
    _same(expected, got)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.lists(lines([b"g"], (b"g", b"c")), max_size=12), min_size=1, max_size=3),
    st.sampled_from(["etsy", "datadog"]),
)
def test_one_series_history_gauges_and_counters(batches: list[list[bytes]], flavor: str) -> None:
    """Long histories of one gauge (absolute values and deltas mixed) and one counter."""
    deltas = flavor not in ABSOLUTE_GAUGE_FLAVORS
    everything = [line for batch in batches for line in batch]
    _same(Server(deltas).feed(everything), Server(deltas).feed(_run(flavor, batches, 100)))


@settings(max_examples=200, deadline=None)
@given(st.lists(lines(), max_size=40), st.randoms(use_true_random=False))
def test_counters_sets_and_values_do_not_depend_on_arrival_order(
    batch: list[bytes], rng: object
) -> None:
    """What workers see in any order merges to the same counters, sets and values."""
    shuffled = list(batch)
    rng.shuffle(shuffled)  # type: ignore[attr-defined]
    a = Server().feed(_run("etsy", [batch], 1000))
    b = Server().feed(_run("etsy", [shuffled], 1000))
    assert _close(a.counters, b.counters)
    assert a.sets == b.sets
    assert {k: sorted(v) for k, v in a.values.items()} == {
        k: sorted(v) for k, v in b.values.items()
    }


def _flush(agg: Aggregator) -> list[bytes]:
    return agg.flush()[0]


def test_series_key_ignores_tag_order_and_keeps_the_first_seen_order() -> None:
    agg = Aggregator()
    for line in (b"a:1|c|#z:1,b:2", b"a:2|c|#b:2,z:1", b"a:4|c|@0.5|#b:2,z:1"):
        assert agg.add(line)
    assert agg.series == 1
    assert _flush(agg) == [b"a:11|c|#z:1,b:2"]


def test_other_sections_are_part_of_the_key() -> None:
    agg = Aggregator("datadog")
    for line in (b"a:1|c|#t|c:abc", b"a:1|c|#t|c:def", b"a:1|c|#t|c:abc"):
        assert agg.add(line)
    assert _flush(agg) == [b"a:2|c|#t|c:abc", b"a:1|c|#t|c:def"]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([b"c:1|c"] * 3, b"c:3|c"),
        ([b"c:1|c|@0.1"] * 3, b"c:30|c"),
        ([b"c:1|c|@0.3"] * 3, b"c:10|c"),  # 10.000000000000002 in floats
        ([b"c:1.5|c", b"c:1.5|c"], b"c:3.0|c"),  # a float input: float output
        ([b"c:1|c|@0.3"], b"c:3.3333333333333335|c"),
        ([b"c:-4|c", b"c:1|c"], b"c:-3|c"),
        ([b"c:1:2:3|c"], b"c:6|c"),
    ],
)
def test_counter_output(lines: list[bytes], expected: bytes) -> None:
    agg = Aggregator()
    for line in lines:
        assert agg.add(line)
    assert _flush(agg) == [expected]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([b"g:1|g", b"g:2.50|g"], [b"g:2.50|g"]),  # last value, byte for byte
        ([b"g:+1|g", b"g:+2|g", b"g:-5|g"], [b"g:-2|g"]),  # one combined delta
        ([b"g:+1|g", b"g:-1|g"], [b"g:+0|g"]),
        ([b"g:10|g", b"g:+2|g", b"g:-1|g"], [b"g:11|g"]),
        ([b"g:+7|g", b"g:10|g", b"g:-1|g"], [b"g:9|g"]),  # deltas before it are overwritten
        ([b"g:1|g", b"g:-3|g"], [b"g:0|g", b"g:-2|g"]),  # a negative value, as clients set it
        ([b"g:0.5|g", b"g:+0.25|g"], [b"g:0.75|g"]),
    ],
)
def test_gauge_output(lines: list[bytes], expected: list[bytes]) -> None:
    agg = Aggregator()
    for line in lines:
        assert agg.add(line)
    assert _flush(agg) == expected


@pytest.mark.parametrize("flavor", sorted(ABSOLUTE_GAUGE_FLAVORS))
def test_signed_gauges_are_values_where_the_server_has_no_deltas(flavor: str) -> None:
    agg = Aggregator(flavor)
    for line in (b"g:5|g", b"g:+2|g", b"g:-3|g"):
        assert agg.add(line)
    assert _flush(agg) == [b"g:-3|g"]


def test_sets_are_distinct_values_one_per_line() -> None:
    agg = Aggregator("datadog")
    for line in (b"s:a|s", b"s:b|s|@0.5", b"s:a|s", b"s:x:y|s"):
        assert agg.add(line)
    assert _flush(agg) == [b"s:a|s", b"s:b|s", b"s:x:y|s"]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_timer_values_are_kept_and_packed_only_where_the_flavor_takes_it(flavor: str) -> None:
    agg = Aggregator(flavor)
    for line in (b"t:1|ms|#a", b"t:2.50|ms|#a", b"t:3|ms|@0.1|#a", b"t:4|ms|#a"):
        assert agg.add(line)
    out = _flush(agg)
    if flavor in PACKED_FLAVORS:
        assert out == [b"t:1:2.50:4|ms|#a", b"t:3|ms|@0.1|#a"]
    elif flavor == "etsy":
        assert out == [b"t:1|ms:2.50|ms:4|ms:3|ms|@0.1|#a"]
    else:
        assert out == [b"t:1|ms|#a", b"t:2.50|ms|#a", b"t:4|ms|#a", b"t:3|ms|@0.1|#a"]


def test_packed_lines_fit_the_datagram_size() -> None:
    agg = Aggregator("statsd_exporter", max_line=64)
    for i in range(200):
        assert agg.add(b"lat:%d|h|#k:v" % (1000 + i))
    out = _flush(agg)
    assert all(len(line) <= 64 for line in out)
    values = [v for line in out for v in line.split(b"|")[0].split(b":")[1:]]
    assert values == [b"%d" % (1000 + i) for i in range(200)]
    assert len(out) < 200 // 5


def test_etsy_samples_fit_the_datagram_size_and_other_sections_stay_one_per_line() -> None:
    agg = Aggregator("etsy", max_line=64)
    for i in range(100):
        assert agg.add(b"lat:%d|ms|#k:v" % (1000 + i))
        assert agg.add(b"c:%d|ms|c:abc" % i)
    out = _flush(agg)
    assert all(len(line) <= 64 for line in out)
    server = Server().feed(out)
    assert sorted(server.values[(b"lat", b"ms", (b"k:v",))]) == [
        (b"%d" % (1000 + i), 1.0) for i in range(100)
    ]
    assert [line for line in out if line.startswith(b"c:")] == [
        b"c:%d|ms|c:abc" % i for i in range(100)
    ]
    assert len(out) < 100 + 100 // 5


@pytest.mark.parametrize(
    "line",
    [
        b"_e{1,1}:a|b",
        b"_sc|check|0",
        b"_sc|check|0|m:it broke",
        b"a|b:1|c",
        b"x:1|c|T1656581400",
        b"x:1|c|#a|T1656581400",
        b"x:abc|c",
        b"x:1-2|ms",
        b"x:1|zz",
        b"x:1|c|@2",
        b"x:1|c|@0.5|@0.5",
        b"x:|c",
        b"nocolon|c",
        b"x:nan|g",
        b"x:1e999|c",
    ],
)
def test_not_aggregated(line: bytes) -> None:
    agg = Aggregator()
    assert not agg.add(line)
    assert agg.held == 0
    assert _flush(agg) == []


def test_the_cap_flushes_early_and_drops_nothing() -> None:
    agg = Aggregator(max_series=3)
    for i in range(10):
        assert agg.add(b"n%d:1|c" % i)
    assert agg.cap_flushes == 3
    ready, inputs = agg.take_ready()
    assert inputs == 9
    assert ready == [b"n%d:1|c" % i for i in range(9)]
    assert agg.flush() == ([b"n9:1|c"], 1)


def test_take_splits_marked_and_unmarked_lines() -> None:
    agg = Aggregator()
    chunk = b"\n" + b"\n".join([MARK + b"a:1|c", b"b:1|c", MARK + b"a:2|c", MARK + b"_e{1,1}:a|b"])
    passed, count = agg.take(chunk, everything=False, marked=True)
    assert (passed, count) == (b"\nb:1|c\n_e{1,1}:a|b", 2)
    assert agg.held == 2
    passed, count = agg.take(b"\nb:1|c\nb:1|c", everything=True, marked=False)
    assert (passed, count) == (b"", 0)
    assert agg.flush() == ([b"a:3|c", b"b:2|c"], 4)


@pytest.mark.parametrize("kind", [b"c", b"g", b"ms", b"s"])
def test_memory_per_series_is_bounded(kind: bytes) -> None:
    """The README's bytes per series: 10,000 series with two tags, three values each,
    at the series cap (the key tables are full too)."""
    import tracemalloc  # noqa: PLC0415

    agg = Aggregator(max_series=10_000)
    lines = [
        b"app.requests.endpoint%d:%d|%s|#env:prod,host:web-%d" % (i, v, kind, i % 10)
        for v in (1, 2, 3)
        for i in range(10_000)
    ]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for start in range(0, len(lines), 16):
        agg.take(b"\n" + b"\n".join(lines[start : start + 16]), everything=True, marked=False)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per_series = (after - before) / 10_000
    assert agg.series == 10_000
    assert agg.held == 30_000
    assert per_series < 1200, per_series
