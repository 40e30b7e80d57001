"""Pre-aggregation in the pipeline and the router: what is counted when, and where
aggregated lines go (datagrams whose lines the senders do not count)."""

from __future__ import annotations

import logging
import tomllib

from statsd_filter.rules import compile_filter
from statsd_filter.rules.aggregate import Aggregator
from statsd_filter.rules.model import parse_rules
from statsd_filter.stats import SLOT_WIDTH, Stat
from statsd_filter.upstream.batcher import Batcher
from statsd_filter.upstream.router import Router
from statsd_filter.worker.pipeline import PackedPath, Pipeline

Sent = list[tuple[int, list[bytes], list[int]]]


def _router(nodes: int, mode: str = "shard") -> tuple[Router, Sent]:
    sent: Sent = []

    def sender(i: int) -> Batcher:
        return Batcher(1432, lambda p, n: sent.append((i, p, n)))

    names = [f"127.0.0.1:{8000 + i}" for i in range(nodes)]
    return Router(names, [sender(i) for i in range(nodes)], mode), sent


def test_uncounted_batches_carry_no_line_counts() -> None:
    router, sent = _router(1)
    router.add(b"\na:1|c\nb:1|c", 2)
    router.add_uncounted(b"\nx:5|c\ny:7|c\nz:1|g")
    router.flush()
    assert sent == [(0, [b"a:1|c\nb:1|c"], [2]), (0, [b"x:5|c\ny:7|c\nz:1|g"], [0])]


def test_uncounted_lines_are_sharded_and_mirrored_like_the_others() -> None:
    router, sent = _router(3)
    lines = [b"name%d:1|c" % i for i in range(60)]
    router.add(b"\n" + b"\n".join(lines), 60)
    router.add_uncounted(b"\n" + b"\n".join(lines))
    router.flush()

    def routed(want_counted: bool) -> set[tuple[int, bytes]]:
        return {
            (i, line)
            for i, payloads, counts in sent
            if bool(counts[0]) == want_counted
            for payload in payloads
            for line in payload.split(b"\n")
        }

    counted, uncounted = routed(True), routed(False)
    assert counted == uncounted
    assert len({i for i, _ in counted}) == 3
    assert all(counts == [0] * len(counts) for _, _, counts in sent if not counts[0])
    mirror, copies = _router(2, "mirror")
    mirror.add_uncounted(b"\na:1|c")
    mirror.flush()
    assert sorted(copies) == [(0, [b"a:1|c"], [0]), (1, [b"a:1|c"], [0])]


def test_a_refused_aggregate_datagram_is_rerouted_uncounted() -> None:
    router, sent = _router(2)
    router.set_healthy("127.0.0.1:8000", False)
    assert router.reroute(b"a:1|c\nb:2|c", "127.0.0.1:8000", counted=False)
    router.flush()
    assert sent == [(1, [b"a:1|c\nb:2|c"], [0])]


def _pipeline(rules: str = "", everything: bool = True) -> tuple[Pipeline, memoryview, Sent]:
    router, sent = _router(1)
    specs = parse_rules(tomllib.loads(rules)["rules"]) if rules else ()
    counters = memoryview(bytearray(8 * SLOT_WIDTH)).cast("Q")
    line_filter = compile_filter(("debug.",), 8192, specs)
    pipeline = Pipeline(
        line_filter,
        router,
        counters,
        memoryview(bytearray(8 * 60)).cast("Q"),
        logging.getLogger("test"),
        8192,
    )
    marked = any(s.action == "aggregate" for s in specs)
    pipeline.set_aggregation(Aggregator("etsy", max_series=3), everything, marked)
    return pipeline, counters, sent


def _held(c: memoryview) -> int:
    return int(
        c[Stat.LINES_RECEIVED]
        - c[Stat.LINES_BLOCKED]
        - c[Stat.LINES_AGGREGATED]
        - c[Stat.DROPPED_OVERSIZE]
        - c[Stat.DROPPED_PARTIAL]
    )


def test_lines_are_counted_as_aggregated_when_handed_over() -> None:
    pipeline, c, sent = _pipeline()
    assert pipeline.packed is None or pipeline.packed.max_size == 0  # no C packing
    pipeline.feed(b"a:1|c\na:2|c\ndebug.x:1|c\n_e{1,1}:a|b\ng:5|g")
    pipeline.flush()
    assert c[Stat.LINES_RECEIVED] == 5
    assert c[Stat.LINES_BLOCKED] == 1
    assert c[Stat.LINES_AGGREGATED] == 0
    assert c[Stat.AGGREGATE_SERIES] == 2
    assert sent == [(0, [b"_e{1,1}:a|b"], [1])]  # the event passes at once, counted
    assert _held(c) == 4  # the event (until its sender counts it) and three held lines
    pipeline.flush_aggregates(Stat.AGGREGATE_FLUSHES_INTERVAL)
    assert c[Stat.LINES_AGGREGATED] == 3
    assert c[Stat.AGGREGATE_LINES_OUT] == 2
    assert c[Stat.AGGREGATE_FLUSHES_INTERVAL] == 1
    assert c[Stat.AGGREGATE_SERIES] == 0
    assert sent[1] == (0, [b"a:3|c\ng:5|g"], [0])


def test_the_series_cap_flushes_early_and_is_counted() -> None:
    pipeline, c, sent = _pipeline()
    pipeline.feed(b"\n".join(b"s%d:1|c" % i for i in range(7)))
    pipeline.flush()
    assert c[Stat.AGGREGATE_FLUSHES_CAP] == 2
    assert c[Stat.LINES_AGGREGATED] == 6
    assert c[Stat.AGGREGATE_SERIES] == 1
    assert [line for _, p, _ in sent for line in p[0].split(b"\n")] == [
        b"s%d:1|c" % i for i in range(6)
    ]


def test_a_rule_chooses_what_is_aggregated() -> None:
    rules = '[[rules]]\nname = "agg"\nmatch = { prefix = "api." }\naction = "aggregate"\n'
    pipeline, c, sent = _pipeline(rules, everything=False)
    pipeline.feed(b"api.a:1|c\napi.a:1|c\nother:1|c\nother:1|c")
    pipeline.flush()
    assert sent == [(0, [b"other:1|c\nother:1|c"], [2])]
    pipeline.flush_aggregates(Stat.AGGREGATE_FLUSHES_SHUTDOWN)
    assert sent[1] == (0, [b"api.a:2|c"], [0])
    assert c[Stat.LINES_AGGREGATED] == 2
    assert c[Stat.AGGREGATE_FLUSHES_SHUTDOWN] == 1


def test_without_aggregation_the_c_path_is_untouched() -> None:
    router, _ = _router(1)
    counters = memoryview(bytearray(8 * SLOT_WIDTH)).cast("Q")
    pipeline = Pipeline(
        compile_filter(("debug.",), 8192),
        router,
        counters,
        memoryview(bytearray(8 * 60)).cast("Q"),
        logging.getLogger("test"),
        8192,
    )
    before = pipeline.packed
    pipeline.set_aggregation(Aggregator(), everything=True, marked=False)
    pipeline.set_aggregation(None, everything=False, marked=False)
    assert pipeline.packed == before
    if isinstance(before, PackedPath):
        assert before.max_size == 1432
