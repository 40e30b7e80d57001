"""``statsd-filter run``: open sockets, fork workers, serve the admin endpoint.

Order at start: bind every socket first (so a port clash fails fast with a
clear message and exit status 1, before any worker exists), map the shared
stats block, start the admin endpoint, then fork the workers, which inherit the
listening sockets. The supervisor process itself never touches StatsD traffic.

UDP: one inherited socket shared by all workers, not SO_REUSEPORT, because
SO_REUSEPORT hashes each UDP source (address, port) to one socket, so a single
busy client would land on one worker however many exist; workers reading one
shared socket split even a single client's datagrams between them. (Each worker
waits on it with EPOLLEXCLUSIVE, so a datagram wakes one worker, not all.)

TCP: one SO_REUSEPORT listening socket per worker. Connections are long-lived
and the kernel spreads them evenly by hash; with one shared listening socket a
burst of 64 clients all landed on one worker (see README, "Workers").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pickle
import resource
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from statsd_filter import __version__
from statsd_filter.config import HOT_SETTINGS, ConfigError, Settings, effective_upstreams
from statsd_filter.logs import setup_logging
from statsd_filter.rules.compile import StatRegistry, all_rules, stat_names
from statsd_filter.server.admin import AdminServer, Response, start_admin
from statsd_filter.server.worker import ConfigHolder, WorkerSockets, build_filter, worker_target
from statsd_filter.stats import (
    DROP_REASONS,
    RULE_METRICS,
    Counter,
    SharedStats,
    WorkerState,
    heartbeat_ms,
)
from statsd_filter.supervisor import Supervisor

__all__ = ["Listeners", "open_listeners", "run"]

TCP_BACKLOG = 4096
# Rule names with their own counter rows (across all reloads); later ones share
# the last row (logged). 65,536 rows cost 1.5 MB of shared memory per worker.
RULE_CAPACITY = 65536
# How often --watch-config looks at the config file.
WATCH_INTERVAL = 1.0
# How long a reload waits for one worker to confirm before moving on.
ROLLOUT_WORKER_TIMEOUT = 30.0
Loader = Callable[[], Settings]
# A UDP upstream counts as "refused" this long after the last ICMP refusal.
REFUSED_WINDOW_MS = 5000


class StartupError(Exception):
    """A socket could not be opened; the message says which and why."""


class Listeners:
    """The proxy's listening sockets, bound in the supervisor."""

    def __init__(
        self,
        udp: socket.socket | None,
        tcp: socket.socket | None,
        port: int,
        tcp_address: tuple[int, tuple[object, ...], str] | None = None,
    ) -> None:
        self.udp = udp
        # The TCP port, bound (SO_REUSEPORT) but not listening: it reserves the
        # port and fails fast on a clash; each worker listens on its own socket.
        self.tcp = tcp
        self.port = port
        self._tcp_address = tcp_address

    def open_tcp(self) -> socket.socket:
        """A new listening socket on the TCP port, for one worker (SO_REUSEPORT)."""
        assert self._tcp_address is not None
        family, address, host = self._tcp_address
        sock = _new_socket(family, socket.SOCK_STREAM, host)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(TCP_BACKLOG)
        sock.setblocking(False)
        return sock

    def close(self) -> None:
        for sock in (self.udp, self.tcp):
            if sock is not None:
                sock.close()


def _bind_address(host: str, port: int, kind: socket.SocketKind) -> tuple[int, tuple[object, ...]]:
    infos = socket.getaddrinfo(host, port, type=kind, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    return family, address


def _new_socket(family: int, kind: socket.SocketKind, host: str) -> socket.socket:
    sock = socket.socket(family, kind)
    if family == socket.AF_INET6 and host in ("::", ""):
        # "::" means every address, IPv4 included.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    return sock


def set_receive_buffer(sock: socket.socket, wanted: int, log: logging.Logger) -> int:
    """Ask for a ``wanted``-byte receive buffer; log clearly if the kernel caps it."""
    if wanted <= 0:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    try:
        # Privileged processes may exceed net.core.rmem_max; others fall back.
        if force is not None:
            sock.setsockopt(socket.SOL_SOCKET, force, wanted)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted)
    # Linux reports twice the usable size (it counts its bookkeeping overhead).
    got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
    if got < wanted:
        log.warning(
            "UDP receive buffer capped at %d bytes (asked for %d by so_rcvbuf); raise the "
            "kernel limit with: sysctl -w net.core.rmem_max=%d",
            got,
            wanted,
            wanted,
        )
    else:
        log.info("UDP receive buffer: %d bytes", got)
    return got


def open_listeners(settings: Settings, log: logging.Logger) -> Listeners:
    """Bind the UDP and TCP listeners on the same port (port 0 picks one for both)."""
    host, port = settings.listen_host, settings.listen_port
    udp = tcp = None
    tcp_address = None
    try:
        if "udp" in settings.protocols:
            family, address = _bind_address(host, port, socket.SOCK_DGRAM)
            udp = _new_socket(family, socket.SOCK_DGRAM, host)
            set_receive_buffer(udp, settings.so_rcvbuf, log)
            try:
                udp.bind(address)
            except OSError as exc:
                raise StartupError(f"cannot listen on udp {host}:{port}: {exc.strerror}") from exc
            udp.setblocking(False)
            port = udp.getsockname()[1]
        if "tcp" in settings.protocols:
            family, address = _bind_address(host, port, socket.SOCK_STREAM)
            tcp = _new_socket(family, socket.SOCK_STREAM, host)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                tcp.bind(address)
            except OSError as exc:
                raise StartupError(f"cannot listen on tcp {host}:{port}: {exc.strerror}") from exc
            port = tcp.getsockname()[1]
            tcp_address = (family, tcp.getsockname(), host)
    except socket.gaierror as exc:
        raise StartupError(f"cannot resolve listen_host {host!r}: {exc}") from exc
    except BaseException:
        for sock in (udp, tcp):
            if sock is not None:
                sock.close()
        raise
    return Listeners(udp, tcp, port, tcp_address)


def raise_open_file_limit(log: logging.Logger) -> None:
    """Thousands of TCP clients need thousands of descriptors: lift the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d: %s", soft, exc)


def udp_kernel_drops(sock: socket.socket | None) -> int:
    """Datagrams the kernel dropped on this socket (the ``drops`` column of /proc/net/udp)."""
    if sock is None:
        return 0
    inode = str(os.fstat(sock.fileno()).st_ino)
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 12 and fields[9] == inode:
                    return int(fields[12])
    return 0


def primary_total(stats: SharedStats, settings: Settings, counter: Counter) -> int:
    """A per-upstream counter summed over the upstreams that count each line once.

    Sharding sends each line to one upstream, so all count; mirroring sends it to
    all, so the first stands for the line (each upstream has its own series too).
    """
    count = 1 if settings.upstream_mode == "mirror" else len(effective_upstreams(settings))
    return sum(stats.upstream_total(u, counter) for u in range(count))


class Observer:
    """Builds /healthz and /metrics from the supervisor and the shared counters."""

    def __init__(
        self,
        config: ConfigHolder,
        supervisor: Supervisor,
        stats: SharedStats,
        listeners: Listeners,
        reloader: Reloader,
    ) -> None:
        self.config = config
        self.supervisor = supervisor
        self.stats = stats
        self.listeners = listeners
        self.reloader = reloader
        self.started = time.time()
        self.specs = effective_upstreams(config.settings)

    @property
    def settings(self) -> Settings:
        return self.config.settings

    def upstream_state(self, u: int = 0) -> str:
        """up, down, refused or partial: one upstream as all live workers see it."""
        alive = [w.index for w in self.supervisor.workers if w.alive]
        if not alive:
            return "down"
        get = self.stats.upstream_get
        now = heartbeat_ms()
        refused = any(
            0 < now - get(i, u, Counter.UPSTREAM_REFUSED_MS) < REFUSED_WINDOW_MS
            for i in alive
            if get(i, u, Counter.UPSTREAM_REFUSED_MS)
        )
        if refused:
            return "refused"
        ok = sum(
            1
            for i in alive
            if get(i, u, Counter.UPSTREAM_CONNECTED) and get(i, u, Counter.UPSTREAM_HEALTHY)
        )
        if ok == len(alive):
            return "up"
        return "down" if ok == 0 else "partial"

    def primary_total(self, counter: Counter) -> int:
        """See :func:`primary_total`."""
        return primary_total(self.stats, self.settings, counter)

    def all_upstreams_total(self, counter: Counter) -> int:
        """A per-upstream counter summed over every upstream."""
        return sum(self.stats.upstream_total(u, counter) for u in range(len(self.specs)))

    def healthz(self) -> Response:
        workers = []
        for w in self.supervisor.workers:
            state = WorkerState(self.stats.get(w.index, Counter.STATE)).name.lower()
            workers.append(
                {
                    "index": w.index,
                    "pid": w.pid if w.alive else None,
                    "state": state if w.alive else "restarting",
                    "restarts": w.restarts,
                    "tcp_connections": self.stats.get(w.index, Counter.TCP_CONNECTIONS_OPEN),
                    "last_exit": w.last_exit or None,
                    "config_generation": self.reloader.applied.get(w.index),
                }
            )
        running = sum(1 for w in workers if w["state"] == "running")
        s = self.settings
        states = [self.upstream_state(u) for u in range(len(self.specs))]
        if len(states) == 1:
            upstream = states[0]
        elif set(states) == {"up"}:
            upstream = "up"
        else:
            upstream = "down" if not {"up", "partial"} & set(states) else "partial"
        if self.supervisor.stopping:
            status = "stopping"
        elif running == len(workers) and upstream == "up":
            status = "ok"
        else:
            status = "degraded"
        payload = {
            "status": status,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 3),
            "listen": {
                "host": s.listen_host,
                "port": self.listeners.port,
                "protocols": list(s.protocols),
            },
            "upstream": {
                "address": self.specs[0].address if len(self.specs) == 1 else None,
                "protocol": self.specs[0].protocol if len(self.specs) == 1 else None,
                "mode": "single" if len(self.specs) == 1 else s.upstream_mode,
                "state": upstream,
            },
            "upstreams": [
                {
                    "address": spec.address,
                    "protocol": spec.protocol,
                    "weight": spec.weight,
                    "state": state,
                    "lines_sent": self.stats.upstream_total(u, Counter.LINES_FORWARDED),
                    "buffered_bytes": self.stats.upstream_total(u, Counter.UPSTREAM_BUFFERED_BYTES),
                }
                for u, (spec, state) in enumerate(zip(self.specs, states, strict=True))
            ],
            "workers": workers,
            "config": {
                "file": s.config_file,
                "generation": self.config.generation,
                "rules": len(all_rules(s.blocklist, s.rules)),
                "last_reload": self.reloader.last,
                "reload_failures": self.reloader.failures,
                "restart_required": self.reloader.restart_required,
            },
        }
        return Response.json(200 if running else 503, payload)

    def metrics(self) -> Response:
        t = self.stats.total
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, int]]) -> None:
            out.append(f"# HELP statsd_filter_{name} {help_text}")
            out.append(f"# TYPE statsd_filter_{name} {kind}")
            out.extend(f"statsd_filter_{name}{labels} {value}" for labels, value in samples)

        def counter(name: str, help_text: str, value: int) -> None:
            metric(name, "counter", help_text, [("", value)])

        def gauge(name: str, help_text: str, value: int) -> None:
            metric(name, "gauge", help_text, [("", value)])

        version = [(f'{{version="{__version__}"}}', 1)]
        metric("build_info", "gauge", "Version of statsd-filter.", version)
        counter(
            "lines_received_total",
            "Non-empty lines read from clients (UDP and TCP).",
            t(Counter.LINES_RECEIVED),
        )
        counter(
            "lines_forwarded_total",
            "Lines handed to the upstream socket(s); a mirrored line counts once.",
            self.primary_total(Counter.LINES_FORWARDED),
        )
        counter("lines_blocked_total", "Lines removed by rules.", t(Counter.LINES_BLOCKED))
        metric(
            "lines_dropped_total",
            "counter",
            "Lines lost, by reason (oversize, upstream, queue_full, partial).",
            [
                (f'{{reason="{reason}"}}', t(c) + self.primary_total(c))
                for c, reason in DROP_REASONS.items()
            ],
        )
        counter("datagrams_received_total", "UDP datagrams read.", t(Counter.DATAGRAMS_IN))
        counter("bytes_received_total", "Bytes read from clients.", t(Counter.BYTES_IN))
        counter(
            "datagrams_sent_total",
            "Upstream datagrams (or TCP writes) sent, all upstreams.",
            self.all_upstreams_total(Counter.DATAGRAMS_OUT),
        )
        counter(
            "bytes_sent_total",
            "Bytes sent upstream, all upstreams.",
            self.all_upstreams_total(Counter.BYTES_OUT),
        )
        counter("receive_errors_total", "Errors reading the UDP socket.", t(Counter.RECEIVE_ERRORS))
        gauge(
            "udp_kernel_drops",
            "Datagrams the kernel dropped because the receive buffer was full.",
            udp_kernel_drops(self.listeners.udp),
        )
        gauge(
            "tcp_connections_open", "TCP client connections open.", t(Counter.TCP_CONNECTIONS_OPEN)
        )
        counter(
            "tcp_connections_accepted_total",
            "TCP clients accepted.",
            t(Counter.TCP_CONNECTIONS_ACCEPTED),
        )
        counter(
            "tcp_connections_rejected_total",
            "TCP clients refused (max_connections or out of descriptors).",
            t(Counter.TCP_CONNECTIONS_REJECTED),
        )
        counter(
            "tcp_idle_closed_total", "TCP clients closed for idleness.", t(Counter.TCP_IDLE_CLOSED)
        )
        counter(
            "upstream_errors_total",
            "Upstream send, connect and resolve errors and refusals, all upstreams.",
            self.all_upstreams_total(Counter.UPSTREAM_ERRORS),
        )
        counter(
            "upstream_connects_total",
            "Successful TCP upstream connects, all upstreams.",
            self.all_upstreams_total(Counter.UPSTREAM_RECONNECTS),
        )
        states = [self.upstream_state(u) for u in range(len(self.specs))]
        labels = [f'{{upstream="{spec.address}"}}' for spec in self.specs]
        metric(
            "upstream_up",
            "gauge",
            "1 if every worker finds the upstream healthy, else 0.",
            [(label, int(state == "up")) for label, state in zip(labels, states, strict=True)],
        )
        per_upstream = (
            ("upstream_lines_sent_total", "counter", "Lines sent.", Counter.LINES_FORWARDED),
            ("upstream_bytes_sent_total", "counter", "Bytes sent.", Counter.BYTES_OUT),
            ("upstream_failures_total", "counter", "Errors and refusals.", Counter.UPSTREAM_ERRORS),
            ("upstream_buffered_bytes", "gauge", "Bytes waiting.", Counter.UPSTREAM_BUFFERED_BYTES),
        )
        for name, kind, help_text, which in per_upstream:
            samples = [
                (label, self.stats.upstream_total(u, which)) for u, label in enumerate(labels)
            ]
            metric(name, kind, f"{help_text} Per upstream.", samples)
        metric(
            "upstream_dropped_total",
            "counter",
            "Lines each upstream lost, by reason.",
            [
                (
                    f'{{upstream="{spec.address}",reason="{reason}"}}',
                    self.stats.upstream_total(u, c),
                )
                for u, spec in enumerate(self.specs)
                for c, reason in (
                    (Counter.DROPPED_UPSTREAM, "upstream"),
                    (Counter.DROPPED_QUEUE_FULL, "queue_full"),
                )
            ],
        )
        gauge(
            "upstream_buffered_bytes_total",
            "Bytes waiting for any upstream.",
            self.all_upstreams_total(Counter.UPSTREAM_BUFFERED_BYTES),
        )
        counter(
            "config_reloads_total",
            "Config reloads applied (SIGHUP or --watch-config).",
            self.reloader.successes,
        )
        counter(
            "config_reload_failures_total",
            "Config reloads rejected (the running config was kept).",
            self.reloader.failures,
        )
        gauge(
            "config_generation",
            "Generation of the running config (0 at start).",
            self.config.generation,
        )
        helps = (
            "Lines each rule decided.",
            "Lines each rule removed (dropped or sampled away).",
            "Bytes each rule removed from the upstream stream.",
        )
        for field, (name, help_text) in enumerate(zip(RULE_METRICS, helps, strict=True)):
            samples = [
                (f'{{rule="{rule}"}}', self.stats.rule_total(row, field))
                for rule, row in self.config.rows.items()
            ]
            metric(name, "counter", help_text, samples)
        workers = self.supervisor.workers
        gauge("workers", "Worker processes alive.", sum(1 for w in workers if w.alive))
        counter(
            "worker_restarts_total",
            "Workers restarted after dying.",
            sum(w.restarts for w in workers),
        )
        return Response.text(200, "\n".join(out) + "\n", "text/plain; version=0.0.4; charset=utf-8")


class Reloader:
    """Loads, validates and hands new rules to the workers (SIGHUP, --watch-config)."""

    def __init__(
        self,
        config: ConfigHolder,
        loader: Loader | None,
        registry: StatRegistry,
        log: logging.Logger,
    ) -> None:
        self.config = config
        self.loader = loader
        self.registry = registry
        self.log = log
        self.supervisor: Supervisor | None = None
        self.successes = 0
        self.failures = 0
        self.last: dict[str, Any] | None = None
        self.restart_required: list[str] = []
        self.applied: dict[int, int] = {}
        self._rollout: asyncio.Task[None] | None = None

    def reload(self, why: str = "SIGHUP") -> None:
        """Validate the config again and, if it is good, send the hot settings to workers."""
        current = self.config.settings
        if self.loader is None:
            self.log.info("%s: nothing to reload", why)
            return
        try:
            new = self.loader()
            build_filter(
                new,
                dict.fromkeys(
                    stat_names(all_rules(new.blocklist, new.rules), new.allowlist_mode), 0
                ),
            )
        except (ConfigError, ValueError) as exc:
            self.failures += 1
            self.last = {"ok": False, "at": time.time(), "trigger": why, "error": str(exc)}
            self.log.error("config reload (%s) rejected, keeping the running config: %s", why, exc)  # noqa: TRY400
            return
        changed_cold = [
            f.name
            for f in dataclasses.fields(Settings)
            if f.name not in HOT_SETTINGS
            and f.name not in ("sources", "config_file")
            and getattr(new, f.name) != getattr(current, f.name)
        ]
        hot = {name: getattr(new, name) for name in HOT_SETTINGS}
        sources = dict(current.sources)
        sources.update({name: new.sources.get(name, "default") for name in HOT_SETTINGS})
        merged = dataclasses.replace(current, **hot, sources=sources)
        for name in stat_names(all_rules(merged.blocklist, merged.rules), merged.allowlist_mode):
            self.registry.row(name)
        self.config.settings = merged
        self.config.rows = dict(self.registry.rows)
        self.config.generation += 1
        self.successes += 1
        self.restart_required = changed_cold
        self.last = {
            "ok": True,
            "at": time.time(),
            "trigger": why,
            "generation": self.config.generation,
        }
        logging.getLogger().setLevel(merged.log_level.upper())
        rules = len(all_rules(merged.blocklist, merged.rules))
        self.log.info(
            "config reloaded (%s): generation %d, %d rule(s)", why, self.config.generation, rules
        )
        if changed_cold:
            self.log.warning(
                "settings that need a restart to take effect: %s", ", ".join(changed_cold)
            )
        if self.supervisor is not None:
            message = {
                "generation": self.config.generation,
                "settings": merged,
                "rows": self.config.rows,
            }
            if self._rollout is not None:
                self._rollout.cancel()  # a newer generation supersedes it
            self._rollout = asyncio.get_running_loop().create_task(
                self._roll_out(self.config.generation, pickle.dumps(message))
            )

    async def _roll_out(self, generation: int, payload: bytes) -> None:
        """Hand a new config to one worker at a time.

        A worker compiling a large rule set is busy for a moment; the others
        keep draining the shared UDP socket meanwhile, so a reload never leaves
        the socket unread (TCP clients of the busy worker just wait in the kernel).
        """
        assert self.supervisor is not None
        for worker in list(self.supervisor.workers):
            if not self.supervisor.send(worker.index, payload):
                continue  # dead: it is forked again with the current config
            deadline = time.monotonic() + ROLLOUT_WORKER_TIMEOUT
            while self.applied.get(worker.index, -1) < generation and worker.alive:
                if time.monotonic() > deadline:
                    self.log.error(
                        "worker %d did not confirm generation %d", worker.index, generation
                    )
                    break
                await asyncio.sleep(0.01)

    def on_message(self, index: int, payload: bytes) -> None:
        """A worker's acknowledgement of a config generation."""
        reply = pickle.loads(payload)  # noqa: S301 - from our own worker
        if reply.get("ok"):
            self.applied[index] = reply["generation"]
        else:
            self.log.error(
                "worker %d could not apply generation %s: %s",
                index,
                reply.get("generation"),
                reply.get("error"),
            )

    def on_worker_started(self, index: int) -> None:
        # A (re)started worker is forked with the current config.
        self.applied[index] = self.config.generation

    async def watch(self, path: str) -> None:
        """Reload whenever the file's size or modification time changes."""

        def stamp() -> tuple[int, int] | None:
            try:
                st = Path(path).stat()
            except OSError:
                return None
            return (st.st_mtime_ns, st.st_size)

        last = stamp()
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            now = stamp()
            if now != last:
                last = now
                self.reload(f"change of {path}")


def run(settings: Settings, loader: Loader | None = None) -> int:
    """Run the proxy until SIGTERM/SIGINT; returns the process exit status.

    ``loader`` builds fresh settings for reloads (same flags, re-read file and env).
    """
    log = setup_logging(settings.log_level, "supervisor")
    raise_open_file_limit(log)
    try:
        listeners = open_listeners(settings, log)
        admin_sock = _admin_socket(settings) if settings.admin else None
    except StartupError as exc:
        log.error("%s", exc)  # noqa: TRY400 - the message says it all; no traceback
        return 1
    try:
        return asyncio.run(_serve(settings, loader, listeners, admin_sock, log))
    finally:
        listeners.close()


def _admin_socket(settings: Settings) -> socket.socket:
    host, port = settings.admin_host, settings.admin_port
    try:
        family, address = _bind_address(host, port, socket.SOCK_STREAM)
        sock = _new_socket(family, socket.SOCK_STREAM, host)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
    except OSError as exc:
        raise StartupError(
            f"cannot listen on admin http {host}:{port}: {exc.strerror or exc}"
        ) from exc
    sock.setblocking(False)
    return sock


async def _serve(
    settings: Settings,
    loader: Loader | None,
    listeners: Listeners,
    admin_sock: socket.socket | None,
    log: logging.Logger,
) -> int:
    stats = SharedStats(settings.workers, RULE_CAPACITY, len(effective_upstreams(settings)))
    registry = StatRegistry(RULE_CAPACITY)
    for name in stat_names(all_rules(settings.blocklist, settings.rules), settings.allowlist_mode):
        registry.row(name)
    if len(registry.rows) >= RULE_CAPACITY:
        log.warning("more than %d rules: the last ones share one counter row", RULE_CAPACITY)
    config = ConfigHolder(settings, dict(registry.rows))
    reloader = Reloader(config, loader, registry, log)
    sockets = WorkerSockets(listeners.udp, listeners.open_tcp if listeners.tcp else None)
    close_in_child = tuple(s for s in (admin_sock, listeners.tcp) if s is not None)
    supervisor = Supervisor(
        worker_target(config, sockets, stats, close_in_child),
        settings.workers,
        settings.shutdown_timeout,
        log,
        on_worker_exit=stats.reset_gauges,
        on_reload=reloader.reload,
        on_message=reloader.on_message,
        on_worker_started=reloader.on_worker_started,
    )
    reloader.supervisor = supervisor
    watcher = None
    if settings.watch_config and settings.config_file:
        watcher = asyncio.create_task(reloader.watch(settings.config_file))
    admin: AdminServer | None = None
    if admin_sock is not None:
        observer = Observer(config, supervisor, stats, listeners, reloader)
        routes = {"/healthz": observer.healthz, "/metrics": observer.metrics}
        admin = await start_admin(admin_sock, routes)
    protocols = "+".join(settings.protocols)
    log.info(
        "statsd-filter %s listening on %s %s:%d, forwarding to %s %s:%d, %d worker(s), "
        "%d rule(s)%s",
        __version__,
        protocols,
        settings.listen_host,
        listeners.port,
        settings.target_protocol,
        settings.target_host,
        settings.target_port,
        settings.workers,
        len(all_rules(settings.blocklist, settings.rules)),
        f", admin http://{admin.address[0]}:{admin.address[1]}" if admin else "",
    )
    status = await supervisor.run()
    if watcher is not None:
        watcher.cancel()
    if admin is not None:
        await admin.close()
    t = stats.total
    dropped = sum(t(c) + primary_total(stats, settings, c) for c in DROP_REASONS)
    log.info(
        "stopped: received=%d forwarded=%d blocked=%d dropped=%d",
        t(Counter.LINES_RECEIVED),
        primary_total(stats, settings, Counter.LINES_FORWARDED),
        t(Counter.LINES_BLOCKED),
        dropped,
    )
    return status
