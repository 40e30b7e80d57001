"""Runs statsd-filter as a real subprocess on loopback and measures it through /proc.

* Ports: free ones found by binding to port 0 (the listen port must be free for
  both UDP and TCP, since the proxy opens both on one number).
* Ready: ``/healthz`` answers 200 with status ``ok`` and every worker running.
* CPU: utime + stime from ``/proc/<pid>/stat`` for the supervisor and every
  worker (their pids come from ``/healthz``, cross-checked with a ppid scan of
  /proc); the caller takes a snapshot before and after the load.
* Memory: a thread samples ``VmRSS`` of every proxy process every
  :data:`SAMPLE_SECONDS` and keeps the peak of the sum; ``VmHWM`` (each
  process's own peak) is read once at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Proxy",
    "RssSampler",
    "free_port",
    "free_shared_port",
    "process_cpu",
    "pss_kib",
    "vm_kib",
]

HOST = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SAMPLE_SECONDS = 0.05
HEALTH_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
# Above this many prefixes the blocklist goes into a TOML file: one argv string
# is limited to 128 KiB on Linux.
BLOCKLIST_ARG_LIMIT = 100


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A port that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def free_shared_port(attempts: int = 50) -> int:
    """A port free for both UDP and TCP on the loopback address."""
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((HOST, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces or ')'.
    return raw[raw.rfind(")") + 2 :].split()


def process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of one process (fields 14 and 15 of /proc/<pid>/stat)."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def child_pids(parent: int) -> list[int]:
    """Processes whose parent is ``parent`` (a scan of /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and int(fields[1]) == parent:
                out.append(int(entry.name))
    return sorted(out)


def vm_kib(pid: int, key: str) -> int | None:
    """A ``Vm*`` value (kB) from /proc/<pid>/status, e.g. ``VmRSS`` or ``VmHWM``."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def pss_kib(pid: int) -> int | None:
    """Proportional set size (kB): shared pages split between the processes sharing them."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return None


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET a loopback URL; returns (status, body), or (0, b"") if nothing answered."""
    if not url.startswith(f"http://{HOST}:"):
        raise ValueError(f"refusing a non-loopback URL: {url}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback http only, checked above
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except (OSError, urllib.error.URLError):
        return 0, b""


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format to ``{"name{labels}": value}``."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


class RssSampler:
    """Samples VmRSS of a set of processes in a thread; keeps peaks."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = list(pids)
        self.peak_total_kib = 0
        self.peak_kib: dict[int, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> int:
        """Read every process once; returns the current total in KiB."""
        total = 0
        for pid in self.pids:
            rss = vm_kib(pid, "VmRSS") or 0
            total += rss
            self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), rss)
        self.peak_total_kib = max(self.peak_total_kib, total)
        self.samples += 1
        return total

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.sample()

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()


@dataclass
class Proxy:
    """One statsd-filter process tree: supervisor plus workers."""

    binary: Path
    target_port: int
    target_protocol: str = "udp"
    workers: int | None = None
    blocklist: tuple[str, ...] = ()
    log_path: Path | None = None
    extra_args: tuple[str, ...] = ()
    listen_port: int = 0
    admin_port: int = 0
    health: dict[str, Any] = field(default_factory=dict)
    _proc: subprocess.Popen[bytes] | None = None
    _config: Path | None = None

    def command(self) -> list[str]:
        self.listen_port = free_shared_port()
        self.admin_port = free_port()
        cmd = [
            str(self.binary),
            "run",
            "--listen-host",
            HOST,
            "--listen-port",
            str(self.listen_port),
            "--target-host",
            HOST,
            "--target-port",
            str(self.target_port),
            "--target-protocol",
            self.target_protocol,
            "--admin-host",
            HOST,
            "--admin-port",
            str(self.admin_port),
            "--log-level",
            "warning",
        ]
        if self.workers is not None:
            cmd += ["--workers", str(self.workers)]
        if len(self.blocklist) > BLOCKLIST_ARG_LIMIT:
            assert self.log_path is not None
            self._config = self.log_path.with_suffix(".toml")
            items = ", ".join(json.dumps(p) for p in self.blocklist)
            self._config.write_text(f"blocklist = [{items}]\n")
            cmd += ["--config", str(self._config)]
        elif self.blocklist:
            cmd += ["--blocklist", ",".join(self.blocklist)]
        return cmd + list(self.extra_args)

    def start(self) -> dict[str, Any]:
        """Start the proxy and wait until /healthz says every worker runs; returns it."""
        cmd = self.command()
        log = self.log_path.open("wb") if self.log_path else subprocess.DEVNULL
        try:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        finally:
            if self.log_path and not isinstance(log, int):
                log.close()
        deadline = time.monotonic() + HEALTH_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"statsd-filter exited with {self._proc.returncode}: {cmd}")
            status, body = http_get(f"http://{HOST}:{self.admin_port}/healthz", timeout=1.0)
            if status == 200:
                health: dict[str, Any] = json.loads(body)
                workers = health.get("workers", [])
                if health.get("status") == "ok" and all(
                    w.get("state") == "running" for w in workers
                ):
                    self.health = health
                    return health
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"statsd-filter did not become healthy within {HEALTH_TIMEOUT}s")

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def worker_pids(self) -> list[int]:
        from_health = [int(w["pid"]) for w in self.health.get("workers", []) if w.get("pid")]
        return from_health or child_pids(self.pid)

    def pids(self) -> list[int]:
        return [self.pid, *self.worker_pids()]

    def cpu(self) -> dict[int, float]:
        """CPU seconds so far of every proxy process."""
        out = {}
        for pid in self.pids():
            value = process_cpu(pid)
            if value is not None:
                out[pid] = value
        return out

    def hwm_kib(self) -> dict[int, int]:
        """Each process's peak resident set (VmHWM)."""
        return {pid: vm_kib(pid, "VmHWM") or 0 for pid in self.pids()}

    def metrics(self) -> dict[str, float]:
        status, body = http_get(f"http://{HOST}:{self.admin_port}/metrics")
        return parse_metrics(body.decode()) if status == 200 else {}

    def settled_metrics(self, timeout: float = 30.0) -> dict[str, float]:
        """``/metrics`` once every line received is accounted for (forwarded, blocked,
        aggregated or dropped), or the last ones read when ``timeout`` runs out."""
        outcomes = tuple(
            f"statsd_filter_lines_{kind}_total"
            for kind in ("forwarded", "blocked", "aggregated", "dropped")
        )
        deadline = time.monotonic() + timeout
        metrics = self.metrics()
        while time.monotonic() < deadline:
            metrics = self.metrics()
            accounted = sum(v for k, v in metrics.items() if k.startswith(outcomes))
            if metrics.get("statsd_filter_lines_received_total", -1) == accounted:
                time.sleep(0.2)
                return self.metrics()
            time.sleep(0.05)
        return metrics

    def current_health(self) -> dict[str, Any]:
        status, body = http_get(f"http://{HOST}:{self.admin_port}/healthz")
        return json.loads(body) if status else {}

    def stop(self) -> int | None:
        """SIGTERM, wait for the graceful drain, SIGKILL if it hangs; returns the exit status."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                for pid in self.worker_pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self._proc.kill()
                self._proc.wait(5)
        if self._config is not None:
            self._config.unlink(missing_ok=True)
        return self._proc.returncode
