"""The per-chunk filter: the hot path shared by UDP datagrams and TCP chunks.

A *chunk* is one or more lines joined by ``\\n`` (a UDP datagram, or the
complete lines of one TCP read). :meth:`LineFilter.filter` returns the lines to
forward as one bytes object that *starts* with ``\\n`` and has no trailing
newline, so the batcher can concatenate chunks and strip one byte per
upstream datagram.

Three stages, each skipped when it has nothing to do:

1. **Shape** — a few C-level scans confirm the chunk holds no ``\\r``, no empty
   line and no line over the limit (nearly all traffic). Otherwise a per-line
   pass normalises it and counts oversize lines.
2. **Leading drop rules** — the blocklist and the prefix/name drop rules that
   come before any other rule are one trie regex; one ``subn`` (or ``split``,
   when per-rule counts need the removed lines) deletes every line they block,
   for the whole chunk, in C.
3. **Other rules** — a gate (one regex search over the chunk, plus one RE2 set
   search over its names when there are regex rules) tells whether any later
   rule could match any line. Only if so are the chunk's lines evaluated one
   by one, in rule order, by the :class:`~statsd_filter.rules.engine.RuleEngine`.

   With limit rules, a chunk no *other* rule can match (the same gate, without
   the limit rules) goes to the limits' whole-chunk scan instead: lines whose
   series the worker already knows to pass in this window are kept in C, and
   only the others are evaluated one by one (see ``limits.py``).

:meth:`LineFilter.judge` answers, for one line and without counting it, what
those stages decide and which rule decided: the sampled lines of ``/top`` and
``/tap`` are judged by the very structures that filter the traffic.

Past 400 lines on purpose: :meth:`LineFilter.filter`, ``_apply_rules`` and
:meth:`LineFilter.judge` read the same compiled state and must decide alike
(a test holds ``judge`` to the data path); one class keeps the hot path and
its one-line twin side by side.
"""

from __future__ import annotations

import re

from statsd_filter.fastio import Trie
from statsd_filter.protocol.lines import NL, split_lines
from statsd_filter.protocol.metric import KIND_METRIC, Line
from statsd_filter.rules.engine import RuleEngine
from statsd_filter.rules.limits import LIMITED, SERIES_LIMITED, TRACKING_FULL, Limits
from statsd_filter.rules.multiprefix import AVAILABLE, MIN_PREFIXES, HyperscanPrefixes
from statsd_filter.rules.prefix import PrefixSet

__all__ = [
    "BLOCKED",
    "DROPPED",
    "FORWARDED",
    "RULE_COUNTER_NAMES",
    "RULE_FIELDS",
    "FilterResult",
    "LineFilter",
    "RuleCounters",
    "Verdict",
]

# (kept, received, forwarded, blocked, oversize): ``kept`` is b"" or b"\n" + the
# forwarded lines joined by b"\n"; ``received`` counts non-empty lines, ``blocked``
# those the rules removed, ``oversize`` those over max_line_bytes. A plain tuple,
# not a NamedTuple: building one per datagram is measurably cheaper.
FilterResult = tuple[bytes, int, int, int, int]
_BLANK_LINES = re.compile(b"\n\n+")

# The per-rule counters: one row of RULE_FIELDS values per rule, in this order.
# The shared-memory layout (statsd_filter.stats) uses the same rows.
# The last three are only ever non-zero for limit rules.
RULE_COUNTER_NAMES = (
    "matches",
    "lines_saved",
    "bytes_saved",
    "limited",
    "series_limited",
    "tracking_full",
)
RULE_FIELDS = len(RULE_COUNTER_NAMES)
LINES_SAVED, BYTES_SAVED = 1, 2
assert RULE_COUNTER_NAMES[LIMITED] == "limited"
assert RULE_COUNTER_NAMES[SERIES_LIMITED] == "series_limited"
assert RULE_COUNTER_NAMES[TRACKING_FULL] == "tracking_full"

# What became of a line: forwarded (maybe rewritten), blocked by a rule (or
# sampled away, or no allow rule in allowlist mode), or dropped before the
# rules (longer than max_line_bytes).
FORWARDED, BLOCKED, DROPPED = "forwarded", "blocked", "dropped"
# (verdict, counter row of the deciding rule or -1, the line as forwarded or None)
Verdict = tuple[str, int, bytes | None]


class RuleCounters:
    """Local per-rule counters (matches, lines saved, bytes saved), published in batches."""

    __slots__ = ("values",)

    def __init__(self, rows: int) -> None:
        self.values = [0] * (rows * RULE_FIELDS)

    def add(self, row: int, lines_saved: int, bytes_saved: int, matches: int = 1) -> None:
        base = row * RULE_FIELDS
        v = self.values
        v[base] += matches
        v[base + LINES_SAVED] += lines_saved
        if bytes_saved > 0:
            v[base + BYTES_SAVED] += bytes_saved

    def add_field(self, row: int, field: int, delta: int) -> None:
        self.values[row * RULE_FIELDS + field] += delta

    def drain(self) -> list[tuple[int, int]]:
        """(index, delta) for every non-zero counter, resetting them."""
        v = self.values
        out = [(i, x) for i, x in enumerate(v) if x]
        for i, _ in out:
            v[i] = 0
        return out


class LineFilter:
    """Decides keep/drop/rewrite for every line of a chunk."""

    __slots__ = (
        "_drop_hs",
        "_drop_judge",
        "_drop_owner",
        "_drop_remove",
        "_drop_row",
        "_drop_search",
        "_drop_split",
        "_engine",
        "_gate",
        "_limits",
        "_long_line",
        "_max",
        "_name_gate",
        "_other_gate",
        "_other_name_gate",
        "_trie",
        "counters",
        "leading_prefixes",
    )

    def __init__(
        self,
        leading: list[tuple[PrefixSet, int]],
        engine: RuleEngine | None,
        max_line_bytes: int,
        rows: int,
    ) -> None:
        """``leading``: the leading drop rules as (prefixes, counter row), in order."""
        self._max = max_line_bytes
        # A line over the limit, found in O(n): the literal \n lets the engine jump
        # from line start to line start.
        self._long_line = re.compile(b"\n[^\n]{%d}" % (max_line_bytes + 1)).search
        self.counters = RuleCounters(rows)
        self._engine = (
            engine if engine is not None and (engine.rules or engine.allowlist_mode) else None
        )
        gate = engine.gate() if self._engine is not None and engine is not None else None
        self._gate: list[re.Pattern[bytes]] | bool | None = gate
        name_gate = engine.name_gate() if self._engine is not None and engine is not None else None
        self._name_gate = name_gate
        # Limit rules: the gate of the other rules decides when the scan may run.
        self._limits: Limits | None = None
        self._other_gate: list[re.Pattern[bytes]] | bool | None = None
        self._other_name_gate = None
        if self._engine is not None and self._engine.limits is not None:
            self._limits = self._engine.limits
            self._other_gate = self._engine.gate(exclude_limits=True)
            self._other_name_gate = self._engine.name_gate(exclude_limits=True)

        self._drop_remove = None
        self._drop_split = None
        self._drop_search = None
        self._drop_hs: HyperscanPrefixes | None = None
        self._drop_owner: dict[bytes, int] = {}
        self._drop_row = -1
        self._trie: Trie | None = None
        # Every leading drop prefix with the counter row of the earliest rule
        # listing it, in listing order: what the C fast path matches.
        owners: dict[bytes, int] = {}
        for prefixes, row in leading:
            for key in prefixes.prefixes:
                owners.setdefault(key, row)
        self.leading_prefixes: tuple[tuple[bytes, int], ...] = tuple(owners.items())
        # judge(): the leading drop rules as one prefix set (patterns compiled on first use).
        self._drop_judge: PrefixSet | None = None
        if len(leading) == 1:
            prefixes, row = leading[0]
            self._drop_remove = prefixes.remove_pattern.subn
            self._drop_row = row
            self._drop_judge = prefixes
        if leading and (len(leading) > 1 or len(leading[0][0].prefixes) >= MIN_PREFIXES):
            keys: list[bytes] = []
            for prefixes, row in leading:
                for key in prefixes.prefixes:
                    # The earliest rule owns a key listed by several rules.
                    if key not in self._drop_owner:
                        self._drop_owner[key] = row
                        keys.append(key)
            if AVAILABLE and len(keys) >= MIN_PREFIXES:
                # Many prefixes: one Hyperscan pass, flat in the number of prefixes.
                self._drop_hs = HyperscanPrefixes(keys, [self._drop_owner[k] for k in keys])
                self._drop_remove = None
            elif len(leading) > 1:
                combined = PrefixSet(keys)
                self._drop_search = combined.remove_pattern.search
                self._drop_split = combined.split_pattern.split
                self._drop_remove = None
                self._drop_judge = combined

    @property
    def leading_only(self) -> bool:
        """Whether the leading drop rules are all there is (the C fast path's case)."""
        return self._engine is None

    def prefix_trie(self) -> Trie | None:
        """The leading drop prefixes compiled for the C fast path (built on first use)."""
        if self._trie is None and self.leading_prefixes:
            self._trie = Trie([key for key, _ in self.leading_prefixes])
        return self._trie

    def apply_rules(self, buf: bytes) -> tuple[bytes, int]:
        """The rules after the leading drops, over ``buf`` (``b"\n"`` + lines, as the
        leading stage left it): what passes, and how many lines they removed."""
        if self._engine is None or not buf:
            return buf, 0
        return self._apply_rules(buf)

    def filter(self, chunk: bytes, longest: int | None = None) -> FilterResult:
        """Filter one chunk; see the module docstring for the shape of ``kept``.

        ``longest``, if given, bounds the length of any line in the chunk (the
        UDP listener passes its longest datagram), which spares a scan.
        """
        if chunk[-1:] == NL:
            chunk = chunk[:-1]
        if not chunk:
            return (b"", 0, 0, 0, 0)
        buf = NL + chunk
        oversize = 0
        if longest is None:
            longest = len(chunk)
        if b"\r" in chunk or (longest > self._max and self._long_line(buf) is not None):
            buf, received, oversize = self._normalise(chunk)
        else:
            # (a regex finds b"\n\n" about 3x faster than bytes.__contains__ here)
            if _BLANK_LINES.search(buf) is not None or chunk[-1:] == NL:
                # Blank lines (empty datagrams, trailing newlines joined in): squeeze.
                buf = _BLANK_LINES.sub(b"\n", buf).rstrip(NL)
                if not buf:
                    return (b"", 0, 0, 0, 0)
            received = buf.count(NL)

        blocked = 0
        if self._drop_hs is not None:
            buf, blocked = self._drop_hs.remove(buf, self.counters.add)
        elif self._drop_remove is not None:
            kept, blocked = self._drop_remove(b"", buf)
            if blocked:
                self.counters.add(self._drop_row, blocked, len(buf) - len(kept), blocked)
                buf = kept
        elif self._drop_search is not None and self._drop_search(buf) is not None:
            buf, blocked = self._split_drop(buf)

        if self._engine is not None and buf:
            buf, more = self._apply_rules(buf)
            blocked += more
        return (buf, received, received - oversize - blocked, blocked, oversize)

    def judge(self, line: bytes) -> Verdict:  # noqa: PLR0911 - one return per outcome
        """What :meth:`filter` does to one line (no ``\\n``, no ``\\r``), counting nothing.

        A ``sample`` rule draws again here: the verdict has the same odds as
        the data path's, not necessarily the same outcome.
        """
        if len(line) > self._max:
            return (DROPPED, -1, None)
        if self._drop_hs is not None:
            owner = self._drop_hs.owner_of(line)
            if owner is not None:
                return (BLOCKED, owner, None)
        elif self._drop_judge is not None:
            found = self._drop_judge.line_pattern.match(line)
            if found is not None:
                # The prefix the data path's split credits (see _split_drop).
                return (BLOCKED, self._drop_owner.get(found.group(0), self._drop_row), None)
        engine = self._engine
        if engine is None:
            return (FORWARDED, -1, line)
        view = Line(line)
        rule = engine.find(view)
        if rule is None:
            if engine.allowlist_mode:
                return (BLOCKED, engine.default_row, None)
            return (FORWARDED, -1, line)
        result = rule.preview(view)
        return (BLOCKED if result is None else FORWARDED, rule.row, result)

    def _normalise(self, chunk: bytes) -> tuple[bytes, int, int]:
        kept: list[bytes] = []
        received = oversize = 0
        for line in split_lines(chunk):
            received += 1
            if len(line) > self._max:
                oversize += 1
            else:
                kept.append(line)
        return (NL + NL.join(kept) if kept else b""), received, oversize

    def _split_drop(self, buf: bytes) -> tuple[bytes, int]:
        assert self._drop_split is not None
        # split() with two groups yields [kept, line, key, kept, line, key, ..., kept].
        parts = self._drop_split(buf)
        owner = self._drop_owner
        add = self.counters.add
        for line, key in zip(parts[1::3], parts[2::3], strict=True):
            add(owner[key], 1, len(line) + 1)
        return b"".join(parts[0::3]), len(parts) // 3

    def drain_counters(self) -> list[tuple[int, int]]:
        """(index, delta) of every per-rule counter that moved, resetting them."""
        if self._limits is not None:
            counters = self.counters
            for row, field, delta in self._limits.drain():
                counters.add_field(row, field, delta)
        return self.counters.drain()

    def _apply_rules(self, buf: bytes) -> tuple[bytes, int]:
        engine = self._engine
        assert engine is not None
        gate = self._gate
        if gate is not True:
            hit = gate is not None and any(p.search(buf) is not None for p in gate)  # type: ignore[union-attr]
            if not hit and self._name_gate is not None:
                hit = bool(self._name_gate.match(buf))
            if not hit:
                if engine.allowlist_mode:
                    lines = buf.count(NL)
                    self.counters.add(engine.default_row, lines, len(buf), lines)
                    return b"", lines
                return buf, 0
        limits = self._limits
        if limits is not None:
            if limits.fast:
                other = self._other_gate
                if other is None:
                    hit = False
                elif other is True:
                    hit = True
                else:
                    hit = any(p.search(buf) is not None for p in other)  # type: ignore[union-attr]
                if not hit and self._other_name_gate is not None:
                    hit = bool(self._other_name_gate.match(buf))
                if not hit:
                    codes = limits.scan(buf)
                    if not codes:
                        return buf, 0
                    return self._judge(buf, codes, limits, engine)
            limits.refresh()
        out: list[bytes] = []
        blocked = 0
        add = self.counters.add
        for raw in buf[1:].split(NL):
            line = Line(raw)
            rule = engine.find(line)
            if rule is None:
                if engine.allowlist_mode:
                    add(engine.default_row, 1, len(raw) + 1)
                    blocked += 1
                else:
                    out.append(raw)
                continue
            result = rule.apply(line)
            if result is None:
                add(rule.row, 1, len(raw) + 1)
                blocked += 1
            else:
                add(rule.row, 0, len(raw) - len(result))
                out.append(result)
        return (NL + NL.join(out) if out else b""), blocked

    def _judge(
        self, buf: bytes, codes: list[int], limits: Limits, engine: RuleEngine
    ) -> tuple[bytes, int]:
        """The lines of a scanned chunk the scan could not pass (``codes``).

        Unchanged lines stay where they are in ``buf``; only lines dropped or
        rewritten are cut out.
        """
        add = self.counters.add
        size = len(buf)
        parts: list[bytes] = []
        blocked = kept_from = 0
        for code in codes:
            start = code >> 17
            end = buf.find(NL, start + 1)
            if end < 0:
                end = size
            raw = buf[start + 1 : end]
            result: bytes | None
            if code & 1:  # refused by a rule that drops: decided in C
                slot = code >> 1 & 0xFFFF
                limits.limiter(slot).limited += 1
                add(limits.rows[slot - 1], 1, len(raw) + 1)
                result = None
            else:
                line = Line(raw)
                rule = engine.find(line)
                if rule is None:
                    if engine.allowlist_mode:
                        add(engine.default_row, 1, len(raw) + 1)
                        result = None
                    else:
                        result = raw
                        if line.kind == KIND_METRIC:
                            limits.learn_unmatched(raw)
                else:
                    result = rule.apply(line)
                    if result is None:
                        add(rule.row, 1, len(raw) + 1)
                    else:
                        add(rule.row, 0, len(raw) - len(result))
            if result is not raw:
                parts.append(buf[kept_from:start])
                if result is None:
                    blocked += 1
                else:
                    parts.append(NL + result)
                kept_from = end
        if not parts:
            return buf, blocked
        parts.append(buf[kept_from:])
        return b"".join(parts), blocked
