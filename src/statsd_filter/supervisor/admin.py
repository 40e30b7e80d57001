"""The admin HTTP endpoint: ``GET /healthz``, ``GET /limits`` (JSON), ``GET /metrics``.

A deliberately tiny HTTP/1.1 server on asyncio streams: one request per
connection, ``Connection: close``, request head capped at 16 KiB and 5 s, so a
slow or hostile scraper cannot tie it up. It runs in the supervisor and reads
the workers' counters from shared memory; it never talks to the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ALLOWED_METHODS", "AdminServer", "Response", "start_admin"]

MAX_REQUEST_HEAD = 16 * 1024  # a scrape request is a few hundred bytes
REQUEST_TIMEOUT = 5.0
# A burst of scrapers (a fleet's Prometheus shards, a health checker per node)
# must not wait for SYN retransmits: asyncio's default backlog is 100.
BACKLOG = 4096


# The only methods served; a 405 names them in its Allow header (RFC 9110, 15.5.6).
ALLOWED_METHODS = ("GET", "HEAD")


@dataclass(frozen=True)
class Response:
    """An HTTP response: status, content type, body, and any extra headers."""

    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: int, payload: object) -> Response:
        return cls(status, "application/json", json.dumps(payload, indent=2).encode() + b"\n")

    @classmethod
    def text(
        cls, status: int, text: str, content_type: str = "text/plain; charset=utf-8"
    ) -> Response:
        return cls(status, content_type, text.encode())


Route = Callable[[], Response]
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


class AdminServer:
    """A running admin endpoint; ``address`` is the bound (host, port)."""

    def __init__(self, server: asyncio.Server, sock: socket.socket) -> None:
        self._server = server
        self.socket = sock
        self.address: tuple[str, int] = sock.getsockname()[:2]

    async def close(self) -> None:
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)


async def start_admin(sock: socket.socket, routes: dict[str, Route]) -> AdminServer:
    """Serve ``routes`` (path -> handler) on an already bound listening socket."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            response, method = _dispatch(head, routes)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            response, method = Response.text(400, "bad request\n"), "GET"
        except Exception as exc:  # a bug in a route must not kill the endpoint
            response, method = Response.text(503, f"error: {exc}\n"), "GET"
        status_line = f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Error')}\r\n"
        extra = "".join(f"{name}: {value}\r\n" for name, value in response.headers)
        headers = (
            f"Content-Type: {response.content_type}\r\n{extra}"
            f"Content-Length: {len(response.body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write((status_line + headers).encode())
        if method != "HEAD":
            writer.write(response.body)
        with contextlib.suppress(Exception):
            await writer.drain()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    server = await asyncio.start_server(handle, sock=sock, limit=MAX_REQUEST_HEAD, backlog=BACKLOG)
    return AdminServer(server, sock)


def _dispatch(head: bytes, routes: dict[str, Route]) -> tuple[Response, str]:
    request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError(request_line)
    method, target = parts[0], parts[1].split("?", 1)[0]
    if method not in ALLOWED_METHODS:
        allow = ", ".join(ALLOWED_METHODS)
        body = b"only GET and HEAD\n"
        return Response(405, "text/plain; charset=utf-8", body, (("Allow", allow),)), method
    # "/healthz/" is "/healthz": probes and scrapers are configured by hand.
    route = routes.get(target) or routes.get(target.rstrip("/") or "/")
    if route is None:
        known = "".join(f"{path}\n" for path in sorted(routes))
        return Response.text(404, f"not found; try:\n{known}"), method
    return route(), method
