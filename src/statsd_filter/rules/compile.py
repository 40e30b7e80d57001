"""Build the line filter from settings; all compile work happens here, at config load."""

from __future__ import annotations

from statsd_filter.rules.filter import LineFilter
from statsd_filter.rules.prefix import PrefixSet

__all__ = ["compile_filter"]


def compile_filter(blocklist: tuple[str, ...], max_line_bytes: int) -> LineFilter:
    """Compile a prefix blocklist (UTF-8 strings) into a :class:`LineFilter`."""
    prefixes = [p.encode() for p in blocklist if p]
    return LineFilter(PrefixSet(prefixes) if prefixes else None, max_line_bytes)
