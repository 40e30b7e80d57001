"""Capped exponential backoff with full jitter, for reconnects and re-resolves.

Full jitter (a uniform draw between 0 and the capped exponential) spreads the
reconnects of many workers and many proxies so a recovering upstream is not
hit by all of them at the same instant.
"""

from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    """Delays for successive retries: uniform(0, min(cap, base * 2**attempt))."""

    __slots__ = ("attempt", "base", "cap")

    def __init__(self, base: float = 0.05, cap: float = 2.0) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0

    def next_delay(self) -> float:
        """The delay before the next retry; grows until ``cap``."""
        ceiling = min(self.cap, self.base * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        # Never zero: a floor of base/2 keeps a dead upstream from a hot loop.
        return min(self.cap, max(self.base / 2, random.uniform(0, ceiling)))

    def reset(self) -> None:
        """Forget past failures (after a success)."""
        self.attempt = 0
