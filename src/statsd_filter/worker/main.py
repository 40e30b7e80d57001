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
import pickle
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from statsd_filter.config import Settings, effective_upstreams
from statsd_filter.control import FrameDecoder, encode_frame
from statsd_filter.logs import setup_logging
from statsd_filter.protocol.lines import split_lines
from statsd_filter.rules import LineFilter, compile_filter
from statsd_filter.server.listeners import TcpListener, UdpListener
from statsd_filter.stats import Counter, SharedStats, WorkerState, heartbeat_ms
from statsd_filter.upstream import Batcher, make_upstream
from statsd_filter.upstream.health import HealthChecker
from statsd_filter.upstream.router import Router

__all__ = ["ConfigHolder", "WorkerSockets", "run_worker", "worker_target"]

HOUSEKEEPING_INTERVAL = 1.0  # seconds between idle sweeps, heartbeats, parent checks
# A TCP upstream has no datagram limit; larger writes mean fewer syscalls.
TCP_UPSTREAM_BATCH = 65536
# Time kept back from --shutdown-timeout so the worker exits before the supervisor kills it.
EXIT_MARGIN = 0.5


@dataclass(frozen=True)
class WorkerSockets:
    """The shared UDP socket a worker inherits, and how it opens its TCP listener."""

    udp: socket.socket | None
    open_tcp: Callable[[], socket.socket] | None


@dataclass
class ConfigHolder:
    """The supervisor's current settings and rule-counter rows, as a new worker gets them."""

    settings: Settings
    rows: dict[str, int]
    generation: int = 0


def build_filter(settings: Settings, rows: dict[str, int]) -> LineFilter:
    """The line filter for ``settings``, counting per rule into the supervisor's rows."""
    return compile_filter(
        settings.blocklist,
        settings.max_line_bytes,
        settings.rules,
        allowlist_mode=settings.allowlist_mode,
        stat_row=rows.__getitem__,
    )


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_worker(
    index: int,
    config: ConfigHolder,
    sockets: WorkerSockets,
    counters: memoryview,
    rule_counters: memoryview,
    upstream_rows: Callable[[int], memoryview],
    control: socket.socket,
) -> int:
    """Entry point in the forked child; returns the exit status."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    log = setup_logging(config.settings.log_level, f"worker {index}")
    worker = Worker(index, config, sockets, counters, rule_counters, upstream_rows, control, log)
    with asyncio.Runner(loop_factory=_new_event_loop) as runner:
        return runner.run(worker.serve())


class Worker:
    """The pipeline and lifecycle of one worker process."""

    def __init__(
        self,
        index: int,
        config: ConfigHolder,
        sockets: WorkerSockets,
        counters: memoryview,
        rule_counters: memoryview,
        upstream_rows: Callable[[int], memoryview],
        control: socket.socket,
        log: logging.Logger,
    ) -> None:
        self.index = index
        self.settings = settings = config.settings
        self.sockets = sockets
        self._c = counters
        self._rule_c = rule_counters
        self._control = control
        self._decoder = FrameDecoder()
        self._log = log
        self._parent = os.getppid()
        self._filter: LineFilter = build_filter(settings, config.rows)
        self._flush_scheduled = False
        self._debug = log.isEnabledFor(logging.DEBUG)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._udp: UdpListener | None = None
        self._tcp: TcpListener | None = None
        self._batcher: Router | None = None
        self._upstream_rows: Callable[[int], memoryview] = upstream_rows

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

        specs = effective_upstreams(s)
        upstreams = [
            make_upstream(
                spec.protocol,
                spec.host,
                spec.port,
                self._upstream_rows(i),
                s.upstream_buffer_bytes,
                self._log,
            )
            for i, spec in enumerate(specs)
        ]
        await asyncio.gather(*(u.start() for u in upstreams))
        batchers = [
            Batcher(s.max_udp_size if spec.protocol == "udp" else TCP_UPSTREAM_BATCH, u.send_batch)
            for spec, u in zip(specs, upstreams, strict=True)
        ]
        router = Router(
            [spec.address for spec in specs], batchers, s.upstream_mode, [p.weight for p in specs]
        )
        self._batcher = router
        health = [
            asyncio.create_task(
                HealthChecker(
                    spec.address,
                    u,
                    self._upstream_rows(i),
                    s.health_interval,
                    self._on_health_change,
                    self._log,
                    (spec.host, spec.admin_port) if spec.admin_port else None,
                ).run()
            )
            for i, (spec, u) in enumerate(zip(specs, upstreams, strict=True))
        ]
        log_lines = self._log_lines if self._debug else None

        if self.sockets.udp is not None:
            self._udp = UdpListener(
                self.sockets.udp, self._filter, self._batcher, c, self._log, log_lines
            )
            self._udp.start()
        if self.sockets.open_tcp is not None:
            self._tcp = TcpListener(
                self.sockets.open_tcp(),
                self._process,
                c,
                self._log,
                max_line_bytes=s.max_line_bytes,
                max_connections=s.max_connections,
                idle_timeout=s.tcp_idle_timeout,
            )
            self._tcp.start()
        self._control.setblocking(False)
        loop.add_reader(self._control.fileno(), self._on_control)
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
        router.flush()
        self._publish_rule_stats()
        for task in health:
            task.cancel()
        remaining = max(0.0, s.shutdown_timeout - EXIT_MARGIN - (time.monotonic() - started))
        await asyncio.gather(*(u.drain(remaining) for u in upstreams))
        c[Counter.STATE] = WorkerState.STOPPED
        return 0

    # ------------------------------------------------------------ reloads
    def _on_control(self) -> None:
        try:
            data = self._control.recv(1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            assert self._loop is not None
            self._loop.remove_reader(self._control.fileno())
            return
        for frame in self._decoder.feed(data):
            self._apply_config(pickle.loads(frame))  # noqa: S301 - from our own supervisor

    def _apply_config(self, message: dict[str, Any]) -> None:
        """Swap in a new rule set between two datagrams: no line is lost or judged twice."""
        settings: Settings = message["settings"]
        generation: int = message["generation"]
        reply: dict[str, Any] = {"generation": generation, "ok": True}
        try:
            new_filter = build_filter(settings, message["rows"])
        except Exception as exc:  # validated by the supervisor; belt and braces
            self._log.exception("reload %d failed in worker", generation)
            reply = {"generation": generation, "ok": False, "error": str(exc)}
        else:
            self._publish_rule_stats()
            self._filter = new_filter
            if self._udp is not None:
                self._udp.set_filter(new_filter)
            self.settings = settings
            logging.getLogger().setLevel(settings.log_level.upper())
            self._debug = self._log.isEnabledFor(logging.DEBUG)
            if self._udp is not None:
                self._udp.set_line_logger(self._log_lines if self._debug else None)
            if self._tcp is not None:
                self._tcp.set_max_line_bytes(settings.max_line_bytes)
            self._log.debug("config generation %d applied", generation)
        with contextlib.suppress(OSError):
            self._control.setblocking(True)
            self._control.sendall(encode_frame(pickle.dumps(reply)))
            self._control.setblocking(False)

    def _publish_rule_stats(self) -> None:
        shared = self._rule_c
        for offset, delta in self._filter.stats.drain():
            if offset < len(shared):
                shared[offset] += delta

    def _on_health_change(self, name: str, healthy: bool) -> None:
        router = self._batcher
        if router is not None and router.set_healthy(name, healthy) and router.mode == "shard":
            verb = "rejoins" if healthy else "leaves"
            self._log.warning("upstream %s %s the hash ring", name, verb)

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
        passed = kept.split(b"\n")[1:]
        for line in passed:
            self._log.debug("forwarded %r", line.decode("utf-8", "replace"))
        forwarded = set(passed)
        for line in split_lines(chunk):
            if line not in forwarded:
                verdict = (
                    "dropped (oversize)" if len(line) > self.settings.max_line_bytes else "blocked"
                )
                self._log.debug("%s %r", verdict, line.decode("utf-8", "replace"))

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        assert self._loop is not None
        while True:
            now = self._loop.time()
            self._c[Counter.HEARTBEAT] = heartbeat_ms()
            self._publish_rule_stats()
            if self._tcp is not None:
                self._tcp.sweep_idle(now)
            if os.getppid() != self._parent:
                self._log.warning("supervisor %d went away; draining", self._parent)
                stop.set()
                return
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)


def worker_target(
    config: ConfigHolder,
    sockets: WorkerSockets,
    stats: SharedStats,
    close_in_child: tuple[socket.socket, ...] = (),
) -> Callable[[int, socket.socket], int]:
    """Bind a worker's inputs into the ``target(index, control)`` the supervisor forks.

    ``config`` is read at fork time, so a worker restarted after a reload
    starts with the reloaded rules.
    """

    def target(index: int, control: socket.socket) -> int:
        for sock in close_in_child:
            with contextlib.suppress(OSError):
                sock.close()
        return run_worker(
            index,
            config,
            sockets,
            stats.slot(index),
            stats.rule_slot(index),
            lambda upstream: stats.upstream_slot(index, upstream),
            control,
        )

    return target
