"""What every upstream sender offers the worker, and what the UDP and TCP senders share.

The senders (``udp.py``, ``tcp.py``) build on :class:`SocketUpstream`; which one a
configured upstream gets is decided above them, in ``factory.py``.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
from collections import deque
from collections.abc import Callable
from typing import Protocol

from statsd_filter.stats import Stat

__all__ = ["PayloadQueue", "SocketUpstream", "SocketWatch", "Upstream", "resolve"]


class Upstream(Protocol):
    """A destination for batched lines."""

    def send_batch(self, payloads: list[bytes], lines: list[int]) -> None:
        """Deliver payloads (lines joined by ``\\n``, no trailing newline), in order.

        ``lines[i]`` counts the lines of ``payloads[i]``. Never blocks.
        """

    async def start(self) -> None:
        """Begin connecting in the background; never fails because the upstream is down."""

    async def drain(self, timeout: float) -> None:
        """Deliver what is buffered, waiting at most ``timeout`` seconds, then close."""

    def healthy_since(self, since: float) -> bool:
        """Whether the upstream looked healthy since ``since`` (time.monotonic)."""

    def probe(self, *, force: bool = False) -> None:
        """Provoke a sign of life (or of death) from the upstream.

        Unless ``force``, a sender may skip it when its own traffic since the
        last probe tells as much.
        """


class SocketWatch:
    """Readiness of one socket (readable, writable, or in error), through a private epoll.

    An event loop built on libuv (uvloop) stops watching a descriptor for good
    the first time it reports an error condition (``EPOLLERR``: an ICMP refusal
    queued on a UDP socket, a TCP reset), without calling its reader or writer.
    A sender must hear about exactly those conditions, so the socket is
    registered in an epoll of its own, and the loop watches that epoll's
    descriptor, which only ever becomes readable. Errors reach ``on_readable``,
    whose reads (``recv``, ``recvmsg(MSG_ERRQUEUE)``) clear them.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_readable: Callable[[], None],
        on_writable: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._fd = sock.fileno()
        self._on_readable = on_readable
        self._on_writable = on_writable
        self._epoll = select.epoll()
        self._writing = False
        self._epoll.register(self._fd, _READ_EVENTS)
        loop.add_reader(self._epoll.fileno(), self._on_event)

    def want_write(self, on: bool) -> None:
        """Be told (or stop being told) when the socket can take more bytes."""
        if on != self._writing and self._epoll.fileno() >= 0:
            self._writing = on
            self._epoll.modify(self._fd, _READ_EVENTS | (select.EPOLLOUT if on else 0))

    def _on_event(self) -> None:
        for _, events in self._epoll.poll(0):
            if events & _READ_EVENTS:
                self._on_readable()
            if events & select.EPOLLOUT and self._writing:
                self._on_writable()

    def close(self) -> None:
        """Stop watching (before the socket is closed)."""
        if self._epoll.fileno() >= 0:
            self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()


_READ_EVENTS = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP | select.EPOLLRDHUP


class PayloadQueue:
    """Datagram payloads waiting for a sender, bounded in bytes: the oldest go first.

    A sender queues what its socket cannot take yet (a name not resolved, a
    full socket buffer, a receiver not there); past ``limit`` bytes the oldest
    payloads are dropped and their lines counted as ``queue_full``, since the
    newest data is the most useful to a metrics system. The one payload left
    is always kept, however large.
    """

    __slots__ = ("_c", "_items", "_limit", "size")

    def __init__(self, counters: memoryview, limit: int) -> None:
        self._c = counters
        self._limit = limit
        self._items: deque[tuple[bytes, int]] = deque()
        self.size = 0  # bytes held

    def __bool__(self) -> bool:
        return bool(self._items)

    def push(self, payload: bytes, lines: int, *, front: bool = False) -> None:
        """Queue a payload (at the back, or at the front to be sent next)."""
        if front:
            self._items.appendleft((payload, lines))
        else:
            self._items.append((payload, lines))
        self.size += len(payload)
        items = self._items
        while self.size > self._limit and len(items) > 1:
            old, old_lines = items.popleft()
            self.size -= len(old)
            self._c[Stat.DROPPED_QUEUE_FULL] += old_lines
        self._c[Stat.UPSTREAM_BUFFERED_BYTES] = self.size

    def pop(self) -> tuple[bytes, int]:
        """The oldest payload and its line count."""
        payload, lines = self._items.popleft()
        self.size -= len(payload)
        self._c[Stat.UPSTREAM_BUFFERED_BYTES] = self.size
        return payload, lines

    def take_all(self) -> tuple[list[bytes], list[int]]:
        """Everything queued, oldest first, leaving the queue empty."""
        payloads = [payload for payload, _ in self._items]
        lines = [count for _, count in self._items]
        self.clear()
        return payloads, lines

    def clear(self) -> int:
        """Forget everything queued; returns how many lines that was."""
        lost = sum(lines for _, lines in self._items)
        self._items.clear()
        self.size = 0
        self._c[Stat.UPSTREAM_BUFFERED_BYTES] = 0
        return lost


class SocketUpstream:
    """What the UDP and TCP senders share: where to send, counters, a socket."""

    def __init__(
        self,
        host: str,
        port: int,
        counters: memoryview,
        buffer_bytes: int,
        log: logging.Logger,
    ) -> None:
        self._host = host
        self._port = port
        self._c = counters  # this upstream's row of shared counters
        self._limit = buffer_bytes  # bound of what waits for the upstream
        self._log = log
        self._sock: socket.socket | None = None
        self._watch: SocketWatch | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Begin connecting in the background."""
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._connect_forever())

    async def _connect_forever(self) -> None:
        raise NotImplementedError

    def _want_write(self, on: bool) -> None:
        if self._watch is not None:
            self._watch.want_write(on)

    def _close_socket(self) -> None:
        """Stop watching and close the socket (if any)."""
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _on_readable(self) -> None:
        raise NotImplementedError

    def _on_writable(self) -> None:
        raise NotImplementedError


async def resolve(
    host: str, port: int, kind: socket.SocketKind
) -> tuple[socket.AddressFamily, tuple[str, int] | tuple[str, int, int, int]]:
    """getaddrinfo for an upstream; returns the first (family, address)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=kind)
    if not infos:
        raise OSError(f"no address for {host}:{port}")
    family, _, _, _, address = infos[0]
    return family, address  # type: ignore[return-value]
