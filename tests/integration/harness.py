"""Shared helpers for integration tests: the real proxy process and a capture sink.

Everything binds to 127.0.0.1 (or ::1) on ports found by binding to port 0,
and every wait is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

from tests.integration.etsy import pick_free_port

BIN = Path(sys.executable).parent / "statsd-filter"
ROOT = Path(__file__).resolve().parents[2]
LOCALHOST = "127.0.0.1"
_ENV_NAMES = ("listen_port", "target_host", "target_port", "blocklist", "num_threads")


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test process environment without any statsd-filter setting."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("STATSD_FILTER_") and k not in _ENV_NAMES
    }
    env.update(extra or {})
    return env


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns a truthy value; bounded in time and count."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    return predicate()


class Sink:
    """A StatsD upstream stand-in that records every line (and UDP datagram) it gets."""

    def __init__(
        self, protocol: str = "udp", port: int | None = None, host: str = LOCALHOST
    ) -> None:
        self.protocol = protocol
        self.host = host
        self.port = port or pick_free_port()
        self.datagrams: list[bytes] = []
        self._lines: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.connections = 0
        self.probes = 0
        self._conns: list[socket.socket] = []
        self._listen()

    def _listen(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        if self.protocol == "udp":
            self.sock = socket.socket(family, socket.SOCK_DGRAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        else:
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((self.host, self.port))
            if self.protocol == "tcp":
                self.sock.listen(64)
        except OSError:
            self.sock.close()
            raise
        self.sock.settimeout(0.1)
        self._serving = threading.Event()
        self._serving.set()
        self._server = threading.Thread(
            target=self._serve_udp if self.protocol == "udp" else self._serve_tcp,
            args=(self.sock, self._serving),
            daemon=True,
        )
        self._server.start()

    def _close_listener(self) -> None:
        """Stop serving the socket, then close it.

        The serving thread must be gone first: while a thread is blocked in
        accept() or recv() on a socket, closing it elsewhere leaves it open in
        the kernel (still taking connections and datagrams) until that call
        returns, and then silently discards what it took.
        """
        self._serving.clear()
        self._server.join(5)
        if self.protocol == "tcp":
            # Closing a listening socket resets the connections still in its
            # accept queue, data and all: take them first.
            self.sock.setblocking(False)
            for _ in range(1000):
                try:
                    conn, _ = self.sock.accept()
                except OSError:
                    break
                self._adopt(conn)
        self.sock.close()

    def pause(self) -> None:
        """A clean TCP outage: stop listening, and end every connection the way a
        server that stops gracefully does (FIN, then read what was still sent)."""
        assert self.protocol == "tcp"
        self._close_listener()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)

    def resume(self) -> None:
        """Listen again on the same port after :meth:`pause`."""
        self._listen()

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _serve_udp(self, sock: socket.socket, serving: threading.Event) -> None:
        while serving.is_set():
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                self.probes += 1  # a health probe; StatsD servers ignore empty datagrams
                continue
            with self._lock:
                self.datagrams.append(data)
                self._lines.extend(data.split(b"\n"))

    def _serve_tcp(self, sock: socket.socket, serving: threading.Event) -> None:
        while serving.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._adopt(conn)

    def _adopt(self, conn: socket.socket) -> None:
        conn.setblocking(True)
        self.connections += 1
        with self._lock:
            self._conns.append(conn)
        self._spawn(self._read_tcp, conn)

    def _read_tcp(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        buf = b""  # an unterminated tail at EOF is not a line (what StatsD servers do)
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                buf += data
                *complete, buf = buf.split(b"\n")
                with self._lock:
                    self._lines.extend(complete)

    def lines(self) -> list[bytes]:
        with self._lock:
            return list(self._lines)

    def wait_for_lines(self, count: int, timeout: float = 10.0) -> list[bytes]:
        """Wait until at least ``count`` lines arrived; returns all lines."""
        wait_until(lambda: len(self.lines()) >= count, timeout)
        return self.lines()

    def settle(self, quiet: float = 0.3, timeout: float = 10.0) -> list[bytes]:
        """Wait until no new line arrived for ``quiet`` seconds; returns all lines."""
        last = -1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            n = len(self.lines())
            if n == last:
                break
            last = n
            time.sleep(quiet)
        return self.lines()

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self._close_listener()
        self._stop.set()
        for thread in self._threads:
            thread.join(2)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class UnixSink:
    """A Unix datagram socket standing in for the Datadog agent's dsd.socket, or a Unix
    stream socket decoding its length-prefixed frames; records every line it gets."""

    def __init__(self, path: Path, kind: str = "dgram") -> None:
        self.path = path
        self.kind = kind
        self._lines: list[bytes] = []
        self.datagrams: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        sock_type = socket.SOCK_DGRAM if kind == "dgram" else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_UNIX, sock_type)
        try:
            self.sock.bind(str(path))
            if kind == "stream":
                self.sock.listen(64)
        except OSError:
            self.sock.close()
            raise
        self.sock.settimeout(0.1)
        self._threads = [threading.Thread(target=self._serve, daemon=True)]
        self._threads[0].start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                if self.kind == "dgram":
                    self._take(self.sock.recv(1 << 20))
                    continue
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._read_frames, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _take(self, payload: bytes) -> None:
        if payload:  # an empty datagram is a health probe
            with self._lock:
                self.datagrams.append(payload)
                self._lines.extend(payload.split(b"\n"))

    def _read_frames(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        buf = b""
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while len(buf) >= 4:
                    size = int.from_bytes(buf[:4], "little")
                    if len(buf) < 4 + size:
                        break
                    self._take(buf[4 : 4 + size])
                    buf = buf[4 + size :]

    def lines(self) -> list[bytes]:
        with self._lock:
            return list(self._lines)

    def wait_for_lines(self, count: int, timeout: float = 10.0) -> list[bytes]:
        """Wait until at least ``count`` lines arrived; returns all lines."""
        wait_until(lambda: len(self.lines()) >= count, timeout)
        return self.lines()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(2)
        self.sock.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_METRIC = re.compile(r"^(statsd_filter_\w+(?:\{[^}]*\})?) (\S+)$")


class Proxy:
    """The real ``statsd-filter run`` as a subprocess on free loopback ports."""

    def __init__(
        self,
        *args: str,
        workers: int = 2,
        env: dict[str, str] | None = None,
        port: int | None = None,
        wait: bool = True,
    ) -> None:
        self.port = port or pick_free_port()
        self.admin_port = pick_free_port(udp=False)
        self.cmd = [
            str(BIN),
            "run",
            "--listen-port",
            str(self.port),
            "--admin-port",
            str(self.admin_port),
            "--workers",
            str(workers),
            *args,
        ]
        self._out: list[str] = []
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=clean_env(env),
            text=True,
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()
        if wait:
            self.wait_ready()

    def _read_output(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._out.append(line)

    def output(self) -> str:
        return "".join(self._out)

    def get(self, path: str) -> tuple[int, str]:
        """GET an admin route: (HTTP status, body)."""
        return http_get(self.admin_port, path)

    def healthz(self) -> dict[str, Any]:
        status, body = self.get("/healthz")
        data: dict[str, Any] = json.loads(body)
        data["http_status"] = status
        return data

    def metrics(self) -> dict[str, float]:
        _, body = self.get("/metrics")
        out = {}
        for line in body.splitlines():
            m = _METRIC.match(line)
            if m:
                out[m.group(1).removeprefix("statsd_filter_")] = float(m.group(2))
        return out

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.healthz()["workers"] if w["pid"]]

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError, ValueError):
                health = self.healthz()
                return all(w["state"] == "running" for w in health["workers"])
            return False

        if not wait_until(ready, timeout):
            raise RuntimeError(f"proxy not ready after {timeout}s:\n{self.output()}")

    def wait_metric(
        self, name: str, predicate: Callable[[float], bool], timeout: float = 10.0
    ) -> dict[str, float]:
        """Poll /metrics until ``predicate(metrics[name])``; returns the last metrics."""
        result: dict[str, float] = {}

        def check() -> bool:
            nonlocal result
            result = self.metrics()
            return predicate(result.get(name, 0.0))

        wait_until(check, timeout)
        return result

    def wait_settled(self, timeout: float = 10.0) -> dict[str, float]:
        """Wait until received == forwarded + blocked + aggregated + dropped and nothing moves any
        more (datagrams may wait up to --max-read-delay before they are read);
        returns the metrics."""
        result: dict[str, float] = {}
        last = [-1.0]

        def balanced() -> bool:
            nonlocal result
            result = self.metrics()
            received = result.get("lines_received_total", -1)
            steady = received == last[0]
            last[0] = received
            return steady and received == accounted(result)

        wait_until(balanced, timeout, interval=0.1)
        return result

    def udp(self, payload: bytes, host: str = LOCALHOST) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.sendto(payload, (host, self.port))

    @contextlib.contextmanager
    def tcp(self, host: str = LOCALHOST) -> Iterator[socket.socket]:
        with socket.create_connection((host, self.port), timeout=5) as sock:
            yield sock

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._reader.join(2)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.stop()


def http_get(port: int, path: str) -> tuple[int, str]:
    """GET ``path`` from an admin endpoint on 127.0.0.1: (HTTP status, body)."""
    url = f"http://{LOCALHOST}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


@contextlib.contextmanager
def stopped(pids: list[int]) -> Iterator[None]:
    """Keep processes stopped (SIGSTOP) inside the block; continue them on the way out."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def accounted(metrics: dict[str, float]) -> float:
    """forwarded + blocked + aggregated + every dropped reason."""
    dropped = sum(v for k, v in metrics.items() if k.startswith("lines_dropped_total"))
    return (
        metrics.get("lines_forwarded_total", 0)
        + metrics.get("lines_blocked_total", 0)
        + metrics.get("lines_aggregated_total", 0)
        + dropped
    )


def final_counts(output: str) -> dict[str, int]:
    """The supervisor's last log line: ``stopped: received=N forwarded=N ...``."""
    match = re.search(r"stopped: (.*)$", output, re.MULTILINE)
    assert match, output
    return {k: int(v) for k, v in (kv.split("=") for kv in match.group(1).split())}
