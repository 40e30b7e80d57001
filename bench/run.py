"""Benchmark runner: the same load sent straight to a sink and through statsd-filter.

Everything runs on 127.0.0.1. Each scenario starts a fresh sink (and, unless
it is a ``direct`` one, a fresh ``statsd-filter run`` subprocess), forks the
load generator, sends a fixed number of lines (bounded by a deadline too),
waits until the sink has been quiet for a moment, and then checks every line
the sink got. Nothing asserts a speed: this prints what it measured.

    .venv/bin/python bench/run.py --quick      # ~200k lines per scenario, under a minute
    .venv/bin/python bench/run.py --all        # 2M lines per scenario plus the optional ones

Columns of the table:

* offered: lines per second the generator sent (every line, blocked ones too);
* delivered: lines that should pass (not blocked) that reached the sink intact,
  per second from the go signal to the sink's last read;
* deliv %: those lines as a share of the ones sent that should pass;
* vs base: delivered per second over the baseline scenario's (``direct`` for the
  same input and rate; the 10,000-prefix, rules, sharding and mirroring runs
  compare with the one-prefix, one-upstream ``proxy-udp`` run);
* CPU s/M: CPU seconds of every proxy process (supervisor + workers) per million
  lines the proxy received (its ``lines_received_total``);
* RSS MB: the peak of the summed VmRSS of every proxy process (and the largest
  single worker's VmHWM);
* p50/p99 µs: one-way latency of timestamped lines, generator to sink, and in
  brackets what the proxy adds over the direct run at the same rate.

Optional scenarios (``--all``, or by name with ``--scenarios``):

* ``proxy-udp-10k``: a 10,000-prefix blocklist;
* ``proxy-udp-rules`` (issue #4): a config file of 10,000 prefix-drop rules (the
  first is ``debug.``, so it still blocks the 20%), 100 regex and 20 tag rules that
  match no passing line (see ``ruleset.py``);
* ``proxy-udp-shard3`` and ``proxy-udp-mirror2`` (issue #5): three upstreams in
  shard mode, two in mirror mode, each a sink of its own. Sharded, delivered is
  the sum over the sinks, and the sinks must hold disjoint lines and names;
  mirrored, delivered is what the sink that got least received, and every sink
  must hold exactly the lines the proxy forwarded;
* ``idle-tcp``: memory with many idle TCP connections.

Every line of every sink is checked; what looks wrong (a blocked line arriving, a
corrupt or duplicated line, a line on two shards, a mirror missing lines, a rule
matching lines it should not) is listed under ``problems`` and printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadgen import LoadGenerator, LoadResult, LoadSpec
from proxyctl import CLOCK_TICKS, HOST, Proxy, RssSampler, process_cpu, pss_kib
from ruleset import Rule, benchmark_rules, rules_toml, unexpected_matches
from sink import Sink, SinkSpec
from workload import DEFAULT_BLOCKLIST, Traffic, big_blocklist, build_datagrams, head_counts

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
DEFAULT_PROXY = REPO / ".venv" / "bin" / "statsd-filter"
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
RULE_MATCHES = "statsd_filter_rule_matches_total"
RULE_SAVED = "statsd_filter_rule_lines_saved_total"
# Before each scenario, wait for the machine to be less busy than this (percent of
# all CPUs): a test suite running alongside would otherwise take the proxy's cores.
BUSY_THRESHOLD = 15.0


@dataclass(frozen=True)
class Scenario:
    """One measured configuration."""

    name: str
    about: str
    via_proxy: bool = True
    input: str = "udp"  # what the generator sends
    target_protocol: str = "udp"  # what reaches the sink (direct runs: same as input)
    workers: int | None = None  # None: the proxy's default (CPUs available)
    single_source: bool = False
    rate: str = "max"  # "max", "half" (half the direct maximum) or "latency"
    blocklist: str = "one"  # "one" or "big"
    baseline: str = ""
    idle: bool = False  # the idle-TCP-connections memory scenario
    rules: bool = False  # the proxy gets the benchmark rule set (ruleset.py) in a config file
    upstreams: int = 1  # upstreams, each a sink of its own
    upstream_mode: str = ""  # --upstream-mode ("": the proxy's default, shard)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("direct-udp", "UDP flood straight to the sink", via_proxy=False),
    Scenario("proxy-udp-1w", "UDP flood, 1 worker", workers=1, baseline="direct-udp"),
    Scenario("proxy-udp", "UDP flood, default workers", baseline="direct-udp"),
    Scenario(
        "proxy-udp-tcpup", "UDP flood, TCP upstream", target_protocol="tcp", baseline="direct-udp"
    ),
    Scenario(
        "proxy-udp-1src", "UDP flood from 1 socket", single_source=True, baseline="direct-udp"
    ),
    Scenario(
        "direct-tcp",
        "TCP clients straight to the sink",
        via_proxy=False,
        input="tcp",
        target_protocol="tcp",
    ),
    Scenario("proxy-tcp-in", "TCP clients, default workers", input="tcp", baseline="direct-tcp"),
    Scenario("direct-half", "UDP at half the direct max", via_proxy=False, rate="half"),
    Scenario("proxy-half", "UDP at half the direct max", rate="half", baseline="direct-half"),
    Scenario("direct-lat", "UDP at the latency rate", via_proxy=False, rate="latency"),
    Scenario("proxy-lat", "UDP at the latency rate", rate="latency", baseline="direct-lat"),
)
BIG_BLOCKLIST = Scenario(
    "proxy-udp-10k", "UDP flood, 10,000-prefix blocklist", blocklist="big", baseline="proxy-udp"
)
RULES = Scenario(
    "proxy-udp-rules",
    "UDP flood, prefix + regex + tag rules (#4)",
    blocklist="big",
    rules=True,
    baseline="proxy-udp",
)
SHARD = Scenario(
    "proxy-udp-shard3", "UDP flood, 3 upstreams, shard (#5)", upstreams=3, baseline="proxy-udp"
)
MIRROR = Scenario(
    "proxy-udp-mirror2",
    "UDP flood, 2 upstreams, mirror (#5)",
    upstreams=2,
    upstream_mode="mirror",
    baseline="proxy-udp",
)
IDLE_TCP = Scenario("idle-tcp", "idle TCP connections held", idle=True)
OPTIONAL: tuple[Scenario, ...] = (BIG_BLOCKLIST, RULES, SHARD, MIRROR, IDLE_TCP)


@dataclass
class Config:
    """Options of one benchmark run."""

    total_lines: int
    lines_per_datagram: int
    blocked_share: float
    sources: int
    tcp_clients: int
    processes: int
    rate: float
    latency_rate: float
    latency_seconds: float
    paced_seconds: float
    prefixes: int
    regex_rules: int
    tag_rules: int
    idle_conns: int
    max_seconds: float
    proxy: Path
    py_spy: Path | None
    profile_scenario: str
    quick: bool
    proxy_args: tuple[str, ...] = ()
    wait_idle: float = 60.0


@dataclass
class Outcome:
    """What one scenario measured (also the JSON record)."""

    name: str
    about: str
    lines_sent: int = 0
    passing_sent: int = 0
    offered_per_s: float = 0.0
    delivered_per_s: float = 0.0  # passing lines delivered intact, per second
    received_per_s: float = 0.0  # every intact line the sink got, per second
    delivered_pct: float = 0.0
    vs_baseline: float | None = None
    baseline: str = ""
    proxy_cpu_s: float | None = None
    proxy_lines_received: int | None = None
    cpu_per_million: float | None = None
    worker_cpu_s: list[float] = field(default_factory=list)
    tcp_connections_per_worker: list[int] = field(default_factory=list)
    peak_rss_mb: float | None = None
    pss_mb: float | None = None  # summed proportional set size after the load (shared pages split)
    worker_hwm_mb: list[float] = field(default_factory=list)
    latency_us: dict[str, float] = field(default_factory=dict)
    added_latency_us: dict[str, float] = field(default_factory=dict)
    sink: dict[str, Any] = field(default_factory=dict)  # summed over the sinks if several
    sinks: list[dict[str, Any]] = field(default_factory=list)  # per sink, if several
    sink_cpu_s: float | None = None  # CPU the sinks used during the run (they share the cores)
    checks: dict[str, Any] = field(default_factory=dict)  # cross-sink and per-rule checks
    problems: list[str] = field(default_factory=list)  # integrity failures (empty: all good)
    metric_problems: list[str] = field(default_factory=list)  # /metrics disagreeing with itself
    load: dict[str, Any] = field(default_factory=dict)
    proxy_metrics: dict[str, float] = field(default_factory=dict)
    proxy_log_warnings: int = 0
    proxy_exit: int | None = None  # exit status after SIGTERM (0: drained cleanly)
    workers: int | None = None
    rate_target: float = 0.0
    seconds: float = 0.0
    idle: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] = field(default_factory=dict)
    machine_busy_pct: float = 0.0  # CPU use by anything before the scenario started
    other_cpu_s: float | None = None  # CPU used during the run by processes not ours
    softirq_s: float | None = None  # machine softirq time during the run (packet delivery)
    steal_s: float | None = None  # CPU time the hypervisor took during the run
    error: str = ""


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
                    profilers = _start_profilers(cfg.py_spy, proxy.worker_pids(), sc.name)
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
                    out.profile = _stop_profilers(profilers)
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


# ---------------------------------------------------------------- helpers
def compare(sc: Scenario, out: Outcome, outcomes: dict[str, Outcome]) -> None:
    """Fill in the ratios to the scenario's baseline (if it ran)."""
    base = outcomes.get(sc.baseline) if sc.baseline else None
    out.vs_baseline = None
    out.added_latency_us = {}
    if base is None:
        return
    if base.delivered_per_s and out.delivered_per_s:
        out.vs_baseline = out.delivered_per_s / base.delivered_per_s
    if out.latency_us and base.latency_us and sc.baseline.startswith("direct"):
        out.added_latency_us = {
            k: round(out.latency_us[k] - base.latency_us[k], 1)
            for k in ("p50", "p90", "p99", "p999")
            if k in out.latency_us and k in base.latency_us
        }


# Sink figures that add up over several sinks.
SUMMED = (
    "lines",
    "passing",
    "blocked_seen",
    "corrupt",
    "duplicates",
    "kernel_drops",
    "reads",
    "bytes",
    "empty_datagrams",
    "connections",
)


def merge_sinks(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One sink's report as is (less latency), or several summed."""
    if len(results) == 1:
        return {k: v for k, v in results[0].items() if k != "latency_us"}
    merged: dict[str, Any] = {"sinks": len(results), "protocol": results[0].get("protocol")}
    for key in SUMMED:
        if any(key in r for r in results):
            merged[key] = sum(int(r.get(key) or 0) for r in results)
    merged["first_ns"] = min((int(r["first_ns"]) for r in results if r.get("first_ns")), default=0)
    merged["last_ns"] = max(int(r.get("last_ns") or 0) for r in results)
    merged["corrupt_examples"] = [e for r in results for e in r.get("corrupt_examples", [])][:5]
    merged["timed_out"] = any(r.get("timed_out") for r in results)
    errors = [str(r["error"]) for r in results if r.get("error")]
    if errors:
        merged["error"] = "; ".join(errors)
    return merged


def cross_sink_checks(mirror: bool, seen: list[bytes], traffic: Traffic) -> dict[str, Any]:
    """Compare the sinks' maps of the lines they got: mirrored equal, sharded disjoint.

    Each map holds one byte, 0 or 1, per sequence number, so as integers their
    ``|``, ``^`` and ``bit_count`` are set union, difference and size, in C.
    """
    if not seen or any(not m for m in seen):
        return {"cross_sink": "unavailable: a sink did not report its lines"}
    maps = [int.from_bytes(m, "little") for m in seen]
    if mirror:
        return {"lines_differing_from_sink_1": [(maps[0] ^ m).bit_count() for m in maps[1:]]}
    union = 0
    for m in maps:
        union |= m
    names = [
        {traffic.heads[h].partition(b":")[0] for h, n in enumerate(head_counts(m)) if n}
        for m in seen
    ]
    owners = Counter(name for group in names for name in group)
    return {
        "lines_on_several_sinks": sum(m.bit_count() for m in maps) - union.bit_count(),
        "names_per_sink": [len(group) for group in names],
        "names_on_several_sinks": sum(1 for n in owners.values() if n > 1),
    }


def integrity(sc: Scenario, out: Outcome, first_rule: str) -> None:
    """List in ``out.problems`` every sign that a line went where it should not."""
    problems: list[str] = []
    rows = out.sinks or [out.sink]
    for index, row in enumerate(rows):
        where = f"sink {index + 1}: " if out.sinks else ""
        for key, what in (
            ("blocked_seen", "lines that should have been blocked arrived"),
            ("corrupt", "corrupt lines"),
            ("duplicates", "duplicated lines"),
        ):
            if key == "blocked_seen" and not sc.via_proxy:
                continue  # nothing blocks anything in a direct run
            if row.get(key):
                problems.append(f"{where}{row[key]} {what}")
        if row.get("timed_out"):
            problems.append(f"{where}receiving timed out")
        if row.get("error"):
            problems.append(f"{where}{row['error']}")
    checks = out.checks
    if checks.get("lines_on_several_sinks"):
        problems.append(f"{checks['lines_on_several_sinks']} lines reached several shards")
    if checks.get("names_on_several_sinks"):
        problems.append(f"{checks['names_on_several_sinks']} metric names on several shards")
    for index, n in enumerate(checks.get("lines_differing_from_sink_1", [])):
        if n:
            problems.append(f"mirror sinks 1 and {index + 2} differ by {n} lines")
    metrics = out.proxy_metrics
    forwarded = metrics.get("statsd_filter_lines_forwarded_total")
    if forwarded is not None and out.sink:
        got = [int(row.get("passing", 0)) for row in rows]
        if sc.upstream_mode == "mirror":
            checks["lost_after_proxy"] = [int(forwarded) - n for n in got]
            problems.extend(
                f"sink {i + 1} got {n} of the {int(forwarded)} lines the proxy forwarded"
                for i, n in enumerate(got)
                if n != forwarded
            )
        else:
            checks["lost_after_proxy"] = int(forwarded) - sum(got)
    matches = {
        k.split('"')[1]: int(v) for k, v in metrics.items() if k.startswith(RULE_MATCHES) and v
    }
    if matches:
        checks["rule_matches"] = dict(list(matches.items())[:20])
        others = [name for name in matches if name != first_rule]
        if others:
            problems.append(
                f"{len(others)} rules other than {first_rule} matched lines: {others[:5]}"
            )
    out.problems = problems
    # Every rule that matches in these scenarios drops its lines, so the per-rule
    # counters must add up to the line counter (workers publish them every second;
    # settled_metrics waited for that).
    blocked = metrics.get("statsd_filter_lines_blocked_total")
    if blocked is not None:
        saved = sum(v for k, v in metrics.items() if k.startswith(RULE_SAVED))
        matched = sum(matches.values())
        out.metric_problems = [
            f"{name} sums to {int(value)} but lines_blocked_total is {int(blocked)}"
            for name, value in ((RULE_MATCHES, matched), (RULE_SAVED, saved))
            if value != blocked
        ]


def median_outcome(runs: list[Outcome]) -> Outcome:
    """The run with the median delivered rate (held memory for the idle scenario)."""
    if runs[0].idle:
        ordered = sorted(runs, key=lambda o: o.idle.get("rss_held_mb", 0.0))
    else:
        ordered = sorted(runs, key=lambda o: o.delivered_per_s)
    return ordered[(len(ordered) - 1) // 2]


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


def _start_profilers(py_spy: Path, pids: list[int], name: str) -> list[Profiler]:
    # One py-spy per worker; --nonblocking samples without pausing the worker.
    out = []
    for index, pid in enumerate(pids):
        output = RESULTS / f"profile-{name}-worker{index}.txt"
        cmd = [
            str(py_spy),
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            "--nonblocking",
            "--function",
            "--format",
            "raw",
            "--output",
            str(output),
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        out.append(Profiler(proc, output))
    time.sleep(1.0)  # let py-spy attach before the load starts
    return out


def _stop_profilers(profilers: list[Profiler]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for index, prof in enumerate(profilers):
        prof.proc.send_signal(signal.SIGINT)
        try:
            _, err = prof.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            prof.proc.kill()
            _, err = prof.proc.communicate()
        if prof.output.exists():
            result[f"worker{index}"] = summarize_profile(prof.output)
        else:
            result[f"worker{index}"] = {"error": err.decode(errors="replace")[-500:]}
    return result


@dataclass
class Profiler:
    """A py-spy recording one worker."""

    proc: subprocess.Popen[bytes]
    output: Path


def summarize_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return {"samples": 0, "file": str(path)}

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(f, round(100.0 * n / total, 1)) for f, n in counter.most_common(top)]

    return {
        "samples": total,
        "file": str(path),
        "self_pct": share(own),
        "total_pct": share(inclusive),
    }


def _cpu_times() -> dict[str, int]:
    """Machine-wide CPU time by kind, in clock ticks (the first line of /proc/stat)."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    values = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = dict(zip(names, (int(v) for v in values), strict=False))
    ticks["tasks"] = ticks["user"] + ticks["nice"] + ticks["system"]
    ticks["busy"] = ticks["tasks"] + ticks["irq"] + ticks["softirq"] + ticks["steal"]
    ticks["total"] = ticks["busy"] + ticks["idle"] + ticks["iowait"]
    return ticks


def machine_busy(seconds: float = 0.5) -> float:
    """Percent of all CPUs busy over ``seconds`` (anything else running skews the results)."""
    before = _cpu_times()
    time.sleep(seconds)
    after = _cpu_times()
    busy = after["busy"] - before["busy"]
    return 100.0 * busy / max(1, after["total"] - before["total"])


def wait_until_idle(limit: float, threshold: float = BUSY_THRESHOLD) -> float:
    """Wait up to ``limit`` seconds for the machine to be nearly idle; returns the last busy %."""
    deadline = time.monotonic() + limit
    busy = machine_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = machine_busy(1.0)
    return busy


def _all_cpu() -> dict[int, float]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            cpu = process_cpu(int(entry.name))
            if cpu is not None:
                out[int(entry.name)] = cpu
    return out


class OtherCpu:
    """CPU seconds that processes outside the benchmark used during a run.

    Per-process CPU (which the kernel keeps exact) of every process alive at the
    end that is not the runner, the sink or the proxy; the generator has exited
    by then. Well above zero means something else shared the cores and the
    figures are suspect. Machine-wide softirq time (where loopback packets are
    delivered) and steal time (taken by the hypervisor) come from /proc/stat,
    which is tick-sampled: approximate.
    """

    def __init__(self, ours: list[int]) -> None:
        self.ours = {os.getpid(), *ours}
        self.start = _all_cpu()
        self.ticks = _cpu_times()
        self.softirq_s = 0.0
        self.steal_s = 0.0

    def seconds(self) -> float:
        ticks = _cpu_times()
        self.softirq_s = (ticks["softirq"] - self.ticks["softirq"]) / CLOCK_TICKS
        self.steal_s = (ticks["steal"] - self.ticks["steal"]) / CLOCK_TICKS
        now = _all_cpu()
        return sum(
            cpu - self.start.get(pid, 0.0) for pid, cpu in now.items() if pid not in self.ours
        )


def tcp_kernel_pages() -> int:
    """Pages the kernel holds for TCP sockets system-wide (``TCP: ... mem N`` in sockstat)."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("mem") + 1])
    return 0


def proxy_identity(proxy: Path) -> dict[str, str]:
    """The proxy's --version and the repository's commit (the source the proxy may run)."""

    def text(cmd: list[str]) -> str:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unavailable: {exc}"
        return done.stdout.strip()

    return {
        "path": str(proxy),
        "version": text([str(proxy), "--version"]),
        "repo_commit": text(["git", "rev-parse", "HEAD"]),
        "repo_src_changes": text(["git", "status", "--porcelain", "src"]),
    }


def raise_fd_limit() -> int:
    """Lift the soft open-file limit to the hard one (the idle-TCP scenario needs it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


def machine() -> dict[str, Any]:
    """What this ran on."""
    rmem = Path("/proc/sys/net/core/rmem_max")
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "rmem_max": int(rmem.read_text()) if rmem.exists() else None,
    }


# ---------------------------------------------------------------- output
def _k(value: float | None) -> str:
    if value is None or not value:
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.0f}k"
    return f"{value:.0f}"


def _latency(out: Outcome) -> str:
    lat = out.latency_us
    if "p50" not in lat:
        return "-"
    text = f"{lat['p50']:.0f}/{lat['p99']:.0f}"
    added = out.added_latency_us
    if "p50" in added and "p99" in added:
        text += f" (+{added['p50']:.0f}/+{added['p99']:.0f})"
    return text


def table_rows(outcomes: Sequence[Outcome]) -> list[list[str]]:
    """The summary table as strings; the first row is the header."""
    rows = [
        [
            "scenario",
            "offered l/s",
            "delivered l/s",
            "deliv %",
            "vs base",
            "CPU s/M",
            "RSS MB (max worker)",
            "p50/p99 µs (+added)",
        ]
    ]
    for out in outcomes:
        if out.idle:
            idle = out.idle
            rows.append(
                [
                    f"{out.name} ({idle['opened']} conns)",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    f"{idle['rss_held_mb']} (+{idle['added_mb']})",
                    "-",
                ]
            )
            continue
        if out.error and not out.lines_sent:
            rows.append([out.name, "error", out.error[:60], "", "", "", "", ""])
            continue
        rss = "-"
        if out.peak_rss_mb is not None:
            worst = max(out.worker_hwm_mb, default=0.0)
            rss = f"{out.peak_rss_mb:.0f} ({worst:.0f})"
        rows.append(
            [
                out.name,
                _k(out.offered_per_s),
                _k(out.delivered_per_s),
                f"{out.delivered_pct:.1f}",
                f"{out.vs_baseline:.2f}" if out.vs_baseline is not None else "-",
                f"{out.cpu_per_million:.2f}" if out.cpu_per_million is not None else "-",
                rss,
                _latency(out),
            ]
        )
    return rows


def markdown_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def details(out: Outcome) -> str:
    """One line of integrity and loss figures per scenario."""
    if out.idle:
        return f"{out.name}: {json.dumps(out.idle)}"
    s = out.sink
    m = out.proxy_metrics
    parts = [
        f"{out.name}: sent={out.lines_sent} passing_sent={out.passing_sent}",
        f"sink lines={s.get('lines', 0)} passing={s.get('passing', 0)}",
        f"blocked_seen={s.get('blocked_seen', 0)} corrupt={s.get('corrupt', 0)}",
        f"dups={s.get('duplicates', 0)} sink_kernel_drops={s.get('kernel_drops', '-')}",
        f"other_cpu_s={out.other_cpu_s} softirq_s={out.softirq_s} steal_s={out.steal_s}",
        f"sink_cpu_s={out.sink_cpu_s}",
    ]
    if m:
        dropped = {
            k.split('"')[1]: int(v)
            for k, v in m.items()
            if k.startswith("statsd_filter_lines_dropped_total") and v
        }
        parts.append(
            f"proxy in={int(m.get('statsd_filter_lines_received_total', 0))}"
            f" fwd={int(m.get('statsd_filter_lines_forwarded_total', 0))}"
            f" blocked={int(m.get('statsd_filter_lines_blocked_total', 0))}"
            f" kernel_drops={int(m.get('statsd_filter_udp_kernel_drops_delta', 0))}"
            f" dropped={dropped or 0} worker_cpu_s={out.worker_cpu_s}"
            f" workers={out.workers} log_warnings={out.proxy_log_warnings}"
            f" exit={out.proxy_exit}"
        )
    if out.tcp_connections_per_worker:
        parts.append(f"tcp_conns_per_worker={out.tcp_connections_per_worker}")
    if out.sinks:
        per_sink = ", ".join(
            f"{s['passing']} ({s['share_pct']:.1f}%, {s['delivered_pct']:.1f}% of passing sent,"
            f" drops {s.get('kernel_drops', '-')})"
            for s in out.sinks
        )
        parts.append(f"per_sink=[{per_sink}]")
    if out.checks:
        parts.append(f"checks={json.dumps(out.checks, separators=(',', ':'))}")
    if out.problems:
        parts.append(f"PROBLEMS: {'; '.join(out.problems)}")
    if out.metric_problems:
        parts.append(f"METRIC PROBLEMS: {'; '.join(out.metric_problems)}")
    if out.load.get("errors"):
        parts.append(f"gen_errors={out.load['errors']} {out.load.get('error_text')}")
    if out.error:
        parts.append(f"ERROR {out.error}")
    return " ".join(parts)


def evaluate_targets(outcomes: dict[str, Outcome]) -> list[tuple[str, str, str]]:
    """Targets of issues #3, #4 and #5: (target, measured, verdict)."""
    rows: list[tuple[str, str, str]] = []

    def get(name: str) -> Outcome | None:
        out = outcomes.get(name)
        return out if out is not None and not out.error else None

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    flood = get("proxy-udp")
    if flood and flood.vs_baseline is not None:
        ok = flood.delivered_pct >= 99 and flood.vs_baseline >= 0.9
        rows.append(
            (
                "1. UDP flood: >=99% delivered and >=90% of direct",
                f"{flood.delivered_pct:.1f}% delivered, {flood.vs_baseline:.2f} x direct",
                verdict(ok),
            )
        )
    half = get("proxy-half")
    if half:
        p99 = half.added_latency_us.get("p99")
        ok = half.delivered_pct >= 100 and p99 is not None and p99 < 1000
        rows.append(
            (
                "2. Half the direct max: 100% delivered, added p99 < 1 ms",
                (
                    f"{_k(half.offered_per_s)} l/s offered, {half.delivered_pct:.2f}% delivered, "
                    f"added p99 {p99 if p99 is not None else '-'} µs"
                ),
                verdict(ok),
            )
        )
    if flood and flood.cpu_per_million is not None:
        rows.append(
            (
                "3. <= 1.0 CPU-s per million lines received",
                f"{flood.cpu_per_million:.2f} (proxy-udp)",
                verdict(flood.cpu_per_million <= 1.0),
            )
        )
    single = get("proxy-udp-1src")
    if single and len(single.worker_cpu_s) > 1:
        cpu = single.worker_cpu_s
        low = min(cpu) / max(*cpu, 1e-9)
        rows.append(
            (
                "4. One source socket spread across workers",
                f"worker CPU s {cpu} (least/most {low:.2f})",
                verdict(low >= 0.5),
            )
        )
    tcp = get("proxy-tcp-in")
    if tcp and flood:
        ratio = tcp.delivered_per_s / max(flood.delivered_per_s, 1e-9)
        rows.append(
            (
                "5. TCP input (64 clients) >= UDP input",
                f"{_k(tcp.delivered_per_s)} vs {_k(flood.delivered_per_s)} l/s ({ratio:.2f} x)",
                verdict(ratio >= 1.0),
            )
        )
    if flood and flood.worker_hwm_mb:
        worst = max(flood.worker_hwm_mb)
        rows.append(
            (
                "6a. < 60 MB RSS per worker at full load",
                f"max worker VmHWM {worst} MB",
                verdict(worst < 60),
            )
        )
    idle = outcomes.get("idle-tcp")
    if idle and idle.idle:
        held = idle.idle["rss_held_mb"]
        conns = idle.idle["accepted_by_proxy"]
        rows.append(
            (
                "6b. 10,000 idle TCP connections < 200 MB total",
                (
                    f"{conns} conns, RSS {held} MB total (+{idle.idle['added_mb']} MB), "
                    f"PSS {idle.idle['pss_held_mb']} MB"
                ),
                verdict(held < 200) if conns >= 10000 else f"n/a ({conns} conns only)",
            )
        )
    big = get("proxy-udp-10k")
    if big and flood and big.vs_baseline is not None and big.cpu_per_million:
        # Delivered rates in a flood move with how the scheduler shares the cores with
        # the generator; CPU per line is the steadier measure of capacity. Both must hold.
        capacity = (flood.cpu_per_million or 0.0) / big.cpu_per_million
        rows.append(
            (
                "7. 10,000 prefixes keep >= 90% of 1-prefix throughput",
                (
                    f"delivered {big.vs_baseline:.2f} x; capacity (CPU per line) {capacity:.2f} x"
                    f" ({big.cpu_per_million:.2f} vs {flood.cpu_per_million or 0:.2f} CPU-s/M)"
                ),
                verdict(big.vs_baseline >= 0.9 and capacity >= 0.9),
            )
        )
    rows.extend(_relative_target(outcomes, flood, "proxy-udp-rules", 0.8, _rules_target))
    rows.extend(_relative_target(outcomes, flood, "proxy-udp-shard3", 0.9, _shard_target))
    rows.extend(_relative_target(outcomes, flood, "proxy-udp-mirror2", 0.0, _mirror_target))
    return rows


def _rules_target(out: Outcome, floor: float) -> str:
    kinds = out.checks.get("rules", {})
    return (
        f"#4. {kinds.get('prefix', 0):,} prefix + {kinds.get('regex', 0)} regex + "
        f"{kinds.get('tag', 0)} tag rules keep >= {floor:.0%} of 1-prefix throughput"
    )


def _shard_target(out: Outcome, floor: float) -> str:
    return f"#5. {len(out.sinks)} upstreams (shard) keep >= {floor:.0%} of 1-upstream throughput"


def _mirror_target(out: Outcome, _floor: float) -> str:
    return f"#5. mirror to {len(out.sinks)} upstreams: every upstream gets every forwarded line"


def _relative_target(
    outcomes: dict[str, Outcome],
    flood: Outcome | None,
    name: str,
    floor: float,
    title: Callable[[Outcome, float], str],
) -> list[tuple[str, str, str]]:
    """A scenario against proxy-udp: delivered rate and CPU per line, plus its integrity.

    As for the 10,000-prefix target, delivered rates in a flood move with how the
    scheduler shares the two cores with the generator and the sinks, so capacity
    (proxy-udp's CPU per line over this one's) must hold too; and no line may go
    where it should not. ``floor`` 0: only integrity decides.
    """
    out = outcomes.get(name)
    if out is None:
        return []
    if out.error:
        return [(title(out, floor), out.error[:100], "NOT met (error)")]
    if flood is None or flood.error or out.vs_baseline is None:
        return [(title(out, floor), "no proxy-udp run to compare with", "n/a")]
    capacity = None
    if out.cpu_per_million and flood.cpu_per_million:
        capacity = flood.cpu_per_million / out.cpu_per_million
    measured = f"delivered {_k(out.delivered_per_s)} vs {_k(flood.delivered_per_s)} l/s"
    measured += f" ({out.vs_baseline:.2f} x)"
    if capacity is not None:
        measured += (
            f"; capacity (CPU per line) {capacity:.2f} x"
            f" ({out.cpu_per_million:.2f} vs {flood.cpu_per_million:.2f} CPU-s/M)"
        )
    if "lines_differing_from_sink_1" in out.checks:
        each = "/".join(f"{s['delivered_pct']:.1f}" for s in out.sinks)
        measured += f"; each sink {each}% of passing sent"
        measured += f", lost after the proxy {out.checks.get('lost_after_proxy')}"
    elif out.sinks:
        measured += "; shares " + "/".join(f"{s['share_pct']:.1f}" for s in out.sinks) + "%"
    measured += "; " + (
        f"{len(out.problems)} integrity problem(s)" if out.problems else "every line checked ok"
    )
    if out.metric_problems:
        measured += f"; /metrics inconsistent ({len(out.metric_problems)}, see details)"
    ok = not out.problems and (
        floor == 0 or (out.vs_baseline >= floor and capacity is not None and capacity >= floor)
    )
    return [(title(out, floor), measured, "met" if ok else "NOT met")]


# ---------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--quick", action="store_true", help="small runs (200k lines), under a minute")
    p.add_argument(
        "--all",
        action="store_true",
        help="also run --big-blocklist, --rules, --upstreams and --idle-conns",
    )
    p.add_argument("--total-lines", type=int, help="lines per scenario (default 2M, quick 200k)")
    p.add_argument("--lines-per-datagram", type=int, default=4)
    p.add_argument("--blocked-share", type=float, default=0.2, help="share of lines blocked")
    p.add_argument("--sources", type=int, default=8, help="UDP source sockets")
    p.add_argument("--tcp-clients", type=int, default=64, help="TCP input connections")
    p.add_argument("--procs", type=int, default=2, help="load generator processes")
    p.add_argument("--rate", type=float, default=0.0, help="flood rate, lines/s (0: max)")
    p.add_argument("--latency-rate", type=float, default=20000.0, help="lines/s")
    p.add_argument("--latency-seconds", type=float, help="length of the latency runs (5, quick 2)")
    p.add_argument("--paced-seconds", type=float, default=10.0, help="cap on paced runs' length")
    p.add_argument("--big-blocklist", action="store_true", help="add the 10k-prefix scenario")
    p.add_argument(
        "--prefixes", type=int, default=10000, help="size of the big blocklist (and prefix rules)"
    )
    p.add_argument("--rules", action="store_true", help="add the rules-engine scenario (#4)")
    p.add_argument("--regex-rules", type=int, default=100, help="regex rules in --rules")
    p.add_argument("--tag-rules", type=int, default=20, help="tag rules in --rules")
    p.add_argument(
        "--upstreams", action="store_true", help="add the shard and mirror scenarios (#5)"
    )
    p.add_argument("--idle-conns", type=int, default=0, help="idle TCP connections scenario")
    p.add_argument("--max-seconds", type=float, default=60.0, help="send-time cap per scenario")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds; report medians")
    p.add_argument("--scenarios", help="comma-separated subset to run (see --list)")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    p.add_argument("--proxy", type=Path, default=DEFAULT_PROXY, help="statsd-filter executable")
    p.add_argument("--py-spy", type=Path, help="py-spy executable: profile one scenario's worker")
    p.add_argument(
        "--profile-scenario", default="proxy-udp-1w", help="comma-separated scenarios to profile"
    )
    p.add_argument(
        "--proxy-args", default="", help="extra flags for every proxy, e.g. '--max-udp-size 8192'"
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=60.0,
        help="before each scenario wait up to this long for other CPU use to stop",
    )
    p.add_argument("--label", default="", help="free text stored with the results")
    p.add_argument("--json", type=Path, default=RESULTS / "latest.json", help="results file")
    args = p.parse_args(argv)
    quick = bool(args.quick)
    idle = args.idle_conns or ((2000 if quick else 10000) if args.all else 0)
    cfg = Config(
        total_lines=args.total_lines or (200_000 if quick else 2_000_000),
        lines_per_datagram=args.lines_per_datagram,
        blocked_share=args.blocked_share,
        sources=args.sources,
        tcp_clients=args.tcp_clients,
        processes=args.procs,
        rate=args.rate,
        latency_rate=args.latency_rate,
        latency_seconds=args.latency_seconds or (2.0 if quick else 5.0),
        paced_seconds=args.paced_seconds,
        prefixes=args.prefixes,
        regex_rules=args.regex_rules,
        tag_rules=args.tag_rules,
        idle_conns=idle,
        max_seconds=args.max_seconds,
        proxy=args.proxy,
        py_spy=args.py_spy,
        profile_scenario=args.profile_scenario,
        quick=quick,
        proxy_args=tuple(shlex.split(args.proxy_args)),
        wait_idle=args.wait_idle,
    )
    return cfg, args


def choose(cfg: Config, args: argparse.Namespace) -> list[Scenario]:
    scenarios = list(SCENARIOS)
    if args.big_blocklist or args.all:
        scenarios.append(BIG_BLOCKLIST)
    if args.rules or args.all:
        scenarios.append(RULES)
    if args.upstreams or args.all:
        scenarios += [SHARD, MIRROR]
    if cfg.idle_conns:
        scenarios.append(IDLE_TCP)
    if args.scenarios:
        wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
        known = {s.name: s for s in (*SCENARIOS, *OPTIONAL)}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise SystemExit(f"unknown scenario(s): {', '.join(unknown)}; see --list")
        scenarios = [known[w] for w in wanted]
    return scenarios


def report(ordered: list[Outcome], outcomes: dict[str, Outcome]) -> list[tuple[str, str, str]]:
    """Print the table, the details and the targets; returns the targets."""
    print()
    print(markdown_table(table_rows(ordered)))
    print()
    for out in ordered:
        print(details(out))
    targets = evaluate_targets(outcomes)
    if targets:
        print()
        for target, measured, verdict in targets:
            print(f"{verdict:8} {target}: {measured}")
    for out in ordered:
        for worker, prof in out.profile.items():
            if prof.get("self_pct"):
                print(f"\nprofile of {out.name} {worker} ({prof['samples']} samples), self %:")
                for frame, pct in prof["self_pct"]:
                    print(f"  {pct:5.1f}  {frame}")
    return targets


def main(argv: Sequence[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    if args.list:
        for sc in (*SCENARIOS, *OPTIONAL):
            print(f"{sc.name:18} {sc.about}")
        return 0
    if not cfg.proxy.exists():
        print(f"statsd-filter not found at {cfg.proxy}", file=sys.stderr)
        return 1
    fd_limit = raise_fd_limit()
    if cfg.idle_conns and cfg.idle_conns + 256 > fd_limit:
        print(f"warning: open-file limit {fd_limit} is below --idle-conns {cfg.idle_conns}")
    scenarios = choose(cfg, args)
    runner = Runner(cfg)
    meta = machine()
    meta["command"] = shlex.join([sys.executable, *sys.argv])
    meta["label"] = args.label
    meta["proxy"] = proxy_identity(cfg.proxy)
    meta["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
    print(f"statsd-filter benchmark, {meta['date']}, {meta['nproc']} CPUs, Python {meta['python']}")
    print(
        f"  {cfg.total_lines:,} lines/scenario, {cfg.lines_per_datagram} lines/datagram, "
        f"{cfg.blocked_share:.0%} blocked, {cfg.processes} generator processes, "
        f"{args.rounds} round(s)"
    )
    rounds: list[dict[str, Outcome]] = []
    for index in range(args.rounds):
        runner.outcomes = {}
        for sc in scenarios:
            out = runner.run(sc)
            rate = f"{_k(out.rate_target)} l/s" if out.rate_target else "max rate"
            if out.idle:
                print(
                    f"  [{index + 1}] {sc.name:16} held {out.idle['accepted_by_proxy']} "
                    f"connections in {out.idle['rss_held_mb']} MB RSS  in {out.seconds:.1f}s",
                    flush=True,
                )
                continue
            problems = f" PROBLEMS: {'; '.join(out.problems)}" if out.problems else ""
            if out.metric_problems:
                problems += f" METRIC PROBLEMS: {'; '.join(out.metric_problems)}"
            print(
                f"  [{index + 1}] {sc.name:16} {rate:>12}  delivered "
                f"{_k(out.delivered_per_s):>6} l/s ({out.delivered_pct:5.1f}%)  "
                f"in {out.seconds:.1f}s {out.error}{problems}",
                flush=True,
            )
        rounds.append(runner.outcomes)
    final = {sc.name: median_outcome([r[sc.name] for r in rounds]) for sc in scenarios}
    for sc in scenarios:
        compare(sc, final[sc.name], final)
    ordered = [final[sc.name] for sc in scenarios]
    targets = report(ordered, final)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "meta": meta,
                "table": table_rows(ordered),
                "scenarios": [asdict(o) for o in ordered],
                "targets": [{"target": t, "measured": m, "verdict": v} for t, m, v in targets],
                "rounds": [[asdict(o) for o in r.values()] for r in rounds]
                if len(rounds) > 1
                else [],
            },
            indent=2,
        )
    )
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
