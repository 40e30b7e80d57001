"""Unit tests for worker/control.py and protocol/messages.py: the worker's side of the channel."""

from __future__ import annotations

import asyncio
import socket

from statsd_filter.protocol.frames import FrameDecoder
from statsd_filter.protocol.messages import (
    ReloadAck,
    TapFilter,
    TapLines,
    TapWanted,
    TopReport,
    decode_message,
    encode_message,
)
from statsd_filter.worker.control import ControlChannel


def test_messages_round_trip() -> None:
    """Every message kind survives encode/decode unchanged."""
    messages: list[object] = [
        ReloadAck(3, ok=False, error="bad"),
        TopReport(1, 1.0, 40, 12, {b"a": (1.0, 2.0, 1.0, 2.0, 0.0, 0.0, 1, 8, {"": 1.0}, 1.0)}),
        TapWanted(2, (TapFilter("api.*", None), TapFilter(None, "blocked"))),
        TapLines(0, 2, ((b"a:1|c", "forwarded", "", b""),), skipped=4),
    ]
    for message in messages:
        assert decode_message(encode_message(message)) == message


def test_frames_arrive_whole_and_in_order_and_droppable_ones_yield() -> None:
    """With the socket full, reports are dropped, acks are queued, and all arrive in order."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        worker_end, supervisor_end = socket.socketpair()
        with worker_end, supervisor_end:
            worker_end.setblocking(False)
            worker_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            channel = ControlChannel(worker_end, loop)
            big = b"x" * 200_000  # more than the socket takes at once
            assert channel.send(b"first" + big, droppable=True)
            assert not channel.send(b"report", droppable=True)  # something is pending
            assert channel.send(b"ack")  # never dropped
            assert channel.dropped == 1
            decoder = FrameDecoder()
            frames: list[bytes] = []
            supervisor_end.setblocking(False)
            for _ in range(2000):
                try:
                    frames += decoder.feed(supervisor_end.recv(65536))
                except BlockingIOError:
                    await asyncio.sleep(0.001)
                if len(frames) == 2:
                    break
            assert frames == [b"first" + big, b"ack"]
            for _ in range(100):  # the writer is unregistered once everything went
                if channel.send(b"later", droppable=True):
                    break
                await asyncio.sleep(0.001)
            assert decoder.feed(supervisor_end.recv(65536)) == [b"later"]

    asyncio.run(main())


def test_closed_peer_drops_everything_quietly() -> None:
    """Once the supervisor's end is gone, sends fail without raising."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        worker_end, supervisor_end = socket.socketpair()
        with worker_end:
            worker_end.setblocking(False)
            supervisor_end.close()
            channel = ControlChannel(worker_end, loop)
            channel.send(b"ack")
            assert channel.closed
            assert not channel.send(b"ack")

    asyncio.run(main())
