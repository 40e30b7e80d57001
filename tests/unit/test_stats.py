"""Unit tests for statsd_filter.stats.SharedStats."""

from __future__ import annotations

import os

from statsd_filter.stats import GAUGES, SLOT_WIDTH, Counter, SharedStats


def test_slot_writes_visible_via_get_and_total() -> None:
    """A value written into a worker's slot is read back by get() and summed by total()."""
    stats = SharedStats(3)
    stats.slot(0)[Counter.LINES_RECEIVED] = 5
    stats.slot(2)[Counter.LINES_RECEIVED] = 7
    stats.slot(1)[Counter.LINES_BLOCKED] = 11
    assert stats.get(0, Counter.LINES_RECEIVED) == 5
    assert stats.get(1, Counter.LINES_RECEIVED) == 0
    assert stats.get(2, Counter.LINES_RECEIVED) == 7
    assert stats.total(Counter.LINES_RECEIVED) == 12
    assert stats.total(Counter.LINES_BLOCKED) == 11
    assert stats.total(Counter.LINES_FORWARDED) == 0


def test_slots_do_not_overlap() -> None:
    """Every counter of every slot is an independent cell."""
    stats = SharedStats(4)
    for index in range(4):
        row = stats.slot(index)
        assert len(row) == SLOT_WIDTH
        for counter in Counter:
            row[counter] = index * 1000 + counter
    for index in range(4):
        for counter in Counter:
            assert stats.get(index, counter) == index * 1000 + counter
    for counter in Counter:
        assert stats.total(counter) == sum(i * 1000 + counter for i in range(4))


def test_counters_hold_64_bit_values() -> None:
    """Counters are unsigned 64-bit: large totals do not wrap at 32 bits."""
    stats = SharedStats(2)
    stats.slot(0)[Counter.BYTES_IN] = 2**40
    stats.slot(1)[Counter.BYTES_IN] = 2**63
    assert stats.total(Counter.BYTES_IN) == 2**40 + 2**63
    assert stats.get(1, Counter.BYTES_IN) == 2**63


def test_reset_gauges_zeroes_only_gauges_of_that_slot() -> None:
    """reset_gauges clears the slot's gauges, keeps its counters and other slots untouched."""
    stats = SharedStats(2)
    for index in range(2):
        row = stats.slot(index)
        for counter in Counter:
            row[counter] = 100 + counter
    stats.reset_gauges(0)
    for counter in Counter:
        assert stats.get(0, counter) == (0 if counter in GAUGES else 100 + counter), counter
        assert stats.get(1, counter) == 100 + counter
    assert Counter.TCP_CONNECTIONS_OPEN in GAUGES
    assert Counter.LINES_RECEIVED not in GAUGES


def test_forked_child_writes_are_visible_to_parent() -> None:
    """The region is shared across fork: a worker's writes reach the supervisor."""
    stats = SharedStats(2)
    stats.slot(0)[Counter.LINES_FORWARDED] = 1
    pid = os.fork()
    if pid == 0:  # child: write and leave without running any pytest machinery
        code = 1
        try:
            row = stats.slot(1)
            row[Counter.LINES_FORWARDED] = 41
            row[Counter.STATE] = 2
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert stats.get(1, Counter.LINES_FORWARDED) == 41
    assert stats.get(1, Counter.STATE) == 2
    assert stats.total(Counter.LINES_FORWARDED) == 42
