"""Side by side with peers (issue #12): CPU per forwarded line, delivery and latency.

Each forwarder gets the same load in turn, on 127.0.0.1: a small C recvmmsg /
sendmmsg forwarder (the floor of what filtering UDP costs), a Node proxy that
forwards each datagram as is (the shape of most simple peers; skipped without
``node``) and statsd-filter (``--blocklist blocked``, default workers), or
several builds of it (``--variant``). The loads: evenly spaced single datagrams
of 4 lines at each ``--rates`` datagrams/s (the pacer stamps every line with
its send time, so the sink measures one-way delay), a full-rate flood from
several source sockets, and, for statsd-filter, nothing at all (idle CPU with a
live upstream). The load tools are C programs in ``bench/peers/``, built with
``gcc -O2`` into ``bench/.build/`` (git-ignored) on first use.

    .venv/bin/python bench/peers.py                       # this tree's statsd-filter
    .venv/bin/python bench/peers.py --rounds 3 \\
        --variant after=.venv/bin/statsd-filter \\
        --variant before=../old-checkout/.venv/bin/statsd-filter \\
        --variant 'delay0=.venv/bin/statsd-filter::--max-read-delay 0'

CPU is utime + stime from ``/proc/PID/stat`` of the forwarder and every process
under it, read before the load and after the sink has gone quiet; "% core" is
that over the load's length, "CPU-s/M" that per million lines the sink got
(forwarded lines). Whole datagrams are blocked (20% of lines by default), so the
per-datagram Node filter and the per-line ones forward the same lines. With
``--rounds N`` the forwarders take turns in every round (the order rotating) and
each figure is the median of its N values. The machine's load average and the
CPU other processes used during each run are recorded beside it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxyctl import Proxy, child_pids, process_cpu
from report import markdown_table
from sampling import OtherCpu, machine
from scenarios import BENCH, DEFAULT_PROXY, RESULTS

TOOLS = BENCH / "peers"
BUILD = BENCH / ".build"
C_TOOLS = ("fwd", "sink", "pacer", "flood")
BLOCKED = "blocked"
# statsd-filter's documented default coalescing delay (--max-read-delay).
DEFAULT_READ_DELAY = 0.02
# The figures for a Rust per-datagram proxy, quoted (we do not run it):
# datagrams/s -> (% of a core, CPU-s per million forwarded lines).
RUST_QUOTED = {5000: (16.2, 10.2), 1000: (4.1, 12.9)}
# How long the sink waits for more after the last datagram before it reports.
SINK_IDLE_MS = 600
SETTLE_SECONDS = 0.5


def build_tools(cc: str = "gcc") -> dict[str, Path]:
    """Compile the C tools once per source version; returns name -> executable."""
    BUILD.mkdir(parents=True, exist_ok=True)
    header = (TOOLS / "common.h").read_bytes()
    out = {}
    for name in C_TOOLS:
        source = TOOLS / f"{name}.c"
        digest = hashlib.sha256(header + source.read_bytes()).hexdigest()[:12]
        exe = BUILD / f"{name}-{digest}"
        if not exe.exists():
            tmp = exe.with_suffix(".tmp")
            subprocess.run([cc, "-O2", "-Wall", "-o", str(tmp), str(source)], check=True)
            tmp.rename(exe)
        out[name] = exe
    return out


def tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds so far of ``root`` and every process under it, by pid."""
    out: dict[int, float] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        cpu = process_cpu(pid)
        if cpu is not None:
            out[pid] = cpu
            todo.extend(child_pids(pid))
    return out


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def parse_kv(text: str) -> dict[str, float]:
    """The ``key=value`` figures the C tools print on their last line."""
    lines = [line for line in text.splitlines() if "=" in line]
    if not lines:
        return {}
    return {k: float(v) for k, _, v in (part.partition("=") for part in lines[-1].split())}


class Tool:
    """A long-running helper that prints ``port N`` once it listens."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().split()
        if len(first) != 2 or first[0] != "port":
            self.proc.kill()
            raise RuntimeError(f"{cmd[0]} did not report its port: {first}")
        self.port = int(first[1])

    def finish(self, timeout: float) -> dict[str, float]:
        """Wait for a self-ending tool (the sink) and parse its report."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            out, _ = self.proc.communicate(timeout=10)
        return parse_kv(out)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class Forwarder:
    """One forwarder under test: how to start it in front of a sink, and its processes."""

    name: str
    kind: str  # "c", "node" or "statsd-filter"
    binary: Path | None = None
    args: tuple[str, ...] = ()
    tools: dict[str, Path] = field(default_factory=dict)
    _tool: Tool | None = None
    _proxy: Proxy | None = None

    @property
    def read_delay(self) -> float | None:
        """The coalescing delay this statsd-filter runs with (None: it has none)."""
        if self.kind != "statsd-filter" or self.binary is None:
            return None
        args = list(self.args)
        if "--max-read-delay" in args:
            return float(args[args.index("--max-read-delay") + 1])
        # Builds from before the flag existed read every datagram at once.
        help_text = subprocess.run(
            [str(self.binary), "run", "--help"], capture_output=True, text=True, timeout=30
        ).stdout
        return DEFAULT_READ_DELAY if "--max-read-delay" in help_text else None

    def start(self, target_port: int) -> tuple[int, int]:
        """Start in front of ``target_port``; returns (root pid, listening port)."""
        if self.kind == "statsd-filter":
            assert self.binary is not None
            RESULTS.mkdir(parents=True, exist_ok=True)
            self._proxy = Proxy(
                self.binary,
                target_port,
                blocklist=(BLOCKED,),
                log_path=RESULTS / f"peers-{self.name}.log",
                extra_args=self.args,
            )
            self._proxy.start()
            return self._proxy.pid, self._proxy.listen_port
        if self.kind == "c":
            cmd = [str(self.tools["fwd"]), str(target_port)]
        else:
            cmd = ["node", str(TOOLS / "node_proxy.js"), str(target_port), BLOCKED]
        self._tool = Tool(cmd)
        return self._tool.proc.pid, self._tool.port

    def stop(self) -> None:
        if self._proxy is not None:
            self._proxy.stop()
            self._proxy = None
        if self._tool is not None:
            self._tool.stop()
            self._tool = None


@dataclass
class Options:
    seconds: float
    rates: tuple[int, ...]
    lines_per_datagram: int
    blocked_share: float
    flood_lines: int
    flood_sockets: int
    idle_seconds: float


def measure(
    fwd: Forwarder, load: list[str], opts: Options, tools: dict[str, Path], what: str
) -> dict[str, Any]:
    """One forwarder under one load: delivery, CPU, latency, and what else ran meanwhile."""
    sink = Tool([str(tools["sink"]), str(SINK_IDLE_MS), "60000"])
    row: dict[str, Any] = {"test": what, "forwarder": fwd.name, "loadavg": os.getloadavg()[0]}
    try:
        root, port = fwd.start(sink.port)
        time.sleep(SETTLE_SECONDS)
        others = OtherCpu([sink.proc.pid, *tree_cpu(root)])
        before = tree_cpu(root)
        started = time.monotonic()
        gen = subprocess.run(
            [*load[:1], str(port), *load[1:]], capture_output=True, text=True, check=True
        )
        load_seconds = time.monotonic() - started
        got = sink.finish(timeout=opts.seconds + 60)
        after = tree_cpu(root)
        row["other_cpu_s"] = round(others.seconds(), 2)
    finally:
        fwd.stop()
        sink.stop()
    sent = parse_kv(gen.stdout)
    passing = sent.get("lines", 0) - sent.get("blocked_lines", 0)
    delivered = got.get("lines", 0) - got.get("blocked_seen", 0)
    cpu = cpu_used(before, after)
    row.update(
        {
            "lines_sent": int(sent.get("lines", 0)),
            "passing_sent": int(passing),
            "delivered": int(delivered),
            "delivered_pct": 100.0 * delivered / passing if passing else 0.0,
            "blocked_seen": int(got.get("blocked_seen", 0)),
            "cpu_s": cpu,
            "cpu_pct": 100.0 * cpu / max(load_seconds, 1e-9),
            "cpu_per_million": cpu / (delivered / 1e6) if delivered else None,
            "load_seconds": load_seconds,
            "sink_datagrams": int(got.get("datagrams", 0)),
        }
    )
    if got.get("latency_n"):
        row["latency_us"] = {k: got[f"{k}_us"] for k in ("p50", "p99", "p999", "max")}
    if "late_us_max" in sent:
        row["pacer_late_us_max"] = sent["late_us_max"]
    if got.get("last_ns") and got.get("first_ns"):
        window = (got["last_ns"] - got["first_ns"]) / 1e9
        row["delivered_per_s"] = delivered / window if window > 0 else None
    return row


def measure_idle(fwd: Forwarder, seconds: float, tools: dict[str, Path]) -> dict[str, Any]:
    """CPU of a forwarder with a live upstream and no traffic at all."""
    sink = Tool([str(tools["sink"]), "1000", str(int((seconds + 120) * 1000))])
    row: dict[str, Any] = {"test": "idle", "forwarder": fwd.name, "loadavg": os.getloadavg()[0]}
    try:
        root, _ = fwd.start(sink.port)
        time.sleep(2.0)  # let start-up work (imports, forks, first health checks) finish
        before = tree_cpu(root)
        time.sleep(seconds)
        after = tree_cpu(root)
    finally:
        fwd.stop()
        sink.stop()
    cpu = cpu_used(before, after)
    row.update({"cpu_s": cpu, "cpu_pct": 100.0 * cpu / seconds, "seconds": seconds})
    # Which process spends it: the supervisor (root) or the workers under it.
    row["root_cpu_s"] = after.get(root, 0.0) - before.get(root, 0.0)
    row["children_cpu_s"] = [
        round(cpu - before.get(pid, 0.0), 3) for pid, cpu in sorted(after.items()) if pid != root
    ]
    return row


def median_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per (test, forwarder): every numeric figure's median over the rounds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["test"], row["forwarder"]), []).append(row)
    out = {}
    for key, group in groups.items():
        merged: dict[str, Any] = {"test": key[0], "forwarder": key[1], "rounds": len(group)}
        for name in group[0]:
            values = [r.get(name) for r in group]
            if all(isinstance(v, int | float) for v in values):
                merged[name] = statistics.median(values)  # type: ignore[type-var]
        if "latency_us" in group[0]:
            merged["latency_us"] = {
                k: statistics.median(r["latency_us"][k] for r in group if "latency_us" in r)
                for k in group[0]["latency_us"]
            }
        out[key] = merged
    return out


def ratio(value: float | None, base: float | None) -> str:
    if not value or not base:
        return "-"
    return f"{value / base:.2f}"


def table(results: dict[tuple[str, str], dict[str, Any]], tests: list[str]) -> str:
    rows = [
        [
            "load",
            "forwarder",
            "deliv %",
            "% core",
            "CPU-s/M",
            "x C",
            "x Node",
            "p50/p99/max µs",
            "loadavg",
            "other CPU s",
        ]
    ]
    for test in tests:
        c = results.get((test, "c"), {}).get("cpu_per_million")
        node = results.get((test, "node"), {}).get("cpu_per_million")
        for (t, name), r in results.items():
            if t != test:
                continue
            lat = r.get("latency_us", {})
            per_m = r.get("cpu_per_million")
            rows.append(
                [
                    test,
                    name,
                    f"{r['delivered_pct']:.2f}" if "delivered_pct" in r else "-",
                    f"{r['cpu_pct']:.2f}",
                    f"{per_m:.2f}" if per_m else "-",
                    ratio(per_m, c) if name != "c" else "1",
                    ratio(per_m, node) if name != "node" else "1",
                    f"{lat['p50']:.0f}/{lat['p99']:.0f}/{lat['max']:.0f}" if lat else "-",
                    f"{r['loadavg']:.2f}",
                    f"{r['other_cpu_s']:.1f}" if "other_cpu_s" in r else "-",
                ]
            )
    return markdown_table(rows)


def verdicts(
    results: dict[tuple[str, str], dict[str, Any]], opts: Options, forwarders: list[Forwarder]
) -> list[tuple[str, str, str]]:
    """Issue #12's targets for every statsd-filter variant: (target, measured, verdict)."""
    out: list[tuple[str, str, str]] = []

    def ok(flag: bool) -> str:
        return "met" if flag else "NOT met"

    for fwd in forwarders:
        if fwd.kind != "statsd-filter":
            continue
        for rate in opts.rates:
            test = f"{rate}/s"
            me, c = results.get((test, fwd.name)), results.get((test, "c"))
            if not me or not c or not me.get("cpu_per_million"):
                continue
            node = results.get((test, "node"), {}).get("cpu_per_million")
            rust = RUST_QUOTED.get(rate, (None, None))[1]
            per_m = me["cpu_per_million"]
            node_text = f"{node:.2f}" if node else "not run"
            x_c = per_m / c["cpu_per_million"]
            below = [b for b in (node, rust) if b]
            good = me["delivered_pct"] >= 100 and x_c <= 2 and all(per_m < b for b in below)
            out.append(
                (
                    f"{fwd.name} {test}: CPU/line < Node and Rust, <= 2x C, 100% delivered",
                    (
                        f"{per_m:.2f} CPU-s/M ({x_c:.2f} x C; Node {node_text}, Rust {rust})"
                        f", {me['delivered_pct']:.2f}% delivered"
                    ),
                    ok(good),
                )
            )
            lat = me.get("latency_us", {})
            delay = fwd.read_delay
            if lat and delay is not None:
                c_max = c.get("latency_us", {}).get("max", 0)
                measured = f"p50 {lat['p50']:.0f} µs, p99 {lat['p99']:.0f} µs"
                measured += f", max {lat['max']:.0f} µs (C: {c_max:.0f} µs max)"
                out.append(
                    (
                        f"{fwd.name} {test}: no line waits longer than --max-read-delay {delay} s",
                        measured,
                        ok(lat["max"] <= delay * 1e6 + c_max),
                    )
                )
        me, c = results.get(("flood", fwd.name)), results.get(("flood", "c"))
        if me and c and me.get("cpu_per_million") and c.get("cpu_per_million") and c["delivered"]:
            share = me["delivered"] / c["delivered"]
            x_c = me["cpu_per_million"] / c["cpu_per_million"]
            measured = f"{share:.1%} of C's ({me['delivered_pct']:.1f}%"
            measured += f" vs {c['delivered_pct']:.1f}% of passing sent)"
            measured += f", {me['cpu_per_million']:.2f} vs {c['cpu_per_million']:.2f} CPU-s/M"
            measured += f" ({x_c:.2f} x)"
            out.append(
                (
                    f"{fwd.name} flood: >= 99% of C's delivered lines at <= 2x its CPU per line",
                    measured,
                    ok(share >= 0.99 and x_c <= 2),
                )
            )
        idle = results.get(("idle", fwd.name))
        if idle:
            measured = f"{idle['cpu_pct']:.3f}% ({idle['cpu_s']:.3f} CPU-s"
            measured += f" in {idle['seconds']:.0f} s)"
            out.append((f"{fwd.name} idle: < 0.2% of a core", measured, ok(idle["cpu_pct"] < 0.2)))
    return out


def parse_variant(text: str) -> Forwarder:
    """``LABEL=PATH`` or ``LABEL=PATH::ARGS``."""
    label, _, rest = text.partition("=")
    path, _, args = rest.partition("::")
    if not label or not path:
        raise SystemExit(f"--variant wants LABEL=PATH[::ARGS], got {text!r}")
    return Forwarder(label, "statsd-filter", Path(path), tuple(shlex.split(args)))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--proxy-bin", type=Path, default=DEFAULT_PROXY, help="statsd-filter to run")
    p.add_argument("--proxy-args", default="", help="extra flags for it, e.g. '--max-read-delay 0'")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help="LABEL=PATH[::ARGS], repeatable: several statsd-filter builds (replaces --proxy-bin)",
    )
    p.add_argument("--seconds", type=float, default=10.0, help="length of each paced run")
    p.add_argument("--rates", default="5000,1000", help="paced datagrams/s, comma-separated")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds; medians reported")
    p.add_argument("--lines-per-datagram", type=int, default=4)
    p.add_argument("--blocked-share", type=float, default=0.2)
    p.add_argument("--flood-lines", type=int, default=2_000_000, help="0: no flood")
    p.add_argument("--flood-sockets", type=int, default=8)
    p.add_argument("--idle-seconds", type=float, default=25.0, help="0: no idle run")
    p.add_argument("--no-node", action="store_true", help="leave the Node proxy out")
    p.add_argument("--json", type=Path, default=RESULTS / "peers-latest.json")
    args = p.parse_args(argv)
    opts = Options(
        seconds=args.seconds,
        rates=tuple(int(r) for r in args.rates.split(",") if r.strip()),
        lines_per_datagram=args.lines_per_datagram,
        blocked_share=args.blocked_share,
        flood_lines=args.flood_lines,
        flood_sockets=args.flood_sockets,
        idle_seconds=args.idle_seconds,
    )
    tools = build_tools()
    forwarders = [Forwarder("c", "c", tools=tools)]
    if not args.no_node and shutil.which("node"):
        forwarders.append(Forwarder("node", "node"))
    variants = [parse_variant(v) for v in args.variant] or [
        Forwarder(
            "statsd-filter", "statsd-filter", args.proxy_bin, tuple(shlex.split(args.proxy_args))
        )
    ]
    for v in variants:
        if v.binary is None or not v.binary.exists():
            print(f"statsd-filter not found at {v.binary}", file=sys.stderr)
            return 1
    forwarders += variants
    per = str(opts.lines_per_datagram)
    share = str(opts.blocked_share)
    meta = machine()
    meta["command"] = shlex.join([sys.executable, *sys.argv])
    meta["uptime"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"peers benchmark, {meta['date']}, {meta['nproc']} CPUs; {meta['uptime']}", flush=True)
    rows: list[dict[str, Any]] = []
    for index in range(args.rounds):
        turn = forwarders[index % len(forwarders) :] + forwarders[: index % len(forwarders)]
        loads = [
            (f"{rate}/s", [str(tools["pacer"]), str(rate), str(opts.seconds), per, share])
            for rate in opts.rates
        ]
        if opts.flood_lines:
            flood = [str(opts.flood_lines), str(opts.flood_sockets), per, share]
            loads.append(("flood", [str(tools["flood"]), *flood]))
        for test, load in loads:
            for fwd in turn:
                row = measure(fwd, load, opts, tools, test)
                row["round"] = index + 1
                rows.append(row)
                lat = row.get("latency_us", {})
                print(
                    f"  [{index + 1}] {test:8} {fwd.name:14} delivered {row['delivered_pct']:6.2f}%"
                    f"  {row['cpu_pct']:6.2f}% core  {row['cpu_per_million'] or 0:7.2f} CPU-s/M"
                    f"  p50/p99 {lat.get('p50', 0):.0f}/{lat.get('p99', 0):.0f} µs"
                    f"  loadavg {row['loadavg']:.2f} other {row['other_cpu_s']:.1f} s",
                    flush=True,
                )
    if opts.idle_seconds:
        for fwd in variants:
            row = measure_idle(fwd, opts.idle_seconds, tools)
            rows.append(row)
            print(
                f"  idle {fwd.name:14} {row['cpu_pct']:.3f}% core: {row['root_cpu_s']:.2f} CPU-s"
                f" in the top process, {row['children_cpu_s']} in those under it",
                flush=True,
            )
    results = median_rows(rows)
    tests = [*(f"{r}/s" for r in opts.rates), "flood", "idle"]
    print()
    print(table(results, tests))
    print()
    found = verdicts(results, opts, forwarders)
    for target, measured, verdict in found:
        print(f"{verdict:8} {target}: {measured}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "meta": meta,
                "forwarders": [
                    {"name": f.name, "kind": f.kind, "binary": str(f.binary), "args": f.args}
                    for f in forwarders
                ],
                "medians": list(results.values()),
                "targets": [{"target": t, "measured": m, "verdict": v} for t, m, v in found],
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
