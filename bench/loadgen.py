"""Load generator: several forked processes sending pre-built datagrams over UDP or TCP.

The parent builds every datagram once (see :mod:`workload`), opens the source
sockets (connected UDP sockets, or TCP connections), then forks the senders,
which inherit both. Sender ``i`` owns a contiguous slice of the datagrams, so
sequence numbers stay unique, and the sockets ``j`` with ``j % processes == i``
(with fewer UDP sockets than processes, the processes share them: one source
address then floods from several cores). All senders wait on one event, so the
parent knows the instant the load starts.

Two pacing modes, both bounded by a count (the datagrams) and a deadline:

* as fast as possible: a tight loop of ``send`` calls, round-robin over the sockets;
* a fixed rate: bursts of at most :data:`MAX_BURST` datagrams, then a sleep until
  the next one is due, so the offered rate is smooth at the scale of a millisecond.

Over TCP each datagram is sent as newline-terminated lines with a blocking
``sendall`` (the proxy's pace pushes back through TCP flow control; nothing is lost).
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import multiprocessing.synchronize
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from workload import DEFAULT_BLOCKLIST, Traffic, build_datagrams, stamp_datagram

__all__ = ["LoadGenerator", "LoadResult", "LoadSpec"]

# Datagrams sent between two deadline checks in the fast loop.
CHUNK = 4096
# Largest burst in paced mode: a sender that fell behind catches up in bursts this big.
MAX_BURST = 64
# How long the senders may take to start before the run is abandoned.
START_TIMEOUT = 30.0
# Extra time the parent waits past a sender's own deadline before killing it.
JOIN_GRACE = 10.0
NL = b"\n"


@dataclass(frozen=True)
class LoadSpec:
    """What to send, where, and how fast."""

    protocol: str  # "udp" or "tcp"
    port: int
    processes: int = 2
    sources: int = 8  # UDP source sockets, or TCP client connections
    rate: float = 0.0  # lines per second over all processes; 0 means as fast as possible
    stamp_every: int = 0  # timestamp every n-th datagram's first line; 0 means never
    max_seconds: float = 60.0
    host: str = "127.0.0.1"


@dataclass
class LoadResult:
    """What the senders did."""

    lines: int = 0
    passing: int = 0  # lines the blocklist lets through
    datagrams: int = 0
    started_ns: int = 0  # when the go signal was given
    finished_ns: int = 0  # when the last sender finished
    errors: int = 0
    error_text: list[str] = field(default_factory=list)
    timed_out: bool = False

    @property
    def seconds(self) -> float:
        return max(1e-9, (self.finished_ns - self.started_ns) / 1e9)


def _open_sources(spec: LoadSpec) -> list[socket.socket]:
    socks = []
    for _ in range(spec.sources):
        if spec.protocol == "udp":
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.connect((spec.host, spec.port))
        else:
            sock = socket.create_connection((spec.host, spec.port), timeout=5.0)
            sock.settimeout(None)
        socks.append(sock)
    return socks


def _send_fast(
    sends: Sequence[Callable[[bytes], object]],
    datagrams: Sequence[bytes],
    lo: int,
    hi: int,
    suffix: bytes,
    deadline_ns: int,
) -> tuple[int, int, str]:
    cycle = itertools.cycle(sends)
    pos = lo
    errors = 0
    last_error = ""
    while pos < hi and time.monotonic_ns() < deadline_ns:
        stop = min(hi, pos + CHUNK)
        if suffix:
            for dg, send in zip(datagrams[pos:stop], cycle, strict=False):
                try:
                    send(dg + suffix)
                except OSError as exc:
                    errors += 1
                    last_error = repr(exc)
        else:
            for dg, send in zip(datagrams[pos:stop], cycle, strict=False):
                try:
                    send(dg)
                except OSError as exc:
                    errors += 1
                    last_error = repr(exc)
        pos = stop
    return pos - lo, errors, last_error


def _send_paced(
    sends: Sequence[Callable[[bytes], object]],
    datagrams: Sequence[bytes],
    lo: int,
    hi: int,
    suffix: bytes,
    deadline_ns: int,
    per_second: float,
    stamp_every: int,
) -> tuple[int, int, str]:
    n_socks = len(sends)
    start = time.monotonic_ns()
    pos = lo
    errors = 0
    last_error = ""
    while pos < hi:
        now = time.monotonic_ns()
        if now >= deadline_ns:
            break
        due = min(hi, lo + int((now - start) / 1e9 * per_second) + 1, pos + MAX_BURST)
        while pos < due:
            dg = datagrams[pos]
            if stamp_every and pos % stamp_every == 0:
                dg = stamp_datagram(dg, time.monotonic_ns())
            try:
                sends[pos % n_socks](dg + suffix)
            except OSError as exc:
                errors += 1
                last_error = repr(exc)
            pos += 1
        delay = (pos - lo) / per_second - (time.monotonic_ns() - start) / 1e9
        if delay > 0:
            time.sleep(delay)
    return pos - lo, errors, last_error


def _sender(
    index: int,
    spec: LoadSpec,
    datagrams: Sequence[bytes],
    lo: int,
    hi: int,
    per_second: float,
    socks: list[socket.socket],
    ready: multiprocessing.synchronize.Barrier,
    go: multiprocessing.synchronize.Event,
    results: mp.SimpleQueue[tuple[int, int, int, int, int, str]],
) -> None:
    sent = errors = 0
    last_error = ""
    started = finished = 0
    try:
        ready.wait(START_TIMEOUT)
        if not go.wait(START_TIMEOUT):
            raise TimeoutError("no go signal")  # noqa: TRY301 - reported like any failure below
        started = time.monotonic_ns()
        deadline = started + int(spec.max_seconds * 1e9)
        tcp = spec.protocol == "tcp"
        sends = [s.sendall if tcp else s.send for s in socks]
        suffix = NL if tcp else b""
        if per_second > 0:
            sent, errors, last_error = _send_paced(
                sends, datagrams, lo, hi, suffix, deadline, per_second, spec.stamp_every
            )
        else:
            sent, errors, last_error = _send_fast(sends, datagrams, lo, hi, suffix, deadline)
        finished = time.monotonic_ns()
        if tcp:
            for sock in socks:
                sock.shutdown(socket.SHUT_WR)
    except Exception as exc:
        errors += 1
        last_error = repr(exc)
        finished = finished or time.monotonic_ns()
    finally:
        for sock in socks:
            sock.close()
        results.put((index, sent, started, finished, errors, last_error))


class LoadGenerator:
    """Forks the senders, starts them together, collects what they did."""

    def __init__(
        self,
        spec: LoadSpec,
        traffic: Traffic,
        datagrams: Sequence[bytes],
        lines_per_datagram: int,
        total_lines: int,
    ) -> None:
        self.spec = spec
        self.traffic = traffic
        self.datagrams = datagrams
        self.lpd = lines_per_datagram
        self.total_lines = total_lines
        ctx = mp.get_context("fork")
        self._ctx = ctx
        processes = spec.processes
        if spec.protocol == "tcp":
            # Two processes writing one TCP stream could interleave partial writes.
            processes = min(processes, spec.sources)
        self.processes = processes
        self._results: mp.SimpleQueue[tuple[int, int, int, int, int, str]] = ctx.SimpleQueue()
        self._ready = ctx.Barrier(processes + 1)
        self._go = ctx.Event()
        self._procs: list[mp.process.BaseProcess] = []
        n = len(datagrams)
        self._ranges = [(n * i // processes, n * (i + 1) // processes) for i in range(processes)]
        self.started_ns = 0

    def prepare(self) -> None:
        """Open the sockets and fork the senders; they wait for :meth:`go`."""
        socks = _open_sources(self.spec)
        try:
            for i, (lo, hi) in enumerate(self._ranges):
                mine = [s for j, s in enumerate(socks) if j % self.processes == i]
                if not mine:
                    mine = [socks[i % len(socks)]]
                # This sender's share of the rate, in datagrams per second.
                per_second = self.spec.rate / self.lpd * (hi - lo) / max(1, len(self.datagrams))
                proc = self._ctx.Process(
                    target=_sender,
                    args=(
                        i,
                        self.spec,
                        self.datagrams,
                        lo,
                        hi,
                        per_second,
                        mine,
                        self._ready,
                        self._go,
                        self._results,
                    ),
                    name=f"loadgen-{i}",
                    daemon=True,
                )
                proc.start()
                self._procs.append(proc)
        finally:
            # The children hold their own copies; ours must go so TCP peers see EOF.
            for sock in socks:
                sock.close()
        self._ready.wait(START_TIMEOUT)

    def go(self) -> int:
        """Release the senders; returns the start time (``time.monotonic_ns``)."""
        self.started_ns = time.monotonic_ns()
        self._go.set()
        return self.started_ns

    def wait(self) -> LoadResult:
        """Wait for every sender (bounded) and sum up what they sent."""
        result = LoadResult(started_ns=self.started_ns)
        deadline = time.monotonic() + self.spec.max_seconds + JOIN_GRACE
        got: dict[int, tuple[int, int, int, int, int, str]] = {}
        while len(got) < len(self._procs) and time.monotonic() < deadline:
            if self._results.empty():
                if not any(p.is_alive() for p in self._procs) and self._results.empty():
                    break
                time.sleep(0.01)
                continue
            item = self._results.get()
            got[item[0]] = item
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                result.timed_out = True
                proc.kill()
                proc.join(timeout=5)
        for index, (lo, _hi) in enumerate(self._ranges):
            if index not in got:
                result.errors += 1
                result.error_text.append(f"sender {index} reported nothing")
                continue
            _, sent, _started, finished, errors, last_error = got[index]
            first_seq = lo * self.lpd
            end_seq = min((lo + sent) * self.lpd, self.total_lines)
            result.datagrams += sent
            result.lines += end_seq - first_seq
            result.passing += self.traffic.passing_between(first_seq, end_seq)
            result.finished_ns = max(result.finished_ns, finished)
            result.errors += errors
            if last_error:
                result.error_text.append(f"sender {index}: {last_error}")
        if not result.finished_ns:
            result.finished_ns = time.monotonic_ns()
        return result


def main(argv: Sequence[str] | None = None) -> int:
    """Send the benchmark's traffic to a proxy or sink already listening on loopback."""
    p = argparse.ArgumentParser(description=main.__doc__, allow_abbrev=False)
    p.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    p.add_argument("--input", choices=("udp", "tcp"), default="udp")
    p.add_argument("--total-lines", type=int, default=200_000)
    p.add_argument("--lines-per-datagram", type=int, default=4)
    p.add_argument("--blocked-share", type=float, default=0.2)
    p.add_argument("--sources", type=int, help="UDP sockets (default 8) or TCP clients (64)")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--rate", type=float, default=0.0, help="lines/s; 0 = as fast as possible")
    p.add_argument("--stamp-every", type=int, default=0, help="timestamp every n-th datagram")
    p.add_argument("--max-seconds", type=float, default=60.0)
    args = p.parse_args(argv)
    traffic = Traffic.build(args.blocked_share, DEFAULT_BLOCKLIST)
    datagrams = build_datagrams(traffic, args.total_lines, args.lines_per_datagram)
    sources = args.sources or (64 if args.input == "tcp" else 8)
    spec = LoadSpec(
        args.input,
        args.port,
        processes=args.procs,
        sources=sources,
        rate=args.rate,
        stamp_every=args.stamp_every,
        max_seconds=args.max_seconds,
    )
    gen = LoadGenerator(spec, traffic, datagrams, args.lines_per_datagram, args.total_lines)
    gen.prepare()
    gen.go()
    result = gen.wait()
    print(
        f"sent {result.lines} lines ({result.passing} should pass) in {result.datagrams} "
        f"sends over {result.seconds:.3f}s = {result.lines / result.seconds:,.0f} lines/s; "
        f"errors {result.errors} {result.error_text}"
    )
    return 1 if result.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
