"""Pre-aggregation through the real program: real clients in, Etsy statsd (or a sink) out.

The same workload runs with aggregation off and on into two fresh Etsy statsd
daemons; counters (sampled ones too), gauges (absolute, deltas, mixed) and
timer values must end identical, with far fewer lines upstream. The other
tests cover the lifecycle (SIGTERM, SIGKILL, reload, the series cap), the
rules (per-rule aggregation, a limit deciding first) and packed output.

Packed output (``name:v1:v2|h``): no server that takes packed values can be
installed here (no Go toolchain; Debian has no statsd_exporter package), so it
is checked against :func:`parse_dogstatsd`, which implements the documented
DogStatsD protocol 1.1 rule (several ``:``-separated values for every type
but sets) -- and against Etsy statsd, which must receive the same values one
per line for flavour etsy.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import statsd
from datadog.dogstatsd.base import DogStatsd

from tests.integration.etsy import EtsyStatsd
from tests.integration.harness import (
    BIN,
    LOCALHOST,
    Proxy,
    Sink,
    accounted,
    clean_env,
    final_counts,
    wait_until,
)

AGGREGATE = ("--aggregate", "--flush-interval", "0.2")


def _canonical(name: str) -> str:
    """An Etsy key with its folded tags (``;k=v``) in sorted order."""
    head, *tags = name.split(";")
    return ";".join([head, *sorted(tags)])


def _stable(read: Callable[[], object], timeout: float = 10.0) -> object:
    """Poll ``read()`` until two reads 0.3 s apart agree; returns the value."""
    last: list[object] = [object()]

    def same() -> bool:
        value = read()
        steady = bool(value == last[0])
        last[0] = value
        return steady

    wait_until(same, timeout, interval=0.3)
    return last[0]


def _workload(port: int) -> None:
    """StatsD and DogStatsD clients' traffic, the same every call (seeded sampling)."""
    random.seed(1234)  # the clients' own sampling draws (rate < 1) repeat each run
    with closing(statsd.StatsClient(LOCALHOST, port)) as client:
        for i in range(300):
            client.incr("app.hits")
            client.incr("app.bytes", 7)
            client.timing("app.latency", i % 37)
        for i in range(500):
            client.incr("app.rated", rate=0.1)
            client.timing("app.rated_latency", i, rate=0.5)
        for i in range(200):
            client.gauge("g.abs", i)
        for _ in range(40):
            client.gauge("g.delta", 3, delta=True)
            client.gauge("g.delta", -1, delta=True)
        client.gauge("g.mixed", 100)
        for i in range(30):
            client.gauge("g.mixed", -2, delta=True)
            if i == 20:
                client.gauge("g.mixed", 10)
    dd = DogStatsd(host=LOCALHOST, port=port, disable_telemetry=True)
    for i in range(200):
        tags = ["env:prod", "svc:a"] if i % 2 else ["svc:a", "env:prod"]
        dd.increment("dd.hits", tags=tags)
        dd.increment("dd.rated", sample_rate=0.5, tags=["k:v"])
        dd.histogram("dd.size", i % 10, tags=["env:prod"])
        dd.gauge("dd.level", i, tags=["env:prod"])
    dd.flush()
    dd.close_socket()


Floats = dict[str, float]


def _run(args: tuple[str, ...]) -> tuple[Floats, Floats, dict[str, list[float]], Floats]:
    """The workload through one worker (UDP order kept) into a fresh Etsy statsd."""
    with (
        EtsyStatsd("udp") as etsy,
        Proxy("--target-port", str(etsy.port), *args, workers=1) as proxy,
    ):
        _workload(proxy.port)
        wait_until(lambda: proxy.metrics().get("lines_received_total", 0) > 0)
        m = proxy.wait_settled()
        counters = _stable(etsy.counters)
        assert isinstance(counters, dict)
        gauges, timers = etsy.gauges(), etsy.timers()
    return counters, gauges, timers, m


def _canonical_sums(values: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in values.items():
        out[_canonical(k)] = out.get(_canonical(k), 0) + v
    return out


def test_clients_into_etsy_give_the_same_totals_with_and_without_aggregation() -> None:
    """Counters (sampled too), gauges (absolute, deltas, mixed) and timers are identical,
    with Etsy's several-samples form (flavour etsy) and one value per line (telegraf);
    Etsy statsd receives a fraction of the lines."""
    off_c, off_g, off_t, off_m = _run(())
    received = off_c.pop("statsd.metrics_received")
    off_c.pop("statsd.packets_received")
    assert received == off_m["lines_received_total"]
    upstream_lines = {}
    for flavor in ("etsy", "telegraf"):
        on_c, on_g, on_t, on_m = _run((*AGGREGATE, "--upstream-flavor", flavor))
        received_on = upstream_lines[flavor] = on_c.pop("statsd.metrics_received")
        on_c.pop("statsd.packets_received")
        assert _canonical_sums(on_c) == _canonical_sums(off_c)
        assert on_c["app.hits"] == 300
        assert on_c["app.bytes"] == 2100
        assert on_c["statsd.bad_lines_seen"] == 0
        assert off_c["app.rated"] % 10 == 0 < off_c["app.rated"]  # @0.1 lines, scaled by 10
        assert on_g == off_g
        assert on_g["g.abs"] == 199
        assert on_g["g.delta"] == 80
        assert on_g["g.mixed"] == 10 - 2 * 9
        assert {k: sorted(v) for k, v in on_t.items()} == {k: sorted(v) for k, v in off_t.items()}
        assert len(on_t["app.latency"]) == 300
        # Everything but timer and histogram values merges, to well under a tenth.
        values = sum(map(len, on_t.values())) + 200  # + dd.size, a histogram
        assert (received_on - values) * 10 < received - values
        assert on_m["lines_aggregated_total"] + on_m["lines_forwarded_total"] == received
        assert on_m["aggregate_lines_out_total"] == received_on
        assert on_m["lines_received_total"] == accounted(on_m)
    # Etsy's form carries many values a line; telegraf gets one value per line.
    assert upstream_lines["etsy"] * 4 < upstream_lines["telegraf"]


def test_one_tcp_connection_keeps_its_gauge_order_across_workers() -> None:
    """One TCP connection is served by one worker: many updates, the final value is exact."""
    with (
        EtsyStatsd("udp") as etsy,
        Proxy("--target-port", str(etsy.port), *AGGREGATE, workers=2) as proxy,
    ):
        client = statsd.TCPStatsClient(LOCALHOST, proxy.port, timeout=5)
        expected = 0
        for i in range(2000):
            if i % 100 == 0:
                client.gauge("tcp.level", i)
                expected = i
            else:
                client.gauge("tcp.level", 1 if i % 3 else -2, delta=True)
                expected += 1 if i % 3 else -2
        client.incr("tcp.done")
        client.close()
        etsy.wait_for_counter("tcp.done", 1)
        proxy.wait_settled()
        assert _stable(etsy.gauges) == {"tcp.level": expected}


def test_sigterm_mid_window_delivers_every_aggregate(sink: Sink) -> None:
    with Proxy("--target-port", str(sink.port), "--aggregate", "--flush-interval", "60") as proxy:
        for i in range(500):
            proxy.udp(b"w.count:1|c\nw.gauge:%d|g\nw.t:%d|ms" % (i, i))
        proxy.wait_metric("lines_received_total", lambda v: v == 1500)
        assert sink.lines() == []  # held for the minute-long window
        assert proxy.stop() == 0
    lines = sink.settle()
    counts = final_counts(proxy.output())
    assert counts["aggregated"] == 1500
    assert counts["received"] == counts["forwarded"] + counts["aggregated"] + counts["dropped"]
    counters = [int(line[len(b"w.count:") : -2]) for line in lines if line.startswith(b"w.count:")]
    assert sum(counters) == 500
    assert len(counters) <= 2  # one per worker
    # Etsy statsd's several samples a line: w.t:0|ms:1|ms:...
    samples = [s for line in lines if line.startswith(b"w.t:") for s in line.split(b":")[1:]]
    timers = sorted(int(sample.removesuffix(b"|ms")) for sample in samples)
    assert timers == list(range(500))


def test_a_killed_workers_aggregates_are_counted_as_worker_died(sink: Sink) -> None:
    """SIGKILL a worker holding aggregates: exactly the input lines it held are dropped."""
    args = ("--target-port", str(sink.port), "--aggregate", "--flush-interval", "60")
    with Proxy(*args, workers=1) as proxy:
        for i in range(300):
            proxy.udp(b"k.a:1|c\nk.b:%d|ms\n_e{1,1}:a|b" % i)
        m = proxy.wait_metric("lines_received_total", lambda v: v == 900)
        proxy.wait_metric("lines_forwarded_total", lambda v: v == 300)  # events pass at once
        assert proxy.metrics()["aggregate_series"] == 2
        (pid,) = proxy.worker_pids()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: proxy.metrics().get("worker_restarts_total") == 1)
        m = proxy.wait_settled()
    assert m['lines_dropped_total{reason="worker_died"}'] == 600
    assert m["lines_forwarded_total"] == 300
    assert m["lines_aggregated_total"] == 0
    assert m["aggregate_series"] == 0
    assert m["lines_received_total"] == accounted(m) == 900
    assert all(line.startswith(b"_e{") for line in sink.settle())


def test_a_reload_flushes_and_the_series_cap_flushes_early(tmp_path: Path, sink: Sink) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text("aggregate = true\nflush_interval = 60\naggregate_max_series = 10\n")
    with Proxy("--config", str(config), "--target-port", str(sink.port), workers=1) as proxy:
        for i in range(25):
            proxy.udp(b"cap.%d:1|c\ncap.%d:2|c" % (i, i))
        proxy.wait_metric("lines_received_total", lambda v: v == 50)
        # 25 series through a cap of 10: two early flushes, the last 5 still held.
        lines = sink.wait_for_lines(20)
        assert sorted(lines) == sorted(b"cap.%d:3|c" % i for i in range(20))
        m = proxy.metrics()
        assert m['aggregate_flushes_total{reason="cap"}'] == 2
        assert m["aggregate_series"] == 5
        config.write_text("aggregate = true\nflush_interval = 60\naggregate_max_series = 100\n")
        proxy.proc.send_signal(signal.SIGHUP)
        lines = sink.wait_for_lines(25)
        m = proxy.wait_settled()
    assert sorted(lines) == sorted(b"cap.%d:3|c" % i for i in range(25))
    assert m['aggregate_flushes_total{reason="reload"}'] >= 1
    assert m["lines_aggregated_total"] == 50
    assert m["aggregate_lines_out_total"] == 25


RULES = """
aggregate = {aggregate}
flush_interval = 0.2

[[rules]]
name = "few-users"
match = {{ prefix = "lim." }}
action = "limit_series"
max_series = 2

[[rules]]
name = "merge-api"
match = {{ prefix = "api." }}
action = "aggregate"
"""


def test_rules_choose_what_is_aggregated_and_limits_decide_first(
    tmp_path: Path, sink: Sink
) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(RULES.format(aggregate="false"))
    with Proxy("--config", str(config), "--target-port", str(sink.port), workers=1) as proxy:
        for i in range(100):
            proxy.udp(b"api.hits:1|c\nother.hits:1|c\nlim.u%d:1|c" % (i % 4))
        lines = sink.wait_for_lines(1 + 100 + 100)
        m = proxy.wait_settled()
        assert sorted(set(lines)) == sorted(
            {b"api.hits:100|c", b"other.hits:1|c", b"lim.u0:1|c", b"lim.u1:1|c"}
        )
        assert m["lines_blocked_total"] == 50  # lim.u2, lim.u3: over the limit
        assert m["lines_aggregated_total"] == 100
        # aggregate = true: every line the rules pass, the limit still deciding first.
        config.write_text(RULES.format(aggregate="true"))
        proxy.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: proxy.healthz()["config"]["generation"] == 2)
        time.sleep(0.3)
        before = len(sink.lines())
        for i in range(100):
            proxy.udp(b"api.hits:1|c\nother.hits:1|c\nlim.u%d:1|c" % (i % 4))
        m = proxy.wait_metric("lines_aggregated_total", lambda v: v == 100 + 250)
        proxy.wait_settled()
        after = sorted(sink.settle()[before:])
    assert m["lines_blocked_total"] == 100
    assert after == sorted([b"api.hits:100|c", b"other.hits:100|c", b"lim.u0:25|c", b"lim.u1:25|c"])


def parse_dogstatsd(line: bytes) -> tuple[bytes, bytes, list[float], float, bytes]:
    """One metric line as DogStatsD protocol 1.1 reads it: (name, type, values, rate, tags).

    Several values separated by ``:`` are allowed for every type but sets
    (whose value is everything after the name's ``:``); each must be a number.
    """
    head, _, rest = line.partition(b"|")
    name, _, value = head.partition(b":")
    fields = rest.split(b"|")
    type_ = fields[0]
    assert type_ in (b"c", b"g", b"ms", b"h", b"d", b"s"), line
    assert name, line
    assert value, line
    texts = [value] if type_ == b"s" else value.split(b":")
    values = [float(t) for t in texts] if type_ != b"s" else []
    rate, tags = 1.0, b""
    for section in fields[1:]:
        if section.startswith(b"@"):
            rate = float(section[1:])
        elif section.startswith(b"#"):
            tags = section[1:]
    return name, type_, values, rate, tags


def test_packed_values_for_a_dogstatsd_upstream(sink: Sink) -> None:
    """Flavour datadog: timer, histogram and distribution values packed, each datagram
    within max_udp_size; every value arrives once, sample rates kept."""
    args = ("--target-port", str(sink.port), *AGGREGATE, "--upstream-flavor", "datadog")
    with Proxy(*args, "--max-udp-size", "512", workers=1) as proxy:
        dd = DogStatsd(host=LOCALHOST, port=proxy.port, disable_telemetry=True)
        sent: list[tuple[bytes, float]] = []
        for i in range(400):
            dd.histogram("p.h", i, tags=["env:prod"])
            dd.distribution("p.d", i / 4, tags=["env:prod"])
            dd.timing("p.ms", i, tags=["env:prod"])
            sent += [(b"h", i), (b"d", i / 4), (b"ms", i)]
        dd.flush()
        dd.close_socket()
        for i in range(50):
            proxy.udp(b"p.rated:%d|ms\np.rated:%d|ms|@0.5" % (i, i))
        m = proxy.wait_metric("lines_aggregated_total", lambda v: v == 1300)
        lines = sink.settle()
    assert all(len(d) <= 512 for d in sink.datagrams)
    got: list[tuple[bytes, float]] = []
    rated: list[tuple[float, float]] = []
    for line in lines:
        name, type_, values, rate, tags = parse_dogstatsd(line)
        if name == b"p.rated":
            rated += [(v, rate) for v in values]
            continue
        assert tags == b"env:prod"
        got += [(type_, v) for v in values]
    assert sorted(got) == sorted(sent)
    expected = [(float(i), rate) for i in range(50) for rate in (1.0, 0.5)]
    assert sorted(rated) == sorted(expected)
    assert len(lines) < 1300 / 20
    assert m["aggregate_lines_out_total"] == len(lines)


def test_explain_shows_the_series_key() -> None:
    result = subprocess.run(
        [str(BIN), "explain", "--aggregate", "api.x:1|c|@0.5|#b:2,a:1", "_e{1,1}:a|b"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=30,
        check=True,
    )
    assert "series key api.x|c|#a:1,b:2" in result.stdout
    assert "not aggregated" in result.stdout
