"""The UDP input's three regimes: readiness when sparse, a timer when steady, back to back
under load; and a stop that reads everything queued."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from statsd_filter.stats import SLOT_WIDTH, Stat
from statsd_filter.worker import udp as udp_module
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


def _run(
    delay: float, body: Callable[[UdpInput, socket.socket, RecordingPipeline], Any]
) -> RecordingPipeline:
    pipeline = RecordingPipeline()

    async def main() -> None:
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
        ):
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)  # holds 700 datagrams
            rx.bind(("127.0.0.1", 0))
            rx.setblocking(False)
            tx.connect(rx.getsockname())
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
    monkeypatch.setattr(udp_module, "RECV_BATCH", 4)

    async def body(udp: UdpInput, tx: socket.socket, pipeline: RecordingPipeline) -> None:
        for i in range(12):
            tx.send(b"l.%d:1|c" % i)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if sum(chunk.count(b"\n") + 1 for chunk in pipeline.chunks) >= 12:
                break

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
