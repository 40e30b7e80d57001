"""Unit tests for the line filter, built through rules.compile.compile_filter.

Only the stable entry points are used (compile_filter and LineFilter.filter),
not LineFilter's constructor. Arbitrary non-UTF-8 prefixes are
covered by test_rules_prefix.py, since compile_filter takes UTF-8 strings.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statsd_filter.protocol.lines import LineFramer
from statsd_filter.rules.compile import compile_filter
from statsd_filter.rules.filter import RULE_FIELDS, FilterResult
from statsd_filter.rules.model import parse_rules
from statsd_filter.rules.multiprefix import AVAILABLE as HYPERSCAN
from statsd_filter.rules.multiprefix import MIN_PREFIXES

PROPERTY = settings(max_examples=400, deadline=None)

METACHARACTERS = ".*+?[](){}|\\^$"


def reference(chunk: bytes, prefixes: list[bytes], limit: int) -> FilterResult:
    """The filter's contract written the slow, obvious way."""
    kept: list[bytes] = []
    received = blocked = oversize = 0
    for raw in chunk.split(b"\n"):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if not line:
            continue
        received += 1
        if len(line) > limit:
            oversize += 1
        elif prefixes and line.startswith(tuple(prefixes)):
            blocked += 1
        else:
            kept.append(line)
    out = b"\n" + b"\n".join(kept) if kept else b""
    return (out, received, len(kept), blocked, oversize)


def check(result: FilterResult, chunk: bytes, prefixes: list[bytes], limit: int) -> None:
    """Assert the result matches the reference and its own invariants."""
    kept, received, forwarded, blocked, oversize = result
    assert result == reference(chunk, prefixes, limit)
    assert received == forwarded + blocked + oversize
    assert kept == b"" or (kept.startswith(b"\n") and not kept.endswith(b"\n"))
    assert forwarded == (kept.count(b"\n") if kept else 0)


# Bytes that collide with the prefixes below, plus framing and regex trouble.
_pieces = [b"a", b"b", b".", b"*", b"[", b"\\", b"$", b"\xc3\xa9", b"\xff", b"\n", b"\r", b":"]
_datagram_lines = st.lists(
    st.lists(st.sampled_from([p for p in _pieces if p not in (b"\n", b"\r")]), max_size=10).map(
        b"".join
    ),
    min_size=1,
    max_size=8,
)
_chunks = st.one_of(
    st.lists(st.sampled_from(_pieces), max_size=60).map(b"".join),
    st.binary(max_size=60),
    # Mostly clean datagrams (the fast path), with optional CRs and trailing newlines.
    st.tuples(
        _datagram_lines, st.sampled_from([b"\n", b"\r\n"]), st.sampled_from([b"", b"\n", b"\n\n"])
    ).map(lambda t: t[1].join(t[0]) + t[2]),
)
# Prefixes: UTF-8 strings whose bytes collide with the pieces above ("é" is
# b"\xc3\xa9", "ÿ" is b"\xc3\xbf"), including regex metacharacters and CR.
_prefixes = st.lists(
    st.lists(
        st.sampled_from(["a", "b", ".", "*", "[", "\\", "$", "é", "ÿ", ":", "\r"]),
        min_size=1,
        max_size=4,
    ).map("".join),
    max_size=8,
)


# ------------------------------------------------------------------ properties


@PROPERTY
@given(_chunks, _prefixes, st.integers(min_value=1, max_value=40))
def test_filter_matches_reference_model(chunk: bytes, blocklist: list[str], limit: int) -> None:
    """For any bytes and any blocklist, fast and slow paths agree with the reference model."""
    line_filter = compile_filter(tuple(blocklist), limit)
    check(line_filter.filter(chunk), chunk, [p.encode() for p in blocklist], limit)


@PROPERTY
@given(
    st.lists(st.text(alphabet="ab.*+?[](){}|\\^$é日 ", min_size=1, max_size=5), max_size=6),
    st.lists(st.text(alphabet="ab.*+?[](){}|\\^$é日 :|\r", max_size=12), max_size=10),
    st.booleans(),
    st.integers(min_value=1, max_value=40),
)
def test_compiled_filter_matches_reference_model(
    blocklist: list[str], lines: list[str], trailing_newline: bool, limit: int
) -> None:
    """compile_filter over UTF-8 prefixes (metacharacters, non-ASCII) matches the reference."""
    chunk = "\n".join(lines).encode() + (b"\n" if trailing_newline else b"")
    line_filter = compile_filter(tuple(blocklist), limit)
    check(line_filter.filter(chunk), chunk, [p.encode() for p in blocklist], limit)


@PROPERTY
@given(
    st.lists(st.sampled_from(["a.", "a.b", "b", "é.", "[x]"]), min_size=1, max_size=5),
    st.lists(st.sampled_from(["a.", "a.b", "a", "b", "é.", "[x]", "x", "ab"]), max_size=10),
    st.lists(st.sampled_from(["", "1", ".c:1|c", "\r", ":2|g|#a.b"]), max_size=10),
)
def test_filter_clean_datagrams_fast_path(
    blocklist: list[str], heads: list[str], tails: list[str]
) -> None:
    """Ordinary clean datagrams (the fast path) block exactly the lines the reference blocks."""
    lines = [h + t for h, t in zip(heads, tails, strict=False)]
    chunk = "\n".join(line for line in lines if line).encode()
    check(
        compile_filter(tuple(blocklist), 8192).filter(chunk),
        chunk,
        [p.encode() for p in blocklist],
        8192,
    )


# ------------------------------------------------------------------- examples


def test_no_blocklist_passes_everything_through() -> None:
    """Without rules, every line is forwarded byte-for-byte."""
    f = compile_filter((), 8192)
    assert f.filter(b"a:1|c\nb:2|g|#t:v") == (b"\na:1|c\nb:2|g|#t:v", 2, 2, 0, 0)


@pytest.mark.parametrize("chunk", [b"", b"\n"])
def test_empty_chunk(chunk: bytes) -> None:
    """An empty chunk (or a lone newline) counts nothing and keeps nothing."""
    assert compile_filter(("a",), 8192).filter(chunk) == (b"", 0, 0, 0, 0)


def test_trailing_newline_datagram() -> None:
    """One trailing newline is optional and does not create an empty line."""
    f = compile_filter(("x.",), 8192)
    assert f.filter(b"a:1|c\n") == (b"\na:1|c", 1, 1, 0, 0)
    assert f.filter(b"a:1|c\nx.y:1|c\n") == (b"\na:1|c", 2, 1, 1, 0)


def test_prefixes_that_are_prefixes_of_each_other() -> None:
    """'a.' and 'a.b' together block everything starting 'a.' and nothing else."""
    chunk = b"a.x:1|c\na.b.c:1|c\na:1|c\nab:1|c\nb.a.:1|c"
    for blocklist in (("a.", "a.b"), ("a.b", "a.")):
        f = compile_filter(blocklist, 8192)
        assert f.filter(chunk) == (b"\na:1|c\nab:1|c\nb.a.:1|c", 5, 3, 2, 0)


@pytest.mark.parametrize("meta", list(METACHARACTERS))
def test_regex_metacharacters_in_prefix(meta: str) -> None:
    """A metacharacter in a prefix blocks only lines with that literal character."""
    f = compile_filter((f"m{meta}",), 8192)
    lines = [f"m{meta}x:1|c", "mx:1|c", "m:1|c", f"xm{meta}:1|c", "m-x:1|c"]
    kept, received, forwarded, blocked, _ = f.filter("\n".join(lines).encode())
    assert (received, forwarded, blocked) == (5, 4, 1)
    assert kept == b"\n" + "\n".join(lines[1:]).encode()


def test_all_metacharacters_as_one_prefix() -> None:
    """A prefix made only of metacharacters is matched literally."""
    f = compile_filter((METACHARACTERS,), 8192)
    line = (METACHARACTERS + ":1|c").encode()
    assert f.filter(line + b"\nz:1|c") == (b"\nz:1|c", 2, 1, 1, 0)
    assert f.filter(b".*:1|c") == (b"\n.*:1|c", 1, 1, 0, 0)


def test_non_ascii_prefixes() -> None:
    """UTF-8 prefixes block by bytes; a different accent or a raw byte does not match."""
    f = compile_filter(("é.", "日本"), 8192)
    chunk = "é.x:1|c\ne.x:1|c\n日本.y:1|c\n日:1|c".encode() + b"\n\xc3.z:1|c"
    kept, received, forwarded, blocked, oversize = f.filter(chunk)
    assert kept == "\ne.x:1|c\n日:1|c".encode() + b"\n\xc3.z:1|c"
    assert (received, forwarded, blocked, oversize) == (5, 3, 2, 0)


def test_non_utf8_lines_pass_through() -> None:
    """Lines that are not UTF-8 are filtered by bytes and forwarded unchanged."""
    f = compile_filter(("é",), 8192)
    chunk = b"\xff\xfe:1|c\n\xc3\xa9x:1|c\n\xc3:1|c\n\xa9:1|c"
    assert f.filter(chunk) == (b"\n\xff\xfe:1|c\n\xc3:1|c\n\xa9:1|c", 4, 3, 1, 0)


def test_ten_thousand_prefixes() -> None:
    """A 10,000-prefix blocklist blocks exactly its prefixes on both paths."""
    blocklist = tuple(f"app{i}." for i in range(10_000))
    f = compile_filter(blocklist, 8192)
    lines = [b"app0.x:1|c", b"app9999.y:1|c", b"app10000.z:1|c", b"app.x:1|c", b"app12:1|c"]
    clean = b"\n".join(lines)
    assert f.filter(clean) == (b"\napp10000.z:1|c\napp.x:1|c\napp12:1|c", 5, 3, 2, 0)
    crlf = b"\r\n".join(lines) + b"\r\n"  # forces the slow path
    assert f.filter(crlf) == (b"\napp10000.z:1|c\napp.x:1|c\napp12:1|c", 5, 3, 2, 0)
    many = [f"app{i}.m:1|c".encode() for i in range(0, 20_000, 7)]
    check(f.filter(b"\n".join(many)), b"\n".join(many), [p.encode() for p in blocklist], 8192)


def test_prefix_in_middle_of_line_is_not_blocked() -> None:
    """A blocked prefix inside a line (name or tags) does not block it."""
    f = compile_filter(("debug.",), 8192)
    chunk = b"app.debug.x:1|c\nx:1|c|#debug.y\ndebug.z:1|c"
    assert f.filter(chunk) == (b"\napp.debug.x:1|c\nx:1|c|#debug.y", 3, 2, 1, 0)


def test_crlf_and_blank_lines_take_slow_path() -> None:
    """CRLF endings are stripped, blank lines skipped, other bytes kept as they are."""
    f = compile_filter(("b",), 8192)
    assert f.filter(b"a:1|c\r\n\r\nb:1|c\r\n\n\nc\rx:1|c") == (b"\na:1|c\nc\rx:1|c", 3, 2, 1, 0)


def test_oversize_lines_are_counted_not_forwarded() -> None:
    """Lines over max_line_bytes are dropped and counted; the limit is inclusive."""
    f = compile_filter(("blk",), 5)
    assert f.filter(b"abcde\nabcdef\nblk\nblkblk") == (b"\nabcde", 4, 1, 1, 2)


def test_everything_blocked_keeps_nothing() -> None:
    """A chunk whose every line is blocked yields b'' (nothing to send)."""
    f = compile_filter(("a",), 8192)
    assert f.filter(b"a1\na2\na3") == (b"", 3, 0, 3, 0)


def test_compile_filter_empty_entry_never_blocks_everything() -> None:
    """An empty blocklist entry is ignored or refused, never a prefix that matches every line."""
    chunk = b"a:1|c\nb:1|c"
    for blocklist, expected in ((("", "a"), (b"\nb:1|c", 2, 1, 1, 0)), (("",), None)):
        try:
            line_filter = compile_filter(blocklist, 64)
        except ValueError:
            continue
        assert line_filter.filter(chunk) == (expected or (b"\n" + chunk, 2, 2, 0, 0))


def test_compile_filter_rejects_newline() -> None:
    """A prefix with a newline is a configuration error, not a silent no-op."""
    with pytest.raises(ValueError, match="newline"):
        compile_filter(("a\nb",), 64)


@pytest.mark.parametrize("blocklist", [(), ("a",)])
@pytest.mark.parametrize("chunk", [b"a\n\n", b"x:1|c\na:1|c\n\n"])
def test_trailing_blank_line_is_not_forwarded(blocklist: tuple[str, ...], chunk: bytes) -> None:
    """A datagram ending in a blank line counts and forwards only its real lines."""
    prefixes = [p.encode() for p in blocklist]
    check(compile_filter(blocklist, 8192).filter(chunk), chunk, prefixes, 8192)


def test_tcp_blank_lines_are_not_forwarded() -> None:
    """Blank lines after a TCP line do not turn into forwarded empty lines."""
    chunk, _ = LineFramer(8192).feed(b"a:1|c\n\n\n")
    assert compile_filter((), 8192).filter(chunk) == (b"\na:1|c", 1, 1, 0, 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=12), st.integers(min_value=0, max_value=30))
def test_longest_hint_never_changes_the_result(datagrams: list[bytes], slack: int) -> None:
    """Passing the longest datagram's length (or more) as a hint gives the same result."""
    line_filter = compile_filter(("a",), 24)
    chunk = b"\n".join(datagrams)
    hint = max(map(len, datagrams), default=0) + slack
    assert line_filter.filter(chunk, hint) == line_filter.filter(chunk)


# Filler prefixes that push a blocklist past the Hyperscan threshold.
_FILLER = tuple(f"zz{i}." for i in range(MIN_PREFIXES))


@settings(max_examples=300, deadline=None)
@given(
    _chunks,
    st.lists(st.sampled_from(["a", "a.", "ab", "b", "*", "[", "\\", "$", "é", ":"]), max_size=4),
)
def test_large_prefix_sets_agree_with_the_reference(chunk: bytes, picked: list[str]) -> None:
    """Blocklists big enough for the Hyperscan path give exactly the reference result."""
    blocklist = (*picked, *_FILLER)
    prefixes = [p.encode() for p in blocklist]
    check(compile_filter(blocklist, 24).filter(chunk), chunk, prefixes, 24)


def test_hyperscan_is_used_for_large_sets_when_installed() -> None:
    """With the hyperscan package present, a large blocklist takes the Hyperscan path."""
    line_filter = compile_filter(_FILLER, 8192)
    assert (line_filter._drop_hs is not None) == HYPERSCAN
    assert line_filter.filter(b"zz3.x:1|c\nok:1|c") == (b"\nok:1|c", 2, 1, 1, 0)


def test_large_sets_credit_the_earliest_rule() -> None:
    """When prefixes of two rules match a line, the earlier rule is credited."""
    rules = parse_rules(
        [
            {"name": "first", "match": {"prefix": ["a.b.", *_FILLER]}, "action": "drop"},
            {"name": "second", "match": {"prefix": "a."}, "action": "drop"},
        ]
    )
    line_filter = compile_filter((), 8192, rules)
    assert line_filter.filter(b"a.b.c:1|c\na.x:1|c\nkeep:1|c")[0] == b"\nkeep:1|c"
    v = line_filter.counters.values
    assert v[:3] + v[RULE_FIELDS : RULE_FIELDS + 3] == [1, 1, 10, 1, 1, 8]


def test_large_single_rule_counts_every_line() -> None:
    """A big one-rule blocklist credits one match per removed line, not per chunk."""
    line_filter = compile_filter(("debug.", *_FILLER), 8192)
    chunk = b"debug.a:1|c\ndebug.b:1|c\nok:1|c\ndebug.c:1|c"
    assert line_filter.filter(chunk)[3] == 3
    assert line_filter.counters.values[:3] == [3, 3, len(b"debug.a:1|c") * 3 + 3]
