"""Unix domain sockets in and out, through the real program (DogStatsD's Kubernetes path).

Real clients: datadogpy over ``socket_path`` (datagrams) and ``unixstream://`` (its
length-prefixed stream mode), hot-shots over ``protocol: 'uds'`` (datagrams, through the
native unix-dgram module) and over node's own ``net`` stream (newline-framed). Upstreams:
a Unix datagram or stream socket standing in for the agent, and Etsy statsd over UDP.
Socket files live in a short directory under /tmp (AF_UNIX paths hold 107 bytes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from datadog.dogstatsd.base import DogStatsd

from statsd_filter.upstream.hashring import HashRing
from tests.integration.etsy import NODE_DIR, EtsyStatsd
from tests.integration.harness import (
    LOCALHOST,
    Proxy,
    Sink,
    UnixSink,
    accounted,
    final_counts,
    stopped,
    wait_until,
)

UDS_CLIENT = NODE_DIR / "uds_client.js"
UNIX_DGRAM_BUILT = (NODE_DIR / "node_modules/unix-dgram/build/Release/unix_dgram.node").exists()
CID = "4f797c539e6c745de61a93ca3ff892358ecbcaccd8414d5db545c38428142970"


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for socket files (pytest's tmp_path can exceed sun_path's 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="sf-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _dogstatsd(path: str) -> DogStatsd:
    # A blocking socket (timeout 5 s): a momentarily full receive queue makes the
    # client wait instead of dropping, so counts are exact.
    return DogStatsd(socket_path=path, disable_telemetry=True, socket_timeout=5)


def _hot_shots(mode: str, path: Path, count: int) -> None:
    result = subprocess.run(
        ["node", str(UDS_CLIENT), mode, str(path), str(count)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def _books(proxy: Proxy) -> dict[str, float]:
    m = proxy.wait_settled()
    assert m["lines_received_total"] == accounted(m)
    return m


# ------------------------------------------------------------------ clients in


def test_datadog_datagrams_in_unix_datagrams_out(sockdir: Path) -> None:
    """datadogpy over socket_path -> proxy -> a Unix datagram sink: exact bytes, debug blocked."""
    with UnixSink(sockdir / "agent.sock") as agent:
        args = ("--unix-socket", str(sockdir / "in.sock"), "--target", f"unix://{agent.path}")
        with Proxy(*args, "--blocklist", "debug.") as proxy:
            dd = _dogstatsd(str(sockdir / "in.sock"))
            for i in range(100):
                dd.increment("dd.hits", tags=["env:k8s", f"n:{i % 3}"])
                dd.increment("debug.hits")
            dd.gauge("dd.level", 7.5)
            dd.histogram("dd.size", 42, tags=["a:b"])
            dd.event("Deployed", "v2", tags=["env:k8s"])
            dd.service_check("dd.check", DogStatsd.OK, tags=["db:x"])
            dd.close_socket()
            lines = agent.wait_for_lines(104)
            m = _books(proxy)
            health = proxy.healthz()
    expected = Counter(b"dd.hits:1|c|#env:k8s,n:%d" % (i % 3) for i in range(100))
    expected.update(
        [
            b"dd.level:7.5|g",
            b"dd.size:42|h|#a:b",
            b"_e{8,2}:Deployed|v2|#env:k8s",
            b"_sc|dd.check|0|#db:x",
        ]
    )
    assert Counter(lines) == expected
    assert m["lines_received_total"] == 204
    assert m["lines_blocked_total"] == 100
    assert m["lines_forwarded_total"] == 104
    # The Unix socket's traffic is in the totals and in its own series.
    assert m["unix_datagrams_received_total"] == m["datagrams_received_total"] >= 1
    assert m["unix_bytes_received_total"] == m["bytes_received_total"] > 0
    assert health["listen"]["unix_socket"] == str(sockdir / "in.sock")
    assert health["upstreams"][0]["address"] == f"unix://{agent.path}"
    assert health["upstreams"][0]["state"] == "up"


def test_datadog_stream_mode_to_etsy(sockdir: Path, etsy: EtsyStatsd) -> None:
    """datadogpy's unixstream:// (length-prefixed) -> proxy -> Etsy statsd over UDP: exact sums."""
    path = sockdir / "dsd.sock"
    args = ("--unix-stream-socket", str(path), "--target-port", str(etsy.port))
    with Proxy(*args, "--blocklist", "debug.") as proxy:
        dd = _dogstatsd(f"unixstream://{path}")
        for _ in range(300):
            dd.increment("stream.hits", tags=["env:k8s"])
            dd.increment("debug.noise")
        dd.gauge("stream.level", 3)
        dd.timing("stream.latency", 12)
        dd.close_socket()
        counters = etsy.wait_for_counter("stream.hits;env=k8s", 300)
        m = _books(proxy)
    assert counters["stream.hits;env=k8s"] == 300
    assert not [name for name in counters if name.startswith("debug.")]
    assert counters["statsd.bad_lines_seen"] == 0
    assert etsy.gauges()["stream.level"] == 3
    assert etsy.timers()["stream.latency"] == [12]
    assert m["unix_connections_accepted_total"] == 1
    assert m["lines_received_total"] == 602
    assert m["lines_forwarded_total"] == 302


@pytest.mark.skipif(
    not UNIX_DGRAM_BUILT, reason="unix-dgram (hot-shots' native uds module) was not built"
)
def test_hot_shots_uds_to_etsy(sockdir: Path, etsy: EtsyStatsd) -> None:
    """hot-shots protocol 'uds' -> proxy's Unix datagram socket -> Etsy statsd: exact sums."""
    path = sockdir / "dsd.sock"
    with Proxy(
        "--unix-socket", str(path), "--target-port", str(etsy.port), "--blocklist", "debug."
    ) as proxy:
        _hot_shots("dgram", path, 250)
        counters = etsy.wait_for_counter("hs.hits;env=test", 250)
        m = _books(proxy)
    assert counters["hs.hits;env=test"] == 250
    assert "debug.hs" not in counters
    assert etsy.gauges()["hs.level"] == 7
    assert etsy.timers()["hs.latency"] == [12]
    assert m["unix_datagrams_received_total"] == 502  # one metric per datagram
    assert m["lines_blocked_total"] == 250


def test_hot_shots_stream_newline_framing_to_unix_stream_upstream(sockdir: Path) -> None:
    """hot-shots over a node net stream (newline framing, Vector's mode) -> proxy -> a
    unix+stream:// upstream, which gets length-prefixed frames holding the exact lines."""
    path = sockdir / "vec.sock"
    with UnixSink(sockdir / "up.sock", "stream") as agent:
        args = ("--unix-stream-socket", str(path), "--unix-stream-framing", "newline")
        with Proxy(
            *args, "--target", f"unix+stream://{agent.path}", "--blocklist", "debug."
        ) as proxy:
            _hot_shots("stream", path, 200)
            lines = agent.wait_for_lines(202)
            m = _books(proxy)
    assert Counter(lines) == Counter(
        [b"hs.hits:1|c|#env:test"] * 200 + [b"hs.level:7|g", b"hs.latency:12|ms"]
    )
    assert m["lines_forwarded_total"] == 202
    sent_metric = 'upstream_lines_sent_total{upstream="unix+stream://' + str(agent.path) + '"}'
    assert m[sent_metric] == 202


def test_udp_in_unix_stream_out_frames_fit_the_agents_buffer(sockdir: Path) -> None:
    """Lines from UDP go to a unix+stream:// upstream in frames of at most
    unix_upstream_max_payload bytes (the agent drops a stream whose frame exceeds its buffer)."""
    with UnixSink(sockdir / "up.sock", "stream") as agent:
        args = ("--target", f"unix+stream://{agent.path}", "--unix-upstream-max-payload", "512")
        with Proxy(*args, workers=1) as proxy:
            sent = [b"big.%04d:1|c|#pad:%s" % (i, b"x" * 40) for i in range(400)]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                for i in range(0, 400, 20):
                    udp.sendto(b"\n".join(sent[i : i + 20]), (LOCALHOST, proxy.port))
            lines = agent.wait_for_lines(400)
            _books(proxy)
    assert Counter(lines) == Counter(sent)
    assert max(map(len, agent.datagrams)) <= 512
    assert len(agent.datagrams) >= 400 * len(sent[0]) // 512


# ------------------------------------------------------------------ limits


def test_oversize_length_prefix_closes_the_connection_and_is_counted(sockdir: Path) -> None:
    """A length above unix_socket_max_payload: frames before it pass, the connection is
    closed, and the payload counts as one oversize line and one rejected frame."""
    path = sockdir / "s.sock"
    with (
        Sink() as sink,
        Proxy("--unix-stream-socket", str(path), "--target-port", str(sink.port)) as proxy,
    ):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))
            good = b"ok.before:1|c\nok.also:2|g"
            client.sendall(
                struct.pack("<I", len(good)) + good + struct.pack("<I", 65537) + b"x" * 100
            )
            client.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                assert client.recv(1) == b""  # the proxy closed it
        lines = sink.wait_for_lines(2)
        m = proxy.wait_metric("unix_frames_rejected_total", lambda v: v == 1)
        m = _books(proxy)
    assert sorted(lines) == [b"ok.also:2|g", b"ok.before:1|c"]
    assert m["unix_frames_rejected_total"] == 1
    assert m['lines_dropped_total{reason="oversize"}'] == 1
    assert m["lines_received_total"] == 3
    assert (
        "frame length 65537 exceeds the limit of 65536 bytes; connection closed" in proxy.output()
    )


def test_datagrams_up_to_the_payload_limit_pass_and_longer_ones_are_counted(sockdir: Path) -> None:
    """A 60,000-byte datagram (beyond any UDP client's) passes whole; one over
    --unix-socket-max-payload is dropped whole and counted, never forwarded cut."""
    path = sockdir / "d.sock"
    big = b"\n".join(b"big.%05d:1|c" % i for i in range(5000))  # 60,000 bytes
    assert len(big) > 59_000
    args = ("--unix-socket", str(path), "--unix-socket-max-payload", str(len(big)))
    with (
        Sink("tcp") as sink,
        Proxy(*args, "--target-port", str(sink.port), "--target-protocol", "tcp") as proxy,
    ):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            client.connect(str(path))
            client.send(big)
            client.send(big + b"\nx:1|c")  # 6 bytes over the limit
            client.send(b"after:1|c")
        lines = sink.wait_for_lines(5001)
        m = _books(proxy)
    assert Counter(lines) == Counter([*big.split(b"\n"), b"after:1|c"])
    assert m["unix_frames_rejected_total"] == 1
    assert m['lines_dropped_total{reason="oversize"}'] == 1
    assert m["lines_forwarded_total"] == 5001


def test_stream_clients_limits_and_idle_timeout(sockdir: Path) -> None:
    """max_connections and the idle timeout apply to Unix stream clients, with their counters."""
    path = sockdir / "s.sock"
    args = ("--unix-stream-socket", str(path), "--max-connections", "2", "--tcp-idle-timeout", "1")
    with Sink() as sink, Proxy(*args, "--target-port", str(sink.port), workers=1) as proxy:
        clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
        try:
            for client in clients:
                client.connect(str(path))
            m = proxy.wait_metric("unix_connections_rejected_total", lambda v: v == 1)
            assert m["unix_connections_open"] == 2
            assert sum(w["unix_connections"] for w in proxy.healthz()["workers"]) == 2
            m = proxy.wait_metric("unix_idle_closed_total", lambda v: v == 2)
            assert m["unix_connections_open"] == 0
        finally:
            for client in clients:
                client.close()


# ------------------------------------------------------------------ the socket file


@pytest.mark.parametrize(("flag", "mode"), [((), 0o722), (("--unix-socket-mode", "0660"), 0o660)])
def test_socket_files_have_the_configured_mode(
    sockdir: Path, flag: tuple[str, ...], mode: int
) -> None:
    """Both socket files carry unix_socket_mode (0722 by default, as the agent's); they are
    removed when the proxy stops."""
    d, s = sockdir / "d.sock", sockdir / "s.sock"
    with (
        Sink() as sink,
        Proxy(
            "--unix-socket",
            str(d),
            "--unix-stream-socket",
            str(s),
            *flag,
            "--target-port",
            str(sink.port),
        ) as proxy,
    ):
        for path in (d, s):
            info = path.lstat()
            assert stat.S_ISSOCK(info.st_mode)
            assert stat.S_IMODE(info.st_mode) == mode
        assert proxy.stop() == 0
    assert not d.exists()
    assert not s.exists()


def test_stale_socket_file_is_replaced(sockdir: Path) -> None:
    """A socket file left by a dead process is replaced, and the new socket serves."""
    path = sockdir / "dsd.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(path))
    stale.close()
    with (
        Sink() as sink,
        Proxy("--unix-socket", str(path), "--target-port", str(sink.port)) as proxy,
    ):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            client.connect(str(path))
            client.send(b"after.stale:1|c")
        assert sink.wait_for_lines(1) == [b"after.stale:1|c"]
        _books(proxy)


@pytest.mark.parametrize("flag", ["--unix-socket", "--unix-stream-socket"])
def test_regular_file_at_the_path_exits_2_and_is_untouched(sockdir: Path, flag: str) -> None:
    """A regular file where the socket should go: exit status 2, a clear message, the file
    intact (never deleted)."""
    path = sockdir / "important.txt"
    path.write_bytes(b"not a socket\n")
    proxy = Proxy(flag, str(path), wait=False)
    try:
        status = proxy.proc.wait(20)
    finally:
        proxy.stop()
    kind = "unix stream socket" if "stream" in flag else "unix socket"
    assert status == 2, proxy.output()
    assert (
        f"cannot listen on {kind} {path}: the path exists and is not a socket; "
        "it was left untouched (remove it or choose another path)"
    ) in proxy.output()
    assert path.read_bytes() == b"not a socket\n"


def test_a_live_socket_is_not_stolen(sockdir: Path) -> None:
    """Another process serving the path: exit 1 like a port in use; its socket keeps working."""
    path = sockdir / "dsd.sock"
    with UnixSink(path) as other:
        proxy = Proxy("--unix-socket", str(path), wait=False)
        try:
            status = proxy.proc.wait(20)
        finally:
            proxy.stop()
        assert status == 1, proxy.output()
        assert f"cannot listen on unix socket {path}: Address already in use" in proxy.output()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            client.connect(str(path))
            client.send(b"still:1|c")
        assert other.wait_for_lines(1) == [b"still:1|c"]


# ------------------------------------------------------------------ shutdown


def test_sigterm_drains_unix_datagrams_and_stream_clients(sockdir: Path, tcp_sink: Sink) -> None:
    """Datagrams queued on the Unix socket and stream clients still in the backlog at SIGTERM
    are all read and forwarded; the books balance exactly; the socket files are removed."""
    d, s = sockdir / "d.sock", sockdir / "s.sock"
    args = ("--unix-socket", str(d), "--unix-stream-socket", str(s))
    proxy = Proxy(
        *args,
        "--target-port",
        str(tcp_sink.port),
        "--target-protocol",
        "tcp",
        "--shutdown-timeout",
        "20",
    )
    clients: list[socket.socket] = []
    expected: list[bytes] = []
    try:
        with stopped(proxy.worker_pids()):
            # The workers cannot read: everything waits in the kernel. A Unix datagram
            # queue holds few datagrams (net.unix.max_dgram_qlen): 10 big ones.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dgram:
                dgram.connect(str(d))
                for n in range(10):
                    lines = [b"queued.dgram.%d.%d:1|c" % (n, k) for k in range(200)]
                    dgram.send(b"\n".join(lines))
                    expected += lines
            for n in range(100):
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                clients.append(conn)
                conn.connect(str(s))
                lines = [b"backlog.%d.%d:1|c" % (n, k) for k in range(20)]
                payload = b"\n".join(lines)
                conn.sendall(struct.pack("<I", len(payload)) + payload)
                expected += lines
            proxy.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)  # the supervisor has passed SIGTERM on to the stopped workers
        status = proxy.stop()
    finally:
        for conn in clients:
            conn.close()
        proxy.stop()
    lines = tcp_sink.settle()
    assert status == 0, proxy.output()
    assert Counter(lines) == Counter(expected)
    assert final_counts(proxy.output()) == {
        "received": 4000,
        "forwarded": 4000,
        "blocked": 0,
        "aggregated": 0,
        "dropped": 0,
    }
    assert not d.exists()
    assert not s.exists()


# ------------------------------------------------------------------ several upstreams


def test_unix_upstreams_shard_by_their_address_and_mirror(sockdir: Path) -> None:
    """Shard mode places each name on the upstream the hash ring gives for the addresses as
    written (unix:///...); mirror mode gives every upstream every line."""
    with UnixSink(sockdir / "a.sock") as a, UnixSink(sockdir / "b.sock", "stream") as b:
        targets = [f"unix://{a.path}", f"unix+stream://{b.path}"]
        names = [b"shard.%d" % i for i in range(300)]
        with Proxy("--target", targets[0], "--target", targets[1]) as proxy:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                for name in names:
                    udp.sendto(name + b":1|c", (LOCALHOST, proxy.port))
            assert wait_until(lambda: len(a.lines()) + len(b.lines()) == 300)
            _books(proxy)
        ring = HashRing(targets)
        where = {name: ring.get(name) for name in names}
        assert {line.split(b":")[0] for line in a.lines()} == {
            n for n, t in where.items() if t == targets[0]
        }
        assert {line.split(b":")[0] for line in b.lines()} == {
            n for n, t in where.items() if t == targets[1]
        }
        assert a.lines()
        assert b.lines()
    with UnixSink(sockdir / "c.sock") as c, UnixSink(sockdir / "d.sock", "stream") as d:
        args = ("--target", f"unix://{c.path},unix+stream://{d.path}", "--upstream-mode", "mirror")
        with Proxy(*args) as proxy:
            proxy.udp(b"m.1:1|c\nm.2:2|c")
            assert c.wait_for_lines(2) == [b"m.1:1|c", b"m.2:2|c"]
            assert d.wait_for_lines(2) == [b"m.1:1|c", b"m.2:2|c"]


def test_missing_unix_upstream_is_down_then_delivers(sockdir: Path) -> None:
    """An agent socket that is not there yet: the upstream is down and lines wait in the
    bounded buffer; once the agent binds it they are delivered and it comes back up."""
    path = sockdir / "agent.sock"
    with Proxy("--target", f"unix://{path}", "--health-interval", "0.1") as proxy:
        for i in range(50):
            proxy.udp(b"early.%d:1|c" % i)
        assert wait_until(lambda: proxy.healthz()["upstream"]["state"] == "down")
        proxy.wait_metric("upstream_buffered_bytes_total", lambda v: v > 0)
        with UnixSink(path) as agent:
            lines = agent.wait_for_lines(50, timeout=15)
            m = _books(proxy)
            assert wait_until(lambda: proxy.healthz()["upstream"]["state"] == "up")
    assert sorted(lines) == sorted(b"early.%d:1|c" % i for i in range(50))
    assert m["lines_forwarded_total"] == 50
    assert m["upstream_errors_total"] > 0


# ------------------------------------------------------------------ origin detection


def test_origin_detection_tags_lines_with_the_senders_container(sockdir: Path) -> None:
    """With --unix-origin-detection, lines from a Unix socket get the sender's container id
    (read from <procfs_path>/<pid>/cgroup, here a fake one for this test's own pid), unless
    they carry a container field already; off by default."""
    proc = sockdir / "proc"
    (proc / str(os.getpid())).mkdir(parents=True)
    (proc / str(os.getpid()) / "cgroup").write_text(
        f"0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-{CID}.scope\n"
    )
    d, s = sockdir / "d.sock", sockdir / "s.sock"
    with UnixSink(sockdir / "agent.sock") as agent:
        args = (
            "--unix-socket",
            str(d),
            "--unix-stream-socket",
            str(s),
            "--target",
            f"unix://{agent.path}",
        )
        with Proxy(*args, "--unix-origin-detection", "--procfs-path", str(proc)) as proxy:
            dd = _dogstatsd(str(d))
            dd.increment("o.dgram", tags=["env:k8s"])
            dd.close_socket()
            dd = _dogstatsd(f"unixstream://{s}")
            dd.increment("o.stream")
            dd.close_socket()
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as raw:
                raw.connect(str(d))
                raw.send(b"o.own:1|c|c:ci-abc")
            proxy.udp(b"o.udp:1|c")  # not a Unix socket: no credentials, untouched
            lines = agent.wait_for_lines(4)
            m = _books(proxy)
    field = b"|c:ci-" + CID.encode()
    assert sorted(lines) == sorted(
        [
            b"o.dgram:1|c|#env:k8s" + field,
            b"o.stream:1|c" + field,
            b"o.own:1|c|c:ci-abc",
            b"o.udp:1|c",
        ]
    )
    assert m["unix_origin_tagged_total"] == 2
