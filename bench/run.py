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
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from report import brief, compare, median_outcome, report, write_json
from runner import Runner
from sampling import machine, proxy_identity, raise_fd_limit
from scenarios import DEFAULT_PROXY, OPTIONAL, RESULTS, SCENARIOS, Config, Outcome, choose


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
            rate = f"{brief(out.rate_target)} l/s" if out.rate_target else "max rate"
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
                f"{brief(out.delivered_per_s):>6} l/s ({out.delivered_pct:5.1f}%)  "
                f"in {out.seconds:.1f}s {out.error}{problems}",
                flush=True,
            )
        rounds.append(runner.outcomes)
    final = {sc.name: median_outcome([r[sc.name] for r in rounds]) for sc in scenarios}
    for sc in scenarios:
        compare(sc, final[sc.name], final)
    ordered = [final[sc.name] for sc in scenarios]
    targets = report(ordered, final)
    write_json(args.json, meta, ordered, targets, rounds)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
