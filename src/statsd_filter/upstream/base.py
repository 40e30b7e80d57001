"""What every upstream sender offers the worker, and what the UDP and TCP senders share.

The senders (``udp.py``, ``tcp.py``) build on :class:`SocketUpstream`; which one a
configured upstream gets is decided above them, in ``factory.py``.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
from collections.abc import Callable
from typing import Protocol

__all__ = ["SocketUpstream", "SocketWatch", "Upstream", "resolve"]


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
