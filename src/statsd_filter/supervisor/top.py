"""What flows: the workers' sampled reports merged into ``/top``, plus rate history.

:class:`TopBoard` keeps every :class:`~statsd_filter.protocol.messages.TopReport`
of the last ``top_window`` seconds, per worker. A worker's rate for a name is
what its reports' lines stand for divided by the time those reports cover, so
a worker that started late or restarted is neither diluted nor counted
twice; the proxy's rate is the sum over workers. A worker whose sample points
see nothing sends no report for that second: it reports its quiet seconds
every few seconds (``TopReport.quiet``), and the time since its last report,
beyond the one report it may still owe, counts as quiet too. So the time
covered is still the window (or the worker's life in it), as when it reported
every empty second. Name prefixes (the first 1, 2 and 3 dot-separated
segments, written with their trailing dot so they can be pasted into a
blocklist) are sums over the names under them. Distinct tag sets merge by OR
of the linear counters (``cardinality.py``).

:class:`RateHistory` samples the proxy-wide counters every few seconds for the
status page's charts and the ``rates`` of ``/top``; rule hit rates come from
the per-rule counters against the oldest snapshot in the window. Everything
here runs in the supervisor, on data the workers already sent or wrote.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from statsd_filter.cardinality import estimate, relative_error
from statsd_filter.protocol.messages import TopReport
from statsd_filter.rules.engine import ALLOWLIST_DEFAULT
from statsd_filter.supervisor.observe import Observer
from statsd_filter.worker.sampler import REPORT_INTERVAL

__all__ = [
    "HISTORY_INTERVAL",
    "HISTORY_POINTS",
    "SORT_KEYS",
    "RateHistory",
    "RuleRates",
    "TopBoard",
    "TopView",
    "prefixes_of",
]

# The status page's charts: 5 minutes at one point every 2 seconds.
HISTORY_INTERVAL = 2.0
HISTORY_POINTS = 150
# What /top can sort by, and the field each sorts on.
SORT_KEYS = {"lines": "lines_per_s", "bytes": "bytes_per_s", "cardinality": "tag_sets"}
MAX_PREFIX_SEGMENTS = 3
TOTALS = ("received", "forwarded", "blocked", "aggregated", "dropped")


def prefixes_of(name: str) -> list[str]:
    """The 1-, 2- and 3-segment prefixes of a name, each ending with its dot.

    Only proper prefixes: ``api.v1.users`` has ``api.`` and ``api.v1.``.
    Pseudo-names like ``(event)`` have none.
    """
    if name.startswith("("):
        return []
    parts = name.split(".")
    return [
        ".".join(parts[:k]) + "." for k in range(1, min(MAX_PREFIX_SEGMENTS, len(parts) - 1) + 1)
    ]


def _error(sq: float, count: float) -> float:
    """The relative standard error of a sum of weighted samples (Horvitz-Thompson)."""
    return math.sqrt(sq) / count if count > 0 else 1.0


@dataclass
class _Merged:
    """One name (or prefix) over the window, as rates."""

    lines: float = 0.0
    bytes_in: float = 0.0
    count: float = 0.0  # lines in the window (not per second)
    count_bytes: float = 0.0
    fwd: float = 0.0
    bytes_fwd: float = 0.0
    blocked: float = 0.0
    dropped: float = 0.0
    sampled: int = 0
    sq: float = 0.0  # the sum of the squared weights of the sampled lines
    tag_bits: int = 0
    rules: dict[str, float] = field(default_factory=dict)
    names: int = 0
    series: int = 0
    exact: bool = True  # every contributing report saw every line (step 1)

    def add(self, other: _Merged) -> None:
        self.lines += other.lines
        self.bytes_in += other.bytes_in
        self.count += other.count
        self.count_bytes += other.count_bytes
        self.fwd += other.fwd
        self.bytes_fwd += other.bytes_fwd
        self.blocked += other.blocked
        self.dropped += other.dropped
        self.sampled += other.sampled
        self.sq += other.sq
        self.exact = self.exact and other.exact
        for rule, value in other.rules.items():
            self.rules[rule] = self.rules.get(rule, 0.0) + value

    def rates(self) -> dict[str, Any]:
        return {
            "lines_per_s": round(self.lines, 2),
            "bytes_per_s": round(self.bytes_in, 1),
            "lines": round(self.count, 1),
            "bytes": round(self.count_bytes),
            "forwarded_lines_per_s": round(self.fwd, 2),
            "forwarded_bytes_per_s": round(self.bytes_fwd, 1),
            "blocked_lines_per_s": round(self.blocked, 2),
            "dropped_lines_per_s": round(self.dropped, 2),
            "sampled_lines": self.sampled,
            # sqrt(sum of squared weights) / estimate: about 1/sqrt(sampled lines) while
            # the spacing is steady, more when points stood for very different amounts
            # (worker/sampler.py); 0 when every line was seen.
            "relative_error": 0.0 if self.exact else round(_error(self.sq, self.count), 3),
        }

    def rule(self) -> str | None:
        """The rule that decided most of these lines (None: no rule, forwarded as is)."""
        if not self.rules:
            return None
        best = max(self.rules.items(), key=lambda kv: (kv[1], kv[0]))[0]
        return best or None


class TopBoard:
    """The sampled reports of the last ``window`` seconds, merged on demand."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._reports: dict[int, deque[tuple[float, TopReport]]] = {}

    def add(self, report: TopReport) -> None:
        """Keep one worker's report (dropping those older than the window)."""
        now = self._clock()
        kept = self._reports.setdefault(report.worker, deque())
        kept.append((now, report))
        self._prune(now)

    def _prune(self, now: float) -> None:
        for worker in list(self._reports):
            kept = self._reports[worker]
            while kept and kept[0][0] < now - self.window:
                kept.popleft()
            if not kept:
                del self._reports[worker]

    def _covered(self, kept: deque[tuple[float, TopReport]], now: float) -> float:
        """The seconds one worker's reports cover in the window: their periods, the
        quiet seconds reported before them that fall in the window, and the time since
        its last report beyond one report interval (quiet seconds not reported yet)."""
        start = now - self.window
        covered = 0.0
        for at, report in kept:
            covered += report.period
            if report.quiet:
                covered += max(0.0, min(report.quiet, at - report.period - start))
        return covered + max(0.0, now - kept[-1][0] - REPORT_INTERVAL)

    def sampling(self) -> list[dict[str, Any]]:
        """Per worker: the seconds its reports cover, its current spacing of sample
        points (bytes) and its points per second."""
        out = []
        now = self._clock()
        for worker, kept in sorted(self._reports.items()):
            period = self._covered(kept, now)
            out.append(
                {
                    "worker": worker,
                    "seconds": round(period, 3),
                    "one_in_bytes": kept[-1][1].step,
                    "points_per_s": round(sum(r.hits for _, r in kept) / period, 1),
                }
            )
        return out

    def merge(self) -> dict[str, _Merged]:
        """Every name seen in the window, as rates summed over the workers."""
        now = self._clock()
        self._prune(now)
        merged: dict[str, _Merged] = {}
        for kept in self._reports.values():
            span = self._covered(kept, now)
            scale = 1.0 / span
            for _, report in kept:
                for raw, stats in report.names.items():
                    name = raw.decode("utf-8", "backslashreplace")
                    entry = merged.get(name)
                    if entry is None:
                        entry = merged[name] = _Merged()
                    (
                        lines,
                        bytes_in,
                        fwd,
                        bytes_fwd,
                        blocked,
                        dropped,
                        sampled,
                        bits,
                        rules,
                        sq,
                    ) = stats
                    entry.lines += lines * scale
                    entry.bytes_in += bytes_in * scale
                    entry.count += lines
                    entry.count_bytes += bytes_in
                    entry.fwd += fwd * scale
                    entry.bytes_fwd += bytes_fwd * scale
                    entry.blocked += blocked * scale
                    entry.dropped += dropped * scale
                    entry.sampled += sampled
                    entry.sq += sq
                    entry.exact = entry.exact and report.step == 1
                    entry.tag_bits |= bits
                    for rule, value in rules.items():
                        entry.rules[rule] = entry.rules.get(rule, 0.0) + value * scale
        return merged

    def snapshot(self, sort: str = "lines", limit: int = 20) -> dict[str, Any]:
        """The ``names`` and ``prefixes`` tables of /top, sorted by ``sort``, ``limit`` each."""
        merged = self.merge()
        names = []
        prefixes: dict[str, _Merged] = {}
        for name, entry in merged.items():
            tag_sets, saturated = estimate(entry.tag_bits)
            row = {"name": name, **entry.rates(), "tag_sets": tag_sets}
            row["tag_sets_saturated"] = saturated
            row["tag_sets_error"] = round(relative_error(tag_sets), 3)
            row["rule"] = entry.rule()
            names.append(row)
            for prefix in prefixes_of(name):
                group = prefixes.get(prefix)
                if group is None:
                    group = prefixes[prefix] = _Merged()
                group.add(entry)
                group.names += 1
                group.series += tag_sets
        key = SORT_KEYS[sort]
        names.sort(key=lambda row: (-row[key], row["name"]))
        prefix_rows = [
            {
                "prefix": prefix,
                "segments": prefix.count("."),
                **group.rates(),
                "names": group.names,
                "tag_sets": group.series,
                "rule": group.rule(),
            }
            for prefix, group in prefixes.items()
        ]
        prefix_rows.sort(key=lambda row: (-row[key], row["prefix"]))
        return {
            "window_seconds": self.window,
            "sampling": self.sampling(),
            "names_seen": len(names),
            "names": names[:limit],
            "prefixes": prefix_rows[:limit],
        }


class RateHistory:
    """Proxy-wide totals sampled every :data:`HISTORY_INTERVAL` seconds, as rates."""

    def __init__(
        self,
        totals: Callable[[], dict[str, int]],
        clock: Callable[[], float] = time.monotonic,
        points: int = HISTORY_POINTS,
    ) -> None:
        self._totals = totals
        self._clock = clock
        self._samples: deque[tuple[float, dict[str, int]]] = deque(maxlen=points + 1)

    def sample(self) -> None:
        """Take one snapshot of the totals (called by a timer)."""
        self._samples.append((self._clock(), self._totals()))

    def series(self) -> dict[str, Any]:
        """Per-second rates between consecutive snapshots, oldest first."""
        out: dict[str, Any] = {"interval_seconds": HISTORY_INTERVAL}
        pairs = list(zip(self._samples, list(self._samples)[1:], strict=False))
        for key in TOTALS:
            out[key] = [
                round(max(0, b[key] - a[key]) / max(1e-6, tb - ta), 2) for (ta, a), (tb, b) in pairs
            ]
        return out

    def rates(self, window: float) -> dict[str, float]:
        """Rates over about the last ``window`` seconds (up to now)."""
        if not self._samples:
            return dict.fromkeys(TOTALS, 0.0)
        now = self._clock()
        current = self._totals()
        base_t, base = self._samples[0]
        for t, snapshot in reversed(self._samples):
            if now - t >= window:
                base_t, base = t, snapshot
                break
        elapsed = max(1e-6, now - base_t)
        return {key: round(max(0, current[key] - base[key]) / elapsed, 2) for key in TOTALS}


class RuleRates:
    """Per-rule hit rates: the rule counters now against a snapshot about a window old."""

    def __init__(
        self,
        matches: Callable[[], dict[str, int]],
        window: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._matches = matches
        self._window = window
        self._clock = clock
        self._snapshots: deque[tuple[float, dict[str, int]]] = deque()

    def sample(self) -> None:
        """Take a snapshot if the newest is older than half a window."""
        now = self._clock()
        if self._snapshots and now - self._snapshots[-1][0] < self._window / 2:
            return
        self._snapshots.append((now, self._matches()))
        while len(self._snapshots) > 3:
            self._snapshots.popleft()

    def rates(self, names: Iterable[str]) -> dict[str, tuple[int, float]]:
        """Each rule's (matches so far, matches per second)."""
        now = self._clock()
        current = self._matches()
        base_t, base = now, current
        for t, snapshot in self._snapshots:
            # The newest snapshot at least half a window old; else the oldest there is.
            if now - t >= self._window / 2 or base_t == now:
                base_t, base = t, snapshot
        elapsed = now - base_t
        out = {}
        for name in names:
            total = current.get(name, 0)
            rate = (total - base.get(name, 0)) / elapsed if elapsed > 0 else 0.0
            out[name] = (total, round(max(0.0, rate), 2))
        return out


class TopView:
    """Builds the ``/top`` document: sampled tables, exact totals, rules, upstreams."""

    def __init__(self, board: TopBoard | None, observer: Observer) -> None:
        self.board = board
        self.observer = observer
        self.history = RateHistory(observer.totals)
        window = board.window if board is not None else 10.0
        self.window = window
        self.rule_rates = RuleRates(self._rule_matches, window)

    def _rule_matches(self) -> dict[str, int]:
        stats = self.observer.stats
        rows = self.observer.reloader.current.rows
        return {name: stats.rule_total(row, 0) for name, row in rows.items()}

    def tick(self) -> None:
        """Sample the counters (every :data:`HISTORY_INTERVAL` seconds)."""
        self.history.sample()
        self.rule_rates.sample()

    def document(self, sort: str = "lines", limit: int = 20) -> dict[str, Any]:
        """The /top JSON."""
        observer = self.observer
        _, health = observer.healthz()
        settings = observer.settings
        specs = [(s.name, s.action) for s in settings.all_rules]
        if settings.allowlist_mode:
            specs.append((ALLOWLIST_DEFAULT, "drop"))
        rates = self.rule_rates.rates(name for name, _ in specs)
        order = sorted(specs, key=lambda spec: (-rates[spec[0]][1], -rates[spec[0]][0]))
        rules = [
            {
                "name": name,
                "action": action,
                "matches": rates[name][0],
                "matches_per_s": rates[name][1],
            }
            for name, action in order
        ]
        doc: dict[str, Any] = {
            "enabled": self.board is not None,
            "sort": sort,
            "status": health["status"],
            "uptime_seconds": health["uptime_seconds"],
            "totals": observer.totals(),
            "rates": self.history.rates(self.window),
            "history": self.history.series(),
            "rules_total": len(rules),
            "rules": rules[:limit],
            "upstreams": [
                {"address": u["address"], "protocol": u["protocol"], "state": u["state"]}
                for u in health["upstreams"]
            ],
            "workers": [{"index": w["index"], "state": w["state"]} for w in health["workers"]],
        }
        if self.board is not None:
            doc.update(self.board.snapshot(sort, limit))
        else:
            doc.update(window_seconds=self.window, sampling=[], names_seen=0, names=[], prefixes=[])
        return doc
