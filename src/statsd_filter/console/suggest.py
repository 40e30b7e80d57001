"""``statsd-filter top --suggest SHARE``: rules that would cut a share of the volume.

From a ``/top`` document (ask it for many rows: ``?limit=1000``), pick name
prefixes and metric names whose *forwarded* volume (lines or bytes per second;
what is blocked already saves nothing more) adds up to at least ``share`` of
the forwarded total, and print them as ``[[rules]]`` TOML to paste.

Choice, greedy "best fit": while volume is still needed, take the candidate
that alone covers what is still needed with the least excess; if none does,
the largest one. A candidate overlapping one already taken (a name under a
taken prefix, or a prefix holding a taken name) is skipped, so no volume is
counted twice. Prefixes are the 1 to 3 dot-segment prefixes ``/top`` reports.

``drop`` rules cut a candidate's whole volume; ``sample`` rules
(``keep_one_in``) cut ``1 - 1/keep_one_in`` of it and keep counters right on
average (StatsD scales by the sample rate), the gentler limit. The figures are
the sampled estimates of ``/top``, so the cut is "about" the share asked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["Suggestion", "choose", "suggest_toml"]

KEEP_ONE_IN = 10


@dataclass(frozen=True)
class Suggestion:
    """One prefix or name and the forwarded volume it carries (per second)."""

    key: str
    is_prefix: bool
    volume: float


def _candidates(doc: dict[str, Any], by: str) -> list[Suggestion]:
    field = "forwarded_lines_per_s" if by == "lines" else "forwarded_bytes_per_s"
    out = [
        Suggestion(row["prefix"], True, float(row[field]))
        for row in doc.get("prefixes", [])
        if row[field] > 0
    ]
    out += [
        Suggestion(row["name"], False, float(row[field]))
        for row in doc.get("names", [])
        if row[field] > 0 and not row["name"].startswith("(")
    ]
    # A rule must match the bytes on the wire: names shown with escapes
    # (not valid UTF-8) or holding characters a rule cannot name are left out.
    return [c for c in out if "\\" not in c.key and c.key.isprintable() and "|" not in c.key]


def _overlaps(a: Suggestion, b: Suggestion) -> bool:
    def covers(prefix: Suggestion, other: Suggestion) -> bool:
        text = other.key if other.is_prefix else other.key + "."
        return prefix.is_prefix and text.startswith(prefix.key)

    return a.key == b.key or covers(a, b) or covers(b, a)


def choose(candidates: list[Suggestion], need: float) -> list[Suggestion]:
    """The candidates to cut, best fit first, until ``need`` is covered (or none is left)."""
    chosen: list[Suggestion] = []
    pool = sorted(candidates, key=lambda c: (-c.volume, c.key))
    while need > 0:
        pool = [c for c in pool if not any(_overlaps(c, t) for t in chosen)]
        if not pool:
            break
        covering = [c for c in pool if c.volume >= need]
        pick = (
            min(covering, key=lambda c: (c.volume, not c.is_prefix, c.key)) if covering else pool[0]
        )
        chosen.append(pick)
        need -= pick.volume
    return chosen


def suggest_toml(doc: dict[str, Any], share: float, by: str = "lines", action: str = "drop") -> str:
    """``[[rules]]`` TOML cutting about ``share`` (0-1) of the forwarded ``by`` volume."""
    candidates = _candidates(doc, by)
    unit = "lines/s" if by == "lines" else "bytes/s"
    field = "forwarded_lines_per_s" if by == "lines" else "forwarded_bytes_per_s"
    total = sum(row[field] for row in doc.get("names", []))
    cut_per_unit = 1.0 if action == "drop" else 1.0 - 1.0 / KEEP_ONE_IN
    head = f"# statsd-filter top --suggest {share:.0%} (by {by}, action {action}): "
    lines = [head + f"estimated from {doc.get('window_seconds', 0):g} s of sampled traffic"]
    if total <= 0:
        lines.append("# nothing is being forwarded: no rule to suggest")
        return "\n".join(lines) + "\n"
    chosen = choose(candidates, share * total / cut_per_unit)
    cut = sum(c.volume for c in chosen) * cut_per_unit
    lines.append(
        f"# would cut about {cut:,.0f} of {total:,.0f} forwarded {unit} ({cut / total:.0%}):"
    )
    lines += [f"#   {c.key:<40} {c.volume:>12,.1f} {unit} ({c.volume / total:.0%})" for c in chosen]
    if cut < share * total * 0.999:
        lines.append("# (the names seen so far cannot cut the whole share asked)")
    lines.append(
        "# Paste before any rule that would decide these lines first (the first match decides)."
    )
    for kind, key in (("prefix", True), ("name", False)):
        picked = [c.key for c in chosen if c.is_prefix is key]
        if not picked:
            continue
        values = ", ".join(json.dumps(p) for p in picked)
        lines += [
            "",
            "[[rules]]",
            f'name = "suggested-{action}-{kind}es"'
            if kind == "prefix"
            else f'name = "suggested-{action}-{kind}s"',
            f"match = {{ {kind} = [{values}] }}",
            f'action = "{action}"',
        ]
        if action == "sample":
            lines.append(f"keep_one_in = {KEEP_ONE_IN}")
    return "\n".join(lines) + "\n"
