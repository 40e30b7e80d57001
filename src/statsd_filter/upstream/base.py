"""What every upstream sender offers the worker, and what the UDP and TCP senders share.

The senders (``udp.py``, ``tcp.py``) build on :class:`SocketUpstream`; which one a
configured upstream gets is decided above them, in ``factory.py``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Protocol

__all__ = ["SocketUpstream", "Upstream", "resolve"]


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

    def probe(self) -> None:
        """Provoke a sign of life from an upstream believed down."""


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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Begin connecting in the background."""
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._connect_forever())

    async def _connect_forever(self) -> None:
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
