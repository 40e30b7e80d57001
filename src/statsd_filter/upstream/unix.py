"""Unix socket upstreams: ``unix:///path`` (datagrams) and ``unix+stream:///path``.

The Datadog agent's ``dogstatsd_socket`` takes one payload per datagram; its
``dogstatsd_stream_socket`` takes each payload preceded by its length (4 bytes,
little-endian). Both read at most ``dogstatsd_buffer_size`` bytes per payload
(8192 by default, and a longer length makes it drop the stream), so the
batcher packs payloads of at most ``unix_upstream_max_payload`` bytes.

Datagrams (:class:`UnixDatagramUpstream`): a connected ``SOCK_DGRAM`` socket.
Unlike UDP, delivery is reliable and tells the sender everything: a full
receive queue makes ``send`` fail with ``EAGAIN`` (the datagram waits in a
bounded queue until the socket is writable again: back-pressure, not loss),
and a receiver that is gone fails it with ``ECONNREFUSED`` (or ``ENOENT`` when
the file is gone too). Lines therefore count as forwarded the moment the
kernel takes their datagram. When the receiver goes away the sender reports
itself down, keeps what it could not send in the same bounded queue, and
connects again, with backoff, to whatever socket then has the path (a
restarted agent binds a new one). An idle sender notices a receiver that left
by its health probe, a zero-length datagram (StatsD servers and the agent
ignore empty datagrams).

Streams (:class:`UnixStreamUpstream`): the TCP sender's connection handling,
buffer bound and drain, over ``AF_UNIX``, writing length-prefixed frames. Each
buffered chunk is one frame; its lines count as forwarded once the whole frame
is handed to the kernel, and a frame cut by a lost connection is written again
whole on the next one (the receiver dropped the partial one with the
connection), so a payload is never cut and never delivered twice by us.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time

from statsd_filter.fastio import send_many
from statsd_filter.protocol.prefixed import HEADER_SIZE, encode_prefixed
from statsd_filter.stats import Stat
from statsd_filter.upstream.backoff import Backoff
from statsd_filter.upstream.base import PayloadQueue, SocketUpstream, SocketWatch
from statsd_filter.upstream.tcp import CONNECT_TIMEOUT, TcpUpstream

__all__ = ["UnixDatagramUpstream", "UnixStreamUpstream"]

# The receiver is gone: reconnect (by path, to whatever socket is there now).
_GONE = frozenset({errno.ECONNREFUSED, errno.ENOENT, errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE})


class UnixDatagramUpstream(SocketUpstream):
    """Sends each batched payload as one datagram to a Unix datagram socket."""

    def __init__(
        self, path: str, counters: memoryview, buffer_bytes: int, log: logging.Logger
    ) -> None:
        super().__init__(path, 0, counters, buffer_bytes, log)
        self._path = path
        self._queue = PayloadQueue(counters, buffer_bytes)
        self._failed_at = 0.0
        self._sent_at_probe = -1
        self._wake = asyncio.Event()
        self._closing = False

    @property
    def label(self) -> str:
        return f"unix://{self._path}"

    def healthy_since(self, since: float) -> bool:
        """Connected, and no send failed since ``since`` (time.monotonic)."""
        return self._sock is not None and self._failed_at < since

    def probe(self, *, force: bool = False) -> None:
        """A zero-length datagram, unless data went out since the last probe."""
        sent = self._c[Stat.DATAGRAMS_OUT]
        if sent != self._sent_at_probe and not force:
            self._sent_at_probe = sent
            return
        self._sent_at_probe = sent
        sock = self._sock
        if sock is not None and not self._queue:
            try:
                sock.send(b"")
            except BlockingIOError:
                pass  # full: alive
            except OSError as exc:
                self._lost(exc)

    # ------------------------------------------------------------ connecting
    async def _connect_forever(self) -> None:
        backoff = Backoff(cap=2.0)
        failures = 0
        while not self._closing:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.connect(self._path)
            except OSError as exc:
                sock.close()
                self._c[Stat.UPSTREAM_ERRORS] += 1
                self._failed_at = time.monotonic()
                if not failures:  # once, not on every retry
                    self._log.warning(
                        "upstream %s unavailable (%s); retrying with backoff", self.label, exc
                    )
                failures += 1
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            failures = 0
            self._sock = sock
            assert self._loop is not None
            # The agent never answers; watching tells when the socket is writable again.
            self._watch = SocketWatch(self._loop, sock, self._on_readable, self._on_writable)
            self._c[Stat.UPSTREAM_CONNECTED] = 1
            self._c[Stat.UPSTREAM_RECONNECTS] += 1
            self._log.info("upstream %s connected", self.label)
            if self._queue:
                self._want_write(True)
            self._wake.clear()
            await self._wake.wait()  # set when the receiver is lost

    def _lost(self, exc: OSError) -> None:
        """The receiver is gone: close, report, reconnect."""
        self._failed_at = time.monotonic()
        self._c[Stat.UPSTREAM_ERRORS] += 1
        if self._sock is None:
            return
        self._close_socket()
        self._c[Stat.UPSTREAM_CONNECTED] = 0
        self._log.warning("upstream %s lost: %s", self.label, exc.strerror or exc)
        self._wake.set()

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            sock.recv(65536)  # nothing is ever sent back; clears a pending error
        except BlockingIOError:
            pass
        except OSError as exc:
            self._lost(exc)

    # ------------------------------------------------------------ sending
    def send_batch(self, payloads: list[bytes], lines: list[int]) -> None:
        """Send datagrams, many per system call (sendmmsg), queueing what must wait."""
        sock = self._sock
        if sock is None or self._queue:
            for payload, count in zip(payloads, lines, strict=True):
                self._enqueue(payload, count)
            return
        self._send_from(sock, payloads, lines)

    def _send_from(self, sock: socket.socket, payloads: list[bytes], lines: list[int]) -> None:
        i = 0
        total = len(payloads)
        c = self._c
        while i < total:
            try:
                sent = send_many(sock, payloads[i:] if i else payloads)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                if exc.errno in _GONE:
                    self._lost(exc)
                    sent = 0
                else:
                    # This datagram cannot go (e.g. larger than the socket allows).
                    c[Stat.UPSTREAM_ERRORS] += 1
                    c[Stat.DROPPED_UPSTREAM] += lines[i]
                    self._log.warning("upstream %s send failed: %s", self.label, exc)
                    i += 1
                    continue
            if not sent:
                for j in range(i, total):  # wait for writability (or a new connection)
                    self._enqueue(payloads[j], lines[j])
                return
            c[Stat.DATAGRAMS_OUT] += sent
            c[Stat.BYTES_OUT] += sum(map(len, payloads[i : i + sent]))
            c[Stat.LINES_FORWARDED] += sum(lines[i : i + sent])
            i += sent

    def _enqueue(self, payload: bytes, lines: int) -> None:
        if not self._queue:
            self._want_write(True)
        self._queue.push(payload, lines)

    def _on_writable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        payloads, lines = self._queue.take_all()
        self._send_from(sock, payloads, lines)
        if not self._queue:
            self._want_write(False)

    async def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._queue and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._closing = True
        lost = self._queue.clear()
        if lost:
            self._c[Stat.DROPPED_UPSTREAM] += lost
            self._log.warning("shutdown: %d lines for the upstream could not be delivered", lost)
        if self._task is not None:
            self._task.cancel()
        self._close_socket()


class UnixStreamUpstream(TcpUpstream):
    """Writes batched payloads as length-prefixed frames over one Unix stream connection."""

    def __init__(
        self, path: str, counters: memoryview, buffer_bytes: int, log: logging.Logger
    ) -> None:
        super().__init__(path, 0, counters, buffer_bytes, log)
        self._path = path

    @property
    def label(self) -> str:
        return f"unix+stream://{self._path}"

    async def _open(self) -> socket.socket:
        assert self._loop is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await asyncio.wait_for(self._loop.sock_connect(sock, self._path), CONNECT_TIMEOUT)
        except BaseException:
            sock.close()
            raise
        return sock

    def send_batch(self, payloads: list[bytes], lines: list[int]) -> None:
        """One write for the whole batch; each payload is one frame."""
        sock = self._sock
        if sock is None or self._buffer:
            for payload, count in zip(payloads, lines, strict=True):
                self._buffer_frame(encode_prefixed([payload]), count)
            self._trim()
            return
        data = encode_prefixed(payloads)
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._detach(str(exc))
            sent = 0
        c = self._c
        if sent == len(data):
            c[Stat.LINES_FORWARDED] += sum(lines)
            c[Stat.DATAGRAMS_OUT] += len(payloads)
            c[Stat.BYTES_OUT] += sent
            return
        pos = 0
        for payload, count in zip(payloads, lines, strict=True):
            size = HEADER_SIZE + len(payload)
            if pos + size <= sent:
                c[Stat.LINES_FORWARDED] += count
                c[Stat.DATAGRAMS_OUT] += 1
                c[Stat.BYTES_OUT] += size
            else:
                self._buffer_frame(data[pos : pos + size], count)
                if sent > pos:  # the first unsent frame went out in part
                    self._offset = sent - pos
            pos += size
        if self._sock is not None:
            self._want_write(True)
        self._trim()

    def send(self, payload: bytes, lines: int) -> None:
        """One payload, one frame."""
        self.send_batch([payload], [lines])

    def _buffer_frame(self, frame: bytes, lines: int) -> None:
        self._buffer.append((frame, lines))
        self._buffered += len(frame)

    def _wrote(self, sent: int) -> bool:
        """``sent`` more bytes of the first frame went out; True once it is all out.

        A frame's lines count only when its last byte is out: ``_counted`` stays
        0, so a frame cut by a lost connection is written again whole.
        """
        frame, lines = self._buffer[0]
        self._offset += sent
        if self._offset < len(frame):
            return False
        self._buffer.popleft()
        self._buffered -= len(frame)
        self._offset = 0
        self._count_sent(frame, lines)
        return True
