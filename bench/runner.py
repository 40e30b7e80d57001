"""Running one scenario: sink(s), proxy, load generator, CPU and memory sampling.

:class:`Runner` runs scenarios in order and remembers their outcomes (the
half-rate scenario takes its rate from the direct flood's). For a load
scenario it starts fresh sinks and, unless the scenario is a ``direct`` one, a
fresh ``statsd-filter run``, forks the generator, reads the proxy's CPU, RSS
and ``/metrics`` before and after the load, waits for the sinks to go quiet and
hands what they got to ``checks``. The idle-TCP scenario instead opens many
connections and reads the memory they hold.
"""

from __future__ import annotations

import os
import resource
import socket
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from checks import RULE_SAVED, cross_sink_checks, integrity, merge_sinks
from loadgen import LoadGenerator, LoadResult, LoadSpec
from proxyctl import HOST, Proxy, RssSampler, process_cpu, pss_kib
from report import compare
from ruleset import Rule, benchmark_rules, rules_toml, unexpected_matches
from sampling import (
    BUSY_THRESHOLD,
    OtherCpu,
    Profiler,
    start_profilers,
    stop_profilers,
    tcp_kernel_pages,
    wait_until_idle,
)
from scenarios import RESULTS, Config, Outcome, Scenario
from sink import Sink, SinkSpec
from workload import DEFAULT_BLOCKLIST, Traffic, big_blocklist, build_datagrams

MIB = 1024 * 1024


# Timestamp about this many datagrams per second in paced runs (enough samples,
# little extra work for the generator).
STAMPS_PER_SECOND = 5000


# The idle-TCP scenario: time limit for opening the connections, and the pause
# before reading memory (so the workers have accepted and settled).
IDLE_CONNECT_SECONDS = 60.0


IDLE_SETTLE_SECONDS = 1.0


# Workers publish their per-rule counters about once a second: how long to wait for
# them to account for every blocked line before reading the metrics.
RULE_COUNTERS_WAIT = 3.0


class Runner:
    """Runs scenarios in order, remembering what later ones compare against."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.outcomes: dict[str, Outcome] = {}
        self._traffic: dict[str, Traffic] = {}
        self._datagrams: dict[int, list[bytes]] = {}
        self._big: tuple[str, ...] = ()
        self._rules: tuple[Rule, ...] = ()

    # ------------------------------------------------------------ inputs
    def blocklist(self, kind: str) -> tuple[str, ...]:
        if kind == "big":
            if not self._big:
                self._big = big_blocklist(self.cfg.prefixes)
            return self._big
        return DEFAULT_BLOCKLIST

    def traffic(self, kind: str) -> Traffic:
        if kind not in self._traffic:
            self._traffic[kind] = Traffic.build(self.cfg.blocked_share, self.blocklist(kind))
        return self._traffic[kind]

    def rules(self) -> tuple[Rule, ...]:
        """The rules scenario's rule set, checked not to change which lines pass."""
        if not self._rules:
            cfg = self.cfg
            rules = benchmark_rules(cfg.prefixes, cfg.regex_rules, cfg.tag_rules)
            problems = unexpected_matches(rules, self.traffic("big"))
            if problems:
                raise RuntimeError(f"the benchmark rules would change the traffic: {problems[:3]}")
            self._rules = rules
        return self._rules

    def write_rules(self) -> Path:
        """The rule set as a TOML config in a temporary file (the caller deletes it)."""
        fd, name = tempfile.mkstemp(prefix="statsd-filter-bench-rules-", suffix=".toml")
        with os.fdopen(fd, "w") as f:
            f.write(rules_toml(self.rules()))
        return Path(name)

    def datagrams(self, total: int) -> list[bytes]:
        # The lines are the same whatever the blocklist: only which ones pass differs.
        if total not in self._datagrams:
            self._datagrams[total] = build_datagrams(
                self.traffic("one"), total, self.cfg.lines_per_datagram
            )
        return self._datagrams[total]

    def rate_for(self, sc: Scenario) -> float:
        """Offered lines/s (0: as fast as possible)."""
        if sc.rate == "latency":
            return self.cfg.latency_rate
        if sc.rate == "half":
            direct = self.outcomes.get("direct-udp")
            if direct is None or not direct.received_per_s:
                return self.cfg.rate or self.cfg.latency_rate
            return direct.received_per_s / 2
        return self.cfg.rate

    def lines_for(self, sc: Scenario, rate: float) -> int:
        if sc.rate == "latency":
            return max(1000, int(rate * self.cfg.latency_seconds))
        if rate > 0:
            return max(1000, min(self.cfg.total_lines, int(rate * self.cfg.paced_seconds)))
        return self.cfg.total_lines

    # ------------------------------------------------------------ one load scenario
    def run(self, sc: Scenario) -> Outcome:
        out = Outcome(sc.name, sc.about, baseline=sc.baseline)
        out.machine_busy_pct = round(wait_until_idle(self.cfg.wait_idle), 1)
        if out.machine_busy_pct > BUSY_THRESHOLD:
            print(f"  warning: machine {out.machine_busy_pct:.0f}% busy before {sc.name}")
        started = time.monotonic()
        try:
            if sc.idle:
                self._run_idle(sc, out)
            else:
                self._run_load(sc, out)
        except Exception as exc:
            out.error = f"{type(exc).__name__}: {exc}"
        out.seconds = round(time.monotonic() - started, 2)
        compare(sc, out, self.outcomes)
        self.outcomes[sc.name] = out
        return out

    def _run_load(self, sc: Scenario, out: Outcome) -> None:
        cfg = self.cfg
        traffic = self.traffic(sc.blocklist)
        rate = self.rate_for(sc)
        total = self.lines_for(sc, rate)
        datagrams = self.datagrams(total)
        out.rate_target = rate
        stamp_every = 0
        if rate > 0:
            per_second = rate / cfg.lines_per_datagram
            stamp_every = max(1, round(per_second / STAMPS_PER_SECOND))
        sink_protocol = sc.target_protocol if sc.via_proxy else sc.input
        several = sc.via_proxy and sc.upstreams > 1
        spec = SinkSpec(sink_protocol, total, max_seconds=cfg.max_seconds + 30, keep_seen=several)
        sinks = [Sink(spec, traffic) for _ in range(sc.upstreams if several else 1)]
        started: list[Sink] = []
        proxy: Proxy | None = None
        sampler: RssSampler | None = None
        profilers: list[Profiler] = []
        sink_results: list[dict[str, Any]] = []
        config_file: Path | None = None
        try:
            for sink in sinks:
                sink.start()
                started.append(sink)
            port = sinks[0].port
            if sc.via_proxy:
                RESULTS.mkdir(parents=True, exist_ok=True)
                extra = list(cfg.proxy_args)
                if sc.rules:
                    config_file = self.write_rules()
                    extra += ["--config", str(config_file)]
                    kinds = Counter(r.key for r in self.rules())
                    out.checks["rules"] = {k: kinds[k] for k in ("prefix", "regex", "tag")}
                if several:
                    for sink in sinks:
                        extra += ["--target", f"{HOST}:{sink.port}"]
                if sc.upstream_mode:
                    extra += ["--upstream-mode", sc.upstream_mode]
                proxy = Proxy(
                    cfg.proxy,
                    sinks[0].port,
                    target_protocol=sc.target_protocol,
                    workers=sc.workers,
                    # The rules scenario's first rule is the blocklist's prefix.
                    blocklist=() if sc.rules else self.blocklist(sc.blocklist),
                    log_path=RESULTS / f"proxy-{sc.name}.log",
                    extra_args=tuple(extra),
                )
                health = proxy.start()
                out.workers = len(health.get("workers", []))
                port = proxy.listen_port
            sources = cfg.tcp_clients if sc.input == "tcp" else cfg.sources
            gen = LoadGenerator(
                LoadSpec(
                    sc.input,
                    port,
                    processes=cfg.processes,
                    sources=1 if sc.single_source else sources,
                    rate=rate,
                    stamp_every=stamp_every,
                    max_seconds=cfg.max_seconds,
                ),
                traffic,
                datagrams,
                cfg.lines_per_datagram,
                total,
            )
            gen.prepare()
            before_cpu: dict[int, float] = {}
            before_metrics: dict[str, float] = {}
            if proxy is not None:
                if sc.input == "tcp":
                    # Which worker accepted the generator's connections.
                    workers = proxy.current_health().get("workers", [])
                    out.tcp_connections_per_worker = [w.get("tcp_connections", 0) for w in workers]
                sampler = RssSampler(proxy.pids())
                sampler.start()
                before_metrics = proxy.metrics()
                before_cpu = proxy.cpu()
                if cfg.py_spy and sc.name in cfg.profile_scenario.split(","):
                    profilers = start_profilers(cfg.py_spy, proxy.worker_pids(), sc.name)
            sink_pids = [s.pid for s in sinks if s.pid]
            others = OtherCpu([*sink_pids, *(proxy.pids() if proxy else [])])
            sink_cpu = {pid: process_cpu(pid) or 0.0 for pid in sink_pids}
            t0 = gen.go()
            load = gen.wait()
            out.load = _load_summary(load)
            for sink in sinks:
                sink.done()
            for sink in sinks:
                sink.wait_quiet()
            out.sink_cpu_s = round(
                sum((process_cpu(pid) or cpu) - cpu for pid, cpu in sink_cpu.items()), 2
            )
            if proxy is not None:
                after_cpu = proxy.cpu()
                out.other_cpu_s = round(others.seconds(), 2)
                out.softirq_s, out.steal_s = round(others.softirq_s, 2), round(others.steal_s, 2)
                after_metrics = settled_metrics(proxy, before_metrics)
                if profilers:
                    out.profile = stop_profilers(profilers)
                assert sampler is not None
                sampler.stop()
                self._proxy_figures(proxy, sampler, before_cpu, after_cpu, out)
                out.proxy_metrics = _metric_deltas(before_metrics, after_metrics)
                lines_in = out.proxy_metrics.get("statsd_filter_lines_received_total", 0)
                out.proxy_lines_received = int(lines_in)
                if lines_in and out.proxy_cpu_s is not None:
                    out.cpu_per_million = out.proxy_cpu_s / (lines_in / 1e6)
                # Stop the proxy before the sinks close, so its upstreams never go away.
                out.proxy_exit = proxy.stop()
            else:
                out.other_cpu_s = round(others.seconds(), 2)
                out.softirq_s, out.steal_s = round(others.softirq_s, 2), round(others.steal_s, 2)
            sink_results = [sink.finish() for sink in sinks]
            self._load_figures(sc, load, sink_results, [s.port for s in sinks], t0, out)
            integrity(sc, out, self.rules()[0].name if sc.rules else "blocklist")
        finally:
            if sampler is not None:
                sampler.stop()
            for prof in profilers:
                if prof.proc.poll() is None:
                    prof.proc.kill()
                    prof.proc.wait(5)
            if proxy is not None:
                proxy.stop()
                out.proxy_log_warnings = _count_warnings(proxy.log_path)
            if not sink_results:
                for sink in started:
                    sink.finish()
            if config_file is not None:
                config_file.unlink(missing_ok=True)

    def _proxy_figures(
        self,
        proxy: Proxy,
        sampler: RssSampler,
        before: dict[int, float],
        after: dict[int, float],
        out: Outcome,
    ) -> None:
        out.proxy_cpu_s = round(sum(after[p] - before.get(p, 0.0) for p in after), 3)
        workers = proxy.worker_pids()
        out.worker_cpu_s = [round(after.get(p, 0.0) - before.get(p, 0.0), 3) for p in workers]
        out.peak_rss_mb = round(sampler.peak_total_kib / 1024, 1)
        out.pss_mb = round(sum(pss_kib(p) or 0 for p in proxy.pids()) / 1024, 1)
        hwm = proxy.hwm_kib()
        out.worker_hwm_mb = [round(hwm.get(p, 0) / 1024, 1) for p in workers]

    def _load_figures(
        self,
        sc: Scenario,
        load: LoadResult,
        sinks: list[dict[str, Any]],
        ports: list[int],
        t0: int,
        out: Outcome,
    ) -> None:
        seen = [r.pop("seen", b"") for r in sinks]
        out.sink = merge_sinks(sinks)
        out.latency_us = sinks[0].get("latency_us", {}) if len(sinks) == 1 else {}
        out.lines_sent = load.lines
        out.passing_sent = load.passing
        out.offered_per_s = load.lines / load.seconds
        last = max(int(r.get("last_ns", 0)) for r in sinks)
        window = max(1e-9, (last - t0) / 1e9) if last else load.seconds
        each = [int(r.get("passing", 0)) for r in sinks]
        blocked = sum(int(r.get("blocked_seen", 0)) for r in sinks)
        mirror = sc.upstream_mode == "mirror"
        # Mirrored, a line counts as delivered only if every sink could have it: the
        # sink that got least decides. Sharded, the sinks' lines add up.
        passing = min(each) if mirror else sum(each)
        out.delivered_per_s = passing / window
        out.received_per_s = (passing + (blocked // len(sinks) if mirror else blocked)) / window
        out.delivered_pct = 100.0 * passing / load.passing if load.passing else 0.0
        if len(sinks) > 1:
            total = max(1, sum(each))
            out.sinks = [
                {
                    "port": port,
                    "passing": n,
                    "share_pct": round(100.0 * n / total, 2),
                    "delivered_pct": round(100.0 * n / max(1, load.passing), 2),
                    **{
                        k: r.get(k)
                        for k in (
                            "lines",
                            "blocked_seen",
                            "corrupt",
                            "duplicates",
                            "kernel_drops",
                            "empty_datagrams",
                            "reads",
                            "timed_out",
                            "error",
                        )
                        if k in r
                    },
                }
                for port, n, r in zip(ports, each, sinks, strict=True)
            ]
            out.checks.update(cross_sink_checks(mirror, seen, self.traffic(sc.blocklist)))

    # ------------------------------------------------------------ idle TCP memory
    def _run_idle(self, sc: Scenario, out: Outcome) -> None:
        cfg = self.cfg
        traffic = self.traffic("one")
        sink = Sink(SinkSpec("udp", 1, max_seconds=IDLE_CONNECT_SECONDS + 60), traffic)
        sink.start()
        RESULTS.mkdir(parents=True, exist_ok=True)
        proxy = Proxy(
            cfg.proxy,
            sink.port,
            blocklist=DEFAULT_BLOCKLIST,
            log_path=RESULTS / f"proxy-{sc.name}.log",
            extra_args=(*cfg.proxy_args, "--tcp-idle-timeout", "0"),
        )
        conns: list[socket.socket] = []
        failures: Counter[str] = Counter()
        try:
            health = proxy.start()
            out.workers = len(health.get("workers", []))
            sampler = RssSampler(proxy.pids())
            time.sleep(IDLE_SETTLE_SECONDS)
            baseline_kib = sampler.sample()
            baseline_pss = sum(pss_kib(p) or 0 for p in proxy.pids())
            baseline_tcp_mem = tcp_kernel_pages()
            sampler.start()
            deadline = time.monotonic() + IDLE_CONNECT_SECONDS
            while len(conns) < cfg.idle_conns and time.monotonic() < deadline:
                try:
                    conns.append(socket.create_connection((HOST, proxy.listen_port), timeout=5))
                except OSError as exc:
                    failures[type(exc).__name__] += 1
                    if sum(failures.values()) > 100:
                        break
            accepted = 0.0
            while time.monotonic() < deadline:
                accepted = proxy.metrics().get("statsd_filter_tcp_connections_open", 0.0)
                if accepted >= len(conns):
                    break
                time.sleep(0.1)
            time.sleep(IDLE_SETTLE_SECONDS)
            held_kib = sampler.sample()
            held_pss = sum(pss_kib(p) or 0 for p in proxy.pids())
            held_tcp_mem = tcp_kernel_pages()
            health = proxy.current_health()
            per_worker = [w.get("tcp_connections", 0) for w in health.get("workers", [])]
            per_process = {pid: sampler.peak_kib.get(pid, 0) for pid in sampler.pids}
            sampler.stop()
            out.peak_rss_mb = round(sampler.peak_total_kib / 1024, 1)
            hwm = proxy.hwm_kib()
            out.worker_hwm_mb = [round(hwm.get(p, 0) / 1024, 1) for p in proxy.worker_pids()]
            out.idle = {
                "requested": cfg.idle_conns,
                "opened": len(conns),
                "accepted_by_proxy": int(accepted),
                "connect_failures": dict(failures),
                "rss_before_mb": round(baseline_kib / 1024, 1),
                "rss_held_mb": round(held_kib / 1024, 1),
                "added_mb": round((held_kib - baseline_kib) / 1024, 1),
                "kib_per_connection": round((held_kib - baseline_kib) / max(1, len(conns)), 2),
                "pss_before_mb": round(baseline_pss / 1024, 1),
                "pss_held_mb": round(held_pss / 1024, 1),
                "connections_per_worker": per_worker,
                # Socket buffers live in the kernel, outside any RSS (both ends counted).
                "kernel_tcp_mem_added_mb": round(
                    (held_tcp_mem - baseline_tcp_mem) * resource.getpagesize() / MIB, 1
                ),
                "peak_rss_per_process_mb": {
                    str(pid): round(kib / 1024, 1) for pid, kib in per_process.items()
                },
            }
        finally:
            for conn in conns:
                conn.close()
            out.proxy_exit = proxy.stop()
            out.proxy_log_warnings = _count_warnings(proxy.log_path)
            sink.finish()


def _load_summary(load: LoadResult) -> dict[str, Any]:
    data = asdict(load)
    data["seconds"] = round(load.seconds, 3)
    return data


def _metric_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    gauges = ("udp_kernel_drops", "tcp_connections_open", "workers", "upstream_up")
    out = {}
    for name, value in after.items():
        if "_total" in name:
            delta = value - before.get(name, 0.0)
            # Thousands of rules mean thousands of rule series: keep those that moved.
            if delta or not name.startswith("statsd_filter_rule_"):
                out[name] = delta
        elif any(g in name for g in gauges):
            out[name] = value
    # The kernel drop count is a gauge since the socket opened: report the delta too.
    drops = "statsd_filter_udp_kernel_drops"
    if drops in after:
        out[drops + "_delta"] = after[drops] - before.get(drops, 0.0)
    return out


def settled_metrics(proxy: Proxy, before: dict[str, float]) -> dict[str, float]:
    """The proxy's metrics once the per-rule counters account for every blocked line.

    The line counters are exact at once, but workers publish per-rule counts in
    batches; wait (bounded by :data:`RULE_COUNTERS_WAIT`) until the lines the rules
    removed reach the lines blocked, so the per-rule checks see the whole run.
    """
    deadline = time.monotonic() + RULE_COUNTERS_WAIT
    while True:
        after = proxy.metrics()
        deltas = _metric_deltas(before, after)
        blocked = deltas.get("statsd_filter_lines_blocked_total", 0.0)
        saved = sum(v for k, v in deltas.items() if k.startswith(RULE_SAVED))
        if saved >= blocked or time.monotonic() > deadline:
            return after
        time.sleep(0.1)


def _count_warnings(path: Path | None) -> int:
    if path is None or not path.exists():
        return 0
    text = path.read_text(errors="replace")
    return sum(1 for line in text.splitlines() if "WARNING" in line or "ERROR" in line)
