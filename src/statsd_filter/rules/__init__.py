"""Rules: compile the configured rules into a matcher that decides keep/drop per line."""

from statsd_filter.rules.compile import compile_filter
from statsd_filter.rules.filter import FilterResult, LineFilter

__all__ = ["FilterResult", "LineFilter", "compile_filter"]
