"""Unit tests for statsd_filter.protocol.lines: split_lines and LineFramer."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statsd_filter.protocol.lines import LineFramer, split_lines

PROPERTY = settings(max_examples=400, deadline=None)

# Bytes that exercise the framer: separators, CR, NUL, non-UTF-8, multi-byte UTF-8.
_INTERESTING = [b"a", b"b", b".", b":", b"|", b"\r", b"\x00", b"\xff", b"\xc3\xa9", b"\n"]
_raw_bytes = st.one_of(
    st.binary(max_size=40),
    st.lists(st.sampled_from(_INTERESTING), max_size=40).map(b"".join),
)
# A line: anything but a newline.
_lines = _raw_bytes.map(lambda b: b.replace(b"\n", b""))


def _strip_cr(line: bytes) -> bytes:
    return line[:-1] if line.endswith(b"\r") else line


def _expected(lines: list[bytes], limit: int) -> tuple[list[bytes], int]:
    """Reference: non-empty lines (one trailing CR removed) within the limit, and the rest."""
    stripped = [_strip_cr(line) for line in lines]
    nonempty = [line for line in stripped if line]
    return [line for line in nonempty if len(line) <= limit], sum(
        1 for line in nonempty if len(line) > limit
    )


# The framer may hold one byte over the limit: a CR that may start a CRLF ending.
CR_SLACK = 1


def _run_framer(
    stream: bytes, cuts: list[int], limit: int
) -> tuple[list[bytes], int, list[int], list[int]]:
    """Feed ``stream`` cut at ``cuts``; return kept lines, oversize, pendings, partials."""
    framer = LineFramer(limit)
    out: list[bytes] = []
    oversize = 0
    pendings: list[int] = []
    partials: list[int] = []
    bounds = [0, *sorted(set(cuts)), len(stream)]
    for start, end in itertools.pairwise(bounds):
        chunk, over = framer.feed(stream[start:end])
        oversize += over
        for line in split_lines(chunk):
            if len(line) > limit:
                oversize += 1
            else:
                out.append(line)
        pendings.append(framer.pending)
        fed = stream[:end]
        partials.append(len(fed) - (fed.rfind(b"\n") + 1))
    out.extend(split_lines(framer.close()))
    assert framer.pending == 0
    return out, oversize, pendings, partials


# ------------------------------------------------------------------ split_lines


@pytest.mark.parametrize(
    ("chunk", "expected"),
    [
        (b"", []),
        (b"\n", []),
        (b"\n\n\n", []),
        (b"\r", []),
        (b"\r\n\r\n", []),
        (b"a:1|c", [b"a:1|c"]),
        (b"a:1|c\n", [b"a:1|c"]),
        (b"\na:1|c", [b"a:1|c"]),
        (b"a:1|c\r\nb:2|g\r\n", [b"a:1|c", b"b:2|g"]),
        (b"a\r\r", [b"a\r"]),
        (b"a\rb", [b"a\rb"]),
        (b"a\n\nb\n", [b"a", b"b"]),
        (b"\xff\xfe\n\xc3\xa9", [b"\xff\xfe", b"\xc3\xa9"]),
    ],
)
def test_split_lines_examples(chunk: bytes, expected: list[bytes]) -> None:
    """split_lines drops empty lines, strips exactly one trailing CR, keeps bytes intact."""
    assert split_lines(chunk) == expected


@PROPERTY
@given(st.lists(_lines, max_size=20), st.booleans())
def test_split_lines_recovers_joined_lines(lines: list[bytes], trailing: bool) -> None:
    """split_lines of lines joined by LF gives back the non-empty lines, CR-stripped, in order."""
    chunk = b"\n".join(lines) + (b"\n" if trailing else b"")
    expected, _ = _expected(lines, limit=1 << 30)
    assert split_lines(chunk) == expected


# ------------------------------------------------------- LineFramer: properties


@st.composite
def _framed_streams(draw: st.DrawFn) -> tuple[list[bytes], bytes, list[int], int]:
    limit = draw(st.integers(min_value=1, max_value=24))
    # Lines of arbitrary bytes, plus lines right at the limit (with and without CR).
    near_limit = st.integers(min_value=max(1, limit - 1), max_value=limit + 2)
    line = st.one_of(
        _lines,
        near_limit.map(lambda n: b"m" * n),
        near_limit.map(lambda n: b"m" * (n - 1) + b"\r"),
    )
    lines = draw(st.lists(line, max_size=25))
    stream = b"\n".join(lines) + (b"\n" if draw(st.booleans()) else b"")
    positions = st.integers(min_value=0, max_value=len(stream))
    # Random read boundaries, or one byte per read (every boundary at once).
    cuts = draw(st.one_of(st.lists(positions, max_size=30), st.just(list(range(len(stream) + 1)))))
    return lines, stream, cuts, limit


@PROPERTY
@given(_framed_streams())
def test_framer_reassembles_any_read_boundaries(
    case: tuple[list[bytes], bytes, list[int], int],
) -> None:
    """Any read boundaries: in-limit lines come out whole and in order; longer ones count once."""
    lines, stream, cuts, limit = case
    out, oversize, _, _ = _run_framer(stream, cuts, limit)
    expected, expected_oversize = _expected(lines, limit)
    assert out == expected
    assert oversize == expected_oversize


@PROPERTY
@given(_framed_streams())
def test_framer_never_holds_more_than_limit(
    case: tuple[list[bytes], bytes, list[int], int],
) -> None:
    """After every read the framer holds exactly the unfinished line if it fits, else nothing."""
    _, stream, cuts, limit = case
    _, _, pendings, partials = _run_framer(stream, cuts, limit)
    for pending, partial in zip(pendings, partials, strict=True):
        assert pending <= limit + CR_SLACK
        if partial <= limit:
            assert pending == partial
        elif partial == limit + CR_SLACK:
            assert pending in (0, partial)  # kept only if it ends in CR
        else:
            assert pending == 0


@PROPERTY
@given(st.lists(_raw_bytes, max_size=30), st.integers(min_value=1, max_value=64))
def test_framer_never_raises_on_arbitrary_reads(reads: list[bytes], limit: int) -> None:
    """Arbitrary reads (any bytes, any newlines) never raise and never grow the buffer."""
    framer = LineFramer(limit)
    for data in reads:
        chunk, oversize = framer.feed(data)
        assert isinstance(chunk, bytes)
        assert oversize in (0, 1)
        assert framer.pending <= limit + CR_SLACK
    assert len(framer.close()) <= limit + CR_SLACK
    assert framer.pending == 0


@PROPERTY
@given(st.lists(_lines, min_size=1, max_size=10), st.integers(min_value=1, max_value=16))
def test_framer_resyncs_after_oversize_line(good: list[bytes], limit: int) -> None:
    """A line far over the limit, fed byte by byte, counts once; the next lines survive."""
    framer = LineFramer(limit)
    oversize = 0
    for i in range(limit * 3):
        _, over = framer.feed(b"x" if i % 2 else b"\r")
        oversize += over
        assert framer.pending <= limit + CR_SLACK
    out: list[bytes] = []
    tail = b"\n" + b"\n".join(good) + b"\n"
    for i in range(len(tail)):
        chunk, over = framer.feed(tail[i : i + 1])
        oversize += over
        out.extend(split_lines(chunk))
    expected, expected_oversize = _expected(good, limit)
    assert oversize == 1 + expected_oversize
    assert out == expected


# ------------------------------------------------------- LineFramer: examples


def test_framer_partial_line_across_three_reads() -> None:
    """A line cut across three reads comes out once, whole, when its newline arrives."""
    framer = LineFramer(64)
    assert framer.feed(b"api.req") == (b"", 0)
    assert framer.pending == 7
    assert framer.feed(b"uest:1") == (b"", 0)
    assert framer.pending == 13
    assert framer.feed(b"|c\nnext:") == (b"api.request:1|c", 0)
    assert framer.pending == 5


def test_framer_many_lines_in_one_read() -> None:
    """One read holding several lines yields them as one chunk without the trailing newline."""
    framer = LineFramer(64)
    assert framer.feed(b"a:1|c\nb:2|g\nc:3|ms\n") == (b"a:1|c\nb:2|g\nc:3|ms", 0)
    assert framer.pending == 0


def test_framer_crlf_line_endings() -> None:
    """CRLF endings are accepted, also when the CR and LF arrive in different reads."""
    framer = LineFramer(64)
    chunk, _ = framer.feed(b"a:1|c\r\nb:2|c\r")
    assert split_lines(chunk) == [b"a:1|c"]
    chunk, _ = framer.feed(b"\n")
    assert split_lines(chunk) == [b"b:2|c"]


def test_framer_empty_lines_are_skipped() -> None:
    """Blank lines between metrics produce no lines and no oversize counts."""
    framer = LineFramer(8)
    chunk, oversize = framer.feed(b"\n\n\na:1|c\n\n\r\n\n")
    assert split_lines(chunk) == [b"a:1|c"]
    assert oversize == 0
    assert framer.close() == b""


def test_framer_eof_completes_unterminated_line() -> None:
    """close() returns the unterminated last line, which a clean EOF completes, once."""
    framer = LineFramer(64)
    assert framer.feed(b"a:1|c\nb:2|") == (b"a:1|c", 0)
    assert framer.feed(b"c") == (b"", 0)
    assert framer.close() == b"b:2|c"
    assert framer.pending == 0
    assert framer.close() == b""


def test_framer_discard_reports_partial_line() -> None:
    """discard() says whether an unfinished line was thrown away, and forgets it."""
    framer = LineFramer(64)
    framer.feed(b"a:1|c\nhalf")
    assert framer.discard() is True
    assert framer.pending == 0
    assert framer.discard() is False
    framer.feed(b"whole:1|c\n")
    assert framer.discard() is False


def test_framer_discard_after_oversize_partial_is_false() -> None:
    """An oversize partial line is already counted, so discard() does not report it again."""
    framer = LineFramer(8)
    assert framer.feed(b"x" * 20) == (b"", 1)
    assert framer.discard() is False
    # Discard also ends the skip: the next bytes start a fresh line.
    assert framer.feed(b"ok\n") == (b"ok", 0)


def test_framer_100kb_line_then_valid_line() -> None:
    """A 100 KB line without newline is dropped once, memory stays bounded, the next passes."""
    framer = LineFramer(8192)
    oversize = 0
    for _ in range(25):
        chunk, over = framer.feed(b"x" * 4096)
        assert chunk == b""
        oversize += over
        assert framer.pending <= 8192
    chunk, over = framer.feed(b"xxx\nvalid:1|c\n")
    oversize += over
    assert oversize == 1
    assert chunk == b"valid:1|c"


def test_framer_100kb_line_in_single_read() -> None:
    """A 100 KB unterminated read is counted immediately and not buffered."""
    framer = LineFramer(8192)
    assert framer.feed(b"y" * 100_000) == (b"", 1)
    assert framer.pending == 0
    assert framer.close() == b""


def test_framer_oversize_tail_of_read_is_skipped_to_next_newline() -> None:
    """An unterminated remainder over the limit is counted and skipped up to its newline."""
    framer = LineFramer(10)
    assert framer.feed(b"ok:1|c\n" + b"y" * 20) == (b"ok:1|c", 1)
    assert framer.pending == 0
    assert framer.feed(b"yyyy\nnext:1|c\nmore") == (b"next:1|c", 0)
    assert framer.close() == b"more"


def test_framer_complete_long_line_is_left_for_the_filter() -> None:
    """A complete over-limit line inside one read stays in the chunk (the filter counts it)."""
    framer = LineFramer(10)
    chunk, oversize = framer.feed(b"z" * 30 + b"\nok:1|c\n")
    assert oversize == 0
    assert split_lines(chunk) == [b"z" * 30, b"ok:1|c"]


def test_framer_limit_is_inclusive() -> None:
    """A line of exactly max_line_bytes is accepted; one byte more is dropped."""
    framer = LineFramer(5)
    assert framer.feed(b"abcde") == (b"", 0)
    assert framer.feed(b"\n") == (b"abcde", 0)
    assert framer.feed(b"abcdef") == (b"", 1)
    assert framer.feed(b"\n") == (b"", 0)


def test_framer_close_after_oversize_partial_is_empty() -> None:
    """EOF in the middle of an oversize line yields nothing (it was already counted)."""
    framer = LineFramer(4)
    assert framer.feed(b"ok\nlonger") == (b"ok", 1)
    assert framer.close() == b""


def test_framer_crlf_limit_independent_of_read_boundary() -> None:
    """A max-length line ending in CRLF is kept whether or not a read splits the CR from the LF."""
    whole = LineFramer(4)
    chunk, oversize = whole.feed(b"abcd\r\n")
    assert (split_lines(chunk), oversize) == ([b"abcd"], 0)

    split = LineFramer(4)
    first, over1 = split.feed(b"abcd\r")
    second, over2 = split.feed(b"\n")
    assert (split_lines(first) + split_lines(second), over1 + over2) == ([b"abcd"], 0)
