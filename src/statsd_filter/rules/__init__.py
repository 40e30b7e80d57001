"""Rules: compile the configured rules into a matcher that decides keep/drop per line."""

from statsd_filter.rules.compile import RuleRows, compile_filter, counter_row_names
from statsd_filter.rules.filter import FilterResult, LineFilter

__all__ = ["FilterResult", "LineFilter", "RuleRows", "compile_filter", "counter_row_names"]
