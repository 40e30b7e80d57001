"""Unit tests for the Unix socket upstream senders, against real Unix sockets in /tmp."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from statsd_filter.protocol.prefixed import LengthPrefixFramer
from statsd_filter.stats import SLOT_WIDTH, Stat
from statsd_filter.upstream import tcp as tcp_module
from statsd_filter.upstream import unix as unix_module
from statsd_filter.upstream.backoff import Backoff
from statsd_filter.upstream.factory import UpstreamSet
from statsd_filter.upstream.spec import UpstreamSpec
from statsd_filter.upstream.unix import UnixDatagramUpstream, UnixStreamUpstream

LOG = logging.getLogger("test.unix")
WAIT = 5.0  # bound on every wait; local sockets answer in microseconds


def counters_row() -> memoryview:
    return memoryview(bytearray(SLOT_WIDTH * 8)).cast("Q")


async def until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll ``condition`` every 10 ms; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for socket files (AF_UNIX paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="sf-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def fast_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reconnect attempts every 10-50 ms instead of up to 2 s, to keep the tests short."""
    monkeypatch.setattr(unix_module, "Backoff", lambda **_: Backoff(base=0.01, cap=0.05))
    monkeypatch.setattr(tcp_module, "Backoff", lambda: Backoff(base=0.01, cap=0.05))


class DgramSink:
    """A Unix datagram socket collecting what arrives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    def pending(self) -> list[bytes]:
        out = []
        for _ in range(100_000):
            try:
                out.append(self.sock.recv(1 << 17))
            except BlockingIOError:
                break
        return out

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


def run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(body())


# ------------------------------------------------------------------ datagrams


def test_dgram_sends_one_datagram_per_payload_and_counts(sockdir: Path) -> None:
    """Each payload is one datagram; lines count as forwarded when the kernel takes them."""

    async def body() -> None:
        sink = DgramSink(sockdir / "s")
        row = counters_row()
        upstream = UnixDatagramUpstream(str(sink.path), row, 1 << 16, LOG)
        try:
            started = time.monotonic()
            await upstream.start()
            await until(lambda: row[Stat.UPSTREAM_CONNECTED] == 1)
            upstream.send_batch([b"a:1|c", b"b:2|c\nc:3|g"], [1, 2])
            assert sink.pending() == [b"a:1|c", b"b:2|c\nc:3|g"]
            assert row[Stat.LINES_FORWARDED] == 3
            assert row[Stat.DATAGRAMS_OUT] == 2
            assert row[Stat.BYTES_OUT] == len(b"a:1|c") + len(b"b:2|c\nc:3|g")
            assert upstream.healthy_since(started)
        finally:
            await upstream.drain(1.0)
            sink.close()
        assert upstream._sock is None

    run(body)


def test_dgram_missing_socket_is_down_then_delivers_in_order(sockdir: Path) -> None:
    """No socket at the path: down, errors counted, payloads wait; delivered once it appears."""

    async def body() -> None:
        path = sockdir / "later"
        row = counters_row()
        upstream = UnixDatagramUpstream(str(path), row, 1 << 16, LOG)
        await upstream.start()
        await until(lambda: row[Stat.UPSTREAM_ERRORS] >= 2)  # ENOENT, retried
        assert not upstream.healthy_since(time.monotonic() - 60)
        upstream.send_batch([b"one:1|c", b"two:1|c"], [1, 1])
        assert row[Stat.UPSTREAM_BUFFERED_BYTES] == 14
        assert row[Stat.LINES_FORWARDED] == 0
        sink = DgramSink(path)
        try:
            await until(lambda: row[Stat.LINES_FORWARDED] == 2)
            upstream.send_batch([b"three:1|c"], [1])
            assert sink.pending() == [b"one:1|c", b"two:1|c", b"three:1|c"]
            assert row[Stat.UPSTREAM_BUFFERED_BYTES] == 0
            assert row[Stat.UPSTREAM_CONNECTED] == 1
        finally:
            await upstream.drain(1.0)
            sink.close()

    run(body)


def test_dgram_full_receiver_is_back_pressure_not_loss(sockdir: Path) -> None:
    """A receiver that stops reading makes datagrams wait (EAGAIN); none is lost or reordered."""

    async def body() -> None:
        sink = DgramSink(sockdir / "s")
        row = counters_row()
        upstream = UnixDatagramUpstream(str(sink.path), row, 1 << 24, LOG)
        try:
            await upstream.start()
            await until(lambda: row[Stat.UPSTREAM_CONNECTED] == 1)
            payloads = [b"m.%d:1|c" % i for i in range(3000)]  # far beyond the queue length
            upstream.send_batch(payloads, [1] * len(payloads))
            assert row[Stat.UPSTREAM_BUFFERED_BYTES] > 0  # the kernel queue filled up
            got: list[bytes] = []
            deadline = time.monotonic() + WAIT
            while len(got) < len(payloads) and time.monotonic() < deadline:
                got += sink.pending()
                await asyncio.sleep(0.005)
            assert got == payloads
            assert row[Stat.LINES_FORWARDED] == len(payloads)
            assert row[Stat.DROPPED_QUEUE_FULL] == 0
        finally:
            await upstream.drain(1.0)
            sink.close()

    run(body)


def test_dgram_receiver_restart_is_noticed_and_reconnected(sockdir: Path) -> None:
    """A receiver that goes away (the agent restarting) is reported down, and the sender
    reconnects to the new socket at the same path; what it could not send is delivered."""

    async def body() -> None:
        path = sockdir / "agent"
        sink = DgramSink(path)
        row = counters_row()
        upstream = UnixDatagramUpstream(str(path), row, 1 << 16, LOG)
        try:
            await upstream.start()
            await until(lambda: row[Stat.UPSTREAM_CONNECTED] == 1)
            upstream.send_batch([b"before:1|c"], [1])
            assert sink.pending() == [b"before:1|c"]
            sink.close()
            lost_at = time.monotonic()
            upstream.send_batch([b"during:1|c"], [1])
            assert row[Stat.UPSTREAM_CONNECTED] == 0
            assert not upstream.healthy_since(lost_at)
            assert row[Stat.LINES_FORWARDED] == 1
            sink = DgramSink(path)
            await until(lambda: row[Stat.LINES_FORWARDED] == 2)
            assert sink.pending() == [b"during:1|c"]
            assert row[Stat.UPSTREAM_RECONNECTS] == 2
        finally:
            await upstream.drain(1.0)
            sink.close()

    run(body)


def test_dgram_probe_reveals_a_receiver_gone_while_idle(sockdir: Path) -> None:
    """An idle sender's probe (an empty datagram) finds a receiver that left."""

    async def body() -> None:
        path = sockdir / "s"
        sink = DgramSink(path)
        row = counters_row()
        upstream = UnixDatagramUpstream(str(path), row, 1 << 16, LOG)
        try:
            await upstream.start()
            await until(lambda: row[Stat.UPSTREAM_CONNECTED] == 1)
            upstream.probe()  # the first check only notes how much went out
            upstream.probe()
            assert sink.pending() == [b""]  # idle: the probe went out, and it is empty
            upstream.send_batch([b"a:1|c"], [1])
            upstream.probe()
            assert sink.pending() == [b"a:1|c"]  # traffic was its own probe
            sink.close()
            since = time.monotonic()
            assert upstream.healthy_since(since)  # nothing has told it yet
            upstream.probe(force=True)
            assert not upstream.healthy_since(since)
            assert row[Stat.UPSTREAM_CONNECTED] == 0
        finally:
            await upstream.drain(0.1)
            sink.close()

    run(body)


def test_dgram_drain_counts_what_could_not_be_delivered(sockdir: Path) -> None:
    """At shutdown, payloads still waiting for a missing receiver count as dropped (upstream)."""

    async def body() -> None:
        row = counters_row()
        upstream = UnixDatagramUpstream(str(sockdir / "none"), row, 1 << 16, LOG)
        await upstream.start()
        upstream.send_batch([b"a:1|c\nb:1|c", b"c:1|c"], [2, 1])
        await upstream.drain(0.05)
        assert row[Stat.DROPPED_UPSTREAM] == 3
        assert row[Stat.LINES_FORWARDED] == 0
        assert row[Stat.UPSTREAM_BUFFERED_BYTES] == 0

    run(body)


def test_dgram_queue_bound_drops_oldest(sockdir: Path) -> None:
    """Past buffer_bytes the oldest waiting payloads are dropped and counted as queue_full."""

    async def body() -> None:
        row = counters_row()
        upstream = UnixDatagramUpstream(str(sockdir / "none"), row, 12, LOG)
        upstream.send_batch([b"one:1", b"two:2\ntwo:3", b"six:6"], [1, 2, 1])
        assert row[Stat.DROPPED_QUEUE_FULL] == 3
        assert upstream._queue.take_all() == ([b"six:6"], [1])
        await upstream.drain(0.0)

    run(body)


# ------------------------------------------------------------------ streams


class StreamSink:
    """A Unix stream listener decoding DogStatsD's length-prefixed frames per connection."""

    def __init__(self, path: Path, *, read: bool = True) -> None:
        self.path = path
        self.read = read  # False: accept connections but never read them
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.sock.setblocking(False)
        self.raw: list[bytearray] = []
        self._conns: list[socket.socket] = []
        self._task = asyncio.create_task(self._accept())
        self._readers: list[asyncio.Task[None]] = []

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            conn.setblocking(False)
            self._conns.append(conn)
            buf = bytearray()
            self.raw.append(buf)
            if self.read:
                self._readers.append(asyncio.create_task(self._read(conn, buf)))

    async def _read(self, conn: socket.socket, buf: bytearray) -> None:
        loop = asyncio.get_running_loop()
        while data := await loop.sock_recv(conn, 65536):
            buf += data

    def payloads(self, index: int = 0) -> list[bytes]:
        framer = LengthPrefixFramer(1 << 20)
        chunk, _ = framer.feed(bytes(self.raw[index]))
        assert framer.pending == 0, "a frame was cut"
        return chunk.split(b"\n") if chunk else []

    async def close(self) -> None:
        for task in (self._task, *self._readers):
            task.cancel()
        await asyncio.gather(self._task, *self._readers, return_exceptions=True)
        for conn in self._conns:
            conn.close()
        self.sock.close()
        self.path.unlink(missing_ok=True)


def test_stream_writes_length_prefixed_frames(sockdir: Path) -> None:
    """Each payload is one frame: 4-byte little-endian length, then the payload."""

    async def body() -> None:
        sink = StreamSink(sockdir / "s")
        row = counters_row()
        upstream = UnixStreamUpstream(str(sink.path), row, 1 << 16, LOG)
        try:
            await upstream.start()
            await until(lambda: row[Stat.UPSTREAM_CONNECTED] == 1)
            upstream.send_batch([b"a:1|c", b"b:2|c\nc:3|g"], [1, 2])
            await until(lambda: len(sink.raw) == 1 and len(sink.raw[0]) == 4 + 5 + 4 + 11)
            assert bytes(sink.raw[0]) == (
                struct.pack("<I", 5) + b"a:1|c" + struct.pack("<I", 11) + b"b:2|c\nc:3|g"
            )
            assert row[Stat.LINES_FORWARDED] == 3
            assert row[Stat.DATAGRAMS_OUT] == 2
            assert row[Stat.BYTES_OUT] == 24
        finally:
            await upstream.drain(1.0)
            await sink.close()

    run(body)


def test_stream_buffers_while_absent_then_delivers_in_order(sockdir: Path) -> None:
    """Frames wait in the buffer while nothing listens and go out in order once it does."""

    async def body() -> None:
        path = sockdir / "s"
        row = counters_row()
        upstream = UnixStreamUpstream(str(path), row, 1 << 16, LOG)
        await upstream.start()
        await until(lambda: row[Stat.UPSTREAM_ERRORS] >= 2)
        upstream.send_batch([b"x:1|c", b"y:1|c"], [1, 1])
        upstream.send(b"z:1|c", 1)
        assert row[Stat.UPSTREAM_BUFFERED_BYTES] == 3 * 9
        sink = StreamSink(path)
        try:
            await until(lambda: row[Stat.LINES_FORWARDED] == 3)
            await until(lambda: bool(sink.raw) and len(sink.raw[0]) == 27)
            assert sink.payloads() == [b"x:1|c", b"y:1|c", b"z:1|c"]
        finally:
            await upstream.drain(1.0)
            await sink.close()

    run(body)


def test_stream_backpressure_keeps_frames_whole(sockdir: Path) -> None:
    """Far more than the socket buffer holds: every frame arrives whole, in order, counted."""

    async def body() -> None:
        sink = StreamSink(sockdir / "s")
        row = counters_row()
        upstream = UnixStreamUpstream(str(sink.path), row, 1 << 26, LOG)
        try:
            await upstream.start()
            await until(lambda: row[Stat.UPSTREAM_CONNECTED] == 1)
            payloads = [b"m.%d:%d|c" % (i, i) + b"x" * (i % 900) for i in range(20_000)]
            for i in range(0, len(payloads), 50):  # batches, like the batcher hands them over
                upstream.send_batch(payloads[i : i + 50], [1] * 50)
            await until(lambda: row[Stat.LINES_FORWARDED] == len(payloads), timeout=20)
            total = sum(4 + len(p) for p in payloads)
            await until(lambda: len(sink.raw[0]) == total, timeout=20)
            assert sink.payloads() == payloads
            assert row[Stat.DATAGRAMS_OUT] == len(payloads)
            assert row[Stat.BYTES_OUT] == total
        finally:
            await upstream.drain(1.0)
            await sink.close()

    run(body)


def test_stream_frame_cut_by_a_lost_connection_is_resent_whole(sockdir: Path) -> None:
    """A frame half-written when the receiver goes away is written again whole on the next
    connection; the first connection never saw it complete, the second sees every frame once."""

    async def body() -> None:
        path = sockdir / "s"
        # A receiver that never reads: frames pile up, one of them partly written.
        sink = StreamSink(path, read=False)
        row = counters_row()
        upstream = UnixStreamUpstream(str(path), row, 1 << 26, LOG)
        try:
            await upstream.start()
            await until(lambda: row[Stat.UPSTREAM_CONNECTED] == 1 and len(sink.raw) == 1)
            big = [b"big.%d:1|c|#" % i + b"t" * 5000 for i in range(400)]
            upstream.send_batch(big, [1] * len(big))
            assert upstream._buffer, "the socket took everything: the test needs back-pressure"
            assert upstream._offset > 0, "no frame was cut: the test needs one"
            forwarded = row[Stat.LINES_FORWARDED]
            await sink.close()  # the receiver goes: unread data, connection reset
            sink = StreamSink(path)
            await until(lambda: row[Stat.LINES_FORWARDED] == len(big), timeout=10)
            await until(
                lambda: (
                    bool(sink.raw) and len(sink.raw[0]) == sum(4 + len(p) for p in big[forwarded:])
                ),
                timeout=10,
            )
            assert sink.payloads() == big[forwarded:]
            assert row[Stat.UPSTREAM_RECONNECTS] == 2
        finally:
            await upstream.drain(1.0)
            await sink.close()

    run(body)


# ------------------------------------------------------------------ the set


def test_upstream_set_sizes_unix_batches_by_unix_upstream_max_payload(sockdir: Path) -> None:
    """Unix upstreams get batches of at most max_unix_payload bytes; UDP keeps max_udp_size."""
    specs = [
        UpstreamSpec(str(sockdir / "d"), 0, "unix"),
        UpstreamSpec(str(sockdir / "s"), 0, "unix+stream"),
        UpstreamSpec("127.0.0.1", 9, "udp"),
    ]
    rows = [counters_row() for _ in specs]
    upstreams = UpstreamSet(
        specs,
        "mirror",
        rows.__getitem__,
        buffer_bytes=1 << 16,
        max_udp_size=1432,
        health_interval=1.0,
        log=LOG,
        max_unix_payload=8192,
    )
    assert [type(s).__name__ for s in upstreams.senders] == [
        "UnixDatagramUpstream",
        "UnixStreamUpstream",
        "UdpUpstream",
    ]
    assert [b.max_size for b in upstreams.router.batchers] == [8192, 8192, 1432]
    assert upstreams.router.nodes == [
        f"unix://{sockdir}/d",
        f"unix+stream://{sockdir}/s",
        "127.0.0.1:9",
    ]
