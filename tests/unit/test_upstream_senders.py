"""Unit tests for the UDP and TCP upstream senders, against real loopback sinks."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable

import pytest

from statsd_filter.stats import SLOT_WIDTH, Stat
from statsd_filter.upstream import tcp as tcp_module
from statsd_filter.upstream.backoff import Backoff
from statsd_filter.upstream.tcp import TcpUpstream
from statsd_filter.upstream.udp import UdpUpstream

LOG = logging.getLogger("test.senders")
WAIT = 5.0  # bound on every wait for the network; loopback answers in milliseconds


def counters_row() -> memoryview:
    return memoryview(bytearray(SLOT_WIDTH * 8)).cast("Q")


async def until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll ``condition`` every 10 ms; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def closed_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# ------------------------------------------------------------------ UDP
class UdpSink:
    """A UDP socket on 127.0.0.1:0 that collects datagrams."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]

    async def recv(self) -> bytes:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(loop.sock_recv(self.sock, 65536), WAIT)

    def pending(self) -> list[bytes]:
        """Datagrams already waiting, without waiting for more."""
        out = []
        for _ in range(10_000):
            try:
                out.append(self.sock.recv(65536))
            except BlockingIOError:
                break
        return out


def with_udp(
    body: Callable[[UdpSink, memoryview], Awaitable[UdpUpstream]],
) -> None:
    """Run ``body`` with a sink and a counters row; drain the upstream it returns."""

    async def main() -> None:
        sink = UdpSink()
        try:
            upstream = await body(sink, counters_row())
            await upstream.drain(1.0)
            assert upstream._sock is None
        finally:
            sink.sock.close()

    asyncio.run(main())


def test_udp_sends_datagrams_and_counts_them() -> None:
    """Each payload is one datagram; LINES_FORWARDED, DATAGRAMS_OUT and BYTES_OUT add up."""

    async def body(sink: UdpSink, row: memoryview) -> UdpUpstream:
        upstream = UdpUpstream("127.0.0.1", sink.port, row, 1 << 16, LOG)
        started = time.monotonic()
        await upstream.start()
        assert row[Stat.UPSTREAM_CONNECTED] == 1
        upstream.send_batch([b"a:1|c", b"b:2|c\nc:3|g"], [1, 2])
        assert [await sink.recv(), await sink.recv()] == [b"a:1|c", b"b:2|c\nc:3|g"]
        assert row[Stat.DATAGRAMS_OUT] == 2
        assert row[Stat.BYTES_OUT] == len(b"a:1|c") + len(b"b:2|c\nc:3|g")
        # Lines count as forwarded once no refusal can still come back for them.
        await until(lambda: row[Stat.LINES_FORWARDED] == 3)
        assert row[Stat.UPSTREAM_ERRORS] == 0
        assert row[Stat.DROPPED_UPSTREAM] == 0
        assert upstream.healthy_since(started)
        return upstream

    with_udp(body)


def test_udp_many_datagrams_arrive_whole_and_in_order() -> None:
    """A batch larger than one sendmmsg call (64) arrives complete, in order, each whole."""

    async def body(sink: UdpSink, row: memoryview) -> UdpUpstream:
        upstream = UdpUpstream("127.0.0.1", sink.port, row, 1 << 16, LOG)
        await upstream.start()
        payloads = [b"m.%d:%d|c" % (i, i) for i in range(150)]
        upstream.send_batch(payloads, [1] * 150)
        got = [await sink.recv() for _ in payloads]
        assert got == payloads
        assert row[Stat.DATAGRAMS_OUT] == 150
        assert row[Stat.BYTES_OUT] == sum(map(len, payloads))
        await until(lambda: row[Stat.LINES_FORWARDED] == 150)
        return upstream

    with_udp(body)


def test_udp_queues_until_resolved_then_sends_in_order() -> None:
    """Datagrams handed over before the socket exists wait, then go out in order once it does."""

    async def body(sink: UdpSink, row: memoryview) -> UdpUpstream:
        upstream = UdpUpstream("127.0.0.1", sink.port, row, 1 << 16, LOG)
        upstream.send_batch([b"early.1:1|c", b"early.2:1|c"], [1, 1])
        upstream.send_batch([b"early.3:1|c"], [1])
        assert row[Stat.UPSTREAM_BUFFERED_BYTES] == 3 * len(b"early.1:1|c")
        assert row[Stat.DATAGRAMS_OUT] == 0
        await upstream.start()
        upstream.send_batch([b"late:1|c"], [1])  # must not overtake the queued ones
        got = [await sink.recv() for _ in range(4)]
        assert got == [b"early.1:1|c", b"early.2:1|c", b"early.3:1|c", b"late:1|c"]
        await until(lambda: row[Stat.UPSTREAM_BUFFERED_BYTES] == 0)
        await until(lambda: row[Stat.LINES_FORWARDED] == 4)
        return upstream

    with_udp(body)


def test_udp_queue_bound_drops_oldest() -> None:
    """Past buffer_bytes the oldest queued datagrams are dropped and counted as queue_full."""

    async def body(sink: UdpSink, row: memoryview) -> UdpUpstream:
        upstream = UdpUpstream("127.0.0.1", sink.port, row, 12, LOG)
        upstream.send_batch([b"one:1", b"two:2\ntwo:3", b"six:6"], [1, 2, 1])
        assert row[Stat.DROPPED_QUEUE_FULL] == 3  # "one" and the two lines of "two"
        assert row[Stat.UPSTREAM_BUFFERED_BYTES] == len(b"six:6")
        await upstream.start()
        assert await sink.recv() == b"six:6"
        await asyncio.sleep(0.05)
        assert sink.pending() == []
        await until(lambda: row[Stat.LINES_FORWARDED] == 1)
        return upstream

    with_udp(body)


def test_udp_refusal_is_counted_and_unhealthy() -> None:
    """A closed port's refusal counts as UPSTREAM_ERRORS; healthy_since turns False, then True."""

    async def main() -> None:
        row = counters_row()
        upstream = UdpUpstream("127.0.0.1", closed_udp_port(), row, 1 << 16, LOG)
        await upstream.start()
        try:
            before = time.monotonic()
            assert upstream.healthy_since(before)
            upstream.send_batch([b"x:1|c"], [1])
            await until(lambda: row[Stat.UPSTREAM_ERRORS] >= 1)
            assert not upstream.healthy_since(before)
            assert row[Stat.UPSTREAM_REFUSED_MS] > 0
            assert row[Stat.UPSTREAM_REFUSED_MS] <= int(time.monotonic() * 1000)
            assert upstream.healthy_since(time.monotonic())  # no refusal since now
        finally:
            await upstream.drain(0.5)

    asyncio.run(main())


def test_udp_probe_sends_empty_datagram_only_when_idle() -> None:
    """probe() sends an empty datagram only if idle since the last probe, or when forced."""

    async def body(sink: UdpSink, row: memoryview) -> UdpUpstream:
        upstream = UdpUpstream("127.0.0.1", sink.port, row, 1 << 16, LOG)
        await upstream.start()
        upstream.probe()  # first call: only notes how much went out
        upstream.probe()  # idle since: probe
        assert await sink.recv() == b""
        upstream.send_batch([b"d:1|c"], [1])
        assert await sink.recv() == b"d:1|c"
        upstream.probe()  # data went out: that was the probe
        await asyncio.sleep(0.05)
        assert sink.pending() == []
        upstream.probe()  # idle again
        assert await sink.recv() == b""
        upstream.send_batch([b"e:1|c"], [1])
        assert await sink.recv() == b"e:1|c"
        upstream.probe(force=True)  # forced: probes even right after data
        assert await sink.recv() == b""
        assert row[Stat.DATAGRAMS_OUT] == 2  # probes are not data
        return upstream

    with_udp(body)


def test_udp_probe_reveals_a_dead_idle_upstream() -> None:
    """An idle upstream on a closed port is found refused through the probe alone."""

    async def main() -> None:
        row = counters_row()
        upstream = UdpUpstream("127.0.0.1", closed_udp_port(), row, 1 << 16, LOG)
        await upstream.start()
        try:
            before = time.monotonic()
            upstream.probe()
            upstream.probe()
            await until(lambda: row[Stat.UPSTREAM_ERRORS] >= 1)
            assert not upstream.healthy_since(before)
        finally:
            await upstream.drain(0.5)

    asyncio.run(main())


def test_udp_refusal_met_by_the_next_send_is_still_counted() -> None:
    """A refusal that surfaces on the next send (before the reader saw it) still counts."""

    async def main() -> None:
        row = counters_row()
        upstream = UdpUpstream("127.0.0.1", closed_udp_port(), row, 1 << 16, LOG)
        await upstream.start()
        try:
            before = time.monotonic()
            upstream.send_batch([b"a:1|c"], [1])
            # Let the ICMP refusal arrive without running the loop, so the reader
            # cannot see it first: the next send is the one that meets it.
            time.sleep(0.02)  # noqa: ASYNC251 - blocking the loop is the point here
            upstream.send_batch([b"b:1|c"], [1])
            await until(lambda: row[Stat.UPSTREAM_ERRORS] >= 1)
            assert not upstream.healthy_since(before)
        finally:
            await upstream.drain(0.5)

    asyncio.run(main())


def test_udp_refused_datagram_is_not_counted_as_forwarded() -> None:
    """A datagram the upstream refuses counts as dropped (refused), not as forwarded."""

    async def main() -> None:
        row = counters_row()
        upstream = UdpUpstream("127.0.0.1", closed_udp_port(), row, 1 << 16, LOG)
        await upstream.start()
        try:
            upstream.send_batch([b"a:1|c\nb:1|c"], [2])
            await until(lambda: row[Stat.DROPPED_REFUSED] == 2)
            await asyncio.sleep(0.1)
            assert row[Stat.LINES_FORWARDED] == 0
            assert row[Stat.DATAGRAMS_OUT] == 1
        finally:
            await upstream.drain(0.5)

    asyncio.run(main())


def test_udp_refused_datagram_goes_to_on_refused() -> None:
    """With on_refused, a refused datagram is handed over whole, with its line count."""

    async def main() -> None:
        row = counters_row()
        refused: list[tuple[bytes | None, int]] = []
        upstream = UdpUpstream(
            "127.0.0.1",
            closed_udp_port(),
            row,
            1 << 16,
            LOG,
            on_refused=lambda payload, lines: refused.append((payload, lines)),
        )
        await upstream.start()
        try:
            upstream.send_batch([b"a:1|c\nb:1|c", b"c:1|c"], [2, 1])
            await until(lambda: len(refused) >= 2)
            assert sorted(refused, key=repr) == [(b"a:1|c\nb:1|c", 2), (b"c:1|c", 1)]
            await asyncio.sleep(0.1)
            assert row[Stat.LINES_FORWARDED] == 0
            assert row[Stat.DROPPED_REFUSED] == 0  # the handler decides what they become
        finally:
            await upstream.drain(0.5)

    asyncio.run(main())


def test_udp_refusal_read_late_is_still_matched() -> None:
    """A loop held up past the confirmation delay still reads the refusal first."""

    async def main() -> None:
        row = counters_row()
        refused: list[tuple[bytes | None, int]] = []
        upstream = UdpUpstream(
            "127.0.0.1",
            closed_udp_port(),
            row,
            1 << 16,
            LOG,
            on_refused=lambda payload, lines: refused.append((payload, lines)),
        )
        await upstream.start()
        try:
            upstream.send_batch([b"a:1|c"], [1])
            time.sleep(0.1)  # noqa: ASYNC251 - holds the loop up past the confirmation delay
            upstream.send_batch([b"b:1|c"], [1])
            await until(lambda: len(refused) >= 2)
            assert sorted(refused, key=repr) == [(b"a:1|c", 1), (b"b:1|c", 1)]
            await asyncio.sleep(0.1)
            assert row[Stat.LINES_FORWARDED] == 0
        finally:
            await upstream.drain(0.5)

    asyncio.run(main())


# ------------------------------------------------------------------ TCP
class TcpSink:
    """A TCP listener on 127.0.0.1 that is bound at once but listens only when told.

    Until ``listen()`` connections are refused (the port is bound, so nobody else
    takes it). Each accepted connection's bytes are collected separately.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # A small, fixed receive window (inherited by accepted sockets): a sink
        # that stops reading pushes back after a few MB, not tens of MB.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        self.received: list[bytearray] = []
        self.eofs = 0
        self.reading = asyncio.Event()
        self.reading.set()
        self._conns: list[socket.socket] = []
        self._tasks: list[asyncio.Task[None]] = []

    def listen(self) -> None:
        self.sock.listen(8)
        self._tasks.append(asyncio.create_task(self._accept()))

    @property
    def data(self) -> bytes:
        return b"".join(self.received)

    @property
    def size(self) -> int:
        return sum(map(len, self.received))

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            conn.setblocking(False)
            self._conns.append(conn)
            buffer = bytearray()
            self.received.append(buffer)
            self._tasks.append(asyncio.create_task(self._read(conn, buffer)))

    async def _read(self, conn: socket.socket, buffer: bytearray) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.reading.wait()
            data = await loop.sock_recv(conn, 65536)
            if not data:
                self.eofs += 1
                return
            buffer += data

    async def stop_reading(self, index: int) -> None:
        """Stop reading accepted connection ``index`` for good."""
        reader = self._tasks[index + 1]
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)

    async def drop(self, index: int) -> None:
        """Close accepted connection ``index`` from this side (unread data: a reset)."""
        await self.stop_reading(index)
        self._conns[index].close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in self._conns:
            conn.close()
        self.sock.close()


@pytest.fixture
def fast_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reconnect attempts every 10-50 ms instead of up to 2 s, to keep the tests short."""
    monkeypatch.setattr(tcp_module, "Backoff", lambda: Backoff(base=0.01, cap=0.05))


def with_tcp(
    buffer_bytes: int, body: Callable[[TcpSink, TcpUpstream, memoryview], Awaitable[None]]
) -> None:
    """Run ``body`` with a (not yet listening) sink and a started TCP upstream to it."""

    async def main() -> None:
        sink = TcpSink()
        row = counters_row()
        upstream = TcpUpstream("127.0.0.1", sink.port, row, buffer_bytes, LOG)
        try:
            await upstream.start()
            await body(sink, upstream, row)
        finally:
            await upstream.drain(0.0)
            await sink.close()

    asyncio.run(main())


@pytest.mark.usefixtures("fast_reconnect")
def test_tcp_delivers_newline_terminated_payloads_in_order() -> None:
    """Each batch is one write of its payloads, newline-terminated; counters add up."""

    async def body(sink: TcpSink, upstream: TcpUpstream, row: memoryview) -> None:
        sink.listen()
        await until(lambda: row[Stat.UPSTREAM_CONNECTED] == 1)
        assert upstream.healthy_since(0.0)
        upstream.send_batch([b"a:1|c", b"b:1|c\nc:1|c"], [1, 2])
        upstream.send(b"d:1|c", 1)
        expected = b"a:1|c\nb:1|c\nc:1|c\nd:1|c\n"
        await until(lambda: sink.data == expected)
        assert len(sink.received) == 1  # one connection
        assert row[Stat.LINES_FORWARDED] == 4
        assert row[Stat.DATAGRAMS_OUT] == 2  # writes
        assert row[Stat.BYTES_OUT] == len(expected)
        assert row[Stat.UPSTREAM_RECONNECTS] == 1
        assert row[Stat.UPSTREAM_BUFFERED_BYTES] == 0

    with_tcp(1 << 20, body)


@pytest.mark.usefixtures("fast_reconnect")
def test_tcp_buffers_while_down_and_delivers_when_up() -> None:
    """While the upstream refuses, lines wait in the buffer; they arrive in order once it is up."""

    async def body(sink: TcpSink, upstream: TcpUpstream, row: memoryview) -> None:
        await until(lambda: row[Stat.UPSTREAM_ERRORS] >= 2)  # refused, retrying
        assert not upstream.healthy_since(0.0)
        assert row[Stat.UPSTREAM_CONNECTED] == 0
        upstream.send(b"one:1|c", 1)
        upstream.send_batch([b"two:1|c", b"three:1|c"], [1, 1])
        assert row[Stat.UPSTREAM_BUFFERED_BYTES] == len(b"one:1|c\ntwo:1|c\nthree:1|c\n")
        assert row[Stat.LINES_FORWARDED] == 0
        sink.listen()
        await until(lambda: row[Stat.UPSTREAM_CONNECTED] == 1)
        upstream.send(b"four:1|c", 1)  # after the buffered ones, never before
        expected = b"one:1|c\ntwo:1|c\nthree:1|c\nfour:1|c\n"
        await until(lambda: sink.data == expected)
        assert row[Stat.LINES_FORWARDED] == 4
        assert row[Stat.UPSTREAM_BUFFERED_BYTES] == 0
        assert row[Stat.DROPPED_QUEUE_FULL] == 0
        assert upstream.healthy_since(0.0)

    with_tcp(1 << 20, body)


@pytest.mark.usefixtures("fast_reconnect")
def test_tcp_buffer_bound_drops_oldest_chunks() -> None:
    """Past buffer_bytes the oldest whole chunks are dropped (queue_full); the newest survive."""

    async def body(sink: TcpSink, upstream: TcpUpstream, row: memoryview) -> None:
        await until(lambda: row[Stat.UPSTREAM_ERRORS] >= 1)
        upstream.send(b"one:1|c", 1)  # 8 bytes with its newline
        upstream.send(b"two:1|c\ntwo:2|c", 2)  # 16: total 24 > 20, "one" goes
        assert row[Stat.DROPPED_QUEUE_FULL] == 1
        upstream.send(b"six:1|c", 1)  # 24 again: "two" goes
        assert row[Stat.DROPPED_QUEUE_FULL] == 3
        assert row[Stat.UPSTREAM_BUFFERED_BYTES] == 8
        upstream.send(b"x" * 50, 1)  # alone bigger than the bound: kept, "six" goes
        assert row[Stat.DROPPED_QUEUE_FULL] == 4
        assert row[Stat.UPSTREAM_BUFFERED_BYTES] == 51
        sink.listen()
        await until(lambda: sink.data == b"x" * 50 + b"\n")
        await asyncio.sleep(0.05)
        assert sink.data == b"x" * 50 + b"\n"
        assert row[Stat.LINES_FORWARDED] == 1

    with_tcp(20, body)


@pytest.mark.usefixtures("fast_reconnect")
def test_tcp_reconnects_after_upstream_closes() -> None:
    """When the upstream closes the connection the sender reconnects; later lines go there."""

    async def body(sink: TcpSink, upstream: TcpUpstream, row: memoryview) -> None:
        sink.listen()
        await until(lambda: row[Stat.UPSTREAM_CONNECTED] == 1)
        upstream.send(b"first:1|c", 1)
        await until(lambda: sink.data == b"first:1|c\n")
        await sink.drop(0)
        await until(
            lambda: row[Stat.UPSTREAM_RECONNECTS] == 2 and row[Stat.UPSTREAM_CONNECTED] == 1
        )
        assert row[Stat.UPSTREAM_ERRORS] >= 1
        upstream.send(b"second:1|c", 1)
        await until(lambda: len(sink.received) == 2 and sink.received[1] == b"second:1|c\n")
        assert row[Stat.LINES_FORWARDED] == 2

    with_tcp(1 << 20, body)


@pytest.mark.usefixtures("fast_reconnect")
def test_tcp_backpressure_keeps_order_and_whole_lines() -> None:
    """What the kernel does not take waits in the buffer and follows in order once it drains."""
    total_lines = 0
    payloads: list[bytes] = []
    for batch in range(192):  # about 10 MB: more than the kernel buffers hold
        lines = [b"line.%03d.%05d:1|c" % (batch, i) for i in range(3000)]
        payloads.append(b"\n".join(lines))
        total_lines += len(lines)
    expected = b"".join(payload + b"\n" for payload in payloads)

    async def body(sink: TcpSink, upstream: TcpUpstream, row: memoryview) -> None:
        sink.reading.clear()  # the upstream stops reading: the kernel buffers fill up
        sink.listen()
        await until(lambda: row[Stat.UPSTREAM_CONNECTED] == 1)
        for payload in payloads:
            upstream.send(payload, payload.count(b"\n") + 1)
        assert row[Stat.UPSTREAM_BUFFERED_BYTES] > 0, "the kernel took it all: no backpressure"
        assert row[Stat.DROPPED_QUEUE_FULL] == 0
        sink.reading.set()
        await until(lambda: sink.size >= len(expected), timeout=30.0)
        assert sink.data == expected
        await until(lambda: row[Stat.UPSTREAM_BUFFERED_BYTES] == 0)
        assert row[Stat.LINES_FORWARDED] == total_lines
        assert row[Stat.BYTES_OUT] == len(expected)

    with_tcp(1 << 30, body)


@pytest.mark.usefixtures("fast_reconnect")
def test_tcp_break_mid_chunk_resends_from_a_line_boundary() -> None:
    """A connection lost mid-chunk: the next one resumes at a line start; each line counted once."""
    lines = [b"line.%07d.with-some-padding:1|c" % i for i in range(300_000)]  # 12 MB
    payloads = [b"\n".join(lines[i : i + 4000]) for i in range(0, len(lines), 4000)]

    async def body(sink: TcpSink, upstream: TcpUpstream, row: memoryview) -> None:
        sink.reading.clear()
        sink.listen()
        await until(lambda: row[Stat.UPSTREAM_CONNECTED] == 1)
        for payload in payloads:
            upstream.send(payload, payload.count(b"\n") + 1)
        assert row[Stat.UPSTREAM_BUFFERED_BYTES] > 0, "the kernel took it all: no backpressure"
        # Wait until the kernel takes no more (bounded): the count then stays put.
        handed_over = -1
        for _ in range(100):
            if row[Stat.LINES_FORWARDED] == handed_over:
                break
            handed_over = row[Stat.LINES_FORWARDED]
            await asyncio.sleep(0.02)
        await sink.drop(0)  # a reset, with data unread and more waiting
        sink.reading.set()
        await until(lambda: row[Stat.UPSTREAM_RECONNECTS] == 2)
        last = lines[-1] + b"\n"
        await until(lambda: sink.received[-1].endswith(last), timeout=30.0)
        assert len(sink.received) == 2
        assert sink.received[0] == b""  # nothing was read from the broken connection
        resent = bytes(sink.received[1]).split(b"\n")
        assert resent.pop() == b""  # ends with a newline
        # It starts with the first line not handed to the dead connection, and
        # carries the rest in order: nothing cut, nothing sent twice, nothing skipped.
        assert 0 < handed_over < len(lines)
        assert resent == lines[handed_over:]
        assert row[Stat.LINES_FORWARDED] == len(lines)

    with_tcp(1 << 30, body)


@pytest.mark.usefixtures("fast_reconnect")
def test_tcp_drain_delivers_buffered_then_closes() -> None:
    """drain(timeout) waits for the buffer to reach the upstream, then closes with a FIN."""

    async def body(sink: TcpSink, upstream: TcpUpstream, row: memoryview) -> None:
        await until(lambda: row[Stat.UPSTREAM_ERRORS] >= 1)
        upstream.send_batch([b"a:1|c", b"b:1|c"], [1, 1])
        upstream.send(b"c:1|c", 1)
        sink.listen()
        await upstream.drain(WAIT)
        await until(lambda: sink.eofs == 1)
        assert sink.data == b"a:1|c\nb:1|c\nc:1|c\n"
        assert row[Stat.DROPPED_UPSTREAM] == 0
        assert row[Stat.LINES_FORWARDED] == 3
        assert upstream._sock is None

    with_tcp(1 << 20, body)


@pytest.fixture
def slow_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failed attempt the sender waits 10-20 s: no connect is in flight meanwhile."""
    monkeypatch.setattr(tcp_module, "Backoff", lambda: Backoff(base=20.0, cap=20.0))


@pytest.mark.usefixtures("slow_reconnect")
def test_tcp_drain_timeout_counts_undelivered_lines() -> None:
    """If the upstream stays down, drain gives up after ``timeout`` and counts lines as lost."""

    async def body(sink: TcpSink, upstream: TcpUpstream, row: memoryview) -> None:
        await until(lambda: row[Stat.UPSTREAM_ERRORS] >= 1)  # refused; now backing off
        upstream.send(b"a:1|c\nb:1|c", 2)
        upstream.send(b"c:1|c", 1)
        started = time.monotonic()
        await upstream.drain(0.2)
        assert 0.15 <= time.monotonic() - started < WAIT
        assert row[Stat.DROPPED_UPSTREAM] == 3
        assert row[Stat.LINES_FORWARDED] == 0
        # It stopped trying: the reconnect loop is over.
        await asyncio.sleep(0.01)
        assert upstream._task is not None
        assert upstream._task.done()

    with_tcp(1 << 20, body)


class RecordingSocketModule:
    """Stands in for the ``socket`` module in tcp.py, keeping every socket it creates."""

    def __init__(self) -> None:
        self.created: list[socket.socket] = []

    def __getattr__(self, name: str) -> object:
        return getattr(socket, name)

    def socket(self, *args: int) -> socket.socket:
        sock = socket.socket(*args)
        self.created.append(sock)
        return sock


def test_tcp_drain_during_connect_closes_the_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """drain() during a connect in progress closes its socket (no leak, no late connection)."""
    recorder = RecordingSocketModule()
    monkeypatch.setattr(tcp_module, "socket", recorder)

    async def main() -> None:
        # A listener with a full accept queue drops further SYNs: a connect to it
        # stays in progress (EINPROGRESS) instead of failing.
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        fillers = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(3)]
        try:
            listener.bind(("127.0.0.1", 0))
            listener.listen(0)
            for filler in fillers:
                filler.setblocking(False)
                try:
                    filler.connect(listener.getsockname())
                except BlockingIOError:
                    pass
            await asyncio.sleep(0.05)
            row = counters_row()
            upstream = TcpUpstream("127.0.0.1", listener.getsockname()[1], row, 1 << 20, LOG)
            await upstream.start()
            await until(lambda: len(recorder.created) == 1)
            await asyncio.sleep(0.05)
            assert row[Stat.UPSTREAM_CONNECTED] == 0  # still connecting
            assert row[Stat.UPSTREAM_ERRORS] == 0  # not failed either
            upstream.send(b"a:1|c", 1)
            await upstream.drain(0.05)
            await asyncio.sleep(0.05)
            assert [sock for sock in recorder.created if sock.fileno() != -1] == []
        finally:
            for sock in (*recorder.created, *fillers, listener):
                sock.close()

    asyncio.run(main())


@pytest.mark.usefixtures("fast_reconnect")
def test_tcp_drain_after_unnoticed_reset_closes_quietly() -> None:
    """drain() on a connection the upstream reset (not yet noticed) closes it without raising."""

    async def body(sink: TcpSink, upstream: TcpUpstream, row: memoryview) -> None:
        sink.listen()
        await until(lambda: row[Stat.UPSTREAM_CONNECTED] == 1 and len(sink.received) == 1)
        await sink.stop_reading(0)
        # From here the loop must not run, so the sender cannot notice the reset.
        upstream.send(b"a:1|c", 1)
        sink._conns[0].close()  # unread data: the upstream gets a reset
        time.sleep(0.05)  # noqa: ASYNC251 - let the reset arrive, unnoticed
        try:
            await upstream.drain(1.0)
        finally:
            if upstream._sock is not None:  # left open if drain failed: not to the GC
                upstream._sock.close()
                upstream._sock = None
        assert row[Stat.LINES_FORWARDED] == 1

    with_tcp(1 << 20, body)


def test_tcp_client_socket_never_takes_the_upstreams_own_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A local port equal to the upstream's (TCP would connect to itself) is picked again."""
    picks = iter([4242, 4242, 5000])
    closed: list[int] = []

    class PickySocket(socket.socket):
        def getsockname(self) -> tuple[str, int]:
            self.picked = next(picks)
            return ("0.0.0.0", self.picked)

        def close(self) -> None:
            if getattr(self, "picked", None) is not None:
                closed.append(self.picked)
            super().close()

    monkeypatch.setattr(socket, "socket", PickySocket)  # the module tcp.py uses
    sock = tcp_module._client_socket(socket.AF_INET, 4242)
    try:
        assert sock.picked == 5000  # type: ignore[attr-defined]
        assert closed == [4242, 4242]
    finally:
        socket.socket.close(sock)
