"""DogStatsD's stream framing: every payload preceded by its length (4 bytes, little-endian).

On a Unix stream socket the Datadog agent (``dogstatsd_stream_socket``), datadog-go
(``unixstream://``) and datadogpy write each payload (one or more StatsD lines
joined by ``\\n``, what would otherwise be one datagram) as a 4-byte
little-endian length followed by that many bytes. :class:`LengthPrefixFramer`
turns arbitrary reads of such a stream into *chunks*, the pipeline's common
shape (complete lines joined by ``\\n``), and :func:`encode_prefixed` writes the
form for a stream upstream.

A length above ``max_payload`` means a broken or hostile peer: nothing after it
can be trusted to be a frame boundary, so the framer stops (``error`` says why)
and reports the payload as one oversize line; the caller closes the connection,
as the agent does. The framer never holds more than one header and one
payload of at most ``max_payload`` bytes, and its work is linear in the bytes
fed: a partial payload is appended to, never re-scanned, and complete frames
are cut out of each read in one pass.
"""

from __future__ import annotations

import struct

__all__ = ["HEADER_SIZE", "LengthPrefixFramer", "encode_prefixed"]

_HEADER = struct.Struct("<I")
HEADER_SIZE = _HEADER.size


def encode_prefixed(payloads: list[bytes]) -> bytes:
    """Each payload preceded by its length, ready for one write."""
    pack = _HEADER.pack
    return b"".join([part for payload in payloads for part in (pack(len(payload)), payload)])


class LengthPrefixFramer:
    """Reassembles length-prefixed payloads from a stream.

    ``feed`` returns ``(chunk, oversize)`` like
    :class:`~statsd_filter.protocol.lines.LineFramer`: ``chunk`` holds every
    payload completed by this read, joined by ``\\n`` (possibly ``b""``);
    ``oversize`` is 1 when a length above the limit was met (then ``error`` is
    set and every later read is ignored), else 0.
    """

    __slots__ = ("_buf", "_max", "_need", "error")

    def __init__(self, max_payload: int) -> None:
        self._max = max_payload
        self._buf = bytearray()
        # Bytes the buffer must hold before its next frame can be complete.
        self._need = HEADER_SIZE
        self.error: str | None = None

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame (header included) currently held."""
        return len(self._buf)

    def feed(self, data: bytes) -> tuple[bytes, int]:
        """Take one read's bytes; return the completed payloads and the oversize count."""
        if self.error is not None:
            return b"", 0
        if self._buf:
            self._buf += data
            if len(self._buf) < self._need:
                return b"", 0
            data = bytes(self._buf)
            self._buf.clear()
        payloads = []
        pos = 0
        end = len(data)
        unpack = _HEADER.unpack_from
        limit = self._max
        oversize = 0
        while end - pos >= HEADER_SIZE:
            (size,) = unpack(data, pos)
            if size > limit:
                self.error = f"frame length {size} exceeds the limit of {limit} bytes"
                oversize = 1
                pos = end
                break
            stop = pos + HEADER_SIZE + size
            if stop > end:
                break
            if size:
                payloads.append(data[pos + HEADER_SIZE : stop])
            pos = stop
        if pos < end:
            self._buf += data[pos:]
            self._need = (
                HEADER_SIZE + _HEADER.unpack_from(self._buf)[0]
                if len(self._buf) >= HEADER_SIZE
                else HEADER_SIZE
            )
        else:
            self._need = HEADER_SIZE
        if not payloads:
            return b"", oversize
        return (payloads[0] if len(payloads) == 1 else b"\n".join(payloads)), oversize

    def close(self) -> bytes:
        """End of stream: nothing completes a partial payload (unlike a line), so b""."""
        return b""

    def discard(self) -> bool:
        """Forget the unfinished frame (connection ended); True if there was one."""
        had = bool(self._buf)
        self._buf.clear()
        self._need = HEADER_SIZE
        return had
