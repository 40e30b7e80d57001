"""Packs forwarded lines into upstream datagrams of at most ``max_size`` bytes.

Pure: no I/O. Chunks arrive in the filter's shape (``b"\\n" + lines``), so
packing is list appends and one ``join`` per upstream datagram; the leading
newline of the first chunk is cut off when the datagram is built. A line is
never split: a chunk too big for one datagram is cut at newlines (C-level
``rfind``, never a Python step per line), and a single line longer than
``max_size`` goes out alone (loopback and most upstreams accept datagrams up to
64 KiB; dropping it would lose data).

Full datagrams are collected and handed over together on :meth:`flush`, so the
sender can push them with one ``sendmmsg``. The caller decides *when* to flush
(the worker flushes when its sockets have nothing more to read), so batching
adds no latency at low load.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Batcher", "SendBatch"]

# send_batch(payloads, lines): each payload is lines joined by b"\n" (no trailing
# newline); lines[i] is how many lines payloads[i] holds. The lists are the
# callee's to keep.
SendBatch = Callable[[list[bytes], list[int]], None]


class Batcher:
    """Accumulates chunks into datagrams and hands them to ``send_batch``."""

    __slots__ = (
        "_limit",
        "_lines",
        "_parts",
        "_ready",
        "_ready_lines",
        "_send",
        "_size",
        "max_size",
    )

    def __init__(self, max_size: int, send_batch: SendBatch) -> None:
        self.max_size = max_size
        # Chunks carry one leading b"\n" that the datagram does not.
        self._limit = max_size + 1
        self._send = send_batch
        self._parts: list[bytes] = []
        self._size = 0
        self._lines = 0
        self._ready: list[bytes] = []
        self._ready_lines: list[int] = []

    @property
    def pending_lines(self) -> int:
        """Lines held, not yet handed to ``send_batch``."""
        return self._lines + sum(self._ready_lines)

    def add(self, chunk: bytes, lines: int) -> None:
        """Queue a chunk (``b"\\n"`` + ``lines`` lines joined by ``b"\\n"``)."""
        size = len(chunk)
        if self._size + size > self._limit:
            if self._parts:
                self._seal()
            if size > self._limit:
                self._add_split(chunk)
                return
        self._parts.append(chunk)
        self._size += size
        self._lines += lines

    def uncounted(self) -> Batcher:
        """A batcher to the same sender whose datagrams carry no line counts.

        Pre-aggregation's output goes through it: its input lines are counted
        as aggregated when handed over, so the sender must not count its lines
        as forwarded (or as dropped) again.
        """
        send = self._send
        return Batcher(self.max_size, lambda payloads, lines: send(payloads, [0] * len(lines)))

    def flush(self) -> None:
        """Hand every datagram held (the unfinished one too) to ``send_batch``."""
        if self._parts:
            self._seal()
        if self._ready:
            payloads, lines = self._ready, self._ready_lines
            self._ready = []
            self._ready_lines = []
            self._send(payloads, lines)

    def send_packed(self, payloads: list[bytes], lines: list[int]) -> None:
        """Hand over datagrams packed elsewhere (the C fast path), after what is held."""
        self.flush()
        self._send(payloads, lines)

    def _seal(self) -> None:
        self._ready.append(b"".join(self._parts)[1:])
        self._ready_lines.append(self._lines)
        self._parts = []
        self._size = 0
        self._lines = 0

    def _add_split(self, chunk: bytes) -> None:
        # A chunk larger than a datagram (a big TCP read, or a wake-up's worth of
        # UDP datagrams): cut it at newlines into datagram-sized pieces.
        start = 0
        end = len(chunk)
        limit = self._limit
        while start < end:
            room = limit - self._size
            if end - start <= room:
                piece = chunk[start:]
                self._parts.append(piece)
                self._size += len(piece)
                self._lines += piece.count(b"\n")
                return
            cut = chunk.rfind(b"\n", start + 1, start + room + 1)
            if cut > 0 and not self._parts:
                # A whole datagram straight from the chunk: one copy, no join.
                self._ready.append(chunk[start + 1 : cut])
                self._ready_lines.append(chunk.count(b"\n", start, cut))
                start = cut
                continue
            if cut < 0:
                if self._parts:
                    self._seal()  # start a new datagram, then try again
                    continue
                # One line longer than a datagram: it goes out alone, whole.
                cut = chunk.find(b"\n", start + 1)
                if cut < 0:
                    cut = end
            piece = chunk[start:cut]
            self._parts.append(piece)
            self._size += len(piece)
            self._lines += piece.count(b"\n")
            self._seal()
            start = cut
