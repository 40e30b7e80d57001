"""The rules-engine scenario's rule set (issue #4), and an independent check of it.

:func:`benchmark_rules` builds, in evaluation order:

1. ``prefixes`` prefix-drop rules, one prefix each: the first is the workload's
   blocked prefix ``debug.`` (so every line that should be blocked is blocked by
   the first rule), the others the realistic prefixes of
   :func:`workload.big_blocklist` that match none of the passing lines;
2. ``regexes`` regex rules (RE2 syntax, kept to the subset Python's ``re`` reads
   the same way) shaped like real ones, several sharing the first segments of
   real metric names, none matching any name of the workload;
3. ``tags`` tag rules (``strip_tags`` or ``drop``) on tags no line carries,
   some with keys every line has (``env:dev``), so the gate has near misses.

:func:`unexpected_matches` re-implements the three match kinds (plain Python,
not the proxy's matcher) and lists every rule other than the first that would
touch a passing line, or any blocked line the first rule would miss: the
scenario refuses to run with a rule set that would change which lines pass.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from workload import BLOCKED_PREFIX, MEASURES, SERVICES, SUBSYSTEMS, Traffic, big_blocklist

__all__ = ["Rule", "benchmark_rules", "rules_toml", "unexpected_matches"]

# Keys of the tags the generator itself appends to every line (``seq:``, ``t:``,
# ``ck:`` follow the template's tags in the same ``#`` section).
LINE_TAG_KEYS = ("seq", "t", "ck")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# Values of env the workload never uses (it has prod and staging).
ABSENT_ENVS = ("dev", "test", "qa", "canary", "sandbox", "perf", "preview")
# Bound on candidates tried while generating (every one is normally accepted).
MAX_TRIES = 100_000


@dataclass(frozen=True)
class Rule:
    """One ``[[rules]]`` table."""

    name: str
    key: str  # the match key: "prefix", "regex" or "tag"
    value: str
    action: str = "drop"  # "drop" or "strip_tags"
    tags: tuple[str, ...] = ()  # for strip_tags


def _names(traffic: Traffic) -> list[str]:
    """The metric names of the passing templates."""
    return [
        h.split(b":", 1)[0].decode()
        for h, blocked in zip(traffic.heads, traffic.blocked, strict=True)
        if not blocked
    ]


def _line_tags(head: bytes) -> set[str]:
    """Every tag a line built from ``head`` carries (the generator's own included)."""
    section = head.rpartition(b"|#")[2].decode()
    tags = {t for t in section.split(",") if t}
    return tags | {f"{key}:0" for key in LINE_TAG_KEYS}


def _tag_matches(spec: str, tags: set[str]) -> bool:
    # The README's tag condition: exact key:value, any value key:*, or the key present.
    if spec.endswith(":*"):
        key = spec[:-2]
        return any(t.partition(":")[0] == key and ":" in t for t in tags)
    if ":" in spec:
        return spec in tags
    return any(t.partition(":")[0] == spec for t in tags)


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randrange(3, 9)))


def _regex_candidate(i: int, rng: random.Random) -> str:
    shape = i % 4
    if shape == 0:
        return rf"^svc{i:02d}\.tmp[0-9]+$"
    if shape == 1:
        service, subsystem = rng.choice(SERVICES), rng.choice(SUBSYSTEMS)
        return rf"^{service}\.{subsystem}\.tmp_{_word(rng)}[0-9]*$"
    if shape == 2:
        return rf"\.{rng.choice(MEASURES)}_{_word(rng)}$"
    return rf"^(?:{rng.choice(SERVICES)}|{_word(rng)})\.{_word(rng)}\.(?:p99|p999)$"


def _tag_candidate(i: int, rng: random.Random) -> Rule:
    name = f"t{i:02d}"
    if i % 4 == 1:
        env = ABSENT_ENVS[(i // 4) % len(ABSENT_ENVS)]
        return Rule(name, "tag", f"env:{env}{i}", "drop")
    if i % 4 == 3:
        return Rule(name, "tag", f"owner:{_word(rng)}", "drop")
    return Rule(name, "tag", f"team:{_word(rng)}", "strip_tags", ("team",))


def benchmark_rules(prefixes: int, regexes: int, tags: int, seed: int = 4) -> tuple[Rule, ...]:
    """The rule set in evaluation order (see the module docstring)."""
    rng = random.Random(seed)
    passing = Traffic.build(0.0, ())
    names = _names(passing)
    line_tags = [_line_tags(h) for h in passing.heads]
    out = [
        Rule(f"p{i:05d}", "prefix", prefix)
        for i, prefix in enumerate(big_blocklist(max(1, prefixes)))
    ]
    seen: set[str] = set()
    tries = 0
    while len(seen) < regexes and tries < MAX_TRIES:
        tries += 1
        pattern = _regex_candidate(len(seen), rng)
        compiled = re.compile(pattern)
        if pattern not in seen and not any(compiled.search(n) for n in names):
            out.append(Rule(f"r{len(seen):03d}", "regex", pattern))
            seen.add(pattern)
    values: set[str] = set()
    tries = 0
    while len(values) < tags and tries < MAX_TRIES:
        tries += 1
        rule = _tag_candidate(len(values), rng)
        if rule.value not in values and not any(_tag_matches(rule.value, t) for t in line_tags):
            out.append(rule)
            values.add(rule.value)
    if len(seen) < regexes or len(values) < tags:
        raise RuntimeError("could not build the benchmark rule set")
    return tuple(out)


def rules_toml(rules: tuple[Rule, ...]) -> str:
    """The rules as the ``[[rules]]`` tables of a TOML config file."""
    parts = []
    for rule in rules:
        # A JSON string is a valid TOML basic string (same escapes).
        text = (
            f"[[rules]]\nname = {json.dumps(rule.name)}\n"
            f"match = {{ {rule.key} = {json.dumps(rule.value)} }}\n"
            f"action = {json.dumps(rule.action)}\n"
        )
        if rule.tags:
            text += f"tags = {json.dumps(list(rule.tags))}\n"
        parts.append(text)
    return "\n".join(parts)


def unexpected_matches(rules: tuple[Rule, ...], traffic: Traffic) -> list[str]:
    """Why this rule set would change which lines pass (empty: it would not)."""
    problems: list[str] = []
    if not rules or rules[0] != Rule(rules[0].name, "prefix", BLOCKED_PREFIX):
        problems.append(f"the first rule is not a drop of {BLOCKED_PREFIX!r}")
    for head, blocked in zip(traffic.heads, traffic.blocked, strict=True):
        if blocked and not head.startswith(BLOCKED_PREFIX.encode()):
            problems.append(f"blocked head {head[:40]!r} does not start with {BLOCKED_PREFIX!r}")
    names = _names(traffic)
    passing_heads = [h for h, b in zip(traffic.heads, traffic.blocked, strict=True) if not b]
    heads_text = "\n".join(h.decode() for h in passing_heads)
    tags = [_line_tags(h) for h in passing_heads]
    for rule in rules[1:]:
        if rule.key == "prefix":
            hit = heads_text.startswith(rule.value) or ("\n" + rule.value) in heads_text
        elif rule.key == "regex":
            compiled = re.compile(rule.value)
            hit = any(compiled.search(n) for n in names)
        else:
            hit = any(_tag_matches(rule.value, t) for t in tags)
        if hit:
            problems.append(f"rule {rule.name} ({rule.key} {rule.value!r}) matches passing lines")
    return problems
