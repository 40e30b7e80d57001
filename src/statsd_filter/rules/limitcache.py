"""Each worker's local cache of limit decisions, for the whole-chunk scan.

The local cache is each worker's memory of decisions: key -> ``epoch << 32 |
slot << 2 | decision`` (slot 0: no limit rule matched the series; decision PASS
or REFUSED). The epoch counts the worker's windows: an entry of an earlier one
still names the series' rule, and the C scan asks that rule's shared table
whether the series was decided in the current window yet (without the lock: see
``limittable.admit``), so after a window ends only the first worker to meet a
series decides it through the per-line path. Natively the cache is a table in
memory (two header words, count and mask, then key/value pairs) that the scan
runs over a whole chunk in C; otherwise a dict. Its memory is a private
anonymous mapping, so pages are used only as keys land on them, and clearing it
hands them back.
"""

from __future__ import annotations

import mmap
from array import array
from collections.abc import Sequence

from statsd_filter.rules.limittable import NATIVE, private_memory, table_slots

try:
    from statsd_filter import _fastio  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - exercised when the extension is not built
    _fastio = None

__all__ = [
    "INITIAL_CACHE_SLOTS",
    "DictCache",
    "LocalCache",
    "NativeCache",
    "ScanTable",
    "new_cache",
]

# A local cache starts with this many slots (1 MiB) and doubles as it fills.
INITIAL_CACHE_SLOTS = 1 << 16

# For the scan: a limit_series rule's table, its current window, whether it drops,
# and what deciding a series there takes: the limit, per_tag's "key:" and the lock.
ScanTable = tuple[memoryview, int, bool, int, bytes, int, int]


class LocalCache:
    """A worker's decisions for the current window (see the module docstring)."""

    native = False
    capacity: int

    def get(self, key: int) -> int:
        """``epoch << 32 | slot << 2 | decision``, or -1."""
        raise NotImplementedError

    def put(self, key: int, value: int) -> bool:
        """Remember a decision; False when the cache is full (the caller asks again later)."""
        raise NotImplementedError

    def clear(self) -> None:
        raise NotImplementedError

    def scan(
        self, chunk: bytes, counts: array[int], epoch: int, tables: Sequence[ScanTable | None]
    ) -> list[int]:
        """The lines of ``chunk`` the cache does not pass, as ``offset << 17`` (judge
        it per line; ``offset``: of the ``\\n`` before it) or ``offset << 17 | slot
        << 1 | 1`` (refused by the rule in ``slot``, which drops); for every line it
        passes ``counts[slot * COUNT_FIELDS + C_PASSED] += 1``. ``tables[slot]``
        (:data:`ScanTable`) is a limit_series rule's, for entries of an earlier
        epoch: the scan reads the table's decision for this window, or makes it under
        the lock (counting new refusals and cap hits in ``counts`` too). Native
        caches only."""
        raise NotImplementedError


class NativeCache(LocalCache):
    """The cache as an open-addressing table in memory, for the C scan.

    It starts small and doubles when half full, up to twice ``capacity``
    slots: a table sized for the series a worker really meets keeps more of it
    in the CPU caches than one sized for the worst case (every line's probe is
    a memory access).
    """

    native = True

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._max_slots = table_slots(capacity)
        self._new_table(min(self._max_slots, INITIAL_CACHE_SLOTS))

    def _new_table(self, slots: int) -> None:
        self.buffer = private_memory(16 + 16 * slots)
        self._words = memoryview(self.buffer).cast("Q")
        self._words[1] = slots - 1
        self._slots = slots

    def get(self, key: int) -> int:
        return _fastio.cache_get(self.buffer, key)  # type: ignore[no-any-return]

    def put(self, key: int, value: int) -> bool:
        while True:
            limit = min(self.capacity, self._slots // 2)
            if _fastio.cache_put(self.buffer, key, value, limit):
                return True
            if limit >= self.capacity or self._slots >= self._max_slots:
                return False
            old, old_words = self.buffer, self._words
            self._new_table(self._slots * 2)
            _fastio.cache_copy(old, self.buffer)
            old_words.release()
            old.close()

    def clear(self) -> None:
        if self._words[0] == 0:
            return
        if self._slots > INITIAL_CACHE_SLOTS:
            self._words.release()
            self.buffer.close()
            self._new_table(min(self._max_slots, INITIAL_CACHE_SLOTS))
            return
        try:
            # Zero pages for free, and the memory goes back to the system.
            self.buffer.madvise(mmap.MADV_DONTNEED)
        except (AttributeError, OSError):  # pragma: no cover - no madvise here
            _fastio.cache_clear(self.buffer)
            return
        self._words[1] = self._slots - 1

    def scan(
        self, chunk: bytes, counts: array[int], epoch: int, tables: Sequence[ScanTable | None]
    ) -> list[int]:
        return _fastio.limit_scan(chunk, self.buffer, counts, epoch, tables)  # type: ignore[no-any-return]


class DictCache(LocalCache):
    """The cache as a dict (no accelerator: every chunk takes the per-line path)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._map: dict[int, int] = {}

    def get(self, key: int) -> int:
        return self._map.get(key, -1)

    def put(self, key: int, value: int) -> bool:
        if key in self._map or len(self._map) < self.capacity:
            self._map[key] = value
            return True
        return False

    def clear(self) -> None:
        self._map.clear()


def new_cache(capacity: int, native: bool = NATIVE) -> LocalCache:
    """The best local cache available."""
    return NativeCache(capacity) if native else DictCache(capacity)
