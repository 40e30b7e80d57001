"""``statsd-filter top``: a terminal view of a running proxy, read from its ``/top``.

:func:`render` turns one ``/top`` document into lines of text (the header with
totals and upstreams, the table of names or prefixes, the rules); ``--once``
prints that and exits, and the interactive view repaints it every
``--interval`` seconds with :mod:`curses`.

Why curses: it is in the standard library on every Unix Python, needs no
dependency for what is one refreshing table and a few keys, and a terminal
without it still has ``--once``. (A TUI framework would bring a large
dependency tree into a network daemon's install for a read-only view.)

Keys: ``l`` lines/s, ``b`` bytes/s, ``c`` cardinality (distinct tag sets) to
sort by; ``p`` names or prefixes; ``q`` (or Ctrl-C) quits.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from statsd_filter.console.admin_client import AdminError, admin_url, fetch_json
from statsd_filter.console.suggest import suggest_toml

__all__ = ["fetch_top", "human", "render", "run_suggest", "run_top"]

SORTS = ("lines", "bytes", "cardinality")
KEYS = {ord("l"): "lines", ord("b"): "bytes", ord("c"): "cardinality"}
# /top rows asked for --suggest: the more names, the closer the cut to the share asked.
SUGGEST_LIMIT = 1000


def human(value: float | None) -> str:
    """A rate or count in 5 characters or so: 980, 12.3k, 4.5M."""
    if value is None:
        return "-"
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.1f}{suffix}"
    return f"{value:.1f}" if value != int(value) else f"{int(value)}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def fetch_top(base: str, sort: str = "lines", limit: int = 20) -> dict[str, Any]:
    """The ``/top`` document of the proxy whose admin port is ``base``."""
    return fetch_json(admin_url(base, "/top", {"sort": sort, "limit": str(limit)}))


def render(
    doc: dict[str, Any], source: str, sort: str = "lines", prefixes: bool = False, width: int = 100
) -> list[str]:
    """One ``/top`` document as lines of text, each at most ``width`` characters."""
    workers = doc.get("workers", [])
    running = sum(1 for w in workers if w["state"] == "running")
    rates, totals = doc["rates"], doc["totals"]
    up = _duration(doc["uptime_seconds"])
    count = f"{running}/{len(workers)}"
    # "aggregated" (pre-aggregation's input lines) only from a proxy that has it.
    keys = [k for k in ("received", "forwarded", "blocked", "aggregated", "dropped") if k in rates]
    out = [
        f"statsd-filter {source}  status {doc['status']}  up {up}  workers {count} running",
        "lines/s   " + "  ".join(f"{k} {human(rates[k])}" for k in keys),
        "total     " + "  ".join(f"{k} {human(totals[k])}" for k in keys),
        "upstreams "
        + "  ".join(f"{u['address']} {u['protocol']} {u['state']}" for u in doc["upstreams"]),
    ]
    if not doc.get("enabled", True):
        out += ["", "sampling is off (the proxy runs with --no-top): no names to show"]
    else:
        steps = [s["one_in_bytes"] for s in doc.get("sampling", [])]
        every = "every line" if steps and max(steps) == 1 else "sample points"
        out.append(
            f"sampled: {every} over the last {doc['window_seconds']:g}s, "
            f"{doc.get('names_seen', 0)} names seen; rates are estimates "
            "(error ~1/sqrt(sampled lines))"
        )
        out.append("")
        marks = {s: ("*" if s == sort else " ") for s in SORTS}
        key = "prefix" if prefixes else "name"
        out.append(
            f"{key.upper():<36}{'LINES/S' + marks['lines']:>10}{'BYTES/S' + marks['bytes']:>10}"
            f"{'FWD/S':>9}{'BLOCK/S':>9}{'TAGSETS' + marks['cardinality']:>10}  RULE"
        )
        for row in doc["prefixes" if prefixes else "names"]:
            tag_sets = human(row["tag_sets"])
            if row.get("tag_sets_saturated"):
                tag_sets = ">=" + tag_sets
            out.append(
                f"{row[key][:35]:<36}{human(row['lines_per_s']):>10}{human(row['bytes_per_s']):>10}"
                f"{human(row['forwarded_lines_per_s']):>9}{human(row['blocked_lines_per_s']):>9}"
                f"{tag_sets:>10}  {row.get('rule') or '-'}"
            )
    out += ["", f"{'RULE':<36}{'ACTION':>12}{'MATCHES/S':>12}{'MATCHES':>12}"]
    out += [
        f"{rule['name'][:35]:<36}{rule['action']:>12}{human(rule['matches_per_s']):>12}"
        f"{human(rule['matches']):>12}"
        for rule in doc["rules"]
    ]
    if doc.get("rules_total", 0) > len(doc["rules"]):
        out.append(f"... and {doc['rules_total'] - len(doc['rules'])} more rule(s)")
    return [line[:width].rstrip() for line in out]


def run_top(
    base: str,
    *,
    once: bool = False,
    sort: str = "lines",
    limit: int = 20,
    interval: float = 2.0,
    prefixes: bool = False,
) -> int:
    """Show the proxy's /top: once on stdout, or refreshing in the terminal."""
    if once:
        try:
            doc = fetch_top(base, sort, limit)
        except AdminError as exc:
            print(f"statsd-filter top: {exc}", file=sys.stderr)
            return 1
        print("\n".join(render(doc, base, sort, prefixes, width=10_000)))
        return 0
    import curses  # noqa: PLC0415 - only the interactive view needs it

    try:
        return curses.wrapper(_interactive, base, sort, limit, interval, prefixes)
    except KeyboardInterrupt:
        return 0


def _interactive(
    screen: Any, base: str, sort: str, limit: int, interval: float, prefixes: bool
) -> int:
    import curses  # noqa: PLC0415

    curses.curs_set(0)
    screen.timeout(100)  # ms: keys are read between refreshes
    next_fetch = 0.0
    repaint = True
    lines: list[str] = []
    while True:
        now = time.monotonic()
        if now >= next_fetch:
            height, width = screen.getmaxyx()
            try:
                doc = fetch_top(base, sort, max(limit, height))
                lines = render(doc, base, sort, prefixes, width=max(20, width - 1))
            except AdminError as exc:
                lines = [f"statsd-filter top: {exc}", "retrying..."]
            lines.append("")
            lines.append("keys: l lines/s  b bytes/s  c tag sets  p names/prefixes  q quit")
            if repaint:  # after a key: redraw every cell, not only the changed ones
                screen.clear()
                repaint = False
            else:
                screen.erase()
            for y, text in enumerate(lines[: height - 1]):
                screen.addnstr(y, 0, text, max(1, width - 1))
            screen.refresh()
            next_fetch = now + interval
        key = screen.getch()
        if key in (ord("q"), ord("Q"), 27):
            return 0
        if key in KEYS:
            sort = KEYS[key]
            next_fetch, repaint = 0.0, True
        elif key == ord("p"):
            prefixes = not prefixes
            next_fetch, repaint = 0.0, True


def run_suggest(base: str, share: float, by: str, action: str) -> int:
    """Print ``[[rules]]`` that would cut about ``share`` of the forwarded volume."""
    try:
        doc = fetch_top(base, "bytes" if by == "bytes" else "lines", SUGGEST_LIMIT)
    except AdminError as exc:
        print(f"statsd-filter top: {exc}", file=sys.stderr)
        return 1
    if not doc.get("enabled", True):
        print("statsd-filter top: sampling is off (--no-top): nothing to suggest", file=sys.stderr)
        return 1
    sys.stdout.write(suggest_toml(doc, share, by, action))
    return 0
