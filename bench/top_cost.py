"""What /top sampling costs: the same UDP flood through the proxy with --top and --no-top.

Issue #15's target: with sampling on (the default), forwarding throughput stays
within 5% of sampling off. Each round runs both modes back to back (the order
alternates between rounds, so a machine getting busier does not favour one),
each a fresh proxy and sink, the benchmark's own traffic (``workload.py``) sent
as fast as the generator can. Reported per mode (medians over the rounds):

* ``delivered/s``: lines the sink received over the load's duration (a flood
  beyond what the proxy can take measures its throughput);
* ``cpu_us/line``: CPU of the proxy (supervisor + workers) per line it received,
  the steadier figure on a shared machine;
* ``kept``: the share of sent lines the proxy received and forwarded or blocked
  (the rest the kernel dropped before the proxy could read them).

``--watchers N`` also keeps N ``/tap`` streams open during the ``top`` runs
(reading them as fast as they come), to show what watching adds.

    .venv/bin/python bench/top_cost.py --quick        # 1 round of 200k lines, ~20 s
    .venv/bin/python bench/top_cost.py --rounds 3 --lines 2000000
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
    datagrams = build_datagrams(traffic, args.lines, args.lines_per_datagram)
    sink = Sink(SinkSpec("udp", args.lines, max_seconds=args.max_seconds + 30), traffic)
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
            LoadSpec("udp", proxy.listen_port, processes=args.procs, max_seconds=args.max_seconds),
            traffic,
            datagrams,
            args.lines_per_datagram,
            args.lines,
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
        "kept": received / load.lines if load.lines else 0.0,
        "tap_lines": tapped[0],
    }


def main(argv: list[str] | None = None) -> int:
    """Compare the proxy with /top sampling on and off under a UDP flood."""
    p = argparse.ArgumentParser(description=main.__doc__, allow_abbrev=False)
    p.add_argument("--quick", action="store_true", help="1 round of 200,000 lines")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--lines", type=int, default=1_000_000)
    p.add_argument("--lines-per-datagram", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--procs", type=int, default=2, help="sender processes")
    p.add_argument("--watchers", type=int, default=0, help="/tap streams open during 'top' runs")
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--proxy", type=Path, default=DEFAULT_PROXY)
    p.add_argument("--proxy-args", default="", help="extra flags for both modes")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.lines = 1, 200_000
    runs: dict[str, list[dict[str, Any]]] = {"top": [], "no-top": []}
    for round_ in range(args.rounds):
        order = ("top", "no-top") if round_ % 2 == 0 else ("no-top", "top")
        for mode in order:
            run = run_once(mode, args)
            runs[mode].append(run)
            print(
                f"round {round_ + 1} {mode:>6}: {run['delivered_per_s']:>10,.0f} delivered/s "
                f"{run['cpu_us_per_line']:6.3f} cpu_us/line  kept {run['kept']:.3f}"
                + (f"  tap lines {run['tap_lines']}" if args.watchers and mode == "top" else ""),
                flush=True,
            )
    med = {
        mode: {
            key: statistics.median(r[key] for r in rs)
            for key in ("delivered_per_s", "cpu_us_per_line", "kept")
        }
        for mode, rs in runs.items()
    }
    rate_ratio = med["top"]["delivered_per_s"] / max(1e-9, med["no-top"]["delivered_per_s"])
    cpu_ratio = med["no-top"]["cpu_us_per_line"] / max(1e-9, med["top"]["cpu_us_per_line"])
    print()
    print(f"{'mode':>6} {'delivered/s':>12} {'cpu_us/line':>12} {'kept':>6}")
    for mode in ("no-top", "top"):
        m = med[mode]
        print(
            f"{mode:>6} {m['delivered_per_s']:>12,.0f} {m['cpu_us_per_line']:>12.3f} "
            f"{m['kept']:>6.3f}"
        )
    print(
        f"\ntop / no-top: throughput {rate_ratio:.3f}, lines per CPU-second {cpu_ratio:.3f} "
        f"(target >= {TARGET}: {'met' if min(rate_ratio, cpu_ratio) >= TARGET else 'NOT met'}; "
        "on a busy machine, rerun with more --rounds before believing it)"
    )
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
