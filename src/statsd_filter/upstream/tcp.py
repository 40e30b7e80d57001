"""TCP upstream: one persistent connection per worker, reconnecting forever.

Lines go straight into the socket while it accepts them; what the kernel does
not take waits in a bounded buffer of whole chunks (each ends with ``\\n``).
When the buffer would exceed ``buffer_bytes`` the oldest chunks are dropped and
their lines counted as ``queue_full``; newest data is the most useful to a
metrics system. While the upstream is away the same buffer fills, and it is
flushed in order once a reconnect (capped exponential backoff with jitter)
succeeds.

A line counts as forwarded the moment its last byte (its newline) is handed
to the kernel, even in the middle of a chunk, so the count is exact whenever
the process stops. If the connection breaks in the middle of a chunk, the rest
of it is sent again on the next connection, starting at the first line not
wholly written: a line is never cut across connections and never sent twice
whole by us. (Bytes the kernel had accepted for a connection the upstream then
reset are beyond our reach; that is TCP. An upstream that closes cleanly gets
them all.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque

from statsd_filter.stats import Stat
from statsd_filter.upstream.backoff import Backoff
from statsd_filter.upstream.base import SocketUpstream, SocketWatch, resolve

__all__ = ["TcpUpstream"]

CONNECT_TIMEOUT = 5.0  # seconds; a blackholed upstream must not stall reconnects


# Attempts at a local port other than the upstream's before giving up on one.
PORT_PICKS = 8


def _client_socket(family: socket.AddressFamily, peer_port: int) -> socket.socket:
    """A non-blocking TCP socket, bound to a local port that is not ``peer_port``.

    When nothing listens on a local upstream port in the ephemeral range and the
    kernel picked that very port for our end, TCP's simultaneous open would
    connect the socket to itself: an "upstream" that swallows every line, and
    holds the port the real server wants to bind. Binding first (the kernel
    picks the port) and checking rules that out.
    """
    for _ in range(PORT_PICKS):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        except OSError:
            sock.close()
            raise
        if sock.getsockname()[1] != peer_port:
            return sock
        sock.close()
    raise OSError(f"no local port other than {peer_port} available")


class TcpUpstream(SocketUpstream):
    """Streams batched lines over one TCP connection."""

    def __init__(
        self,
        host: str,
        port: int,
        counters: memoryview,
        buffer_bytes: int,
        log: logging.Logger,
    ) -> None:
        super().__init__(host, port, counters, buffer_bytes, log)
        # Whole chunks (bytes ending in b"\n", lines not yet counted) not yet
        # fully written; the first may be partly written: _offset bytes of it
        # are in the kernel, and the lines up to _counted are counted.
        self._buffer: deque[tuple[bytes, int]] = deque()
        self._buffered = 0
        self._offset = 0
        self._counted = 0
        self._wake = asyncio.Event()
        self._closing = False

    def healthy_since(self, since: float) -> bool:  # noqa: ARG002 - same interface as UDP
        """Healthy while connected."""
        return self._sock is not None

    def probe(self, *, force: bool = False) -> None:
        """Nothing to do: the reconnect loop probes by connecting."""

    # ------------------------------------------------------------ connecting
    @property
    def label(self) -> str:
        """How logs name this upstream."""
        return f"tcp {self._host}:{self._port}"

    async def _open(self) -> socket.socket:
        """A connected, non-blocking socket to the upstream (OSError if it cannot be had)."""
        assert self._loop is not None
        family, address = await resolve(self._host, self._port, socket.SOCK_STREAM)
        sock = _client_socket(family, address[1])
        try:
            await asyncio.wait_for(self._loop.sock_connect(sock, address), CONNECT_TIMEOUT)
        except BaseException:
            # Failed, or stopped (drain) mid-connect: the half-open socket goes too.
            sock.close()
            raise
        return sock

    async def _connect_forever(self) -> None:
        assert self._loop is not None
        backoff = Backoff()
        logged_down = False
        while not self._closing:
            try:
                sock = await self._open()
            except (OSError, TimeoutError) as exc:
                self._c[Stat.UPSTREAM_ERRORS] += 1
                delay = backoff.next_delay()
                if not logged_down:
                    self._log.warning(
                        "upstream %s unavailable (%s); retrying with backoff",
                        self.label,
                        exc or type(exc).__name__,
                    )
                    logged_down = True
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            logged_down = False
            self._attach(sock)
            self._log.info("upstream %s connected", self.label)
            self._wake.clear()
            await self._wake.wait()  # set when the connection is lost

    def _attach(self, sock: socket.socket) -> None:
        assert self._loop is not None
        self._sock = sock
        self._c[Stat.UPSTREAM_CONNECTED] = 1
        self._c[Stat.UPSTREAM_RECONNECTS] += 1
        # Reading tells us when the upstream closes; StatsD never answers.
        self._watch = SocketWatch(self._loop, sock, self._on_readable, self._on_writable)
        if self._buffer:
            self._want_write(True)

    def _detach(self, reason: str) -> None:
        if self._sock is None:
            return
        self._close_socket()
        self._c[Stat.UPSTREAM_CONNECTED] = 0
        self._c[Stat.UPSTREAM_ERRORS] += 1
        if self._offset and self._buffer:
            # Send the half-written chunk again from its first line not wholly written.
            chunk, lines = self._buffer[0]
            self._buffer[0] = (chunk[self._counted :], lines)
            self._buffered -= self._counted
            self._offset = self._counted = 0
        self._log.warning("upstream %s lost: %s", self.label, reason)
        self._wake.set()

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self._detach(str(exc))
            return
        if not data:
            self._detach("closed by upstream")

    # ------------------------------------------------------------ sending
    def send_batch(self, payloads: list[bytes], lines: list[int]) -> None:
        """A stream has no datagrams: one write for the whole batch."""
        self.send(b"\n".join(payloads), sum(lines))

    def send(self, payload: bytes, lines: int) -> None:
        chunk = payload + b"\n"
        sock = self._sock
        if sock is not None and not self._buffer:
            try:
                sent = sock.send(chunk)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self._detach(str(exc))
                sent = 0
            if sent == len(chunk):
                self._count_sent(chunk, lines)
                return
            self._buffer.append((chunk, lines))
            self._buffered += len(chunk)
            if sent:
                self._wrote(sent)
            self._want_write(True)
        else:
            self._buffer.append((chunk, lines))
            self._buffered += len(chunk)
        self._trim()

    def _count_sent(self, chunk: bytes, lines: int) -> None:
        c = self._c
        c[Stat.LINES_FORWARDED] += lines
        c[Stat.DATAGRAMS_OUT] += 1
        c[Stat.BYTES_OUT] += len(chunk)

    def _wrote(self, sent: int) -> bool:
        """``sent`` more bytes of the first chunk went out; True once it is all out."""
        chunk, lines = self._buffer[0]
        start = self._offset
        self._offset += sent
        done = chunk.rfind(b"\n", start, self._offset) + 1  # after the last whole line
        if done > self._counted:
            whole = chunk.count(b"\n", self._counted, done)
            self._c[Stat.LINES_FORWARDED] += whole
            lines -= whole
            self._counted = done
            self._buffer[0] = (chunk, lines)
        if self._offset < len(chunk):
            return False
        self._buffer.popleft()
        self._buffered -= len(chunk)
        self._offset = self._counted = 0
        self._count_sent(chunk, lines)  # lines is 0 here: a chunk ends with a newline
        return True

    def _trim(self) -> None:
        # Drop the oldest whole chunks beyond the bound; never the one in flight.
        keep_head = 1 if self._offset else 0
        while self._buffered > self._limit and len(self._buffer) > keep_head + 1:
            chunk, lines = self._buffer[keep_head]
            del self._buffer[keep_head]
            self._buffered -= len(chunk)
            self._c[Stat.DROPPED_QUEUE_FULL] += lines
        self._c[Stat.UPSTREAM_BUFFERED_BYTES] = self._buffered

    def _on_writable(self) -> None:
        sock = self._sock
        if sock is None or self._loop is None:
            return
        while self._buffer:
            chunk = self._buffer[0][0]
            try:
                sent = sock.send(memoryview(chunk)[self._offset :])
            except BlockingIOError:
                return
            except OSError as exc:
                self._detach(str(exc))
                return
            if not self._wrote(sent):
                return
        self._want_write(False)
        self._c[Stat.UPSTREAM_BUFFERED_BYTES] = 0

    async def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._buffer and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._closing = True
        lost = sum(lines for _, lines in self._buffer)
        if lost:
            self._c[Stat.DROPPED_UPSTREAM] += lost
            self._log.warning("shutdown: %d lines for the upstream could not be delivered", lost)
        self._buffer.clear()
        self._buffered = 0
        if self._task is not None:
            self._task.cancel()
        sock = self._sock
        if sock is not None:
            if self._watch is not None:
                self._watch.close()
                self._watch = None
            # Let the kernel finish sending what it holds before the FIN.
            with contextlib.suppress(OSError):
                sock.setblocking(True)
                sock.shutdown(socket.SHUT_WR)
            self._close_socket()
