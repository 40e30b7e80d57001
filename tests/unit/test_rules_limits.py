"""limit_series / limit_tag_values as rules: decisions, windows, the whole-chunk path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statsd_filter.protocol.metric import KIND_METRIC, Line
from statsd_filter.rules import limits as limits_module
from statsd_filter.rules.compile import compile_filter
from statsd_filter.rules.engine import RuleEngine
from statsd_filter.rules.filter import RULE_FIELDS, LineFilter
from statsd_filter.rules.limitcache import DictCache
from statsd_filter.rules.limits import LIMITED, SERIES_LIMITED, TRACKING_FULL
from statsd_filter.rules.limittable import NATIVE
from statsd_filter.rules.model import parse_rules


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _filter(*rules: dict[str, Any], clock: Clock | None = None, **kw: Any) -> LineFilter:
    specs = parse_rules([{"name": f"r{i}", **rule} for i, rule in enumerate(rules)])
    return compile_filter((), 8192, specs, clock=clock or Clock(), **kw)


def _lines(kept: bytes) -> list[bytes]:
    return kept.split(b"\n")[1:] if kept else []


def _counts(line_filter: LineFilter, row: int = 0) -> dict[str, int]:
    values = dict(line_filter.drain_counters())
    base = row * RULE_FIELDS
    return {
        "matches": values.get(base, 0),
        "saved": values.get(base + 1, 0),
        "limited": values.get(base + LIMITED, 0),
        "series_limited": values.get(base + SERIES_LIMITED, 0),
        "tracking_full": values.get(base + TRACKING_FULL, 0),
    }


@pytest.fixture(params=["native", "python"])
def cache_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the C cache and scan, and again with the pure-Python fallback."""
    if request.param == "native" and not NATIVE:
        pytest.skip("the C accelerator is not built")
    if request.param == "python":
        monkeypatch.setattr(limits_module, "new_cache", DictCache)
    return str(request.param)


CAP_50 = {"match": {"name": "api.requests"}, "action": "limit_series", "max_series": 50}


def test_exactly_max_series_pass_and_keep_passing(cache_kind: str) -> None:
    """Of 200 series, the first 50 pass; the others are dropped; the 50 keep passing."""
    f = _filter({**CAP_50, "window": 2})
    chunk = b"\n".join(b"api.requests:1|c|#id:%d" % i for i in range(200))
    kept, received, forwarded, blocked, _ = f.filter(chunk)
    assert _lines(kept) == [b"api.requests:1|c|#id:%d" % i for i in range(50)]
    assert (received, forwarded, blocked) == (200, 50, 150)
    again = b"\n".join(b"api.requests:7|c|#id:%d" % i for i in range(199, -1, -1))
    assert _lines(f.filter(again)[0]) == [b"api.requests:7|c|#id:%d" % i for i in range(49, -1, -1)]
    c = _counts(f)
    assert c == {
        "matches": 400,
        "saved": 300,
        "limited": 300,
        "series_limited": 150,
        "tracking_full": 0,
    }


def test_next_window_admits_new_series(cache_kind: str) -> None:
    """When the window ends, the budget is fresh: 50 new series pass, old ones compete anew."""
    clock = Clock(1000.0)  # windows of 2 s: [1000, 1002)
    f = _filter({**CAP_50, "window": 2}, clock=clock)
    f.filter(b"\n".join(b"api.requests:1|c|#id:%d" % i for i in range(100)))
    clock.now = 1001.9
    assert _lines(f.filter(b"api.requests:1|c|#id:99")[0]) == []
    clock.now = 1002.0
    fresh = b"\n".join(b"api.requests:1|c|#id:%d" % i for i in range(100, 300))
    assert _lines(f.filter(fresh)[0]) == [b"api.requests:1|c|#id:%d" % i for i in range(100, 150)]
    assert _lines(f.filter(b"api.requests:1|c|#id:0")[0]) == []  # the old series: over the limit


def test_tag_order_is_not_a_new_series(cache_kind: str) -> None:
    """The same tags in another order, with another value or rate, are the same series."""
    f = _filter({**CAP_50, "max_series": 1})
    assert _lines(f.filter(b"api.requests:1|c|#a:1,b:2")[0]) == [b"api.requests:1|c|#a:1,b:2"]
    same = b"api.requests:9|c|@0.5|#b:2,a:1"
    assert _lines(f.filter(same)[0]) == [same]
    assert _lines(f.filter(b"api.requests:1|c|#a:1,b:3")[0]) == []


def test_per_tag_budgets_are_independent(cache_kind: str) -> None:
    """per_tag: each value of the tag (and lines without it) has its own max_series."""
    f = _filter({**CAP_50, "max_series": 2, "per_tag": "service"})
    lines = [b"api.requests:1|c|#service:%s,id:%d" % (s, i) for s in (b"a", b"b") for i in range(4)]
    lines += [b"api.requests:1|c|#id:%d" % i for i in range(4)]
    kept = _lines(f.filter(b"\n".join(lines))[0])
    assert kept == [lines[0], lines[1], lines[4], lines[5], lines[8], lines[9]]
    state = f._engine.limits.limiters[0].table.state()  # type: ignore[union-attr]
    assert (state.admitted, state.budgets) == (6, 3)
    assert {name for name, _ in state.offenders} == {
        b"api.requests service:a",
        b"api.requests service:b",
        b"api.requests service:(none)",
    }


def test_on_limit_strip_tags_forwards_a_reduced_line(cache_kind: str) -> None:
    """on_limit = strip_tags: a series over the limit is forwarded without the listed tags."""
    f = _filter({**CAP_50, "max_series": 1, "on_limit": "strip_tags", "tags": ["id", "pod:*"]})
    kept, _, forwarded, blocked, _ = f.filter(
        b"api.requests:1|c|#env:prod,id:1\napi.requests:1|c|#env:prod,id:2,pod:x"
    )
    assert _lines(kept) == [b"api.requests:1|c|#env:prod,id:1", b"api.requests:1|c|#env:prod"]
    assert (forwarded, blocked) == (2, 0)
    assert _counts(f)["limited"] == 1


def test_limit_tag_values_strips_only_the_values_over_the_limit(cache_kind: str) -> None:
    """limit_tag_values: the first N values of each key pass; later values lose the tag only."""
    f = _filter(
        {
            "match": {"kind": "metric"},
            "action": "limit_tag_values",
            "max_values": 2,
            "tags": ["request_id"],
        }
    )
    lines = [b"http.hits:1|c|#env:prod,request_id:%d" % i for i in range(4)]
    kept = _lines(f.filter(b"\n".join([*lines, b"other:1|g|#request_id:0,env:dev"]))[0])
    assert kept == [
        lines[0],
        lines[1],
        b"http.hits:1|c|#env:prod",
        b"http.hits:1|c|#env:prod",
        b"other:1|g|#request_id:0,env:dev",  # value 0 is admitted for every metric
    ]
    c = _counts(f)
    assert (c["limited"], c["series_limited"], c["saved"]) == (2, 2, 0)


def test_limit_tag_values_star_limits_every_key(cache_kind: str) -> None:
    """tags = ["*"]: every tag key has its own budget of values."""
    f = _filter(
        {"match": {"kind": "metric"}, "action": "limit_tag_values", "max_values": 1, "tags": ["*"]}
    )
    kept = _lines(f.filter(b"m:1|c|#a:1,b:1\nm:1|c|#a:2,b:1\nm:1|c|#a:1,b:2,c")[0])
    assert kept == [b"m:1|c|#a:1,b:1", b"m:1|c|#b:1", b"m:1|c|#a:1,c"]


def test_non_metric_lines_pass_a_limit_rule(cache_kind: str) -> None:
    """Events, service checks and malformed lines are not series: a limit rule passes them."""
    f = _filter({"match": {"tag": "env"}, "action": "limit_series", "max_series": 1})
    chunk = b"_e{1,1}:a|b|#env:x\n_sc|c|0|#env:y\nbad|#env:z\nm:1|c|#env:1\nm:1|c|#env:2"
    assert _lines(f.filter(chunk)[0]) == chunk.split(b"\n")[:4]


def test_other_rules_still_decide_first(cache_kind: str) -> None:
    """A rule before the limit rule decides its lines; the limit counts only what it matches."""
    f = _filter(
        {"match": {"tag": "debug"}, "action": "drop"},
        {"match": {"kind": "metric"}, "action": "limit_series", "max_series": 2},
    )
    chunk = b"a:1|c|#debug\nb:1|c|#debug\nc:1|c\nd:1|c\ne:1|c"
    assert _lines(f.filter(chunk)[0]) == [b"c:1|c", b"d:1|c"]
    assert _counts(f, 1)["matches"] == 3


@pytest.mark.skipif(not NATIVE, reason="the C accelerator is not built")
def test_known_series_never_reach_the_per_line_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steady traffic: once every series is known, chunks pass in C without per-line work."""
    f = _filter({**CAP_50, "match": {"kind": "metric"}, "max_series": 1000})
    chunk = b"\n".join(b"m%d:1|c|#k:%d" % (i % 7, i) for i in range(300))
    first = f.filter(chunk)
    engine = f._engine
    assert engine is not None

    def no_per_line_work(line: Line) -> None:
        raise AssertionError(f"per-line evaluation of {line.raw!r}")

    monkeypatch.setattr(engine, "find", no_per_line_work)
    steady = b"\n".join(b"m%d:5|c|#k:%d" % (i % 7, i) for i in range(299, -1, -1))
    kept = f.filter(steady)
    assert kept == (b"\n" + steady, 300, 300, 0, 0)
    assert first[2] == 300
    assert _counts(f)["matches"] == 600  # counted by the scan, too


@pytest.mark.skipif(not NATIVE, reason="the C accelerator is not built")
def test_scan_is_not_used_when_another_rule_may_match(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk another rule's gate finds goes line by line, so that rule still decides."""
    f = _filter(
        {"match": {"prefix": "drop."}, "action": "drop"},
        {"match": {"kind": "metric"}, "action": "limit_series", "max_series": 10},
    )
    f.filter(b"a:1|c")
    assert _lines(f.filter(b"a:1|c\ndrop.x:1|c")[0]) == [b"a:1|c"]


def test_unmatched_series_are_learned_but_allowlist_drops_them(cache_kind: str) -> None:
    """In allowlist_mode a line no rule matches is dropped, however often it comes."""
    f = _filter({**CAP_50}, allowlist_mode=True)
    for _ in range(3):
        kept, _, _, blocked, _ = f.filter(b"other:1|c\napi.requests:1|c")
        assert (_lines(kept), blocked) == ([b"api.requests:1|c"], 1)


def test_cap_is_counted_and_refuses(cache_kind: str) -> None:
    """At max_tracked, a per-tag budget with room still cannot admit: counted as tracking_full."""
    f = _filter({**CAP_50, "max_series": 5, "per_tag": "svc", "max_tracked": 6})
    lines = [b"api.requests:1|c|#svc:%d,id:%d" % (s, i) for s in range(3) for i in range(2)]
    kept = _lines(f.filter(b"\n".join(lines))[0])
    # Budgets are entries too: svc 0 (1 + 2), svc 1 (1 + 2) fill the 6 entries.
    assert kept == lines[:4]
    c = _counts(f)
    assert (c["tracking_full"], c["series_limited"], c["limited"]) == (2, 2, 2)


def test_explain_says_what_a_limit_does() -> None:
    """explain names the limit and what happens beyond it, and shows the admitted line."""
    specs = parse_rules([{"name": "cap", **CAP_50, "per_tag": "service"}])
    decision = RuleEngine(specs).explain(b"api.requests:1|c|#service:a")
    assert decision.output == b"api.requests:1|c|#service:a"
    assert "at most 50 series per service value per 10s window" in decision.reason
    assert "a new series beyond that is dropped" in decision.reason
    tv = parse_rules(
        [{"name": "tv", "match": {"kind": "metric"}, "action": "limit_tag_values",
          "max_values": 3, "tags": ["id"]}]
    )  # fmt: skip
    assert "at most 3 values per tag key ['id']" in RuleEngine(tv).explain(b"a:1|c").reason


# ---------------------------------------------------------------- a reference model
NAMES = st.sampled_from([b"api.a", b"api.b", b"skip.c", b"debug.d"])
LINE = st.one_of(
    st.builds(
        lambda name, value, type_, tags: (
            name + b":" + value + b"|" + type_ + (b"|#" + b",".join(tags) if tags else b"")
        ),
        NAMES,
        st.sampled_from([b"1", b"2.5", b"x"]),  # x: malformed unless a set
        st.sampled_from([b"c", b"g", b"s"]),
        st.lists(st.sampled_from([b"k:1", b"k:2", b"j:1", b"env"]), max_size=3),
    ),
    st.sampled_from([b"_e{1,1}:a|b", b"_sc|x|0", b"junk"]),
)


def _reference(lines: list[bytes], limit: int, admitted: list[Any]) -> list[bytes]:
    """debug. dropped; then at most `limit` api.* series (name, type, tag multiset)."""
    out = []
    for raw in lines:
        if raw.startswith(b"debug."):
            continue
        line = Line(raw)
        if line.kind == KIND_METRIC and raw.startswith(b"api."):
            key = (line.name, line.type, tuple(sorted(line.tags)))
            if key not in admitted:
                if len(admitted) >= limit:
                    continue
                admitted.append(key)
        out.append(raw)
    return out


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 6), st.lists(st.lists(LINE, min_size=1, max_size=12), max_size=6))
def test_filter_agrees_with_a_reference_model(limit: int, chunks: list[list[bytes]]) -> None:
    """Within one window, every chunk's output equals a plain set-based model's, C or not."""
    for native in [True, False] if NATIVE else [False]:
        specs = parse_rules(
            [
                {"name": "d", "match": {"prefix": "debug."}, "action": "drop"},
                {"name": "cap", "match": {"glob": "api.*"}, "action": "limit_series",
                 "max_series": limit},
            ]
        )  # fmt: skip
        line_filter = compile_filter((), 8192, specs, clock=Clock())
        if not native:
            limits = line_filter._limits
            assert limits is not None
            limits.cache = limits.limiters[0]._cache = DictCache(1000)
            limits.fast = False
        admitted: list[Any] = []
        for chunk in chunks:
            expected = _reference(chunk, limit, admitted)
            assert _lines(line_filter.filter(b"\n".join(chunk))[0]) == expected


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"action": "limit_series"}, "limit_series needs max_series"),
        ({"action": "limit_series", "max_series": 0}, "max_series must be an integer from 1"),
        ({"action": "limit_series", "max_series": True}, "max_series must be an integer"),
        ({"action": "limit_series", "max_series": 5, "window": 0}, "window must be between"),
        ({"action": "limit_series", "max_series": 5, "window": "10s"}, "window must be a number"),
        ({"action": "limit_series", "max_series": 5, "per_tag": "a:b"}, "per_tag must be a tag"),
        ({"action": "limit_series", "max_series": 5, "on_limit": "x"}, "on_limit must be one of"),
        (
            {"action": "limit_series", "max_series": 5, "on_limit": "strip_tags"},
            "on_limit = strip_tags needs tags",
        ),
        ({"action": "limit_series", "max_series": 5, "tags": ["a"]}, "tags only applies"),
        ({"action": "limit_series", "max_series": 5, "max_values": 3}, "max_values only applies"),
        (
            {"action": "limit_series", "max_series": 50, "max_tracked": 10},
            "max_tracked (10) must be at least the limit (50)",
        ),
        (
            {"action": "limit_series", "max_series": 5, "max_tracked": 1 << 30},
            "max_tracked must be an integer from 1",
        ),
        ({"action": "limit_tag_values", "tags": ["id"]}, "limit_tag_values needs max_values"),
        ({"action": "limit_tag_values", "max_values": 2}, "action limit_tag_values needs tags"),
        (
            {"action": "limit_tag_values", "max_values": 2, "tags": ["id:1"]},
            "tags are tag keys",
        ),
        (
            {"action": "limit_tag_values", "max_values": 2, "tags": ["id"], "per_tag": "x"},
            "per_tag only applies to limit_series",
        ),
        ({"action": "drop", "max_series": 5}, "max_series only applies to limit_series and"),
        ({"action": "drop", "window": 5}, "window only applies"),
        (
            {"action": "limit_series", "max_series": 5, "match": {"prefix": "api.x:1"}},
            "a limit rule's prefix must end at the metric name",
        ),
    ],
)
def test_bad_limit_config_is_rejected_with_the_rule_name(
    rule: dict[str, Any], message: str
) -> None:
    """Every mistake in a limit rule is refused at load, naming the rule and the problem."""
    with pytest.raises(ValueError, match="rule 'cap-api'") as info:
        parse_rules([{"name": "cap-api", "match": {"prefix": "api."}, **rule}])
    assert message in str(info.value)


def test_limit_defaults_and_identity() -> None:
    """Defaults: 10 s window, drop, max_tracked 100,000 (or the limit); identity ignores match
    and on_limit but not the limit parameters."""
    (spec,) = parse_rules([{"name": "c", **CAP_50}])
    assert (spec.window, spec.on_limit, spec.max_tracked, spec.per_tag) == (
        10.0,
        "drop",
        100_000,
        "",
    )
    (big,) = parse_rules([{"name": "c", **CAP_50, "max_series": 300_000}])
    assert big.max_tracked == 300_000
    (other_match,) = parse_rules(
        [
            {
                "name": "c",
                **CAP_50,
                "match": {"prefix": "x:"},
                "on_limit": "strip_tags",
                "tags": ["a"],
            }
        ]
    )
    assert other_match.limit_identity == spec.limit_identity
    for change in ({"max_series": 51}, {"window": 5}, {"per_tag": "s"}, {"max_tracked": 7_000}):
        (changed,) = parse_rules([{"name": "c", **CAP_50, **change}])
        assert changed.limit_identity != spec.limit_identity
    (drop,) = parse_rules([{"name": "d", "match": {"prefix": "a"}, "action": "drop"}])
    assert drop.limit_identity is None
    assert "max_series=50 window=10s on_limit=drop max_tracked=100000" in spec.describe()


# ---------------------------------------------------------------- the C scan's shortcuts
def _forbid_per_line(monkeypatch: pytest.MonkeyPatch, line_filter: LineFilter) -> None:
    def no_per_line_work(line: Line) -> None:
        raise AssertionError(f"per-line evaluation of {line.raw!r}")

    monkeypatch.setattr(line_filter._engine, "find", no_per_line_work)


@pytest.mark.skipif(not NATIVE, reason="the C accelerator is not built")
def test_refused_series_are_dropped_without_per_line_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under an explosion, lines of series already refused are cut in C, and still counted."""
    f = _filter({**CAP_50, "max_series": 1})
    chunk = b"api.requests:1|c|#id:1\napi.requests:1|c|#id:2\napi.requests:1|c|#id:3"
    f.filter(chunk)
    _counts(f)
    _forbid_per_line(monkeypatch, f)
    kept, _, forwarded, blocked, _ = f.filter(chunk)
    assert (_lines(kept), forwarded, blocked) == ([b"api.requests:1|c|#id:1"], 1, 2)
    assert _counts(f) == {
        "matches": 3,
        "saved": 2,
        "limited": 2,
        "series_limited": 0,  # counted once, when first refused
        "tracking_full": 0,
    }


@pytest.mark.skipif(not NATIVE, reason="the C accelerator is not built")
def test_a_new_window_needs_per_line_work_once_per_series_not_per_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two workers sharing a table: after a window ends, the series one worker decided
    again pass the other's scan by a look at the table, without the per-line path."""
    clock = Clock(1000.0)
    specs = parse_rules([{"name": "cap", **CAP_50, "max_series": 2, "window": 2}])
    table = limits_module.private_table(specs[0])
    workers = [
        compile_filter((), 8192, specs, clock=clock, limit_tables=lambda _s: table) for _ in "ab"
    ]
    chunk = b"\n".join(b"api.requests:1|c|#id:%d" % i for i in range(4))
    for f in workers:
        assert _lines(f.filter(chunk)[0]) == chunk.split(b"\n")[:2]
    clock.now = 1002.5  # the next window: worker a meets the series first
    assert _lines(workers[0].filter(chunk)[0]) == chunk.split(b"\n")[:2]
    _forbid_per_line(monkeypatch, workers[1])
    kept, _, forwarded, blocked, _ = workers[1].filter(chunk)
    assert (_lines(kept), forwarded, blocked) == (chunk.split(b"\n")[:2], 2, 2)


def test_a_full_local_cache_starts_over(cache_kind: str) -> None:
    """Beyond its capacity the local cache is cleared and learns again; decisions hold."""
    f = _filter({**CAP_50, "max_series": 3})
    limits = f._limits
    assert limits is not None
    limits.cache.capacity = 2  # (really sum(max_tracked) + 65,536)
    chunk = b"\n".join(b"api.requests:1|c|#id:%d" % i for i in range(6))
    for _ in range(3):
        assert _lines(f.filter(chunk)[0]) == chunk.split(b"\n")[:3]


def _always(table: limits_module.LimitTable) -> Callable[[Any], limits_module.LimitTable]:
    return lambda _spec: table


@pytest.mark.skipif(not NATIVE, reason="the C accelerator is not built")
@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 12), st.sampled_from([b"", b"svc:a", b"svc:b", b"svc:ccc"])),
        min_size=1,
        max_size=40,
    ),
    st.integers(1, 4),
)
def test_c_and_python_decide_a_new_window_alike(lines: list[tuple[int, bytes]], limit: int) -> None:
    """A new window decided by the C scan (expired entries) leaves the table byte for byte as
    the per-line Python path does: same admissions, budgets, refusals and offenders."""
    specs = parse_rules([{"name": "cap", **CAP_50, "max_series": limit, "per_tag": "svc",
                          "max_tracked": 100, "window": 10}])  # fmt: skip
    raws = [b"api.requests:1|c|#id:%d%s" % (i, b"," + tag if tag else b"") for i, tag in lines]
    chunk = b"\n".join(raws)
    tables = []
    for native in (True, False):
        clock = Clock(1000.0)
        table = limits_module.private_table(specs[0])
        f = compile_filter((), 8192, specs, clock=clock, limit_tables=_always(table))
        f.filter(chunk)  # window 100: learnt per line
        clock.now = 1010.0  # window 101: expired entries
        if not native:
            limits = f._limits
            assert limits is not None
            limits.cache = limits.limiters[0]._cache = DictCache(1000)
            limits.fast = False
        f.filter(chunk)
        tables.append(bytes(table.memory))
    assert tables[0] == tables[1]


def test_judging_a_line_admits_and_counts_nothing(cache_kind: str) -> None:
    """judge (for /top and /tap) shows a limit rule's decision without taking budget."""
    f = _filter({**CAP_50, "max_series": 1, "window": 10})
    first, second = b"api.requests:1|c|#id:1", b"api.requests:1|c|#id:2"
    # Unknown series: shown passing, and judging them takes no budget.
    assert f.judge(second)[0] == "forwarded"
    assert f.judge(first)[0] == "forwarded"
    assert _counts(f)["limited"] == 0
    assert _lines(f.filter(first)[0]) == [first]  # the budget of 1 was still there
    assert _lines(f.filter(second)[0]) == []
    assert _counts(f) == {
        "matches": 2,
        "saved": 1,
        "limited": 1,
        "series_limited": 1,
        "tracking_full": 0,
    }
    # Decided series are shown as decided, still counting nothing.
    assert f.judge(first)[0] == "forwarded"
    assert f.judge(second)[0] == "blocked"
    assert _counts(f)["limited"] == 0
