"""Sink: the upstream StatsD server of the benchmark, in its own forked process.

During the load it does as little as possible: it reads (a non-blocking UDP
socket drained in a loop, or every TCP connection through ``selectors``) and
keeps each read with its ``time.monotonic_ns()`` receive time. Only after the
generator is done and the input has been quiet for a moment does it check every
line (see :class:`workload.LineCheck`), so checking costs no CPU while the proxy
is being measured. Over TCP the reads of each connection are reassembled into
lines first, and an unterminated last line counts as corrupt.

The receive buffer is made large (SO_RCVBUFFORCE, as root) so that the sink is
not where lines are lost; the kernel's drop count for the sink socket is
reported anyway, so if it ever is, the report says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import select
import selectors
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workload import DEFAULT_BLOCKLIST, LineCheck, Traffic

__all__ = ["Sink", "SinkSpec"]

UDP_RECV_SIZE = 65535  # the largest datagram: never truncate one
TCP_RECV_SIZE = 1 << 20
POLL_SECONDS = 0.02  # how long to wait for data before checking the control pipe
# Percentiles reported for latency samples.
# How long checking may take (2M lines take a few seconds), and how long the sink
# keeps its sockets open waiting for the parent once its input went quiet.
VERIFY_WAIT = 120.0
PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p999", 0.999))


@dataclass(frozen=True)
class SinkSpec:
    """How to receive and for how long."""

    protocol: str  # "udp" or "tcp"
    total_lines: int
    quiet_seconds: float = 0.5  # after the generator is done, stop once idle this long
    max_seconds: float = 120.0  # hard limit on the whole receive phase
    # Big enough to hold a whole 2M-line direct run: the sink drains it after the
    # generator stops, so the direct baseline loses nothing and its rate is what
    # the sink can absorb (needs root for SO_RCVBUFFORCE; otherwise rmem_max caps it).
    rcvbuf: int = 1 << 30
    host: str = "127.0.0.1"
    # Return the map of sequence numbers seen (``seen``, one byte per line), so that
    # several sinks behind one proxy can be compared line by line.
    keep_seen: bool = False


def _set_rcvbuf(sock: socket.socket, size: int) -> int:
    # Root may exceed net.core.rmem_max with SO_RCVBUFFORCE; others get the capped size.
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    try:
        sock.setsockopt(socket.SOL_SOCKET, force or socket.SO_RCVBUF, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2


def udp_drops(sock: socket.socket) -> int:
    """The kernel's drop count for this UDP socket (``/proc/net/udp``, column ``drops``)."""
    inode = str(os.fstat(sock.fileno()).st_ino)
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 12 and fields[9] == inode:
                return int(fields[12])
    return 0


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    """Percentiles of latency samples, in microseconds."""
    if not samples_ns:
        return {}
    ordered = sorted(samples_ns)
    n = len(ordered)
    out = {name: ordered[min(n - 1, int(q * n))] / 1000 for name, q in PERCENTILES}
    out["max"] = ordered[-1] / 1000
    out["count"] = n
    return out


class _Control:
    """The child's view of the control pipe: has the generator finished?"""

    def __init__(self, conn: multiprocessing.connection.Connection, spec: SinkSpec) -> None:
        self.conn = conn
        self.spec = spec
        self.done_at: float | None = None
        self.hard_deadline = time.monotonic() + spec.max_seconds
        self.timed_out = False

    def should_stop(self, last_rx: float) -> bool:
        """True once the generator is done and nothing came for ``quiet_seconds``."""
        now = time.monotonic()
        if self.done_at is None and self.conn.poll():
            self.conn.recv()
            self.done_at = now
        if now > self.hard_deadline:
            self.timed_out = True
            return True
        return (
            self.done_at is not None and now - max(last_rx, self.done_at) > self.spec.quiet_seconds
        )


def _receive_udp(sock: socket.socket, control: _Control) -> tuple[list[bytes], list[int]]:
    chunks: list[bytes] = []
    times: list[int] = []
    recv = sock.recv
    add_chunk = chunks.append
    add_time = times.append
    clock = time.monotonic_ns
    last_rx = time.monotonic()
    while True:
        n_before = len(chunks)
        try:
            while True:
                add_chunk(recv(UDP_RECV_SIZE))
                add_time(clock())
        except BlockingIOError:
            pass
        if len(chunks) != n_before:
            last_rx = time.monotonic()
        if control.should_stop(last_rx):
            return chunks, times
        select.select([sock], [], [], POLL_SECONDS)


def _receive_tcp(
    listener: socket.socket, control: _Control, open_socks: list[socket.socket]
) -> list[list[tuple[bytes, int]]]:
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    streams: list[list[tuple[bytes, int]]] = []
    last_rx = time.monotonic()
    try:
        while not control.should_stop(last_rx):
            for key, _ in sel.select(POLL_SECONDS):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        conn, _addr = listener.accept()
                        conn.setblocking(False)
                        stream: list[tuple[bytes, int]] = []
                        streams.append(stream)
                        open_socks.append(conn)
                        sel.register(conn, selectors.EVENT_READ, stream)
                    continue
                conn = key.fileobj  # type: ignore[assignment]
                try:
                    data = conn.recv(TCP_RECV_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    key.data.append((data, time.monotonic_ns()))
                    last_rx = time.monotonic()
                else:
                    sel.unregister(conn)
    finally:
        sel.close()
    return streams


def _sink_main(
    spec: SinkSpec,
    traffic: Traffic,
    sock: socket.socket,
    conn: multiprocessing.connection.Connection,
) -> None:
    control = _Control(conn, spec)
    out: dict[str, Any] = {"protocol": spec.protocol}
    chunks: list[bytes] = []
    times: list[int] = []
    streams: list[list[tuple[bytes, int]]] = []
    open_socks: list[socket.socket] = []
    if spec.protocol == "udp":
        chunks, times = _receive_udp(sock, control)
        out["kernel_drops"] = udp_drops(sock)
    else:
        streams = _receive_tcp(sock, control, open_socks)
        out["connections"] = len(streams)
    # Quiet: tell the parent, and keep every socket open until it has stopped the
    # proxy, so the proxy never sees its upstream go away while it is measured.
    conn.send("quiet")
    conn.poll(VERIFY_WAIT)
    for peer in open_socks:
        peer.close()
    sock.close()
    check = LineCheck(traffic, spec.total_lines)
    first_ns = last_ns = 0
    reads = nbytes = 0
    empty = 0
    for chunk, t in zip(chunks, times, strict=True):
        if not chunk:
            # The proxy's zero-length health probes: no lines, and they must not
            # stretch the delivery window (one may come after the last data).
            empty += 1
            continue
        check.check_chunk(chunk, t)
        nbytes += len(chunk)
        first_ns = first_ns or t
        last_ns = t
    reads = len(chunks) - empty
    del chunks, times
    for stream in streams:
        tail = b""
        for data, t in stream:
            nbytes += len(data)
            buf = tail + data if tail else data
            end = buf.rfind(b"\n")
            if end < 0:
                tail = buf
                continue
            check.check_chunk(buf[:end], t)
            tail = buf[end + 1 :]
            reads += 1
            first_ns = t if not first_ns else min(first_ns, t)
            last_ns = max(last_ns, t)
        if tail:
            check.lines += 1
            check.bad(tail)  # a line cut off by the end of the stream
    out.update(
        reads=reads,
        bytes=nbytes,
        first_ns=first_ns,
        last_ns=last_ns,
        lines=check.lines,
        passing=check.passing,
        blocked_seen=check.blocked_seen,
        corrupt=check.corrupt,
        duplicates=check.duplicates,
        corrupt_examples=check.corrupt_examples,
        latency_us=percentiles(check.latencies_ns),
        timed_out=control.timed_out,
        empty_datagrams=empty,
    )
    if spec.keep_seen:
        out["seen"] = bytes(check.seen)
    conn.send(out)
    conn.close()


class Sink:
    """A UDP or TCP receiver on a free loopback port, run in a child process."""

    def __init__(self, spec: SinkSpec, traffic: Traffic) -> None:
        self.spec = spec
        self.traffic = traffic
        if spec.protocol == "udp":
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.rcvbuf = _set_rcvbuf(self._sock, spec.rcvbuf)
            self._sock.bind((spec.host, 0))
        else:
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.rcvbuf = _set_rcvbuf(self._sock, spec.rcvbuf)
            self._sock.bind((spec.host, 0))
            self._sock.listen(1024)
        self._sock.setblocking(False)
        self.port: int = self._sock.getsockname()[1]
        ctx = mp.get_context("fork")
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(
            target=_sink_main,
            args=(spec, traffic, self._sock, child_conn),
            name="sink",
            daemon=True,
        )
        self._child_conn = child_conn
        self._quiet: bool | None = None
        self._done_sent = False

    def start(self) -> None:
        self._proc.start()
        self._sock.close()  # the child has its own copy
        self._child_conn.close()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def done(self) -> None:
        """Tell the sink the generator is done (once), without waiting."""
        if not self._done_sent:
            self._conn.send("done")
            self._done_sent = True

    def wait_quiet(self) -> bool:
        """Tell the sink the generator is done; wait (bounded) until its input is quiet."""
        if self._quiet is None:
            self.done()
            self._quiet = False
            with contextlib.suppress(EOFError, OSError):
                if self._conn.poll(self.spec.max_seconds + self.spec.quiet_seconds + 5):
                    self._quiet = self._conn.recv() == "quiet"
        return self._quiet

    def finish(self) -> dict[str, Any]:
        """Let the sink close its sockets and check every line; wait (bounded) for its report."""
        self.wait_quiet()
        result: dict[str, Any] = {"error": "sink did not report"}
        with contextlib.suppress(OSError):
            self._conn.send("verify")
        if self._conn.poll(VERIFY_WAIT):
            with contextlib.suppress(EOFError):
                result = self._conn.recv()
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)
        self._conn.close()
        return result


def main(argv: list[str] | None = None) -> int:
    """Receive for a while on a free loopback port, then check every line and print a summary."""
    p = argparse.ArgumentParser(description=main.__doc__, allow_abbrev=False)
    p.add_argument("--protocol", choices=("udp", "tcp"), default="udp")
    p.add_argument("--total-lines", type=int, default=200_000, help="as given to the generator")
    p.add_argument("--blocked-share", type=float, default=0.2, help="as given to the generator")
    p.add_argument("--seconds", type=float, default=30.0, help="how long to receive")
    args = p.parse_args(argv)
    traffic = Traffic.build(args.blocked_share, DEFAULT_BLOCKLIST)
    sink = Sink(SinkSpec(args.protocol, args.total_lines, max_seconds=args.seconds + 5), traffic)
    sink.start()
    print(
        f"sink listening on {args.protocol} 127.0.0.1:{sink.port} for {args.seconds:g}s", flush=True
    )
    time.sleep(args.seconds)
    print(json.dumps(sink.finish(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
