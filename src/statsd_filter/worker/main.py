"""One worker process: its event loop, its pipeline, and its life from start to drain.

The supervisor forks N of these (:func:`run_worker`). Each inherits the shared
UDP socket (and the shared Unix sockets, if configured) and opens its own TCP
listening socket, owns one slot of the shared stats block, and builds::

    UdpInput ----------+
    TcpInput ----------+
    UnixDatagramInput -+--> Pipeline (rules) --> UpstreamSet (router, batchers, senders)
    UnixStreamInput ---+

It runs until SIGTERM/SIGINT, then drains: it stops listening, reads what
clients already sent, flushes every batch upstream, and exits 0. A worker whose
supervisor disappears drains and exits too.

New rules arrive as a :class:`~statsd_filter.config.Generation` on the control
socket; the worker compiles them and swaps the pipeline's filter between two
chunks, then acknowledges. With ``/top`` sampling on (``--top``, the default),
the worker also sends what its sample points saw once a second (when they saw
nothing, one report for its quiet seconds every few seconds), and, only
while someone watches ``/tap``, the matching sampled lines a few times a
second (the message kinds are in ``protocol/messages.py``).

A little over 400 lines: the life cycle (start, reload, drain) must be read in
one piece to see that every input is stopped, every aggregate flushed and every
batch sent, in that order; the inputs, the pipeline and the senders are modules
of their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from statsd_filter.config import Generation
from statsd_filter.limitpool import LimitPool
from statsd_filter.logs import setup_logging
from statsd_filter.protocol.frames import FrameDecoder
from statsd_filter.protocol.messages import (
    ReloadAck,
    TapAck,
    TapWanted,
    TopReport,
    decode_message,
    encode_message,
)
from statsd_filter.rules import compile_filter
from statsd_filter.rules.filter import LineFilter
from statsd_filter.rules.limits import LimitTable
from statsd_filter.rules.model import RuleSpec
from statsd_filter.stats import SharedStats, Stat, WorkerState, heartbeat_ms
from statsd_filter.ticks import Ticks
from statsd_filter.upstream import UpstreamSet
from statsd_filter.worker.control import ControlChannel
from statsd_filter.worker.pipeline import Pipeline, aggregation
from statsd_filter.worker.readrole import ReadBell, ReadRole
from statsd_filter.worker.sampler import TAP_INTERVAL, Sampler
from statsd_filter.worker.tcp import TcpInput
from statsd_filter.worker.udp import UdpInput
from statsd_filter.worker.unix import ContainerResolver, UnixDatagramInput, UnixStreamInput

__all__ = ["WorkerSockets", "build_filter", "run_worker"]

HOUSEKEEPING_INTERVAL = 1.0  # seconds between idle sweeps, heartbeats, parent checks
# At most this long between two /top reports of a worker whose sample points see
# nothing (and at most half the window, so the supervisor always holds one).
QUIET_REPORT_MAX = 5.0
# Time kept back from --shutdown-timeout so the worker exits before the supervisor kills it.
EXIT_MARGIN = 0.5


@dataclass(frozen=True)
class WorkerSockets:
    """The shared sockets a worker inherits (UDP: one per listen address), and how it
    opens its TCP listeners."""

    udp: list[socket.socket]
    open_tcp: Callable[[], list[socket.socket]] | None
    unix: socket.socket | None = None
    unix_stream: socket.socket | None = None
    # The read bell of each UDP socket, by position (readrole.py; the first four).
    bells: tuple[ReadBell, ...] = ()


def build_filter(generation: Generation, pool: LimitPool | None = None) -> LineFilter:
    """The line filter of a config generation, counting per rule into its rows, its
    limit rules deciding through their tables in the shared ``pool``."""
    s = generation.settings
    tables: Callable[[RuleSpec], LimitTable] | None = None
    if pool is not None:
        shared, slots = pool, generation.limits

        def tables(spec: RuleSpec) -> LimitTable:
            return shared.table(slots[spec.name])

    return compile_filter(
        s.blocklist,
        s.max_line_bytes,
        s.rules,
        allowlist_mode=s.allowlist_mode,
        row_of=generation.rows.__getitem__,
        limit_tables=tables,
    )


def rule_names(generation: Generation) -> dict[int, str]:
    """Counter row -> rule name, for naming the rule that decided a sampled line."""
    return {row: name for name, row in generation.rows.items()}


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_worker(
    index: int,
    generation: Generation,
    sockets: WorkerSockets,
    stats: SharedStats,
    control: socket.socket,
    pool: LimitPool | None = None,
) -> int:
    """Entry point in the forked child; returns the exit status."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    s = generation.settings
    log = setup_logging(s.log_level, f"worker {index}", s.log_format)
    worker = Worker(index, generation, sockets, stats, control, log, pool)
    with asyncio.Runner(loop_factory=_new_event_loop) as runner:
        return runner.run(worker.serve())


class Worker:
    """The lifecycle of one worker process."""

    def __init__(
        self,
        index: int,
        generation: Generation,
        sockets: WorkerSockets,
        stats: SharedStats,
        control: socket.socket,
        log: logging.Logger,
        pool: LimitPool | None = None,
    ) -> None:
        self.index = index
        self.generation = generation
        self._pool = pool
        self.sockets = sockets
        self._stats = stats
        self._c = stats.row(index)
        self._control = control
        self._decoder = FrameDecoder()
        self._log = log
        self._parent = os.getppid()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pipeline: Pipeline | None = None
        self._udp: list[UdpInput] = []
        self._tcp: TcpInput | None = None
        self._unix: UnixDatagramInput | None = None
        self._unix_stream: UnixStreamInput | None = None
        self._channel: ControlChannel | None = None
        self._sampler: Sampler | None = None
        self._tap_timer: asyncio.TimerHandle | None = None
        # Housekeeping and the health checks share their timer when their intervals
        # match (the default): an idle worker wakes up once a second, not twice.
        self.ticks = Ticks()
        self._quiet = 0.0  # seconds of empty /top reports not sent yet
        self._reported = False  # the first report goes at once: /top lists the worker
        self._flush_timer: asyncio.TimerHandle | None = None

    async def serve(self) -> int:
        s = self.generation.settings
        loop = self._loop = asyncio.get_running_loop()
        c = self._c
        c[Stat.STATE] = WorkerState.STARTING
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # Reloads are the supervisor's business; a stray HUP must not kill a worker.
        loop.add_signal_handler(signal.SIGHUP, lambda: None)

        upstreams = UpstreamSet(
            s.effective_upstreams,
            s.upstream_mode,
            lambda u: self._stats.upstream_row(self.index, u),
            buffer_bytes=s.upstream_buffer_bytes,
            max_udp_size=s.max_udp_size,
            health_interval=s.health_interval,
            log=self._log,
            max_unix_payload=s.unix_upstream_max_payload,
            ticks=self.ticks,
        )
        await upstreams.start()
        if s.top:
            self._sampler = Sampler(self.index, s.top_sample_rate, c, rule_names(self.generation))
        pipeline = self._pipeline = Pipeline(
            build_filter(self.generation, self._pool),
            upstreams.router,
            c,
            self._stats.rule_rows(self.index),
            self._log,
            s.max_line_bytes,
            self._sampler,
        )
        self._set_aggregation(pipeline)
        rows = [self._stats.row(i) for i in range(self._stats.workers)]
        bells = self.sockets.bells
        for i, sock in enumerate(self.sockets.udp):
            role = ReadRole(rows, self.index, i, bells[i]) if i < len(bells) else None
            udp = UdpInput(sock, pipeline, c, self._log, s.max_read_delay, role)
            udp.start()
            self._udp.append(udp)
        if self.sockets.open_tcp is not None:
            self._tcp = TcpInput(
                self.sockets.open_tcp(),
                pipeline,
                c,
                self._log,
                max_line_bytes=s.max_line_bytes,
                max_connections=s.max_connections,
                idle_timeout=s.tcp_idle_timeout,
            )
            self._tcp.start()
        self._start_unix(pipeline)
        self._control.setblocking(False)
        self._channel = ControlChannel(self._control, loop)
        loop.add_reader(self._control.fileno(), self._on_control)
        c[Stat.STATE] = WorkerState.RUNNING
        self._log.debug("worker %d running (pid %d)", self.index, os.getpid())
        housekeeping = asyncio.create_task(self._housekeeping(stop))

        await stop.wait()
        # Everything must be done EXIT_MARGIN before the supervisor's deadline.
        deadline = time.monotonic() + max(0.0, s.shutdown_timeout - EXIT_MARGIN)
        c[Stat.STATE] = WorkerState.DRAINING
        housekeeping.cancel()
        if self._tap_timer is not None:
            self._tap_timer.cancel()
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        # Reading gets most of the time; delivering what was read, the rest.
        read_until = time.monotonic() + (deadline - time.monotonic()) / 2
        streams = [i for i in (self._tcp, self._unix_stream) if i is not None]
        for stream in streams:
            stream.stop_accepting(read_until)
        for datagrams in (*self._udp, self._unix):
            if datagrams is not None:
                datagrams.stop(read_until)
        for stream in streams:
            stream.drain_and_close(read_until)
        # What the inputs' last reads added is aggregated too; then the senders' last flush.
        pipeline.flush_aggregates(Stat.AGGREGATE_FLUSHES_SHUTDOWN)
        pipeline.publish_rule_counters()
        await upstreams.close(max(0.0, deadline - time.monotonic()))
        c[Stat.STATE] = WorkerState.STOPPED
        return 0

    # ------------------------------------------------------------ aggregation
    def _set_aggregation(self, pipeline: Pipeline) -> None:
        """A fresh aggregator (or none) for the current generation, and its timer."""
        s = self.generation.settings
        pipeline.set_aggregation(*aggregation(s))
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if pipeline.aggregator is not None and self._loop is not None:
            self._schedule_flush(self._loop.time() + s.flush_interval)

    def _schedule_flush(self, when: float) -> None:
        assert self._loop is not None
        self._flush_timer = self._loop.call_at(when, self._on_flush_timer, when)

    def _on_flush_timer(self, due: float) -> None:
        """Flush every ``flush_interval`` on a fixed cadence (no drift from late wake-ups)."""
        assert self._loop is not None
        assert self._pipeline is not None
        self._pipeline.flush_aggregates(Stat.AGGREGATE_FLUSHES_INTERVAL)
        interval = self.generation.settings.flush_interval
        now = self._loop.time()
        due += interval
        if due <= now:  # the loop was held up longer than an interval: start again from now
            due = now + interval
        self._schedule_flush(due)

    def _start_unix(self, pipeline: Pipeline) -> None:
        """Start reading the shared Unix sockets, if any."""
        s = self.generation.settings
        origin = ContainerResolver(s.procfs_path, self._c) if s.unix_origin_detection else None
        if self.sockets.unix is not None:
            self._unix = UnixDatagramInput(
                self.sockets.unix,
                pipeline,
                self._c,
                self._log,
                max_payload=s.unix_socket_max_payload,
                origin=origin,
            )
            self._unix.start()
        if self.sockets.unix_stream is not None:
            self._unix_stream = UnixStreamInput(
                self.sockets.unix_stream,
                pipeline,
                self._c,
                self._log,
                framing=s.unix_stream_framing,
                max_payload=s.unix_socket_max_payload,
                max_line_bytes=s.max_line_bytes,
                max_connections=s.max_connections,
                idle_timeout=s.tcp_idle_timeout,
                origin=origin,
            )
            self._unix_stream.start()

    # ------------------------------------------------------------ control channel
    def _send(self, message: object, *, droppable: bool = False) -> None:
        if self._channel is not None:
            self._channel.send(encode_message(message), droppable=droppable)

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
            message = decode_message(frame)
            if isinstance(message, Generation):
                self._apply(message)
            elif isinstance(message, TapWanted):
                self._set_tap(message)
            else:  # pragma: no cover - a newer supervisor's kind
                self._log.warning("unknown control message %s", type(message).__name__)

    def _apply(self, generation: Generation) -> None:
        """Swap in a new rule set between two chunks: no line is lost or judged twice."""
        reply = ReloadAck(generation.number, ok=True)
        try:
            new_filter = build_filter(generation, self._pool)
        except Exception as exc:  # validated by the supervisor; belt and braces
            self._log.exception("reload %d failed in worker", generation.number)
            reply = ReloadAck(generation.number, ok=False, error=str(exc))
        else:
            s = generation.settings
            self.generation = generation
            logging.getLogger().setLevel(s.log_level.upper())
            if self._pipeline is not None:
                # Every aggregate goes out under the rules and settings it was made by.
                self._pipeline.flush_aggregates(Stat.AGGREGATE_FLUSHES_RELOAD)
                self._pipeline.set_filter(new_filter, s.max_line_bytes)
                self._pipeline.set_line_logging(self._log.isEnabledFor(logging.DEBUG))
                self._set_aggregation(self._pipeline)
            for stream in (self._tcp, self._unix_stream):
                if stream is not None:
                    stream.set_max_line_bytes(s.max_line_bytes)
            for udp in self._udp:
                udp.set_delay(s.max_read_delay)
            if self._sampler is not None:
                self._sampler.set_rule_names(rule_names(generation))
            self._log.debug("config generation %d applied", generation.number)
        self._send(reply)

    # ------------------------------------------------------------ /top and /tap
    def _set_tap(self, wanted: TapWanted) -> None:
        """Start, change or stop sending sampled lines to the supervisor's watchers."""
        sampler = self._sampler
        if sampler is not None:
            sampler.set_tap(wanted.version, wanted.filters)
            if sampler.tapping and self._tap_timer is None and self._loop is not None:
                self._tap_timer = self._loop.call_later(TAP_INTERVAL, self._send_tap)
        self._send(TapAck(self.index, wanted.version))

    def _send_tap(self) -> None:
        self._tap_timer = None
        sampler = self._sampler
        if sampler is None or self._loop is None:  # pragma: no cover - set before the timer
            return
        batch = sampler.tap_batch()
        if batch is not None:
            self._send(batch, droppable=True)
        if sampler.tapping:
            self._tap_timer = self._loop.call_later(TAP_INTERVAL, self._send_tap)

    def _report(self, report: TopReport) -> None:
        """Send a /top report; an empty one (but the first) only once its quiet time
        adds up to QUIET_REPORT_MAX (or half the window): each wakes the supervisor."""
        quiet = self._quiet + report.period
        most = min(QUIET_REPORT_MAX, self.generation.settings.top_window / 2)
        if not report.hits and not report.names and quiet < most and self._reported:
            self._quiet = quiet
            return
        self._send(dataclasses.replace(report, quiet=self._quiet), droppable=True)
        self._quiet = 0.0
        self._reported = True

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        assert self._loop is not None
        ticker = self.ticks.ticker(HOUSEKEEPING_INTERVAL)
        while True:
            now = self._loop.time()
            self._c[Stat.HEARTBEAT] = heartbeat_ms()
            if self._pipeline is not None:
                self._pipeline.publish_rule_counters()
            if self._sampler is not None:
                self._report(self._sampler.report())
            for stream in (self._tcp, self._unix_stream):
                if stream is not None:
                    stream.sweep_idle(now)
            if os.getppid() != self._parent:
                self._log.warning("supervisor %d went away; draining", self._parent)
                stop.set()
                return
            await ticker.wait()
