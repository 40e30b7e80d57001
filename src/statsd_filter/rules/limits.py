"""The limit actions: ``limit_series`` and ``limit_tag_values``, per line and per chunk.

Each limit rule owns a :class:`LimitTable`: the shared table of
``limittable.py`` (in the memory every worker maps, see ``limitpool.py``) and
the lock that guards it, or private memory for ``explain`` and tests. Windows
are fixed: window ``n`` of a rule runs from ``n * window`` to ``(n + 1) *
window`` seconds of the system's monotonic clock, which every process on the
host reads alike, so all workers agree on when a window ends without talking.

A worker asks the shared table only about what it has not seen in the current
window: :class:`Limits` keeps one local cache (series key -> the deciding rule
and its decision) for all limit rules of a filter, whose decisions expire when
the first of their windows ends (the epoch moves on; the rule of each series is
remembered). The filter then runs :meth:`LocalCache.scan` (C) over a whole
chunk: lines whose series it knows to pass cost a hash and a probe; for a
series decided in an earlier window it reads the rule's shared table (no lock)
or, if nobody decided it in this window yet, decides it there under the lock;
lines refused by a rule that drops are cut out; only the others (series this
worker never met, strip_tags, limit_tag_values' expired series) take the
per-line path, where the rule's ``apply`` below decides (and caches) them.

That cache is sound because a limit rule's decision depends only on the series
(name, type, tags): its match cannot look at a value (``model.py`` refuses a
prefix that reaches past the name), and the whole-chunk scan is used only when
no other rule can match any line of the chunk (the filter's gate says so).
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable
from typing import Protocol

from statsd_filter.protocol.metric import KIND_METRIC, Line
from statsd_filter.rules.limitcache import LocalCache, NativeCache, ScanTable, new_cache
from statsd_filter.rules.limittable import (
    ADMITTED,
    AT_CAP,
    BUDGET_BIT,
    C_PASSED,
    C_SERIES_LIMITED,
    C_TRACKING_FULL,
    COUNT_FIELDS,
    EPOCH_SHIFT,
    NEW,
    PASS,
    REFUSED,
    SLOT_SHIFT,
    UNTRACKED,
    TableState,
    admit,
    hash_key,
    init_table,
    native_scan,
    peek,
    private_memory,
    read_table,
    series_key,
    table_bytes,
)
from statsd_filter.rules.model import RuleSpec

__all__ = [
    "LIMITED",
    "SERIES_LIMITED",
    "TRACKING_FULL",
    "LimitTable",
    "Limiter",
    "Limits",
    "Lock",
    "private_table",
]

# The per-rule counters limit rules add (indices into a rule's counter row
# after matches, lines_saved, bytes_saved; see rules/filter.py).
LIMITED, SERIES_LIMITED, TRACKING_FULL = 3, 4, 5
# Series whose rule is "none" (no limit rule matched) are cached too, up to
# this many beyond the rules' own max_tracked, so traffic no limit rule selects
# also takes the whole-chunk path.
UNMATCHED_CACHE = 65536
# A label for the offenders list when per_tag is set and the line lacks the tag.
_NO_TAG_VALUE = b"(none)"
_ABSENT_BUDGET = BUDGET_BIT | 1


class Lock(Protocol):
    """A lock between processes (``limitpool.RegionLock``): a record lock on
    ``byte`` of the file ``fd``, which the C scan takes too."""

    fd: int
    byte: int

    def acquire(self) -> None: ...

    def release(self) -> None: ...


class LimitTable:
    """One rule's table and the lock every process takes to change it."""

    __slots__ = ("lock", "memory")

    def __init__(self, memory: memoryview, lock: Lock | None = None) -> None:
        self.memory = memory
        self.lock = lock

    def admit(self, key: int, budget: int, limit: int, window: int, label: bytes) -> int:
        """Decide a series the local cache does not know (see ``limittable.admit``).

        A series another worker decided in this window is read without the lock.
        """
        if peek is not None:
            known = peek(self.memory, key, window)
            if known >= 0:
                return ADMITTED if known else 0
        lock = self.lock
        if lock is None:
            return admit(self.memory, key, budget, limit, window, label)
        lock.acquire()
        try:
            return admit(self.memory, key, budget, limit, window, label)
        finally:
            lock.release()

    def state(self) -> TableState:
        return read_table(self.memory)


def private_table(spec: RuleSpec) -> LimitTable:
    """A table in this process's own memory (``explain``, tests, config checks)."""
    memory = memoryview(private_memory(table_bytes(spec.max_tracked)))
    init_table(memory, spec.max_tracked)
    return LimitTable(memory)


class Limiter:
    """A limit rule's action: ``apply(line) -> bytes | None`` like every rule's."""

    def __init__(
        self,
        spec: RuleSpec,
        slot: int,
        table: LimitTable,
        limits: Limits,
    ) -> None:
        self.spec = spec
        self.slot = slot  # this rule in the local cache (0 is "no rule")
        self.table = table
        self._limits = limits
        self._cache = limits.cache
        self._clock = limits.clock
        self._pass = slot << SLOT_SHIFT | PASS
        self._refused = slot << SLOT_SHIFT | REFUSED
        self.window = spec.window
        # Counts since the last drain: lines limited, new series refused, cap hits.
        self.limited = self.series_limited = self.tracking_full = 0
        strip = spec.tags if spec.action == "limit_series" else ()
        self._strip_exact = frozenset(
            t.encode() for t in strip if ":" in t and not t.endswith(":*")
        )
        self._strip_keys = frozenset(t.encode() for t in strip if ":" not in t)
        self._strip_valued = frozenset(
            t.removesuffix(":*").encode() for t in strip if t.endswith(":*")
        )
        self._per_tag = spec.per_tag.encode() + b":" if spec.per_tag else b""
        scope = spec.tags if spec.action == "limit_tag_values" else ()
        self._all_keys = "*" in scope
        self._keys = frozenset(t.encode() for t in scope if t != "*")
        # limit_tag_values: this worker's answers per (key, value) this window.
        self._pairs: dict[int, bool] = {}
        self._pairs_window = -1
        self.apply: Callable[[Line], bytes | None] = (
            self._apply_series if spec.action == "limit_series" else self._apply_tag_values
        )

    def _count(self, result: int) -> None:
        if result & NEW and not result & ADMITTED and not result & UNTRACKED:
            self.series_limited += 1
        if result & (AT_CAP | UNTRACKED):
            self.tracking_full += 1

    def _apply_series(self, line: Line) -> bytes | None:
        raw = line.raw
        if line.kind != KIND_METRIC:
            return raw  # events, service checks, malformed lines are not series
        key = series_key(raw)
        epoch = self._limits.epoch
        cached = self._cache.get(key) - epoch
        if cached == self._pass:
            return raw
        if cached != self._refused:
            spec = self.spec
            budget = 0
            label = line.name or b""
            if self._per_tag:
                value = next((t for t in line.tags if t.startswith(self._per_tag)), None)
                if value is None:
                    budget = _ABSENT_BUDGET
                    label += b" " + self._per_tag + _NO_TAG_VALUE
                else:
                    budget = BUDGET_BIT | hash_key(value)
                    label += b" " + value
            window = int(self._clock() // spec.window)
            result = self.table.admit(key, budget, spec.max_series, window, label)
            self._count(result)
            if result & ADMITTED:
                self._limits.remember(key, epoch | self._pass)
                return raw
            self._limits.remember(key, epoch | self._refused)
        self.limited += 1
        if self.spec.on_limit == "drop":
            return None
        return line.without_tags(self._strip_exact, self._strip_keys, self._strip_valued)

    def preview(self, line: Line) -> bytes | None:
        """What :attr:`apply` would do to ``line`` as things stand, admitting and
        counting nothing (``/top``, ``/tap``, ``explain``): a series this worker
        already decided in this window gets that decision; one it has not met yet
        is shown passing, as its first line would be while the budget has room."""
        raw = line.raw
        if line.kind != KIND_METRIC:
            return raw
        if self.spec.action == "limit_tag_values":
            window = int(self._clock() // self.spec.window)
            pairs = self._pairs if window == self._pairs_window else {}
            refused = [
                tag
                for tag in line.tags
                if (self._all_keys or tag.partition(b":")[0] in self._keys)
                and pairs.get(hash_key(tag.partition(b":")[0] + b":" + tag.partition(b":")[2]))
                is False
            ]
            return line.without_tags(frozenset(refused), frozenset()) if refused else raw
        if self._cache.get(series_key(raw)) - self._limits.epoch != self._refused:
            return raw
        if self.spec.on_limit == "drop":
            return None
        return line.without_tags(self._strip_exact, self._strip_keys, self._strip_valued)

    def _apply_tag_values(self, line: Line) -> bytes | None:
        raw = line.raw
        if line.kind != KIND_METRIC:
            return raw
        key = series_key(raw)
        epoch = self._limits.epoch
        if self._cache.get(key) == epoch | self._pass:
            return raw
        spec = self.spec
        window = int(self._clock() // spec.window)
        pairs = self._pairs
        if window != self._pairs_window:
            pairs.clear()
            self._pairs_window = window
        refused: list[bytes] = []
        for tag in line.tags:
            tag_key, _, value = tag.partition(b":")
            if not (self._all_keys or tag_key in self._keys):
                continue
            pair = hash_key(tag_key + b":" + value)  # a bare key counts as the value ""
            ok = pairs.get(pair)
            if ok is None:
                result = self.table.admit(
                    pair, BUDGET_BIT | hash_key(tag_key), spec.max_values, window, tag_key
                )
                self._count(result)
                ok = bool(result & ADMITTED)
                if len(pairs) < spec.max_tracked:
                    pairs[pair] = ok
            if not ok:
                refused.append(tag)
        if not refused:
            self._limits.remember(key, epoch | self._pass)
            return raw
        self.limited += 1
        return line.without_tags(frozenset(refused), frozenset())

    def describe(self) -> str:
        """What ``explain`` says the rule does beyond the line shown."""
        spec = self.spec
        if spec.action == "limit_series":
            per = f" per {spec.per_tag} value" if spec.per_tag else ""
            beyond = (
                "dropped"
                if spec.on_limit == "drop"
                else f"forwarded without tags {list(spec.tags)}"
            )
            return (
                f"at most {spec.max_series} series{per} per {spec.window:g}s window pass "
                f"unchanged; a new series beyond that is {beyond}"
            )
        return (
            f"at most {spec.max_values} values per tag key {list(spec.tags)} per "
            f"{spec.window:g}s window; a value beyond that is removed from the line"
        )


class Limits:
    """The limit rules of one filter, their shared local cache, and their counts."""

    def __init__(
        self,
        specs: list[tuple[RuleSpec, int]],
        table_of: Callable[[RuleSpec], LimitTable] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        native: bool | None = None,
    ) -> None:
        """``specs``: each limit rule with its counter row, in rule order."""
        self.clock = clock
        capacity = min(sum(spec.max_tracked for spec, _ in specs) + UNMATCHED_CACHE, 1 << 25)
        self.cache: LocalCache = (
            new_cache(capacity) if native is None else new_cache(capacity, native)
        )
        self.fast = self.cache.native
        self._native = self.cache if isinstance(self.cache, NativeCache) else None
        table_of = table_of or private_table
        self.limiters = [
            Limiter(spec, slot, table_of(spec), self) for slot, (spec, _) in enumerate(specs, 1)
        ]
        self.rows = [row for _, row in specs]
        # Lines the whole-chunk scan passed, per slot (slot 0: no limit rule matched).
        self.counts = array("q", bytes(8 * COUNT_FIELDS * (len(specs) + 1)))
        self.epoch = 0  # the local windows so far, << EPOCH_SHIFT
        self.tables: list[ScanTable | None] = [None] * (len(specs) + 1)
        self._expires = float("-inf")

    def refresh(self) -> None:
        """Let the local decisions expire once the earliest current window has ended."""
        now = self.clock()
        if now >= self._expires:
            self.epoch += 1 << EPOCH_SHIFT
            self.epoch &= (1 << 64) - 1
            self._expires = min(((now // lim.window) + 1) * lim.window for lim in self.limiters)
            for lim in self.limiters:
                spec = lim.spec
                if spec.action == "limit_series":
                    lock = lim.table.lock
                    self.tables[lim.slot] = (
                        lim.table.memory,
                        int(now // spec.window),
                        spec.on_limit == "drop",
                        spec.max_series,
                        spec.per_tag.encode() + b":" if spec.per_tag else b"",
                        lock.fd if lock is not None else -1,
                        lock.byte if lock is not None else 0,
                    )

    def scan(self, chunk: bytes) -> list[int]:
        """The whole-chunk pass (see :meth:`LocalCache.scan`), after :meth:`refresh`.

        Once per chunk, so it calls the C scan itself: every call saved here
        is a measurable share of a small chunk's cost.
        """
        if self.clock() >= self._expires:
            self.refresh()
        cache = self._native
        if cache is not None and native_scan is not None:
            return native_scan(
                chunk, cache.buffer, self.counts, self.epoch >> EPOCH_SHIFT, self.tables
            )
        return self.cache.scan(chunk, self.counts, self.epoch >> EPOCH_SHIFT, self.tables)

    def remember(self, key: int, value: int) -> None:
        """Cache a decision; a full cache starts over (every series is learnt again)."""
        if not self.cache.put(key, value):
            self.cache.clear()
            self.cache.put(key, value)

    def learn_unmatched(self, raw: bytes) -> None:
        """A metric line no rule matched passes: remember its series as such."""
        self.remember(series_key(raw), self.epoch | PASS)

    def limiter(self, slot: int) -> Limiter:
        return self.limiters[slot - 1]

    def drain(self) -> list[tuple[int, int, int]]:
        """(row, field, delta) of every count since the last drain, resetting them."""
        out: list[tuple[int, int, int]] = []
        counts = self.counts
        for slot, limiter in enumerate(self.limiters, 1):
            row = self.rows[slot - 1]
            base = slot * COUNT_FIELDS
            if counts[base + C_PASSED]:
                out.append((row, 0, counts[base + C_PASSED]))
            limiter.series_limited += counts[base + C_SERIES_LIMITED]
            limiter.tracking_full += counts[base + C_TRACKING_FULL]
            for field in range(COUNT_FIELDS):
                counts[base + field] = 0
            for field, attr in (
                (LIMITED, "limited"),
                (SERIES_LIMITED, "series_limited"),
                (TRACKING_FULL, "tracking_full"),
            ):
                value = getattr(limiter, attr)
                if value:
                    out.append((row, field, value))
                    setattr(limiter, attr, 0)
        counts[C_PASSED] = 0  # slot 0: lines no limit rule matched
        return out
