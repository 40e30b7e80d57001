"""Shared limit memory: regions, cross-process locks, global exactness, the supervisor's view."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from statsd_filter.config import ConfigError, Generation, Settings, load_settings
from statsd_filter.limitpool import PAGE, LimitPool, LimitRegions, LimitSlot, limit_bytes
from statsd_filter.rules import limits as limits_module
from statsd_filter.rules import limittable as lt
from statsd_filter.rules.limits import LIMITED, SERIES_LIMITED
from statsd_filter.rules.model import RuleSpec, parse_rules
from statsd_filter.stats import SharedStats
from statsd_filter.supervisor import limits as limits_watch_module
from statsd_filter.supervisor.limits import LimitWatch, limit_report, read_state
from statsd_filter.supervisor.reload import Reloader


@pytest.fixture
def pool() -> Iterator[LimitPool]:
    p = LimitPool(8 << 20)
    yield p
    p.close()


def _spec(name: str = "cap", **kw: Any) -> RuleSpec:
    rule = {
        "name": name,
        "match": {"prefix": "api."},
        "action": "limit_series",
        "max_series": 50,
        "max_tracked": 1000,
    }
    (spec,) = parse_rules([{**rule, **kw}])
    return spec


def _run_children(count: int, body: Any) -> list[int]:
    """Fork ``count`` children running ``body(i) -> int`` (0..255); their results, in order."""
    pids = []
    for i in range(count):
        pid = os.fork()
        if pid == 0:  # child: no pytest machinery, leave with the result as status
            code = 255
            try:
                code = body(i)
            finally:
                os._exit(code)
        pids.append(pid)
    results = []
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        results.append(os.waitstatus_to_exitcode(status))
    return results


# ---------------------------------------------------------------- the pool
def test_regions_are_page_aligned_reused_and_coalesced() -> None:
    """Allocation is first-fit in pages; released neighbours merge back into one region."""
    with LimitPoolContext(64 * PAGE) as pool:
        _regions_are_page_aligned_reused_and_coalesced(pool)


def _regions_are_page_aligned_reused_and_coalesced(pool: LimitPool) -> None:
    a = pool.allocate(1)
    b = pool.allocate(PAGE + 1)
    c = pool.allocate(PAGE)
    assert (a, b, c) == (0, PAGE, 3 * PAGE)
    assert pool.allocate(64 * PAGE) is None
    pool.release(a, 1)  # type: ignore[arg-type]
    pool.release(b, PAGE + 1)  # type: ignore[arg-type]
    assert pool.allocate(3 * PAGE) == 0  # a and b merged
    pool.release(0, 3 * PAGE)
    pool.release(c, PAGE)  # type: ignore[arg-type]
    assert pool.free_bytes() == 64 * PAGE
    assert pool.allocate(64 * PAGE) == 0


def test_released_memory_reads_zero(pool: LimitPool) -> None:
    """A released region comes back zeroed, so a new table never sees an old one's keys."""
    slot = LimitSlot(0, 2 * PAGE, ())
    pool.allocate(2 * PAGE)
    pool.view(slot)[:5] = b"stale"
    pool.release(0, 2 * PAGE)
    pool.allocate(2 * PAGE)
    assert bytes(pool.view(slot)[:5]) == bytes(5)


def test_lock_is_exclusive_across_processes_and_dies_with_its_holder(pool: LimitPool) -> None:
    """A region lock held by another process is busy; the kernel frees it when that dies."""
    lock = pool.lock(LimitSlot(PAGE, PAGE, ()))
    other = pool.lock(LimitSlot(2 * PAGE, PAGE, ()))
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            lock.acquire()
            os.write(ready_w, b"x")
            time.sleep(30)
        finally:
            os._exit(code)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"x"
        assert not lock.try_acquire()
        assert other.try_acquire()  # one byte per region: others are free
        other.release()
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
    assert lock.try_acquire()
    lock.release()


@pytest.mark.parametrize("impl", ["native", "python"])
@pytest.mark.parametrize("processes", [2, 4])
def test_limit_is_global_across_processes(
    pool: LimitPool, monkeypatch: pytest.MonkeyPatch, impl: str, processes: int
) -> None:
    """N processes racing over the same 2,000 series through one table admit exactly 500."""
    if impl == "native" and not lt.NATIVE:
        pytest.skip("the C accelerator is not built")
    if impl == "python":
        monkeypatch.setattr(limits_module, "admit", lt._admit_py)
    spec = _spec(max_tracked=5000)
    regions = LimitRegions(pool)
    slot = regions.assign([spec], {}, 0)["cap"]
    keys = [lt.series_key(b"api.x:1|c|#id:%d" % i) for i in range(2000)]

    r, w = os.pipe()

    def body(i: int) -> int:
        table = pool.table(slot)
        order = list(keys)
        random.Random(i).shuffle(order)
        new_admissions = 0
        for _ in range(3):  # again and again: answers never change within the window
            for key in order:
                result = table.admit(key, 0, 500, 7, b"api.x")
                new_admissions += result == lt.ADMITTED | lt.NEW
        os.write(w, b"%d;" % new_admissions)
        admitted = sum(1 for key in keys if table.admit(key, 0, 500, 7, b"api.x") & lt.ADMITTED)
        return admitted // 10  # an exit status holds 0..255

    results = _run_children(processes, body)
    os.close(w)
    reports = os.read(r, 4096).decode()
    os.close(r)
    assert results == [50] * processes  # every process sees the same 500 admitted
    assert sum(int(n) for n in reports.split(";") if n) == 500  # each admitted once, globally
    state = read_state(pool, slot)
    assert (state.admitted, state.refused) == (500, 1500)
    assert state.offenders == ((b"api.x", 1500),)


def test_new_series_are_decided_once_whoever_meets_them(pool: LimitPool) -> None:
    """Across 4 processes, each new series is admitted (or refused) by exactly one of them."""
    slot = LimitRegions(pool).assign([_spec(max_tracked=1000)], {}, 0)["cap"]
    r, w = os.pipe()

    def body(i: int) -> int:
        table = pool.table(slot)
        first = [
            n
            for n in range(100)
            if table.admit(lt.series_key(b"m:1|c|#n:%d" % n), 0, 30, 1, b"m") & lt.NEW
        ]
        os.write(w, (",".join(map(str, first)) + ";").encode())
        return 0

    assert _run_children(4, body) == [0] * 4
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    decided = [int(n) for part in data.decode().split(";") if part for n in part.split(",")]
    assert sorted(decided) == list(range(100))


# ---------------------------------------------------------------- regions across reloads
def test_reload_keeps_unchanged_tables_and_replaces_changed_ones(pool: LimitPool) -> None:
    """Same name and limit parameters: same region (state kept); otherwise a new, empty one."""
    regions = LimitRegions(pool)
    gen0 = regions.assign([_spec("a"), _spec("b"), _spec("c")], {}, 0)
    pool.table(gen0["a"]).admit(5, 0, 50, 1, b"x")
    gen1 = regions.assign(
        [_spec("a", match={"prefix": "other."}), _spec("b", max_series=60)], gen0, 1
    )
    assert gen1["a"] == gen0["a"]
    assert read_state(pool, gen1["a"]).admitted == 1
    assert gen1["b"] != gen0["b"]
    assert read_state(pool, gen1["b"]).window == -1
    assert regions.retired == 2  # b's old table and c's
    assert regions.release_unused(0) == 0  # a worker may still run generation 0
    before = pool.free_bytes()
    assert regions.release_unused(1) == 2
    assert pool.free_bytes() == before + 2 * limit_bytes(_spec())


def test_no_room_is_an_error_naming_the_rule(pool: LimitPool) -> None:
    """A table that does not fit names its rule, and the tables placed before it are undone."""
    regions = LimitRegions(pool)
    free = pool.free_bytes()
    with pytest.raises(ValueError, match=r"rule 'huge': its limit table needs .* limit_memory"):
        regions.assign([_spec("small", max_tracked=100), _spec("huge", max_tracked=1 << 20)], {}, 0)
    assert pool.free_bytes() == free


# ---------------------------------------------------------------- the supervisor's view
def _generation(specs: list[RuleSpec], limits: dict[str, LimitSlot]) -> Generation:
    settings = Settings(rules=tuple(specs))
    return Generation(0, settings, {s.name: i for i, s in enumerate(specs)}, limits)


def test_watch_warns_once_per_rule_per_window(
    pool: LimitPool, caplog: pytest.LogCaptureFixture
) -> None:
    """One warning per rule and window with refusals, naming the top offenders."""
    spec = _spec(max_series=1, window=3600.0)
    limits = LimitRegions(pool).assign([spec], {}, 0)
    generation = _generation([spec], limits)
    table = pool.table(limits["cap"])
    watch = LimitWatch(
        pool, LimitRegions(pool), lambda: generation, lambda n: n, logging.getLogger("t")
    )
    window = int(time.monotonic() // 3600)
    with caplog.at_level(logging.WARNING):
        watch.check()  # nothing refused yet
        table.admit(1, 0, 1, window, b"api.ok")
        for key in range(2, 6):
            table.admit(key, 0, 1, window, b"api.bad")
        table.admit(9, 0, 1, window, b"api.worse")
        watch.check()
        watch.check()
        table.admit(10, 0, 1, window + 1, b"api.next")  # a new window
        table.admit(11, 0, 1, window + 1, b"api.next")
        watch.check()
    warnings = [r.getMessage() for r in caplog.records]
    head = "rule 'cap' hit its limit of 1 series per 3600s window: "
    assert warnings == [
        head + "5 new series refused so far in this window; most: api.bad (4), api.worse (1)",
        head + "1 new series refused so far in this window; most: api.next (1)",
    ]


def test_limits_report(pool: LimitPool) -> None:
    """/limits: this window's series, refusals, offenders, memory and the running totals."""
    spec = _spec(max_series=2, window=3600.0, per_tag="service")
    limits = LimitRegions(pool).assign([spec], {}, 0)
    generation = _generation([spec], limits)
    stats = SharedStats(2, rule_capacity=4)
    stats.rule_rows(1)[LIMITED] = 7
    stats.rule_rows(0)[SERIES_LIMITED] = 3
    table = pool.table(limits["cap"])
    window = int(time.monotonic() // 3600)
    for key in range(1, 5):
        table.admit(key, lt.BUDGET_BIT | 9, 2, window, b"api.x service:a")
    (report,) = limit_report(generation, pool, stats)["rules"]
    assert report["series"] == 2
    assert report["budgets"] == 1
    assert report["refused"] == 2
    assert report["top_offenders"] == [{"name": "api.x service:a", "series_refused": 2}]
    assert report["memory_bytes"] == limit_bytes(spec)
    assert report["lines_limited_total"] == 7
    assert report["series_limited_total"] == 3
    assert report["per_tag"] == "service"
    assert 0 < report["window_ends_in_seconds"] <= 3600
    assert limit_report(generation, None, stats) == {"rules": []}


def test_reloader_places_tables_and_refuses_when_full(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload keeps an unchanged rule's table; one that cannot get a table is refused."""
    config = tmp_path / "c.toml"
    rule = '[[rules]]\nname = "cap"\nmatch = {{ prefix = "api." }}\naction = "limit_series"\n'
    config.write_text(rule.format() + "max_series = 5\nmax_tracked = 100\n")
    settings = load_settings({}, {}, str(config))
    with LimitPoolContext(2 * limit_bytes(_spec(max_tracked=100))) as pool:
        regions = LimitRegions(pool)
        reloader = Reloader(
            settings, lambda: load_settings({}, {}, str(config)), logging.getLogger("t"), regions
        )
        first = reloader.current.limits["cap"]
        assert reloader.reload() is not None
        assert reloader.current.limits["cap"] == first
        config.write_text(rule.format() + "max_series = 6\nmax_tracked = 100\n")
        second = reloader.reload()
        assert second is not None
        assert second.limits["cap"] != first
        config.write_text(rule.format() + "max_series = 7\nmax_tracked = 100\n")
        with caplog.at_level(logging.ERROR):
            assert reloader.reload() is None  # the first two tables still in use
        assert "rule 'cap': its limit table needs" in caplog.text
        regions.release_unused(second.number)
        assert reloader.reload() is not None


class LimitPoolContext:
    def __init__(self, size: int) -> None:
        self.pool = LimitPool(size)

    def __enter__(self) -> LimitPool:
        return self.pool

    def __exit__(self, *exc: object) -> None:
        self.pool.close()


def test_config_refuses_limit_rules_beyond_limit_memory(tmp_path: Path) -> None:
    """Tables that cannot fit in limit_memory together are a config error naming the rule."""
    config = tmp_path / "c.toml"
    config.write_text(
        "limit_memory = 8388608\n"
        + "".join(
            f'[[rules]]\nname = "r{i}"\nmatch = {{ prefix = "a{i}." }}\n'
            'action = "limit_series"\nmax_series = 5\n'
            for i in range(2)
        )
    )
    with pytest.raises(ConfigError, match=r"rule 'r1': the limit rules need 12\.0 MiB"):
        load_settings({}, {}, str(config))
    settings = load_settings({"limit_memory": "16777216"}, {}, str(config))
    assert settings.limit_memory == 16 << 20
    assert dataclasses.replace(settings).rules == settings.rules


def test_watch_sleeps_without_limit_rules(pool: LimitPool, monkeypatch: pytest.MonkeyPatch) -> None:
    """No limit rule, no table to free: the watch takes no look at all until a reload
    wakes it; with a limit rule it looks every interval; without one again, it stops."""
    monkeypatch.setattr(limits_watch_module, "WATCH_INTERVAL", 0.001)
    regions = LimitRegions(pool)
    plain = _generation([], {})
    spec = _spec(max_series=1, window=3600.0)
    limited = _generation([spec], LimitRegions(pool).assign([spec], {}, 0))
    current = [plain]
    watch = LimitWatch(pool, regions, lambda: current[0], lambda n: n, logging.getLogger("t"))

    async def scenario() -> tuple[int, int, int]:
        task = asyncio.create_task(watch.run())
        for _ in range(50):  # many loop turns and a few timer periods: no look
            await asyncio.sleep(0.001)
        idle = watch.checks
        current[0] = limited
        watch.wake()
        for _ in range(500):
            if watch.checks >= 3:
                break
            await asyncio.sleep(0.002)
        active = watch.checks
        current[0] = plain
        watch.wake()
        await asyncio.sleep(0.01)  # at most one look already under way finishes
        settled = watch.checks
        for _ in range(50):
            await asyncio.sleep(0.001)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return idle, active, watch.checks - settled

    idle, active, after = asyncio.run(scenario())
    assert idle == 0
    assert active >= 3
    assert after == 0
