"""Forwarding through the real proxy: what passes, byte for byte, and what is dropped."""

from __future__ import annotations

import socket
import time

import pytest

from tests.integration.harness import Proxy, Sink, wait_until


def test_udp_multiline_datagrams_filtered_per_line(sink: Sink) -> None:
    """Each line of a datagram is judged alone; allowed lines arrive byte-identical."""
    with Proxy("--target-port", str(sink.port), "--blocklist", "debug.,test.") as proxy:
        proxy.udp(b"app.a:1|c\ndebug.x:1|c\napp.b:2|g|#env:prod")
        proxy.udp(b"test.only:1|c")
        proxy.udp(b"app.c:3|ms|@0.5\n")
        proxy.udp(b"debug.first:1|c\napp.d:4|h")
        lines = sink.wait_for_lines(4)
        m = proxy.wait_settled()
    assert sorted(lines) == sorted(
        [b"app.a:1|c", b"app.b:2|g|#env:prod", b"app.c:3|ms|@0.5", b"app.d:4|h"]
    )
    assert m["lines_received_total"] == 7
    assert m["lines_blocked_total"] == 3
    assert m["lines_forwarded_total"] == 4


def test_prefix_only_matches_line_start(sink: Sink) -> None:
    """A blocked prefix in the middle of a line (or of a datagram) does not block it."""
    with Proxy("--target-port", str(sink.port), "--blocklist", "debug.") as proxy:
        proxy.udp(b"app.debug.x:1|c\nxdebug.y:1|c|#tag:debug.z")
        lines = sink.wait_for_lines(2)
    assert sorted(lines) == [b"app.debug.x:1|c", b"xdebug.y:1|c|#tag:debug.z"]


def test_non_utf8_crlf_and_empty_lines(sink: Sink) -> None:
    """Non-UTF-8 bytes pass untouched; \\r\\n endings are accepted; empty lines are skipped."""
    with Proxy("--target-port", str(sink.port)) as proxy:
        proxy.udp(b"caf\xe9.latin1:1|c\r\n\r\n\nbin\xff\xfe:2|g\r\n")
        lines = sink.wait_for_lines(2)
        m = proxy.wait_settled()
    assert sorted(lines) == [b"bin\xff\xfe:2|g", b"caf\xe9.latin1:1|c"]
    assert m["lines_received_total"] == 2


def test_tcp_partial_lines_across_writes(sink: Sink) -> None:
    """A TCP line split over many writes is reassembled; clients never mix."""
    with Proxy("--target-port", str(sink.port), "--blocklist", "debug.") as proxy:
        with proxy.tcp() as a, proxy.tcp() as b:
            a.sendall(b"alpha.one:1|c\nalpha.tw")
            b.sendall(b"beta.one:1")
            time.sleep(0.05)
            b.sendall(b"|c\ndebug.b:1|c\nbeta.t")
            a.sendall(b"o:2|c\nal")
            time.sleep(0.05)
            a.sendall(b"pha.three:3|c\n")
            b.sendall(b"wo:2|c\n")
            lines = sink.wait_for_lines(5)
        m = proxy.wait_settled()
    assert sorted(lines) == sorted(
        [b"alpha.one:1|c", b"alpha.two:2|c", b"alpha.three:3|c", b"beta.one:1|c", b"beta.two:2|c"]
    )
    assert m["lines_blocked_total"] == 1
    assert m["tcp_connections_accepted_total"] == 2


def test_tcp_eof_completes_last_line(sink: Sink) -> None:
    """A client that closes after a final line without newline still has it forwarded."""
    with Proxy("--target-port", str(sink.port)) as proxy:
        with proxy.tcp() as conn:
            conn.sendall(b"first:1|c\nlast:2|c")
        lines = sink.wait_for_lines(2)
    assert sorted(lines) == [b"first:1|c", b"last:2|c"]


def test_tcp_upstream(tcp_sink: Sink) -> None:
    """With --target-protocol tcp, lines from UDP and TCP clients stream to a TCP upstream."""
    args = ("--target-port", str(tcp_sink.port), "--target-protocol", "tcp", "--blocklist", "x.")
    with Proxy(*args) as proxy:
        proxy.udp(b"u.one:1|c\nx.no:1|c\nu.two:2|c")
        with proxy.tcp() as conn:
            conn.sendall(b"t.one:1|c\nx.nope:1|c\nt.two:2|c\n")
        lines = tcp_sink.wait_for_lines(4)
        m = proxy.wait_settled()
        assert proxy.healthz()["upstream"]["state"] == "up"
    assert sorted(lines) == [b"t.one:1|c", b"t.two:2|c", b"u.one:1|c", b"u.two:2|c"]
    assert m["lines_blocked_total"] == 2


def test_batching_respects_max_udp_size(sink: Sink) -> None:
    """Many small datagrams are packed into upstream datagrams no larger than --max-udp-size."""
    n = 400
    with Proxy("--target-port", str(sink.port), "--max-udp-size", "512", workers=1) as proxy:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for i in range(n):
                sock.sendto(b"batch.metric.%04d:1|c" % i, ("127.0.0.1", proxy.port))
        lines = sink.wait_for_lines(n)
        m = proxy.wait_settled()
    assert sorted(lines) == sorted(b"batch.metric.%04d:1|c" % i for i in range(n))
    assert all(len(d) <= 512 for d in sink.datagrams)
    assert m["datagrams_sent_total"] < n  # packed, not one out per one in
    assert m["lines_forwarded_total"] == n


def test_line_longer_than_max_udp_size_goes_out_alone(sink: Sink) -> None:
    """A line bigger than --max-udp-size is sent whole in its own datagram, never split."""
    long_line = b"long.metric:1|c|#" + b"k" * 900
    with Proxy("--target-port", str(sink.port), "--max-udp-size", "256", workers=1) as proxy:
        proxy.udp(b"short:1|c\n" + long_line + b"\nshort2:1|c")
        lines = sink.wait_for_lines(3)
    assert sorted(lines) == sorted([b"short:1|c", long_line, b"short2:1|c"])
    assert long_line in sink.datagrams


def test_ipv6_listener_and_upstream() -> None:
    """The proxy listens on ::1 and forwards to an IPv6 upstream."""
    if not socket.has_ipv6:
        pytest.fail("IPv6 support is required on loopback")
    with Sink("udp", host="::1") as sink6:
        args = ("--listen-host", "::1", "--target-host", "::1", "--target-port", str(sink6.port))
        with Proxy(*args) as proxy:
            proxy.udp(b"v6.metric:1|c", host="::1")
            with proxy.tcp(host="::1") as conn:
                conn.sendall(b"v6.tcp:1|c\n")
            lines = sink6.wait_for_lines(2)
    assert sorted(lines) == [b"v6.metric:1|c", b"v6.tcp:1|c"]


def test_listens_on_every_address_of_listen_host(sink: Sink) -> None:
    """listen_host with two addresses: UDP and TCP clients of either reach the upstream."""
    with Proxy("--listen-host", "127.0.0.1,::1", "--target-port", str(sink.port)) as proxy:
        for host in ("127.0.0.1", "::1"):
            proxy.udp(b"udp.via.%s:1|c" % host.encode(), host=host)
            with proxy.tcp(host=host) as conn:
                conn.sendall(b"tcp.via.%s:1|c\n" % host.encode())
        lines = sink.wait_for_lines(4)
        health = proxy.healthz()
    assert sorted(lines) == sorted(
        b"%s.via.%s:1|c" % (kind, host)
        for kind in (b"udp", b"tcp")
        for host in (b"127.0.0.1", b"::1")
    )
    assert health["listen"]["host"] == "127.0.0.1,::1"


def test_counts_add_up_and_debug_log_names_worker(sink: Sink) -> None:
    """received = forwarded + blocked + dropped; debug logs say what each worker did."""
    with Proxy(
        "--target-port", str(sink.port), "--blocklist", "no.", "--log-level", "debug"
    ) as proxy:
        for i in range(50):
            proxy.udp(b"yes.%d:1|c\nno.%d:1|c" % (i, i))
        sink.wait_for_lines(50)
        m = proxy.wait_settled()
        assert wait_until(lambda: "blocked 'no.49:1|c'" in proxy.output())
    assert m["lines_received_total"] == 100
    assert m["lines_forwarded_total"] == 50
    assert m["lines_blocked_total"] == 50
    out = proxy.output()
    assert "DEBUG worker " in out
    assert "forwarded 'yes.0:1|c'" in out


def test_thousand_concurrent_tcp_clients(tcp_sink: Sink) -> None:
    """1,000 clients connected at once, each sending lines, all served; spread over workers."""
    args = ("--target-port", str(tcp_sink.port), "--target-protocol", "tcp")
    with Proxy(*args) as proxy:
        clients = []
        try:
            for i in range(1000):
                conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
                conn.sendall(b"conn.%d:1|c\n" % i)
                clients.append(conn)
            m = proxy.wait_metric("tcp_connections_open", lambda v: v == 1000)
            for i, conn in enumerate(clients):
                conn.sendall(b"again.%d:1|c\n" % i)
            lines = tcp_sink.wait_for_lines(2000)
            per_worker = [w["tcp_connections"] for w in proxy.healthz()["workers"]]
        finally:
            for conn in clients:
                conn.close()
    assert sorted(lines) == sorted(
        [b"conn.%d:1|c" % i for i in range(1000)] + [b"again.%d:1|c" % i for i in range(1000)]
    )
    assert m["tcp_connections_accepted_total"] == 1000
    assert min(per_worker) > 0  # SO_REUSEPORT spread them
