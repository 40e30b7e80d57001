"""Rules as configured: the ``[[rules]]`` tables of the TOML file, validated.

::

    [[rules]]
    name = "drop-debug"
    match = { prefix = "debug." }   # also name, glob, regex, tag, type, kind
    action = "drop"                 # also allow, strip_tags, add_tags, rename, sample,
                                    # aggregate, limit_series, limit_tag_values

Every condition in ``match`` takes a string or a list of strings (any of them
may match); all conditions of a rule must hold. Validation happens here, once,
at config load: a bad rule is reported with its name and the reason, and the
hot path never meets an invalid rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from statsd_filter.rules.glob import validate_glob
from statsd_filter.rules.regex import regex_error

__all__ = [
    "ACTIONS",
    "LIMIT_ACTIONS",
    "MATCH_KEYS",
    "MatchSpec",
    "RuleSpec",
    "all_rules",
    "blocklist_rule",
    "parse_rules",
]

LIMIT_ACTIONS = ("limit_series", "limit_tag_values")
ACTIONS = (
    "drop",
    "allow",
    "strip_tags",
    "add_tags",
    "rename",
    "sample",
    "aggregate",
    *LIMIT_ACTIONS,
)
MATCH_KEYS = ("prefix", "name", "glob", "regex", "tag", "type", "kind")
TYPES = ("c", "g", "ms", "h", "s", "d")
KINDS = ("metric", "event", "service_check", "malformed")
LIMIT_KEYS = ("max_series", "max_values", "window", "per_tag", "on_limit", "max_tracked")
RULE_KEYS = ("name", "match", "action", "tags", "from", "to", "keep_one_in", *LIMIT_KEYS)
BLOCKLIST_RULE = "blocklist"
# Limit rules: StatsD servers flush every 10 s by default, so a window of 10 s
# bounds the series one flush can hold.
DEFAULT_WINDOW = 10.0
MIN_WINDOW, MAX_WINDOW = 0.1, 86400.0
# Tracked series per rule unless max_tracked says otherwise (about 6 MiB of
# shared memory, see rules/limittable.py), and the most a rule may track.
DEFAULT_TRACKED = 100_000
MAX_TRACKED = 1 << 24
ON_LIMIT = ("drop", "strip_tags")


@dataclass(frozen=True)
class MatchSpec:
    """Conditions of one rule; each tuple is any-of, all non-empty tuples must hold."""

    prefix: tuple[str, ...] = ()
    name: tuple[str, ...] = ()
    glob: tuple[str, ...] = ()
    regex: tuple[str, ...] = ()
    tag: tuple[str, ...] = ()
    type: tuple[str, ...] = ()
    kind: tuple[str, ...] = ()

    def describe(self) -> str:
        parts = []
        for key in MATCH_KEYS:
            values: tuple[str, ...] = getattr(self, key)
            if values:
                shown = values[0] if len(values) == 1 else list(values)
                if len(values) > 5:
                    shown = f"{len(values)} values: {list(values[:3])}..."
                parts.append(f"{key}={shown!r}" if isinstance(shown, str) else f"{key}={shown}")
        return ", ".join(parts)


@dataclass(frozen=True)
class RuleSpec:
    """One validated rule."""

    name: str
    match: MatchSpec
    action: str
    tags: tuple[str, ...] = ()
    rename_from: str = ""
    rename_to: str = ""
    keep_one_in: int = 1
    # limit_series / limit_tag_values
    max_series: int = 0
    max_values: int = 0
    window: float = DEFAULT_WINDOW
    per_tag: str = ""
    on_limit: str = "drop"
    max_tracked: int = 0
    origin: str = field(default="config", compare=False)

    @property
    def limit_identity(self) -> tuple[object, ...] | None:
        """What a limit rule's state depends on (None for other rules).

        A reload keeps the state of a rule whose name and identity are
        unchanged; what it does to a line over the limit, and its match, may
        change without losing what it admitted.
        """
        if self.action not in LIMIT_ACTIONS:
            return None
        scope = self.tags if self.action == "limit_tag_values" else ()
        return (
            self.action,
            self.max_series,
            self.max_values,
            self.window,
            self.per_tag,
            scope,
            self.max_tracked,
        )

    def describe(self) -> str:
        detail = ""
        if self.action == "limit_series":
            detail = f" max_series={self.max_series} window={self.window:g}s"
            if self.per_tag:
                detail += f" per_tag={self.per_tag!r}"
            detail += f" on_limit={self.on_limit}"
            if self.on_limit == "strip_tags":
                detail += f" tags={list(self.tags)}"
            detail += f" max_tracked={self.max_tracked}"
        elif self.action == "limit_tag_values":
            detail = (
                f" max_values={self.max_values} tags={list(self.tags)} window={self.window:g}s"
                f" max_tracked={self.max_tracked}"
            )
        elif self.action in ("strip_tags", "add_tags"):
            detail = f" tags={list(self.tags)}"
        elif self.action == "rename":
            detail = f" {self.rename_from!r} -> {self.rename_to!r}"
        elif self.action == "sample":
            detail = f" keep_one_in={self.keep_one_in}"
        return f"{self.name}: match {self.match.describe()} -> {self.action}{detail}"


def blocklist_rule(prefixes: tuple[str, ...]) -> RuleSpec:
    """The ``blocklist`` setting as a prefix-drop rule (placed before all others)."""
    return RuleSpec(BLOCKLIST_RULE, MatchSpec(prefix=prefixes), "drop", origin="blocklist")


def all_rules(blocklist: tuple[str, ...], rules: tuple[RuleSpec, ...]) -> tuple[RuleSpec, ...]:
    """The complete rule list in evaluation order: the blocklist rule first."""
    head = (blocklist_rule(blocklist),) if blocklist else ()
    return head + tuple(rules)


def _strings(rule: str, key: str, value: object) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError(f"rule {rule!r}: {key} must be a string or a non-empty list of strings")
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValueError(f"rule {rule!r}: {key} must contain non-empty strings, got {item!r}")
        if "\n" in item or "\r" in item:
            raise ValueError(f"rule {rule!r}: {key} {item!r} contains a line break")
    return tuple(dict.fromkeys(items))


def _parse_match(rule: str, raw: object) -> MatchSpec:
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"rule {rule!r}: match must be a table with at least one condition")
    values: dict[str, tuple[str, ...]] = {}
    for key, value in raw.items():
        if key not in MATCH_KEYS:
            raise ValueError(
                f"rule {rule!r}: unknown match key {key!r} (known: {', '.join(MATCH_KEYS)})"
            )
        values[key] = _strings(rule, f"match.{key}", value)
    for glob in values.get("glob", ()):
        problem = validate_glob(glob)
        if problem:
            raise ValueError(f"rule {rule!r}: {problem}")
    for pattern in values.get("regex", ()):
        problem = regex_error(pattern)
        if problem:
            raise ValueError(f"rule {rule!r}: {problem}")
    for tag in values.get("tag", ()):
        if any(c in tag for c in ",|#") or tag.startswith(":"):
            raise ValueError(f"rule {rule!r}: tag {tag!r} is not key, key:value or key:*")
    for kind_key, allowed in (("type", TYPES), ("kind", KINDS)):
        for item in values.get(kind_key, ()):
            if item not in allowed:
                raise ValueError(
                    f"rule {rule!r}: {kind_key} {item!r} is not one of {', '.join(allowed)}"
                )
    for name in values.get("name", ()):
        if ":" in name or "|" in name:
            raise ValueError(f"rule {rule!r}: name {name!r} can never match (contains ':' or '|')")
    return MatchSpec(**values)


def _parse_rule(index: int, raw: object, seen: set[str]) -> RuleSpec:
    if not isinstance(raw, dict):
        raise ValueError(f"rule #{index + 1}: must be a table ([[rules]])")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"rule #{index + 1}: needs a name (a non-empty string)")
    if name in seen or name == BLOCKLIST_RULE:
        raise ValueError(f"rule {name!r}: the name is used twice (or is reserved)")
    for key in raw:
        if key not in RULE_KEYS:
            raise ValueError(f"rule {name!r}: unknown key {key!r} (known: {', '.join(RULE_KEYS)})")
    if "match" not in raw:
        raise ValueError(f"rule {name!r}: needs a match table")
    match = _parse_match(name, raw["match"])
    action = raw.get("action")
    if action not in ACTIONS:
        raise ValueError(f"rule {name!r}: unknown action {action!r} (known: {', '.join(ACTIONS)})")
    assert isinstance(action, str)

    tags: tuple[str, ...] = ()
    wants_tags = action in ("strip_tags", "add_tags", "limit_tag_values") or (
        action == "limit_series" and raw.get("on_limit") == "strip_tags"
    )
    if wants_tags:
        if "tags" not in raw:
            needs = "on_limit = strip_tags" if action == "limit_series" else f"action {action}"
            raise ValueError(f"rule {name!r}: {needs} needs tags = [...]")
        tags = _strings(name, "tags", raw["tags"])
        for tag in tags:
            if any(c in tag for c in ",|#"):
                raise ValueError(f"rule {name!r}: tag {tag!r} cannot contain ',', '|' or '#'")
    elif "tags" in raw:
        raise ValueError(
            f"rule {name!r}: tags only applies to strip_tags, add_tags, limit_tag_values "
            "and limit_series with on_limit = strip_tags"
        )

    rename_from = rename_to = ""
    if action == "rename":
        to = raw.get("to")
        if not isinstance(to, str) or not to or any(c in to for c in ":|\n"):
            raise ValueError(
                f"rule {name!r}: rename needs to = a non-empty prefix without ':' or '|'"
            )
        source = raw.get("from")
        if source is None:
            if len(match.prefix) != 1:
                raise ValueError(
                    f'rule {name!r}: rename needs from = "prefix" (or exactly one match.prefix)'
                )
            source = match.prefix[0]
        if not isinstance(source, str) or not source:
            raise ValueError(f"rule {name!r}: from must be a non-empty string")
        rename_from, rename_to = source, to
    elif "from" in raw or "to" in raw:
        raise ValueError(f"rule {name!r}: from/to only apply to rename")

    keep_one_in = 1
    if action == "sample":
        value = raw.get("keep_one_in")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"rule {name!r}: sample needs keep_one_in = an integer >= 1")
        keep_one_in = value
    elif "keep_one_in" in raw:
        raise ValueError(f"rule {name!r}: keep_one_in only applies to sample")

    limits: dict[str, Any] = {}
    if action in LIMIT_ACTIONS:
        limits = _parse_limit(name, action, raw, match, tags)
    else:
        for key in LIMIT_KEYS:
            if key in raw:
                raise ValueError(
                    f"rule {name!r}: {key} only applies to limit_series and limit_tag_values"
                )

    seen.add(name)
    return RuleSpec(name, match, action, tags, rename_from, rename_to, keep_one_in, **limits)


def _count(rule: str, key: str, value: object, high: int = MAX_TRACKED) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ValueError(f"rule {rule!r}: {key} must be an integer from 1 to {high}, got {value!r}")
    return value


def _parse_limit(
    name: str, action: str, raw: dict[str, object], match: MatchSpec, tags: tuple[str, ...]
) -> dict[str, Any]:
    """The limit keys of a limit_series / limit_tag_values rule, validated."""
    for prefix in match.prefix:
        # A limit's decision must depend only on the series (name, type, tags),
        # never on a value: a prefix may reach the ":" after the name, no further.
        if "|" in prefix or ":" in prefix[:-1]:
            raise ValueError(
                f"rule {name!r}: a limit rule's prefix must end at the metric name "
                f"(at most a final ':'), got {prefix!r}"
            )
    window = raw.get("window", DEFAULT_WINDOW)
    if isinstance(window, bool) or not isinstance(window, int | float):
        raise ValueError(f"rule {name!r}: window must be a number of seconds, got {window!r}")
    if not MIN_WINDOW <= window <= MAX_WINDOW:
        raise ValueError(
            f"rule {name!r}: window must be between {MIN_WINDOW:g} and {MAX_WINDOW:g} seconds, "
            f"got {window!r}"
        )
    out: dict[str, Any] = {"window": float(window)}
    if action == "limit_series":
        if "max_series" not in raw:
            raise ValueError(f"rule {name!r}: limit_series needs max_series = N")
        limit = out["max_series"] = _count(name, "max_series", raw["max_series"])
        if "max_values" in raw:
            raise ValueError(f"rule {name!r}: max_values only applies to limit_tag_values")
        per_tag = raw.get("per_tag", "")
        if "per_tag" in raw and (
            not isinstance(per_tag, str) or not per_tag or any(c in per_tag for c in ":,|#\n\r")
        ):
            raise ValueError(
                f"rule {name!r}: per_tag must be a tag key (no ':', ',', '|' or '#'), "
                f"got {per_tag!r}"
            )
        out["per_tag"] = per_tag
        on_limit = raw.get("on_limit", "drop")
        if on_limit not in ON_LIMIT:
            raise ValueError(
                f"rule {name!r}: on_limit must be one of {', '.join(ON_LIMIT)}, got {on_limit!r}"
            )
        out["on_limit"] = on_limit
    else:
        if "max_values" not in raw:
            raise ValueError(f"rule {name!r}: limit_tag_values needs max_values = N")
        limit = out["max_values"] = _count(name, "max_values", raw["max_values"])
        for key in ("max_series", "per_tag", "on_limit"):
            if key in raw:
                raise ValueError(f"rule {name!r}: {key} only applies to limit_series")
        for tag in tags:
            if ":" in tag or (tag.startswith("*") and tag != "*"):
                raise ValueError(
                    f'rule {name!r}: limit_tag_values tags are tag keys or "*", got {tag!r}'
                )
    tracked = raw.get("max_tracked", max(DEFAULT_TRACKED, limit))
    out["max_tracked"] = _count(name, "max_tracked", tracked)
    if out["max_tracked"] < limit:
        raise ValueError(
            f"rule {name!r}: max_tracked ({tracked}) must be at least the limit ({limit})"
        )
    return out


def parse_rules(raw: object) -> tuple[RuleSpec, ...]:
    """Validate the ``rules`` array of the TOML file; raises ValueError naming the rule."""
    if not isinstance(raw, list):
        raise ValueError("rules must be an array of tables ([[rules]])")
    seen: set[str] = set()
    return tuple(_parse_rule(i, item, seen) for i, item in enumerate(raw))
