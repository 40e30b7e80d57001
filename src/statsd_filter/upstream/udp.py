"""UDP upstream: one connected, non-blocking socket per worker.

A connected UDP socket lets the kernel report an upstream that is not
listening: the ICMP port-unreachable it gets back surfaces as
``ECONNREFUSED`` on a later ``send``. That ``send`` did not transmit, so it is
retried once; refusals are counted and time-stamped in the shared counters,
from which /healthz shows the upstream as ``refused`` for 5 s after the last
one. While the upstream name is not resolved yet, or the socket
buffer is full (``EAGAIN``), datagrams wait in a bounded queue that is drained
when the socket becomes usable; past the bound the oldest are dropped and
counted as ``queue_full``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque

from statsd_filter.fastio import send_many
from statsd_filter.stats import Stat, heartbeat_ms
from statsd_filter.upstream.backoff import Backoff
from statsd_filter.upstream.base import SocketUpstream, resolve

__all__ = ["UdpUpstream"]

# How long a starting worker waits for the first resolution of the upstream.
FIRST_RESOLVE_WAIT = 2.0


class UdpUpstream(SocketUpstream):
    """Sends each batched payload as one datagram."""

    def __init__(
        self,
        host: str,
        port: int,
        counters: memoryview,
        buffer_bytes: int,
        log: logging.Logger,
    ) -> None:
        super().__init__(host, port, counters, buffer_bytes, log)
        self._queue: deque[tuple[bytes, int]] = deque()
        self._queued_bytes = 0
        self._refused_at = 0.0
        self._connected = asyncio.Event()
        self._sent_at_probe = -1

    async def start(self) -> None:
        await super().start()
        # Give the first resolution a moment, so a worker reports ready with a
        # usable socket; a slow or failing resolver just continues in the background.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._connected.wait()), FIRST_RESOLVE_WAIT)

    async def _connect_forever(self) -> None:
        backoff = Backoff(cap=5.0)
        while True:
            try:
                family, address = await resolve(self._host, self._port, socket.SOCK_DGRAM)
                sock = socket.socket(family, socket.SOCK_DGRAM)
                sock.setblocking(False)
                sock.connect(address)
            except OSError as exc:
                self._c[Stat.UPSTREAM_ERRORS] += 1
                delay = backoff.next_delay()
                self._log.warning(
                    "upstream udp %s:%s unusable (%s); retrying in %.2fs",
                    self._host,
                    self._port,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            self._sock = sock
            assert self._loop is not None
            # StatsD never answers; reading only surfaces ICMP refusals at once.
            self._loop.add_reader(sock.fileno(), self._on_readable)
            self._c[Stat.UPSTREAM_CONNECTED] = 1
            self._log.info("upstream udp %s:%s -> %s", self._host, self._port, address[0])
            self._connected.set()
            if self._queue:
                self._loop_add_writer()
            return

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            sock.recv(65536)
        except ConnectionRefusedError:
            self._refused()
        except OSError:
            pass

    def _refused(self) -> None:
        c = self._c
        c[Stat.UPSTREAM_ERRORS] += 1
        now = time.monotonic()
        if not self._refused_at or now - self._refused_at > 1:
            self._log.warning("upstream udp %s:%s refused", self._host, self._port)
        self._refused_at = now
        c[Stat.UPSTREAM_REFUSED_MS] = heartbeat_ms()

    def healthy_since(self, since: float) -> bool:
        """No refusal since ``since`` (time.monotonic) and the address is resolved."""
        return self._sock is not None and self._refused_at < since

    def probe(self) -> None:
        """Send a zero-length datagram, unless data went out since the last probe.

        Any datagram to a closed port is answered with a refusal, so traffic is
        its own probe; an idle upstream (or one out of the hash ring) gets this.
        """
        sent = self._c[Stat.DATAGRAMS_OUT]
        if sent != self._sent_at_probe:
            self._sent_at_probe = sent
            return
        if self._sock is not None:
            try:
                self._sock.send(b"")
            except ConnectionRefusedError:
                self._refused()
            except OSError:
                pass

    def send_batch(self, payloads: list[bytes], lines: list[int]) -> None:
        """Send datagrams, many per system call (sendmmsg) when the socket takes them."""
        sock = self._sock
        total = len(payloads)
        if sock is None or self._queue:
            # Not resolved yet, or earlier datagrams still wait: keep the order.
            for payload, count in zip(payloads, lines, strict=True):
                self._enqueue(payload, count)
            return
        c = self._c
        i = 0
        while i < total:
            batch = payloads[i:] if i else payloads
            try:
                sent = send_many(sock, batch)
            except OSError:
                # The first one failed: the one-at-a-time path knows every error.
                if not self._send_now(sock, payloads[i], lines[i]):
                    for j in range(i + 1, total):  # it waits for writability; so do these
                        self._enqueue(payloads[j], lines[j])
                    return
                i += 1
                continue
            c[Stat.LINES_FORWARDED] += sum(lines[i : i + sent])
            c[Stat.DATAGRAMS_OUT] += sent
            c[Stat.BYTES_OUT] += sum(map(len, batch[:sent]))
            i += sent

    def _send_now(self, sock: socket.socket, payload: bytes, lines: int) -> bool:
        """Try to send; False if it must wait for writability (payload queued)."""
        c = self._c
        for attempt in (0, 1):
            try:
                sock.send(payload)
            except BlockingIOError:
                self._enqueue(payload, lines, front=True)
                return False
            except ConnectionRefusedError:
                # The refusal belongs to an earlier datagram; this one was not sent.
                self._refused()
                if attempt:
                    c[Stat.DROPPED_UPSTREAM] += lines
                continue
            except OSError as exc:
                c[Stat.UPSTREAM_ERRORS] += 1
                c[Stat.DROPPED_UPSTREAM] += lines
                self._log.warning("upstream udp send failed: %s", exc)
                return True
            c[Stat.LINES_FORWARDED] += lines
            c[Stat.DATAGRAMS_OUT] += 1
            c[Stat.BYTES_OUT] += len(payload)
            return True
        return True

    def _loop_add_writer(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.add_writer(self._sock.fileno(), self._on_writable)

    def _enqueue(self, payload: bytes, lines: int, *, front: bool = False) -> None:
        if not self._queue:
            self._loop_add_writer()
        if front:
            self._queue.appendleft((payload, lines))
        else:
            self._queue.append((payload, lines))
        self._queued_bytes += len(payload)
        while self._queued_bytes > self._limit and len(self._queue) > 1:
            old, old_lines = self._queue.popleft()
            self._queued_bytes -= len(old)
            self._c[Stat.DROPPED_QUEUE_FULL] += old_lines
        self._c[Stat.UPSTREAM_BUFFERED_BYTES] = self._queued_bytes

    def _on_writable(self) -> None:
        sock = self._sock
        assert sock is not None
        while self._queue:
            payload, lines = self._queue.popleft()
            self._queued_bytes -= len(payload)
            if not self._send_now(sock, payload, lines):
                return  # re-queued at the front; wait for the next writable event
        if self._loop is not None:
            self._loop.remove_writer(sock.fileno())
        self._c[Stat.UPSTREAM_BUFFERED_BYTES] = 0

    async def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._queue and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for _, lines in self._queue:
            self._c[Stat.DROPPED_UPSTREAM] += lines
        self._queue.clear()
        if self._task is not None:
            self._task.cancel()
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_writer(self._sock.fileno())
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
