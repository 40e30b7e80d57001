"""The rule engine's gates never hide a line a rule would match."""

from __future__ import annotations

import re2
from hypothesis import given, settings
from hypothesis import strategies as st

from statsd_filter.rules.compile import compile_filter
from statsd_filter.rules.engine import RuleEngine
from statsd_filter.rules.model import parse_rules
from statsd_filter.rules.regex import RegexSet, name_gate_pattern

_atoms = st.sampled_from(
    ["a", "b", ".", "\\.", "[ab]", "[^.]", "x*", "(a|b)", "$", "^", "[$]", "\\$"]
)
_patterns = st.lists(_atoms, min_size=1, max_size=5).map("".join)
_names = st.text(alphabet="ab.x$", min_size=1, max_size=8)


@settings(max_examples=400, deadline=None)
@given(_patterns, _names, st.sampled_from([b"1|c", b"2|g|#a:b", b"x|s"]))
def test_name_gate_never_misses_a_name_match(pattern: str, name: str, tail: bytes) -> None:
    """If a regex matches a name, its gate form matches the whole line."""
    try:
        direct = re2.search(pattern.encode(), name.encode())
    except re2.error:
        return
    if direct is None:
        return
    try:
        rewritten = name_gate_pattern(pattern)
    except ValueError:
        return  # such a rule is evaluated on every line instead (see RuleEngine.gate)
    gate = RegexSet([rewritten], multiline=True)
    line = b"\nother:1|c\n" + name.encode() + b":" + tail
    assert gate.match(line), (pattern, name)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "ab"]),
            st.sampled_from(["1|c", "2|g|#env:dev", "3|ms|#team:x,env:prod", "4|c|#team"]),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_filter_agrees_with_per_line_decisions(lines: list[tuple[str, str]]) -> None:
    """With gates and indexes, the filter decides every line as the engine does alone."""
    rules = parse_rules(
        [
            {"name": "re", "match": {"regex": "^a$"}, "action": "drop"},
            {"name": "tag", "match": {"tag": "team:*"}, "action": "strip_tags", "tags": ["team"]},
            {"name": "bare", "match": {"tag": "team"}, "action": "drop"},
            {"name": "type", "match": {"type": "g"}, "action": "add_tags", "tags": ["seen"]},
        ]
    )
    raw = [f"{n}:{rest}".encode() for n, rest in lines]
    chunk = b"\n".join(raw)
    engine = RuleEngine(rules)
    expected = [out for out in (engine.explain(r).output for r in raw) if out is not None]
    kept = compile_filter((), 8192, rules).filter(chunk)[0]
    assert kept == (b"\n" + b"\n".join(expected) if expected else b"")


def test_ungateable_regex_makes_every_line_a_candidate() -> None:
    """A regex the gate cannot promise to catch (text after $) disables the gate."""
    engine = RuleEngine(parse_rules([{"name": "r", "match": {"regex": "a$b"}, "action": "drop"}]))
    assert engine.gate() is True
    assert (
        RuleEngine(parse_rules([{"name": "r", "match": {"regex": "a$$"}, "action": "drop"}])).gate()
        == []
    )
