"""Length-prefixed frames over a socketpair: the supervisor <-> worker control channel.

Sans-I/O framing (``encode_frame`` / :class:`FrameDecoder`) plus nothing else:
what the frames carry is the caller's business (the supervisor knows nothing
about StatsD). A frame is a 4-byte big-endian length and that many bytes.
"""

from __future__ import annotations

import struct

__all__ = ["MAX_FRAME", "FrameDecoder", "encode_frame"]

_HEADER = struct.Struct(">I")
# A config with tens of thousands of rules pickles to a few MB; beyond this the
# peer is broken, and the channel is reset rather than buffering without bound.
MAX_FRAME = 256 << 20


def encode_frame(payload: bytes) -> bytes:
    """One frame carrying ``payload``."""
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Collects bytes and yields complete frames."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes; return every frame they complete."""
        self._buf += data
        frames = []
        while len(self._buf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buf)
            if size > MAX_FRAME:
                self._buf.clear()
                raise ValueError(f"control frame of {size} bytes exceeds {MAX_FRAME}")
            end = _HEADER.size + size
            if len(self._buf) < end:
                break
            frames.append(bytes(self._buf[_HEADER.size : end]))
            del self._buf[:end]
        return frames
