"""Unit tests for statsd_filter.protocol.prefixed: DogStatsD's length-prefixed stream framing."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statsd_filter.protocol.prefixed import HEADER_SIZE, LengthPrefixFramer, encode_prefixed

PROPERTY = settings(max_examples=400, deadline=None)
LIMIT = 64

_payloads = st.lists(st.binary(min_size=1, max_size=LIMIT), max_size=12)


def _frame(payload: bytes) -> bytes:
    """What datadogpy writes on a stream socket: struct.pack('<I', len) then the payload."""
    return struct.pack("<I", len(payload)) + payload


def _feed_cut(
    framer: LengthPrefixFramer, stream: bytes, cuts: list[int]
) -> tuple[list[bytes], int]:
    """Feed ``stream`` cut at ``cuts``; return the chunks produced and the oversize total."""
    chunks: list[bytes] = []
    oversize = 0
    bounds = [0, *sorted(set(cuts)), len(stream)]
    for start, end in itertools.pairwise(bounds):
        chunk, over = framer.feed(stream[start:end])
        assert framer.pending <= HEADER_SIZE + LIMIT  # never more than one frame held
        oversize += over
        if chunk:
            chunks.append(chunk)
    return chunks, oversize


def test_encode_prefixed_is_what_datadog_clients_write() -> None:
    """Each payload goes out as its 4-byte little-endian length and its bytes, in order."""
    payloads = [b"a:1|c", b"b:2|g\nc:3|ms", b"x" * 300]
    assert encode_prefixed(payloads) == b"".join(_frame(p) for p in payloads)
    assert encode_prefixed([b"a:1|c"]) == b"\x05\x00\x00\x00a:1|c"
    assert encode_prefixed([]) == b""


def test_one_read_many_frames_gives_one_chunk() -> None:
    """Complete frames in one read come out as one chunk of payloads joined by newlines."""
    framer = LengthPrefixFramer(LIMIT)
    chunk, oversize = framer.feed(_frame(b"a:1|c") + _frame(b"b:2|c\nc:3|c"))
    assert (chunk, oversize) == (b"a:1|c\nb:2|c\nc:3|c", 0)
    assert framer.pending == 0
    assert framer.error is None


def test_partial_header_and_payload_wait_for_more() -> None:
    """A frame cut inside its header or its payload is held until the rest arrives."""
    framer = LengthPrefixFramer(LIMIT)
    data = _frame(b"abc:1|c")
    assert framer.feed(data[:2]) == (b"", 0)
    assert framer.pending == 2
    assert framer.feed(data[2:6]) == (b"", 0)
    assert framer.pending == 6
    assert framer.feed(data[6:]) == (b"abc:1|c", 0)
    assert framer.pending == 0


def test_zero_length_payloads_are_skipped() -> None:
    """A frame of length 0 carries nothing and yields nothing."""
    framer = LengthPrefixFramer(LIMIT)
    assert framer.feed(_frame(b"") + _frame(b"a:1|c") + _frame(b"")) == (b"a:1|c", 0)


def test_payload_of_exactly_the_limit_is_accepted() -> None:
    """The limit is inclusive: a payload of max_payload bytes passes."""
    framer = LengthPrefixFramer(LIMIT)
    assert framer.feed(_frame(b"x" * LIMIT)) == (b"x" * LIMIT, 0)
    assert framer.error is None


def test_oversize_length_stops_the_stream_after_the_frames_before_it() -> None:
    """A length over the limit: the frames before it are delivered, it counts once, and the
    rest of the stream is ignored."""
    framer = LengthPrefixFramer(LIMIT)
    data = _frame(b"ok:1|c") + struct.pack("<I", LIMIT + 1) + b"x" * 10
    assert framer.feed(data) == (b"ok:1|c", 1)
    assert framer.error == f"frame length {LIMIT + 1} exceeds the limit of {LIMIT} bytes"
    assert framer.pending == 0
    assert framer.feed(_frame(b"later:1|c")) == (b"", 0)
    assert framer.discard() is False  # nothing partial to count: the payload was counted


def test_oversize_length_split_across_reads_is_caught() -> None:
    """An oversize length whose header arrives in pieces is still refused."""
    framer = LengthPrefixFramer(LIMIT)
    header = struct.pack("<I", 1 << 31)
    assert framer.feed(header[:3]) == (b"", 0)
    assert framer.feed(header[3:]) == (b"", 1)
    assert framer.error is not None


def test_close_completes_nothing_and_discard_reports_a_partial_frame() -> None:
    """At EOF a partial frame cannot be completed: close gives b"" and discard reports it."""
    framer = LengthPrefixFramer(LIMIT)
    framer.feed(_frame(b"cut:1|c")[:-2])
    assert framer.close() == b""
    assert framer.discard() is True
    assert framer.pending == 0
    assert framer.discard() is False


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_byte_by_byte_reads_reassemble_every_payload(size: int) -> None:
    """Reads of any size, down to one byte, give the same payloads."""
    payloads = [b"a:1|c", b"bb:22|g", b"ccc:333|ms|#t:v"]
    stream = encode_prefixed(payloads)
    framer = LengthPrefixFramer(LIMIT)
    out = []
    for i in range(0, len(stream), size):
        chunk, _ = framer.feed(stream[i : i + size])
        if chunk:
            out.append(chunk)
    assert b"\n".join(out) == b"\n".join(payloads)


@PROPERTY
@given(payloads=_payloads, cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=20))
def test_any_cuts_give_the_payloads_byte_for_byte(payloads: list[bytes], cuts: list[int]) -> None:
    """However the stream is cut, the payloads come out whole, in order, unchanged."""
    stream = encode_prefixed(payloads)
    framer = LengthPrefixFramer(LIMIT)
    chunks, oversize = _feed_cut(framer, stream, [c for c in cuts if c < len(stream)])
    assert oversize == 0
    assert b"\n".join(chunks) == b"\n".join(payloads)
    assert framer.pending == 0
    assert framer.discard() is False


@PROPERTY
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(min_value=0, max_value=400)))
def test_any_bytes_never_raise_and_stay_bounded(data: bytes, cuts: list[int]) -> None:
    """Arbitrary bytes never raise, never make the framer hold more than one frame, and an
    oversize length is reported at most once."""
    framer = LengthPrefixFramer(LIMIT)
    _, oversize = _feed_cut(framer, data, [c for c in cuts if c < len(data)])
    assert oversize in (0, 1)
    assert (oversize == 1) == (framer.error is not None)
