"""Build the line filter from settings; all compile work happens here, at config load.

The rule list in evaluation order is: the ``blocklist`` setting as one
prefix-drop rule named ``blocklist``, then the ``[[rules]]`` of the config
file. The longest leading run of plain prefix/name drop rules is compiled into
the filter's whole-chunk drop stage; everything after it goes to the rule
engine, behind the gate.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from statsd_filter.rules.engine import ALLOWLIST_DEFAULT, RuleEngine
from statsd_filter.rules.filter import LineFilter
from statsd_filter.rules.limits import LimitTable
from statsd_filter.rules.model import MatchSpec, RuleSpec, all_rules
from statsd_filter.rules.prefix import PrefixSet

__all__ = ["RuleRows", "compile_filter", "counter_row_names"]


def counter_row_names(specs: tuple[RuleSpec, ...], allowlist_mode: bool) -> list[str]:
    """The names that need a row of per-rule counters: each rule, and the allowlist default."""
    names = [s.name for s in specs]
    if allowlist_mode:
        names.append(ALLOWLIST_DEFAULT)
    return names


class RuleRows:
    """Stable counter rows per rule name, so counts survive reloads that reorder rules."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.rows: dict[str, int] = {}

    def row(self, name: str) -> int:
        """The row of ``name``, allocating one on first sight (the last row overflows)."""
        if name not in self.rows:
            self.rows[name] = min(len(self.rows), self.capacity - 1)
        return self.rows[name]


def _is_plain_drop(spec: RuleSpec) -> bool:
    m = spec.match
    only_prefix = m.prefix and m == MatchSpec(prefix=m.prefix)
    only_name = m.name and m == MatchSpec(name=m.name)
    return spec.action == "drop" and bool(only_prefix or only_name)


def compile_filter(
    blocklist: tuple[str, ...],
    max_line_bytes: int,
    rules: tuple[RuleSpec, ...] = (),
    *,
    allowlist_mode: bool = False,
    row_of: Callable[[str], int] | None = None,
    rng: random.Random | None = None,
    limit_tables: Callable[[RuleSpec], LimitTable] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> LineFilter:
    """Compile the blocklist and rules into a :class:`LineFilter`.

    ``row_of`` maps a rule name to its row of per-rule counters (the
    supervisor's :class:`RuleRows`); without it rows are numbered locally.
    ``limit_tables`` gives each limit rule its shared table (private ones
    without it); ``clock`` is what their windows are measured on.
    """
    specs = all_rules(blocklist, rules)
    if row_of is None:
        local = {name: i for i, name in enumerate(counter_row_names(specs, allowlist_mode))}
        row_of = local.__getitem__
        rows = max(1, len(local))
    else:
        rows = 0  # computed below from the rows handed out
    leading: list[tuple[PrefixSet, int]] = []
    rest_start = 0
    for spec in specs:
        if not _is_plain_drop(spec):
            break
        keys = [p.encode() for p in spec.match.prefix] or [
            n.encode() + b":" for n in spec.match.name
        ]
        leading.append((PrefixSet(keys), row_of(spec.name)))
        rest_start += 1
    rest = specs[rest_start:]
    engine = RuleEngine(
        rest,
        allowlist_mode=allowlist_mode,
        row_of=row_of,
        rng=rng,
        limit_tables=limit_tables,
        clock=clock,
    )
    if rows == 0:
        used = [row for _, row in leading] + [r.row for r in engine.rules] + [engine.default_row]
        rows = max(used) + 1
    return LineFilter(leading, engine, max_line_bytes, rows)
