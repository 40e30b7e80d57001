"""Routing forwarded lines to one or several upstreams.

With one upstream the router is a plain batcher. With several:

* ``shard`` — every line goes to the upstream its metric name (the text
  before the first ``:``) hashes to on a consistent-hash ring placed exactly
  as Etsy StatsD's ``proxy.js`` does, so a name always lands on the same
  server and aggregation stays correct. An unhealthy upstream leaves the ring
  (its names move to the others) and rejoins when healthy (they move back);
  names on healthy upstreams do not move. If every upstream is unhealthy, the
  full ring is used, so TCP upstreams keep buffering.
* ``mirror`` — every line goes to every upstream, each with its own batcher
  and buffer, so a slow one cannot stall the others.

Pure routing: sending and health are the senders' business.
"""

from __future__ import annotations

from collections.abc import Sequence

from statsd_filter.fastio import FAST_PATH, Ring
from statsd_filter.upstream.batcher import Batcher
from statsd_filter.upstream.hashring import EmptyRingError, HashRing

__all__ = ["Router"]

# Route cache entries before it is cleared (bounded memory on name churn).
ROUTE_CACHE_SIZE = 100_000


class Router:
    """Feeds chunks of forwarded lines to the right batchers."""

    def __init__(
        self,
        nodes: Sequence[str],
        batchers: Sequence[Batcher],
        mode: str = "shard",
        weights: Sequence[int] | None = None,
    ) -> None:
        self.nodes = list(nodes)
        self.batchers = list(batchers)
        self.mode = mode if len(self.batchers) > 1 else "single"
        self._index = {node: i for i, node in enumerate(self.nodes)}
        self._weights = dict(zip(self.nodes, weights or [100] * len(self.nodes), strict=True))
        # The router keeps its own cache (name -> batcher index), so the rings keep none.
        self._full = HashRing(self.nodes, weights=self._weights, cache_size=0)
        self._ring = HashRing(self.nodes, weights=self._weights, cache_size=0)
        self._route: dict[bytes, int] = {}
        self.healthy = set(self.nodes)
        # Per-upstream line lists, reused chunk after chunk.
        self._parts: list[list[bytes]] = [[] for _ in self.batchers]
        self._appends = [part.append for part in self._parts]
        # Pre-aggregation's output: the same routes, datagrams without line counts.
        self._uncounted = [batcher.uncounted() for batcher in self.batchers]
        # The ring as the C fast path routes with it (shard mode, C built).
        self.c_ring: Ring | None = None
        self._build_c_ring()

    def _build_c_ring(self) -> None:
        if self.mode != "shard" or not FAST_PATH:
            return
        values, owners = self._ring.continuum()
        if not values:  # every upstream down: the full ring, as _lookup does
            values, owners = self._full.continuum()
        index = self._index
        self.c_ring = Ring(values, [index[node] for node in owners], len(self.batchers))

    def add(self, chunk: bytes, lines: int) -> None:
        """Route a chunk in the filter's shape (``b"\\n"`` + lines joined by ``b"\\n"``)."""
        if self.mode == "single":
            self.batchers[0].add(chunk, lines)
        elif self.mode == "mirror":
            for batcher in self.batchers:
                batcher.add(chunk, lines)
        else:
            self._shard(chunk)

    def add_uncounted(self, chunk: bytes) -> None:
        """Route aggregated lines (the filter's shape) as :meth:`add` does, in
        datagrams of their own whose lines the senders do not count."""
        if self.mode == "single":
            self._uncounted[0].add(chunk, 0)
        elif self.mode == "mirror":
            for batcher in self._uncounted:
                batcher.add(chunk, 0)
        else:
            self._shard(chunk, self._uncounted)

    def _shard(self, chunk: bytes, batchers: list[Batcher] | None = None) -> None:
        # The one per-line Python loop of the proxy; kept to a split, a
        # partition, a dict hit and an append per line (a regex findall of
        # (line, name) pairs cost twice as much).
        route = self._route
        appends = self._appends
        lookup = self._lookup
        for line in chunk[1:].split(b"\n"):
            name = line.partition(b":")[0]  # what proxy.js hashes
            target = route.get(name)
            if target is None:
                target = lookup(name)
            appends[target](line)
        for batcher, lines in zip(batchers or self.batchers, self._parts, strict=True):
            if lines:
                batcher.add(b"\n" + b"\n".join(lines), len(lines))
                lines.clear()

    def _lookup(self, key: bytes) -> int:
        try:
            node = self._ring.get(key)
        except EmptyRingError:
            node = self._full.get(key)
        if len(self._route) >= ROUTE_CACHE_SIZE:
            self._route.clear()
        index = self._route[key] = self._index[node]
        return index

    def reroute(self, payload: bytes, node: str, counted: bool = True) -> bool:
        """Place again the lines of a datagram ``node`` refused; False if no other
        upstream can take them (not sharding, or no other upstream healthy).
        ``counted``: False for a datagram of aggregated lines (see :meth:`add_uncounted`)."""
        if self.mode != "shard" or node in self.healthy or not self.healthy:
            return False
        self._shard(b"\n" + payload, None if counted else self._uncounted)
        return True

    def set_healthy(self, node: str, healthy: bool) -> bool:
        """Mark an upstream (un)healthy; returns True if the ring changed."""
        if healthy == (node in self.healthy):
            return False
        if healthy:
            self.healthy.add(node)
            self._ring.add(node, self._weights[node])
        else:
            self.healthy.discard(node)
            self._ring.remove(node)
        self._route.clear()
        self._build_c_ring()
        return True

    @property
    def packed_size(self) -> int | None:
        """The datagram size the C fast path packs for, when every upstream takes
        the same (for sharding, only with the C ring to route by)."""
        if self.mode == "shard" and self.c_ring is None:
            return None
        sizes = {batcher.max_size for batcher in self.batchers}
        return sizes.pop() if len(sizes) == 1 else None

    def send_routed(self, payloads: list[list[bytes]], lines: list[list[int]]) -> None:
        """Send datagrams the C fast path packed per upstream; its last list holds
        one chunk of lines whose names Python must place."""
        *per_upstream, (rest,) = payloads
        for batcher, batch, counts in zip(self.batchers, per_upstream, lines, strict=False):
            if batch:
                batcher.send_packed(batch, counts)
        if rest:
            self._shard(rest)
            self.flush()

    def send_packed(self, payloads: list[bytes], lines: list[int]) -> None:
        """Send datagrams already packed to ``packed_size`` (to every upstream when mirroring)."""
        if self.mode == "mirror":
            for batcher in self.batchers:
                # Each sender keeps (and may mark) its own lists.
                batcher.send_packed(list(payloads), list(lines))
        else:
            self.batchers[0].send_packed(payloads, lines)

    def flush(self) -> None:
        for batcher in self.batchers:
            batcher.flush()
        for batcher in self._uncounted:
            batcher.flush()
