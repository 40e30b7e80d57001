"""What /top sampling costs: the same UDP load through the proxy with --top and --no-top.

Issue #15's target: with sampling on (the default), forwarding throughput stays
within 5% of sampling off. Sampling is built to cost a fixed amount of CPU per
second (about ``--top-sample-rate`` judged lines per worker, whatever the
traffic), not a cost per line. So the figure that decides is that fixed cost:
a saturated worker has one core, and sampling takes ``extra CPU-s per second /
workers`` of it, which is what throughput at saturation loses. This script
measures it by offering the same paced load (``--rate``) to both modes and
comparing the proxy's CPU per second (supervisor + workers). Each round runs
both modes back to back (the order alternates between rounds), each a fresh
proxy and sink, with the benchmark's own traffic (``workload.py``).

Printed per mode (medians over the rounds): ``delivered/s`` (lines the sink got
over the load's duration), ``cpu_s/s`` (the proxy's CPU seconds per second),
``cpu_us/line`` and ``kept`` (the share of sent lines the proxy read; the rest
the kernel dropped). Below saturation ``cpu_us/line`` overstates a fixed cost
(it is spread over fewer lines), which is why the verdict uses the projection.
``--rate 0`` floods instead (useful when the proxy, not the generator, is the
bottleneck: then ``delivered/s`` is the throughput itself).

``--watchers N`` also keeps N ``/tap`` streams open during the ``top`` runs
(reading them as fast as they come), to show what watching adds.

    .venv/bin/python bench/top_cost.py --quick        # 1 round of 4 s, ~20 s in all
    .venv/bin/python bench/top_cost.py --rounds 5 --seconds 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

from loadgen import LoadGenerator, LoadSpec
from proxyctl import HOST, Proxy
from sink import Sink, SinkSpec
from workload import DEFAULT_BLOCKLIST, Traffic, build_datagrams

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROXY = ROOT / ".venv" / "bin" / "statsd-filter"
RESULTS = ROOT / "bench" / "results"
TARGET = 0.95  # sampling on must keep at least this share of sampling off


def _watch(url: str, stop: threading.Event, counts: list[int]) -> None:
    """Read one /tap stream until ``stop``; count the lines it delivered."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback http
            while not stop.is_set():
                line = resp.readline()
                if not line:
                    return
                counts[0] += line.startswith(b'{"type": "line"')
    except OSError:
        return


def run_once(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One flood through a fresh proxy with sampling ``mode`` ("top" or "no-top")."""
    traffic = Traffic.build(0.2, DEFAULT_BLOCKLIST)
    total = args.lines if args.rate <= 0 else int(args.rate * args.seconds)
    datagrams = build_datagrams(traffic, total, args.lines_per_datagram)
    sink = Sink(SinkSpec("udp", total, max_seconds=args.max_seconds + 30), traffic)
    sink.start()
    RESULTS.mkdir(parents=True, exist_ok=True)
    proxy = Proxy(
        args.proxy,
        sink.port,
        workers=args.workers,
        blocklist=DEFAULT_BLOCKLIST,
        log_path=RESULTS / f"proxy-top-cost-{mode}.log",
        extra_args=(f"--{mode}", *args.proxy_args.split()),
    )
    stop = threading.Event()
    threads: list[threading.Thread] = []
    tapped = [0]
    try:
        proxy.start()
        if mode == "top":
            url = f"http://{HOST}:{proxy.admin_port}/tap"
            for _ in range(args.watchers):
                thread = threading.Thread(target=_watch, args=(url, stop, tapped), daemon=True)
                thread.start()
                threads.append(thread)
        gen = LoadGenerator(
            LoadSpec(
                "udp",
                proxy.listen_port,
                processes=args.procs,
                rate=max(0.0, args.rate),
                max_seconds=args.max_seconds,
            ),
            traffic,
            datagrams,
            args.lines_per_datagram,
            total,
        )
        gen.prepare()
        cpu_before = sum(proxy.cpu().values())
        before = proxy.metrics()
        gen.go()
        load = gen.wait()
        sink.wait_quiet()
        cpu = sum(proxy.cpu().values()) - cpu_before
        after = proxy.metrics()
    finally:
        stop.set()
        proxy.stop()
        for thread in threads:
            thread.join(5)
        result = sink.finish()
    received = after.get("statsd_filter_lines_received_total", 0) - before.get(
        "statsd_filter_lines_received_total", 0
    )
    delivered = int(result.get("lines", 0) or 0)
    return {
        "mode": mode,
        "sent": load.lines,
        "seconds": round(load.seconds, 3),
        "received": int(received),
        "delivered": delivered,
        "delivered_per_s": delivered / load.seconds,
        "cpu_us_per_line": cpu / received * 1e6 if received else float("nan"),
        "cpu_per_s": cpu / load.seconds,
        "kept": received / load.lines if load.lines else 0.0,
        "tap_lines": tapped[0],
    }


def main(argv: list[str] | None = None) -> int:
    """Compare the proxy with /top sampling on and off under a UDP flood."""
    p = argparse.ArgumentParser(description=main.__doc__, allow_abbrev=False)
    p.add_argument("--quick", action="store_true", help="1 round of 4 s")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rate", type=float, default=200_000, help="lines/s offered; 0 = flood")
    p.add_argument("--seconds", type=float, default=10.0, help="load duration at --rate")
    p.add_argument("--lines", type=int, default=1_000_000, help="lines to flood with --rate 0")
    p.add_argument("--lines-per-datagram", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--procs", type=int, default=2, help="sender processes")
    p.add_argument("--watchers", type=int, default=0, help="/tap streams open during 'top' runs")
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--proxy", type=Path, default=DEFAULT_PROXY)
    p.add_argument("--proxy-args", default="", help="extra flags for both modes")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.lines = 1, 4.0, 200_000
    runs: dict[str, list[dict[str, Any]]] = {"top": [], "no-top": []}
    for round_ in range(args.rounds):
        order = ("top", "no-top") if round_ % 2 == 0 else ("no-top", "top")
        for mode in order:
            run = run_once(mode, args)
            runs[mode].append(run)
            print(
                f"round {round_ + 1} {mode:>6}: {run['delivered_per_s']:>10,.0f} delivered/s "
                f"{run['cpu_per_s']:6.3f} cpu_s/s {run['cpu_us_per_line']:6.3f} cpu_us/line  "
                f"kept {run['kept']:.3f}"
                + (f"  tap lines {run['tap_lines']}" if args.watchers and mode == "top" else ""),
                flush=True,
            )
    keys = ("delivered_per_s", "cpu_per_s", "cpu_us_per_line", "kept")
    med = {
        mode: {key: statistics.median(r[key] for r in rs) for key in keys}
        for mode, rs in runs.items()
    }
    print()
    print(f"{'mode':>6} {'delivered/s':>12} {'cpu_s/s':>8} {'cpu_us/line':>12} {'kept':>6}")
    for mode in ("no-top", "top"):
        m = med[mode]
        print(
            f"{mode:>6} {m['delivered_per_s']:>12,.0f} {m['cpu_per_s']:>8.3f} "
            f"{m['cpu_us_per_line']:>12.3f} {m['kept']:>6.3f}"
        )
    extra = med["top"]["cpu_per_s"] - med["no-top"]["cpu_per_s"]
    projected = 1 - max(0.0, extra) / args.workers
    rate_ratio = med["top"]["delivered_per_s"] / max(1e-9, med["no-top"]["delivered_per_s"])
    print(
        f"\nsampling costs {extra * 1000:.1f} ms of CPU per second in all; a saturated proxy "
        f"of {args.workers} worker(s) keeps {projected:.3f} of its throughput "
        f"(target >= {TARGET}: {'met' if projected >= TARGET else 'NOT met'}); "
        f"delivered top/no-top {rate_ratio:.3f}. On a busy machine, rerun with more --rounds."
    )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
