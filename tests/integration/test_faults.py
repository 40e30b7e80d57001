"""Faults: a down upstream, dying workers, shutdown under load, hostile clients."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import threading
import time
from contextlib import closing

import statsd

from tests.integration.etsy import EtsyStatsd, pick_free_port
from tests.integration.harness import LOCALHOST, Proxy, Sink, final_counts, wait_until


def test_udp_upstream_down_at_start_then_started() -> None:
    """Refusals from a missing UDP upstream are counted; forwarding resumes once it starts."""
    etsy = EtsyStatsd("udp")  # ports chosen, daemon not started yet
    try:
        with (
            Proxy("--target-port", str(etsy.port)) as proxy,
            closing(statsd.StatsClient(LOCALHOST, proxy.port)) as client,
        ):
            for _ in range(50):
                client.incr("lost.while.down")
                time.sleep(0.002)
            m = proxy.wait_metric("upstream_errors_total", lambda v: v > 0)
            assert m["upstream_errors_total"] > 0
            assert proxy.healthz()["upstream"]["state"] == "refused"
            etsy.start()
            for _ in range(100):
                client.incr("after.start")
            counters = etsy.wait_for_counter("after.start", 100)
        assert counters["after.start"] == 100
    finally:
        etsy.close()


def test_tcp_upstream_down_at_start_buffers_then_delivers() -> None:
    """A TCP upstream that is down at start gets every buffered line once it comes up."""
    port = pick_free_port()
    with Proxy("--target-port", str(port), "--target-protocol", "tcp") as proxy:
        for i in range(100):
            proxy.udp(b"buffered.%d:1|c" % i)
        assert wait_until(lambda: proxy.healthz()["upstream"]["state"] == "down")
        proxy.wait_metric("upstream_buffered_bytes", lambda v: v > 0)
        with Sink("tcp", port=port) as late_sink:
            lines = late_sink.wait_for_lines(100, timeout=15)
            m = proxy.wait_settled()
            # Health is re-checked every --health-interval (1 s).
            assert wait_until(lambda: proxy.healthz()["upstream"]["state"] == "up")
    assert sorted(lines) == sorted(b"buffered.%d:1|c" % i for i in range(100))
    assert m["lines_forwarded_total"] == 100


def test_tcp_upstream_restarts_mid_run() -> None:
    """When a TCP upstream goes away and returns, the proxy reconnects and delivers again."""
    with EtsyStatsd("tcp") as etsy:
        args = ("--target-port", str(etsy.port), "--target-protocol", "tcp")
        with Proxy(*args) as proxy, closing(statsd.StatsClient(LOCALHOST, proxy.port)) as client:
            for _ in range(100):
                client.incr("before")
            assert etsy.wait_for_counter("before", 100)["before"] == 100
            etsy.stop()
            for _ in range(20):
                client.incr("during")
                time.sleep(0.01)
            assert wait_until(lambda: proxy.healthz()["upstream"]["state"] != "up")
            etsy.start()
            assert wait_until(lambda: proxy.healthz()["upstream"]["state"] == "up", timeout=15)
            for _ in range(100):
                client.incr("after")
            counters = etsy.wait_for_counter("after", 100)
            m = proxy.metrics()
    assert counters["after"] == 100
    assert m["upstream_connects_total"] >= 2 * 2  # two workers, each connected twice


def test_worker_sigkill_is_restarted_and_traffic_flows(sink: Sink) -> None:
    """A worker killed with SIGKILL is forked again at once; lines keep flowing."""
    with Proxy("--target-port", str(sink.port)) as proxy:
        before = proxy.worker_pids()
        assert len(before) == 2
        os.kill(before[0], signal.SIGKILL)
        assert wait_until(
            lambda: (
                len(set(proxy.worker_pids()) - set(before)) == 1
                and all(w["state"] == "running" for w in proxy.healthz()["workers"])
            ),
            timeout=5,
        )
        for i in range(200):
            proxy.udp(b"after.kill.%d:1|c" % i)
        lines = sink.wait_for_lines(200)
        m = proxy.metrics()
    assert len(lines) == 200
    assert m["worker_restarts_total"] == 1
    # Restarted immediately, not after a crash-loop backoff.
    assert re.search(
        r"worker 0 \(pid \d+\) died \(killed by signal 9\); restarting in 0\.0s", proxy.output()
    )


def _tcp_client(port: int, name: bytes, stop: threading.Event, sent: list[int]) -> None:
    try:
        with socket.create_connection((LOCALHOST, port), timeout=5) as sock:
            for i in range(200_000):
                if stop.is_set():
                    break
                sock.sendall(b"%s.%d:1|c\nblocked.%s:1|c\n" % (name, i, name))
                sent[0] = i + 1
    except OSError:
        pass  # the proxy closed us while shutting down


def test_sigterm_under_tcp_load_loses_nothing(tcp_sink: Sink) -> None:
    """SIGTERM while TCP clients stream: exit 0, every line the proxy read reaches the upstream."""
    # A TCP upstream: a UDP sink in this test process could itself drop datagrams.
    sink = tcp_sink
    args = ("--target-port", str(sink.port), "--target-protocol", "tcp")
    proxy = Proxy(*args, "--blocklist", "blocked.")
    stop = threading.Event()
    sent = [[0] for _ in range(8)]
    clients = [
        threading.Thread(target=_tcp_client, args=(proxy.port, b"c%d" % n, stop, sent[n]))
        for n in range(8)
    ]
    for client in clients:
        client.start()
    assert wait_until(lambda: len(sink.lines()) > 5000, timeout=15)
    status = proxy.stop(signal.SIGTERM)
    stop.set()
    for client in clients:
        client.join(10)
    lines = sink.settle()
    counts = final_counts(proxy.output())
    assert status == 0, proxy.output()
    assert counts["dropped"] == 0
    assert counts["received"] == counts["forwarded"] + counts["blocked"]
    assert len(lines) == counts["forwarded"]
    assert all(re.fullmatch(rb"c\d\.\d+:1\|c", line) for line in lines)
    assert len(set(lines)) == len(lines)  # nothing duplicated


def test_oversize_garbage_and_idle_clients_do_not_disturb_others(sink: Sink) -> None:
    """A 100 KB line, random garbage and an idle client are counted; a good client is unaffected."""
    args = ("--target-port", str(sink.port), "--tcp-idle-timeout", "1", "--blocklist", "zz.")
    with Proxy(*args, workers=1) as proxy:
        rng = random.Random(7)
        with proxy.tcp() as idle, proxy.tcp() as huge, proxy.tcp() as junk, proxy.tcp() as good:
            huge.sendall(b"x" * 100_000)  # no newline: must not be buffered without bound
            junk.sendall(
                bytes(rng.randrange(256) for _ in range(20_000)).replace(b"\n", b"") + b"\n"
            )
            proxy.udp(b"u" * 9000 + b":1|c")  # one oversize line in a datagram
            for i in range(100):
                good.sendall(b"good.%d:1|c\n" % i)
            huge.sendall(b"tail-of-huge\nhuge.after:1|c\n")  # resynchronised at the newline
            lines = sink.wait_for_lines(101)
            idle.settimeout(5)
            assert idle.recv(1) == b""  # closed by the proxy for idleness
        m = proxy.wait_settled()
    assert [line for line in lines if line.startswith(b"good.")] == [
        b"good.%d:1|c" % i for i in range(100)
    ]
    assert b"huge.after:1|c" in lines
    assert not any(b"x" * 100 in line or b"u" * 100 in line for line in lines)
    assert (
        m['lines_dropped_total{reason="oversize"}'] == 3
    )  # 100 KB line, 20 KB junk, 9 KB datagram
    assert m["tcp_idle_closed_total"] >= 1
    assert m["lines_received_total"] == m["lines_forwarded_total"] + m["lines_blocked_total"] + 3


def test_max_connections_per_worker(sink: Sink) -> None:
    """Connections beyond --max-connections are closed at once and counted."""
    with Proxy("--target-port", str(sink.port), "--max-connections", "3", workers=1) as proxy:
        conns = [socket.create_connection((LOCALHOST, proxy.port), timeout=5) for _ in range(5)]
        try:
            m = proxy.wait_metric("tcp_connections_rejected_total", lambda v: v == 2)
            assert m["tcp_connections_open"] == 3
            closed = 0
            for conn in conns:
                conn.settimeout(0.5)
                try:
                    closed += conn.recv(1) == b""
                except TimeoutError:
                    pass
            assert closed == 2
        finally:
            for conn in conns:
                conn.close()


def test_udp_datagram_larger_than_max_line_is_counted(sink: Sink) -> None:
    """Lines over --max-line-bytes are dropped and counted; the rest of the datagram passes."""
    with Proxy("--target-port", str(sink.port), "--max-line-bytes", "64") as proxy:
        proxy.udp(b"ok.one:1|c\n" + b"l" * 100 + b":1|c\nok.two:1|c")
        lines = sink.wait_for_lines(2)
        m = proxy.wait_settled()
    assert sorted(lines) == [b"ok.one:1|c", b"ok.two:1|c"]
    assert m['lines_dropped_total{reason="oversize"}'] == 1


def test_tcp_upstream_buffer_is_bounded_and_drops_oldest() -> None:
    """While a TCP upstream is away its buffer stays bounded: oldest lines go, newest arrive."""
    port = pick_free_port()
    args = (
        "--target-port",
        str(port),
        "--target-protocol",
        "tcp",
        "--upstream-buffer-bytes",
        "4096",
    )
    with Proxy(*args, workers=1) as proxy:
        for i in range(2000):
            proxy.udp(b"buffered.metric.%05d:1|c" % i)
        m = proxy.wait_metric('lines_dropped_total{reason="queue_full"}', lambda v: v > 0)
        assert m["buffered_bytes"] <= 4096 + 65536  # bound + one batch
        with Sink("tcp", port=port) as late_sink:
            lines = late_sink.settle(quiet=0.5)
            m = proxy.wait_settled()
    dropped = m['lines_dropped_total{reason="queue_full"}']
    assert len(lines) + dropped == 2000
    assert lines == sorted(lines)  # in order
    assert lines[-1] == b"buffered.metric.01999:1|c"  # the newest survived


def test_trickling_client_does_not_stall_others(sink: Sink) -> None:
    """A client sending one byte at a time delays nobody; its line arrives whole."""
    line = b"slow.metric.name:12345|ms|#env:prod\n"
    half = len(line) // 2
    with (
        Proxy("--target-port", str(sink.port), workers=1) as proxy,
        proxy.tcp() as slow,
        proxy.tcp() as fast,
    ):
        for i in range(half):
            slow.sendall(line[i : i + 1])
            fast.sendall(b"fast.%d:1|c\n" % i)  # served while the slow line is pending
        before = sink.wait_for_lines(half)
        for i in range(half, len(line)):
            slow.sendall(line[i : i + 1])
        after = sink.wait_for_lines(half + 1)
    assert before == [b"fast.%d:1|c" % i for i in range(half)]  # all in, slow one not yet
    assert after[-1] == b"slow.metric.name:12345|ms|#env:prod"
