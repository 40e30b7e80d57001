"""Glob patterns on metric names, translated to anchored regular expressions.

``*`` matches within one dot-separated segment, ``**`` across segments, ``?``
one character other than a dot: ``api.*.latency`` matches ``api.v1.latency``
but not ``api.v1.eu.latency``; ``api.**.latency`` matches both. The
translation uses only negated character classes, so matching is cheap on the
short strings metric names are.
"""

from __future__ import annotations

import re

__all__ = ["glob_to_regex", "validate_glob"]

# Characters that cannot occur in a metric name: a glob containing them can never match.
_IMPOSSIBLE = set(":|\n\r\t ")


def validate_glob(glob: str) -> str | None:
    """Why ``glob`` can never match a metric name, or None if it can."""
    if not glob:
        return "an empty glob matches nothing"
    bad = sorted(_IMPOSSIBLE.intersection(glob))
    if bad:
        return f"glob {glob!r} can never match: metric names cannot contain {bad[0]!r}"
    if "***" in glob:
        return f"glob {glob!r} has '***'; use '*' (one segment) or '**' (any segments)"
    return None


def glob_to_regex(glob: str) -> bytes:
    """The regex body (no anchors) equivalent to ``glob`` on a metric name."""
    out: list[str] = []
    i = 0
    while i < len(glob):
        char = glob[i]
        if glob.startswith("**", i):
            out.append(r"[^:|\n]*")
            i += 2
            continue
        if char == "*":
            out.append(r"[^.:|\n]*")
        elif char == "?":
            out.append(r"[^.:|\n]")
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out).encode()
