"""Upstream: batching lines into datagrams and delivering them over UDP or TCP."""

from statsd_filter.upstream.base import Upstream, make_upstream
from statsd_filter.upstream.batcher import Batcher

__all__ = ["Batcher", "Upstream", "make_upstream"]
