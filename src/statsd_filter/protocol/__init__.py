"""Sans-I/O protocol code: StatsD line splitting and framing, the lazy line view,
and the control-channel frames; bytes in, values out, no sockets, no asyncio."""

from statsd_filter.protocol.lines import LineFramer, split_lines

__all__ = ["LineFramer", "split_lines"]
