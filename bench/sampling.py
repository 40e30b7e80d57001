"""Measuring the machine around a scenario: idleness, others' CPU, py-spy, identity.

Before a scenario the runner waits for the machine to be quiet
(:func:`wait_until_idle`); during it, :class:`OtherCpu` counts the CPU that
processes outside the benchmark used, and optional py-spy recordings
(:func:`start_profilers`) sample each worker. :func:`machine` and
:func:`proxy_identity` say what the figures were measured on and with; the
proxy's own CPU and memory come from ``proxyctl``.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import resource
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxyctl import CLOCK_TICKS, process_cpu
from scenarios import REPO, RESULTS

# Before each scenario, wait for the machine to be less busy than this (percent of
# all CPUs): a test suite running alongside would otherwise take the proxy's cores.
BUSY_THRESHOLD = 15.0


def start_profilers(py_spy: Path, pids: list[int], name: str) -> list[Profiler]:
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


def stop_profilers(profilers: list[Profiler]) -> dict[str, Any]:
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
