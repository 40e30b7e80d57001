"""The supervisor's side of the limit rules: what they hold now, and telling about it.

Workers write the limit tables (shared memory, ``limitpool.py``); the
supervisor only reads them. :func:`limit_report` is the JSON of ``GET
/limits``: per limit rule, the series admitted in the current window, what was
refused, the names that hit the limit most, memory and the running totals.
:class:`LimitWatch` runs every :data:`WATCH_INTERVAL`: it logs one warning per
rule per window in which the rule refused something (naming the top offenders
so far), and frees the tables of rules a reload replaced once no worker can
still be using them. With no limit rule and no table waiting to be freed it
has nothing to look at, so it sleeps until :meth:`LimitWatch.wake` (a reload):
an idle proxy without limit rules does not wake up for it at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from statsd_filter.config import Generation
from statsd_filter.limitpool import LimitPool, LimitRegions, LimitSlot
from statsd_filter.rules.limits import LIMITED, SERIES_LIMITED, TRACKING_FULL
from statsd_filter.rules.limittable import TableState
from statsd_filter.rules.model import RuleSpec
from statsd_filter.stats import SharedStats

__all__ = ["WATCH_INTERVAL", "LimitWatch", "limit_report", "read_state"]

# Often enough to warn within the first quarter of a 2-second window.
WATCH_INTERVAL = 0.5
# A worker holds a table's lock for microseconds; a few tries always find it free
# unless that worker is stopped, and then an unlocked read is good enough.
LOCK_TRIES = 20
TOP_SHOWN = 5


def read_state(pool: LimitPool, slot: LimitSlot) -> TableState:
    """A table's state, read under its lock when the lock can be had at once."""
    table = pool.table(slot)
    lock = pool.lock(slot)
    for _ in range(LOCK_TRIES):
        if lock.try_acquire():
            try:
                return table.state()
            finally:
                lock.release()
        time.sleep(0.0001)
    return table.state()  # pragma: no cover - a worker stopped while holding the lock


def _limit_rules(generation: Generation) -> list[tuple[RuleSpec, LimitSlot]]:
    return [
        (spec, generation.limits[spec.name])
        for spec in generation.settings.all_rules
        if spec.name in generation.limits
    ]


def _offenders(state: TableState, shown: int = TOP_SHOWN) -> list[dict[str, Any]]:
    return [
        {"name": name.decode("utf-8", "replace"), "series_refused": count}
        for name, count in state.offenders[:shown]
    ]


def limit_report(
    generation: Generation, pool: LimitPool | None, stats: SharedStats
) -> dict[str, Any]:
    """The ``/limits`` document."""
    rules = []
    now = time.monotonic()
    for spec, slot in _limit_rules(generation) if pool is not None else []:
        assert pool is not None
        state = read_state(pool, slot)
        window = int(now // spec.window)
        current = state.window == window
        row = generation.rows.get(spec.name, -1)

        def total(field: int, row: int = row) -> int:
            return stats.rule_total(row, field) if row >= 0 else 0

        rules.append(
            {
                "rule": spec.name,
                "action": spec.action,
                "limit": spec.max_series or spec.max_values,
                "per_tag": spec.per_tag or None,
                "tags": list(spec.tags),
                "on_limit": spec.on_limit if spec.action == "limit_series" else "strip_tags",
                "window_seconds": spec.window,
                "window": window,
                "window_ends_in_seconds": round((window + 1) * spec.window - now, 3),
                # This window's counts (zero until a worker meets the rule in it).
                "series": state.admitted if current else 0,
                "budgets": state.budgets if current else 0,
                "refused": state.refused + state.untracked if current else 0,
                "tracked": state.used + state.refused if current else 0,
                "max_tracked": spec.max_tracked,
                "memory_bytes": slot.size,
                # The latest window with counts: who hit the limit most.
                "offenders_window": state.window if state.window >= 0 else None,
                "top_offenders": _offenders(state),
                "lines_limited_total": total(LIMITED),
                "series_limited_total": total(SERIES_LIMITED),
                "tracking_full_total": total(TRACKING_FULL),
            }
        )
    return {"rules": rules}


class LimitWatch:
    """Warns once per rule per window with refusals; frees tables nobody uses."""

    def __init__(
        self,
        pool: LimitPool,
        regions: LimitRegions,
        current: Callable[[], Generation],
        oldest_applied: Callable[[int], int],
        log: logging.Logger,
    ) -> None:
        self._pool = pool
        self._regions = regions
        self._current = current
        self._oldest_applied = oldest_applied
        self._log = log
        self._warned: dict[str, tuple[int, int]] = {}  # rule -> (window, table offset)
        self._wake = asyncio.Event()
        self.checks = 0  # looks taken (check() calls), for tests and curiosity

    def wake(self) -> None:
        """The rules may have changed (a reload): look again whether there is work."""
        self._wake.set()

    def needed(self) -> bool:
        """Whether a periodic look can find anything: a limit rule, or a table to free."""
        return bool(self._regions.retired) or bool(_limit_rules(self._current()))

    def release(self) -> None:
        """Free the tables of replaced rules once every live worker has moved on."""
        if self._regions.retired:
            generation = self._current()
            self._regions.release_unused(self._oldest_applied(generation.number))

    def check(self) -> None:
        """One look at every limit table: warn about new refusals, free what is unused."""
        self.checks += 1
        generation = self._current()
        for spec, slot in _limit_rules(generation):
            state = read_state(self._pool, slot)
            refused = state.refused + state.untracked
            mark = (state.window, slot.offset)
            if refused == 0 or self._warned.get(spec.name) == mark:
                continue
            self._warned[spec.name] = mark
            what = "series" if spec.action == "limit_series" else "values per tag key"
            per = f" per {spec.per_tag} value" if spec.per_tag else ""
            top = ", ".join(
                f"{name.decode('utf-8', 'replace')} ({n})"
                for name, n in state.offenders[:TOP_SHOWN]
            )
            self._log.warning(
                "rule %r hit its limit of %d %s%s per %gs window: %d new %s refused so far "
                "in this window%s; most: %s",
                spec.name,
                spec.max_series or spec.max_values,
                what,
                per,
                spec.window,
                refused,
                "series" if spec.action == "limit_series" else "tag values",
                f" ({state.at_cap + state.untracked} at the max_tracked cap)"
                if state.at_cap or state.untracked
                else "",
                top or "-",
            )
        self.release()

    async def run(self) -> None:
        while True:
            if not self.needed():
                # Nothing can change that a look would see until a reload says so.
                self._wake.clear()
                await self._wake.wait()
                continue
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                self.check()
            except Exception:  # a bug here must not stop the supervisor
                self._log.exception("limit watch failed")
