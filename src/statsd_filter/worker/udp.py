"""UDP and TCP listeners: read sockets, hand chunks to the worker's pipeline.

Both listeners drive non-blocking sockets straight from event-loop readiness
callbacks (``loop.add_reader``) instead of asyncio protocols and transports:
measured here, draining a UDP socket in a loop from one callback is several
times cheaper than a ``DatagramProtocol`` (a Python call and an object per
datagram), and owning the TCP sockets lets shutdown read exactly what each
client already sent before closing it.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
from collections.abc import Callable

from statsd_filter.fastio import recv_many
from statsd_filter.protocol.lines import LineFramer
from statsd_filter.rules.filter import LineFilter
from statsd_filter.stats import Counter
from statsd_filter.upstream.router import Router

__all__ = ["TcpListener", "UdpListener"]

# Datagrams read per wake-up before filtering and flushing them (it also bounds
# how long TCP clients wait for their turn). The first line of a wake-up waits
# for the whole batch, so smaller means lower latency near saturation, but every
# wake-up has fixed costs (a filter call, one sendmmsg per upstream): measured at
# 718k lines/s offered, 128 cut the added p99 from 8.5 to 5.8 ms, yet cost 15-20%
# of the throughput with 120 extra rules or 3 upstreams (BENCHMARKS.md). A metrics
# pipeline that aggregates for seconds wants the throughput.
MAX_DATAGRAMS_PER_WAKEUP = 512
# Datagrams per recvmmsg call (the C accelerator's maximum).
RECV_BATCH = 64
# One TCP read; big enough that a busy client needs few syscalls.
TCP_RECV_SIZE = 65536
# Connections accepted per wake-up, so an accept storm cannot starve readers.
MAX_ACCEPTS_PER_WAKEUP = 64
# Reads per connection while draining at shutdown (bounds a client that never stops).
MAX_DRAIN_READS = 64

LineLogger = Callable[[bytes, bytes], None]


class UdpListener:
    """Drains a (possibly shared) UDP socket on every readiness callback."""

    def __init__(
        self,
        sock: socket.socket,
        line_filter: LineFilter,
        batcher: Router,
        counters: memoryview,
        log: logging.Logger,
        log_lines: LineLogger | None,
    ) -> None:
        self._sock = sock
        self._filter = line_filter
        self._batcher = batcher
        self._c = counters
        self._log = log
        self._log_lines = log_lines
        self._loop: asyncio.AbstractEventLoop | None = None
        self._epoll: select.epoll | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # All workers share this socket. Waiting on it directly, every datagram
        # would wake every worker (at 20k lines/s, 70% of wake-ups found nothing).
        # A private epoll holding the socket with EPOLLEXCLUSIVE, itself watched
        # by the event loop, makes the kernel wake one waiting worker at a time;
        # under load every worker is busy and gets its share anyway.
        try:
            self._epoll = select.epoll()
            self._epoll.register(self._sock.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
        except (AttributeError, OSError):  # pragma: no cover - not Linux >= 4.5
            self._epoll = None
            self._loop.add_reader(self._sock.fileno(), self._on_readable)
        else:
            self._loop.add_reader(self._epoll.fileno(), self._on_exclusive)

    def _on_exclusive(self) -> None:
        assert self._epoll is not None
        self._epoll.poll(0)  # consume the notification; the drain below does the work
        self._on_readable()

    def set_filter(self, line_filter: LineFilter) -> None:
        self._filter = line_filter

    def set_line_logger(self, log_lines: LineLogger | None) -> None:
        """Start or stop logging every line (the log level changed on reload)."""
        self._log_lines = log_lines

    def stop(self) -> None:
        """Stop listening after reading what is already queued in the socket."""
        if self._loop is not None:
            if self._epoll is not None:
                self._loop.remove_reader(self._epoll.fileno())
                self._epoll.close()
            else:
                self._loop.remove_reader(self._sock.fileno())
        self._on_readable()

    def _on_readable(self) -> None:
        # The hot path. The only per-datagram Python work is the recv call and
        # a list append: the datagrams read in this wake-up are joined with
        # newlines and filtered as one chunk (a datagram holds whole lines, so
        # joining never glues two lines together), then packed and flushed.
        sock = self._sock
        datagrams: list[bytes] = []
        errors = 0
        while len(datagrams) < MAX_DATAGRAMS_PER_WAKEUP:
            try:
                got = recv_many(sock, RECV_BATCH)  # one recvmmsg: up to 64 datagrams
            except OSError as exc:
                errors += 1
                self._log.warning("udp receive error: %s", exc)
                break
            if not got:
                break
            datagrams += got
            if len(got) < RECV_BATCH:
                break  # the socket is empty
        c = self._c
        if errors:
            c[Counter.RECEIVE_ERRORS] += errors
        if not datagrams:
            return
        chunk = b"\n".join(datagrams) if len(datagrams) > 1 else datagrams[0]
        longest = max(map(len, datagrams))  # no line is longer than its datagram
        kept, received, forwarded, blocked, oversize = self._filter.filter(chunk, longest)
        if forwarded:
            self._batcher.add(kept, forwarded)
        self._batcher.flush()
        if self._log_lines is not None:
            self._log_lines(chunk, kept)
        c[Counter.DATAGRAMS_IN] += len(datagrams)
        c[Counter.BYTES_IN] += sum(map(len, datagrams))
        c[Counter.LINES_RECEIVED] += received
        if blocked:
            c[Counter.LINES_BLOCKED] += blocked
        if oversize:
            c[Counter.DROPPED_OVERSIZE] += oversize


class _Connection:
    __slots__ = ("fd", "framer", "last_active", "peer", "sock")

    def __init__(self, sock: socket.socket, peer: str, max_line: int, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.framer = LineFramer(max_line)
        self.last_active = now


class TcpListener:
    """Accepts TCP clients on a (possibly shared) listening socket and reads them."""

    def __init__(
        self,
        sock: socket.socket,
        process: Callable[[bytes, int], None],
        counters: memoryview,
        log: logging.Logger,
        *,
        max_line_bytes: int,
        max_connections: int,
        idle_timeout: float,
    ) -> None:
        self._sock = sock
        self._process = process  # process(chunk, oversize_already_counted)
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
        self._loop.add_reader(self._sock.fileno(), self._on_acceptable)
        self._accepting = True

    def _on_acceptable(self) -> None:
        assert self._loop is not None
        for _ in range(MAX_ACCEPTS_PER_WAKEUP):
            try:
                conn_sock, addr = self._sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                # EMFILE/ENFILE: out of descriptors. Log and let the loop retry later.
                self._c[Counter.TCP_CONNECTIONS_REJECTED] += 1
                self._log.warning("tcp accept failed: %s", exc)
                return
            if len(self._conns) >= self._max_connections:
                self._c[Counter.TCP_CONNECTIONS_REJECTED] += 1
                self._log.warning(
                    "tcp connection from %s rejected: max_connections=%d reached",
                    addr,
                    self._max_connections,
                )
                conn_sock.close()
                continue
            conn_sock.setblocking(False)
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
            conn = _Connection(conn_sock, peer, self._max_line, self.clock)
            self._conns[conn.fd] = conn
            self._loop.add_reader(conn.fd, self._on_readable, conn)
            self._c[Counter.TCP_CONNECTIONS_ACCEPTED] += 1
            self._c[Counter.TCP_CONNECTIONS_OPEN] = len(self._conns)

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
                self._process(tail, 0)
            self._close(conn, "closed by client")
            return
        self._c[Counter.BYTES_IN] += len(data)
        conn.last_active = self.clock
        chunk, oversize = conn.framer.feed(data)
        if chunk or oversize:
            self._process(chunk, oversize)

    def _close(self, conn: _Connection, reason: str) -> None:
        if self._conns.pop(conn.fd, None) is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(conn.fd)
        if conn.framer.discard():
            # An unfinished line cut off by the connection ending abnormally.
            self._c[Counter.LINES_RECEIVED] += 1
            self._c[Counter.DROPPED_PARTIAL] += 1
        conn.sock.close()
        self._c[Counter.TCP_CONNECTIONS_OPEN] = len(self._conns)
        self._log.debug("tcp %s: %s", conn.peer, reason)

    def sweep_idle(self, now: float) -> int:
        """Close connections idle longer than the timeout; returns how many."""
        self.clock = now
        if not self._idle_timeout:
            return 0
        limit = now - self._idle_timeout
        idle = [c for c in self._conns.values() if c.last_active < limit]
        for conn in idle:
            self._c[Counter.TCP_IDLE_CLOSED] += 1
            self._close(conn, f"idle for {self._idle_timeout:g}s")
        return len(idle)

    def stop_accepting(self) -> None:
        if self._accepting and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._accepting = False
            # This worker's own listening socket: closing it stops new clients
            # reaching this worker (the kernel hashes them to the others).
            self._sock.close()

    def drain_and_close(self) -> None:
        """Read what every client already sent, then close them all."""
        for conn in list(self._conns.values()):
            for _ in range(MAX_DRAIN_READS):
                try:
                    data = conn.sock.recv(TCP_RECV_SIZE)
                except BlockingIOError:
                    break
                except OSError:
                    break
                if not data:
                    tail = conn.framer.close()
                    if tail:
                        self._process(tail, 0)
                    break
                chunk, oversize = conn.framer.feed(data)
                if chunk or oversize:
                    self._process(chunk, oversize)
            self._close(conn, "shutting down")
