"""Sans-I/O StatsD protocol handling: bytes in, lines out; no sockets, no asyncio."""

from statsd_filter.protocol.lines import LineFramer, split_lines

__all__ = ["LineFramer", "split_lines"]
