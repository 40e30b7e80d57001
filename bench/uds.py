"""UDS datagram input beside UDP input: how many lines/s the proxy takes in through each.

A benchmark, not a test: it prints figures and asserts nothing about speed.

For each transport the same pre-built datagrams (``workload.py``: realistic DogStatsD
lines, 20% under ``debug.``, blocked) are sent as fast as possible by forked sender
processes into a fresh ``statsd-filter run`` (``--unix-socket`` for ``unix``), whose
upstream is a UDP socket nobody reads (the output side is the same for both, and no
sink competes for the cores). Measured from the proxy's own ``/metrics``: lines
received per second (first to last line), lines lost before the proxy read them,
and worker CPU-seconds per million lines.

What differs: a UDP sender never waits, so a flood beyond what the workers read is
dropped by the kernel (``lost``); a Unix datagram sender blocks while the socket's
queue (``net.unix.max_dgram_qlen`` datagrams) is full, so nothing is lost and the
senders run at the proxy's pace.

    .venv/bin/python bench/uds.py            # 1,000,000 lines per transport
    .venv/bin/python bench/uds.py --quick    # 100,000 lines, a few seconds
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import multiprocessing.synchronize
import shutil
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from proxyctl import HOST, Proxy
from workload import DEFAULT_BLOCKLIST, Traffic, build_datagrams

REPO = Path(__file__).resolve().parent.parent
BINARY = REPO / ".venv" / "bin" / "statsd-filter"
# Bound on the whole run of one transport (the sends and the proxy catching up).
DEADLINE = 120.0
# The proxy has caught up when lines_received_total has not moved for this long.
QUIET = 0.5


def _sender(
    transport: str,
    address: str | tuple[str, int],
    datagrams: Sequence[bytes],
    go: mp.synchronize.Event,
) -> None:
    family = socket.AF_UNIX if transport == "unix" else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        go.wait(10)
        deadline = time.monotonic() + DEADLINE
        send = sock.send
        for i, datagram in enumerate(datagrams):
            send(datagram)
            if not i % 4096 and time.monotonic() > deadline:
                return


def run_one(
    transport: str, datagrams: list[bytes], lines: int, args: argparse.Namespace
) -> dict[str, float]:
    """One transport: start a proxy, flood it, wait until it settles; the figures."""
    tmp = Path(tempfile.mkdtemp(prefix="sf-bench-", dir="/tmp"))
    path = str(tmp / "dsd.sock")
    blackhole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the upstream: never read
    blackhole.bind((HOST, 0))
    proxy = Proxy(
        BINARY,
        blackhole.getsockname()[1],
        workers=args.workers,
        blocklist=DEFAULT_BLOCKLIST,
        extra_args=("--unix-socket", path, "--so-rcvbuf", str(args.so_rcvbuf)),
    )
    try:
        proxy.start()
        address: str | tuple[str, int] = path if transport == "unix" else (HOST, proxy.listen_port)
        go = mp.get_context("fork").Event()
        share = -(-len(datagrams) // args.senders)
        senders = [
            mp.get_context("fork").Process(
                target=_sender,
                args=(transport, address, datagrams[i * share : (i + 1) * share], go),
            )
            for i in range(args.senders)
        ]
        for process in senders:
            process.start()
        cpu_before = sum(proxy.cpu().get(pid, 0.0) for pid in proxy.worker_pids())
        go.set()
        started = time.monotonic()
        last, last_change, first_at = -1.0, started, 0.0
        while time.monotonic() - started < DEADLINE:
            received = proxy.metrics().get("statsd_filter_lines_received_total", 0.0)
            now = time.monotonic()
            if received and not first_at:
                first_at = now
            if received != last:
                last, last_change = received, now
            elif received and now - last_change > QUIET and not any(p.is_alive() for p in senders):
                break
            time.sleep(0.02)
        for process in senders:
            process.join(5)
        cpu = sum(proxy.cpu().get(pid, 0.0) for pid in proxy.worker_pids()) - cpu_before
        seconds = max(last_change - started, 1e-9)
        return {
            "received": last,
            "lost": lines - last,
            "lines_per_s": last / seconds,
            "seconds": seconds,
            "cpu_s_per_m": cpu / max(last, 1) * 1e6,
        }
    finally:
        proxy.stop()
        blackhole.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="100,000 lines per transport")
    parser.add_argument("--lines-per-datagram", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--so-rcvbuf", type=int, default=4 << 20, help="UDP receive buffer")
    parser.add_argument("--transports", default="udp,unix")
    args = parser.parse_args(argv)
    lines = 100_000 if args.quick else args.lines
    traffic = Traffic.build(0.2, DEFAULT_BLOCKLIST)
    datagrams = build_datagrams(traffic, lines, args.lines_per_datagram)
    print(
        f"{lines} lines in {len(datagrams)} datagrams, {args.senders} senders, "
        f"{args.workers} workers, unix max_dgram_qlen="
        f"{Path('/proc/sys/net/unix/max_dgram_qlen').read_text().strip()}"
    )
    header = ("transport", "received", "lost", "lines/s", "seconds", "cpu-s/M")
    print("{:<10} {:>10} {:>8} {:>10} {:>8} {:>8}".format(*header))
    for transport in args.transports.split(","):
        r = run_one(transport, datagrams, lines, args)
        print(
            f"{transport:<10} {r['received']:>10.0f} {r['lost']:>8.0f} {r['lines_per_s']:>10.0f} "
            f"{r['seconds']:>8.2f} {r['cpu_s_per_m']:>8.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
