"""Prefix rules compiled into one trie-shaped regular expression.

A blocklist of N prefixes is folded into a trie and emitted as a nested
alternation (``debug\\.|api\\.(?:internal|test)``). Python's regex engine walks
such a pattern one byte per trie level, so matching costs about the length of
the matched prefix, not the number of prefixes (a tuple passed to
``bytes.startswith`` is linear in their number: ~7 µs per line at 1,000). Each
trie node still tries its children one after another, so very wide sets cost a
few times one prefix; ``multiprefix.py`` hands those to Hyperscan.

Three patterns come out of one trie:

* ``line_pattern`` matches a single line that starts with a prefix;
* ``split_pattern`` is ``remove_pattern`` capturing the line and the prefix;
* ``remove_pattern`` finds ``\\n<prefix>...`` up to the end of the line, so one
  ``subn`` over ``b"\\n" + datagram`` deletes every blocked line of a whole
  datagram in C and returns how many it deleted. The leading ``\\n`` is a
  literal, which lets the engine jump from newline to newline instead of trying
  the alternation at every byte.
"""

from __future__ import annotations

import re

__all__ = ["PrefixSet"]

_END = b""


def _trie_regex(prefixes: list[bytes]) -> bytes:
    trie: dict[bytes, dict[bytes, object]] = {}
    for prefix in prefixes:
        node: dict[bytes, object] = trie  # type: ignore[assignment]
        for i in range(len(prefix)):
            node = node.setdefault(prefix[i : i + 1], {})  # type: ignore[assignment]
        node[_END] = {}

    def emit(node: dict[bytes, object]) -> bytes:
        if _END in node:
            # A shorter prefix ends here: anything after it matches already.
            return b""
        alternatives = [
            re.escape(char) + emit(child)  # type: ignore[arg-type]
            for char, child in sorted(node.items())
        ]
        if len(alternatives) == 1:
            return alternatives[0]
        return b"(?:" + b"|".join(alternatives) + b")"

    return emit(trie)  # type: ignore[arg-type]


class PrefixSet:
    """A compiled set of byte prefixes.

    The patterns are compiled on first use: a config with ten thousand prefix
    rules builds ten thousand of these, and when Hyperscan serves the whole set
    none of their regexes is ever needed (compiling them took seconds).
    """

    __slots__ = ("_body", "_line", "_remove", "_split", "prefixes")

    def __init__(self, prefixes: list[bytes]) -> None:
        if not prefixes or any(not p for p in prefixes):
            raise ValueError("prefixes must be non-empty byte strings")
        if any(b"\n" in p for p in prefixes):
            raise ValueError("a prefix cannot contain a newline")
        self.prefixes = tuple(dict.fromkeys(prefixes))
        self._body: bytes | None = None
        self._line: re.Pattern[bytes] | None = None
        self._remove: re.Pattern[bytes] | None = None
        self._split: re.Pattern[bytes] | None = None

    @property
    def body(self) -> bytes:
        """The trie regex (no anchor)."""
        if self._body is None:
            self._body = _trie_regex(list(self.prefixes))
        return self._body

    @property
    def line_pattern(self) -> re.Pattern[bytes]:
        """Matches a line that starts with a prefix."""
        if self._line is None:
            self._line = re.compile(self.body)
        return self._line

    @property
    def remove_pattern(self) -> re.Pattern[bytes]:
        """Finds ``\\n<prefix>...`` up to the end of the line."""
        if self._remove is None:
            self._remove = re.compile(b"\n" + self.body + b"[^\n]*")
        return self._remove

    @property
    def split_pattern(self) -> re.Pattern[bytes]:
        """``remove_pattern`` capturing (line, matched prefix), to attribute removals."""
        if self._split is None:
            self._split = re.compile(b"\n((" + self.body + b")[^\n]*)")
        return self._split

    def matches(self, line: bytes) -> bool:
        """True if ``line`` starts with one of the prefixes."""
        return self.line_pattern.match(line) is not None
