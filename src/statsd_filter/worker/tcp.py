"""TCP input: accept clients on this worker's listening socket, frame their lines.

Each worker listens on its own ``SO_REUSEPORT`` socket (the kernel spreads new
connections over the workers). Sockets are driven from event-loop readiness
callbacks rather than asyncio protocols, so shutdown can read exactly what each
client already sent before closing it. Every read goes through the
connection's :class:`~statsd_filter.protocol.lines.LineFramer`; the complete
lines go to the pipeline, which is flushed once per loop iteration so the
lines of many connections share upstream datagrams.

:class:`TcpInput` is also the base of the Unix stream input (``unix.py``),
which changes only the class attributes below (its counters, how many clients
one wake-up accepts) and the framer each connection gets.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Protocol

from statsd_filter.protocol.lines import LineFramer
from statsd_filter.stats import Stat
from statsd_filter.worker.pipeline import Pipeline

__all__ = ["TcpInput"]

# One TCP read; big enough that a busy client needs few system calls.
TCP_RECV_SIZE = 65536
# Connections accepted per wake-up, so an accept storm cannot starve readers.
MAX_ACCEPTS_PER_WAKEUP = 64
# Reads per connection while draining at shutdown (bounds a client that never stops).
MAX_DRAIN_READS = 64
# Clients accepted from the backlog at shutdown, whatever max_connections says:
# each is read and closed at once, and refusing it would lose what it sent.
SHUTDOWN_MAX_CONNECTIONS = 1 << 20


class Framer(Protocol):
    """What a connection's framer offers (``LineFramer``, ``LengthPrefixFramer``)."""

    error: str | None

    def feed(self, data: bytes) -> tuple[bytes, int]: ...
    def close(self) -> bytes: ...
    def discard(self) -> bool: ...


class _Connection:
    __slots__ = ("fd", "framer", "last_active", "origin", "peer", "sock")

    def __init__(self, sock: socket.socket, peer: str, framer: Framer, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.framer = framer
        self.last_active = now
        # Rewrites each chunk before the pipeline sees it (origin detection), or None.
        self.origin: Callable[[bytes], bytes] | None = None


class TcpInput:
    """Accepts TCP clients on this worker's listening sockets (one per address) and reads them."""

    transport = "tcp"  # in log messages
    accepts_per_wakeup = MAX_ACCEPTS_PER_WAKEUP
    # Counters of this transport's clients.
    stat_open = Stat.TCP_CONNECTIONS_OPEN
    stat_accepted = Stat.TCP_CONNECTIONS_ACCEPTED
    stat_rejected = Stat.TCP_CONNECTIONS_REJECTED
    stat_idle_closed = Stat.TCP_IDLE_CLOSED
    # A transport's share of BYTES_IN (which counts every input), if it keeps one.
    stat_bytes: Stat | None = None

    def __init__(
        self,
        socks: list[socket.socket],
        pipeline: Pipeline,
        counters: memoryview,
        log: logging.Logger,
        *,
        max_line_bytes: int,
        max_connections: int,
        idle_timeout: float,
    ) -> None:
        self._socks = socks
        self._pipeline = pipeline
        self._c = counters
        self._log = log
        self._max_line = max_line_bytes
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._conns: dict[int, _Connection] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self.clock = 0.0  # coarse time, updated by the worker's housekeeping

    def set_max_line_bytes(self, max_line_bytes: int) -> None:
        """A reloaded limit: applies to connections accepted from now on."""
        self._max_line = max_line_bytes

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.clock = self._loop.time()
        for sock in self._socks:
            self._loop.add_reader(sock.fileno(), self._on_acceptable, sock)
        self._accepting = True

    def _on_acceptable(self, sock: socket.socket) -> None:
        self._accept(sock, self.accepts_per_wakeup, self._max_connections)

    def _new_framer(self) -> Framer:
        return LineFramer(self._max_line)

    def _accepted(self, conn: _Connection) -> None:
        """A hook for subclasses: a client was just accepted."""

    def _accept(self, sock: socket.socket, count: int, max_connections: int) -> bool:
        """Accept up to ``count`` waiting clients; False once the backlog is empty."""
        assert self._loop is not None
        for _ in range(count):
            try:
                conn_sock, addr = sock.accept()
            except BlockingIOError:
                return False
            except OSError as exc:
                # EMFILE/ENFILE: out of descriptors. Log and let the loop retry later.
                self._c[self.stat_rejected] += 1
                self._log.warning("%s accept failed: %s", self.transport, exc)
                return False
            if len(self._conns) >= max_connections:
                self._c[self.stat_rejected] += 1
                self._log.warning(
                    "%s connection from %s rejected: max_connections=%d reached",
                    self.transport,
                    addr or "a client",
                    self._max_connections,
                )
                conn_sock.close()
                continue
            conn_sock.setblocking(False)
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr or "client")
            conn = _Connection(conn_sock, peer, self._new_framer(), self.clock)
            self._accepted(conn)
            self._conns[conn.fd] = conn
            self._loop.add_reader(conn.fd, self._on_readable, conn)
            self._c[self.stat_accepted] += 1
            self._c[self.stat_open] = len(self._conns)
        return True

    def _on_readable(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(TCP_RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._close(conn, f"error: {exc}")
            return
        if not data:
            # A clean EOF completes an unterminated last line.
            tail = conn.framer.close()
            if tail:
                self._feed(conn, tail, 0)
            self._close(conn, "closed by client")
            return
        self._read(conn, data)
        conn.last_active = self.clock
        if conn.framer.error is not None:
            self._refuse(conn)

    def _read(self, conn: _Connection, data: bytes) -> None:
        c = self._c
        c[Stat.BYTES_IN] += len(data)
        if self.stat_bytes is not None:
            c[self.stat_bytes] += len(data)
        chunk, oversize = conn.framer.feed(data)
        if chunk or oversize:
            self._feed(conn, chunk, oversize)

    def _refuse(self, conn: _Connection) -> None:
        """The client broke the framing (its framer says why): close it."""
        self._log.warning(
            "%s %s: %s; connection closed", self.transport, conn.peer, conn.framer.error
        )
        self._close(conn, "framing error")

    def _feed(self, conn: _Connection, chunk: bytes, oversize: int) -> None:
        if conn.origin is not None and chunk:
            chunk = conn.origin(chunk)
        pipeline = self._pipeline
        pipeline.feed(chunk, None, oversize)
        pipeline.flush_soon()

    def _close(self, conn: _Connection, reason: str) -> None:
        if self._conns.pop(conn.fd, None) is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(conn.fd)
        if conn.framer.discard():
            # An unfinished line cut off by the connection ending abnormally.
            self._pipeline.drop_partial()
        conn.sock.close()
        self._c[self.stat_open] = len(self._conns)
        self._log.debug("%s %s: %s", self.transport, conn.peer, reason)

    def sweep_idle(self, now: float) -> int:
        """Close connections idle longer than the timeout; returns how many."""
        self.clock = now
        if not self._idle_timeout:
            return 0
        limit = now - self._idle_timeout
        idle = [c for c in self._conns.values() if c.last_active < limit]
        for conn in idle:
            self._c[self.stat_idle_closed] += 1
            self._close(conn, f"idle for {self._idle_timeout:g}s")
        return len(idle)

    def stop_accepting(self, deadline: float) -> None:
        """Accept every client waiting in the backlog, then close the listening socket.

        Closing a listening socket resets the connections still in its accept
        queue (the kernel does not hand them to the other workers' sockets), and
        those clients may already have sent lines: so the backlog is emptied
        first, ignoring max_connections (each is read and closed at once), until
        ``deadline`` (time.monotonic).
        """
        if self._accepting and self._loop is not None:
            self._accepting = False
            for sock in self._socks:
                self._loop.remove_reader(sock.fileno())
                while (
                    self._accept(sock, MAX_ACCEPTS_PER_WAKEUP, SHUTDOWN_MAX_CONNECTIONS)
                    and time.monotonic() < deadline
                ):
                    pass
                sock.close()

    def drain_and_close(self, deadline: float) -> None:
        """Read what every client already sent, then close them all."""
        for conn in list(self._conns.values()):
            for _ in range(MAX_DRAIN_READS):
                if time.monotonic() >= deadline:
                    break
                try:
                    data = conn.sock.recv(TCP_RECV_SIZE)
                except BlockingIOError:
                    break
                except OSError:
                    break
                if not data:
                    tail = conn.framer.close()
                    if tail:
                        self._feed(conn, tail, 0)
                    break
                self._read(conn, data)
                if conn.framer.error is not None:
                    self._refuse(conn)
                    break
            self._close(conn, "shutting down")
