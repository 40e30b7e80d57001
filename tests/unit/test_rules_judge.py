"""Unit tests for LineFilter.judge: one line's verdict and deciding rule, as filter() decides."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statsd_filter.rules.compile import compile_filter
from statsd_filter.rules.filter import BLOCKED, DROPPED, FORWARDED, RULE_FIELDS, LineFilter
from statsd_filter.rules.model import parse_rules
from statsd_filter.rules.multiprefix import AVAILABLE as HYPERSCAN
from statsd_filter.rules.multiprefix import MIN_PREFIXES

RULES = parse_rules(
    [
        {"name": "drop-tmp", "match": {"prefix": "tmp."}, "action": "drop"},
        {"name": "drop-old", "match": {"name": ["old.a", "old.b"]}, "action": "drop"},
        {"name": "dev", "match": {"tag": "env:dev"}, "action": "drop"},
        {
            "name": "strip-host",
            "match": {"glob": "api.**", "tag": "host"},
            "action": "strip_tags",
            "tags": ["host"],
        },
        {"name": "ok", "match": {"prefix": "keep."}, "action": "allow"},
    ]
)
ROWS = {"blocklist": 0, "drop-tmp": 1, "drop-old": 2, "dev": 3, "strip-host": 4, "ok": 5}
ROWS_ALLOW = {**ROWS, "allowlist_default": 6}


def build(allowlist_mode: bool = False, blocklist: tuple[str, ...] = ("debug.",)) -> LineFilter:
    rows = ROWS_ALLOW if allowlist_mode else ROWS
    return compile_filter(
        blocklist, 64, RULES, allowlist_mode=allowlist_mode, row_of=rows.__getitem__
    )


@pytest.mark.parametrize(
    ("line", "verdict", "rule", "output"),
    [
        (b"api.x:1|c", FORWARDED, None, b"api.x:1|c"),
        (b"debug.x:1|c", BLOCKED, "blocklist", None),
        (b"tmp.y:1|g", BLOCKED, "drop-tmp", None),
        (b"old.b:1|c", BLOCKED, "drop-old", None),
        (b"old.c:1|c", FORWARDED, None, b"old.c:1|c"),
        (b"web.z:1|c|#env:dev", BLOCKED, "dev", None),
        (b"api.q:1|c|#host:a,env:prod", FORWARDED, "strip-host", b"api.q:1|c|#env:prod"),
        (b"keep.k:1|c", FORWARDED, "ok", b"keep.k:1|c"),
        (b"x" * 65, DROPPED, None, None),
    ],
)
def test_judge_names_verdict_rule_and_output(
    line: bytes, verdict: str, rule: str | None, output: bytes | None
) -> None:
    """Each kind of outcome: verdict, the deciding rule's row, the line as forwarded."""
    names = {row: name for name, row in ROWS.items()}
    got_verdict, row, got_output = build().judge(line)
    assert (got_verdict, names.get(row), got_output) == (verdict, rule, output)


def test_allowlist_default_blocks_what_no_allow_rule_matches() -> None:
    """In allowlist mode a line no rule decides is blocked by the allowlist default row."""
    line_filter = build(allowlist_mode=True)
    assert line_filter.judge(b"web.z:1|c") == (BLOCKED, ROWS_ALLOW["allowlist_default"], None)
    assert line_filter.judge(b"keep.k:1|c") == (FORWARDED, ROWS["ok"], b"keep.k:1|c")


def test_judge_counts_nothing() -> None:
    """Judging lines leaves every per-rule counter untouched."""
    line_filter = build()
    for line in (b"debug.x:1|c", b"tmp.y:1|c", b"web.z:1|c|#env:dev"):
        line_filter.judge(line)
    assert line_filter.counters.drain() == []


def test_no_rules_forwards_everything() -> None:
    """Without any rule, every line under the limit is forwarded unchanged."""
    line_filter = compile_filter((), 64)
    assert line_filter.judge(b"a:1|c") == (FORWARDED, -1, b"a:1|c")


_names = st.sampled_from(
    ["api.x", "api.v1.y", "debug.z", "tmp.a", "old.a", "old.b", "keep.k", "web.w", "_e{1,1}"]
)
_tags = st.sampled_from(["", "|#env:dev", "|#host:h1", "|#host:h1,env:prod", "|#env:prod"])
_lines = st.builds(lambda n, t, v: f"{n}:{v}|c{t}".encode(), _names, _tags, st.integers(0, 9))


@settings(max_examples=300, deadline=None)
@given(st.lists(_lines, min_size=1, max_size=20), st.booleans())
def test_judge_agrees_with_filter(lines: list[bytes], allowlist_mode: bool) -> None:
    """Line by line, judge() keeps exactly what filter() keeps, rewritten the same way."""
    line_filter = build(allowlist_mode)
    kept = line_filter.filter(b"\n".join(lines))[0]
    judged = [out for verdict, _, out in map(line_filter.judge, lines) if verdict == FORWARDED]
    assert kept == (b"\n" + b"\n".join(judged) if judged else b"")  # type: ignore[arg-type]


def test_leading_drop_rules_credit_the_row_filter_credits() -> None:
    """Several leading drop rules: judge names the rule whose counter filter() bumps."""
    rules = parse_rules(
        [
            {"name": "a", "match": {"prefix": ["x.", "y."]}, "action": "drop"},
            {"name": "b", "match": {"prefix": ["z."]}, "action": "drop"},
        ]
    )
    rows = {"a": 0, "b": 1}
    line_filter = compile_filter((), 100, rules, row_of=rows.__getitem__)
    for line, row in ((b"y.1:1|c", 0), (b"z.1:1|c", 1)):
        assert line_filter.judge(line) == (BLOCKED, row, None)
        line_filter.filter(line)
        assert line_filter.counters.drain()[0][0] == row * RULE_FIELDS


@pytest.mark.skipif(not HYPERSCAN, reason="hyperscan is not installed here")
def test_large_prefix_sets_are_judged_through_hyperscan() -> None:
    """With Hyperscan serving a large blocklist, judge credits the earliest-listed rule."""
    rng = random.Random(7)
    prefixes = [f"p{rng.randrange(10**9)}." for _ in range(MIN_PREFIXES * 2)]
    rules = parse_rules(
        [
            {"name": "first", "match": {"prefix": prefixes[:10]}, "action": "drop"},
            {"name": "rest", "match": {"prefix": prefixes}, "action": "drop"},
        ]
    )
    rows = {"first": 0, "rest": 1}
    line_filter = compile_filter((), 100, rules, row_of=rows.__getitem__)
    assert line_filter.judge(prefixes[3].encode() + b"x:1|c") == (BLOCKED, 0, None)
    assert line_filter.judge(prefixes[-1].encode() + b"x:1|c") == (BLOCKED, 1, None)
    assert line_filter.judge(b"other:1|c") == (FORWARDED, -1, b"other:1|c")
