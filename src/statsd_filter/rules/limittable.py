"""The data behind the limit rules: series keys, the shared table, the local cache.

Pure code over byte buffers; no sockets, no locks, no clock (``limits.py`` and
``limitpool.py`` add those). Each function has a C twin in the accelerator
(``csrc/fastio/keys.c``, ``cache.c``, ``admit.c``, ``scan.c``) that computes exactly
the same thing; a test runs both on the same inputs.

**Series keys.** A series is a metric line's name, type and tags, in any tag
order. Its key is 63 bits::

    a = words(name)        # the bytes before the first ":"
    b = words(type)        # the second "|" field
    t = sum(mix64(words(tag)) for tag in tags) mod 2**64   # order-independent
    key = mix64(mix64(mix64(a) ^ (b * GOLDEN)) + t) & (2**63 - 1)   (1 if 0)

where ``words`` takes eight bytes per step (``h = (h ^ word) * GOLDEN; h ^=
h >> 32``, from ``h = len * C``: a few cycles per word, where a byte-wise hash
took most of the scan's time) and ``mix64`` is the splitmix64 finaliser. It
is no cryptographic hash: clients could craft colliding series on purpose (a
collision lets a new series pass as an admitted one). Two distinct series share a key with
probability 2**-63 per pair: among a million live series, about one chance in
ten million that any two do (they would then share one decision). The value,
the sample rate and other sections are not part of a series.

**The shared table** of one rule, in 64-bit words::

    header      16 words: MAGIC, SLOTS, CAP, WINDOW (number + 1), then this
                window's counts: ADMITTED, USED, REFUSED, UNTRACKED, AT_CAP, BUDGETS
    offenders   8 x 16 words: count, length, name (112 bytes)
    admitted    SLOTS x 2 words: key, value (1 for a series; a count for a budget)
    refused     SLOTS x 1 word: key

Open addressing with linear probing; SLOTS is a power of two at least twice CAP
(``max_tracked``), and neither table ever holds more than CAP keys, so every
probe ends at an empty slot. That is 24 bytes per slot, 48 to 96 bytes per
tracked series. A budget (one per ``per_tag`` value, or per tag key for
``limit_tag_values``) is an entry of the admitted table whose key has the top
bit set; a rule without ``per_tag`` has one budget, the ADMITTED count.

:func:`admit` decides one new series, under the caller's lock. The first call
in a new window clears the table (the window number is written last, so a
process killed half-way leaves a table the next call clears again); a caller
whose clock is a hair behind (still in the previous window) is answered for the
table's window, never sends it back. A series
admitted or refused earlier in the window gets the same answer. Otherwise it
is admitted if its budget has room and the admitted table has CAP entries or
fewer afterwards; if not, it is refused and remembered in the refused table
(counted once per window, whichever worker meets it first) unless that holds
CAP keys already (UNTRACKED). Refused series also feed the offenders list, a
space-saving top-8 of names (a heavy hitter's count is never under-stated).

The local cache that remembers these decisions per worker is in
``limitcache.py``.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from dataclasses import dataclass

try:
    from statsd_filter import _fastio  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - exercised when the extension is not built
    _fastio = None

__all__ = [
    "ADMITTED",
    "AT_CAP",
    "BUDGET_BIT",
    "COUNT_FIELDS",
    "C_PASSED",
    "C_SERIES_LIMITED",
    "C_TRACKING_FULL",
    "EPOCH_SHIFT",
    "NATIVE",
    "NEW",
    "PASS",
    "REFUSED",
    "SLOT_SHIFT",
    "UNTRACKED",
    "TableState",
    "admit",
    "hash_key",
    "init_table",
    "native_scan",
    "peek",
    "private_memory",
    "read_table",
    "series_key",
    "table_bytes",
    "table_slots",
]

NATIVE = _fastio is not None and hasattr(_fastio, "limit_admit")

_MASK64 = (1 << 64) - 1
_KEY_MASK = (1 << 63) - 1
BUDGET_BIT = 1 << 63
_LEN_MULT = 0xFF51AFD7ED558CCD
_GOLDEN = 0x9E3779B97F4A7C15

# Header words.
MAGIC = int.from_bytes(b"SFLIMIT1", "little")
H_MAGIC, H_SLOTS, H_CAP, H_WINDOW = 0, 1, 2, 3
H_ADMITTED, H_USED, H_REFUSED, H_UNTRACKED, H_AT_CAP, H_BUDGETS = 4, 5, 6, 7, 8, 9
HEADER_WORDS = 16
OFFENDERS = 8  # enough to name the few names behind an explosion
OFFENDER_WORDS = 16
OFFENDER_NAME = 8 * (OFFENDER_WORDS - 2)  # 112 bytes: longer names are cut
TABLE_OFFSET = HEADER_WORDS + OFFENDERS * OFFENDER_WORDS
MIN_SLOTS = 16

# admit() result flags; 0 means "refused earlier in this window".
ADMITTED, NEW, AT_CAP, UNTRACKED = 1, 2, 4, 8
# Local cache decisions, and where the slot and the epoch sit in a value.
PASS, REFUSED = 1, 2
SLOT_SHIFT, EPOCH_SHIFT = 2, 32
# What the scan counts per slot: counts[slot * COUNT_FIELDS + field].
COUNT_FIELDS = 4
C_PASSED, C_SERIES_LIMITED, C_TRACKING_FULL = 0, 1, 2


# ---------------------------------------------------------------- keys
def _words(data: bytes) -> int:
    h = (len(data) * _LEN_MULT) & _MASK64
    for i in range(0, len(data), 8):
        h = ((h ^ int.from_bytes(data[i : i + 8], "little")) * _GOLDEN) & _MASK64
        h ^= h >> 32
    return h


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _as_key(h: int) -> int:
    return (h & _KEY_MASK) or 1


def _series_key_py(raw: bytes) -> int:
    colon = raw.find(b":")
    name = raw if colon < 0 else raw[:colon]
    fields = raw.split(b"|")
    type_ = fields[1] if len(fields) > 1 else b""
    tags = 0
    for extra in fields[1:]:
        if extra.startswith(b"#"):
            for tag in extra[1:].split(b","):
                if tag:
                    tags += _mix64(_words(tag))
            break
    h = _mix64(_mix64(_words(name)) ^ ((_words(type_) * _GOLDEN) & _MASK64))
    return _as_key(_mix64((h + tags) & _MASK64))


def _hash_key_py(data: bytes) -> int:
    return _as_key(_mix64(_words(data)))


if NATIVE:
    series_key = _fastio.series_key
    hash_key = _fastio.hash_key
else:  # pragma: no cover - exercised when the extension is not built
    series_key = _series_key_py
    hash_key = _hash_key_py


# ---------------------------------------------------------------- shared table
def table_slots(max_tracked: int) -> int:
    """Slots of each table for ``max_tracked`` keys: a power of two, at least twice that."""
    slots = MIN_SLOTS
    while slots < 2 * max_tracked:
        slots *= 2
    return slots


def table_bytes(max_tracked: int) -> int:
    """Bytes of one rule's table (header, offenders, admitted and refused tables)."""
    return 8 * (TABLE_OFFSET + 3 * table_slots(max_tracked))


def init_table(table: memoryview, max_tracked: int) -> None:
    """Lay out an all-zero buffer of :func:`table_bytes` as an empty table."""
    words = table.cast("Q")
    words[H_SLOTS] = table_slots(max_tracked)
    words[H_CAP] = max_tracked
    words[H_MAGIC] = MAGIC


def _offender_add(table: memoryview, w: memoryview, label: bytes) -> None:
    label = label[:OFFENDER_NAME]
    empty = least = -1
    for k in range(OFFENDERS):
        base = HEADER_WORDS + k * OFFENDER_WORDS
        if w[base] == 0:
            if empty < 0:
                empty = base
            continue
        name = (base + 2) * 8
        if w[base + 1] == len(label) and table[name : name + len(label)] == label:
            w[base] += 1
            return
        if least < 0 or w[base] < w[least]:
            least = base
    slot = empty if empty >= 0 else least
    count = 1 if empty >= 0 else w[least] + 1
    name = (slot + 2) * 8
    table[name : name + OFFENDER_NAME] = label.ljust(OFFENDER_NAME, b"\0")
    w[slot + 1] = len(label)
    w[slot] = count


def _admit_py(
    table: memoryview, key: int, budget: int, limit: int, window: int, label: bytes
) -> int:
    w = table.cast("Q")
    slots = w[H_SLOTS]
    if (
        not 0 < key <= _KEY_MASK
        or slots == 0
        or slots & (slots - 1)
        or len(w) < (TABLE_OFFSET + 3 * slots)
    ):
        raise ValueError("not a limit table, or a bad key")
    mask, cap = slots - 1, w[H_CAP]
    if cap > slots // 2:
        raise ValueError("limit table holds more keys than half its slots")
    adm, ref = TABLE_OFFSET, TABLE_OFFSET + 2 * slots
    window = max(window, w[H_WINDOW] - 1)
    if w[H_WINDOW] != window + 1:
        table[adm * 8 : (adm + 3 * slots) * 8] = bytes(3 * slots * 8)
        table[HEADER_WORDS * 8 : TABLE_OFFSET * 8] = bytes((TABLE_OFFSET - HEADER_WORDS) * 8)
        for field in range(H_ADMITTED, H_BUDGETS + 1):
            w[field] = 0
        w[H_WINDOW] = window + 1
    i = key & mask
    while w[adm + 2 * i]:
        if w[adm + 2 * i] == key:
            return ADMITTED
        i = (i + 1) & mask
    j = key & mask
    while w[ref + j]:
        if w[ref + j] == key:
            return 0
        j = (j + 1) & mask
    count, b, found = w[H_ADMITTED], 0, False
    if budget:
        count, b = 0, budget & mask
        while w[adm + 2 * b]:
            if w[adm + 2 * b] == budget:
                found, count = True, w[adm + 2 * b + 1]
                break
            b = (b + 1) & mask
    result = 0
    if count < limit:
        need = 2 if budget and not found else 1
        if w[H_USED] + need <= cap:
            w[adm + 2 * i + 1] = 1
            w[adm + 2 * i] = key
            if budget:
                if not found:
                    b = budget & mask
                    while w[adm + 2 * b]:
                        b = (b + 1) & mask
                    w[adm + 2 * b + 1] = 0
                    w[adm + 2 * b] = budget
                    w[H_BUDGETS] += 1
                w[adm + 2 * b + 1] += 1
            w[H_ADMITTED] += 1
            w[H_USED] += need
            return ADMITTED | NEW
        result |= AT_CAP
        w[H_AT_CAP] += 1
    result |= NEW
    if w[H_REFUSED] < cap:
        w[ref + j] = key
        w[H_REFUSED] += 1
    else:
        result |= UNTRACKED
        w[H_UNTRACKED] += 1
    _offender_add(table, w, label)
    return result


admit = _fastio.limit_admit if NATIVE else _admit_py
# limit_peek(table, key, window) -> 1 admitted, 0 refused, -1 not known: no lock (C only).
peek: Callable[[memoryview, int, int], int] | None = _fastio.limit_peek if NATIVE else None
native_scan: Callable[..., list[int]] | None = _fastio.limit_scan if NATIVE else None


@dataclass(frozen=True)
class TableState:
    """What one table holds, as the supervisor reports it."""

    window: int  # the window number the counts belong to (-1: never used)
    admitted: int
    used: int
    refused: int
    untracked: int
    at_cap: int
    budgets: int
    offenders: tuple[tuple[bytes, int], ...]  # (name, new series refused), most first


def read_table(table: memoryview) -> TableState:
    """The counts and offenders of a table (a consistent view needs the lock)."""
    w = table.cast("Q")
    offenders = []
    for k in range(OFFENDERS):
        base = HEADER_WORDS + k * OFFENDER_WORDS
        count, length = w[base], min(w[base + 1], OFFENDER_NAME)
        if count:
            offenders.append((bytes(table[(base + 2) * 8 : (base + 2) * 8 + length]), count))
    offenders.sort(key=lambda item: (-item[1], item[0]))
    return TableState(
        w[H_WINDOW] - 1,
        w[H_ADMITTED],
        w[H_USED],
        w[H_REFUSED],
        w[H_UNTRACKED],
        w[H_AT_CAP],
        w[H_BUDGETS],
        tuple(offenders),
    )


def private_memory(size: int) -> mmap.mmap:
    """``size`` zero bytes of this process's own memory, used only as they are touched.

    Asks for huge pages where the kernel has them: a probe lands anywhere in a
    table of megabytes, and with 4 KiB pages nearly every probe also misses the
    TLB (measured: 500 against 130 ns per line for the scan of a 16 MiB cache).
    """
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None and size >= 2 << 20:
        try:
            memory.madvise(advice)
        except OSError:  # pragma: no cover - huge pages disabled: still correct
            pass
    return memory
