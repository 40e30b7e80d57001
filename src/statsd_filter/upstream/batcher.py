"""Packs forwarded lines into upstream datagrams of at most ``max_size`` bytes.

Pure: no I/O. Chunks arrive in the filter's shape (``b"\\n" + lines``), so
packing is list appends and one ``join`` per upstream datagram; the leading
newline of the first chunk is cut off when the datagram is built. A line is
never split: a chunk too big for one datagram is cut at line boundaries, and a
single line longer than ``max_size`` goes out alone (loopback and most
upstreams accept datagrams up to 64 KiB; dropping it would lose data).

The caller decides *when* to flush (the worker flushes when its sockets have
nothing more to read), so batching adds no latency at low load.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Batcher", "SendFn"]

# send(payload, lines): payload is lines joined by b"\n", no trailing newline.
SendFn = Callable[[bytes, int], None]


class Batcher:
    """Accumulates chunks and hands full datagrams to ``send``."""

    __slots__ = ("_limit", "_lines", "_parts", "_send", "_size", "max_size")

    def __init__(self, max_size: int, send: SendFn) -> None:
        self.max_size = max_size
        # Chunks carry one leading b"\n" that the datagram does not.
        self._limit = max_size + 1
        self._send = send
        self._parts: list[bytes] = []
        self._size = 0
        self._lines = 0

    @property
    def pending_lines(self) -> int:
        """Lines held, not yet handed to ``send``."""
        return self._lines

    def add(self, chunk: bytes, lines: int) -> None:
        """Queue a chunk (``b"\\n"`` + ``lines`` lines joined by ``b"\\n"``)."""
        size = len(chunk)
        if self._size + size > self._limit:
            if self._parts:
                self.flush()
            if size > self._limit:
                self._add_split(chunk)
                return
        self._parts.append(chunk)
        self._size += size
        self._lines += lines

    def flush(self) -> None:
        """Hand everything held to ``send`` as one datagram."""
        if self._parts:
            payload = b"".join(self._parts)[1:]
            lines = self._lines
            self._parts.clear()
            self._size = 0
            self._lines = 0
            self._send(payload, lines)

    def _add_split(self, chunk: bytes) -> None:
        # Rare: one chunk larger than a datagram. Pack its lines greedily.
        for line in chunk[1:].split(b"\n"):
            piece = b"\n" + line
            if self._size + len(piece) > self._limit and self._parts:
                self.flush()
            self._parts.append(piece)
            self._size += len(piece)
            self._lines += 1
        # A lone oversize line must not wait for company: send it now.
        if self._size > self._limit:
            self.flush()
