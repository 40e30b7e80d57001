"""Unit tests for statsd_filter.cardinality: the linear counter of distinct tag sets."""

from __future__ import annotations

import pytest

from statsd_filter.cardinality import BITS, estimate, relative_error, tag_set_bit


def bitmap(items: list[bytes]) -> int:
    bits = 0
    for item in items:
        bits |= tag_set_bit(item)
    return bits


def test_tag_order_does_not_make_a_new_tag_set() -> None:
    """a:1,b:2 and b:2,a:1 set the same bit; a different set usually does not."""
    assert tag_set_bit(b"a:1,b:2") == tag_set_bit(b"b:2,a:1")
    assert tag_set_bit(b"a:1,b:2").bit_count() == 1
    distinct = {tag_set_bit(b"a:%d" % i) for i in range(20)}
    assert len(distinct) >= 18


def test_small_counts_are_exact_or_nearly() -> None:
    """A handful of tag sets is counted (almost always) exactly; repeats change nothing."""
    assert estimate(0) == (0, False)
    assert estimate(bitmap([b""] * 50)) == (1, False)
    assert estimate(bitmap([b"host:%d" % i for i in range(7)] * 3))[0] == 7


@pytest.mark.parametrize("n", [100, 1000, 3000])
def test_estimates_within_four_standard_errors(n: int) -> None:
    """n distinct tag sets are estimated within 4 documented standard errors."""
    got, saturated = estimate(bitmap([b"req:%d,env:prod" % i for i in range(n)]))
    assert not saturated
    assert abs(got - n) <= 4 * relative_error(n) * n


def test_merging_is_or_and_counts_the_union() -> None:
    """ORing two bitmaps (two workers, two periods) counts the union, not the sum."""
    a = bitmap([b"k:%d" % i for i in range(300)])
    b = bitmap([b"k:%d" % i for i in range(200, 500)])
    got, _ = estimate(a | b)
    assert abs(got - 500) <= 4 * relative_error(500) * 500


def test_saturation_is_reported_as_a_floor() -> None:
    """Far more tag sets than bits: every bit set, reported as saturated (at least ~m ln m)."""
    got, saturated = estimate((1 << BITS) - 1)
    assert saturated
    assert got >= BITS * 5
    assert relative_error(0) == 0.0
