"""``statsd-filter run``: the parent process, wired from its parts.

Order at start: bind every socket (``sockets.py``), so a port clash fails fast
with exit status 1 before any worker exists; map the shared stats block and
the limit rules' shared memory (``limitpool.py``); start the admin endpoint;
fork the workers (``process.py``), which inherit the listening sockets and the
shared memory, and run :func:`statsd_filter.worker.main.run_worker`.

Admin routes (``routes.py``): ``/healthz`` (``observe.py``), ``/metrics``
(``metrics.py``), ``/limits`` (``limits.py``), ``/top`` (the workers' sampled
reports merged by ``top.py``), ``/tap`` (live sampled lines, ``taphub.py``) and
``/``, the status page (``status.html``).

:class:`App` owns every part and is the only place they meet: the supervisor
calls back into it (a worker started, died or wrote; SIGHUP), and it hands each
part only what that part needs. The parent process never touches StatsD
traffic.

Under systemd (``Type=notify``, ``NOTIFY_SOCKET`` set) it also reports its
life cycle (``notify.py``): READY=1 once every worker runs, RELOADING=1 and
READY=1 around each reload (READY=1 when the rollout has reached every worker),
STOPPING=1 when a stop begins, a STATUS= line every few seconds, and
WATCHDOG=1 pings from its event loop, so a stuck supervisor stops pinging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket

from statsd_filter import __version__
from statsd_filter.config import Settings
from statsd_filter.limitpool import LimitPool, LimitRegions
from statsd_filter.logs import setup_logging
from statsd_filter.protocol.messages import ReloadAck, TapAck, TapLines, TopReport, decode_message
from statsd_filter.stats import READER_ROLES, SharedStats, Stat, WorkerState
from statsd_filter.supervisor.admin import AdminServer, start_admin
from statsd_filter.supervisor.limits import LimitWatch, limit_report
from statsd_filter.supervisor.metrics import metrics_registry
from statsd_filter.supervisor.notify import Notifier
from statsd_filter.supervisor.observe import Observer
from statsd_filter.supervisor.process import Supervisor
from statsd_filter.supervisor.reload import RULE_CAPACITY, Loader, Reloader, Rollout, watch_file
from statsd_filter.supervisor.routes import admin_routes
from statsd_filter.supervisor.sockets import (
    ListenSockets,
    StartupError,
    bind_admin_socket,
    open_listen_sockets,
    raise_open_file_limit,
    udp_kernel_drops,
)
from statsd_filter.supervisor.taphub import TapHub
from statsd_filter.supervisor.top import HISTORY_INTERVAL, TopBoard, TopView
from statsd_filter.worker.main import WorkerSockets, run_worker
from statsd_filter.worker.readrole import ReadBell
from statsd_filter.worker.udp import count_unread_lines

__all__ = ["App", "run"]

# How often systemd's status line is refreshed, and how often readiness is
# checked while the workers start (READY=1 should follow the last one closely).
STATUS_INTERVAL = 2.0
READY_POLL = 0.05


class App:
    """The supervisor process: sockets, shared stats, workers, reloads, admin endpoint."""

    def __init__(
        self,
        settings: Settings,
        loader: Loader | None,
        listen: ListenSockets,
        admin_sock: socket.socket | None,
        log: logging.Logger,
        notifier: Notifier | None = None,
    ) -> None:
        self.listen = listen
        self.log = log
        self._admin_sock = admin_sock
        self.notifier = notifier or Notifier(None)
        # READY=1 sent: reloads report RELOADING=1/READY=1 only after it.
        self.ready = False
        self.stats = SharedStats(settings.workers, RULE_CAPACITY, len(settings.effective_upstreams))
        # Mapped even without limit rules (a reload may add some); unused pages cost nothing.
        self.pool = LimitPool(settings.limit_memory)
        self.regions = LimitRegions(self.pool)
        self.reloader = Reloader(settings, loader, log, self.regions)
        unix = listen.unix.sock if listen.unix is not None else None
        unix_stream = listen.unix_stream.sock if listen.unix_stream is not None else None
        # With more than one worker, one of them reads a steady socket at a time.
        bells = (
            tuple(ReadBell() for _ in listen.udp[: len(READER_ROLES)])
            if settings.workers > 1
            else ()
        )
        self._worker_sockets = WorkerSockets(
            listen.udp, listen.open_tcp if listen.tcp else None, unix, unix_stream, bells
        )
        self.supervisor = Supervisor(
            self._worker_target,
            settings.workers,
            settings.shutdown_timeout,
            log,
            on_worker_exit=self._on_worker_exit,
            on_reload=lambda: self.reload("SIGHUP"),
            on_message=self._on_message,
            on_worker_started=self._on_worker_started,
            on_stopping=self._on_stopping,
            inherit=[
                *listen.udp,
                *bells,
                *(sock for sock in (unix, unix_stream) if sock is not None),
                self.pool,
            ],
        )
        self.rollout = Rollout(self.supervisor, log, on_done=self._on_rollout_done)
        self.limit_watch = LimitWatch(
            self.pool,
            self.regions,
            lambda: self.reloader.current,
            self.rollout.oldest_applied,
            log,
        )
        self.observer = Observer(
            self.stats,
            self.supervisor.workers,
            self.reloader,
            self.rollout,
            listen.port,
            lambda: udp_kernel_drops(listen.udp),
            lambda: self.supervisor.stopping,
            self.pool,
        )
        self.board = TopBoard(settings.top_window) if settings.top else None
        self.top = TopView(self.board, self.observer)
        self.taps = TapHub(
            self.supervisor.send,
            lambda: [w.index for w in self.supervisor.workers if w.alive],
            settings.tap_max_watchers if settings.top else 0,
        )

    # ------------------------------------------------------------ supervisor callbacks
    def _worker_target(self, index: int, control: socket.socket) -> int:
        """Runs in the forked child: become worker ``index`` with the current config."""
        return run_worker(
            index, self.reloader.current, self._worker_sockets, self.stats, control, self.pool
        )

    def _on_worker_exit(self, index: int) -> None:
        """A worker is gone: whatever it had read and not yet accounted for is lost."""
        self.stats.reset_gauges(index)
        held = self.observer.held(index)
        if held[0] > 0:
            self.stats.row(index)[Stat.DROPPED_WORKER_DIED] += held[0]
            self.log.warning(
                "worker %d died holding %d line(s): counted as dropped (worker_died)",
                index,
                held[0],
            )
        elif held[0] < 0:  # pragma: no cover - would be a counting-order bug
            self.log.error("worker %d: counters out of balance by %d", index, held[0])
        if len(held) > 1:  # mirror mode: each upstream's copies
            for u, copies in enumerate(held):
                if copies > 0:
                    self.stats.upstream_row(index, u)[Stat.UPSTREAM_WORKER_DIED] += copies

    def _on_worker_started(self, index: int) -> None:
        self.rollout.on_worker_started(index, self.reloader.current.number)
        self.taps.on_worker_started(index)

    def _on_message(self, index: int, payload: bytes) -> None:
        message = decode_message(payload)
        if isinstance(message, TopReport):
            if self.board is not None:
                self.board.add(message)
        elif isinstance(message, TapLines):
            self.taps.on_lines(message)
        elif isinstance(message, TapAck):
            self.taps.on_ack(message)
        elif isinstance(message, ReloadAck):
            self.rollout.on_ack(index, message)
        else:  # pragma: no cover - would be a bug: both ends are this program
            self.log.warning("worker %d sent an unknown message %r", index, type(message))

    def reload(self, why: str) -> None:
        """Validate the config again and, if it is good, roll it out to the workers."""
        notify = self.ready and not self.supervisor.stopping
        if notify:
            self.notifier.reloading(f"reloading the config ({why})")
        self.limit_watch.release()  # room for new tables, if the last rollout is done
        generation = self.reloader.reload(why)
        self.limit_watch.wake()  # a new generation may bring limit rules or retire tables
        if generation is not None:
            self.rollout.start(generation)
        elif notify:
            last = self.reloader.status.last
            if last is not None and not last["ok"]:
                self.notifier.ready(
                    f"config reload rejected, running the previous one: {last['error']}"
                )
            else:
                self.notifier.ready(self.status_line())

    def _on_rollout_done(self, number: int) -> None:
        self.limit_watch.release()  # tables the rollout retired: no worker uses them now
        if self.ready and not self.supervisor.stopping:
            self.notifier.ready(f"config generation {number} applied; {self.status_line()}")

    def _on_stopping(self, why: str) -> None:
        self.notifier.stopping(f"{why} received: draining workers")

    # ------------------------------------------------------------ systemd
    def all_running(self) -> bool:
        """Whether every worker slot has a live worker serving its sockets."""
        return all(
            w.alive and self.stats.get(w.index, Stat.STATE) == WorkerState.RUNNING
            for w in self.supervisor.workers
        )

    def status_line(self, rate: float | None = None) -> str:
        """systemd's STATUS=: the forwarding rate, the workers, the upstreams."""
        workers = self.supervisor.workers
        running = sum(
            1
            for w in workers
            if w.alive and self.stats.get(w.index, Stat.STATE) == WorkerState.RUNNING
        )
        specs = self.reloader.current.settings.effective_upstreams
        up = sum(1 for u in range(len(specs)) if self.observer.upstream_state(u) == "up")
        forwarding = "ready" if rate is None else f"forwarding: {rate:.0f} lines/s"
        return (
            f"{forwarding}; workers {running}/{len(workers)} running; "
            f"upstreams {up}/{len(specs)} up"
        )

    async def notify_systemd(self) -> None:
        """READY=1 once every worker runs, then STATUS= lines and WATCHDOG=1 pings."""
        notifier = self.notifier
        loop = asyncio.get_running_loop()
        ping_every = notifier.watchdog_interval
        next_ping = next_status = loop.time()
        last_forwarded, last_at = 0, loop.time()
        while True:
            now = loop.time()
            if ping_every is not None and now >= next_ping:
                notifier.watchdog()
                next_ping = now + ping_every
            if not self.supervisor.stopping:
                if not self.ready and self.all_running():
                    self.ready = True
                    notifier.ready(self.status_line())
                    last_forwarded, last_at = self.observer.totals()["forwarded"], now
                    next_status = now + STATUS_INTERVAL
                elif self.ready and now >= next_status:
                    forwarded = self.observer.totals()["forwarded"]
                    rate = (forwarded - last_forwarded) / max(now - last_at, 1e-3)
                    notifier.status(self.status_line(rate))
                    last_forwarded, last_at = forwarded, now
                    next_status = now + STATUS_INTERVAL
            wake = next_status if self.ready else now + READY_POLL
            if ping_every is not None:
                wake = min(wake, next_ping)
            await asyncio.sleep(max(0.0, wake - loop.time()))

    # ------------------------------------------------------------ running
    async def serve(self) -> int:
        settings = self.reloader.current.settings
        watcher = None
        if settings.watch_config and settings.config_file:
            path = settings.config_file
            watcher = asyncio.create_task(
                watch_file(path, lambda: self.reload(f"change of {path}"))
            )
        watch = asyncio.create_task(self.limit_watch.run())
        admin: AdminServer | None = None
        history = asyncio.create_task(self._sample_history())
        if self._admin_sock is not None:
            routes = admin_routes(
                self.observer,
                metrics_registry(self.observer),
                lambda: limit_report(self.reloader.current, self.pool, self.stats),
                self.top,
                self.taps if self.board is not None else None,
            )
            admin = await start_admin(self._admin_sock, routes)
        specs = settings.effective_upstreams
        upstreams = ", ".join(
            spec.address if spec.is_unix else f"{spec.protocol} {spec.address}" for spec in specs
        )
        unix = "".join(
            f" and {name} {path}"
            for name, path in (
                ("unix", settings.unix_socket),
                (f"unix stream ({settings.unix_stream_framing})", settings.unix_stream_socket),
            )
            if path is not None
        )
        build = self.observer.build
        admin_url = f"http://{admin.address[0]}:{admin.address[1]}" if admin else None
        self.log.info(
            "statsd-filter %s listening on %s %s:%d%s, forwarding to %s, %d worker(s), "
            "%d rule(s)%s; accelerator: %s, hyperscan: %s",
            __version__,
            "+".join(settings.protocols),
            settings.listen_host,
            self.listen.port,
            unix,
            upstreams,
            settings.workers,
            len(settings.all_rules),
            f", admin {admin_url}" if admin_url else "",
            build.accelerator,
            "yes" if build.hyperscan is not None else "no",
            extra={
                "fields": {
                    "version": __version__,
                    "listen": {
                        "host": settings.listen_host,
                        "port": self.listen.port,
                        "protocols": list(settings.protocols),
                    },
                    "upstreams": [
                        {"address": spec.address, "protocol": spec.protocol} for spec in specs
                    ],
                    "upstream_mode": settings.upstream_mode_in_use,
                    "workers": settings.workers,
                    "rules": len(settings.all_rules),
                    "admin": admin_url,
                    "build": build.as_dict(),
                    "systemd_notify": self.notifier.enabled,
                }
            },
        )
        if not build.accelerated:
            self.log.warning("%s", build.describe()[0])
        notifier = asyncio.create_task(self.notify_systemd()) if self.notifier.enabled else None
        status = await self.supervisor.run()
        if notifier is not None:
            notifier.cancel()
        history.cancel()
        watch.cancel()
        if watcher is not None:
            watcher.cancel()
        if admin is not None:
            await admin.close()
        totals = self.observer.totals()
        # Datagrams that arrived after every worker had stopped reading: lost,
        # but counted, so the last word on the books is exact.
        unread = [*self.listen.udp, *([self.listen.unix.sock] if self.listen.unix else [])]
        late = sum(map(count_unread_lines, unread))
        if late:
            self.log.warning("%d line(s) arrived after the workers stopped reading", late)
        final = {
            "received": totals["received"] + late,
            "forwarded": totals["forwarded"],
            "blocked": totals["blocked"],
            "aggregated": totals["aggregated"],
            "dropped": totals["dropped"] + late,
        }
        self.log.info(
            "stopped: received=%d forwarded=%d blocked=%d aggregated=%d dropped=%d",
            *final.values(),
            extra={"fields": {**final, "exit_status": status}},
        )
        return status

    async def _sample_history(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a read of shared memory; never fatal
                self.top.tick()
            await asyncio.sleep(HISTORY_INTERVAL)


def run(settings: Settings, loader: Loader | None = None) -> int:
    """Run the proxy until SIGTERM/SIGINT; returns the process exit status.

    ``loader`` builds fresh settings for reloads (same flags, re-read file and env).
    """
    log = setup_logging(settings.log_level, "supervisor", settings.log_format)
    raise_open_file_limit(log)
    try:
        listen = open_listen_sockets(settings, log)
    except StartupError as exc:
        log.error("%s", exc)  # noqa: TRY400 - the message says it all; no traceback
        return exc.status
    try:
        admin_sock = bind_admin_socket(settings) if settings.admin else None
    except StartupError as exc:
        listen.close()  # our Unix socket files go too
        log.error("%s", exc)  # noqa: TRY400 - the message says it all; no traceback
        return exc.status
    notifier = Notifier.from_environ(os.environ, log)
    try:
        app = App(settings, loader, listen, admin_sock, log, notifier)
        try:
            return asyncio.run(app.serve())
        finally:
            app.pool.close()
    finally:
        notifier.close()
        listen.close()
