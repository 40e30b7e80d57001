"""Real clients in, real Etsy statsd out: the PyPI statsd and datadog packages."""

from __future__ import annotations

from contextlib import closing

import statsd
from datadog.dogstatsd.base import DogStatsd

from tests.integration.etsy import EtsyStatsd
from tests.integration.harness import LOCALHOST, Proxy, Sink


def _proxy_to(etsy: EtsyStatsd, *args: str) -> Proxy:
    return Proxy("--target-port", str(etsy.port), "--blocklist", "debug.,noisy.", *args)


def test_statsd_udp_client_to_etsy(etsy: EtsyStatsd) -> None:
    """statsd.StatsClient over UDP: allowed sums exact in Etsy statsd, blocked names absent."""
    with (
        _proxy_to(etsy) as proxy,
        closing(statsd.StatsClient(LOCALHOST, proxy.port)) as client,
    ):
        for _ in range(200):
            client.incr("app.requests")
            client.incr("debug.noise")
        client.incr("app.bytes", 7)
        client.gauge("app.queue", 42)
        client.timing("app.latency", 12)
        with client.pipeline() as pipe:  # several lines in one datagram
            for _ in range(30):
                pipe.incr("app.requests")
                pipe.incr("noisy.thing")
        counters = etsy.wait_for_counter("app.requests", 230)
        proxy.wait_settled()
    assert counters["app.requests"] == 230
    assert counters["app.bytes"] == 7
    assert "debug.noise" not in counters
    assert "noisy.thing" not in counters
    assert counters["statsd.bad_lines_seen"] == 0
    assert etsy.gauges()["app.queue"] == 42
    assert etsy.timers()["app.latency"] == [12]


def test_statsd_tcp_client_to_etsy(etsy: EtsyStatsd) -> None:
    """statsd.TCPStatsClient: newline-framed TCP lines are filtered and summed exactly."""
    with _proxy_to(etsy) as proxy:
        client = statsd.TCPStatsClient(LOCALHOST, proxy.port, timeout=5)
        for i in range(300):
            client.incr("tcp.hits")
            client.incr("debug.hits")
            client.gauge("tcp.level", i)
        with client.pipeline() as pipe:
            for _ in range(20):
                pipe.incr("tcp.hits", 2)
        client.close()
        counters = etsy.wait_for_counter("tcp.hits", 340)
        proxy.wait_settled()
    assert counters["tcp.hits"] == 340
    assert "debug.hits" not in counters
    assert etsy.gauges()["tcp.level"] == 299


def test_tcp_upstream_to_etsy_tcp() -> None:
    """A TCP upstream (Etsy statsd's TCP server) receives exact sums."""
    with EtsyStatsd("tcp") as etsy_tcp:
        args = ("--target-port", str(etsy_tcp.port), "--target-protocol", "tcp")
        with (
            Proxy(*args, "--blocklist", "debug.") as proxy,
            closing(statsd.StatsClient(LOCALHOST, proxy.port)) as client,
        ):
            for _ in range(500):
                client.incr("over.tcp")
                client.incr("debug.x")
            counters = etsy_tcp.wait_for_counter("over.tcp", 500)
    assert counters["over.tcp"] == 500
    assert "debug.x" not in counters


def test_dogstatsd_tags_to_etsy(etsy: EtsyStatsd) -> None:
    """DogStatsD tagged metrics pass intact (Etsy folds tags into the name as ;k=v)."""
    with _proxy_to(etsy) as proxy:
        dd = DogStatsd(host=LOCALHOST, port=proxy.port, disable_telemetry=True)
        for _ in range(25):
            dd.increment("dd.hits", tags=["env:dev", "team:core"])
            dd.increment("debug.dd", tags=["env:dev"])
        dd.gauge("dd.temp", 21.5, tags=["room:a"])
        dd.close_socket()
        counters = etsy.wait_for_counter("dd.hits;env=dev;team=core", 25)
    assert counters["dd.hits;env=dev;team=core"] == 25
    assert not [name for name in counters if name.startswith("debug.")]
    assert etsy.gauges()["dd.temp;room=a"] == 21.5


def test_dogstatsd_events_and_service_checks_pass_through(sink: Sink) -> None:
    """Events and service checks are forwarded byte-for-byte; a prefix can block them."""
    with Proxy("--target-port", str(sink.port), "--blocklist", "_sc|,debug.") as proxy:
        dd = DogStatsd(host=LOCALHOST, port=proxy.port, disable_telemetry=True)
        dd.event("Deploy", "version 1.2 rolled out", alert_type="info", tags=["env:prod"])
        dd.service_check("app.can_connect", DogStatsd.OK, tags=["db:main"], message="fine")
        dd.increment("dd.after", tags=["k:v"])
        dd.close_socket()
        lines = sink.wait_for_lines(2)
        m = proxy.wait_settled()
    # Datagrams may be read by different workers, so order is not guaranteed.
    (event,) = [line for line in lines if line.startswith(b"_e{")]
    assert event.startswith(b"_e{6,22}:Deploy|version 1.2 rolled out|t:info")
    assert event.endswith(b"|#env:prod")
    assert b"dd.after:1|c|#k:v" in lines
    assert len(lines) == 2
    assert m["lines_blocked_total"] == 1  # the service check
