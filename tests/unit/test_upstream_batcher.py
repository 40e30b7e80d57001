"""Unit tests for statsd_filter.upstream.batcher.Batcher."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from statsd_filter.upstream.batcher import Batcher

PROPERTY = settings(max_examples=400, deadline=None)


class Recorder:
    """A send_batch function that records every (payload, lines) it is handed."""

    def __init__(self) -> None:
        self.calls: list[tuple[bytes, int]] = []
        self.batches = 0

    def __call__(self, payloads: list[bytes], lines: list[int]) -> None:
        assert len(payloads) == len(lines)
        assert payloads  # never called with nothing to send
        self.batches += 1
        self.calls.extend(zip(payloads, lines, strict=True))

    @property
    def payloads(self) -> list[bytes]:
        return [payload for payload, _ in self.calls]


def chunk_of(lines: list[bytes]) -> bytes:
    """A chunk in the filter's shape: LF + lines joined by LF."""
    return b"\n" + b"\n".join(lines)


# A line: non-empty, no newline; lengths around the datagram sizes below.
_line = st.one_of(
    st.binary(min_size=1, max_size=30).map(lambda b: b.replace(b"\n", b"_")),
    st.integers(min_value=1, max_value=30).map(lambda n: b"m" * n),
)
_chunks = st.lists(st.lists(_line, min_size=1, max_size=8), max_size=15)


@PROPERTY
@given(_chunks, st.integers(min_value=1, max_value=40), st.data())
def test_batcher_packs_lines_losslessly(
    chunks: list[list[bytes]], max_size: int, data: st.DataObject
) -> None:
    """Payloads fit max_size (bar one long line), counts add up, lines arrive in order, once."""
    sent = Recorder()
    batcher = Batcher(max_size, sent)
    added = 0
    for lines in chunks:
        batcher.add(chunk_of(lines), len(lines))
        added += len(lines)
        if data.draw(st.booleans(), label="flush now"):
            batcher.flush()
            assert batcher.pending_lines == 0
        assert batcher.pending_lines + sum(n for _, n in sent.calls) == added
    batcher.flush()
    assert batcher.pending_lines == 0

    expected = [line for lines in chunks for line in lines]
    out: list[bytes] = []
    for payload, count in sent.calls:
        parts = payload.split(b"\n")
        assert payload, "an empty datagram was sent"
        assert count == len(parts)
        assert len(payload) <= max_size or len(parts) == 1, (payload, max_size)
        out.extend(parts)
    assert out == expected
    assert sum(count for _, count in sent.calls) == len(expected)


@PROPERTY
@given(_chunks, st.integers(min_value=1, max_value=40))
def test_batcher_sends_one_datagram_when_everything_fits(
    chunks: list[list[bytes]], max_size: int
) -> None:
    """If all lines joined fit in max_size, nothing is sent before flush, then one datagram."""
    lines = [line for chunk in chunks for line in chunk]
    joined = b"\n".join(lines)
    max_size = max(max_size, len(joined))
    sent = Recorder()
    batcher = Batcher(max_size, sent)
    for chunk in chunks:
        batcher.add(chunk_of(chunk), len(chunk))
    assert sent.calls == []
    batcher.flush()
    assert sent.calls == ([(joined, len(lines))] if lines else [])


def test_flush_with_nothing_pending_sends_nothing() -> None:
    """flush() on an empty batcher (new, or just flushed) does not call send."""
    sent = Recorder()
    batcher = Batcher(100, sent)
    batcher.flush()
    assert sent.calls == []
    batcher.add(b"\na:1|c", 1)
    batcher.flush()
    batcher.flush()
    assert sent.calls == [(b"a:1|c", 1)]


def test_chunks_accumulate_until_full() -> None:
    """Chunks share a datagram until the next would overflow it; full ones wait for flush."""
    sent = Recorder()
    batcher = Batcher(11, sent)
    batcher.add(b"\naaaaa", 1)
    batcher.add(b"\nbbbbb", 1)  # "aaaaa\nbbbbb" is exactly 11 bytes
    assert batcher.pending_lines == 2
    batcher.add(b"\nc", 1)
    assert sent.calls == []  # sealed, but held for one batched send
    assert batcher.pending_lines == 3
    batcher.flush()
    assert sent.payloads == [b"aaaaa\nbbbbb", b"c"]
    assert sent.batches == 1  # both datagrams in one hand-over (one sendmmsg)


def test_big_chunk_is_split_at_line_boundaries() -> None:
    """A chunk larger than a datagram is cut between lines, never inside one."""
    sent = Recorder()
    batcher = Batcher(7, sent)
    batcher.add(b"\naaa\nbbb\nccc\nddd\ne", 5)
    batcher.flush()
    assert sent.calls == [(b"aaa\nbbb", 2), (b"ccc\nddd", 2), (b"e", 1)]


def test_single_oversize_line_goes_out_alone() -> None:
    """A line longer than max_size is sent in its own datagram, whole, not dropped."""
    sent = Recorder()
    batcher = Batcher(8, sent)
    batcher.add(b"\nsmall", 1)
    batcher.add(b"\n" + b"L" * 20, 1)
    batcher.flush()
    assert sent.calls == [(b"small", 1), (b"L" * 20, 1)]
    assert batcher.pending_lines == 0
    batcher.add(b"\nx\n" + b"M" * 20 + b"\ny", 3)
    batcher.flush()
    assert sent.calls[2:] == [(b"x", 1), (b"M" * 20, 1), (b"y", 1)]
