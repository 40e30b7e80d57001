"""Unit tests for statsd_filter.supervisor.admin: the tiny admin HTTP server, over loopback."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncGenerator, Awaitable, Callable

import pytest

from statsd_filter.supervisor import admin as admin_module
from statsd_filter.supervisor.admin import AdminServer, Request, Response, Route, start_admin

TIMEOUT = 5.0  # bound on every client read; the server answers in milliseconds


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def boom(_request: Request) -> Response:
    raise RuntimeError("route exploded")


ROUTES: dict[str, Route] = {
    "/healthz": lambda _r: Response.json(200, {"status": "ok"}),
    "/metrics": lambda _r: Response(200, "text/plain; version=0.0.4", b"lines_total 3\n"),
    "/down": lambda _r: Response.text(503, "draining\n"),
    "/boom": boom,
    "/teapot": lambda _r: Response.text(418, "short and stout\n"),
}


def serve(
    scenario: Callable[[AdminServer], Awaitable[None]], routes: dict[str, Route] | None = None
) -> None:
    """Run ``scenario`` against an admin server on 127.0.0.1:0; always close both."""

    async def main() -> None:
        sock = listening_socket()
        try:
            server = await start_admin(sock, ROUTES if routes is None else routes)
            try:
                await scenario(server)
            finally:
                await server.close()
        finally:
            sock.close()

    asyncio.run(main())


async def exchange(address: tuple[str, int], request: bytes) -> bytes:
    """Send raw bytes, then read the whole reply until the server closes."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
        client.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(client, address), TIMEOUT)
        await asyncio.wait_for(loop.sock_sendall(client, request), TIMEOUT)
        reply = b""
        while True:
            try:
                data = await asyncio.wait_for(loop.sock_recv(client, 65536), TIMEOUT)
            except ConnectionResetError:
                break
            if not data:
                return reply
            reply += data
        return reply


def parse(reply: bytes) -> tuple[int, dict[str, str], bytes]:
    head, sep, body = reply.partition(b"\r\n\r\n")
    assert sep, reply
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    version, status, _reason = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(": ")
        headers[name.lower()] = value
    return int(status), headers, body


async def get(address: tuple[str, int], path: str, method: str = "GET") -> bytes:
    return await exchange(address, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def test_get_returns_status_type_body_and_closes() -> None:
    """GET answers the route's status, Content-Type and body, its length, and Connection: close."""

    async def scenario(server: AdminServer) -> None:
        reply = await get(server.address, "/metrics")
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
        status, headers, body = parse(reply)
        assert status == 200
        assert headers["content-type"] == "text/plain; version=0.0.4"
        assert headers["connection"] == "close"
        assert headers["content-length"] == str(len(body))
        assert body == b"lines_total 3\n"

    serve(scenario)


def test_json_route_and_route_status() -> None:
    """A JSON route is served as application/json, and a route's own status (503) is kept."""

    async def scenario(server: AdminServer) -> None:
        status, headers, body = parse(await get(server.address, "/healthz"))
        assert (status, headers["content-type"]) == (200, "application/json")
        assert body == b'{\n  "status": "ok"\n}\n'
        reply = await get(server.address, "/down")
        assert reply.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert parse(reply)[2] == b"draining\n"
        # A status without a known reason phrase still gets a well-formed status line.
        assert (await get(server.address, "/teapot")).startswith(b"HTTP/1.1 418 Error\r\n")

    serve(scenario)


def test_query_string_is_ignored_for_routing() -> None:
    """GET /metrics?x=1 is served by the /metrics route."""

    async def scenario(server: AdminServer) -> None:
        status, _, body = parse(await get(server.address, "/metrics?name[]=a&b=c"))
        assert (status, body) == (200, b"lines_total 3\n")

    serve(scenario)


def test_trailing_slash_is_the_same_route() -> None:
    """/healthz/ and /metrics/ (with a query) are served like /healthz and /metrics."""

    async def scenario(server: AdminServer) -> None:
        status, headers, _ = parse(await get(server.address, "/healthz/"))
        assert (status, headers["content-type"]) == (200, "application/json")
        status, _, body = parse(await get(server.address, "/metrics/?x=1"))
        assert (status, body) == (200, b"lines_total 3\n")
        # Only a trailing slash: "/healthzz" and "/metrics/x" are still unknown.
        assert parse(await get(server.address, "/healthzz"))[0] == 404
        assert parse(await get(server.address, "/metrics/x"))[0] == 404

    serve(scenario)


def test_head_returns_headers_without_body() -> None:
    """HEAD answers the GET headers (Content-Length of the body) but sends no body."""

    async def scenario(server: AdminServer) -> None:
        reply = await get(server.address, "/metrics", method="HEAD")
        status, headers, body = parse(reply)
        assert status == 200
        assert headers["content-length"] == str(len(b"lines_total 3\n"))
        assert headers["connection"] == "close"
        assert body == b""

    serve(scenario)


def test_unknown_path_is_404_listing_routes() -> None:
    """An unknown path gets 404 and a body naming every route, sorted."""

    async def scenario(server: AdminServer) -> None:
        reply = await get(server.address, "/nope")
        assert reply.startswith(b"HTTP/1.1 404 Not Found\r\n")
        _, headers, body = parse(reply)
        assert headers["content-type"] == "text/plain; charset=utf-8"
        assert body == b"not found; try:\n/boom\n/down\n/healthz\n/metrics\n/teapot\n"

    serve(scenario)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "get"])
def test_other_methods_get_405(method: str) -> None:
    """Any method but GET and HEAD (case-sensitive) gets 405 with an Allow header naming
    both, even on a known route."""

    async def scenario(server: AdminServer) -> None:
        reply = await exchange(
            server.address,
            f"{method} /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n".encode(),
        )
        assert reply.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
        _, headers, body = parse(reply)
        assert headers["allow"] == "GET, HEAD"
        assert headers["content-length"] == str(len(body))
        assert body == b"only GET and HEAD\n"

    serve(scenario)


@pytest.mark.parametrize(
    "request_line",
    [
        b"GARBAGE",
        b"GET /healthz",
        b"GET /healthz FTP/1.0",
        b"GET  /healthz HTTP/1.1",
        b"GET /a b HTTP/1.1",
        b"",
    ],
)
def test_malformed_request_line_is_400(request_line: bytes) -> None:
    """A request line that is not METHOD SP TARGET SP HTTP/x gets 400 Bad Request."""

    async def scenario(server: AdminServer) -> None:
        reply = await exchange(server.address, request_line + b"\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert parse(reply)[2] == b"bad request\n"

    serve(scenario)


def test_oversize_request_head_is_refused_without_hanging() -> None:
    """A request head over MAX_REQUEST_HEAD gets 400 (or a reset) promptly, not a hang."""

    async def scenario(server: AdminServer) -> None:
        started = time.monotonic()
        filler = b"X-Filler: " + b"a" * (admin_module.MAX_REQUEST_HEAD + 1024) + b"\r\n"
        reply = await exchange(server.address, b"GET /healthz HTTP/1.1\r\n" + filler + b"\r\n")
        assert time.monotonic() - started < admin_module.REQUEST_TIMEOUT
        assert reply == b"" or reply.startswith(b"HTTP/1.1 400 Bad Request\r\n"), reply[:80]
        assert b"status" not in reply  # the route was never served
        # The server is still serving.
        assert parse(await get(server.address, "/metrics"))[0] == 200

    serve(scenario)


def test_slow_request_times_out_with_400(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that never finishes its head gets 400 after REQUEST_TIMEOUT, not a held slot."""
    monkeypatch.setattr(admin_module, "REQUEST_TIMEOUT", 0.2)

    async def scenario(server: AdminServer) -> None:
        started = time.monotonic()
        reply = await exchange(server.address, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        elapsed = time.monotonic() - started
        assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert 0.15 <= elapsed < TIMEOUT

    serve(scenario)


def test_client_closing_early_does_not_stop_the_server() -> None:
    """A client that sends half a head and hangs up is dropped; the next request is served."""

    async def scenario(server: AdminServer) -> None:
        with socket.create_connection(server.address, timeout=TIMEOUT) as client:
            client.sendall(b"GET /hea")
        assert parse(await get(server.address, "/healthz"))[0] == 200

    serve(scenario)


def test_failing_route_is_503_and_server_keeps_serving() -> None:
    """A route that raises gets 503 naming the error; later requests are served normally."""

    async def scenario(server: AdminServer) -> None:
        reply = await get(server.address, "/boom")
        assert reply.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert parse(reply)[2] == b"error: route exploded\n"
        for _ in range(3):
            assert parse(await get(server.address, "/metrics"))[2] == b"lines_total 3\n"

    serve(scenario)


def test_concurrent_clients_are_all_served() -> None:
    """Several connections at once each get their own complete answer."""

    async def scenario(server: AdminServer) -> None:
        paths = ["/healthz", "/metrics", "/nope", "/down"] * 5
        replies = await asyncio.gather(*(get(server.address, path) for path in paths))
        statuses = [parse(reply)[0] for reply in replies]
        assert statuses == [200, 200, 404, 503] * 5

    serve(scenario)


def test_address_and_close() -> None:
    """address is the bound (host, port); after close() new connections are refused."""

    async def main() -> None:
        sock = listening_socket()
        try:
            server = await start_admin(sock, ROUTES)
            assert server.address == sock.getsockname()
            assert server.address[0] == "127.0.0.1"
            assert server.address[1] > 0
            assert server.socket is sock
            assert parse(await get(server.address, "/healthz"))[0] == 200
            await server.close()
            with pytest.raises(ConnectionRefusedError):
                await get(server.address, "/healthz")
        finally:
            sock.close()

    asyncio.run(main())


def test_response_helpers() -> None:
    """Response.json indents and ends with a newline; Response.text encodes with its type."""
    assert Response.json(200, {"a": [1]}) == Response(
        200, "application/json", b'{\n  "a": [\n    1\n  ]\n}\n'
    )
    assert Response.text(404, "n\u00e9") == Response(404, "text/plain; charset=utf-8", b"n\xc3\xa9")
    assert Response.text(200, "x", "text/csv").content_type == "text/csv"


def test_query_parameters_reach_the_route() -> None:
    """A route sees its path and the first value of each (decoded) query parameter."""
    seen: list[Request] = []

    def echo(request: Request) -> Response:
        seen.append(request)
        return Response.text(200, "ok\n")

    async def scenario(server: AdminServer) -> None:
        await get(server.address, "/echo?match=api.%2A&verdict=blocked&match=x&flag")
        await get(server.address, "/echo", method="HEAD")

    serve(scenario, {"/echo": echo})
    assert seen == [
        Request("GET", "/echo", {"match": "api.*", "verdict": "blocked", "flag": ""}),
        Request("HEAD", "/echo", {}),
    ]


class Streamer:
    """A streaming route whose body yields chunks on demand and records its life."""

    def __init__(self) -> None:
        self.started = 0
        self.finished = 0
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue()

    def route(self, _request: Request) -> Response:
        return Response(
            200, "application/x-ndjson", b"{}\n", stream=self.body, headers=(("X-A", "b"),)
        )

    async def body(self) -> AsyncGenerator[bytes, None]:
        self.started += 1
        try:
            while (chunk := await self.chunks.get()) is not None:
                yield chunk
        finally:
            self.finished += 1


async def open_stream(address: tuple[str, int], path: str = "/s") -> socket.socket:
    loop = asyncio.get_running_loop()
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setblocking(False)
    await asyncio.wait_for(loop.sock_connect(client, address), TIMEOUT)
    await loop.sock_sendall(client, f"GET {path} HTTP/1.1\r\n\r\n".encode())
    return client


async def read_until(client: socket.socket, marker: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    while marker not in data:
        more = await asyncio.wait_for(loop.sock_recv(client, 65536), TIMEOUT)
        if not more:
            break
        data += more
    return data


async def wait_for(predicate: Callable[[], bool]) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached within 5 s")


def test_streaming_response_writes_chunks_without_length() -> None:
    """A stream sends headers without Content-Length, the body, then each chunk as it comes;
    the end of the stream closes the connection."""
    streamer = Streamer()

    async def scenario(server: AdminServer) -> None:
        client = await open_stream(server.address)
        with client:
            head = await read_until(client, b"{}\n")
            status, headers, body = parse(head)
            assert (status, body) == (200, b"{}\n")
            assert "content-length" not in headers
            assert headers["x-a"] == "b"
            assert server.streaming == 1
            await streamer.chunks.put(b"one\n")
            assert (await read_until(client, b"one\n")).endswith(b"one\n")
            await streamer.chunks.put(b"two\n")
            assert await read_until(client, b"two\n") == b"two\n"
            await streamer.chunks.put(None)
            assert await read_until(client, b"never") == b""  # closed
        await wait_for(lambda: server.streaming == 0)
        assert streamer.finished == 1

    serve(scenario, {"/s": streamer.route})


def test_client_hanging_up_ends_the_stream_at_once() -> None:
    """When the client closes, the stream's clean-up runs without waiting for a chunk."""
    streamer = Streamer()

    async def scenario(server: AdminServer) -> None:
        client = await open_stream(server.address)
        await read_until(client, b"{}\n")
        client.close()
        await wait_for(lambda: streamer.finished == 1)
        assert server.streaming == 0

    serve(scenario, {"/s": streamer.route})


def test_head_of_a_stream_never_starts_it_and_close_ends_streams() -> None:
    """HEAD gets the headers only (the body is never started); close() ends open streams."""
    streamer = Streamer()

    async def scenario(server: AdminServer) -> None:
        reply = await get(server.address, "/s", method="HEAD")
        assert parse(reply)[:2][0] == 200
        assert streamer.started == 0
        clients = [await open_stream(server.address) for _ in range(3)]
        try:
            for client in clients:
                await read_until(client, b"{}\n")
            await wait_for(lambda: streamer.started == 3)
            await server.close()
            await wait_for(lambda: streamer.finished == 3)
            for client in clients:
                assert await read_until(client, b"never") == b""
        finally:
            for client in clients:
                client.close()

    serve(scenario, {"/s": streamer.route})


def test_a_client_that_stops_reading_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream whose client reads nothing is dropped after STREAM_WRITE_TIMEOUT."""
    monkeypatch.setattr(admin_module, "STREAM_WRITE_TIMEOUT", 0.2)
    streamer = Streamer()

    async def scenario(server: AdminServer) -> None:
        client = await open_stream(server.address)
        with client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            for _ in range(200):  # far more than both socket buffers hold
                await streamer.chunks.put(b"x" * 65536)
            await wait_for(lambda: streamer.finished == 1)

    serve(scenario, {"/s": streamer.route})
