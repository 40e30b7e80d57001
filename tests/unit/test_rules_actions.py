"""Each match kind and action on its own, byte for byte, and sampling arithmetic."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statsd_filter.protocol.metric import Line, format_rate
from statsd_filter.rules.compile import compile_filter
from statsd_filter.rules.engine import RuleEngine
from statsd_filter.rules.model import parse_rules


def decide(rule: dict[str, object], line: bytes) -> bytes | None:
    """What one rule does to one line (None: dropped)."""
    engine = RuleEngine(parse_rules([{"name": "r", **rule}]))
    return engine.explain(line).output


@pytest.mark.parametrize(
    ("match", "line", "hit"),
    [
        ({"prefix": "api."}, b"api.x:1|c", True),
        ({"prefix": "api."}, b"app.api.x:1|c", False),
        ({"name": "api.x"}, b"api.x:1|c|#a:b", True),
        ({"name": "api.x"}, b"api.xy:1|c", False),
        ({"glob": "api.*.latency"}, b"api.v1.latency:3|ms", True),
        ({"glob": "api.*.latency"}, b"api.v1.eu.latency:3|ms", False),
        ({"glob": "api.**.latency"}, b"api.v1.eu.latency:3|ms", True),
        ({"glob": "a?c"}, b"abc:1|c", True),
        ({"regex": "^svc[0-9]+$"}, b"svc12:1|c", True),
        ({"regex": "^svc[0-9]+$"}, b"svc12x:1|c", False),
        ({"tag": "env:dev"}, b"m:1|c|#env:dev,a:b", True),
        ({"tag": "env:dev"}, b"m:1|c|#env:devx", False),
        ({"tag": "env:*"}, b"m:1|c|#env:prod", True),
        ({"tag": "env:*"}, b"m:1|c|#env", False),
        ({"tag": "env"}, b"m:1|c|#env", True),
        ({"tag": "env"}, b"m:1|c|#env:prod", True),
        ({"type": "ms"}, b"m:1|ms", True),
        ({"type": ["c", "d"]}, b"m:1|ms", False),
        ({"kind": "event"}, b"_e{1,1}:a|b", True),
        ({"kind": "service_check"}, b"_sc|db|0", True),
        ({"kind": "malformed"}, b"no-type:1", True),
        ({"kind": "malformed"}, b"m:abc|c", True),
        ({"kind": "malformed"}, b"m:1|c", False),
        ({"kind": "metric"}, b"m:1|c|@0.5", True),
        ({"name": "db", "type": "c"}, b"db:1|g", False),  # every condition must hold
        ({"regex": ".*"}, b"_e{1,1}:a|b", False),  # events have no metric name
    ],
)
def test_match_kinds(match: dict[str, object], line: bytes, hit: bool) -> None:
    """Each condition selects exactly the lines it describes."""
    out = decide({"match": match, "action": "drop"}, line)
    assert (out is None) == hit


@pytest.mark.parametrize(
    ("rule", "line", "out"),
    [
        ({"action": "allow"}, b"m:1|c|#a:b", b"m:1|c|#a:b"),
        ({"action": "strip_tags", "tags": ["host"]}, b"m:1|c|#env:p,host:h1,x", b"m:1|c|#env:p,x"),
        ({"action": "strip_tags", "tags": ["pod:*"]}, b"m:1|c|#pod:a,pod,z:1", b"m:1|c|#pod,z:1"),
        ({"action": "strip_tags", "tags": ["env:p"]}, b"m:1|c|#env:p,env:q", b"m:1|c|#env:q"),
        ({"action": "strip_tags", "tags": ["a"]}, b"m:1|c|@0.5|#a:1|T123", b"m:1|c|@0.5|T123"),
        ({"action": "strip_tags", "tags": ["a"]}, b"m:1|c", b"m:1|c"),
        ({"action": "add_tags", "tags": ["r:eu"]}, b"m:1|c", b"m:1|c|#r:eu"),
        ({"action": "add_tags", "tags": ["r:eu", "k"]}, b"m:1|c|#a:b", b"m:1|c|#a:b,r:eu,k"),
        ({"action": "rename", "from": "old.", "to": "new."}, b"old.x:1|c|#o", b"new.x:1|c|#o"),
    ],
)
def test_rewrites_are_byte_exact(rule: dict[str, object], line: bytes, out: bytes) -> None:
    """Rewrites change exactly what they say and keep every other byte."""
    assert decide({"match": {"prefix": line[:1].decode()}, **rule}, line) == out


def test_rewrites_touch_only_their_line() -> None:
    """In a chunk, lines no rule rewrites stay byte-identical (non-UTF-8 included)."""
    rules = parse_rules(
        [{"name": "s", "match": {"tag": "host"}, "action": "strip_tags", "tags": ["host"]}]
    )
    chunk = b"a\xff:1|c|#host:x\nb:2|g|#host:y,e:1\nc\xfe:3|ms"
    kept = compile_filter((), 8192, rules).filter(chunk)[0]
    assert kept == b"\na\xff:1|c\nb:2|g|#e:1\nc\xfe:3|ms"


@pytest.mark.parametrize(
    ("rate", "text"),
    [(0.1, b"0.1"), (0.05, b"0.05"), (1 / 3, b"0.3333333333333333"), (1e-5, b"0.00001")],
)
def test_rate_formatting(rate: float, text: bytes) -> None:
    """Sample rates are written the way clients write them (no exponent)."""
    assert format_rate(rate) == text


def test_sample_rewrites_or_adds_rate() -> None:
    """A kept line's @rate is divided by N; a line without one gets @1/N after its type."""
    assert Line(b"m:1|c|#a:b").with_rate(0.1) == b"m:1|c|@0.1|#a:b"
    assert Line(b"m:1|c|@0.5|#a:b").with_rate(0.05) == b"m:1|c|@0.05|#a:b"


_stream = st.lists(
    st.tuples(st.integers(min_value=1, max_value=50), st.sampled_from([1.0, 0.5, 0.25])),
    min_size=1,
    max_size=30,
)


@settings(max_examples=40, deadline=None)
@given(_stream, st.integers(min_value=2, max_value=10), st.integers(min_value=0, max_value=2**32))
def test_sampled_counter_total_is_right_on_average(
    stream: list[tuple[int, float]], keep_one_in: int, seed: int
) -> None:
    """For any stream, the upstream's total (sum of value/rate) after sampling is unbiased."""
    rules = parse_rules(
        [{"name": "s", "match": {"type": "c"}, "action": "sample", "keep_one_in": keep_one_in}]
    )
    line_filter = compile_filter((), 8192, rules, rng=random.Random(seed))
    chunk = b"\n".join(
        b"hot:%d|c" % v if r == 1.0 else b"hot:%d|c|@%s" % (v, format_rate(r)) for v, r in stream
    )
    true_total = sum(v / r for v, r in stream)
    rounds = 400
    totals = []
    for _ in range(rounds):
        kept = line_filter.filter(chunk)[0]
        total = 0.0
        for line in kept.split(b"\n")[1:]:
            parsed = Line(line)
            value = float(parsed.raw.split(b":", 1)[1].split(b"|", 1)[0])
            total += value / parsed.rate
        totals.append(total)
    mean = sum(totals) / rounds
    variance = sum((t - mean) ** 2 for t in totals) / (rounds - 1)
    # Mean of 400 draws: within 6 standard errors of the true total.
    assert abs(mean - true_total) <= 6 * (variance / rounds) ** 0.5 + 1e-6
