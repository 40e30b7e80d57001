"""Large prefix sets matched by Hyperscan, when it is installed.

Python's regex engine walks the trie pattern one node at a time and tries a
node's children one after another, so a blocklist of thousands of prefixes
costs several times one prefix (measured: 0.42 vs 0.13 µs per line at 10,000).
Hyperscan (PyPI ``hyperscan``, Intel's multi-pattern engine) scans a whole
datagram for all prefixes at once in time that barely depends on their number.

Each prefix becomes the literal pattern ``\\n<prefix>``; a scan over
``b"\\n" + chunk`` reports which prefixes occur at a line start, and the lines
are removed by a regex of just those (see :class:`HyperscanPrefixes`).
Optional: without the package, or for small sets, the trie regex is used
(same results, checked by the unit tests).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable
from typing import Any

from statsd_filter.rules.prefix import PrefixSet

__all__ = ["AVAILABLE", "HyperscanPrefixes"]

try:
    import hyperscan as _hs
except ImportError:  # pragma: no cover - depends on the install
    _hs = None  # type: ignore[assignment]

AVAILABLE = _hs is not None
# Below this many prefixes the trie regex is as fast and needs no compile step.
MIN_PREFIXES = 64


def _release_compile_memory() -> None:
    # Compiling 10,000 patterns leaves ~25 MB of freed heap that glibc keeps;
    # hand it back to the OS (measured: 30 MB -> 6 MB of RSS per worker).
    if not sys.platform.startswith("linux"):
        return
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _literal(data: bytes) -> bytes:
    return b"".join(b"\\x%02x" % byte for byte in data)


class HyperscanPrefixes:
    """Finds and removes every line that starts with one of ``prefixes``.

    One Hyperscan scan per chunk reports *which* prefixes occur at a line start
    (each at most once: ``HS_FLAG_SINGLEMATCH``, so a prefix blocking thousands
    of lines costs one callback). The lines are then removed by the trie regex
    of just those prefixes, compiled once per distinct set and cached; in
    steady traffic that is one or two small patterns.
    """

    def __init__(self, prefixes: list[bytes], owners: list[int]) -> None:
        """``owners[i]`` is the stat row credited when ``prefixes[i]`` removes a line."""
        if _hs is None:  # pragma: no cover
            raise RuntimeError("hyperscan is not installed")
        self._prefixes = prefixes
        self._owners = owners
        db: Any = _hs.Database(mode=_hs.HS_MODE_BLOCK)
        expressions = [b"\n" + _literal(p) for p in prefixes]
        db.compile(
            expressions=expressions,
            ids=list(range(len(expressions))),
            elements=len(expressions),
            flags=[_hs.HS_FLAG_SINGLEMATCH] * len(expressions),
        )
        db.scratch = _hs.Scratch(db)
        self._db = db
        _release_compile_memory()
        self._removers: dict[frozenset[int], _Remover] = {}

    def remove(self, buf: bytes, credit: Callable[[int, int, int, int], None]) -> tuple[bytes, int]:
        """``buf`` (``b"\\n"`` + lines) without blocked lines, and how many went.

        ``credit(stat_row, lines, bytes, matches)`` is called for the rules that
        removed lines, each line credited to the earliest-listed prefix matching it.
        """
        found: list[int] = []
        self._db.scan(buf, match_event_handler=lambda pattern, *_: found.append(pattern))
        if not found:
            return buf, 0
        key = frozenset(found)
        remover = self._removers.get(key)
        if remover is None:
            if len(self._removers) >= REMOVER_CACHE:
                self._removers.clear()
            ids = sorted(key)
            remover = self._removers[key] = _Remover(
                [self._prefixes[i] for i in ids], [self._owners[i] for i in ids]
            )
        return remover.remove(buf, credit)

    def owner_of(self, line: bytes) -> int | None:
        """The row credited if ``line`` were removed (the earliest-listed prefix), or None."""
        found: list[int] = []
        self._db.scan(b"\n" + line, match_event_handler=lambda pattern, *_: found.append(pattern))
        return self._owners[min(found)] if found else None


# Distinct sets of matching prefixes whose removal pattern is kept compiled.
REMOVER_CACHE = 1024


class _Remover:
    """Removes lines starting with a few known prefixes (the ones a scan found)."""

    def __init__(self, prefixes: list[bytes], owners: list[int]) -> None:
        compiled = PrefixSet(prefixes)
        self._single = owners[0] if len(prefixes) == 1 else None
        self._subn = compiled.remove_pattern.subn
        self._split = compiled.split_pattern.split
        self._owned = list(zip(prefixes, owners, strict=True))  # in rule order

    def remove(self, buf: bytes, credit: Callable[[int, int, int, int], None]) -> tuple[bytes, int]:
        if self._single is not None:
            kept, count = self._subn(b"", buf)
            credit(self._single, count, len(buf) - len(kept), count)
            return kept, count
        parts = self._split(buf)  # [kept, line, prefix, kept, line, prefix, ..., kept]
        for line in parts[1::3]:
            owner = next(o for p, o in self._owned if line.startswith(p))
            credit(owner, 1, len(line) + 1, 1)
        return b"".join(parts[0::3]), len(parts) // 3
