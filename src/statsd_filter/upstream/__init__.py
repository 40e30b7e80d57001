"""Upstream: batching lines into datagrams, routing them, and delivering them over UDP or TCP."""

from statsd_filter.upstream.base import Upstream
from statsd_filter.upstream.batcher import Batcher
from statsd_filter.upstream.factory import UpstreamSet, make_upstream
from statsd_filter.upstream.router import Router

__all__ = ["Batcher", "Router", "Upstream", "UpstreamSet", "make_upstream"]
