"""Unit tests for statsd_filter.rules.prefix.PrefixSet."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statsd_filter.rules.prefix import PrefixSet

PROPERTY = settings(max_examples=400, deadline=None)

METACHARACTERS = b".*+?[](){}|\\^$"
# Small alphabet (so prefixes and lines collide often) with regex metacharacters,
# CR, NUL and non-UTF-8 bytes.
_alphabet = st.sampled_from([bytes([c]) for c in b"ab.*[\\|$\r\x00\xff\xc3"])
_small = st.lists(_alphabet, max_size=8).map(b"".join)
_any_no_nl = st.binary(max_size=10).map(lambda b: b.replace(b"\n", b""))
_prefix = st.one_of(_small, _any_no_nl).filter(bool)


@pytest.mark.parametrize(
    "prefixes",
    [[], [b""], [b"a", b""], [b"", b"b"]],
)
def test_rejects_empty_prefix(prefixes: list[bytes]) -> None:
    """An empty blocklist or an empty prefix (which would block everything) is refused."""
    with pytest.raises(ValueError, match="non-empty"):
        PrefixSet(prefixes)


@pytest.mark.parametrize("prefix", [b"\n", b"a\n", b"\nb", b"a\nb"])
def test_rejects_newline_in_prefix(prefix: bytes) -> None:
    """A prefix containing a newline cannot match one line, so it is refused."""
    with pytest.raises(ValueError, match="newline"):
        PrefixSet([b"ok", prefix])


def test_duplicates_are_collapsed_in_order() -> None:
    """Duplicate prefixes are kept once, first occurrence order preserved."""
    assert PrefixSet([b"b", b"a", b"b", b"a"]).prefixes == (b"b", b"a")


@pytest.mark.parametrize("meta", [bytes([c]) for c in METACHARACTERS])
def test_metacharacters_match_literally(meta: bytes) -> None:
    """Each regex metacharacter in a prefix matches only itself."""
    rules = PrefixSet([b"x" + meta + b"y"])
    assert rules.matches(b"x" + meta + b"y.rest")
    assert not rules.matches(b"xzy")
    assert not rules.matches(b"xy")
    assert not rules.matches(b"x\\" + meta + b"y")


def test_nested_prefixes() -> None:
    """With prefixes that are prefixes of each other, the shorter one wins (a superset)."""
    rules = PrefixSet([b"a.b", b"a."])
    assert rules.matches(b"a.b.c")
    assert rules.matches(b"a.x")
    assert rules.matches(b"a.")
    assert not rules.matches(b"a")
    assert not rules.matches(b"ab")


def test_match_is_anchored_at_line_start() -> None:
    """A prefix appearing in the middle of a line does not match."""
    rules = PrefixSet([b"debug."])
    assert not rules.matches(b"app.debug.x:1|c")
    assert rules.matches(b"debug.x:1|c")


def test_ten_thousand_prefixes() -> None:
    """A 10,000-prefix set compiles and matches exactly like bytes.startswith."""
    prefixes = [f"svc{i}.metric".encode() for i in range(10_000)]
    rules = PrefixSet(prefixes)
    as_tuple = tuple(prefixes)
    samples = [b"svc0.metric.x", b"svc9999.metric", b"svc10000.metric", b"svc1.metri", b"svc"]
    samples += [f"svc{i}.metric:1|c".encode() for i in range(0, 10_000, 97)]
    samples += [f"svc{i}.metriq".encode() for i in range(0, 10_000, 101)]
    for line in samples:
        assert rules.matches(line) == line.startswith(as_tuple), line


def test_remove_pattern_removes_whole_lines() -> None:
    """remove_pattern deletes LF + a matching line up to (not including) the next LF."""
    rules = PrefixSet([b"x."])
    kept, n = rules.remove_pattern.subn(b"", b"\nx.1\nkeep.x.1\nx.2|#t\nk")
    assert (kept, n) == (b"\nkeep.x.1\nk", 2)


@PROPERTY
@given(st.lists(_prefix, min_size=1, max_size=12), st.data())
def test_matches_agrees_with_startswith(prefixes: list[bytes], data: st.DataObject) -> None:
    """matches(line) is exactly line.startswith(tuple(prefixes)) for any bytes."""
    rules = PrefixSet(prefixes)
    hit = st.tuples(st.sampled_from(prefixes), _any_no_nl).map(b"".join)
    lines = data.draw(st.lists(st.one_of(hit, _small, _any_no_nl), max_size=20))
    for line in lines:
        assert rules.matches(line) == line.startswith(tuple(prefixes)), (prefixes, line)


@PROPERTY
@given(st.lists(_prefix, min_size=1, max_size=12), st.lists(_small, max_size=12))
def test_remove_pattern_agrees_with_startswith(prefixes: list[bytes], lines: list[bytes]) -> None:
    """One subn over LF-prefixed lines removes exactly the lines a startswith check blocks."""
    rules = PrefixSet(prefixes)
    buf = b"".join(b"\n" + line for line in lines)
    kept, removed = rules.remove_pattern.subn(b"", buf)
    expected = [line for line in lines if not line.startswith(tuple(prefixes))]
    assert kept == b"".join(b"\n" + line for line in expected)
    assert removed == len(lines) - len(expected)
