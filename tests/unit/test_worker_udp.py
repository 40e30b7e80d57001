"""The UDP input's three regimes: readiness when sparse, a timer when steady, back to back
under load; and a stop that reads everything queued."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from statsd_filter.stats import SLOT_WIDTH, Stat
from statsd_filter.worker import readrole as readrole_module
from statsd_filter.worker import udp as udp_module
from statsd_filter.worker.readrole import ReadBell, ReadRole
from statsd_filter.worker.udp import UdpInput


class RecordingPipeline:
    """Stands in for the worker pipeline: records every chunk fed to it."""

    packed = None  # never the C fast path here: the reads are what is observed

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.flushes = 0

    def feed(self, chunk: bytes, longest: int | None = None, oversize: int = 0) -> None:  # noqa: ARG002
        self.chunks.append(chunk)

    def flush(self) -> None:
        self.flushes += 1


@contextlib.contextmanager
def _socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A non-blocking receiver on loopback (its buffer holds 700 datagrams) and a sender
    connected to it."""
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        rx.bind(("127.0.0.1", 0))
        rx.setblocking(False)
        tx.connect(rx.getsockname())
        yield rx, tx


def _run(
    delay: float, body: Callable[[UdpInput, socket.socket, RecordingPipeline], Any]
) -> RecordingPipeline:
    pipeline = RecordingPipeline()

    async def main() -> None:
        with _socket_pair() as (rx, tx):
            counters = memoryview(bytearray(SLOT_WIDTH * 8)).cast("Q")
            udp = UdpInput(rx, pipeline, counters, logging_off(), delay)  # type: ignore[arg-type]
            udp.start()
            try:
                await body(udp, tx, pipeline)
            finally:
                udp.stop(deadline=0.0)

    asyncio.run(main())
    return pipeline


def logging_off() -> Any:
    import logging  # noqa: PLC0415

    log = logging.getLogger("test.udp")
    log.disabled = True
    return log


def test_a_burst_is_read_in_one_wake_up_after_the_delay() -> None:
    """With a read delay, datagrams arriving together share one read."""

    async def body(udp: UdpInput, tx: socket.socket, pipeline: RecordingPipeline) -> None:
        for i in range(5):
            tx.send(b"m.%d:1|c" % i)
        for _ in range(100):  # bounded: until the delayed read happened
            await asyncio.sleep(0.02)
            if pipeline.chunks:
                break

    pipeline = _run(0.1, body)
    assert pipeline.chunks == [b"\n".join(b"m.%d:1|c" % i for i in range(5))]


def test_without_delay_each_readiness_reads_at_once() -> None:
    """max_read_delay 0: a datagram is read as soon as the socket is readable."""

    async def body(udp: UdpInput, tx: socket.socket, pipeline: RecordingPipeline) -> None:
        for i in range(3):
            tx.send(b"n.%d:1|c" % i)
            for _ in range(100):
                await asyncio.sleep(0.005)
                if len(pipeline.chunks) > i:
                    break

    pipeline = _run(0.0, body)
    assert pipeline.chunks == [b"n.0:1|c", b"n.1:1|c", b"n.2:1|c"]


def test_sparse_traffic_goes_back_to_waiting_for_readiness() -> None:
    """After a read that found at most one datagram, no timer is left running."""

    async def body(udp: UdpInput, tx: socket.socket, pipeline: RecordingPipeline) -> None:
        tx.send(b"lone:1|c")
        for _ in range(100):
            await asyncio.sleep(0.01)
            if pipeline.chunks:
                break
        await asyncio.sleep(0.05)
        assert udp._next is None
        assert udp._armed

    pipeline = _run(0.02, body)
    assert pipeline.chunks == [b"lone:1|c"]


def test_steady_traffic_is_read_on_a_timer(monkeypatch: Any) -> None:
    """A read that found several datagrams schedules the next read, not readiness."""

    async def body(udp: UdpInput, tx: socket.socket, pipeline: RecordingPipeline) -> None:
        for i in range(4):
            tx.send(b"s.%d:1|c" % i)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if pipeline.chunks:
                break
        assert not udp._armed
        assert isinstance(udp._next, asyncio.TimerHandle)

    pipeline = _run(0.02, body)
    assert len(pipeline.chunks) == 1


def test_a_full_batch_reads_again_at_once(monkeypatch: Any) -> None:
    """Under load (a read filled its batch) the next read is scheduled immediately."""
    monkeypatch.setattr(udp_module, "MAX_DATAGRAMS_PER_WAKEUP", 4)
    monkeypatch.setattr(udp_module, "MODERATE_READ", 1)  # a quarter of the batch
    monkeypatch.setattr(udp_module, "RECV_BATCH", 4)

    async def body(udp: UdpInput, tx: socket.socket, pipeline: RecordingPipeline) -> None:
        for i in range(12):
            tx.send(b"l.%d:1|c" % i)
        for _ in range(50):
            await asyncio.sleep(0.01)
            if sum(chunk.count(b"\n") + 1 for chunk in pipeline.chunks) >= 12:
                break
        # Read before stop() would drain the rest: the delay (0.5 s) was not waited out.
        assert sum(chunk.count(b"\n") + 1 for chunk in pipeline.chunks) == 12

    pipeline = _run(0.5, body)  # were it waiting for the delay, it would not finish in time
    lines = [line for chunk in pipeline.chunks for line in chunk.split(b"\n")]
    assert lines == [b"l.%d:1|c" % i for i in range(12)]
    assert len(pipeline.chunks) == 3


def test_stop_reads_everything_queued() -> None:
    """stop() drains the socket even while a delayed read is pending."""

    async def body(udp: UdpInput, tx: socket.socket, pipeline: RecordingPipeline) -> None:
        for i in range(700):  # more than one batch
            tx.send(b"q.%d:1|c" % i)
        await asyncio.sleep(0.01)
        udp.stop(deadline=float("inf"))
        lines = [line for chunk in pipeline.chunks for line in chunk.split(b"\n")]
        assert lines == [b"q.%d:1|c" % i for i in range(700)]

    _run(5.0, body)


def test_counts_datagrams_and_bytes() -> None:
    """The input counts datagrams and bytes it read; lines are the pipeline's business."""
    seen: list[memoryview] = []

    async def body(udp: UdpInput, tx: socket.socket, pipeline: RecordingPipeline) -> None:
        tx.send(b"a:1|c")
        tx.send(b"bb:1|c")
        for _ in range(100):
            await asyncio.sleep(0.01)
            if pipeline.chunks:
                break
        seen.append(udp._c)

    _run(0.05, body)
    assert seen[0][Stat.DATAGRAMS_IN] == 2
    assert seen[0][Stat.BYTES_IN] == len(b"a:1|c") + len(b"bb:1|c")


def _pair(
    delay: float,
    body: Callable[[list[UdpInput], socket.socket, list[RecordingPipeline]], Any],
) -> list[RecordingPipeline]:
    """Two inputs (workers 0 and 1) on one shared socket, with read roles and a bell."""
    pipelines = [RecordingPipeline(), RecordingPipeline()]

    async def main() -> None:
        bell = ReadBell()
        with _socket_pair() as (rx, tx):
            rows = [memoryview(bytearray(SLOT_WIDTH * 8)).cast("Q") for _ in range(2)]
            inputs = [
                UdpInput(rx, p, rows[i], logging_off(), delay, ReadRole(rows, i, 0, bell))  # type: ignore[arg-type]
                for i, p in enumerate(pipelines)
            ]
            for udp in inputs:
                udp.start()
            try:
                await body(inputs, tx, pipelines)
            finally:
                for udp in inputs:
                    udp.stop(deadline=0.0)
                bell.close()

    asyncio.run(main())
    return pipelines


def _lines(pipelines: list[RecordingPipeline]) -> list[int]:
    return [sum(c.count(b"\n") + 1 for c in p.chunks) for p in pipelines]


async def _steady(tx: socket.socket, count: int, every: float) -> None:
    for i in range(count):
        tx.send(b"p.%d:1|c" % i)
        await asyncio.sleep(every)


def test_steady_traffic_is_read_by_one_worker_while_the_other_stands_by() -> None:
    """Moderate steady traffic: one input claims the read role and reads every datagram
    on its timer; the other stands by (it stops watching the socket) and reads nothing
    once the role is claimed. Nothing is lost and no claim outlives the inputs."""
    rows_seen: list[tuple[bool, bool]] = []

    async def body(inputs: list[UdpInput], tx: socket.socket, ps: list[RecordingPipeline]) -> None:
        await _steady(tx, 150, 0.002)  # ~300 datagrams/s, several per 20 ms read
        await asyncio.sleep(0.1)
        rows_seen.append((inputs[0]._standing_by, inputs[1]._standing_by))
        before = _lines(ps)
        await _steady(tx, 150, 0.002)
        await asyncio.sleep(0.1)
        after = _lines(ps)
        # Once one holds the role, the other reads nothing more.
        assert min(b - a for a, b in zip(before, after, strict=True)) == 0

    pipelines = _pair(0.02, body)
    assert sum(_lines(pipelines)) == 300
    assert sorted(rows_seen[0]) == [False, True]


def test_a_full_read_rings_the_bell_and_every_worker_reads_again(monkeypatch: Any) -> None:
    """Load (a read filled its batch) releases the role and rings: the worker standing by
    goes back to watching the socket and takes its share."""
    monkeypatch.setattr(udp_module, "MAX_DATAGRAMS_PER_WAKEUP", 8)
    monkeypatch.setattr(udp_module, "MODERATE_READ", 6)
    monkeypatch.setattr(udp_module, "RECV_BATCH", 8)
    states: list[tuple[bool, bool]] = []

    async def body(inputs: list[UdpInput], tx: socket.socket, ps: list[RecordingPipeline]) -> None:
        # Two datagrams per read: steady, the role is claimed and the other stands by.
        for _ in range(20):
            tx.send(b"a:1|c")
            await asyncio.sleep(0.008)
        states.append((inputs[0]._standing_by, inputs[1]._standing_by))
        for round_ in range(40):  # a flood: full reads, back to back
            for i in range(50):
                tx.send(b"f.%d.%d:1|c" % (round_, i))
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.2)
        states.append((inputs[0]._standing_by, inputs[1]._standing_by))

    pipelines = _pair(0.02, body)
    assert sorted(states[0]) == [False, True]
    assert states[1] == (False, False)
    assert sum(_lines(pipelines)) == 20 + 40 * 50
    assert min(_lines(pipelines)) > 20  # the one that stood by read part of the flood


def test_a_lapsed_claim_sends_the_worker_standing_by_back(monkeypatch: Any) -> None:
    """A reader that stops without ringing (its claim lapses, or the supervisor clears a
    dead worker's): the worker standing by looks again and reads the socket itself."""
    monkeypatch.setattr(readrole_module, "STANDBY_RECHECK", 0.05)
    monkeypatch.setattr(udp_module, "STANDBY_RECHECK", 0.05)

    async def body(inputs: list[UdpInput], tx: socket.socket, ps: list[RecordingPipeline]) -> None:
        await _steady(tx, 100, 0.002)
        reader = 0 if inputs[1]._standing_by else 1
        assert inputs[1 - reader]._standing_by
        inputs[reader].stop(deadline=0.0)  # stops reading, releases its claim, no bell
        before = _lines(ps)[1 - reader]
        await _steady(tx, 50, 0.004)
        await asyncio.sleep(0.2)
        assert _lines(ps)[1 - reader] - before == 50

    _pair(0.02, body)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def time(self) -> float:
        return self.now


def test_the_wait_shortens_when_the_recent_rate_would_fill_a_moderate_read_sooner() -> None:
    """Between reads a worker waits max_read_delay, unless the rate it has been reading at
    would bring MODERATE_READ datagrams sooner: a lull inside a flood is not a quiet socket."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        counters = memoryview(bytearray(SLOT_WIDTH * 8)).cast("Q")
        udp = UdpInput(rx, RecordingPipeline(), counters, logging_off(), 0.02)  # type: ignore[arg-type]
        clock = _Clock()
        udp._loop = clock  # type: ignore[assignment]
        assert udp._wait() == 0.02  # nothing measured yet
        udp._measure(0)
        for _ in range(10):  # 100,000 datagrams/s over a window
            clock.now += 0.01
            udp._measure(1000)
        assert udp._wait() == pytest.approx(udp_module.MODERATE_READ / 100_000)
        clock.now += 0.5  # then quiet: 10 datagrams in half a second
        udp._measure(10)
        assert udp._wait() == 0.02


def test_a_busy_read_is_followed_by_another_at_once(monkeypatch: Any) -> None:
    """A read finding at least MODERATE_READ datagrams (but not a full batch) does not
    wait for the timer: the next read follows at once."""
    monkeypatch.setattr(udp_module, "MODERATE_READ", 3)

    async def body(udp: UdpInput, tx: socket.socket, pipeline: RecordingPipeline) -> None:
        for i in range(5):
            tx.send(b"b.%d:1|c" % i)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if pipeline.chunks:
                break
        await asyncio.sleep(0.02)
        # The read at once found the socket empty: back to waiting for readiness, where a
        # steady read would have left a 0.5 s timer running.
        assert udp._armed
        assert udp._next is None

    pipeline = _run(0.5, body)
    assert [c.count(b"\n") + 1 for c in pipeline.chunks] == [5]
