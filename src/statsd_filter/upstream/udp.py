"""UDP upstream: one connected, non-blocking socket per worker, told of every refusal.

A connected UDP socket lets the kernel report an upstream that is not
listening. With ``IP_RECVERR`` (``IPV6_RECVERR``) set, every ICMP
port-unreachable that comes back is queued on the socket's error queue
(``MSG_ERRQUEUE``) together with the first bytes of the datagram it refuses
(520 on IPv4, more on IPv6). So a datagram's lines are not counted as
forwarded when it is sent, but ``CONFIRM_DELAY`` later, if no refusal quoting
it came back meanwhile; a refused datagram is found in the ring of recent
sends by those first bytes and handed to ``on_refused`` (which re-routes its
lines to another upstream, or counts them as dropped, reason ``refused``).

What cannot be known: a host that is down (or a firewall that drops) sends no
ICMP, and a remote host's kernel rate-limits the ICMP it sends (by default
about one per second per sender; loopback is exempt), so only some refusals
of a busy stream are reported; the first one takes the upstream out of the
hash ring (``factory.py``), which bounds the loss. StatsD's admin port
(``admin_port``) is the way to check a remote host itself.

The refusal also shows as ``ECONNREFUSED`` on the next ``send``, which then
did not transmit; it is retried. While the upstream name is not resolved yet,
or the socket buffer is full (``EAGAIN``), datagrams wait in a bounded queue
drained when the socket becomes usable; past the bound the oldest are dropped
and counted as ``queue_full``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Callable

from statsd_filter.fastio import send_many
from statsd_filter.stats import Stat, heartbeat_ms
from statsd_filter.upstream.backoff import Backoff
from statsd_filter.upstream.base import PayloadQueue, SocketUpstream, SocketWatch, resolve

__all__ = ["CONFIRM_DELAY", "RefusalHandler", "UdpUpstream"]

# How long a starting worker waits for the first resolution of the upstream.
FIRST_RESOLVE_WAIT = 2.0
# How long a sent datagram waits for a refusal before its lines count as
# forwarded. An ICMP answer takes one round trip: microseconds on loopback, well
# under a millisecond in a data centre; 50 ms leaves room for a slow path, and
# is how long a line's forwarded count lags behind its sending (at most three times that).
CONFIRM_DELAY = 0.05
# Linux values, for Pythons whose socket module does not name them.
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
# Larger than any quote of a refused datagram (IPv6 quotes up to ~1,200 bytes).
ERRQUEUE_READ = 2048
ERRQUEUE_ANCILLARY = 512
# Error-queue entries read per wake-up (a refused flood must not starve the loop).
MAX_ERRORS_PER_WAKEUP = 4096

# on_refused(payload, lines): a datagram the upstream refused (payload and line
# count), or (None, 0) for a refusal that quotes nothing we still hold.
RefusalHandler = Callable[[bytes | None, int], None]


class _Sent:
    """Datagrams sent by one system call, awaiting confirmation."""

    __slots__ = ("at", "lines", "payloads")

    def __init__(self, payloads: list[bytes], lines: list[int], at: float) -> None:
        self.payloads = payloads
        self.lines = lines
        self.at = at


class UdpUpstream(SocketUpstream):
    """Sends each batched payload as one datagram."""

    def __init__(
        self,
        host: str,
        port: int,
        counters: memoryview,
        buffer_bytes: int,
        log: logging.Logger,
        on_refused: RefusalHandler | None = None,
    ) -> None:
        super().__init__(host, port, counters, buffer_bytes, log)
        self._queue = PayloadQueue(counters, buffer_bytes)
        self._refused_at = 0.0
        self._connected = asyncio.Event()
        self._sent_at_probe = -1
        self._in_flight: deque[_Sent] = deque()
        self._confirm_timer: asyncio.TimerHandle | None = None
        self._errqueue = False  # IP_RECVERR is on: refusals name their datagram
        self._on_refused = on_refused

    async def start(self) -> None:
        await super().start()
        # Give the first resolution a moment, so a worker reports ready with a
        # usable socket; a slow or failing resolver just continues in the background.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._connected.wait()), FIRST_RESOLVE_WAIT)

    async def _connect_forever(self) -> None:
        backoff = Backoff(cap=5.0)
        failures = 0
        while True:
            try:
                family, address = await resolve(self._host, self._port, socket.SOCK_DGRAM)
                sock = socket.socket(family, socket.SOCK_DGRAM)
                sock.setblocking(False)
                sock.connect(address)
            except OSError as exc:
                self._c[Stat.UPSTREAM_ERRORS] += 1
                if not failures:  # once, not on every retry
                    self._log.warning(
                        "upstream udp %s:%s unusable (%s); retrying with backoff",
                        self._host,
                        self._port,
                        exc,
                    )
                failures += 1
                await asyncio.sleep(backoff.next_delay())
                continue
            level, option = (
                (socket.IPPROTO_IPV6, IPV6_RECVERR)
                if family == socket.AF_INET6
                else (socket.IPPROTO_IP, IP_RECVERR)
            )
            try:
                sock.setsockopt(level, option, 1)
                self._errqueue = True
            except OSError:  # pragma: no cover - not Linux: refusals stay anonymous
                self._errqueue = False
            self._sock = sock
            assert self._loop is not None
            # StatsD never answers; watching only surfaces ICMP refusals at once.
            self._watch = SocketWatch(self._loop, sock, self._on_readable, self._on_writable)
            self._c[Stat.UPSTREAM_CONNECTED] = 1
            self._log.info(
                "upstream udp %s:%s -> %s%s",
                self._host,
                self._port,
                address[0],
                f" (after {failures} failed attempts)" if failures else "",
            )
            self._connected.set()
            if self._queue:
                self._want_write(True)
            return

    # ------------------------------------------------------------ refusals
    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        if not self._errqueue:  # pragma: no cover - not Linux
            try:
                sock.recv(65536)
            except ConnectionRefusedError:
                self._refused(None)
            except OSError:
                pass
            return
        self._read_errors()
        with contextlib.suppress(OSError):
            sock.recv(65536)  # StatsD never answers; clear anything stray

    def _read_errors(self) -> None:
        """Take every refusal waiting on the socket's error queue."""
        sock = self._sock
        if sock is None or not self._errqueue:
            return
        for _ in range(MAX_ERRORS_PER_WAKEUP):
            try:
                quote, _, _, _ = sock.recvmsg(
                    ERRQUEUE_READ, ERRQUEUE_ANCILLARY, socket.MSG_ERRQUEUE
                )
            except BlockingIOError:
                break
            except OSError:
                # The pending error itself (ECONNREFUSED) surfaced instead: its
                # details are the next entry of the queue.
                continue
            self._refused(quote)

    def _refused(self, quote: bytes | None) -> None:
        """The upstream refused a datagram beginning with ``quote`` (None: unknown)."""
        c = self._c
        c[Stat.UPSTREAM_ERRORS] += 1
        self._refused_at = time.monotonic()
        c[Stat.UPSTREAM_REFUSED_MS] = heartbeat_ms()
        found = self._take_in_flight(quote) if quote else None
        handler = self._on_refused
        if found is None:
            if handler is not None:
                handler(None, 0)
            return
        payload, lines = found
        if handler is None:
            c[Stat.DROPPED_REFUSED] += lines
        else:
            handler(payload, lines)

    def _take_in_flight(self, quote: bytes) -> tuple[bytes, int] | None:
        """Remove the oldest unconfirmed datagram that begins with ``quote``."""
        for sent in self._in_flight:
            payloads = sent.payloads
            for j, payload in enumerate(payloads):
                if payload and payload.startswith(quote):
                    lines = sent.lines[j]
                    payloads[j] = b""  # taken; its lines will not be confirmed
                    sent.lines[j] = 0
                    return payload, lines
        return None

    def healthy_since(self, since: float) -> bool:
        """No refusal since ``since`` (time.monotonic) and the address is resolved."""
        return self._sock is not None and self._refused_at < since

    def probe(self, *, force: bool = False) -> None:
        """Send a zero-length datagram, unless data went out since the last probe.

        Any datagram to a closed port is answered with a refusal, so traffic is
        its own probe; an idle upstream (or one out of the hash ring) gets this.
        """
        sent = self._c[Stat.DATAGRAMS_OUT]
        if sent != self._sent_at_probe and not force:
            self._sent_at_probe = sent
            return
        self._sent_at_probe = sent
        if self._sock is not None:
            with contextlib.suppress(OSError):  # a refusal shows on the error queue
                self._sock.send(b"")

    # ------------------------------------------------------------ confirming
    def _confirm(self, now: float) -> None:
        """Count as forwarded the lines of datagrams no refusal came back for."""
        flight = self._in_flight
        due = now - CONFIRM_DELAY
        confirmed = 0
        while flight and flight[0].at <= due:
            confirmed += sum(flight.popleft().lines)
        if confirmed:
            self._c[Stat.LINES_FORWARDED] += confirmed

    def _on_confirm_timer(self) -> None:
        self._confirm_timer = None
        # Refusals already waiting are read first: a loop held up for longer
        # than CONFIRM_DELAY must not count a refused datagram as forwarded.
        self._read_errors()
        self._confirm(time.monotonic())
        self._arm_confirm_timer()

    def _arm_confirm_timer(self) -> None:
        # Steady traffic confirms on each send (see send_batch); this timer only
        # catches the tail when sending stops, so it runs rarely: a line counts as
        # forwarded between CONFIRM_DELAY and three times that after it left.
        if self._in_flight and self._confirm_timer is None and self._loop is not None:
            self._confirm_timer = self._loop.call_later(2 * CONFIRM_DELAY, self._on_confirm_timer)

    def _sent(self, payloads: list[bytes], lines: list[int]) -> None:
        c = self._c
        c[Stat.DATAGRAMS_OUT] += len(payloads)
        c[Stat.BYTES_OUT] += sum(map(len, payloads))
        self._in_flight.append(_Sent(payloads, lines, time.monotonic()))
        self._arm_confirm_timer()

    # ------------------------------------------------------------ sending
    def send_batch(self, payloads: list[bytes], lines: list[int]) -> None:
        """Send datagrams, many per system call (sendmmsg) when the socket takes them."""
        sock = self._sock
        flight = self._in_flight
        if flight and flight[0].at <= time.monotonic() - CONFIRM_DELAY:
            # Refusals already waiting are read first (the loop may have been
            # held up): a refused datagram must never be confirmed.
            self._read_errors()
            self._confirm(time.monotonic())
        total = len(payloads)
        if sock is None or self._queue:
            # Not resolved yet, or earlier datagrams still wait: keep the order.
            for payload, count in zip(payloads, lines, strict=True):
                self._enqueue(payload, count)
            return
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
            if sent == total and not i:
                self._sent(payloads, lines)
            else:
                self._sent(batch[:sent], lines[i : i + sent])
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
                # A refusal of an earlier datagram (its details are on the error
                # queue); this one was not sent. Once more, then give up on it.
                if attempt:
                    c[Stat.DROPPED_REFUSED] += lines
                continue
            except OSError as exc:
                c[Stat.UPSTREAM_ERRORS] += 1
                c[Stat.DROPPED_UPSTREAM] += lines
                self._log.warning("upstream udp send failed: %s", exc)
                return True
            self._sent([payload], [lines])
            return True
        return True

    def _enqueue(self, payload: bytes, lines: int, *, front: bool = False) -> None:
        if not self._queue:
            self._want_write(True)
        self._queue.push(payload, lines, front=front)

    def _on_writable(self) -> None:
        sock = self._sock
        assert sock is not None
        while self._queue:
            payload, lines = self._queue.pop()
            if not self._send_now(sock, payload, lines):
                return  # re-queued at the front; wait for the next writable event
        self._want_write(False)

    async def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._queue and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._c[Stat.DROPPED_UPSTREAM] += self._queue.clear()
        # Let the last refusals come back, then count the rest as forwarded.
        if self._in_flight:
            await asyncio.sleep(max(0.0, min(CONFIRM_DELAY, deadline - time.monotonic())))
            self._on_readable()
            self._confirm(float("inf"))
        if self._confirm_timer is not None:
            self._confirm_timer.cancel()
            self._confirm_timer = None
        if self._task is not None:
            self._task.cancel()
        self._close_socket()
