"""One worker process: an event loop running socket -> protocol -> rules -> upstream.

The supervisor forks N of these. Each inherits the listening sockets (so the
kernel spreads datagrams and connections across them), owns one slot of the
shared stats block, and runs until SIGTERM/SIGINT, then drains: it stops
listening, reads what clients already sent, flushes every batch upstream, and
exits 0. A worker whose supervisor disappears drains and exits too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from statsd_filter.config import Settings
from statsd_filter.logs import setup_logging
from statsd_filter.protocol.lines import split_lines
from statsd_filter.rules import LineFilter, compile_filter
from statsd_filter.server.listeners import TcpListener, UdpListener
from statsd_filter.stats import Counter, WorkerState, heartbeat_ms
from statsd_filter.upstream import Batcher, make_upstream

__all__ = ["WorkerSockets", "run_worker"]

HOUSEKEEPING_INTERVAL = 1.0  # seconds between idle sweeps, heartbeats, parent checks
# A TCP upstream has no datagram limit; larger writes mean fewer syscalls.
TCP_UPSTREAM_BATCH = 65536
# Time kept back from --shutdown-timeout so the worker exits before the supervisor kills it.
EXIT_MARGIN = 0.5


@dataclass(frozen=True)
class WorkerSockets:
    """Listening sockets a worker inherits from the supervisor."""

    udp: socket.socket | None
    tcp: socket.socket | None


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_worker(index: int, settings: Settings, sockets: WorkerSockets, counters: memoryview) -> int:
    """Entry point in the forked child; returns the exit status."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    log = setup_logging(settings.log_level, f"worker {index}")
    worker = Worker(index, settings, sockets, counters, log)
    with asyncio.Runner(loop_factory=_new_event_loop) as runner:
        return runner.run(worker.serve())


class Worker:
    """The pipeline and lifecycle of one worker process."""

    def __init__(
        self,
        index: int,
        settings: Settings,
        sockets: WorkerSockets,
        counters: memoryview,
        log: logging.Logger,
    ) -> None:
        self.index = index
        self.settings = settings
        self.sockets = sockets
        self._c = counters
        self._log = log
        self._parent = os.getppid()
        self._filter: LineFilter = compile_filter(settings.blocklist, settings.max_line_bytes)
        self._flush_scheduled = False
        self._debug = log.isEnabledFor(logging.DEBUG)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._udp: UdpListener | None = None
        self._tcp: TcpListener | None = None
        self._batcher: Batcher | None = None

    async def serve(self) -> int:
        s = self.settings
        loop = self._loop = asyncio.get_running_loop()
        c = self._c
        c[Counter.STATE] = WorkerState.STARTING
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # Reloads are the supervisor's business; a stray HUP must not kill a worker.
        loop.add_signal_handler(signal.SIGHUP, lambda: None)

        upstream = make_upstream(
            s.target_protocol,
            s.target_host,
            s.target_port,
            c,
            s.upstream_buffer_bytes,
            self._log,
        )
        await upstream.start()
        batch = s.max_udp_size if s.target_protocol == "udp" else TCP_UPSTREAM_BATCH
        self._batcher = Batcher(batch, upstream.send)
        log_lines = self._log_lines if self._debug else None

        if self.sockets.udp is not None:
            self._udp = UdpListener(
                self.sockets.udp, self._filter, self._batcher, c, self._log, log_lines
            )
            self._udp.start()
        if self.sockets.tcp is not None:
            self._tcp = TcpListener(
                self.sockets.tcp,
                self._process,
                c,
                self._log,
                max_line_bytes=s.max_line_bytes,
                max_connections=s.max_connections,
                idle_timeout=s.tcp_idle_timeout,
            )
            self._tcp.start()
        c[Counter.STATE] = WorkerState.RUNNING
        self._log.debug("worker %d running (pid %d)", self.index, os.getpid())
        housekeeping = asyncio.create_task(self._housekeeping(stop))

        await stop.wait()
        started = time.monotonic()
        c[Counter.STATE] = WorkerState.DRAINING
        housekeeping.cancel()
        if self._udp is not None:
            self._udp.stop()
        if self._tcp is not None:
            self._tcp.stop_accepting()
            self._tcp.drain_and_close()
        self._batcher.flush()
        remaining = s.shutdown_timeout - EXIT_MARGIN - (time.monotonic() - started)
        await upstream.drain(max(0.0, remaining))
        c[Counter.STATE] = WorkerState.STOPPED
        return 0

    def _process(self, chunk: bytes, framer_oversize: int) -> None:
        """Filter one TCP chunk and queue what passes (UDP inlines this)."""
        kept, received, forwarded, blocked, oversize = self._filter.filter(chunk)
        c = self._c
        c[Counter.LINES_RECEIVED] += received + framer_oversize
        if blocked:
            c[Counter.LINES_BLOCKED] += blocked
        if oversize or framer_oversize:
            c[Counter.DROPPED_OVERSIZE] += oversize + framer_oversize
        if forwarded:
            assert self._batcher is not None
            self._batcher.add(kept, forwarded)
            if not self._flush_scheduled and self._loop is not None:
                # Flush after this loop iteration's callbacks: lines from many
                # connections read in one wake-up share upstream datagrams.
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)
        if self._debug:
            self._log_lines(chunk, kept)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._batcher is not None:
            self._batcher.flush()

    def _log_lines(self, chunk: bytes, kept: bytes) -> None:
        passed = set(kept.split(b"\n"))
        for line in split_lines(chunk):
            if line in passed:
                verdict = "forwarded"
            elif self._filter.is_blocked(line):
                verdict = "blocked"
            else:
                verdict = "dropped"
            self._log.debug("%s %r", verdict, line.decode("utf-8", "replace"))

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        assert self._loop is not None
        while True:
            now = self._loop.time()
            self._c[Counter.HEARTBEAT] = heartbeat_ms()
            if self._tcp is not None:
                self._tcp.sweep_idle(now)
            if os.getppid() != self._parent:
                self._log.warning("supervisor %d went away; draining", self._parent)
                stop.set()
                return
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)


def worker_target(
    settings: Settings,
    sockets: WorkerSockets,
    slot_of: Callable[[int], memoryview],
    close_in_child: tuple[socket.socket, ...] = (),
) -> Callable[[int], int]:
    """Bind a worker's inputs into the ``target(index) -> status`` the supervisor forks."""

    def target(index: int) -> int:
        for sock in close_in_child:
            with contextlib.suppress(OSError):
                sock.close()
        return run_worker(index, settings, sockets, slot_of(index))

    return target
