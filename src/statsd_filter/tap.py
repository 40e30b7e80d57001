"""``statsd-filter tap``: a tiny StatsD sink that prints every line it receives.

For trying the proxy without a StatsD server: point ``--target-port`` at a tap
and watch which lines make it through. Lines are printed as received (bytes that
are not UTF-8 are shown escaped), one per output line, flushed immediately.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys

from statsd_filter.protocol.lines import LineFramer, split_lines

__all__ = ["run_tap"]

MAX_LINE = 1 << 20


def _emit(chunk: bytes) -> None:
    for line in split_lines(chunk):
        sys.stdout.write(line.decode("utf-8", "backslashreplace") + "\n")
    sys.stdout.flush()


class _UdpTap(asyncio.DatagramProtocol):
    def datagram_received(self, data: bytes, _addr: object) -> None:
        _emit(data)


class _TcpTap(asyncio.Protocol):
    def __init__(self) -> None:
        self._framer = LineFramer(MAX_LINE)

    def data_received(self, data: bytes) -> None:
        chunk, _ = self._framer.feed(data)
        _emit(chunk)

    def eof_received(self) -> bool:
        _emit(self._framer.close())
        return False


async def _serve(host: str, port: int, protocols: tuple[str, ...]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    closers = []
    if "udp" in protocols:
        # Every address the name resolves to ("localhost": 127.0.0.1 and ::1), so
        # the proxy's default upstream "localhost" reaches the tap whichever
        # address family its resolver prefers.
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        for family, _, _, _, address in dict.fromkeys(infos):
            transport, _ = await loop.create_datagram_endpoint(
                _UdpTap, local_addr=(str(address[0]), port), family=family
            )
            port = transport.get_extra_info("sockname")[1]
            closers.append(transport.close)
    if "tcp" in protocols:
        server = await loop.create_server(_TcpTap, host, port)
        port = server.sockets[0].getsockname()[1]
        closers.append(server.close)
    print(f"# tap listening on {'+'.join(protocols)} {host}:{port}", file=sys.stderr, flush=True)
    await stop.wait()
    for close in closers:
        close()


def run_tap(host: str, port: int, protocols: tuple[str, ...]) -> int:
    """Print lines arriving on ``host:port`` until interrupted."""
    try:
        asyncio.run(_serve(host, port, protocols))
    except OSError as exc:
        print(
            f"statsd-filter tap: cannot listen on {host}:{port}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    return 0
