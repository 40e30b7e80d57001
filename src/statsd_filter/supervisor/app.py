"""``statsd-filter run``: the parent process, wired from its parts.

Order at start: bind every socket (``sockets.py``), so a port clash fails fast
with exit status 1 before any worker exists; map the shared stats block; start
the admin endpoint; fork the workers (``process.py``), which inherit the
listening sockets and run :func:`statsd_filter.worker.main.run_worker`.

:class:`App` owns every part and is the only place they meet: the supervisor
calls back into it (a worker started, died or wrote; SIGHUP), and it hands each
part only what that part needs. The parent process never touches StatsD
traffic.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from prometheus_client import generate_latest

from statsd_filter import __version__
from statsd_filter.config import Settings
from statsd_filter.logs import setup_logging
from statsd_filter.stats import SharedStats, Stat
from statsd_filter.supervisor.admin import AdminServer, Response, start_admin
from statsd_filter.supervisor.observe import Observer
from statsd_filter.supervisor.process import Supervisor
from statsd_filter.supervisor.reload import RULE_CAPACITY, Loader, Reloader, Rollout, watch_file
from statsd_filter.supervisor.sockets import (
    ListenSockets,
    StartupError,
    bind_admin_socket,
    open_listen_sockets,
    raise_open_file_limit,
    udp_kernel_drops,
)
from statsd_filter.worker.main import WorkerSockets, run_worker
from statsd_filter.worker.udp import count_unread_lines

__all__ = ["App", "run"]

# What generate_latest() writes: the classic Prometheus text format.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class App:
    """The supervisor process: sockets, shared stats, workers, reloads, admin endpoint."""

    def __init__(
        self,
        settings: Settings,
        loader: Loader | None,
        listen: ListenSockets,
        admin_sock: socket.socket | None,
        log: logging.Logger,
    ) -> None:
        self.listen = listen
        self.log = log
        self._admin_sock = admin_sock
        self.stats = SharedStats(settings.workers, RULE_CAPACITY, len(settings.effective_upstreams))
        self.reloader = Reloader(settings, loader, log)
        unix = listen.unix.sock if listen.unix is not None else None
        unix_stream = listen.unix_stream.sock if listen.unix_stream is not None else None
        self._worker_sockets = WorkerSockets(
            listen.udp, listen.open_tcp if listen.tcp is not None else None, unix, unix_stream
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
            inherit=[sock for sock in (listen.udp, unix, unix_stream) if sock is not None],
        )
        self.rollout = Rollout(self.supervisor, log)
        self.observer = Observer(
            self.stats,
            self.supervisor.workers,
            self.reloader,
            self.rollout,
            listen.port,
            lambda: udp_kernel_drops(listen.udp),
            lambda: self.supervisor.stopping,
        )

    # ------------------------------------------------------------ supervisor callbacks
    def _worker_target(self, index: int, control: socket.socket) -> int:
        """Runs in the forked child: become worker ``index`` with the current config."""
        return run_worker(index, self.reloader.current, self._worker_sockets, self.stats, control)

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

    def _on_message(self, index: int, payload: bytes) -> None:
        self.rollout.on_message(index, payload)

    def reload(self, why: str) -> None:
        """Validate the config again and, if it is good, roll it out to the workers."""
        generation = self.reloader.reload(why)
        if generation is not None:
            self.rollout.start(generation)

    # ------------------------------------------------------------ running
    async def serve(self) -> int:
        settings = self.reloader.current.settings
        watcher = None
        if settings.watch_config and settings.config_file:
            path = settings.config_file
            watcher = asyncio.create_task(
                watch_file(path, lambda: self.reload(f"change of {path}"))
            )
        admin: AdminServer | None = None
        if self._admin_sock is not None:
            observer = self.observer
            routes = {
                "/healthz": lambda: Response.json(*observer.healthz()),
                "/metrics": lambda: Response(
                    200, METRICS_CONTENT_TYPE, generate_latest(observer.registry)
                ),
            }
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
        self.log.info(
            "statsd-filter %s listening on %s %s:%d%s, forwarding to %s, %d worker(s), "
            "%d rule(s)%s",
            __version__,
            "+".join(settings.protocols),
            settings.listen_host,
            self.listen.port,
            unix,
            upstreams,
            settings.workers,
            len(settings.all_rules),
            f", admin http://{admin.address[0]}:{admin.address[1]}" if admin else "",
        )
        status = await self.supervisor.run()
        if watcher is not None:
            watcher.cancel()
        if admin is not None:
            await admin.close()
        totals = self.observer.totals()
        # Datagrams that arrived after every worker had stopped reading: lost,
        # but counted, so the last word on the books is exact.
        unread = [self.listen.udp, self.listen.unix.sock if self.listen.unix else None]
        late = sum(count_unread_lines(sock) for sock in unread if sock is not None)
        if late:
            self.log.warning("%d line(s) arrived after the workers stopped reading", late)
        self.log.info(
            "stopped: received=%d forwarded=%d blocked=%d dropped=%d",
            totals["received"] + late,
            totals["forwarded"],
            totals["blocked"],
            totals["dropped"] + late,
        )
        return status


def run(settings: Settings, loader: Loader | None = None) -> int:
    """Run the proxy until SIGTERM/SIGINT; returns the process exit status.

    ``loader`` builds fresh settings for reloads (same flags, re-read file and env).
    """
    log = setup_logging(settings.log_level, "supervisor")
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
    try:
        return asyncio.run(App(settings, loader, listen, admin_sock, log).serve())
    finally:
        listen.close()
