"""Regular-expression conditions on metric names, run by RE2 (linear time).

A backtracking engine (Python's ``re``) can be made to run for minutes by one
crafted line against an innocent-looking pattern; a proxy reading untrusted
input must not use one for user patterns. RE2 guarantees time linear in the
input, and rejects what it cannot run that way (back-references, look-around),
which is reported at config load.

All regex rules share one ``re2.Set``: one call per name reports every pattern
that matches it, so a hundred regex rules cost about one search.
"""

from __future__ import annotations

from typing import Any

import re2

__all__ = ["RegexSet", "name_gate_pattern", "regex_error"]


def _options() -> Any:
    options = re2.Options()
    options.log_errors = False  # errors are reported to the user, not to stderr
    return options


def regex_error(pattern: str) -> str | None:
    """Why RE2 rejects ``pattern``, or None if it compiles."""
    try:
        re2.compile(pattern.encode(), _options())
    except re2.error as exc:
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, bytes):
            detail = detail.decode("utf-8", "replace")
        return f"bad regex {pattern!r}: {detail}"
    return None


class RegexSet:
    """Several patterns searched at once; ``match`` returns the indices that match."""

    def __init__(self, patterns: list[str], *, multiline: bool = False) -> None:
        self._set = re2.Set.SearchSet(_options())
        for pattern in patterns:
            body = ("(?m)" if multiline else "") + pattern
            if self._set.Add(body.encode()) < 0:
                raise ValueError(f"bad regex {pattern!r}")
        self._set.Compile()

    def match(self, text: bytes) -> list[int]:
        """Indices of the patterns found in ``text`` (unordered; empty if none)."""
        found = self._set.Match(text)
        return found or []


def name_gate_pattern(pattern: str) -> str:
    """``pattern`` rewritten to run over whole lines instead of names, as a gate.

    A name is the start of its line up to the first ``:``. Run multi-line over
    the lines, ``^`` already means the start of a name; only ``$`` (end of the
    name) must also accept the ``:`` that follows a name. Any match the rewritten
    pattern finds beyond the name is a false alarm, which only costs a per-line
    check; a match within the name is never missed. Raises ValueError for the
    rare pattern where that cannot be promised (something after a ``$``).
    """
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            if char == "]" and not (out and out[-1] in ("[", "[^")):
                in_class = False
        elif char == "[":
            in_class = True
            if pattern.startswith("[^", i):
                out.append("[^")
                i += 2
                continue
        elif char == "$":
            while pattern.startswith("$", i):  # "$$" is "$"
                i += 1
            if pattern[i : i + 1] not in ("", ")", "|"):
                # Something after the end of the name; the rewrite could miss it.
                raise ValueError(f"{pattern!r} cannot be gated")
            out.append("(?::|$)")
            continue
        out.append(char)
        i += 1
    return "".join(out)
