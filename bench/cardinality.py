"""Cardinality limits (issue 14): throughput and memory of a limit rule over all traffic.

Runs the real ``statsd-filter`` twice on loopback, both times with the same
flood of lines drawn from ``--series`` distinct series (default 100,000; every
line is one of them, cycling):

* ``plain``: no rules, plain forwarding;
* ``rule``: one rule that never matches (``strip_tags`` of an absent tag): with
  any rule beyond the leading drops, the proxy filters and packs in Python what
  it reads in C, so this is the floor for any rule configuration;
* ``limit``: one ``limit_series`` rule matching every metric line
  (``match = { kind = "metric" }``), its ``max_series`` and ``max_tracked`` at
  twice the live series, so nothing is refused and every line is judged;
* ``limit-hit`` (``--hit``): the same rule with ``max_series`` at half the live
  series, so half the series are refused (their lines dropped) on every line.

Each run first sends every series ``--warmup`` times (paced, not measured):
a worker judges a series it never met line by line, once, and a datagram goes
to whichever worker reads it, so after 10 passes about one series in a
thousand is still new to a given worker. Then it floods ``--lines`` lines as
fast as the senders go and reports, per variant:

* CPU-seconds of the whole proxy per million lines it read: on a machine the
  flood saturates, throughput is the inverse, so ``x plain`` (plain's CPU per
  line over the variant's) is the throughput ratio (target: ``limit`` >= 0.80);
* lines delivered per second of sending and the share delivered: only a sanity
  check, as they depend on how fast the senders ran next to the proxy;
* memory: the limit table's size in shared memory (``/limits``), the
  proportional set size (PSS: shared pages split among the processes) of the
  whole proxy after the run, and the growth over ``plain`` per 100,000 series.

The window is long (``--window``, 3600 s) so the figures are the steady state.
When a window ends, the first worker to meet each series decides it again under
the lock, the others read that decision from the shared table, all in C;
``--window 10`` shows what that costs (a 10 s window is StatsD's flush interval).

    .venv/bin/python bench/cardinality.py --quick    # 1M lines, ~1 min
    .venv/bin/python bench/cardinality.py            # 6M lines, 3 rounds
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import multiprocessing.connection
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadgen import LoadGenerator, LoadSpec
from proxyctl import HOST, Proxy, free_port, http_get, pss_kib
from workload import Traffic

BENCH = Path(__file__).resolve().parent
DEFAULT_PROXY = BENCH.parent / ".venv" / "bin" / "statsd-filter"
LINES_PER_DATAGRAM = 16
SINK_IDLE = 1.0  # the sink stops this long after the last datagram, once told the load is over
SETTLE_TIMEOUT = 30.0
MIB = 1024 * 1024


def series_lines(series: int) -> list[bytes]:
    """One line per series: a few hundred names, each with many tag sets (like per-host data)."""
    out = []
    for i in range(series):
        name = f"svc{i % 37}.{('requests', 'latency', 'errors', 'bytes')[i % 4]}"
        kind = ("c", "ms", "g", "h")[i % 4]
        out.append(
            f"{name}:{1 + i % 9}|{kind}|#env:prod,host:web-{i % 512},pod:p{i // 512}".encode()
        )
    return out


def datagrams_of(lines: list[bytes], total: int, offset: int = 0) -> list[bytes]:
    n = len(lines)
    picked = [lines[(offset + k * 7919) % n] for k in range(total)]  # scattered, all covered
    return [
        b"\n".join(picked[i : i + LINES_PER_DATAGRAM])
        for i in range(0, len(picked), LINES_PER_DATAGRAM)
    ]


def _sink_main(port: int, conn: multiprocessing.connection.Connection) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * MIB)
    sock.bind((HOST, port))
    sock.settimeout(0.1)
    buf = bytearray(65536)
    lines = 0
    last = time.monotonic()
    done = False
    conn.send("ready")
    while True:
        if conn.poll():
            message = conn.recv()
            if message == "count":
                conn.send(lines)
                continue
            done = True
        try:
            size = sock.recv_into(buf)
        except TimeoutError:
            if done and time.monotonic() - last > SINK_IDLE:
                break
            continue
        if size:
            lines += buf.count(b"\n", 0, size) + 1
            last = time.monotonic()
    sock.close()
    conn.send(lines)


@dataclass
class Run:
    variant: str
    lines_sent: int
    delivered: int
    send_seconds: float
    cpu_seconds: float
    received: int
    kernel_drops: float
    pss_mib: float
    table_mib: float
    supervisor_cpu: float

    @property
    def rate(self) -> float:
        return self.delivered / self.send_seconds

    @property
    def cpu_per_line(self) -> float:
        return self.cpu_seconds / max(1, self.received)


def _config(variant: str, series: int, window: float) -> str:
    if variant == "plain":
        return ""
    if variant == "rule":
        # A rule that never matches: what any rule beyond the leading drops costs
        # (the datagrams are filtered and packed in Python, not all in C).
        return (
            '[[rules]]\nname = "never"\nmatch = { tag = "never-there" }\n'
            'action = "strip_tags"\ntags = ["never-there"]\n'
        )
    limit = 2 * series if variant == "limit" else series // 2
    return (
        '[[rules]]\nname = "all-series"\nmatch = { kind = "metric" }\n'
        f'action = "limit_series"\nmax_series = {limit}\nwindow = {window}\n'
        f"max_tracked = {2 * series}\n"
    )


def run_variant(args: argparse.Namespace, variant: str, lines: list[bytes], tmp: Path) -> Run:
    ctx = mp.get_context("fork")
    sink_port = free_port(socket.SOCK_DGRAM)
    parent, child = ctx.Pipe()
    sink = ctx.Process(target=_sink_main, args=(sink_port, child), daemon=True)
    sink.start()
    assert parent.recv() == "ready"
    config = tmp / f"{variant}.toml"
    config.write_text(_config(variant, len(lines), args.window))
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
            "udp", proxy.listen_port, processes=args.senders, sources=8, max_seconds=120
        )
        traffic = Traffic((b"x",), (False,))
        for warm in range(args.warmup):  # every series once, paced so none is lost
            warm_spec = LoadSpec("udp", proxy.listen_port, processes=1, sources=8, rate=100_000)
            dgs = datagrams_of(lines, len(lines), offset=warm)
            gen = LoadGenerator(warm_spec, traffic, dgs, LINES_PER_DATAGRAM, len(lines))
            gen.prepare()
            gen.go()
            gen.wait()
        proxy.settled_metrics(SETTLE_TIMEOUT)
        parent.send("count")
        before_sink = parent.recv()
        before = proxy.metrics()
        cpu_before = proxy.cpu()
        dgs = datagrams_of(lines, args.lines)
        gen = LoadGenerator(spec, traffic, dgs, LINES_PER_DATAGRAM, args.lines)
        gen.prepare()
        gen.go()
        result = gen.wait()
        after = proxy.settled_metrics(SETTLE_TIMEOUT)
        cpu_after = proxy.cpu()
        per_process = {pid: cpu_after.get(pid, 0) - cpu_before.get(pid, 0) for pid in cpu_after}
        cpu = sum(per_process.values())
        supervisor_cpu = per_process.get(proxy.pid, 0.0)
        pss = sum(pss_kib(pid) or 0 for pid in proxy.pids()) / 1024
        table = 0.0
        if variant.startswith("limit"):
            _, body = http_get(f"http://{HOST}:{proxy.admin_port}/limits")
            table = json.loads(body)["rules"][0]["memory_bytes"] / MIB
    finally:
        proxy.stop()
    parent.send("done")
    total = parent.recv()
    sink.join(10)
    key = "statsd_filter_lines_received_total"
    drops = "statsd_filter_udp_kernel_drops"
    return Run(
        variant,
        result.lines,
        total - before_sink,
        result.seconds,
        cpu,
        int(after.get(key, 0) - before.get(key, 0)),
        after.get(drops, 0) - before.get(drops, 0),
        pss,
        table,
        supervisor_cpu,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1M lines, 1 round")
    parser.add_argument("--series", type=int, default=100_000)
    parser.add_argument("--lines", type=int, default=6_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--window", type=float, default=3600.0)
    parser.add_argument("--hit", action="store_true", help="also run limit-hit")
    parser.add_argument("--proxy", default=str(DEFAULT_PROXY))
    args = parser.parse_args(argv)
    if args.quick:
        args.lines, args.rounds = 1_000_000, 1
    lines = series_lines(args.series)
    variants = ["plain", "rule", "limit", *(["limit-hit"] if args.hit else [])]
    runs: dict[str, list[Run]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="bench-cardinality-") as tmp:
        for _ in range(args.rounds):
            for variant in variants:  # interleaved, so machine noise hits all alike
                runs[variant].append(run_variant(args, variant, lines, Path(tmp)))
    plain_cpu = statistics.median(r.cpu_per_line for r in runs["plain"])
    plain_pss = statistics.median(r.pss_mib for r in runs["plain"])
    print(
        f"{args.series:,} live series, {args.lines:,} lines per run, {args.workers} workers, "
        f"{args.rounds} round(s), medians"
    )
    header = (
        f"{'variant':<10} {'CPU-s/M':>8} {'x plain':>8} {'lines/s':>10} "
        f"{'delivered':>9} {'drops':>8} {'PSS MiB':>8} {'table MiB':>9} {'sup CPU-s':>9}"
    )
    print(header)
    for variant, rs in runs.items():
        cpu = statistics.median(r.cpu_per_line for r in rs)
        print(
            f"{variant:<10} {cpu * 1e6:>8.2f} {plain_cpu / cpu:>8.2f} "
            f"{statistics.median(r.rate for r in rs):>10,.0f} "
            f"{statistics.median(r.delivered / r.lines_sent for r in rs):>9.1%} "
            f"{statistics.median(r.kernel_drops for r in rs):>8,.0f} "
            f"{statistics.median(r.pss_mib for r in rs):>8.1f} "
            f"{statistics.median(r.table_mib for r in rs):>9.1f} "
            f"{statistics.median(r.supervisor_cpu for r in rs):>9.2f}"
        )
    limit = runs["limit"]
    ratio = plain_cpu / statistics.median(r.cpu_per_line for r in limit)
    rule_ratio = statistics.median(r.cpu_per_line for r in runs["rule"]) / statistics.median(
        r.cpu_per_line for r in limit
    )
    extra = statistics.median(r.pss_mib for r in limit) - plain_pss
    per_100k = 100_000 / args.series
    print(
        f"limit vs plain: {ratio:.2f} x throughput, by CPU per line (target >= 0.80: "
        f"{'met' if ratio >= 0.8 else 'NOT met'}); limit vs a rule that never matches: "
        f"{rule_ratio:.2f} x"
    )
    table = statistics.median(r.table_mib for r in limit)
    print(
        f"memory per 100k series: the shared table takes {table * 100_000 / (2 * args.series):.1f}"
        f" MiB per 100k of max_tracked (here 2 x the live series: {table:.1f} MiB); the whole "
        f"proxy's PSS grew by {extra * per_100k:.1f} MiB per 100k live series over plain "
        f"({extra * MIB / args.series:.0f} bytes per series with {args.workers} workers: "
        "the table, each worker's local cache, Python objects)"
    )
    result: dict[str, Any] = {v: [r.__dict__ for r in rs] for v, rs in runs.items()}
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / "cardinality.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
