"""Limit tables: series keys, the admit table and the local cache (C and Python twins)."""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statsd_filter.protocol.metric import KIND_METRIC, Line
from statsd_filter.rules import limittable as lt
from statsd_filter.rules.limitcache import DictCache, LocalCache, NativeCache
from statsd_filter.rules.limittable import (
    ADMITTED,
    AT_CAP,
    BUDGET_BIT,
    NEW,
    PASS,
    REFUSED,
    UNTRACKED,
    init_table,
    private_memory,
    read_table,
    table_bytes,
    table_slots,
)

try:
    from statsd_filter import _fastio  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - the accelerator is not built
    _fastio = None

needs_native = pytest.mark.skipif(not lt.NATIVE, reason="the C accelerator is not built")
TAG = st.binary(min_size=0, max_size=6).filter(lambda t: b"," not in t and b"|" not in t)


def _table(max_tracked: int) -> memoryview:
    memory = memoryview(private_memory(table_bytes(max_tracked)))
    init_table(memory, max_tracked)
    return memory


def _key(n: int) -> int:
    return lt._hash_key_py(b"series %d" % n)


# ---------------------------------------------------------------- keys
@given(
    st.binary(min_size=1, max_size=10).filter(lambda n: b":" not in n and b"|" not in n),
    st.lists(TAG.filter(bool), min_size=0, max_size=6),
    st.randoms(use_true_random=False),
)
def test_series_key_ignores_tag_order(name: bytes, tags: list[bytes], rnd: object) -> None:
    """Any order of the same tags, and any value or rate, gives the same series key."""
    shuffled = list(tags)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    a = name + b":1|c|#" + b",".join(tags)
    b = name + b":42|c|@0.5|#" + b",".join(shuffled)
    assert lt._series_key_py(a) == lt._series_key_py(b)
    assert lt.series_key(a) == lt.series_key(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (b"api.x:1|c", b"api.y:1|c"),  # name
        (b"api.x:1|c", b"api.x:1|g"),  # type
        (b"api.x:1|c|#a:1", b"api.x:1|c|#a:2"),  # tag value
        (b"api.x:1|c|#a:1", b"api.x:1|c"),  # a tag more
        (b"api.x:1|c|#a:1", b"api.x:1|c|#a:1,a:1"),  # a repeated tag is another series
        (b"api.x:1|c|#a:1,b:2", b"api.x:1|c|#a:2,b:1"),  # values swapped between keys
    ],
)
def test_series_key_tells_series_apart(a: bytes, b: bytes) -> None:
    """Name, type and every tag are part of the series."""
    assert lt.series_key(a) != lt.series_key(b)


def test_empty_tags_are_not_tags() -> None:
    """Empty tags are skipped, as Line.tags skips them."""
    assert lt.series_key(b"x:1|c|#,a,,b,") == lt.series_key(b"x:1|c|#a,b")


@needs_native
@given(st.binary(max_size=60))
def test_c_and_python_keys_agree(raw: bytes) -> None:
    """The C series key and hash are bit-identical to the Python definition, for any bytes."""
    assert _fastio.series_key(raw) == lt._series_key_py(raw)
    assert _fastio.hash_key(raw) == lt._hash_key_py(raw)
    assert 0 < _fastio.series_key(raw) < BUDGET_BIT


LINE_PART = st.sampled_from(
    [b"a", b"x.y", b":", b"1", b"-2.5e3", b"|", b"c", b"ms", b"s", b"g", b"@", b"0.5", b"1.0",
     b"2", b"#", b"k:v", b",", b"_e{", b"_sc|", b"abc", b".", b"01", b"0", b"1e-1", b"T"]
)  # fmt: skip


@needs_native
@given(st.lists(LINE_PART, max_size=10).map(b"".join))
def test_c_metric_check_never_says_yes_wrongly(raw: bytes) -> None:
    """What the C scan takes for a metric, the rule engine takes for one too, same key."""
    key = _fastio.metric_key(raw)
    if key:
        assert Line(raw).kind == KIND_METRIC
        assert key == lt._series_key_py(raw)


@needs_native
@pytest.mark.parametrize(
    "raw",
    [b"a:1|c", b"a:1:2|ms|@0.25|#k:v,b", b"set:abc|s", b"g:-1.5e3|g|#x", b"h:1|h|@1|c:abc"],
)
def test_c_metric_check_knows_common_lines(raw: bytes) -> None:
    """Ordinary StatsD and DogStatsD metric lines pass the C check (so take the fast path)."""
    assert _fastio.metric_key(raw) == lt.series_key(raw)


# ---------------------------------------------------------------- admit
def test_table_is_sized_for_twice_its_keys() -> None:
    """Slots are a power of two at least twice max_tracked; bytes follow the layout."""
    assert table_slots(100_000) == 262_144
    assert table_slots(1) == lt.MIN_SLOTS
    assert table_bytes(100_000) == 8 * (lt.TABLE_OFFSET + 3 * 262_144)


def test_admits_exactly_the_limit_per_window() -> None:
    """The first N series are admitted, the rest refused; each answer is sticky in the window."""
    table = _table(100)
    results = [lt.admit(table, _key(i), 0, 5, 7, b"m") for i in range(8)]
    assert results == [ADMITTED | NEW] * 5 + [NEW] * 3
    again = [lt.admit(table, _key(i), 0, 5, 7, b"m") for i in range(8)]
    assert again == [ADMITTED] * 5 + [0] * 3
    state = read_table(table)
    assert (state.window, state.admitted, state.refused) == (7, 5, 3)
    assert state.offenders == ((b"m", 3),)


def test_a_new_window_starts_empty() -> None:
    """Window rollover forgets admitted and refused series: new ones get the budget."""
    table = _table(100)
    for i in range(6):
        lt.admit(table, _key(i), 0, 3, 1, b"m")
    assert [lt.admit(table, _key(i), 0, 3, 2, b"m") for i in range(10, 14)] == [
        ADMITTED | NEW
    ] * 3 + [NEW]
    assert lt.admit(table, _key(0), 0, 3, 2, b"m") == NEW  # admitted last window, not this one
    state = read_table(table)
    assert (state.window, state.admitted, state.refused, state.offenders) == (
        2,
        3,
        2,
        ((b"m", 2),),
    )


def test_budgets_are_independent() -> None:
    """Per-tag budgets: each value gets the whole limit."""
    table = _table(100)
    a, b = BUDGET_BIT | 11, BUDGET_BIT | 22
    first = [lt.admit(table, _key(i), a, 2, 0, b"a") for i in range(4)]
    second = [lt.admit(table, _key(i + 100), b, 2, 0, b"b") for i in range(4)]
    assert first == second == [ADMITTED | NEW] * 2 + [NEW] * 2
    state = read_table(table)
    assert (state.admitted, state.budgets, state.used) == (4, 2, 6)


def test_cap_refuses_new_series_and_counts() -> None:
    """At max_tracked admitted entries a new series is refused (AT_CAP) though its budget has
    room; once the refused table is full too, refusals are not remembered (UNTRACKED)."""
    table = _table(4)
    budgets = [BUDGET_BIT | (100 + i) for i in range(4)]
    # Two budgets of one series each fill the 4 entries.
    assert lt.admit(table, _key(0), budgets[0], 10, 0, b"x") == ADMITTED | NEW
    assert lt.admit(table, _key(1), budgets[1], 10, 0, b"x") == ADMITTED | NEW
    results = [lt.admit(table, _key(i), budgets[2], 10, 0, b"y") for i in range(2, 8)]
    assert results == [NEW | AT_CAP] * 4 + [NEW | AT_CAP | UNTRACKED] * 2
    assert lt.admit(table, _key(2), budgets[2], 10, 0, b"y") == 0  # remembered: refused
    assert lt.admit(table, _key(7), budgets[2], 10, 0, b"y") == NEW | AT_CAP | UNTRACKED
    state = read_table(table)
    assert (state.used, state.refused, state.untracked, state.at_cap) == (4, 4, 3, 7)


def test_offenders_keep_the_heavy_hitters() -> None:
    """The top-8 list keeps the names refused most, with counts never below the truth."""
    table = _table(10_000)
    lt.admit(table, _key(0), 0, 1, 0, b"ok")
    n = 1
    truth = {b"heavy": 50, b"second": 20}
    truth.update({b"noise%d" % i: 1 for i in range(30)})
    for name, count in truth.items():
        for _ in range(count):
            lt.admit(table, _key(n), 0, 1, 0, name)
            n += 1
    top = read_table(table).offenders
    assert [name for name, _ in top[:2]] == [b"heavy", b"second"]
    assert len(top) == lt.OFFENDERS
    assert all(count >= truth[name] for name, count in top)


def test_long_names_are_cut() -> None:
    """Offender names longer than the slot are cut at 112 bytes, never spill over."""
    table = _table(10)
    lt.admit(table, _key(0), 0, 0, 0, b"n" * 300)
    assert read_table(table).offenders == ((b"n" * lt.OFFENDER_NAME, 1),)


@pytest.mark.parametrize("impl", ["native", "python"])
def test_admit_refuses_what_is_not_a_table(impl: str) -> None:
    """A buffer that is not a table, or a key out of range, is an error, never a wild write."""
    admit = _fastio.limit_admit if impl == "native" else lt._admit_py
    if impl == "native" and not lt.NATIVE:
        pytest.skip("the C accelerator is not built")
    with pytest.raises(ValueError, match="not a limit table"):
        admit(memoryview(bytearray(4096)), 5, 0, 1, 0, b"")
    with pytest.raises(ValueError, match="bad key"):
        admit(_table(10), BUDGET_BIT | 5, 0, 1, 0, b"")
    broken = _table(10)
    broken.cast("Q")[lt.H_CAP] = 10_000
    with pytest.raises(ValueError, match="half its slots"):
        admit(broken, 5, 0, 1, 0, b"")


OPS = st.lists(
    st.tuples(
        st.integers(0, 40),  # series
        st.sampled_from([0, BUDGET_BIT | 1, BUDGET_BIT | 2, BUDGET_BIT | 3]),
        st.integers(0, 6),  # limit
        st.integers(0, 2),  # window
        st.sampled_from([b"a", b"b", b"c", b"d" * 200, b""]),
    ),
    max_size=80,
)


@needs_native
@settings(max_examples=200)
@given(st.integers(1, 12), OPS)
def test_c_and_python_admit_agree_byte_for_byte(max_tracked: int, ops: list[tuple]) -> None:  # type: ignore[type-arg]
    """Any sequence of admissions gives the same answers and the same memory in C and Python."""
    native, python = _table(max_tracked), _table(max_tracked)
    for series, budget, limit, window, label in ops:
        key = _key(series)
        assert _fastio.limit_admit(native, key, budget, limit, window, label) == lt._admit_py(
            python, key, budget, limit, window, label
        )
    assert native.tobytes() == python.tobytes()


@settings(max_examples=100)
@given(st.integers(1, 8), st.lists(st.tuples(st.integers(0, 20), st.integers(0, 3)), max_size=60))
def test_admit_matches_a_set_model(limit: int, ops: list[tuple[int, int]]) -> None:
    """Per budget, the admitted series are exactly the first `limit` distinct ones."""
    table = _table(1000)
    admitted: dict[int, list[int]] = {}
    for series, budget in ops:
        key = _key(series * 10 + budget)
        got = lt.admit(table, key, BUDGET_BIT | (budget + 1), limit, 0, b"n") & ADMITTED
        members = admitted.setdefault(budget, [])
        expected = key in members or len(members) < limit
        if expected and key not in members:
            members.append(key)
        assert bool(got) == expected


# ---------------------------------------------------------------- local cache
CACHES = [pytest.param(NativeCache, marks=needs_native), DictCache]


@pytest.mark.parametrize("kind", CACHES)
def test_cache_remembers_up_to_its_capacity(kind: Callable[[int], LocalCache]) -> None:
    """Values are kept per key, updated in place, refused beyond capacity, gone after clear."""
    cache = kind(4)
    assert all(cache.put(k, k * 4 + PASS) for k in (1, 2, 3, 4))
    assert not cache.put(5, PASS)
    assert cache.put(3, REFUSED)  # an update needs no room
    assert [cache.get(k) for k in (1, 2, 3, 4, 5)] == [5, 9, REFUSED, 17, -1]
    cache.clear()
    assert cache.get(1) == -1
    assert cache.put(5, PASS)
    cache.clear()
    cache.clear()  # clearing an empty cache is fine


def _codes(codes: list[int], chunk: bytes) -> list[tuple[bytes, int]]:
    """(line, slot that drops it or 0) for each code the scan returned."""
    out = []
    for code in codes:
        start = code >> 17
        end = chunk.find(b"\n", start + 1)
        line = chunk[start + 1 : end if end >= 0 else len(chunk)]
        out.append((line, code >> 1 & 0xFFFF if code & 1 else 0))
    return out


EPOCH = 1 << lt.EPOCH_SHIFT


def _counts() -> array[int]:
    return array("q", [0] * (2 * lt.COUNT_FIELDS))


@needs_native
def test_scan_passes_known_series_and_reports_the_rest() -> None:
    """The C scan counts cached passes per slot and lists every other line, in order."""
    cache = NativeCache(100)
    for raw, value in (
        (b"a:1|c", EPOCH | 1 << 2 | PASS),
        (b"b:1|c|#k:v", EPOCH | PASS),
        (b"c:1|c", EPOCH | 1 << 2 | REFUSED),
    ):
        cache.put(lt.series_key(raw), value)
    counts = _counts()
    chunk = b"\na:5|c\nb:2|c|#k:v\na:1|c\nc:1|c\na:1|c\nbad line\nz:1|c\n\nb:1|c|#k:v"
    codes = cache.scan(chunk, counts, 1, [None, None])
    assert _codes(codes, chunk) == [(b"c:1|c", 0), (b"bad line", 0), (b"z:1|c", 0)]
    assert (counts[0], counts[lt.COUNT_FIELDS]) == (2, 3)
    # With the rule's table named (and dropping), a refused line is cut in C.
    table = _table(10)
    codes = cache.scan(chunk, counts, 1, [None, (table, 0, True, 0, b"", -1, 0)])
    assert _codes(codes, chunk)[0] == (b"c:1|c", 1)
    assert cache.scan(b"", counts, 1, []) == []
    one = array("q", [0] * lt.COUNT_FIELDS)  # a slot beyond the counts: judged per line
    assert _codes(cache.scan(b"\na:1|c", one, 1, []), b"\na:1|c") == [(b"a:1|c", 0)]


@needs_native
def test_scan_asks_the_shared_table_about_expired_decisions() -> None:
    """An entry of an earlier epoch keeps its rule: the table's answer for this window counts,
    without the lock; a series the table has not decided yet goes per line."""
    table = _table(100)
    admitted, refused, undecided = (lt.series_key(b"m:1|c|#id:%d" % i) for i in range(3))
    assert lt.admit(table, admitted, 0, 1, 5, b"m") == ADMITTED | NEW
    assert lt.admit(table, refused, 0, 1, 5, b"m") == NEW
    assert _fastio.limit_peek(table, admitted, 5) == 1
    assert _fastio.limit_peek(table, refused, 5) == 0
    assert _fastio.limit_peek(table, undecided, 5) == -1
    assert _fastio.limit_peek(table, admitted, 6) == -1  # another window: ask under the lock
    cache = NativeCache(100)
    for key in (admitted, refused, undecided):
        cache.put(key, EPOCH | 1 << 2 | PASS)  # all passed in epoch 1
    counts = _counts()
    chunk = b"\nm:1|c|#id:0\nm:1|c|#id:1\nm:1|c|#id:2"
    codes = cache.scan(chunk, counts, 2, [None, (table, 5, True, 0, b"", -1, 0)])
    assert _codes(codes, chunk) == [(b"m:1|c|#id:1", 1), (b"m:1|c|#id:2", 0)]
    assert counts[lt.COUNT_FIELDS] == 1
    assert cache.get(admitted) == 2 * EPOCH | 1 << 2 | PASS  # refreshed
    assert cache.get(refused) == 2 * EPOCH | 1 << 2 | REFUSED
    assert cache.get(undecided) == EPOCH | 1 << 2 | PASS  # left for the per-line path
    # Without a table for the rule (limit_tag_values), expired entries go per line.
    assert len(cache.scan(b"\nm:1|c|#id:0", counts, 3, [None, None])) == 1


def test_a_late_clock_never_sends_the_table_back() -> None:
    """A caller still in the previous window is answered for the table's window."""
    table = _table(100)
    assert lt.admit(table, _key(1), 0, 1, 8, b"m") == ADMITTED | NEW
    assert lt.admit(table, _key(2), 0, 1, 7, b"m") == NEW  # window 8's budget is spent
    assert lt.admit(table, _key(1), 0, 1, 7, b"m") == ADMITTED
    assert read_table(table).window == 8


def test_python_cache_has_no_scan() -> None:
    """The fallback cache never claims the whole-chunk path."""
    cache = DictCache(4)
    assert not cache.native
    with pytest.raises(NotImplementedError):
        cache.scan(b"\na:1|c", array("q", [0]), 1, [])


def test_cache_pairs_of_series_stay_distinct() -> None:
    """Keys of many series do not collide in practice (a sanity check of the hash)."""
    names = [b"m%d:1|c|#id:%d" % (i, j) for i, j in itertools.product(range(100), range(100))]
    assert len({lt.series_key(n) for n in names}) == len(names)


@needs_native
def test_scan_decides_expired_series_under_the_lock() -> None:
    """Given the limit and the lock, the scan decides a series not decided in this window
    itself, and counts the refusals; a table it cannot lock leaves the line per line."""
    table = _table(100)
    keys = [lt.series_key(b"m:1|c|#svc:a,id:%d" % i) for i in range(3)]
    cache = NativeCache(100)
    for key in keys:
        cache.put(key, EPOCH | 1 << 2 | PASS)
    counts = _counts()
    chunk = b"\nm:1|c|#svc:a,id:0\nm:1|c|#id:1,svc:a\nm:1|c|#svc:a,id:2"
    codes = cache.scan(chunk, counts, 2, [None, (table, 9, True, 2, b"svc:", -1, 0)])
    assert _codes(codes, chunk) == [(b"m:1|c|#svc:a,id:2", 1)]
    f = lt.COUNT_FIELDS
    assert (counts[f + lt.C_PASSED], counts[f + lt.C_SERIES_LIMITED]) == (2, 1)
    state = read_table(table)
    assert (state.window, state.admitted, state.budgets, state.refused) == (9, 2, 1, 1)
    assert state.offenders == ((b"m svc:a", 1),)
    stale = NativeCache(10)
    stale.put(lt.series_key(b"m:1|c|#x"), EPOCH | 1 << 2 | PASS)
    bad_lock = (table, 9, True, 2, b"", 999_999, 0)  # not a descriptor: cannot lock
    assert len(stale.scan(b"\nm:1|c|#x", counts, 2, [None, bad_lock])) == 1
