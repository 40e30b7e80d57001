"""The supervisor's view of the proxy: /healthz (JSON) and the totals behind /metrics.

Both are read from the shared counters the workers write, the supervisor's
view of its workers, and the reload status; the supervisor never asks a
worker. ``metrics.py`` renders the same view as Prometheus metrics.

Counting each line once: a sharded line goes to one upstream, so per-upstream
values add up; a mirrored line goes to every upstream, so the first upstream
stands for the line in the proxy-wide totals (each upstream has its own series).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from statsd_filter import __version__
from statsd_filter.buildinfo import build_info
from statsd_filter.config import Settings
from statsd_filter.limitpool import LimitPool
from statsd_filter.stats import (
    UPSTREAM_DROP_REASONS,
    WORKER_DROP_REASONS,
    SharedStats,
    Stat,
    WorkerState,
    heartbeat_ms,
)
from statsd_filter.supervisor.process import WorkerInfo
from statsd_filter.supervisor.reload import Reloader, Rollout

__all__ = ["Observer"]

# A UDP upstream counts as "refused" this long after the last ICMP refusal.
REFUSED_WINDOW_MS = 5000


class Observer:
    """Builds /healthz and /metrics from the shared counters and the supervisor's state."""

    def __init__(
        self,
        stats: SharedStats,
        workers: Sequence[WorkerInfo],
        reloader: Reloader,
        rollout: Rollout,
        listen_port: int,
        kernel_drops: Callable[[], int],
        stopping: Callable[[], bool],
        pool: LimitPool | None = None,
    ) -> None:
        self.stats = stats
        self.pool = pool
        self.workers = workers
        self.reloader = reloader
        self.rollout = rollout
        self.listen_port = listen_port
        self.kernel_drops = kernel_drops
        self.stopping = stopping
        self.started = time.time()
        self.build = build_info()

    @property
    def settings(self) -> Settings:
        return self.reloader.current.settings

    # ------------------------------------------------------------ shared helpers
    def upstream_state(self, u: int) -> str:
        """up, down, refused or partial: one upstream as all live workers see it."""
        alive = [w.index for w in self.workers if w.alive]
        if not alive:
            return "down"
        get = self.stats.upstream_get
        now = heartbeat_ms()
        refused = any(
            0 < now - get(i, u, Stat.UPSTREAM_REFUSED_MS) < REFUSED_WINDOW_MS
            for i in alive
            if get(i, u, Stat.UPSTREAM_REFUSED_MS)
        )
        if refused:
            return "refused"
        ok = sum(
            1
            for i in alive
            if get(i, u, Stat.UPSTREAM_CONNECTED) and get(i, u, Stat.UPSTREAM_HEALTHY)
        )
        if ok == len(alive):
            return "up"
        return "down" if ok == 0 else "partial"

    def primary_total(self, stat: Stat) -> int:
        """A per-upstream value summed over the upstreams that count each line once."""
        specs = self.settings.effective_upstreams
        count = 1 if self.settings.upstream_mode_in_use == "mirror" else len(specs)
        return sum(self.stats.upstream_total(u, stat) for u in range(count))

    def all_upstreams_total(self, stat: Stat) -> int:
        """A per-upstream value summed over every upstream."""
        count = len(self.settings.effective_upstreams)
        return sum(self.stats.upstream_total(u, stat) for u in range(count))

    def dropped(self) -> dict[str, int]:
        """Lines lost, by reason, proxy-wide."""
        t = self.stats.total
        out = {reason: t(stat) for stat, reason in WORKER_DROP_REASONS.items()}
        out.update(
            (reason, self.primary_total(stat)) for stat, reason in UPSTREAM_DROP_REASONS.items()
        )
        return out

    def totals(self) -> dict[str, int]:
        """Proxy-wide line counts: received, forwarded, blocked, dropped (all reasons)."""
        t = self.stats.total
        return {
            "received": t(Stat.LINES_RECEIVED),
            "forwarded": self.primary_total(Stat.LINES_FORWARDED),
            "blocked": t(Stat.LINES_BLOCKED),
            "aggregated": t(Stat.LINES_AGGREGATED),
            "dropped": sum(self.dropped().values()),
        }

    def held(self, worker: int) -> list[int]:
        """Lines one worker has read but not yet accounted for, per upstream.

        ``received - blocked - aggregated - dropped - forwarded`` of that
        worker's slot: lines waiting in its aggregator, batchers and sender
        buffers (and, for UDP, sent but not yet confirmed). Once the worker is
        dead, they are lost. The first value is what counts proxy-wide (every value, in mirror mode,
        where each upstream gets its own copy of a line; one value otherwise).
        """
        g = self.stats.get
        up = self.stats.upstream_get
        count = len(self.settings.effective_upstreams)
        entered = (
            g(worker, Stat.LINES_RECEIVED)
            - g(worker, Stat.LINES_BLOCKED)
            - g(worker, Stat.DROPPED_OVERSIZE)
            - g(worker, Stat.DROPPED_PARTIAL)
            - g(worker, Stat.LINES_AGGREGATED)
        )

        def out(u: int) -> int:
            return up(worker, u, Stat.LINES_FORWARDED) + sum(
                up(worker, u, stat) for stat in UPSTREAM_DROP_REASONS
            )

        if self.settings.upstream_mode_in_use == "mirror":
            return [
                entered - out(u) - up(worker, u, Stat.UPSTREAM_WORKER_DIED) for u in range(count)
            ]
        return [entered - g(worker, Stat.DROPPED_WORKER_DIED) - sum(map(out, range(count)))]

    # ------------------------------------------------------------ /healthz
    def healthz(self) -> tuple[int, dict[str, Any]]:
        """The HTTP status and the JSON document of /healthz."""
        stats = self.stats
        workers = []
        for w in self.workers:
            state = WorkerState(stats.get(w.index, Stat.STATE)).name.lower()
            workers.append(
                {
                    "index": w.index,
                    "pid": w.pid if w.alive else None,
                    "state": state if w.alive else "restarting",
                    "restarts": w.restarts,
                    "tcp_connections": stats.get(w.index, Stat.TCP_CONNECTIONS_OPEN),
                    "unix_connections": stats.get(w.index, Stat.UNIX_CONNECTIONS_OPEN),
                    "last_exit": w.last_exit or None,
                    "config_generation": self.rollout.applied.get(w.index),
                }
            )
        running = sum(1 for w in workers if w["state"] == "running")
        s = self.settings
        specs = s.effective_upstreams
        states = [self.upstream_state(u) for u in range(len(specs))]
        if len(states) == 1:
            upstream = states[0]
        elif set(states) == {"up"}:
            upstream = "up"
        else:
            upstream = "down" if not {"up", "partial"} & set(states) else "partial"
        if self.stopping():
            status = "stopping"
        elif running == len(workers) and upstream == "up":
            status = "ok"
        else:
            status = "degraded"
        reload_status = self.reloader.status
        single = len(specs) == 1
        payload = {
            "status": status,
            "version": __version__,
            "build": self.build.as_dict(),
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 3),
            "listen": {
                "host": s.listen_host,
                "port": self.listen_port,
                "protocols": list(s.protocols),
                "unix_socket": s.unix_socket,
                "unix_stream_socket": s.unix_stream_socket,
            },
            "upstream": {
                "address": specs[0].address if single else None,
                "protocol": specs[0].protocol if single else None,
                "mode": s.upstream_mode_in_use,
                "state": upstream,
            },
            "upstreams": [
                {
                    "address": spec.address,
                    "protocol": spec.protocol,
                    "weight": spec.weight,
                    "state": state,
                    "lines_sent": stats.upstream_total(u, Stat.LINES_FORWARDED),
                    "buffered_bytes": stats.upstream_total(u, Stat.UPSTREAM_BUFFERED_BYTES),
                }
                for u, (spec, state) in enumerate(zip(specs, states, strict=True))
            ],
            "workers": workers,
            "config": {
                "file": s.config_file,
                "generation": self.reloader.current.number,
                "rules": len(s.all_rules),
                "last_reload": reload_status.last,
                "reload_failures": reload_status.failures,
                "restart_required": reload_status.restart_required,
            },
        }
        return (200 if running else 503), payload
