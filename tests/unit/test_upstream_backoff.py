"""Unit tests for statsd_filter.upstream.backoff.Backoff."""

from __future__ import annotations

import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statsd_filter.upstream import backoff as backoff_module
from statsd_filter.upstream.backoff import Backoff

PROPERTY = settings(max_examples=300, deadline=None)


@pytest.fixture
def seeded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the jitter reproducible without touching the global random state."""
    monkeypatch.setattr(backoff_module, "random", random.Random(20240601))


@pytest.fixture
def no_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every draw returns its upper bound, exposing the ceiling schedule."""

    class Top:
        def uniform(self, _low: float, high: float) -> float:
            return high

    monkeypatch.setattr(backoff_module, "random", Top())


@PROPERTY
@given(
    st.floats(min_value=1e-4, max_value=5.0),
    st.floats(min_value=1.0, max_value=60.0),
    st.integers(min_value=1, max_value=80),
)
def test_delays_positive_and_capped(base: float, cap_factor: float, retries: int) -> None:
    """Every delay is > 0 and never above the cap (for any base <= cap), however many retries."""
    cap = base * cap_factor
    backoff = Backoff(base=base, cap=cap)
    for _ in range(retries):
        delay = backoff.next_delay()
        assert 0 < delay <= cap


@pytest.mark.usefixtures("no_jitter")
def test_ceiling_doubles_up_to_cap() -> None:
    """The jitter ceiling is base * 2**attempt, capped."""
    backoff = Backoff(base=0.05, cap=2.0)
    delays = [backoff.next_delay() for _ in range(9)]
    assert delays == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0])


def test_floor_is_half_base(monkeypatch: pytest.MonkeyPatch) -> None:
    """A zero draw still waits base/2, so a dead upstream never causes a hot loop."""

    class Bottom:
        def uniform(self, low: float, _high: float) -> float:
            return low

    monkeypatch.setattr(backoff_module, "random", Bottom())
    backoff = Backoff(base=0.2, cap=1.0)
    assert [backoff.next_delay() for _ in range(3)] == [0.1, 0.1, 0.1]


@pytest.mark.usefixtures("seeded")
def test_delays_grow_on_average() -> None:
    """The mean delay rises with each retry until the cap is reached."""
    runs = [Backoff(base=0.05, cap=2.0) for _ in range(2000)]
    means = [statistics.fmean(b.next_delay() for b in runs) for _ in range(7)]
    assert means == sorted(means)
    assert means[-1] > 10 * means[0]
    # Full jitter: the mean at the cap is about cap/2.
    assert means[-1] == pytest.approx(1.0, rel=0.1)


@pytest.mark.usefixtures("no_jitter")
def test_reset_starts_over() -> None:
    """reset() forgets past failures: the next delay is back to the first step."""
    backoff = Backoff(base=0.1, cap=5.0)
    for _ in range(5):
        backoff.next_delay()
    assert backoff.attempt == 5
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.next_delay() == pytest.approx(0.1)
    assert backoff.next_delay() == pytest.approx(0.2)


def test_many_attempts_do_not_overflow() -> None:
    """Thousands of retries keep returning capped delays (no overflow in 2**attempt)."""
    backoff = Backoff(base=0.05, cap=2.0)
    backoff.attempt = 10_000
    assert 0 < backoff.next_delay() <= 2.0


def test_cap_holds_even_for_large_base() -> None:
    """The cap is an upper bound for any base."""
    assert Backoff(base=1.0, cap=0.4).next_delay() <= 0.4
