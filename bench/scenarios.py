"""What the benchmark runs: the scenario table, a run's options, each scenario's record.

A :class:`Scenario` names one measured configuration (input protocol, workers,
rate, blocklist, rules, upstreams); :data:`SCENARIOS` are the ones every run
measures and :data:`OPTIONAL` the ones ``--all`` (or their own flags) add.
:class:`Config` holds a run's options, :class:`Outcome` what one scenario
measured (it is also the JSON record), and :func:`choose` turns the command
line into the list of scenarios to run, in order.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent


REPO = BENCH.parent


RESULTS = BENCH / "results"


DEFAULT_PROXY = REPO / ".venv" / "bin" / "statsd-filter"


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
