"""The admin HTTP endpoint: a tiny HTTP/1.1 server on asyncio streams.

One request per connection, ``Connection: close``, request head capped at
16 KiB and 5 s, so a slow or hostile client cannot tie it up. A route is a
function of the :class:`Request` (method, path, query parameters) returning a
:class:`Response`; the server knows nothing of what the routes serve. It runs
in the supervisor.

A response may *stream* (``/tap``): after the headers (no Content-Length; the
body ends when the connection closes) the server writes each chunk the
response's async iterator yields. Each write must drain within
:data:`STREAM_WRITE_TIMEOUT`, so a client that stops reading is closed rather
than held, and the connection is ended as soon as the client hangs up (its
end of the socket is watched while the stream runs), so whatever the stream
holds (a watcher slot) is given back at once. :meth:`AdminServer.close` ends
every stream still open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

__all__ = ["ALLOWED_METHODS", "AdminServer", "Request", "Response", "start_admin"]

MAX_REQUEST_HEAD = 16 * 1024  # a scrape request is a few hundred bytes
REQUEST_TIMEOUT = 5.0
# A streaming client has this long to take each chunk before it is dropped.
STREAM_WRITE_TIMEOUT = 10.0
# A burst of scrapers (a fleet's Prometheus shards, a health checker per node)
# must not wait for SYN retransmits: asyncio's default backlog is 100.
BACKLOG = 4096
# The only methods served; a 405 names them in its Allow header (RFC 9110, 15.5.6).
ALLOWED_METHODS = ("GET", "HEAD")


@dataclass(frozen=True)
class Request:
    """What a route is asked: method, path, and query parameters (first value of each)."""

    method: str = "GET"
    path: str = "/"
    query: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Response:
    """An HTTP response: status, content type, body, any extra headers, and
    optionally a stream after the body."""

    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    stream: Callable[[], AsyncGenerator[bytes, None]] | None = field(default=None, compare=False)

    @classmethod
    def json(cls, status: int, payload: object) -> Response:
        return cls(status, "application/json", json.dumps(payload, indent=2).encode() + b"\n")

    @classmethod
    def text(
        cls, status: int, text: str, content_type: str = "text/plain; charset=utf-8"
    ) -> Response:
        return cls(status, content_type, text.encode())


Route = Callable[[Request], Response]
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


class AdminServer:
    """A running admin endpoint; ``address`` is the bound (host, port)."""

    def __init__(
        self, server: asyncio.Server, sock: socket.socket, streams: set[asyncio.Task[None]]
    ) -> None:
        self._server = server
        self._streams = streams
        self.socket = sock
        self.address: tuple[str, int] = sock.getsockname()[:2]

    @property
    def streaming(self) -> int:
        """Responses streaming right now."""
        return len(self._streams)

    async def close(self) -> None:
        self._server.close()
        for task in list(self._streams):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)


async def start_admin(sock: socket.socket, routes: dict[str, Route]) -> AdminServer:
    """Serve ``routes`` (path -> handler) on an already bound listening socket."""
    streams: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            response, method = _dispatch(head, routes)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            response, method = Response.text(400, "bad request\n"), "GET"
        except Exception as exc:  # a bug in a route must not kill the endpoint
            response, method = Response.text(503, f"error: {exc}\n"), "GET"
        status_line = f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Error')}\r\n"
        headers = f"Content-Type: {response.content_type}\r\n"
        headers += "".join(f"{name}: {value}\r\n" for name, value in response.headers)
        if response.stream is None:
            headers += f"Content-Length: {len(response.body)}\r\n"
        writer.write((status_line + headers + "Connection: close\r\n\r\n").encode())
        if method != "HEAD":
            writer.write(response.body)
            if response.stream is not None:
                await _stream(response.stream, reader, writer, streams)
        with contextlib.suppress(Exception):
            await writer.drain()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    server = await asyncio.start_server(handle, sock=sock, limit=MAX_REQUEST_HEAD, backlog=BACKLOG)
    return AdminServer(server, sock, streams)


async def _stream(
    body: Callable[[], AsyncGenerator[bytes, None]],
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    streams: set[asyncio.Task[None]],
) -> None:
    """Write ``body``'s chunks until it ends, the client leaves, or the server closes."""
    task = asyncio.current_task()
    assert task is not None
    streams.add(task)

    async def hang_up() -> None:
        # Whatever the client sends now is discarded; its EOF (or an error) ends the stream.
        with contextlib.suppress(Exception):
            taken = 0
            while taken <= MAX_REQUEST_HEAD:
                data = await reader.read(4096)
                if not data:
                    break
                taken += len(data)
        task.cancel()

    watch = asyncio.ensure_future(hang_up())
    chunks = body()
    try:
        await asyncio.wait_for(writer.drain(), STREAM_WRITE_TIMEOUT)
        async for chunk in chunks:
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), STREAM_WRITE_TIMEOUT)
    except (asyncio.CancelledError, OSError, TimeoutError):
        # The client left or stopped reading, or the server is closing: the
        # stream simply ends (this task is the connection's; nothing waits on it).
        pass
    finally:
        streams.discard(task)
        watch.cancel()
        writer.transport.abort()
        # Runs the stream's own clean-up (a watcher gives back its slot).
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await chunks.aclose()


def _dispatch(head: bytes, routes: dict[str, Route]) -> tuple[Response, str]:
    request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError(request_line)
    method, (path, _, query) = parts[0], parts[1].partition("?")
    if method not in ALLOWED_METHODS:
        allow = ", ".join(ALLOWED_METHODS)
        body = b"only GET and HEAD\n"
        return Response(405, "text/plain; charset=utf-8", body, (("Allow", allow),)), method
    # "/healthz/" is "/healthz": probes and scrapers are configured by hand.
    route = routes.get(path) or routes.get(path.rstrip("/") or "/")
    if route is None:
        known = "".join(f"{known}\n" for known in sorted(routes))
        return Response.text(404, f"not found; try:\n{known}"), method
    params: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        params.setdefault(key, value)
    return route(Request(method, path, params)), method
