"""Unit tests for statsd_filter.protocol.frames: the control channel's length-prefixed frames."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statsd_filter.protocol.frames import MAX_FRAME, FrameDecoder, encode_frame

PROPERTY = settings(max_examples=300, deadline=None)


def test_encode_frame_is_big_endian_length_then_payload() -> None:
    """A frame is the payload's length as 4 big-endian bytes, then the payload itself."""
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    payload = b"x" * 0x01020304
    frame = encode_frame(payload)
    assert frame[:4] == b"\x01\x02\x03\x04"
    assert frame[4:] == payload


def test_round_trip_one_frame() -> None:
    """Feeding one whole frame returns exactly its payload."""
    decoder = FrameDecoder()
    assert decoder.feed(encode_frame(b"reload 7")) == [b"reload 7"]
    assert decoder.feed(b"") == []


def test_empty_payload_is_a_frame() -> None:
    """A zero-length payload is a frame of its own, not swallowed or merged."""
    decoder = FrameDecoder()
    assert encode_frame(b"") == b"\x00\x00\x00\x00"
    data = encode_frame(b"") + encode_frame(b"a") + encode_frame(b"")
    assert decoder.feed(data) == [b"", b"a", b""]


def test_several_frames_in_one_feed() -> None:
    """One feed holding several frames and a partial one returns the whole ones, in order."""
    decoder = FrameDecoder()
    tail = encode_frame(b"fourth")
    data = encode_frame(b"first") + encode_frame(b"\x00\xff") + encode_frame(b"third") + tail[:5]
    assert decoder.feed(data) == [b"first", b"\x00\xff", b"third"]
    assert decoder.feed(tail[5:]) == [b"fourth"]


def test_frame_split_at_every_byte_boundary() -> None:
    """Split in two anywhere (inside the header too), a frame comes out once, after the 2nd part."""
    frame = encode_frame(b"payload\nwith\x00bytes")
    for cut in range(len(frame) + 1):
        decoder = FrameDecoder()
        first = decoder.feed(frame[:cut])
        second = decoder.feed(frame[cut:])
        if cut == len(frame):
            assert (first, second) == ([b"payload\nwith\x00bytes"], []), cut
        else:
            assert (first, second) == ([], [b"payload\nwith\x00bytes"]), cut


def test_frame_fed_one_byte_at_a_time() -> None:
    """Bytes fed singly complete each frame at its last byte and nowhere else."""
    payloads = [b"ab", b"", b"c" * 300]
    data = b"".join(encode_frame(p) for p in payloads)
    ends = {4 + 2, 4 + 2 + 4, len(data)}
    decoder = FrameDecoder()
    out: list[bytes] = []
    for position in range(len(data)):
        got = decoder.feed(data[position : position + 1])
        assert bool(got) == (position + 1 in ends), position
        out += got
    assert out == payloads


def test_oversize_length_raises_and_resets() -> None:
    """A length beyond MAX_FRAME raises ValueError; the buffer is dropped and decoding restarts."""
    decoder = FrameDecoder()
    bogus = struct.pack(">I", MAX_FRAME + 1)
    with pytest.raises(ValueError, match="exceeds"):
        decoder.feed(bogus + b"junk after the header")
    # Nothing of the bad frame is left over: the next frame decodes on its own.
    assert decoder.feed(encode_frame(b"fresh")) == [b"fresh"]


def test_oversize_length_detected_from_header_alone() -> None:
    """The bad length is rejected as soon as the header is in, without waiting for the body."""
    decoder = FrameDecoder()
    header = struct.pack(">I", 0xFFFFFFFF)
    assert decoder.feed(header[:3]) == []
    with pytest.raises(ValueError, match="exceeds"):
        decoder.feed(header[3:])
    assert decoder.feed(encode_frame(b"ok")) == [b"ok"]


def test_max_frame_length_itself_is_accepted() -> None:
    """A header announcing exactly MAX_FRAME bytes is legal: it waits for the body, no error."""
    decoder = FrameDecoder()
    assert decoder.feed(struct.pack(">I", MAX_FRAME) + b"partial") == []


@PROPERTY
@given(
    st.lists(st.binary(max_size=64), max_size=12),
    st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
)
def test_any_split_gives_the_same_payloads(payloads: list[bytes], cuts: list[int]) -> None:
    """Any payloads, encoded and fed in pieces cut anywhere, decode to the same payloads."""
    data = b"".join(encode_frame(p) for p in payloads)
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    decoder = FrameDecoder()
    out: list[bytes] = []
    for start, end in itertools.pairwise(points):
        out += decoder.feed(data[start:end])
    assert out == payloads
    assert decoder.feed(b"") == []
