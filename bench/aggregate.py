"""Pre-aggregation (issue 16): what it costs the proxy and what it saves upstream.

Runs the real ``statsd-filter`` on loopback with the same flood of lines drawn
from 1,000 names x 10 tag sets (10,000 series; every line is one of them,
cycling, so each series repeats many times per flush interval):

* ``plain``: no aggregation, plain forwarding (the C fast path);
* ``aggregate``: ``aggregate = true``, flavour etsy (timer values one per line);
* ``aggregate-dd``: flavour datadog (timer values packed ``name:v1:v2|ms``).

The mix per name: counters (half of them sampled ``@0.5``), gauges, timers
and sets, with a few values each. Each variant runs twice:

* paced at ``--rate`` lines/s (default 100,000: nothing is lost, so the
  figures are the steady state): the lines the upstream received per input
  line, and the CPU-seconds of the whole proxy (supervisor and workers, from
  ``/proc/PID/stat``) per million input lines;
* flooded (as fast as the senders go): the input lines the proxy read per
  second of sending, i.e. how much it can take on this machine.

It asserts no speed: it prints figures.

    .venv/bin/python bench/aggregate.py              # 1M lines per run, 3 rounds
    .venv/bin/python bench/aggregate.py --quick      # 1 round
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cardinality import LINES_PER_DATAGRAM, _sink_main, datagrams_of
from loadgen import LoadGenerator, LoadSpec
from proxyctl import Proxy, free_port
from workload import Traffic

BENCH = Path(__file__).resolve().parent
DEFAULT_PROXY = BENCH.parent / ".venv" / "bin" / "statsd-filter"
SETTLE_TIMEOUT = 30.0
VARIANTS = {
    "plain": "",
    "aggregate": "aggregate = true\n",
    "aggregate-dd": 'aggregate = true\nupstream_flavor = "datadog"\n',
}


def workload_lines(names: int = 1000, tag_sets: int = 10) -> list[bytes]:
    """Every series of the workload, a few values each, as lines."""
    out = []
    for n in range(names):
        kind = n % 10
        name = f"svc{n % 50}.endpoint{n // 50}.{('hits', 'latency', 'queue', 'users')[kind % 4]}"
        for t in range(tag_sets):
            tags = f"#env:prod,host:web-{t},region:r{t % 3}"
            for v in range(3):
                if kind in (0, 4, 8):
                    rate = "|@0.5" if t % 2 else ""
                    line = f"{name}:{1 + v}|c{rate}|{tags}"
                elif kind in (1, 5, 9):
                    line = f"{name}:{10 + 7 * v + t}|ms|{tags}"
                elif kind in (2, 6):
                    line = f"{name}:{100 + v}|g|{tags}"
                else:
                    line = f"{name}:user{v + t}|s|{tags}"
                out.append(line.encode())
    return out


@dataclass
class Run:
    variant: str
    lines_sent: int
    send_seconds: float
    received: int
    upstream_lines: int
    cpu_seconds: float
    aggregated: int
    forwarded: int

    @property
    def input_rate(self) -> float:
        return self.received / self.send_seconds

    @property
    def out_per_in(self) -> float:
        return self.upstream_lines / max(1, self.received)

    @property
    def cpu_per_million(self) -> float:
        return self.cpu_seconds / max(1, self.received) * 1e6


def run_variant(
    args: argparse.Namespace, variant: str, lines: list[bytes], tmp: Path, rate: float
) -> Run:
    ctx = mp.get_context("fork")
    sink_port = free_port(socket.SOCK_DGRAM)
    parent, child = ctx.Pipe()
    sink = ctx.Process(target=_sink_main, args=(sink_port, child), daemon=True)
    sink.start()
    assert parent.recv() == "ready"
    config = tmp / f"{variant}.toml"
    config.write_text(VARIANTS[variant])
    proxy = Proxy(
        Path(args.proxy),
        sink_port,
        workers=args.workers,
        log_path=tmp / f"{variant}.log",
        extra_args=("--config", str(config), "--max-udp-size", "8192"),
    )
    proxy.start()
    try:
        spec = LoadSpec(
            "udp", proxy.listen_port, processes=args.senders, sources=8, rate=rate, max_seconds=120
        )
        traffic = Traffic((b"x",), (False,))
        before = proxy.metrics()
        cpu_before = proxy.cpu()
        dgs = datagrams_of(lines, args.lines)
        gen = LoadGenerator(spec, traffic, dgs, LINES_PER_DATAGRAM, args.lines)
        gen.prepare()
        gen.go()
        result = gen.wait()
        after = proxy.settled_metrics(SETTLE_TIMEOUT)
        cpu_after = proxy.cpu()
        cpu = sum(cpu_after.get(pid, 0) - cpu_before.get(pid, 0) for pid in cpu_after)
    finally:
        proxy.stop()
    parent.send("done")
    upstream = parent.recv()
    sink.join(10)

    def delta(name: str) -> int:
        key = "statsd_filter_" + name
        return int(after.get(key, 0) - before.get(key, 0))

    return Run(
        variant,
        result.lines,
        result.seconds,
        delta("lines_received_total"),
        upstream,
        cpu,
        delta("lines_aggregated_total"),
        delta("lines_forwarded_total"),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round")
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=100_000, help="paced runs: lines/s")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--proxy", default=str(DEFAULT_PROXY))
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 1
    lines = workload_lines()
    paced: dict[str, list[Run]] = {v: [] for v in VARIANTS}
    flood: dict[str, list[Run]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-aggregate-") as tmp:
        for _ in range(args.rounds):
            for variant in VARIANTS:  # interleaved, so machine noise hits all alike
                paced[variant].append(run_variant(args, variant, lines, Path(tmp), args.rate))
                flood[variant].append(run_variant(args, variant, lines, Path(tmp), 0.0))
    print(
        f"1,000 names x 10 tag sets ({len(lines):,} distinct lines), {args.lines:,} lines per "
        f"run, {args.workers} workers, flush_interval 1 s, {args.rounds} round(s), medians"
    )
    print(
        f"{'variant':<13} {'paced received':>14} {'out/in lines':>12} {'CPU-s/M in':>10} "
        f"{'x plain CPU':>11} {'flood input lines/s':>19}"
    )
    plain = statistics.median(r.cpu_per_million for r in paced["plain"])
    for variant, rs in paced.items():
        cpu = statistics.median(r.cpu_per_million for r in rs)
        print(
            f"{variant:<13} {statistics.median(r.received for r in rs):>14,} "
            f"{statistics.median(r.out_per_in for r in rs):>12.4f} {cpu:>10.2f} "
            f"{cpu / plain:>11.2f} "
            f"{statistics.median(r.input_rate for r in flood[variant]):>19,.0f}"
        )
    print(f"paced at {args.rate:,.0f} lines/s; flood: as fast as {args.senders} senders go")
    result: dict[str, Any] = {
        "paced": {v: [r.__dict__ for r in rs] for v, rs in paced.items()},
        "flood": {v: [r.__dict__ for r in rs] for v, rs in flood.items()},
    }
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / "aggregate.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
