"""Unit tests for supervisor/top.py: merging sampled reports, prefixes, rate history."""

from __future__ import annotations

import math

from statsd_filter.cardinality import tag_set_bit
from statsd_filter.protocol.messages import NameStats, TopReport
from statsd_filter.supervisor.top import RateHistory, RuleRates, TopBoard, prefixes_of
from statsd_filter.worker.sampler import REPORT_INTERVAL


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def stats(lines: float, length: int = 10, fwd: float | None = None, rule: str = "") -> NameStats:
    fwd = lines if fwd is None else fwd
    # 5 sampled lines, each standing for a fifth of the lines.
    sq = 5 * (lines / 5) ** 2
    return (lines, lines * length, fwd, fwd * length, lines - fwd, 0.0, 5, 0, {rule: lines}, sq)


def test_prefixes_of() -> None:
    """The 1- to 3-segment proper prefixes of a name, with their dot; none for pseudo-names."""
    assert prefixes_of("a.b.c.d.e") == ["a.", "a.b.", "a.b.c."]
    assert prefixes_of("a.b") == ["a."]
    assert prefixes_of("plain") == []
    assert prefixes_of("(event)") == []


def test_rates_are_per_worker_over_the_time_its_reports_cover() -> None:
    """A worker's lines are divided by its own reports' seconds; workers' rates add up."""
    clock = Clock()
    board = TopBoard(10.0, clock)
    for _ in range(4):  # worker 0: 4 s at 100 lines/s of api.a
        board.add(TopReport(0, 1.0, 1, 100, {b"api.a": stats(100)}))
    board.add(TopReport(1, 2.0, 50, 10, {b"api.a": stats(60), b"api.b.c": stats(20, fwd=5)}))
    doc = board.snapshot("lines", 10)
    rows = {row["name"]: row for row in doc["names"]}
    assert rows["api.a"]["lines_per_s"] == 130.0  # 100 + 60/2
    assert rows["api.a"]["lines"] == 460.0
    assert rows["api.b.c"]["forwarded_lines_per_s"] == 2.5
    assert rows["api.b.c"]["blocked_lines_per_s"] == 7.5
    assert [row["name"] for row in doc["names"]] == ["api.a", "api.b.c"]
    prefixes = {row["prefix"]: row for row in doc["prefixes"]}
    assert prefixes["api."]["lines_per_s"] == 140.0
    assert prefixes["api."]["names"] == 2
    assert prefixes["api.b."]["segments"] == 2
    assert {s["worker"]: s["seconds"] for s in doc["sampling"]} == {0: 4.0, 1: 2.0}
    # Worker 1 sampled (step 50): not exact; 25 sampled lines in all. The error is that
    # of a weighted sum, sqrt(sum of squared weights) / estimate: here each report's 5
    # lines stood for a fifth of its count, 1/sqrt(25) if the counts were all equal.
    assert rows["api.a"]["sampled_lines"] == 25
    squares = 4 * 100**2 / 5 + 60**2 / 5
    assert rows["api.a"]["relative_error"] == round(math.sqrt(squares) / 460, 3)


def test_exact_when_every_report_saw_every_line() -> None:
    """Names only ever counted at step 1 have no sampling error."""
    board = TopBoard(10.0, Clock())
    board.add(TopReport(0, 1.0, 1, 100, {b"x": stats(3)}))
    assert board.snapshot()["names"][0]["relative_error"] == 0.0


def test_sorting_limit_cardinality_and_rule() -> None:
    """Sort by bytes or tag sets, keep `limit` rows; the rule deciding most lines is named."""
    board = TopBoard(10.0, Clock())
    bits = 0
    for i in range(30):
        bits |= tag_set_bit(b"host:%d" % i)
    many_tags = (10.0, 100.0, 10.0, 100.0, 0.0, 0.0, 5, bits, {"": 10.0}, 10.0)
    board.add(
        TopReport(
            0,
            1.0,
            1,
            10,
            {
                b"small": stats(50, length=2, fwd=0, rule="drop-small"),
                b"big": stats(10, length=100),
                b"tags": many_tags,
            },
        )
    )
    by_lines = board.snapshot("lines", 10)["names"]
    assert [r["name"] for r in by_lines] == ["small", "big", "tags"]
    assert by_lines[0]["rule"] == "drop-small"
    assert by_lines[1]["rule"] is None
    by_bytes = board.snapshot("bytes", 2)["names"]
    assert [r["name"] for r in by_bytes] == ["big", "small"]  # 100 = 100 bytes/s: by name
    by_tags = board.snapshot("cardinality", 1)["names"]
    assert by_tags[0]["name"] == "tags"
    assert abs(by_tags[0]["tag_sets"] - 30) <= 3


def test_reports_older_than_the_window_are_forgotten() -> None:
    """A report leaves the window `window` seconds after it arrived."""
    clock = Clock()
    board = TopBoard(5.0, clock)
    board.add(TopReport(0, 1.0, 1, 1, {b"old": stats(1)}))
    clock.now += 6
    board.add(TopReport(0, 1.0, 1, 1, {b"new": stats(1)}))
    assert [r["name"] for r in board.snapshot()["names"]] == ["new"]
    clock.now += 6
    assert board.snapshot()["names"] == []
    assert board.sampling() == []


def test_rate_history_and_rates() -> None:
    """Snapshots become per-second rates; rates() looks back about a window."""
    clock = Clock()
    totals = {"received": 0, "forwarded": 0, "blocked": 0, "aggregated": 0, "dropped": 0}
    history = RateHistory(lambda: dict(totals), clock, points=3)
    assert history.rates(10)["received"] == 0.0
    for step in range(5):
        history.sample()
        clock.now += 2
        totals["received"] += 200 * (step + 1)
        totals["forwarded"] += 100
    series = history.series()
    # points=3 keeps the last 4 snapshots: received 200, 600, 1200, 2000 two seconds apart.
    assert series["received"] == [200.0, 300.0, 400.0]
    assert series["forwarded"] == [50.0, 50.0, 50.0]
    assert series["interval_seconds"] == 2.0
    assert history.rates(4)["forwarded"] == 50.0


def test_rule_rates_from_snapshots() -> None:
    """Rule hit rates: counters now against a snapshot half a window old or older."""
    clock = Clock()
    matches = {"a": 0, "b": 5}
    rates = RuleRates(lambda: dict(matches), 10.0, clock)
    rates.sample()
    clock.now += 4
    rates.sample()  # too soon after the last one: not kept
    matches["a"] = 40
    assert rates.rates(["a", "b", "c"]) == {"a": (40, 10.0), "b": (5, 0.0), "c": (0, 0.0)}
    clock.now += 6
    rates.sample()
    matches["a"] = 100
    assert rates.rates(["a"]) == {"a": (100, 10.0)}


def test_quiet_seconds_count_as_covered_time() -> None:
    """A worker that skips its empty reports is divided by the seconds one that sent
    them all is, to the one report at the window's edge: the quiet seconds it
    reports (clipped to the window) and the time since its last report beyond the
    one report it still owes."""
    every = TopBoard(10.0, clock_a := Clock())
    skipping = TopBoard(10.0, clock_b := Clock())
    for _ in range(20):  # a quiet spell longer than the window: an empty report a second
        clock_a.now += 1
        every.add(TopReport(0, 1.0, 1, 0, {}))
    clock_b.now = clock_a.now
    for second in range(3):  # then 3 s at 100 lines a second
        for board, clock in ((every, clock_a), (skipping, clock_b)):
            clock.now += 1
            # The skipping worker reports the quiet spell with its first report.
            quiet = 20.0 if board is skipping and second == 0 else 0.0
            board.add(TopReport(0, 1.0, 1, 100, {b"api.a": stats(100)}, quiet=quiet))
    for _ in range(4):  # then idle again: an empty report a second, or none at all
        clock_a.now += 1
        clock_b.now += 1
        every.add(TopReport(0, 1.0, 1, 0, {}))
    clock_a.now += 0.5
    clock_b.now += 0.5
    for board in (every, skipping):
        (row,) = board.snapshot()["names"]
        assert row["lines"] == 300.0
    # The window is [117.5, 127.5]. every: the reports that arrived in it, 10 s (the
    # one that arrived at 118 covers [117, 118]); skipping: the spell's last 2.5 s,
    # 3 s of traffic, 4.5 s since, less the one report still owed: 9 s.
    every_s = every.sampling()[0]["seconds"]
    skipping_s = skipping.sampling()[0]["seconds"]
    assert (every_s, skipping_s) == (10.0, 9.0)
    assert abs(every_s - skipping_s) <= REPORT_INTERVAL
    assert every.snapshot()["names"][0]["lines_per_s"] == 30.0
    assert skipping.snapshot()["names"][0]["lines_per_s"] == round(300 / 9.0, 2)


def test_quiet_report_is_clipped_to_the_window() -> None:
    """Only the part of a report's quiet spell inside the window counts."""
    clock = Clock()
    board = TopBoard(10.0, clock)
    board.add(TopReport(0, 1.0, 1, 10, {b"x": stats(10)}, quiet=4.0))
    assert board.sampling()[0]["seconds"] == 5.0  # 4 quiet + 1 s period, all in the window
    clock.now += 7  # the window now starts 3 s before the report arrived
    # 1 s period + 2 s of quiet inside the window + 6 s since the report, less 1 owed.
    assert board.sampling()[0]["seconds"] == 9.0
    assert board.snapshot()["names"][0]["lines_per_s"] == round(10 / 9.0, 2)


def test_an_idle_worker_stays_listed() -> None:
    """An idle worker's report of its quiet seconds keeps it in `sampling`, its seconds
    near the window, its points zero."""
    clock = Clock()
    board = TopBoard(10.0, clock)
    for _ in range(3):
        board.add(TopReport(1, 1.0, 1, 0, {}, quiet=4.0))
        clock.now += 5
    (worker,) = board.sampling()
    assert worker["worker"] == 1
    assert worker["points_per_s"] == 0.0
    assert 9.0 <= worker["seconds"] <= 11.0
