"""Line splitting and TCP framing for StatsD.

StatsD lines are separated by ``\\n``. A UDP datagram holds whole lines; a TCP
stream holds lines that may be cut anywhere by the reads that deliver them.
:class:`LineFramer` turns arbitrary reads into *chunks*: runs of complete lines
joined by ``\\n`` with no trailing newline, which is exactly the shape of a UDP
datagram, so the rest of the pipeline treats both transports alike.

The framer never holds more than ``max_line_bytes`` of an unfinished line: a
line that grows past the limit is discarded, counted, and the stream is
resynchronised at the next newline. (One exception: a partial line of exactly
``max_line_bytes + 1`` bytes ending in ``\r`` is kept, because that ``\r`` may
be the first half of a ``\r\n`` ending, which is not part of the line; the
verdict on a line must not depend on where a read boundary falls.) Its work
is linear in the bytes fed (the partial line lives in a ``bytearray`` that is
appended to, never rebuilt).
"""

from __future__ import annotations

__all__ = ["LineFramer", "split_lines"]

NL = b"\n"


def split_lines(chunk: bytes) -> list[bytes]:
    """Split a chunk into its non-empty lines, accepting ``\\r\\n`` endings."""
    lines = []
    for raw in chunk.split(NL):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if line:
            lines.append(line)
    return lines


class LineFramer:
    """Reassembles newline-framed lines from a TCP byte stream.

    ``feed`` returns ``(chunk, oversize)``: ``chunk`` holds every line completed
    by this read (possibly ``b""``), ``oversize`` how many lines were discarded
    for exceeding the limit while being assembled. Complete lines longer than
    the limit that arrive inside one read are left in the chunk for the filter
    to count, so both transports share one oversize check.
    """

    __slots__ = ("_max", "_skipping", "_tail")
    # Newline framing resynchronises after any input: it never gives up on a stream.
    error: str | None = None

    def __init__(self, max_line_bytes: int) -> None:
        self._max = max_line_bytes
        self._tail = bytearray()
        # True while discarding the rest of an oversize line up to its newline.
        self._skipping = False

    @property
    def pending(self) -> int:
        """Bytes of the unfinished line currently held."""
        return len(self._tail)

    def feed(self, data: bytes) -> tuple[bytes, int]:
        """Take one read's bytes; return the completed lines and the oversize count."""
        oversize = 0
        last_nl = data.rfind(NL)
        if last_nl < 0:
            if not self._skipping:
                self._tail += data
                if self._too_long(self._tail):
                    oversize = 1
                    self._tail.clear()
                    self._skipping = True
            return b"", oversize

        if self._skipping:
            # Drop everything up to the first newline: the end of the long line.
            chunk = data[data.find(NL) + 1 : last_nl]
            self._skipping = False
        elif self._tail:
            self._tail += data[:last_nl]
            chunk = bytes(self._tail)
            self._tail.clear()
        else:
            chunk = data[:last_nl]

        rest = data[last_nl + 1 :]
        if self._too_long(rest):
            oversize = 1
            self._skipping = True
        elif rest:
            self._tail += rest
        return chunk, oversize

    def _too_long(self, partial: bytes | bytearray) -> bool:
        size = len(partial)
        return size > self._max and not (size == self._max + 1 and partial[-1] == 13)  # b"\r"

    def close(self) -> bytes:
        """End of stream: the unterminated last line, which a clean EOF completes."""
        tail = b"" if self._skipping else bytes(self._tail)
        self._tail.clear()
        self._skipping = False
        return tail

    def discard(self) -> bool:
        """Forget the unfinished line (connection torn down); True if there was one."""
        had = bool(self._tail)
        self._tail.clear()
        self._skipping = False
        return had
