"""Unit tests for statsd_filter.stats.SharedStats."""

from __future__ import annotations

import os

from statsd_filter.stats import GAUGES, SLOT_WIDTH, SharedStats, Stat


def test_slot_writes_visible_via_get_and_total() -> None:
    """A value written into a worker's slot is read back by get() and summed by total()."""
    stats = SharedStats(3)
    stats.row(0)[Stat.LINES_RECEIVED] = 5
    stats.row(2)[Stat.LINES_RECEIVED] = 7
    stats.row(1)[Stat.LINES_BLOCKED] = 11
    assert stats.get(0, Stat.LINES_RECEIVED) == 5
    assert stats.get(1, Stat.LINES_RECEIVED) == 0
    assert stats.get(2, Stat.LINES_RECEIVED) == 7
    assert stats.total(Stat.LINES_RECEIVED) == 12
    assert stats.total(Stat.LINES_BLOCKED) == 11
    assert stats.total(Stat.LINES_FORWARDED) == 0


def test_slots_do_not_overlap() -> None:
    """Every stat of every slot is an independent cell."""
    stats = SharedStats(4)
    for index in range(4):
        row = stats.row(index)
        assert len(row) == SLOT_WIDTH
        for stat in Stat:
            row[stat] = index * 1000 + stat
    for index in range(4):
        for stat in Stat:
            assert stats.get(index, stat) == index * 1000 + stat
    for stat in Stat:
        assert stats.total(stat) == sum(i * 1000 + stat for i in range(4))


def test_stats_hold_64_bit_values() -> None:
    """Stats are unsigned 64-bit: large totals do not wrap at 32 bits."""
    stats = SharedStats(2)
    stats.row(0)[Stat.BYTES_IN] = 2**40
    stats.row(1)[Stat.BYTES_IN] = 2**63
    assert stats.total(Stat.BYTES_IN) == 2**40 + 2**63
    assert stats.get(1, Stat.BYTES_IN) == 2**63


def test_reset_gauges_zeroes_only_gauges_of_that_slot() -> None:
    """reset_gauges clears the slot's gauges, keeps its stats and other slots untouched."""
    stats = SharedStats(2)
    for index in range(2):
        row = stats.row(index)
        for stat in Stat:
            row[stat] = 100 + stat
    stats.reset_gauges(0)
    for stat in Stat:
        assert stats.get(0, stat) == (0 if stat in GAUGES else 100 + stat), stat
        assert stats.get(1, stat) == 100 + stat
    assert Stat.TCP_CONNECTIONS_OPEN in GAUGES
    assert Stat.LINES_RECEIVED not in GAUGES


def test_forked_child_writes_are_visible_to_parent() -> None:
    """The region is shared across fork: a worker's writes reach the supervisor."""
    stats = SharedStats(2)
    stats.row(0)[Stat.LINES_FORWARDED] = 1
    pid = os.fork()
    if pid == 0:  # child: write and leave without running any pytest machinery
        code = 1
        try:
            row = stats.row(1)
            row[Stat.LINES_FORWARDED] = 41
            row[Stat.STATE] = 2
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert stats.get(1, Stat.LINES_FORWARDED) == 41
    assert stats.get(1, Stat.STATE) == 2
    assert stats.total(Stat.LINES_FORWARDED) == 42
